"""Code used by both the fedabus server and its clients: models, adapters, data, training, metrics, CLI.

Nothing in ``shared`` imports ``server`` or ``client``.
"""

__version__ = "0.1.0"
