"""Where MLflow stores a run, and a client for it: one place for the server's federation runs and for studies.

The store is the configured URI, else ``MLFLOW_TRACKING_URI``, else a SQLite file in a default folder; a local
store inside the Flower app folder is refused (Flower bundles that folder into every app it ships).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from shared.noise import hide_third_party_noise

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["DEFAULT_STORE_DIR", "TrackingError", "describe_location", "mlflow_client", "resolve_tracking_uri"]

#: Where the local SQLite store goes when neither the config nor ``MLFLOW_TRACKING_URI`` names one.
DEFAULT_STORE_DIR = Path("~/.fedabus")


class TrackingError(RuntimeError):
    """The MLflow store cannot be used as asked (wrong location, unknown run, not a fedabus run)."""


def _default_app_dir() -> Path:
    """The Flower app folder (the repository, or wherever ``shared/`` was unpacked): Flower bundles it."""
    return Path(__file__).resolve().parents[1]


def _local_store_path(uri: str) -> Path | None:
    """File path of a SQLite or file store (None for servers and other databases)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri.removeprefix("sqlite://").split("?", 1)[0]
        return Path(path[1:] if path.startswith("/") else path) if path not in ("", "/:memory:") else None
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "" and uri:
        return Path(uri)
    return None


def resolve_tracking_uri(
    configured: str = "",
    *,
    default_dir: str | Path | None = None,
    app_dir: str | Path | None = None,
) -> str:
    """The MLflow tracking URI: ``configured``, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<default_dir>/mlflow.db`` (``default_dir`` defaults to :data:`DEFAULT_STORE_DIR`).

    Relative SQLite and file paths are made absolute (the ServerApp's working directory is not the user's).
    A local store inside ``app_dir`` (default: the folder holding ``server/``) raises TrackingError: Flower
    bundles that folder into every app it ships.
    """
    uri = configured.strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        folder = Path(default_dir if default_dir is not None else DEFAULT_STORE_DIR).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
    path = _local_store_path(uri)
    if path is None:
        return uri
    path = path.expanduser().resolve()
    forbidden = Path(app_dir if app_dir is not None else _default_app_dir()).resolve()
    if path == forbidden or forbidden in path.parents:
        raise TrackingError(
            f"MLflow store {path} lies inside the Flower app folder {forbidden}, which Flower bundles into the "
            "app; set the tracking URI (config or MLFLOW_TRACKING_URI) to a location outside it"
        )
    if urlparse(uri).scheme == "sqlite":
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return path.as_uri()


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a new experiment in a local SQLite store go next to the database, never into the CWD."""
    path = _local_store_path(uri)
    if path is None or urlparse(uri).scheme != "sqlite":
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", experiment)
    return (path.parent / f"{path.stem}-artifacts" / safe).as_uri()


def describe_location(tracking_uri: str, *, experiment_id: str, run_id: str) -> str:
    """A message saying where a run is stored and how to open it in the MLflow UI."""
    fragment = f"#/experiments/{experiment_id}/runs/{run_id}"
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("http", "https"):
        return f"MLflow run {run_id} is on the tracking server {tracking_uri}; open {tracking_uri.rstrip('/')}/{fragment}"
    return (
        f"MLflow run {run_id} (experiment {experiment_id}) is stored in {tracking_uri}.\n"
        f"Open the UI with:\n  mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000\n"
        f"then browse to http://127.0.0.1:5000/{fragment}"
    )


def mlflow_client(uri: str) -> MlflowClient:
    hide_third_party_noise()  # SQLAlchemy deprecations inside MLflow's SQL store, which nobody here can fix
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)
