"""Which row to take: per model × task, the best row on one objective among the rows whose quality stays within
a budget of the baseline row, the Pareto front over quality and that objective, and how sure the choice is.
Reads the report's groups and cells (and side_by_side.json through squeeze/report/side_by_side.py), no models.

Budget (`--max-drop`): `<N>pt` or `<N>%`.
  pt  points of the quality metric. For a metric whose finished values in the model × task all lie in [0, 1]
      (accuracy, F1 as torchmetrics returns them) a point is 0.01: the metric × 100, as papers print it. For
      any other metric (perplexity, loss) a point is one unit of the metric.
  %   the change relative to the baseline's quality.
  A drop is a decrease where higher is better and an increase where lower is better (mode "min": perplexity,
  TER). Default: 1pt for metrics in [0, 1], else 5%. The drop is paired as the report's Δ%: the row's and the
  baseline's quality averaged over the seed/lr settings both finished (over all their cells when they share
  none); rows of several hardware are judged against the baseline of their own hardware.

Evidence on quality. The drop's spread is the std of the per-setting drops over at least 2 shared settings,
else the std over the row's cells, else (one cell) the baseline's std, borrowed as this model × task's seed
noise. A row within budget by less than its spread is eligible but flagged `marginal`; a one-cell row within
budget by less than the borrowed spread is rejected (`not_enough_evidence`: one draw within noise of the edge).
Without any spread (one cell per row, baseline included) rows are judged on their values and flagged.

Evidence on the objective. Each row's interval: where `python -m squeeze.measure` timed rows side by side
(latency, decode), the 95 % CI of its ratio to that measurement's baseline (rows of one measurement are
compared by their ratios; a measured row against an unmeasured one by the median's own 95 % CI); else mean
± std over the row's cells; one cell is a point (its spread unknown: said for measured figures, while size does
not vary between seeds). The best eligible row and every eligible row whose interval overlaps its interval cannot
be told apart: all are recommended, safest first (the largest quality margin), and the tie is said; no single
row is crowned. When the baseline is among them, compression buys nothing measurable on the objective and the
baseline risks no quality: it alone is recommended ("keep `none`"), the others named. The report's table and
plots star (★) the recommended rows other than the baseline.

Objectives: size = checkpoint MB; latency = batch-1 latency in ms (side-by-side median where measured);
decode = greedy decoding tokens/s at batch 1 (maximised); energy = inference kWh per 1,000 examples or tokens
(cost.inference); cost = total kWh (cost.total: the model's whole making, its starting model included, so a
post-training row is not free). The report's default objective is size: deterministic, recorded by every run,
and the same on every machine, so its recommendation does not move with the load of the machine that ran it.
`device`: which device's decode figures (and which side_by_side.json) count when records hold several; the
cells' batch-1 latency is perf's first device, taken for `device` only when a cell measured on that device alone.

JSON (`python -m squeeze.recommend --json`, schema 1):
  schema, objective {name, figure, direction ("min" | "max"), header}, max_drop (as given, or null: the
  default per group), device, baseline, skipped [unreadable result.json lines],
  groups [{model, task, hardware, metric, mode, points_scale (100 | 1), budget {amount, unit ("pt" | "%"),
          text}, baseline (its row label or null), recommended [labels, safest first], tie (bool), tied [the
          rows that cannot be told apart from the best, safest first; [] without a tie],
          summary (one line), details [each tied row's figures, when tie], pareto [labels by objective, best
          first], rejected [{label, reason}] (rows better on the objective than the recommended one), notes,
          rows [{label, chain, n_ok, n_failed, quality {mean, std}, drop {value, spread, spread_from ("paired" |
                "row" | "baseline" | null), pairs}, margin, verdict ("within" | "marginal" | "over_budget" |
                "not_enough_evidence" | "failed" | "unjudged"), eligible, reason,
                objective {value, spread, low, high, n, from ("side_by_side" | "cells" | null), delta_pct,
                ratio {median, low, high} or null}}]}]
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from squeeze.errors import SqueezeError
from squeeze.report import side_by_side
from squeeze.report.aggregate import Group, build_groups, delta_pct, pair_key, pareto_set
from squeeze.report.cells import BASELINE, load_cells

SCHEMA = 1
ELIGIBLE = ("within", "marginal")


@dataclass(frozen=True)
class Budget:
    amount: float
    unit: str  # "pt" | "%"

    def __str__(self) -> str:
        return f"{self.amount:g}{self.unit}"


def parse_budget(text: str) -> Budget:
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(pt|%)\s*", str(text))
    if not found:
        raise SqueezeError(f"--max-drop {text!r} is not a budget; write points of the quality metric as 1pt "
                           "(×100 for metrics in [0, 1]) or a relative change as 5%")
    return Budget(float(found[1]), found[2])


@dataclass(frozen=True)
class Objective:
    name: str
    figure: str  # the cells' figure; decode's is per device: decode_tokens_per_s.<device>.batch_1
    direction: str  # "min" | "max"
    header: str


OBJECTIVES = {o.name: o for o in (
    Objective("size", "size_mb", "min", "size MB"),
    Objective("latency", "latency_ms", "min", "latency ms (b1)"),
    Objective("decode", "decode_tokens_per_s", "max", "decode tok/s (b1)"),
    Objective("energy", "inference_kwh_per_1k", "min", "inference kWh/1k"),
    Objective("cost", "total_kwh", "min", "total kWh"),
)}
DEFAULT_OBJECTIVE = "size"
TIMED = ("latency", "decode")  # the objectives side_by_side.json times (its ratio keys: <name>_batch_<n>)


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:.4g}"


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def run(paths: Sequence[str | Path], max_drop: str | None = None, minimize: str = DEFAULT_OBJECTIVE,
        device: str | None = None, baseline: str = BASELINE) -> dict[str, Any]:
    """Read the records under `paths` and recommend per model × task: the document `--json` prints."""
    budget = parse_budget(max_drop) if max_drop is not None else None
    cells, skipped = load_cells(paths)
    doc = advise(build_groups(cells, baseline), paths, budget, minimize, device)
    return {**doc, "baseline": baseline, "skipped": skipped}


def advise(groups: Sequence[Group], paths: Sequence[str | Path] = (), budget: Budget | None = None,
           minimize: str = DEFAULT_OBJECTIVE, device: str | None = None) -> dict[str, Any]:
    """The recommendation for each group (and hardware within it) under `budget` (None: 1pt or 5%)."""
    if minimize not in OBJECTIVES:
        raise SqueezeError(f"--minimize {minimize!r} is not an objective; pick one of {', '.join(OBJECTIVES)}")
    objective = OBJECTIVES[minimize]
    files = [(path, side_by_side.read(path)) for path in side_by_side.find(paths)] if minimize in TIMED else []
    out = []
    for group in groups:
        measured = _measured(group, files, device)
        for hw in dict.fromkeys(r["hardware"] for r in group.rows):
            rows = [r for r in group.rows if r["hardware"] == hw]
            out.append(_pool(group, hw, rows, budget, objective, device, measured))
    return {"schema": SCHEMA, "objective": asdict(objective), "max_drop": None if budget is None else str(budget),
            "device": device, "groups": out}


def _measured(group: Group, files: list[tuple[Path, dict]], device: str | None) -> tuple[dict[str, dict], str | None]:
    """The side-by-side figures of the group's rows from the first file (of `device`, when named) that measured
    them: ({row label: measured row}, the file's device)."""
    for _, data in files:
        if device is not None and (data.get("device") or "cpu") != device:
            continue
        rows = [m for m in data["rows"] if (m.get("model"), m.get("task")) == (group.model, group.task)]
        found = {r["label"]: m for r in group.rows if (m := side_by_side._match(group, r, rows)) is not None}
        if found:
            return found, data.get("device") or "cpu"
    return {}, None


def _cells_of(group: Group, row: dict) -> list[dict]:
    return [c for c in group.cells if c["row"] == row["label"] and c["status"] == "ok"]


def _devices(c: dict) -> set[str]:
    return {name.split(".")[1] for name in c["per_batch"]}


def _decode_device(group: Group, where: str, device: str | None, measured_device: str | None) -> str | None:
    if device is not None:
        return device
    found = {n.split(".")[1] for n in group.per_batch if n.startswith("decode_tokens_per_s.")}
    found |= {measured_device} if measured_device else set()
    if len(found) > 1:
        raise SqueezeError(f"{where}: the records hold decode speed on {' and '.join(sorted(found))}; pick one "
                           "with --device")
    return next(iter(found), None)


def _objective(row: dict, cells: list[dict], objective: Objective, device: str | None,
               measured: dict | None, measured_device: str | None) -> dict[str, Any]:
    """The row's objective figure and its interval (module docstring: evidence on the objective)."""
    kind = objective.name
    if measured is not None and kind in TIMED and (device is None or measured_device == device):
        figure = (measured.get("latency_ms" if kind == "latency" else "decode_tokens_per_s") or {}).get("batch_1")
        if figure is not None:
            ratio = (measured.get("ratio_to_baseline") or {}).get(f"{kind}_batch_1")
            lo, hi = figure["ci95"]
            return {"value": figure["median"], "spread": None, "low": lo, "high": hi, "n": None,
                    "from": "side_by_side", "delta_pct": None,
                    "ratio": None if ratio is None else {"median": ratio["median"], "low": ratio["ci95"][0],
                                                         "high": ratio["ci95"][1]}}
    if objective.name == "decode":
        name = f"decode_tokens_per_s.{device}.batch_1"
        values = [c["per_batch"][name] for c in cells if name in c["per_batch"]]
    elif objective.name == "latency" and device is not None:
        # cells.py reads perf's first device only: a cell's latency is `device`'s only if it measured no other.
        values = [c["latency_ms"] for c in cells if c["latency_ms"] is not None and _devices(c) == {device}]
    else:
        values = [c[objective.figure] for c in cells if c[objective.figure] is not None]
    if not values:
        return {"value": None, "spread": None, "low": None, "high": None, "n": 0, "from": None, "delta_pct": None,
                "ratio": None}
    mean, std = statistics.fmean(values), _std(values)
    return {"value": mean, "spread": std, "low": mean - (std or 0.0), "high": mean + (std or 0.0), "n": len(values),
            "from": "cells", "delta_pct": None, "ratio": None}


def _drop_of(row_q: float, base_q: float, mode: str, budget: Budget, scale: float) -> float | None:
    worse = (base_q - row_q) if mode == "max" else (row_q - base_q)
    if budget.unit == "pt":
        return worse * scale
    return None if base_q == 0 else worse / abs(base_q) * 100.0


def _pair_quality(cells: list[dict]) -> dict[tuple, float]:
    by: dict[tuple, list[float]] = {}
    for c in cells:
        by.setdefault(pair_key(c), []).append(float(c["quality"]))
    return {k: statistics.fmean(v) for k, v in by.items()}


def _judge(row: dict, cells: list[dict], base: dict, base_cells: list[dict], mode: str, budget: Budget,
           scale: float) -> dict[str, Any]:
    """The row's drop against the baseline, its spread, margin, verdict and (when not eligible) why."""
    judged = {"drop": {"value": None, "spread": None, "spread_from": None, "pairs": 0}, "margin": None}
    if row["n_ok"] == 0:
        return {**judged, "verdict": "failed", "reason": f"failed: {row['errors'] or 'no finished cell'}"}
    if row is base:
        return {"drop": {"value": 0.0, "spread": None, "spread_from": None, "pairs": len(_pair_quality(cells))},
                "margin": budget.amount, "verdict": "within", "reason": None}
    mine, theirs = _pair_quality(cells), _pair_quality(base_cells)
    shared = [k for k in mine if k in theirs]
    if shared:
        drop = _drop_of(statistics.fmean(mine[k] for k in shared), statistics.fmean(theirs[k] for k in shared),
                        mode, budget, scale)
    else:
        drop = _drop_of(row["quality_mean"], base["quality_mean"], mode, budget, scale)
    if drop is None:
        return {**judged, "verdict": "unjudged", "reason": "the baseline's quality is 0: a % budget cannot be measured "
                                                         "against it (use pt)"}
    per_pair = [_drop_of(mine[k], theirs[k], mode, budget, scale) for k in shared]
    spread, source = None, None
    if len(shared) > 1 and None not in per_pair:
        spread, source = statistics.stdev(per_pair), "paired"
    else:
        for std, name in ((row["quality_std"], "row"), (base["quality_std"], "baseline")):
            if std is not None:
                # A std in budget units: scaled like a drop of that size from the baseline.
                spread, source = _drop_of(base["quality_mean"] - std, base["quality_mean"], "max", budget, scale), name
                break
    margin = budget.amount - drop
    judged = {"drop": {"value": drop, "spread": spread, "spread_from": source, "pairs": len(shared)}, "margin": margin}
    unit = budget.unit
    if margin < 0:
        near = " (by less than its spread)" if spread is not None and -margin < spread else ""
        return {**judged, "verdict": "over_budget",
                "reason": f"over budget: drops {_num(drop)}{unit} > {budget}{near}"}
    if spread is not None and margin < spread:
        if source == "baseline":
            return {**judged, "verdict": "not_enough_evidence",
                    "reason": f"not enough evidence: one cell, within budget by {_num(margin)}{unit}, less than the "
                              f"baseline's seed spread {_num(spread)}{unit}; run more seeds"}
        return {**judged, "verdict": "marginal",
                "reason": f"within budget by {_num(margin)}{unit}, less than its spread ±{_num(spread)}{unit}"}
    return {**judged, "verdict": "within", "reason": None}


def _overlap(a: dict, b: dict) -> bool:
    """Whether two rows' objective intervals overlap: their side-by-side ratios when both have one, else their
    own intervals (a point is an interval of one value)."""
    ia = (a["ratio"]["low"], a["ratio"]["high"]) if a["ratio"] and b["ratio"] else (a["low"], a["high"])
    ib = (b["ratio"]["low"], b["ratio"]["high"]) if a["ratio"] and b["ratio"] else (b["low"], b["high"])
    return ia[0] <= ib[1] and ib[0] <= ia[1]


def _pool(group: Group, hw: str | None, rows: list[dict], budget: Budget | None, objective: Objective,
          device: str | None, measured: tuple[dict[str, dict], str | None]) -> dict[str, Any]:
    where = f"{group.model} × {group.task}" + (f" on {hw}" if hw else "")
    by_label, measured_device = measured
    if objective.name == "decode":
        device = _decode_device(group, where, device, measured_device)
    finished = [float(c["quality"]) for r in rows for c in _cells_of(group, r) if c["quality"] is not None]
    scale = 100.0 if finished and all(0.0 <= q <= 1.0 for q in finished) else 1.0
    budget = budget or (Budget(1.0, "pt") if scale == 100.0 else Budget(5.0, "%"))
    base = next((r for r in rows if r["is_baseline"]), None)
    notes: list[str] = []
    entries = []
    for row in rows:
        cells = _cells_of(group, row)
        fig = _objective(row, cells, objective, device, by_label.get(row["label"]), measured_device)
        entry = {"label": row["label"], "chain": row["chain"], "n_ok": row["n_ok"], "n_failed": row["n_failed"],
                 "quality": {"mean": row["quality_mean"], "std": row["quality_std"]}, "objective": fig}
        if base is None:
            entry.update(drop={"value": None, "spread": None, "spread_from": None, "pairs": 0}, margin=None,
                         verdict="unjudged", reason="no baseline row to measure the drop against")
        else:
            entry.update(_judge(row, cells, base, _cells_of(group, base), group.mode, budget, scale))
        entry["eligible"] = entry["verdict"] in ELIGIBLE and fig["value"] is not None
        if row["n_failed"] and row["n_ok"]:
            notes.append(f"`{row['label']}`: {row['n_failed']} of {row['n_ok'] + row['n_failed']} cells failed")
        entries.append(entry)
    base_entry = next((e for e in entries if base is not None and e["label"] == base["label"]), None)
    for e in entries:  # Δ% of the objective against the baseline: the paired ratio where measured side by side
        fig, ref = e["objective"], (base_entry or {}).get("objective") or {}
        fig["delta_pct"] = ((fig["ratio"]["median"] - 1.0) * 100.0 if fig["ratio"]
                            else delta_pct(fig["value"], ref.get("value")))
    sign = 1.0 if objective.direction == "min" else -1.0
    have = [e for e in entries if e["objective"]["value"] is not None and e["quality"]["mean"] is not None]
    front = pareto_set([(sign * e["objective"]["value"], e["quality"]["mean"]) for e in have], group.mode)
    tied, rejected = _choose(entries, sign)
    if base is None:
        summary = (f"no recommendation: no baseline row with a finished cell in {where} (the budget is measured "
                   "against it); run compress=none there or pass --baseline")
    elif not tied:
        summary = f"no recommendation: no row within {budget} of `{base['label']}` has {objective.header}"
    else:
        summary = _summary(tied, objective, budget, base["label"], group.metric)
    # The baseline tied with the best: compression buys nothing measurable here, and the baseline risks no quality.
    keep = [e for e in tied if len(tied) > 1 and e["label"] == (base or {}).get("label")]
    missing = [e["label"] for e in entries if e["objective"]["value"] is None and e["n_ok"]]
    if missing:
        on = f" on {device}" if device else ""
        notes.append(f"no {objective.header}{on} for {', '.join(f'`{m}`' for m in missing)}")
    points = [e["label"] for e in entries if e["objective"]["from"] == "cells" and e["objective"]["n"] == 1]
    if points and objective.name != "size":
        notes.append(f"{objective.header} of one cell, its spread unknown: {', '.join(f'`{p}`' for p in points)}")
    judged = [e for e in entries if e["verdict"] not in ("failed", "unjudged")
              and e["label"] != (base or {}).get("label")]
    if judged and all(e["drop"]["spread"] is None for e in judged):
        notes.append("one cell per row: quality margins are judged on single values (run more seeds to know them)")
    details = [f"`{e['label']}`: {_figures(e, objective, budget, group.metric, base['label'])}" for e in tied]
    return {"model": group.model, "task": group.task, "hardware": hw, "metric": group.metric, "mode": group.mode,
            "points_scale": scale, "budget": {"amount": budget.amount, "unit": budget.unit, "text": str(budget)},
            "baseline": None if base is None else base["label"], "recommended": [e["label"] for e in keep or tied],
            "tie": len(tied) > 1, "tied": [e["label"] for e in tied] if len(tied) > 1 else [], "summary": summary,
            "details": details if len(tied) > 1 else [],
            "pareto": [have[i]["label"] for i in front], "rejected": rejected, "notes": notes, "rows": entries}


def _choose(entries: list[dict], sign: float) -> tuple[list[dict], list[dict]]:
    """The recommended rows (the best eligible one and those that cannot be told from it, safest first) and the
    rows better on the objective that were not eligible, with why."""
    eligible = sorted((e for e in entries if e["eligible"]), key=lambda e: sign * e["objective"]["value"])
    if not eligible:
        return [], []
    best = eligible[0]
    tied = [e for e in eligible if e is best or _overlap(best["objective"], e["objective"])]
    tied.sort(key=lambda e: (-(e["margin"] or 0.0), sign * e["objective"]["value"]))  # most margin left first
    top = sign * best["objective"]["value"]
    rejected = [{"label": e["label"], "reason": e["reason"]} for e in entries if not e["eligible"]
                and e["objective"]["value"] is not None and sign * e["objective"]["value"] < top]
    return tied, rejected


def _figures(e: dict, objective: Objective, budget: Budget, metric: str | None, base: str) -> str:
    """A row's objective and quality with their spread, as a clause."""
    fig, q, drop = e["objective"], e["quality"], e["drop"]
    if fig["from"] == "side_by_side":
        value = f"{_num(fig['value'])} [{_num(fig['low'])}, {_num(fig['high'])}]"
    else:
        value = _num(fig["value"]) + (f" ± {_num(fig['spread'])}" if fig["spread"] is not None else "")
    delta = f" ({fig['delta_pct']:+.1f}% vs `{base}`)" if fig["delta_pct"] is not None and e["label"] != base else ""
    quality = _num(q["mean"]) + (f" ± {_num(q['std'])}" if q["std"] is not None else "")
    spread = f" ± {_num(drop['spread'])}" if drop["spread"] is not None else ""
    lost = "" if e["label"] == base else (
        f", drops {_num(drop['value'])}{spread}{budget.unit} of the {budget} allowed" if drop["value"] >= 0
        else f", gains {_num(-drop['value'])}{spread}{budget.unit}")
    flag = f" [marginal: {e['reason']}]" if e["verdict"] == "marginal" else ""
    return f"{objective.header} {value}{delta}, {metric or 'quality'} {quality}{lost}{flag}"


def _summary(tied: list[dict], objective: Objective, budget: Budget, base: str, metric: str | None) -> str:
    if len(tied) == 1:
        return f"recommended: `{tied[0]['label']}` — {_figures(tied[0], objective, budget, metric, base)}"
    names = ", ".join(f"`{e['label']}`" for e in tied[:-1]) + f" and `{tied[-1]['label']}`"
    if any(e["label"] == base for e in tied):
        others = ", ".join(f"`{e['label']}`" for e in tied if e["label"] != base)
        return (f"keep `{base}`: no row within {budget} is measurably better on {objective.name} ({others} cannot be "
                "told apart from it: intervals overlap)")
    return (f"{names} cannot be told apart on {objective.name} (intervals overlap); all within {budget} of "
            f"`{base}`, `{tied[0]['label']}` first (most quality margin)")


def text(doc: dict[str, Any]) -> list[str]:
    """The command's plain-text output."""
    objective = OBJECTIVES[doc["objective"]["name"]]
    better = "smallest" if objective.direction == "min" else "largest"
    lines = []
    for g in doc["groups"]:
        where = f"{g['model']} × {g['task']}" + (f" on {g['hardware']}" if g["hardware"] else "")
        unit = f"0.01 of {g['metric']}" if g["points_scale"] == 100 else f"1 of {g['metric']}"
        worse = "below" if g["mode"] == "max" else "above"
        lines += [f"## {where}", f"quality `{g['metric']}` at most {g['budget']['text']} {worse} {_base(g)} "
                  f"(1pt = {unit}); {better} {objective.header}"]
        by_label = {e["label"]: e for e in g["rows"]}
        front = "; ".join(f"{label} ({_num(by_label[label]['objective']['value'])}, "
                          f"{_num(by_label[label]['quality']['mean'])})" for label in g["pareto"])
        lines.append(f"Pareto front ({objective.header}, quality): {front or '(no row has both figures)'}")
        lines.append(g["summary"])
        lines += [f"  - {d}" for d in g["details"]]
        if g["rejected"]:
            lines.append(f"better on {objective.name} but rejected:")
            lines += [f"  - `{r['label']}`: {r['reason']}" for r in g["rejected"]]
        lines += [f"note: {n}" for n in g["notes"]]
        lines.append("")
    lines += [f"skipped: {s}" for s in doc.get("skipped") or []]
    return lines


def markdown_section(advice: Sequence[dict], minimize: str = DEFAULT_OBJECTIVE) -> list[str]:
    """The report's Recommendation lines for one group (a paragraph per hardware)."""
    objective = OBJECTIVES[minimize]
    better = "smallest" if objective.direction == "min" else "largest"
    lines = []
    for g in advice:
        on = f" on {g['hardware']}" if g["hardware"] else ""
        worse = "below" if g["mode"] == "max" else "above"
        rejected = "; ".join(f"`{r['label']}` ({r['reason']})" for r in g["rejected"])
        star = "; ★ in the table" if any(label != g["baseline"] for label in g["recommended"]) else ""
        lines += ["", f"**Recommendation**{on} (quality at most {g['budget']['text']} {worse} {_base(g)}, then "
                      f"the {better} {objective.header}{star}): {g['summary'].removeprefix('recommended: ')}"
                  + "".join(f"; {d}" for d in g["details"]) + "."
                  + (f" Better on {objective.name} but rejected: {rejected}." if rejected else "")]
    if lines:
        lines += ["", "`python -m squeeze.recommend DIR --max-drop 1pt|5% --minimize size|latency|decode|energy|cost` "
                      "weighs other budgets and objectives."]
    return lines


def _base(g: dict) -> str:
    return f"`{g['baseline']}`" if g["baseline"] else "the baseline"


def of_group(advice: Sequence[dict], group: Group) -> list[dict]:
    return [a for a in advice if (a["model"], a["task"]) == (group.model, group.task)]


def starred(advice: Sequence[dict], group: Group) -> set[str]:
    """The rows the table and plots star: the group's recommended rows (every tied one) but the baseline, which
    is marked as such and, when recommended, said to be kept."""
    return {label for a in of_group(advice, group) for label in a["recommended"] if label != a["baseline"]}
