"""Client-side clipping of the adapter update for client-level DP (``privacy.client-dp = client-*``).

:func:`client_dp_clipping_mod` sits in ``ClientApp(mods=[...])``. On a train message whose ``config`` record
carries Flower's ``clipping_norm`` (put there by the server's client-side DP wrapper) it runs Flower's
``fixedclipping_mod`` — or ``adaptiveclipping_mod`` when the run's ``privacy.client-dp`` is ``client-adaptive``,
which also reports the ``norm_bit`` metric — so the update ``new − global`` of the packed adapter arrays leaves
the site with L2 norm at most the clip norm. Every other message passes through untouched. Flower's mods expect
exactly the records fedabus uses: one ``ArrayRecord`` (``arrays``) and one ``ConfigRecord`` (``config``) in the
request, one ``ArrayRecord`` and one ``MetricRecord`` (``metrics``) in the reply.

A site refuses (error reply, nothing sent) when its run says it clips (``client-*``) but the server's message
holds no valid clip norm: it never sends an unclipped update the run promised to clip.
"""

from __future__ import annotations

import math
from logging import INFO

from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from shared.protocol import CONFIG

__all__ = ["CLIENT_SIDE_MODES", "RUN_CONFIG_KEY", "client_dp_clipping_mod"]

#: Run-config key of the client-level DP mode (the same run config the ServerApp reads).
RUN_CONFIG_KEY = "privacy.client-dp"
#: Modes in which the site clips its own update.
CLIENT_SIDE_MODES = ("client-fixed", "client-adaptive")


def client_dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the train reply's adapter update to the clip norm the server sent; a no-op when none was sent."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    mode = str(context.run_config.get(RUN_CONFIG_KEY, "off")).strip().lower()
    config = msg.content.config_records.get(CONFIG)
    norm = config.get(KEY_CLIPPING_NORM) if config is not None else None
    if norm is None:
        if mode in CLIENT_SIDE_MODES:
            return _refuse(msg, f"the server's train message carries no '{KEY_CLIPPING_NORM}'")
        return call_next(msg, context)
    if isinstance(norm, bool) or not isinstance(norm, int | float) or not math.isfinite(norm) or norm <= 0:
        return _refuse(
            msg, f"the server sent '{KEY_CLIPPING_NORM}' = {norm!r}; a finite number > 0 is needed"
        )
    return _clipped(msg, context, call_next, adaptive=mode == "client-adaptive")


def _clipped(msg: Message, context: Context, call_next: ClientAppCallable, *, adaptive: bool) -> Message:
    """Run the handler, then Flower's clipping mod on its reply (unless the site failed or declined)."""
    reply = call_next(msg, context)
    if reply.has_error() or not reply.content.array_records:
        return reply  # failed, or declined with its reason: there is no update to clip
    flower_mod = adaptiveclipping_mod if adaptive else fixedclipping_mod
    try:
        return flower_mod(msg, context, lambda _request, _context: reply)
    except ZeroDivisionError:  # Flower divides by the update norm: an all-zero update needs no clipping
        if adaptive:
            reply.content.metric_records[next(iter(reply.content.metric_records))][KEY_NORM_BIT] = 0
        return reply


def _refuse(msg: Message, reason: str) -> Message:
    text = f"{RUN_CONFIG_KEY}: {reason}; refusing to send an unclipped adapter update"
    log(INFO, "client_dp_clipping_mod: %s", text)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=text), reply_to=msg)
