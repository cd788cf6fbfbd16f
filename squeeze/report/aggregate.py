"""Grouping cells per model × task into rows (a compression chain and the compressor settings that tell
its cells apart), aggregating each row's cells (seeds, learning rates) as mean ± std with Δ% against the
baseline row over the same seeds and learning rates; the grid's totals and CO2 per row and technique; the pure
math (Pareto sets, expected validation performance against cells tried or a training budget) the tables and plots
use."""

from __future__ import annotations

import fnmatch
import json
import random
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import comb
from pathlib import Path
from typing import Any

from squeeze.errors import SqueezeError
from squeeze.report.cells import AGGREGATED, BASELINE, FIGURES, PER_BATCH, sort_per_batch

# The markdown table, in the shape of the thesis tables: (figure, with a Δ% column). The per-device and
# per-batch figures (peak memory, decoding throughput) follow the latency; columns nobody recorded drop out.
TABLE = (("quality", True), ("accuracy", False), ("accuracy_norm", False), ("token_accuracy", False), ("f1", False), ("precision", False), ("recall", False),
         ("last_word_accuracy", False), ("last_word_perplexity", False), ("hits_1", False), ("hits_5", False),
         ("hits_10", False), ("bleu", False), ("ter", False), ("bertscore_f1", False), ("loss", False), ("size_mb", True),
         ("nonzero_params", False), ("latency_ms", True), ("throughput", False), ("per_batch", False),
         ("train_tokens_per_s", False), ("train_loss", False), ("stage_peak_mb", False), ("own_s", True), ("own_kwh", True), ("total_s", True), ("total_kwh", True),
         ("inference_kwh_per_1k", True), ("train_s", False), ("eval_s", False), ("energy_kwh", False),
         ("it_energy_kwh", False), ("co2_kg", False), ("spec_acceptance", False), ("spec_speedup", False))
DELTAS = tuple(name for name, delta in TABLE if delta)
# kg CO2 per kWh, as squeeze/measure/energy.py's CO2_PRESETS (a test keeps them equal; the report imports no
# training code): the grid's CO2 total is also given at each of them.
CO2_PRESETS = {"epa": 0.430, "eea": 0.275}


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


EVP_AXES = ("trials", "train_seconds")  # config.report.evp_axis: the expected-validation plot's x axis
EXACT_TRIALS = 12  # up to this many trials a row, the budget curve is exact (every subset); beyond, sampled orders
SAMPLED_ORDERS = 4000
BUDGET_POINTS = 64  # most budgets a curve is evaluated at


def expected_best_within_budget(values: Sequence[float], seconds: Sequence[float], budget: float,
                                mode: str = "max") -> float:
    """Expected best validation after a training budget of `budget` seconds: the row's trials are run one after
    another in a uniformly random order, each to its end, as long as the next one still fits (the cumulative
    train_seconds of those run stays within the budget); the value is the best validation among the trials run,
    averaged over all orders. Trials are drawn without replacement: the curve ends at the row's own cost (every
    trial run: the best of all) and claims no trial that was not run, where the n-trials curve re-indexed by
    n × mean train time would charge every trial the mean and run on past the trials there were (a drawn-with-
    replacement n beyond them) at a cost nobody paid. Defined for budgets from the longest single
    trial on, where every order runs at least one. Exact up to EXACT_TRIALS trials: the first k trials of a
    random order are a uniformly random k-subset S, and the order stops after them when k is all the trials or
    the next one, uniform over the rest, does not fit; beyond, SAMPLED_ORDERS orders of a fixed seed."""
    if not values or len(values) != len(seconds):
        raise ValueError("expected_best_within_budget needs one train time per value, and at least one value")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
    times = [float(t) for t in seconds]
    if budget < max(times) * (1 - 1e-9):
        raise ValueError(f"budget {budget:g} s is below the longest trial ({max(times):g} s): some orders run none")
    pick = max if mode == "max" else min
    n = len(values)
    budget += 1e-9 * max(1.0, abs(budget))  # a budget equal to a sum of train times runs those trials
    if n > EXACT_TRIALS:
        rng, total = random.Random(0), 0.0
        for _ in range(SAMPLED_ORDERS):
            order, spent, best = rng.sample(range(n), n), 0.0, None
            for i in order:
                if spent + times[i] > budget:
                    break
                spent += times[i]
                best = values[i] if best is None else pick(best, values[i])
            total += best
        return total / SAMPLED_ORDERS
    expected = 0.0
    for mask in range(1, 1 << n):
        taken = [i for i in range(n) if mask >> i & 1]
        spent = sum(times[i] for i in taken)
        if spent > budget:
            continue
        k = len(taken)
        stop = 1.0 if k == n else sum(spent + times[j] > budget for j in range(n) if not mask >> j & 1) / (n - k)
        if stop:
            expected += stop / comb(n, k) * pick(float(values[i]) for i in taken)
    return expected


