"""fedabus ServerApp: adapter-only federation with handshake, tracking, checkpoints and resume.

This module only reads the run config (once) and hands it to :class:`~server.federation_run.FederationRun`,
which wires the strategy, MLflow tracking, the end-of-round work and the final test together and runs them.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation_run import REFUSED_START, FederationRun, record_refused_start
from shared.config import load_run_config
from shared.privacy.validation import validate_privacy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    num_rounds = int(run_config.get("num-server-rounds", 3))
    config = load_run_config(run_config)
    validate_privacy(config)  # refuse DP settings that would not protect anything before any site trains
    try:
        run = FederationRun.prepare(grid, config, num_rounds=num_rounds)
    except tuple(REFUSED_START) as refused:  # a stop with the file and the reason, not a traceback
        record_refused_start(config, refused)
        return
    run.run()
