"""Sample-level differential privacy of a site's local training (DP-SGD with Opacus) and its ε ledger.

The privacy unit is one patient's case. Modules:

* :mod:`~shared.privacy.validation` — :func:`validate_privacy` refuses settings that would silently break DP;
  :func:`check_no_running_stats` refuses BatchNorm-like modules.
* :mod:`~shared.privacy.accounting` — ε of an accountant history (Opacus ``rdp`` / ``prv``), noise multiplier
  for a target ε.
* :mod:`~shared.privacy.ledger` — :class:`PrivacyLedger`, the persisted per-site history of spent privacy.
* :mod:`~shared.privacy.planning` — :func:`plan_private_round`, the budget check before a round.
* :mod:`~shared.privacy.sampling` — Poisson-sampled loaders, one frame-triplet per case for the classifier.
* :mod:`~shared.privacy.dp_sgd` — :func:`private_training`, Opacus wrapping of a model and its optimiser.
* :mod:`~shared.privacy.steps` — optimiser steps shared by both training loops (FedProx after DP noise,
  noise-only steps for empty Poisson batches).

Nothing is imported here: importing Opacus takes over a second, and the training loops import only what they
use.
"""