def expected_validation_budget_curve(values: Sequence[float], seconds: Sequence[float],
                                     mode: str = "max") -> tuple[list[float], list[float]]:
    """(budgets, expected_best_within_budget at each): a step function of the budget that changes only where it
    equals a sum of some trials' train seconds, evaluated at those sums from the longest trial to the row's total
    (at most BUDGET_POINTS of them, else evenly spaced budgets over that range and the total)."""
    times = [float(t) for t in seconds]
    low, high = max(times), sum(times)
    if len(times) <= EXACT_TRIALS:
        n = len(times)
        sums = {round(sum(times[i] for i in range(n) if mask >> i & 1), 9) for mask in range(1, 1 << n)}
        budgets = sorted(b for b in sums if low - 1e-9 <= b <= high + 1e-9)
    else:
        budgets = []
    if not budgets or len(budgets) > BUDGET_POINTS:
        budgets = [low + (high - low) * i / (BUDGET_POINTS - 1) for i in range(BUDGET_POINTS)] if high > low else [low]
    budgets = [min(max(b, low), high) for b in budgets]  # the rounding above kept inside the range
    return budgets, [expected_best_within_budget(values, times, b, mode) for b in budgets]


def delta_pct(value: float | None, base: float | None) -> float | None:
    """(value − base) / base × 100; None when either is missing or the base is zero."""
    if value is None or base is None or base == 0:
        return None
    return (value - base) / abs(base) * 100.0


@dataclass
class Group:
    """The cells of one model × task and their rows: one per chain and compressor setting (per hardware
    too when the cells ran on more than one), each with Δ% against the baseline row of its hardware."""

    model: str
    task: str
    metric: str | None
    mode: str
    cells: list[dict]
    rows: list[dict] = field(default_factory=list)
    per_batch: list[str] = field(default_factory=list)  # `<figure>.<device>.batch_<n>` the cells recorded
    notes: list[str] = field(default_factory=list)
    plots: dict[str, Path] = field(default_factory=dict)
    skipped_plots: list[str] = field(default_factory=list)
    timing: list[str] = field(default_factory=list)  # markdown above the table: how latency/decode were taken
    layout: list[tuple[str, bool]] | None = None  # a preset's table columns (config.report.table), else the default
    protocol: list[str] = field(default_factory=list)  # the preset's protocol and how perplexity was scored
    evp_axis: str = EVP_AXES[0]  # config.report.evp_axis: expected validation against cells tried or train seconds

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{self.model}-{self.task}")

    @property
    def baseline_row(self) -> dict | None:
        return next((r for r in self.rows if r["is_baseline"]), None)

    @property
    def figures(self) -> tuple[str, ...]:
        return (*AGGREGATED, *self.per_batch)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _figure(c: dict, name: str) -> float | None:
    value = c["per_batch"].get(name) if "." in name else c[name]
    return None if value is None else float(value)


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, dict)) or value is None:
        return json.dumps(value, separators=(",", ":"))
    return str(value)


_ABSENT = "?"  # a setting a cell's config does not hold


def varying_settings(cells: Sequence[dict]) -> dict[str, list[str]]:
    """Per compressor: the keys of config.compress.<name> whose values differ between `cells` (one
    chain's cells of one model × task), in config order."""
    out = {}
    for name in dict.fromkeys(n for c in cells for n in c["settings"]):
        keys = dict.fromkeys(k for c in cells for k in c["settings"].get(name, {}))
        varying = [k for k in keys if len({_text(c["settings"].get(name, {}).get(k, _ABSENT)) for c in cells}) > 1]
        if varying:
            out[name] = varying
    return out


