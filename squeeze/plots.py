"""The report's PNG plots. Drawing only: the figures, Pareto fronts and curves come computed from
`squeeze.report`. Uses matplotlib's object API (no pyplot), so no display and no global state."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

SIZE = (6.4, 4.6)
DPI = 110


def tradeoff(path: Path, labels: Sequence[str], cost: Sequence[float], cost_std: Sequence[float | None],
             quality: Sequence[float], quality_std: Sequence[float | None], front: Sequence[int],
             xlabel: str, ylabel: str, title: str, chains: Sequence[str] = ()) -> Path:
    """Quality against a cost, one point per chain (mean ± std), the Pareto front joined and ringed."""
    fig = Figure(figsize=SIZE, dpi=DPI)
    ax = fig.add_subplot()
    for i, label in enumerate(labels):
        ax.errorbar(cost[i], quality[i], xerr=cost_std[i] or None, yerr=quality_std[i] or None,
                    fmt="o", capsize=3, label=label, color=_color(label, chains))
        ax.annotate(label, (cost[i], quality[i]), textcoords="offset points", xytext=(6, 5), fontsize=8)
    if front:
        # `front` comes sorted by cost, so the line walks the front from cheap to costly.
        ax.plot([cost[i] for i in front], [quality[i] for i in front], "--", color="0.4", zorder=0,
                label="Pareto front")
        ax.scatter([cost[i] for i in front], [quality[i] for i in front], s=160, facecolors="none",
                   edgecolors="0.2", linewidths=1.2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def expected_validation(path: Path, curves: dict[str, Sequence[float]], ylabel: str, title: str,
                        chains: Sequence[str] = ()) -> Path:
    """Expected best validation figure against the number of cells tried, one curve per chain."""
    fig = Figure(figsize=SIZE, dpi=DPI)
    ax = fig.add_subplot()
    for label, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=label, color=_color(label, chains))
    ax.set(xlabel="cells tried (hyperparameter assignments)", ylabel=ylabel, title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def sparsity(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], baseline: float | None,
             ylabel: str, title: str, chains: Sequence[str] = ()) -> Path:
    """Quality against the pruned layers' fraction of zero weights, every cell a point."""
    fig = Figure(figsize=SIZE, dpi=DPI)
    ax = fig.add_subplot()
    for label, (xs, ys) in series.items():
        ax.scatter(xs, ys, label=label, color=_color(label, chains))
    if baseline is not None:
        ax.axhline(baseline, linestyle="--", color="0.4", label="baseline")
    ax.set(xlabel="sparsity (fraction of zero weights in pruned layers)", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def _color(label: str, chains: Sequence[str]) -> str | None:
    # One colour per chain across all of a group's plots, whichever chains a plot leaves out.
    return f"C{list(chains).index(label) % 10}" if label in chains else None


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
