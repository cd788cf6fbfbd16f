"""What `python train.py -m <args>` would run, said before it runs:

    python -m squeeze.plan experiment=gpt2_compression_offline
    python -m squeeze.plan compress=none,imp compress.imp.target=0.3,0.5 --json

The sweep's cells in Hydra's job order (the numbers that prefix the cell directories), each with its report row's
label, model, task, chain and own overrides; for the sweep directory it would write, which cells are finished there,
failed, interrupted or not started; and which cells start from the stored fine-tuned baseline (or distil from it as
teacher=auto) instead of fine-tuning, and whether the store holds it yet. Nothing is trained, loaded or written.

Each answer is the run's own: the cells are the sweeper's (squeeze.run.sweep.cells, what hydra_plugins/squeeze_sweeper
expands), each composed as Hydra's launcher composes a job; a cell's directory is judged as a rerun judges it
(squeeze.run.cell.earlier_run); the store's use is decided by squeeze.run.baselines.reused; the label is the one the
run logs (squeeze.run.loggers.row_label). A mistake the sweep stops on before its first cell is the same one line
here, with exit code 2. Only that first part is light: judging the cells imports the compressor classes (Lightning),
since whether a chain acts on fine-tuned weights is a class attribute.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from pathlib import Path
from typing import Any

from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from squeeze import config
from squeeze.errors import SqueezeError
from squeeze.run import sweep

CONF = Path(__file__).resolve().parents[2] / "conf"
CONFIG_NAME = "train"  # train.py's @hydra.main(config_name=...)
SWEEPER = "hydra_plugins.squeeze_sweeper.SqueezeSweeper"
STATUSES = ("finished", "failed", "interrupted", "not started")


@dataclass
class Planned:
    """One cell of the sweep."""

    num: int  # hydra.job.num: its directory's prefix
    dir: str  # its directory (absolute)
    row: str  # the report row's label, the name its run logs
    model: str
    task: str
    chain: str
    overrides: list[str]  # the cell's own overrides, as Hydra gets them
    status: str  # one of STATUSES, of what its directory holds
    action: str  # what the sweep does with it: run | skip | resume | rerun (failed) | replace (another config's run)
    baseline: str | None  # the store's use: "start" (its chain acts on the stored model) | "teacher" | None
    stored: list[dict[str, Any]]  # the store entries it uses: {"dir", "ready"}
    head_cell: int | None = None  # the earlier cell whose trained model its post-training tail starts from


@dataclass
class Plan:
    args: list[str]  # the command line's overrides
    sweep_dir: str  # hydra.sweep.dir as the sweep resolves it
    cells: list[Planned]
    notes: list[str]  # where a setting reaches only some cells (the sweeper logs them)


def plan(args: Sequence[str]) -> Plan:
    """The plan of `python train.py -m <args>` run from the current directory. Hydra's global state is set up
    afresh (as an entry point does)."""
    args = [a for a in args if a not in ("-m", "--multirun")]
    argv = config.lenient_settings(args)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), job_name=CONFIG_NAME, version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        # hydra.compose() composes one run (RunMode.RUN) and refuses sweep values; this is the call it makes, in
        # the mode and with the override Hydra's own `-m` adds (hydra._internal.utils._run_app).
        master = hydra.compose_config(CONFIG_NAME, [*argv, "hydra.mode=MULTIRUN"], run_mode=RunMode.MULTIRUN)
        _check_sweeper(master)
        loader = hydra.config_loader
        jobs, notes = sweep.cells(master, loader)
        sweep_dir = str(master.hydra.sweep.dir)  # resolved once: ${now:...} is then the same in every cell
        # Every cell composed first, as the sweeper validates them before it launches any: a bad value of a swept
        # option stops the plan at once.
        composed = [loader.load_sweep_config(master, list(job)) for job in jobs]
        swept = (jobs, sweep.default_chain(master))
        from squeeze.run.cell import hydra_config_kept  # Lightning loads with it: after the sweep's own checks

        with hydra_config_kept():
            judged = [_cell(cfg, job, num, swept) for num, (cfg, job) in enumerate(zip(composed, jobs))]
    cells = [c for c, _, _ in judged]
    for i, (c, _, wants) in enumerate(judged):  # as squeeze.run.trained_head.finished_head will find it
        if wants is not None and c.action != "skip":
            c.head_cell = next((e.num for e, offers, _ in judged[:i] if offers == wants), None)
    return Plan(args, sweep_dir, cells, notes)


def _check_sweeper(master: DictConfig) -> None:
    target = str(master.hydra.sweeper.get("_target_"))
    if master.get("search") is not None or target.endswith(".SearchSweeper"):
        raise SqueezeError("this sweep is a search: Optuna chooses its cells while it runs, so there is no list of "
                           "them to plan; squeeze.plan lists the cells of squeeze's grid sweeper")
    if target != SWEEPER:
        raise SqueezeError(f"hydra.sweeper is {target}: squeeze.plan lists the cells of squeeze's sweeper "
                           "(hydra/sweeper=squeeze, train.yaml's own)")


def _cell(composed: DictConfig, job: list[str], num: int, swept: tuple[list[list[str]], list[str]]):
    """(the planned cell; the training its model is; the training it starts from: trained_head.shapes)"""
    # Imported here: a mistake in the sweep is told before Lightning loads (seconds).
    from squeeze.run import baselines, trained_head
    from squeeze.run import cell as cells
    from squeeze.run import loggers

    cfg = copy.deepcopy(cells.as_job(composed, num))
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]  # the task function's config, as run_job hands it over
    try:
        config.check_before_loading(cfg, sweep=True)  # train.py's checks; they settle model.name_or_path
    except SqueezeError as e:
        raise SqueezeError(f"cell {num} ({' '.join(job)}): {e}") from None
    here = cells.current()
    earlier, _ = cells.earlier_run(cfg, here.run_dir)
    status, action = _judged(earlier, bool(cfg.get("rerun_failed")))
    if cfg.get("pipeline") is not None:  # squeeze.run.recipe.train runs it without the rerun bookkeeping
        action = "run"
    use, entries = _store_use(cfg, here) if action != "skip" else (None, [])
    offers, wants = trained_head.shapes(OmegaConf.to_container(cfg, resolve=True), str(here.run_dir),
                                        _chain_kinds(cfg))
    if use == "start" or not baselines.reuse_enabled(cfg, True) or cfg.get("ckpt_path") not in (None, "last_or_new"):
        wants = None
    planned = Planned(num=num, dir=str(here.run_dir), row=loggers.row_label(cfg.compress, sweep=swept),
                      model=str(here.choices.get("model")), task=str(here.choices.get("task")),
                      chain=config.chain_name(cfg.get("compress")), overrides=list(job), status=status, action=action,
                      baseline=use, stored=entries)
    return planned, offers, wants


def _chain_kinds(cfg: DictConfig) -> list[SimpleNamespace]:
    """The chain's names with whether each acts after training (a class attribute: nothing is built)."""
    from hydra.utils import get_object

    kinds = []
    for name, node in config.used_compressors(cfg.get("compress")).items():
        try:
            after = bool(get_object(str(node.get("_target_"))).after_training)
        except Exception:  # an unimportable _target_: the cell fails to build its chain before anything else
            return []
        kinds.append(SimpleNamespace(name=name, after_training=after))
    return kinds