def setting_values(c: dict, varying: dict[str, list[str]]) -> list[tuple[str, Any]]:
    """(`key` or `name.key` in a chain of several, value) of the varying settings, for one cell."""
    several = len(c["settings"]) > 1
    return [((f"{name}.{key}" if several else key), c["settings"].get(name, {}).get(key, _ABSENT))
            for name, keys in varying.items() for key in keys]


def _sortable(value: Any) -> tuple:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, float(value), "") if is_number else (1, 0.0, _text(value))


def row_name(chain: str, setting: str, labels: dict[str, str]) -> str:
    """A row's name: its compressors' labels joined with '+' in chain order when any has one,
    else the chain and its varying settings ('imp target=0.3')."""
    if labels:
        return "+".join(labels.values())
    return f"{chain} {setting}" if setting else chain


def pair_key(c: dict) -> tuple:
    # What makes two rows' cells comparable: the same seed and learning rate.
    return (c["seed"], c["lr"])


def paired_delta(cells: Sequence[dict], base_cells: Sequence[dict], name: str) -> tuple[float | None, int, int, int]:
    """Δ% of figure `name` over the (seed, lr) settings both rows finished: (Δ%, shared, row's, base's).
    With none shared it compares the two means as they are."""
    mine, theirs = _pair_means(cells, name), _pair_means(base_cells, name)
    shared = [k for k in mine if k in theirs] or None
    if shared is None:
        value = delta_pct(_mean_std(list(mine.values()))[0], _mean_std(list(theirs.values()))[0])
        return value, 0, len(mine), len(theirs)
    value = delta_pct(statistics.fmean(mine[k] for k in shared), statistics.fmean(theirs[k] for k in shared))
    return value, len(shared), len(mine), len(theirs)


def _pair_means(cells: Sequence[dict], name: str) -> dict[tuple, float]:
    values: dict[tuple, list[float]] = {}
    for c in cells:
        if c["status"] == "ok" and _figure(c, name) is not None:
            values.setdefault(pair_key(c), []).append(_figure(c, name))
    return {k: statistics.fmean(v) for k, v in values.items()}


def chain_row(chain: str, hardware: str | None, cells: list[dict], figures: Sequence[str] = AGGREGATED,
              name: str | None = None, setting: str = "") -> dict[str, Any]:
    ok = [c for c in cells if c["status"] == "ok"]
    failed = [c for c in cells if c["status"] != "ok"]
    name = name or chain
    row: dict[str, Any] = {"chain": chain, "setting": setting, "name": name, "hardware": hardware,
                           "label": name if hardware is None else f"{name} @ {hardware}",
                           "is_baseline": False, "n_ok": len(ok), "n_failed": len(failed),
                           "errors": "; ".join(dict.fromkeys(c["error"] for c in failed))}
    for figure in figures:
        row[f"{figure}_mean"], row[f"{figure}_std"] = _mean_std(
            [v for v in (_figure(c, figure) for c in ok) if v is not None])
    return row


def _rows_of(members: list[dict], mixed: bool) -> dict[tuple, list[dict]]:
    """The group's cells by row: (hardware, chain, setting values, labels)."""
    by_chain: dict[str, list[dict]] = {}
    for c in members:
        by_chain.setdefault(c["chain"], []).append(c)
    rows: dict[tuple, list[dict]] = {}
    for chain, cells in by_chain.items():
        varying = varying_settings(cells)
        for c in cells:
            values = tuple((k, _text(v), _sortable(v)) for k, v in setting_values(c, varying))
            key = (str(c["hardware"]) if mixed else None, chain, values, tuple(c["labels"].values()),
                   c.get("variant"))
            rows.setdefault(key, []).append(c)
    return rows


