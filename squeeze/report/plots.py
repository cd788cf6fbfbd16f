"""The report's PNG plots, per model × task: quality against size, latency and energy with the Pareto front,
expected validation performance per chain, sparsity against quality. `draw_plots` picks the data; the
functions below it only draw. matplotlib's object API (no pyplot): no display and no global state.
squeeze.report imports this module only when plots are drawn."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from matplotlib.text import Annotation, Text

from squeeze.report.aggregate import Group, expected_validation_budget_curve, expected_validation_curve, pareto_set
from squeeze.report.cells import WHERE

# Trade-off plots: (file suffix, cost figure, axis label).
# Energy is the model's whole cost (squeeze/run/cost.py's total: training + compression, the starting model's included).
TRADEOFFS = (("size", "size_mb", "checkpoint size (MB)"), ("latency", "latency_ms", "latency, batch 1 (ms)"),
             ("energy", "total_kwh", "total energy: training + compression (kWh)"))


def draw_plots(group: Group, plot_dir: Path, recommended: Collection[str] = ()) -> None:
    """The group's plots; the `recommended` rows (squeeze/report/recommend.py) starred in the trade-offs."""
    title = f"{group.model} × {group.task}"
    arrow = "↑" if group.mode == "max" else "↓"
    ylabel = f"{group.metric or 'quality'} ({arrow} better)"
    chains = [r["label"] for r in group.rows]

    def label(c: dict) -> str:  # the row a cell belongs to, as the tables name it
        return c["row"] or c["chain"]

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
            xlabel, ylabel, f"{title}: quality vs {kind} (ringed: Pareto front)", chains, recommended)

    ok = [c for c in group.cells if c["status"] == "ok"]
    values: dict[str, list[float]] = {}
    seconds: dict[str, list[float | None]] = {}
    for c in ok:
        if c["validation_best"] is not None:
            values.setdefault(label(c), []).append(float(c["validation_best"]))
            seconds.setdefault(label(c), []).append(c["train_s"])
    monitor = "val/" + (group.metric or "quality").split("/", 1)[-1]
    best = "max" if group.mode == "max" else "min"
    evp_ylabel = f"expected {best} {monitor} ({arrow} better)"
    evp_path = plot_dir / f"{group.slug}-expected-validation.png"
    if values and max(len(v) for v in values.values()) < 2:
        # The curve is the expected best of n tried settings: with one cell a row it is a single point each.
        group.skipped_plots.append("expected validation performance (one cell per row: it needs seeds or lrs)")
    elif values and group.evp_axis == "train_seconds":
        timed = [chain for chain in chains if chain in values and None not in seconds[chain]]
        untimed = [chain for chain in chains if chain in values and chain not in timed]
        if untimed:
            group.skipped_plots.append("expected validation vs training budget for " + ", ".join(untimed)
                                       + " (a finished cell without train_seconds)")
        if timed:
            group.plots["expected validation performance"] = expected_validation(
                evp_path, {c: expected_validation_budget_curve(values[c], seconds[c], group.mode) for c in timed},
                evp_ylabel, f"{title}: expected validation vs training budget", chains,
                xlabel=BUDGET_AXIS, steps=True)
    elif values:
        n_max = max(len(v) for v in values.values())
        curves = {chain: (list(range(1, n_max + 1)), expected_validation_curve(values[chain], group.mode, n_max))
                  for chain in chains if chain in values}
        group.plots["expected validation performance"] = expected_validation(
            evp_path, curves, evp_ylabel, f"{title}: expected validation vs cells tried", chains)
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

    tracks = {label(c): c["trajectory"] for c in ok if c.get("trajectory")}
    if tracks:
        monitor = "val/" + (group.metric or "quality").split("/", 1)[-1]
        group.plots["pruning rounds"] = rounds(plot_dir / f"{group.slug}-pruning-rounds.png", tracks, monitor,
                                               f"{monitor} ({arrow} better)", f"{title}: after each pruning round",
                                               chains)


def text_box(annotation: Annotation, renderer):
    """The display-space box of an annotation's text alone (its own extent includes the leader line)."""
    return Text.get_window_extent(annotation, renderer)


# -- drawing ------------------------------------------------------------------------------------------
SIZE = (6.4, 4.6)
DPI = 110


def tradeoff(path: Path, labels: Sequence[str], cost: Sequence[float], cost_std: Sequence[float | None],
             quality: Sequence[float], quality_std: Sequence[float | None], front: Sequence[int],
             xlabel: str, ylabel: str, title: str, chains: Sequence[str] = (),
             recommended: Collection[str] = ()) -> Path:
    """Quality against a cost, one point per row (mean ± std), the Pareto front joined and ringed, the
    recommended rows starred."""
    fig, _ = tradeoff_figure(labels, cost, cost_std, quality, quality_std, front, xlabel, ylabel, title, chains,
                             recommended)
    return _save(fig, path, layout=False)