def _judged(earlier: str | None, rerun_failed: bool) -> tuple[str, str]:
    """(status, action) of a cell from what squeeze.run.cell.earlier_run found, as its _previous_cell acts on it."""
    from squeeze.run.cell import ANOTHER_CONFIG

    if earlier == "ok":
        return "finished", "skip"
    if earlier == "failed":
        return "failed", "rerun" if rerun_failed else "skip"
    if earlier in ("running", "interrupted"):  # "running": killed before it could say so
        return "interrupted", "resume"
    return "not started", "replace" if earlier == ANOTHER_CONFIG else "run"


def _store_use(cfg: DictConfig, here: Any) -> tuple[str | None, list[dict[str, Any]]]:
    """Whether the cell starts from the stored fine-tuned baseline (baselines.reused, on the chain's classes) or
    distils from it (teacher=auto, as baselines.auto_teachers), and the store entries it needs."""
    from hydra.utils import get_object

    from squeeze.run import baselines

    if cfg.get("pipeline") is not None:  # fine-tuned in stages by its own path, never from the store
        return None, []
    used = config.used_compressors(cfg.get("compress"))
    classes = []
    for node in used.values():
        try:
            classes.append(get_object(str(node.get("_target_"))))
        except Exception:  # an unimportable _target_: the cell fails to build its chain, before any store use
            return None, []
    use, entries = None, []
    for node in used.values():
        if node.get("teacher") == "auto":
            grid = node.get("teacher_best_of")
            grid = OmegaConf.to_container(grid, resolve=True) if grid is not None else None
            use = "teacher"
            entries += [baselines.store_entry(cfg, here.run_dir, s)[0] for s in baselines.grid_settings(grid or {})]
    if baselines.reused(cfg, classes, here):
        use = "start"
        entries.append(baselines.store_entry(cfg, here.run_dir)[0])
    return use, [{"dir": str(e), "ready": baselines.ready(e) is not None} for e in dict.fromkeys(entries)]


