"""An MLflow tracking server that is down must not stop or silently stall a federation.

MLflow's REST client retries a refused connection 7 times with exponential backoff and waits up to 120 s for
each answer (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``,
``MLFLOW_HTTP_REQUEST_TIMEOUT``; mlflow/environment_variables.py, read at every request): one call to a stopped
server blocks the ServerApp for minutes without a word, then raises. :func:`apply_http_policy` bounds that to a few
seconds per call, and :class:`TrackingOutage` tells a failure of the connection (:func:`is_unreachable`) from a
real error and says in the server log when the tracking server became unreachable and when it came back.
:class:`~server.tracking.FederationTracker` keeps what it could not send and sends it, in round order, once the
server answers again.

Messages go to Flower's logger by name (``flwr``, the server log) without importing Flower; MLflow and requests
are imported when an error is classified.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import MutableMapping
from logging import INFO, WARNING

__all__ = ["HTTP_POLICY", "TrackingOutage", "apply_http_policy", "is_unreachable"]

#: MLflow's HTTP settings for the server's tracking calls: 2 retries (0 s, then about 2 s apart) and 10 s per
#: answer, so a call to a stopped tracking server fails in seconds (a hung one in about 30 s) instead of minutes.
#: Values already in the environment win (an operator may want more patience).
HTTP_POLICY: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}

#: Flower's logger (``flwr.common.logger.FLOWER_LOGGER``): what it logs is in the server log.
_LOG = logging.getLogger("flwr")

#: How MLflow's REST client words a request that never got an answer (mlflow/utils/rest_utils.py).
_TRANSPORT_FAILURE = ("failed with exception", "failed with timeout exception")


def apply_http_policy(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`HTTP_POLICY` in ``environ`` (default ``os.environ``) where a value is not set yet; returns the
    values in force."""
    environ = os.environ if environ is None else environ
    for key, value in HTTP_POLICY.items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in HTTP_POLICY}


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the tracking server did not answer (refused, reset, timed out, 5xx after the
    retries), as opposed to an answer that refused the request (a bad value, an unknown run)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError):
        return True
    if isinstance(error, MlflowException):
        message = str(error.message)
        return message.startswith("API request to") and any(s in message for s in _TRANSPORT_FAILURE)
    return False


class TrackingOutage:
    """Whether the tracking server at ``uri`` answered the last call; logs each change once.

    :meth:`failed` on a call that could not reach it (a WARNING the first time), :meth:`reachable` after a call
    that did (an INFO when it had been unreachable, naming what was sent late)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.down_since: float | None = None
        self.failures = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, what: str, error: BaseException) -> None:
        """A call for ``what`` (e.g. ``round 3``) did not reach the server."""
        self.failures += 1
        if self.down_since is not None:
            return
        self.down_since = time.monotonic()
        reason = str(getattr(error, "message", error)).splitlines()[0][:300]
        _LOG.log(
            WARNING,
            "MLflow tracking server %s is unreachable (%s); training goes on: %s and what follows are kept and "
            "sent when it is back",
            self.uri,
            reason,
            what,
        )

    def reachable(self, sent_late: list[str]) -> None:
        """A call reached the server; ``sent_late`` names what was kept during the outage and is now sent."""
        if self.down_since is None:
            return
        seconds = time.monotonic() - self.down_since
        self.down_since = None
        _LOG.log(
            INFO,
            "MLflow tracking server %s is reachable again after %.0f s; sent what it missed: %s",
            self.uri,
            seconds,
            ", ".join(sent_late) or "nothing",
        )
