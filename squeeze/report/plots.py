"""The report's PNG plots, per model × task: quality against size, latency and energy with the Pareto front,
expected validation performance per chain, sparsity against quality. `draw_plots` picks the data; the
functions below it only draw. matplotlib's object API (no pyplot): no display and no global state.
squeeze.report imports this module only when plots are drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from squeeze.report.aggregate import Group, expected_validation_curve, pareto_set
from squeeze.report.cells import WHERE

# Trade-off plots: (file suffix, cost figure, axis label).
TRADEOFFS = (("size", "size_mb", "checkpoint size (MB)"), ("latency", "latency_ms", "latency, batch 1 (ms)"),
             ("energy", "energy_kwh", "energy (kWh)"))


def draw_plots(group: Group, plot_dir: Path) -> None:
    title = f"{group.model} × {group.task}"
    arrow = "↑" if group.mode == "max" else "↓"
    ylabel = f"{group.metric or 'quality'} ({arrow} better)"
    chains = [r["label"] for r in group.rows]
    mixed = any(r["hardware"] for r in group.rows)

    def label(c: dict) -> str:
        return f"{c['chain']} @ {c['hardware']}" if mixed else c["chain"]

    rows = [r for r in group.rows if r["quality_mean"] is not None]
    for kind, cost, xlabel in TRADEOFFS:
        have = [r for r in rows if r[f"{cost}_mean"] is not None]
        if not have:
            group.skipped_plots.append(f"quality vs {kind} (no finished record has {WHERE[cost]})")
            continue
        front = pareto_set([(r[f"{cost}_mean"], r["quality_mean"]) for r in have], group.mode)
        group.plots[f"quality vs {kind}"] = tradeoff(
            plot_dir / f"{group.slug}-quality-vs-{kind}.png", [r["label"] for r in have],
            [r[f"{cost}_mean"] for r in have], [r[f"{cost}_std"] for r in have],
            [r["quality_mean"] for r in have], [r["quality_std"] for r in have], front,
            xlabel, ylabel, f"{title}: quality vs {kind} (ringed: Pareto front)", chains)

    ok = [c for c in group.cells if c["status"] == "ok"]
    values: dict[str, list[float]] = {}
    for c in ok:
        if c["validation_best"] is not None:
            values.setdefault(label(c), []).append(float(c["validation_best"]))
    if values:
        n_max = max(len(v) for v in values.values())
        curves = {chain: expected_validation_curve(values[chain], group.mode, n_max) for chain in chains
                  if chain in values}
        monitor = "val/" + (group.metric or "quality").split("/", 1)[-1]
        best = "max" if group.mode == "max" else "min"
        group.plots["expected validation performance"] = expected_validation(
            plot_dir / f"{group.slug}-expected-validation.png", curves, f"expected {best} {monitor} ({arrow} better)",
            f"{title}: expected validation performance", chains)
    else:
        group.skipped_plots.append("expected validation performance (no finished record has validation.best)")

    sparse = [c for c in ok if c["sparsity"] is not None]
    if sparse:
        series: dict[str, tuple[list[float], list[float]]] = {}
        for c in sparse:
            xs, ys = series.setdefault(label(c), ([], []))
            xs.append(float(c["sparsity"]))
            ys.append(float(c["quality"]))
        base = group.baseline_row["quality_mean"] if group.baseline_row else None
        group.plots["sparsity vs quality"] = sparsity(
            plot_dir / f"{group.slug}-sparsity.png", series, base, ylabel, f"{title}: sparsity vs quality", chains)
    elif any(c["sparsity"] is not None for c in group.cells):
        group.skipped_plots.append("sparsity vs quality (no finished record has sparsity)")


# -- drawing ------------------------------------------------------------------------------------------
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