def tradeoff_figure(labels: Sequence[str], cost: Sequence[float], cost_std: Sequence[float | None],
                    quality: Sequence[float], quality_std: Sequence[float | None], front: Sequence[int],
                    xlabel: str, ylabel: str, title: str, chains: Sequence[str] = (),
                    recommended: Collection[str] = ()) -> tuple[Figure, list]:
    """The trade-off figure, laid out, and its point labels."""
    fig = _figure()
    ax = fig.add_subplot()
    for i, label in enumerate(labels):
        ax.errorbar(cost[i], quality[i], xerr=cost_std[i] or None, yerr=quality_std[i] or None,
                    fmt="o", capsize=3, color=_color(label, chains))
    if front:
        # `front` comes sorted by cost, so the line walks the front from cheap to costly.
        ax.plot([cost[i] for i in front], [quality[i] for i in front], "--", color="0.4", zorder=0,
                label="Pareto front")
        ax.scatter([cost[i] for i in front], [quality[i] for i in front], s=160, facecolors="none",
                   edgecolors="0.2", linewidths=1.2)
    stars = [i for i, label in enumerate(labels) if label in recommended]
    if stars:
        ax.scatter([cost[i] for i in stars], [quality[i] for i in stars], s=260, marker="*", color="gold",
                   edgecolors="0.1", linewidths=0.8, zorder=3, label="recommended (see report)")
    if front or stars:
        ax.legend(fontsize=7, loc="best")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    _log_scale_if_wide(ax, quality)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    # The points are named on the plot (no legend to match colours against), the names kept apart.
    texts = place_labels(ax, cost, quality, labels, [_color(label, chains) for label in labels])
    return fig, texts


