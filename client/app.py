"""fedabus ClientApp (Flower Message API). The site handlers arrive with the federation issue (#5)."""

from __future__ import annotations

from flwr.clientapp import ClientApp

app = ClientApp()