def table_layout(table: Any) -> list[tuple[str, bool]] | None:
    """config.report.table ({figure: with Δ%}, in order) as the markdown table's columns; a figure the report does
    not know is one line naming the known ones. Per-batch figures by name or pattern (decode_tokens_per_s.*.batch_12)."""
    if not table:
        return None
    if not isinstance(table, dict):
        raise SqueezeError(f"config.report.table={table!r}: give a mapping of figure -> with Δ% (true/false)")
    known = {"quality", "per_batch", *FIGURES}
    for name in table:
        figure = str(name).split(".", 1)[0]
        if name not in known and not ("." in str(name) and figure in PER_BATCH):
            raise SqueezeError(f"config.report.table: {name!r} is not a report figure; known: {sorted(known)}, or "
                               f"<{'|'.join(PER_BATCH)}>.<device>.batch_<n> (patterns allowed)")
    return [(str(name), bool(delta)) for name, delta in table.items()]


REPORT_KEYS = ("table", "protocol", "evp_axis")


def evp_axis(value: Any) -> str:
    """config.report.evp_axis, checked: `trials` (default) or `train_seconds`."""
    if value is None:
        return EVP_AXES[0]
    if value not in EVP_AXES:
        raise SqueezeError(f"config.report.evp_axis={value!r}: use one of {list(EVP_AXES)} (the expected-validation "
                           "plot's x axis: cells tried, or their cumulative train seconds)")
    return str(value)


def check_report_section(report: Any) -> None:
    """A preset's `report:` section, checked before a run loads anything (a misspelt key or figure would otherwise
    be found only when the report is drawn, after the sweep): its keys, and every figure its table names."""
    if not isinstance(report, dict):
        raise SqueezeError(f"report={report!r}: give a mapping with {list(REPORT_KEYS)}")
    unknown = [k for k in report if k not in REPORT_KEYS]
    if unknown:
        raise SqueezeError(f"report.{unknown[0]} is not a report setting; use one of {list(REPORT_KEYS)}")
    table_layout(report.get("table"))
    evp_axis(report.get("evp_axis"))


def delta_names(group: Group) -> list[str]:
    """The figures with a Δ%: the default table's, and those a preset's layout asks for (per-batch patterns
    expanded to the figures the group recorded)."""
    asked = []
    for name, delta in group.layout or ():
        if delta:
            asked += [n for n in group.per_batch if fnmatch.fnmatchcase(n, name)] if "." in name else [name]
    return list(dict.fromkeys([*DELTAS, *(n for n in asked if n != "per_batch")]))


def protocol_lines(members: list[dict]) -> list[str]:
    """The preset's own protocol text, then how perplexity was scored (each distinct way the cells recorded)."""
    lines = list(dict.fromkeys(str(c["protocol"]).strip() for c in members if c.get("protocol")))
    ways = []
    for c in members:
        p = c.get("perplexity_protocol")
        if not p:
            continue
        if p.get("protocol") == "last_word":
            way = (f"last word of each passage given up to {(p.get('last_word') or {}).get('max_length') or 'the'}"
                   f" tokens of context (training blocks of {p.get('block_size')})")
        elif p.get("protocol") == "sliding":
            way = f"sliding windows of {p.get('block_size')} tokens advancing by {p.get('stride')}"
        else:
            way = f"non-overlapping blocks of {p.get('block_size')} tokens"
        ways.append(f"{way}, {p.get('scored_tokens')} test tokens scored" if p.get("scored_tokens") else way)
    ways = list(dict.fromkeys(ways))
    if ways:
        lines.append("Perplexity: " + "; ".join(ways) + ".")
    ranks = list(dict.fromkeys(HITS_RANKS.get(c.get("hits_rank"), str(c.get("hits_rank"))) for c in members
                               if c.get("hits_rank")))
    if ranks:  # dialog: what ordered the candidates (records before hits_rank say nothing)
        lines.append("Hits@k: candidates ranked by " + "; ".join(ranks) + ".")
    return lines


HITS_RANKS = {"lm": "each reply's mean log-likelihood (task.module.hits_rank=lm)",
              "mc": "the multiple-choice head, as a double-heads model ranks them (task.module.hits_rank=mc)"}


