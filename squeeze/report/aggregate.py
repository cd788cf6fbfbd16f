"""Grouping cells per model × task and aggregating each compression chain's cells (seeds, learning rates)
as mean ± std with Δ% against the baseline chain; the pure math (Pareto sets, expected validation
performance) the tables and plots use."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squeeze.report.cells import AGGREGATED, BASELINE

# The markdown table, in the shape of the thesis tables: (figure, with a Δ% column).
TABLE = (("quality", True), ("size_mb", True), ("nonzero_params", False), ("latency_ms", True),
         ("throughput", False), ("train_s", True), ("energy_kwh", True), ("co2_kg", False))
DELTAS = tuple(name for name, delta in TABLE if delta)


def pareto_set(points: Sequence[tuple[float, float]], direction: str = "max") -> list[int]:
    """Indices of the (cost, quality) points no other point beats: none has less or equal cost and
    better or equal quality with one of the two strictly better. Lower cost is always better; quality
    is better higher for direction "max", lower for "min". Sorted by cost (then quality, best first)."""
    if direction not in ("max", "min"):
        raise ValueError(f"direction must be 'max' or 'min', not {direction!r}")
    sign = 1.0 if direction == "max" else -1.0
    pts = [(float(c), sign * float(q)) for c, q in points]

    def beaten(i: int) -> bool:
        c, q = pts[i]
        return any(c2 <= c and q2 >= q and (c2 < c or q2 > q) for j, (c2, q2) in enumerate(pts) if j != i)

    front = [i for i in range(len(pts)) if not beaten(i)]
    return sorted(front, key=lambda i: (pts[i][0], -pts[i][1], i))


def expected_best(values: Sequence[float], n: int, mode: str = "max") -> float:
    """Expected best of n draws with replacement from the empirical distribution of `values`:
    E[max_n] = Σ_i v_(i) [(i/N)^n − ((i−1)/N)^n], v ascending (Dodge et al. 2019); the expected
    minimum for mode "min"."""
    if not values:
        raise ValueError("expected_best needs at least one value")
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    if mode == "min":
        return -expected_best([-v for v in values], n, "max")
    ordered = sorted(float(v) for v in values)
    big_n = len(ordered)
    return sum(v * ((i / big_n) ** n - ((i - 1) / big_n) ** n) for i, v in enumerate(ordered, start=1))


def expected_validation_curve(values: Sequence[float], mode: str = "max", n_max: int | None = None) -> list[float]:
    """expected_best for n = 1 .. n_max (default: as many as there are values)."""
    return [expected_best(values, n, mode) for n in range(1, (n_max or len(values)) + 1)]


def delta_pct(value: float | None, base: float | None) -> float | None:
    """(value − base) / base × 100; None when either is missing or the base is zero."""
    if value is None or base is None or base == 0:
        return None
    return (value - base) / abs(base) * 100.0


@dataclass
class Group:
    """The cells of one model × task and their rows: one per chain (per chain and hardware when the
    cells ran on more than one), each with Δ% against the baseline row of its hardware."""

    model: str
    task: str
    metric: str | None
    mode: str
    cells: list[dict]
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: dict[str, Path] = field(default_factory=dict)
    skipped_plots: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{self.model}-{self.task}")

    @property
    def baseline_row(self) -> dict | None:
        return next((r for r in self.rows if r["is_baseline"]), None)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def chain_row(chain: str, hardware: str | None, cells: list[dict]) -> dict[str, Any]:
    ok = [c for c in cells if c["status"] == "ok"]
    failed = [c for c in cells if c["status"] != "ok"]
    row: dict[str, Any] = {"chain": chain, "hardware": hardware,
                           "label": chain if hardware is None else f"{chain} @ {hardware}",
                           "is_baseline": False, "n_ok": len(ok), "n_failed": len(failed),
                           "errors": "; ".join(dict.fromkeys(c["error"] for c in failed))}
    for name in AGGREGATED:
        row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([float(c[name]) for c in ok if c[name] is not None])
    return row


def build_groups(cells: list[dict], baseline: str = BASELINE) -> list[Group]:
    by_key: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        by_key.setdefault((c["model"], c["task"]), []).append(c)
    groups = []
    for (model, task), members in sorted(by_key.items()):
        finished = [c for c in members if c["status"] == "ok"] or members
        metric = next((c["metric"] for c in finished if c["metric"]), None)
        mode = next((c["mode"] for c in finished if c["metric"]), "max")
        group = Group(model, task, metric, mode, members)
        # Latency, throughput and energy on a CPU and on a GPU are not one population: split by hardware.
        mixed = len({c["hardware"] for c in members}) > 1
        rows: dict[tuple[str, str | None], list[dict]] = {}
        for c in members:
            rows.setdefault((c["chain"], str(c["hardware"]) if mixed else None), []).append(c)
        # Baseline first, then the chains by name.
        order = sorted(rows, key=lambda k: (k[1] or "", k[0] != baseline, k[0]))
        group.rows = [chain_row(chain, hw, rows[(chain, hw)]) for chain, hw in order]
        for hw in dict.fromkeys(hw for _, hw in order):
            where = f"{model} × {task}" + (f" on {hw}" if hw else "")
            base = next((r for r in group.rows if r["chain"] == baseline and r["hardware"] == hw), None)
            if base is None:
                group.notes.append(f"no `{baseline}` cell for {where}, so Δ% is blank; run compress={baseline} "
                                   "for it or pick another baseline chain with --baseline")
            elif base["n_ok"] == 0:
                group.notes.append(f"the `{baseline}` cells of {where} all failed, so Δ% is blank")
            else:
                base["is_baseline"] = True
            for row in group.rows:
                if row["hardware"] != hw:
                    continue
                for name in DELTAS:
                    base_mean = base[f"{name}_mean"] if base is not None and base["is_baseline"] else None
                    row[f"{name}_delta_pct"] = delta_pct(row[f"{name}_mean"], base_mean)
        groups.append(group)
    return groups
