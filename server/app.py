"""fedabus ServerApp (Flower Message API). The federation logic arrives with the federation issue (#5)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    raise RuntimeError("the fedabus federation is not implemented yet (issue 5); nothing was started")
