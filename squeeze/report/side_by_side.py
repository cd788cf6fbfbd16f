"""The report's side of `python -m squeeze.measure` (squeeze/measure/side_by_side.py, where the file's shape is
documented): where a side_by_side.json lies in or next to a reported directory, its latency and decoding
figures replace the cells' own in the rows it measured, and each table says how its figures were taken.
Reads JSON only, like the rest of the report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from squeeze.errors import SqueezeError
from squeeze.report.aggregate import Group
from squeeze.report.cells import sort_per_batch

FILE = "side_by_side.json"
SEPARATELY = ("Latency and decode speed were measured separately, cell by cell (each run timed its own model in "
              "its own process at its own moment, so differences of a few % can be noise); "
              "`python -m squeeze.measure DIR` measures the rows side by side.")


def find(paths: Sequence[str | Path]) -> list[Path]:
    """side_by_side.json in each reported directory or in the directory that holds it, each once."""
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        where = path.parent if path.is_file() else path
        for candidate in (where / FILE, where.parent / FILE):
            if candidate.is_file():
                found.setdefault(candidate.resolve(), None)
    return list(found)


def read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or "rounds" not in data:
            raise ValueError("no rows")
    except (OSError, ValueError) as e:
        raise SqueezeError(f"{path} is not a side-by-side measurement ({type(e).__name__}: {e}); run "
                           "`python -m squeeze.measure DIR` again or remove that file") from None
    return data


def _same(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _match(group: Group, row: dict, measured: list[dict]) -> dict | None:
    """The measured row of a report row: the one of the same name, else the one that timed one of its cells."""
    named = [m for m in measured if m.get("name") == row["label"]]
    if len(named) == 1:
        return named[0]
    runs = [c["run_dir"] for c in group.cells if c["row"] == row["label"]]
    shared = [m for m in measured if any(_same(a, b) for a in m.get("runs") or [] for b in runs)]
    return shared[0] if len(shared) == 1 else None


def _interval(figure: dict | None, digits: str = ".4g") -> str:
    if not figure:
        return ""
    lo, hi = figure["ci95"]
    return f"{figure['median']:{digits}} [{lo:{digits}}, {hi:{digits}}]"


def _batch(name: str) -> int:
    size = name.removeprefix("batch_")
    return int(size) if size.isdigit() else 0


def _table(pairs: list[tuple[dict, dict]]) -> list[str]:
    """Per measured row: each latency and decoding median with its 95 % CI, and the ratio to the baseline."""
    latency = sorted({b for _, m in pairs for b in m.get("latency_ms") or {}}, key=_batch)
    decode = sorted({b for _, m in pairs for b in m.get("decode_tokens_per_s") or {}}, key=_batch)
    header = ["row"]
    for b in latency:
        header += [f"latency ms b{_batch(b)}", "× baseline"]
    for b in decode:
        header += [f"decode tok/s b{_batch(b)}", "× baseline"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, m in pairs:
        ratios = m.get("ratio_to_baseline") or {}
        cells = [row["label"].replace("|", "\\|")]
        for b in latency:
            cells += [_interval((m.get("latency_ms") or {}).get(b)), _interval(ratios.get(f"latency_{b}"), ".3f")]
        for b in decode:
            cells += [_interval((m.get("decode_tokens_per_s") or {}).get(b)),
                      _interval(ratios.get(f"decode_{b}"), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def apply(groups: Sequence[Group], paths: Sequence[str | Path]) -> None:
    """Each group's rows that a side_by_side.json next to `paths` measured take its figures (latency at batch 1
    with Δ% from the paired ratio, decode tok/s per batch size), and `group.timing` says how its figures were
    taken: the measurement's header and its table with 95 % intervals, or that they were taken cell by cell."""
    files = [(path, read(path)) for path in find(paths)]
    for group in groups:
        pairs, source = [], None
        for path, data in files:
            measured = [m for m in data["rows"] if m.get("model") == group.model and m.get("task") == group.task]
            pairs = [(row, m) for row in group.rows if (m := _match(group, row, measured)) is not None]
            if pairs:
                source = (path, data)
                break
        if source is None:
            shown = any(r.get("latency_ms_mean") is not None for r in group.rows) or any(
                n.startswith("decode_tokens_per_s.") for n in group.per_batch)
            group.timing = [SEPARATELY] if shown else []
            continue
        path, data = source
        device = data.get("device") or "cpu"
        for row, m in pairs:
            _replace(group, row, m, device)
        group.per_batch = sort_per_batch(group.per_batch)
        rest = [row["label"] for row in group.rows if all(row is not r for r, _ in pairs)]
        group.timing = [_header(group, path, data, rest), "", *_table(pairs)]


def _header(group: Group, path: Path, data: dict, rest: list[str]) -> str:
    threads = data.get("threads")
    entry = next((g for g in data.get("groups") or [] if (g.get("model"), g.get("task")) == (group.model, group.task)),
                 {})
    compared = (f"ratio to `{entry['baseline']}` with 95 % CI" if entry.get("baseline")
                else "no ratios (no baseline row in this model × task)")
    unmeasured = ", ".join(f"`{r}`" for r in rest)
    unmeasured = f"; rows not measured side by side (figures per cell): {unmeasured}" if rest else ""
    return (f"Latency/decode measured side by side in {data['rounds']} interleaved rounds, {threads} "
            f"thread{'' if threads == 1 else 's'} ({path.name}, {data.get('device') or 'cpu'}); {compared} "
            "(median [interval]; latency × below 1 and decode × above 1 are faster). The table's latency and decode "
            "columns are these medians, its latency Δ% the paired ratio's; the other columns are as each cell "
            f"recorded them{unmeasured}.")


def _replace(group: Group, row: dict, measured: dict, device: str) -> None:
    ratios = measured.get("ratio_to_baseline") or {}
    b1 = (measured.get("latency_ms") or {}).get("batch_1")
    if b1 is not None:
        row["latency_ms_mean"], row["latency_ms_std"] = b1["median"], None
        ratio = ratios.get("latency_batch_1")
        row["latency_ms_delta_pct"] = None if ratio is None else (ratio["median"] - 1.0) * 100.0
    for batch, figure in (measured.get("decode_tokens_per_s") or {}).items():
        name = f"decode_tokens_per_s.{device}.{batch}"
        if name not in group.per_batch:  # a figure the cells did not record: blank for the other rows
            group.per_batch.append(name)
            for other in group.rows:
                other.setdefault(f"{name}_mean", None)
                other.setdefault(f"{name}_std", None)
        row[f"{name}_mean"], row[f"{name}_std"] = figure["median"], None