def build_groups(cells: list[dict], baseline: str = BASELINE) -> list[Group]:
    by_key: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        by_key.setdefault((c["model"], c["task"]), []).append(c)
    groups = []
    for (model, task), members in sorted(by_key.items()):
        finished = [c for c in members if c["status"] == "ok"] or members
        metric = next((c["metric"] for c in finished if c["metric"]), None)
        mode = next((c["mode"] for c in finished if c["metric"]), "max")
        layouts = [table_layout(c["table"]) for c in members if c.get("table")]  # each checked; the first one shown
        axes = [evp_axis(c["evp_axis"]) for c in members if c.get("evp_axis") is not None]
        group = Group(model, task, metric, mode, members,
                      per_batch=sort_per_batch(n for c in members for n in c["per_batch"]),
                      layout=layouts[0] if layouts else None,
                      protocol=protocol_lines(members), evp_axis=axes[0] if axes else EVP_AXES[0])
        # Latency, throughput and energy on a CPU and on a GPU are not one population: split by hardware.
        mixed = len({c["hardware"] for c in members}) > 1
        by_row = _rows_of(members, mixed)
        names = {key: row_name(key[1], " ".join(f"{k}={t}" for k, t, _ in key[2]), by_row[key][0]["labels"])
                 + (f" [{key[4]}]" if key[4] else "") for key in by_row}
        # Baseline first, then the rows in the order the sweep (a preset, the command line) ran their cells.
        order = sorted(by_row, key=lambda k: (k[0] or "", baseline not in (k[1], names[k]),
                                              min(c.get("order", 0) for c in by_row[k]), names[k]))
        group.rows = []
        for key in order:
            setting = " ".join(f"{k}={t}" for k, t, _ in key[2])
            name = names[key]
            if sum(names[k] == name for k in by_row if k[0] == key[0]) > 1:  # one label on several rows
                name = f"{name} ({key[1]}{' ' + setting if setting else ''})"
            group.rows.append(chain_row(key[1], key[0], by_row[key], group.figures, name, setting))
            for c in by_row[key]:
                c["row"] = group.rows[-1]["label"]
        cells_of = {row["label"]: by_row[key] for row, key in zip(group.rows, order)}
        for hw in dict.fromkeys(k[0] for k in order):
            _compare(group, [r for r in group.rows if r["hardware"] == hw], cells_of, baseline, hw)
        groups.append(group)
    return groups


def _compare(group: Group, rows: list[dict], cells_of: dict[str, list[dict]], baseline: str,
             hw: str | None) -> None:
    """Δ% of each row against the baseline row of the same hardware, over the seeds and learning rates
    both ran (the baseline named by its chain, or by its row name when the chain has several rows)."""
    where = f"{group.model} × {group.task}" + (f" on {hw}" if hw else "")
    candidates = [r for r in rows if r["name"] == baseline] or [r for r in rows if r["chain"] == baseline]
    base = candidates[0] if len(candidates) == 1 else None
    if len(candidates) > 1:
        group.notes.append(f"`{baseline}` names {len(candidates)} rows of {where} "
                           f"({', '.join(r['name'] for r in candidates)}), so Δ% is blank; pass one of them "
                           "with --baseline")
    elif base is None:
        group.notes.append(f"no `{baseline}` cell for {where}, so Δ% is blank; run compress={baseline} "
                           "for it or pick another baseline chain with --baseline")
    elif base["n_ok"] == 0:
        group.notes.append(f"the `{baseline}` cells of {where} all failed, so Δ% is blank")
        base = None
    if base is not None:
        base["is_baseline"] = True
    deltas = delta_names(group)
    for row in rows:
        for name in deltas:
            row[f"{name}_delta_pct"] = None
        if base is None or row["n_ok"] == 0:
            continue
        for name in deltas:
            value, shared, mine, theirs = paired_delta(cells_of[row["label"]], cells_of[base["label"]], name)
            row[f"{name}_delta_pct"] = value
            if name != "quality" or row is base or shared == mine == theirs:
                continue
            if shared:
                group.notes.append(f"Δ% of `{row['label']}` is over the {shared} seed/lr setting(s) it shares "
                                   f"with `{base['label']}` (it has {mine}, the baseline {theirs})")
            else:
                group.notes.append(f"`{row['label']}` shares no seed/lr setting with `{base['label']}`: its Δ% "
                                   "compares means over different seeds")