def place_labels(ax, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str],
                 colors: Sequence[str | None] = (), pad_px: float = 2.0) -> list[Annotation]:
    """Name each point beside it so that no two names overlap: to its right (left in the axes' right
    third), and where names would collide the higher point's name is pushed up, in display space, above
    the one below, with a thin leader line back to its point. When the pushed names leave the axes, the
    y range grows and the placement is redone. A greedy stack, not an optimiser: matplotlib has no label
    placement of its own, and a few named points need no more."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    x0, x1 = ax.get_xlim()
    annotations = []
    for i, text in enumerate(texts):
        right_third = x1 != x0 and (xs[i] - x0) / (x1 - x0) > 0.67
        ann = ax.annotate(text, (xs[i], ys[i]), textcoords="offset points", xytext=(-6 if right_third else 6, 5),
                          ha="right" if right_third else "left", va="bottom", fontsize=8,
                          color=(colors[i] if i < len(colors) else None) or "black",
                          arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 1, "shrinkB": 3})
        annotations.append(ann)
    points_per_px = 72.0 / fig.dpi
    for _ in range(4):
        for ann in annotations:
            ann.xyann = (ann.xyann[0], 5)
        fig.canvas.draw()
        boxes = {id(a): text_box(a, renderer) for a in annotations}
        anchors = {id(a): ax.transData.transform(a.xy) for a in annotations}
        # The points themselves are obstacles too (a marker and its Pareto ring): no name covers a point.
        radius = 6.0 / points_per_px
        placed: list = [Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)
                        for x, y in anchors.values()]
        shifts = {}
        for ann in sorted(annotations, key=lambda a: (anchors[id(a)][1], anchors[id(a)][0])):
            box, shift = boxes[id(ann)], 0.0
            for _ in range(len(placed) + 1):
                hit = next((b for b in placed if b.x0 - pad_px < box.x1 and box.x0 < b.x1 + pad_px
                            and b.y0 - pad_px < box.y1 + shift and box.y0 + shift < b.y1 + pad_px), None)
                if hit is None:
                    break
                shift = hit.y1 + pad_px - box.y0
            shifts[id(ann)] = shift
            placed.append(box.translated(0, shift))
        for ann in annotations:
            ann.xyann = (ann.xyann[0], 5 + shifts[id(ann)] * points_per_px)
            ann.arrow_patch.set_visible(shifts[id(ann)] > 1.0)
        top = max((b.y1 for b in placed[len(anchors):]), default=0.0)
        axes_box = ax.get_window_extent(renderer)
        if top <= axes_box.y1 - pad_px:
            break
        y0, y1 = ax.get_ylim()
        ax.set_ylim(y0, y1 + (top - axes_box.y1 + 4 * pad_px) / axes_box.height * (y1 - y0) * 1.2)
    return annotations


TRIALS_AXIS = "cells tried (hyperparameter assignments, drawn with replacement)"
BUDGET_AXIS = "training budget (s): cumulative train s of cells run in random order"


def expected_validation(path: Path, curves: dict[str, tuple[Sequence[float], Sequence[float]]], ylabel: str,
                        title: str, chains: Sequence[str] = (), xlabel: str = TRIALS_AXIS, steps: bool = False) -> Path:
    """Expected best validation figure, one (x, y) curve per chain: against the number of cells tried, or (`steps`)
    against the training budget, a step function (aggregate.expected_best_within_budget)."""
    fig = _figure()
    ax = fig.add_subplot()
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label, color=_color(label, chains),
                drawstyle="steps-post" if steps else "default")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    _log_scale_if_wide(ax, [v for _, ys in curves.values() for v in ys])
    if steps:  # a post-training row's seconds beside a fine-tune's hours: log when the budgets span > WIDE×
        xs = [float(x) for xs, _ in curves.values() for x in xs]
        if min(xs) > 0 and max(xs) > WIDE * min(xs):
            ax.set_xscale("log")
            ax.set_xlabel(ax.get_xlabel() + " (log scale)")
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def sparsity(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], baseline: float | None,
             ylabel: str, title: str, chains: Sequence[str] = ()) -> Path:
    """Quality against the pruned layers' fraction of zero weights, every cell a point."""
    fig = _figure()
    ax = fig.add_subplot()
    for label, (xs, ys) in series.items():
        ax.scatter(xs, ys, label=label, color=_color(label, chains))
    if baseline is not None:
        ax.axhline(baseline, linestyle="--", color="0.4", label="baseline")
    ax.set(xlabel="sparsity (fraction of zero weights in pruned layers)", ylabel=ylabel, title=title)
    _log_scale_if_wide(ax, [y for _, ys in series.values() for y in ys] + ([baseline] if baseline else []))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def rounds(path: Path, tracks: dict[str, Sequence[dict]], monitor: str, ylabel: str, title: str,
           chains: Sequence[str] = ()) -> Path:
    """A pruner's rounds (compress.imp.trajectory), one line per cell: the validation after each round's retraining
    and that round's training throughput, against the share of the pruned matrices' weights left."""
    fig = _figure()
    quality, speed = fig.subplots(2, 1, sharex=True)
    values = []
    for label, points in tracks.items():
        left = [1.0 - float(p["sparsity"]) for p in points]
        ys = [p.get(monitor) for p in points]
        values += [y for y in ys if y is not None]
        quality.plot(left, ys, marker="o", label=label, color=_color(label, chains))
        speed.plot(left, [p.get("train_tokens_per_s") for p in points], marker="o", color=_color(label, chains))
    quality.set(ylabel=ylabel, title=title)
    _log_scale_if_wide(quality, values)
    speed.set(xlabel="weights left in the pruned matrices (1 - sparsity)", ylabel="train tokens/s in the round")
    speed.invert_xaxis()  # pruning goes from all weights (left) to few (right)
    for ax in (quality, speed):
        ax.grid(alpha=0.3)
    quality.legend(fontsize=7, loc="best")
    return _save(fig, path)


WIDE = 10.0  # quality values spanning more than this factor are drawn on a log axis


def _log_scale_if_wide(ax, values: Sequence[float]) -> None:
    """A log quality axis when the values span more than WIDE× (perplexities of 20 beside 20,000 would flatten
    every useful point onto zero), said in the axis label."""
    positive = [float(v) for v in values if v is not None and float(v) > 0]
    if len(positive) == len([v for v in values if v is not None]) and positive and max(positive) > WIDE * min(positive):
        ax.set_yscale("log")
        ax.set_ylabel(ax.get_ylabel() + " (log scale)")


def _color(label: str, chains: Sequence[str]) -> str | None:
    # One colour per chain across all of a group's plots, whichever chains a plot leaves out.
    return f"C{list(chains).index(label) % 10}" if label in chains else None


def _figure() -> Figure:
    fig = Figure(figsize=SIZE, dpi=DPI)
    FigureCanvasAgg(fig)  # a renderer to measure text with (label placement), without pyplot
    return fig


def _save(fig: Figure, path: Path, layout: bool = True) -> Path:
    # A figure with placed labels is laid out already: a new layout would move the points under them.
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(path, format="png")
    return path