# -- what is printed ----------------------------------------------------------------------------------
def table(p: Plan) -> str:
    """The plan as aligned text: a header, one line a cell, the counts and the store's entries."""
    shared = [o for o in p.cells[0].overrides if all(o in c.overrides for c in p.cells)] if p.cells else []
    where = Path(p.sweep_dir)
    lines = [f"python train.py -m {' '.join(p.args)}".rstrip(),
             f"sweep directory: {p.sweep_dir}{'' if where.is_dir() else ' (not there yet)'}"]
    if shared:
        lines.append(f"every cell: {' '.join(_shown(o) for o in shared)}")
    head = ("#", "row", "model", "task", "chain", "status", "baseline", "settings")
    rows = [(str(c.num), c.row, c.model, c.task, c.chain, _status_text(c), _baseline_text(c),
             " ".join(_shown(o) for o in c.overrides if o not in shared)) for c in p.cells]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        lines.append("  ".join([r[0].rjust(widths[0]), *(v.ljust(w) for v, w in zip(r[1:-1], widths[1:])), r[-1]])
                     .rstrip())
    counts = {s: sum(c.status == s for c in p.cells) for s in STATUSES}
    running = sum(c.action != "skip" for c in p.cells)
    lines.append(f"{len(p.cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                 + f"; {running} to run")
    lines += _store_lines(p.cells)
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def _shown(override: str) -> str:
    """An override as the command line gives it (the entry points make compressor settings `++`)."""
    return override[2:] if override.startswith("++compress.") else override


def _status_text(c: Planned) -> str:
    extra = {"skip": " (skipped)" if c.status == "failed" else "", "rerun": " (reruns)", "resume": " (resumes)",
             "replace": " (replaces another config's run)",
             "run": " (runs again)" if c.status != "not started" else ""}.get(c.action, "")
    return c.status + extra


def _baseline_text(c: Planned) -> str:
    if c.head_cell is not None:
        return f"starts from cell {c.head_cell}'s model"
    if c.baseline is None:
        return "-"
    ready = sum(e["ready"] for e in c.stored)
    state = ("stored" if ready else "to train") if len(c.stored) == 1 else f"{ready}/{len(c.stored)} stored"
    return f"{'starts from it' if c.baseline == 'start' else 'teacher'} ({state})"


def _store_lines(cells: list[Planned]) -> list[str]:
    users: dict[str, dict[str, list[int]]] = {}
    ready: dict[str, bool] = {}
    for c in cells:
        for e in c.stored:
            users.setdefault(e["dir"], {}).setdefault(c.baseline or "", []).append(c.num)
            ready[e["dir"]] = e["ready"]
    lines = []
    for entry, by_use in users.items():
        uses = "; ".join(f"{'starting from it' if use == 'start' else 'distilling from it'}: cell"
                         f"{'s' if len(nums) > 1 else ''} {sweep.cell_numbers(nums)}" for use, nums in by_use.items())
        state = "stored" if ready[entry] else "not stored yet: the first cell that needs it fine-tunes it, once"
        lines.append(f"baseline {entry}: {state} ({uses})")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m squeeze.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="as for python train.py -m: experiment=<preset>, model=a,b, compress=none,imp, ...")
    parser.add_argument("--json", action="store_true", help="the cells as a JSON list")
    parser.add_argument("-m", "--multirun", action="store_true", help="accepted and ignored: a plan is of a sweep")
    args = parser.parse_intermixed_args(argv)
    try:
        planned = plan(args.overrides)
    except (HydraException, OmegaConfBaseException, SqueezeError) as e:
        print(f"error: {config.error_line(e)}", file=sys.stderr)
        return 2
    print(json.dumps([asdict(c) for c in planned.cells], indent=1) if args.json else table(planned))
    return 0


if __name__ == "__main__":
    sys.exit(main())