def totals(cells: Sequence[dict]) -> dict[str, Any]:
    """What the grid spent, every record counted (failed and evaluate.py ones too): sums of train and
    eval seconds, facility kWh and CO2 as recorded, CO2 at each preset factor, the PUEs and factors used."""
    spent = [c["spent"] for c in cells]

    def total(key: str) -> float | None:
        values = [float(s[key]) for s in spent if s.get(key) is not None]
        return sum(values) if values else None

    kwh = total("kwh")
    return {
        "records": len(cells),
        "with_energy": sum(s.get("kwh") is not None for s in spent),
        "train_s": total("train_s"), "eval_s": total("eval_s"), "kwh": kwh, "co2_kg": total("co2_kg"),
        "co2_kg_at": {k: (None if kwh is None else kwh * v) for k, v in CO2_PRESETS.items()},
        "pue": sorted({float(s["pue"]) for s in spent if s.get("pue") is not None}),
        "counted": dict(sorted(Counter(s["counted"] for s in spent if s.get("counted")).items())),
        "factors": sorted({(str(s.get("co2")) if s.get("co2") is not None else "", float(s["co2_kg_per_kwh"]))
                           for s in spent if s.get("co2_kg_per_kwh") is not None}, key=lambda f: f[1]),
    }


def _spent(cells: Sequence[dict], key: str) -> float | None:
    values = [float(c["spent"][key]) for c in cells if c["spent"].get(key) is not None]
    return sum(values) if values else None


def _factors(cells: Sequence[dict]) -> list[tuple[str, float]]:
    return sorted({(str(c["spent"].get("co2") or ""), float(c["spent"]["co2_kg_per_kwh"])) for c in cells
                   if c["spent"].get("co2_kg_per_kwh") is not None}, key=lambda f: f[1])


def co2_by_row(group: Group) -> list[dict[str, Any]]:
    """Per row of a model × task: what all its runs spent (every seed and learning rate, failed runs included: kWh
    and CO2 as each recorded it) and, for a row of several runs (an lr grid, seeds), its best run by validation
    (the model the search keeps: validation.best by the task's monitor) with that run's own CO2. The search costs
    all runs; the thesis sets that against the one run it keeps."""
    out = []
    for row in group.rows:
        cells = [c for c in group.cells if c["row"] == row["label"]]
        judged = [c for c in cells if c["status"] == "ok" and c["validation_best"] is not None]
        pick = max if group.mode == "max" else min
        best = pick(judged, key=lambda c: float(c["validation_best"])) if len(cells) > 1 and judged else None
        out.append({"label": row["label"], "runs": len(cells), "failed": sum(c["status"] != "ok" for c in cells),
                    "lrs": sorted({c["lr"] for c in cells if c["lr"] is not None}, key=_sortable),
                    "kwh": _spent(cells, "kwh"), "co2_kg": _spent(cells, "co2_kg"), "factors": _factors(cells),
                    "best": None if best is None else {"seed": best["seed"], "lr": best["lr"],
                                                       "validation": best["validation_best"],
                                                       "kwh": best["spent"].get("kwh"),
                                                       "co2_kg": best["spent"].get("co2_kg")}})
    return out


def co2_by_technique(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """Per technique (a row label, summed over the model × task tables that have it, in first-seen order): its
    runs, failed runs, kWh and CO2 over the whole grid, as recorded."""
    cells_of: dict[str, list[dict]] = {}
    tables: dict[str, list[str]] = {}
    for g in groups:
        for row in g.rows:
            cells_of.setdefault(row["label"], []).extend(c for c in g.cells if c["row"] == row["label"])
            tables.setdefault(row["label"], []).append(f"{g.model} × {g.task}")
    return [{"label": label, "tables": tables[label], "runs": len(cells),
             "failed": sum(c["status"] != "ok" for c in cells), "kwh": _spent(cells, "kwh"),
             "co2_kg": _spent(cells, "co2_kg"), "factors": _factors(cells)} for label, cells in cells_of.items()]
