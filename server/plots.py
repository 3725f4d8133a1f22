"""PNG plots of a federation's rounds: per-site metrics against server rounds (matplotlib, no display).

The tracker (:mod:`server.tracking`) uploads them with the final artifacts: ``plots/dice.png`` and
``plots/auc.png`` (:func:`write_round_plots`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shared.metric_names import AUC, DICE_AUTO, VAL, dice_click_count, dice_click_key, metric_key

if TYPE_CHECKING:
    from server.reports import RoundReport

__all__ = ["plot_metric_by_round", "write_round_plots"]

_MEAN = "weighted mean"


def _series(history: Sequence[RoundReport], key: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for report in history:
        for site, metrics in report.evaluation.items():
            if key in metrics:
                rounds, values = out.setdefault(site, ([], []))
                rounds.append(report.server_round)
                values.append(metrics[key])
    means = [(r.server_round, r.aggregates()[key].mean) for r in history if key in r.aggregates()]
    if means:
        out[_MEAN] = ([r for r, _ in means], [float(v) for _, v in means])
    return out


def plot_metric_by_round(
    history: Sequence[RoundReport], keys: Sequence[str], *, title: str, ylabel: str, path: Path
) -> None:
    """PNG of per-site values of ``keys`` against rounds: one colour per site (the example-weighted mean in
    black), one line style per key."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    sites = sorted({site for report in history for site in report.evaluation})
    colours = {site: f"C{i % 10}" for i, site in enumerate(sites)} | {_MEAN: "black"}
    for key, style in zip(keys, ("-", "--", ":", "-."), strict=False):
        for site, (rounds, values) in _series(history, key).items():
            axes.plot(rounds, values, style, marker="o", color=colours[site], label=f"{site}: {key}")
    if axes.lines:
        axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        axes.text(0.5, 0.5, f"no {', '.join(keys)} values yet", ha="center", transform=axes.transAxes)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(title=title, xlabel="server round", ylabel=ylabel)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def _dice_keys(history: Sequence[RoundReport]) -> list[str]:
    """``val/dice_1click`` and the largest click count reported; ``val/dice_auto`` for an automatic segmenter."""
    prefix = f"{VAL}/"
    automatic = metric_key(DICE_AUTO, split=VAL)
    if any(automatic in site for r in history for site in r.evaluation.values()):
        return [automatic]
    clicks = sorted(
        {
            n
            for r in history
            for site in r.evaluation.values()
            for k in site
            if k.startswith(prefix) and (n := dice_click_count(k.removeprefix(prefix))) is not None
        }
    )
    return [dice_click_key(n, split=VAL) for n in dict.fromkeys([clicks[0], clicks[-1]] if clicks else [1])]


def write_round_plots(history: Sequence[RoundReport], folder: Path) -> None:
    """``dice.png`` (validation Dice after the first and the last click round) and ``auc.png`` in ``folder``."""
    plot_metric_by_round(
        history,
        _dice_keys(history),
        title="Validation Dice per site",
        ylabel="Dice",
        path=folder / "dice.png",
    )
    plot_metric_by_round(
        history, [metric_key(AUC, split=VAL)], title="AUC per site", ylabel="AUC", path=folder / "auc.png"
    )
