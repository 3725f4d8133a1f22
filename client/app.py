"""fedabus ClientApp: thin Flower handlers around :mod:`client.task`.

Each handler decodes the message, calls plain training/evaluation code, and encodes a reply holding only
the checked adapter update and aggregate metrics (:mod:`client.egress`), plus a ``site`` ConfigRecord with
the site's name. A site whose base differs from the federation's does not train and says why.

MONAI is imported first, without the libraries only its unused integrations need (:mod:`client.monai_import`):
a deployed site imports this module once per message.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

# First of fedabus' imports: it imports MONAI without its MLflow, matplotlib and transformers pulls.
from client import monai_import  # noqa: F401
from client.egress import outgoing_site_record
from client.privacy import client_dp_clipping_mod
from client.secure_aggregation import answer_keys, answer_shares, answer_unmask, secure_aggregation_mod
from client.task import (
    BaseMismatch,
    BudgetSpent,
    base_of,
    open_site_of,
    run_evaluate,
    run_train,
    site_settings,
)
from shared import __version__
from shared.config import SPLITS, load_run_config
from shared.metric_names import VAL
from shared.protocol import (
    ARRAYS,
    BASE_FINGERPRINT,
    CONFIG,
    DECLINED,
    FEDABUS_VERSION,
    METRICS,
    NUM_EXAMPLES,
    SECAGG_KEYS,
    SECAGG_SHARES,
    SECAGG_UNMASK,
    SERVER_ROUND,
    SITE,
    SITE_ID,
    SPLIT,
    num_cases_key,
)

# Mods wrap in list order: a train reply passes client-level DP's clipping first, then the masking.
app = ClientApp(mods=[secure_aggregation_mod, client_dp_clipping_mod])


def _config(context: Context):
    return load_run_config(context.run_config)


def _reply(
    msg: Message,
    metrics: dict[str, float],
    site: str,
    arrays: ArrayRecord | None = None,
    extra: dict[str, str | int] | None = None,
) -> Message:
    """The reply to ``msg``: ``metrics``, the ``site`` record (``site-id`` and the ``extra`` keys) and the
    update ``arrays`` when there is one."""
    site_record = ConfigRecord(outgoing_site_record({SITE_ID: site, **(extra or {})}))
    content = RecordDict({METRICS: MetricRecord(metrics), SITE: site_record})
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Handshake: the site's name and base fingerprint (no data details beyond case counts). A fresh process
    hashes the base's weights here rather than trusting a recorded stamp: once per run, every site's weights are
    read in full."""
    config = _config(context)
    settings = site_settings(dict(context.node_config), config)
    base = base_of(settings, config, trust_stamp=False)
    site = open_site_of(settings, config, run=str(context.run_id))
    info = {BASE_FINGERPRINT: base.fingerprint, FEDABUS_VERSION: __version__}
    counts = {num_cases_key(split): float(len(site.cases(split))) for split in SPLITS}
    return _reply(msg, counts, site.name, extra=info)


@app.query(SECAGG_KEYS)
def secagg_keys(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 1: this round's public keys (:mod:`client.secure_aggregation`)."""
    return answer_keys(msg, context)


@app.query(SECAGG_SHARES)
def secagg_shares(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 2: encrypted Shamir shares for the peers."""
    return answer_shares(msg, context)


@app.query(SECAGG_UNMASK)
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 4: the shares the server needs to remove the masks of the round's sum."""
    return answer_unmask(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = _config(context)
    round_config = msg.content[CONFIG]
    settings = site_settings(dict(context.node_config), config)
    server_round = int(round_config.get(SERVER_ROUND, 0))  # every train reply says which round it answers
    try:
        record, metrics, site = run_train(
            settings,
            config,
            msg.content[ARRAYS],
            fingerprint=str(round_config.get(BASE_FINGERPRINT, "")),
            server_round=server_round,
            num_rounds=int(context.run_config.get("num-server-rounds", 1)),
            run=str(context.run_id),
        )
    except BaseMismatch as exc:
        site_name = settings.site_id or settings.site_dir.name
        return _reply(
            msg, {NUM_EXAMPLES: 0.0}, site_name, extra={DECLINED: str(exc), SERVER_ROUND: server_round}
        )
    except BudgetSpent as exc:
        return _reply(msg, exc.metrics, exc.site, extra={DECLINED: str(exc), SERVER_ROUND: server_round})
    return _reply(msg, metrics, site, arrays=record, extra={SERVER_ROUND: server_round})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = _config(context)
    settings = site_settings(dict(context.node_config), config)
    metrics, site = run_evaluate(
        settings,
        config,
        msg.content[ARRAYS],
        fingerprint=str(msg.content[CONFIG].get(BASE_FINGERPRINT, "")),
        split=str(msg.content[CONFIG].get(SPLIT, VAL)),
        run=str(context.run_id),
    )
    return _reply(msg, metrics, site)
