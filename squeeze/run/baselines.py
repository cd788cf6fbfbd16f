"""The store of fine-tuned baselines: each model × task × training setting fine-tuned once, reused by every
cell and every later sweep that needs it.

Two kinds of cells need the plain fine-tuned model rather than a training run of their own:
  - post-training chains (`compress=none,dq,int8wo,int4wo`): fine-tune once, quantize that model three ways;
  - distillation with `teacher=auto`: the teacher is this model × task's fine-tuned baseline.

An entry is a complete squeeze run directory (result.json, model/, checkpoints/, csv/) under
`<store>/<model>_<task>_<key>`, where key is a hash of the resolved settings that shape the fine-tuned
weights (model, task, trainer, optimizer, scheduler, seed; not loggers, callbacks' paths, perf or compress).
It is ready when its result.json says "ok". It is trained under an exclusive file lock, so cells launched
in parallel train it once and the others wait; a killed training resumes from the entry's own last.ckpt
the next time any cell asks for it. The key also holds FINE_TUNING_VERSION, so an entry trained by code that
fine-tuned differently is never reused: it is trained again under a new key (the old one stays on disk until
deleted), and every record says which version trained its model (`fine_tuning_version`, and
`baseline.fine_tuning_version` for a cell on a stored baseline).

The run's side: `reused` says whether a cell's chain starts from the store, `on_stored` runs the cell there (its
chain applied to the stored model, as evaluate.py would), `auto_teachers` resolves `teacher=auto`. The recipe hands
in its own train and evaluate, so the store does not import the recipe.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, OmegaConf, open_dict

from squeeze import artifacts, assets
from squeeze.compress import Compressor
from squeeze.config import used_compressors
from squeeze.errors import SqueezeError
from squeeze.hardware import checkpointing, sharding
from squeeze.record import new_record, read_record, write_record
from squeeze.run import guard, loggers

log = logging.getLogger("squeeze")
KEY_SECTIONS = ("model", "task", "trainer", "optimizer", "scheduler", "seed")
# Bump on any change to squeeze that alters a fine-tuned model for the same config (data order, splits, the
# loss, optimizer or scheduler wiring, mixed precision, the best-checkpoint rule): stored baselines trained
# before it are not reused. 1: the store's first versioned key (held-out splits by split_seed, December 2026).
FINE_TUNING_VERSION = 1
RUN_PLACEHOLDER = "<run_dir>"
REUSE_CHOICES = (True, False, "multirun")


@dataclass
class Baseline:
    dir: Path
    key: str
    record: dict[str, Any]
    trained_here: bool  # this cell trained it (its cost is this cell's); else it was in the store already

    def summary(self) -> dict[str, Any]:
        """What a cell records under `baseline` (and the report reads to count a baseline's cost once)."""
        energy = self.record.get("energy") or {}
        return {"dir": str(self.dir), "key": self.key, "trained_here": self.trained_here,
                "fine_tuning_version": self.record.get("fine_tuning_version"),
                "train_seconds": self.record.get("train_seconds"), "kwh": energy.get("kwh"),
                "co2_kg": energy.get("co2_kg"), "validation": self.record.get("validation")}


def reuse_enabled(cfg: DictConfig, multirun: bool) -> bool:
    reuse = (cfg.get("baseline") or {}).get("reuse", "multirun")
    if reuse not in REUSE_CHOICES:
        raise SqueezeError(f"baseline.reuse={reuse!r} is not one of true, false, multirun")
    return reuse is True or (reuse == "multirun" and multirun)


def store_dir(cfg: DictConfig) -> Path:
    where = (cfg.get("baseline") or {}).get("store_dir")
    return Path(where).expanduser() if where else assets.cache_dir() / "baselines"


def baseline_config(cfg: DictConfig, run_dir: Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """This cell's config as a plain `compress=none` fine-tuning run (resolved; the cell's run directory
    replaced by a placeholder), with `overrides` (dotted keys) applied."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config = _replace_strings(config, str(run_dir), RUN_PLACEHOLDER)
    config["compress"] = {"none": None}
    config["perf"] = None  # the cells that use it measure their own model
    config["ckpt_path"] = "last_or_new"  # a baseline killed while training resumes from its own checkpoint
    config.pop("draft", None)  # evaluate.py's speculative draft: nothing to do with fine-tuning
    for dotted, value in (overrides or {}).items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise SqueezeError(f"baseline setting {dotted}: the config has no section {p!r}")
            node = node[p]
        if leaf not in node:
            raise SqueezeError(f"baseline setting {dotted}: the config has no key {leaf!r}")
        node[leaf] = value
    return config


def key_of(config: Mapping[str, Any]) -> str:
    shaping = {**{k: config.get(k) for k in KEY_SECTIONS}, "fine_tuning_version": FINE_TUNING_VERSION}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ready(entry: Path) -> dict[str, Any] | None:
    """The entry's record when it finished; None when it is absent, running, killed or failed."""
    try:
        record = read_record(entry)
    except (OSError, ValueError):
        return None
    return record if record.get("status") == "ok" and (entry / artifacts.RUN_MODEL).is_dir() else None


def store_entry(cfg: DictConfig, run_dir: Path,
                overrides: Mapping[str, Any] | None = None) -> tuple[Path, str, dict[str, Any]]:
    """Where the store keeps the baseline of this cell's settings (+ overrides): the entry's directory, its key and
    its fine-tuning config (baseline_config)."""
    config = baseline_config(cfg, run_dir, overrides)
    key = key_of(config)
    names = f"{_slug(config['model'].get('name'))}_{_slug(config['task'].get('name'))}"
    return store_dir(cfg) / f"{names}_{key}", key, config


def obtain(cfg: DictConfig, run_dir: Path, train: Callable[[DictConfig, Path], dict[str, Any]],
           overrides: Mapping[str, Any] | None = None) -> Baseline:
    """The stored baseline for this cell's settings (+ overrides), trained with `train(config, entry_dir)`
    when the store does not hold it yet."""
    entry, key, config = store_entry(cfg, run_dir, overrides)
    store = entry.parent
    record = ready(entry)
    if record is not None:
        log.info("baseline %s: reusing %s", key, entry)
        return Baseline(entry, key, record, trained_here=False)
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SqueezeError(f"baseline store {store} cannot be created ({e.strerror or e}); set "
                           "baseline.store_dir=<a writable directory>") from e
    with _locked(store / f"{entry.name}.lock", entry):
        record = ready(entry)  # another process may have trained it while this one waited
        if record is not None:
            log.info("baseline %s: trained meanwhile by another cell, reusing %s", key, entry)
            return Baseline(entry, key, record, trained_here=False)
        log.info("baseline %s: not in the store, fine-tuning it into %s", key, entry)
        config = _replace_strings(config, RUN_PLACEHOLDER, str(entry))
        # Logged once, as itself: the cell's resolved logger settings would name and group it as that cell's row.
        name = f"{config['model'].get('name')}-{config['task'].get('name')} baseline {key}"
        config["logger"] = loggers.for_baseline(config.get("logger"), name)
        record = train(OmegaConf.create(config), entry)
    if record.get("status") != "ok":
        raise SqueezeError(f"the fine-tuned baseline this cell needs failed to train ({record.get('error')}); "
                           f"its record is {entry / 'result.json'}; fix that and rerun (it resumes)")
    # A finished entry is its model/: the Lightning checkpoints (weights + optimizer state, 3× the model) only
    # served resuming its training.
    shutil.rmtree(entry / "checkpoints", ignore_errors=True)
    return Baseline(entry, key, record, trained_here=True)


def best_of(cfg: DictConfig, run_dir: Path, train: Callable[[DictConfig, Path], dict[str, Any]],
            grid: Mapping[str, Any]) -> Baseline:
    """The baseline with the best validation score over a grid of settings ({"optimizer.lr": [...]}): each
    one obtained from (or trained into) the store; ties keep the first."""
    best: tuple[float, Baseline] | None = None
    for settings in grid_settings(grid):
        found = obtain(cfg, run_dir, train, settings)
        validation = found.record.get("validation") or {}
        if validation.get("best") is None:
            raise SqueezeError(f"baseline {found.dir} has no validation score to choose the best by; its task "
                               "needs a validation split")
        score = float(validation["best"]) * (1 if validation.get("mode", "max") == "max" else -1)
        if best is None or score > best[0]:
            best = (score, found)
    if best is None:
        raise SqueezeError("teacher_best_of is empty; give at least one setting, e.g. {optimizer.lr: [3e-5]}")
    return best[1]


def grid_settings(grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of a grid of settings ({"optimizer.lr": [...], "seed": 42}), in best_of's order."""
    keys = list(grid)
    values = [list(v) if isinstance(v, (list, tuple)) else [v] for v in (grid[k] for k in keys)]
    return [dict(zip(keys, combination)) for combination in itertools.product(*values)]


# -- a cell on the store: the recipe hands in its own train and evaluate (Train, Evaluate) ----------------
Train = Callable[..., dict[str, Any]]  # recipe._train(cfg, record, cell, as_baseline=False)
Evaluate = Callable[..., dict[str, Any]]  # recipe._evaluate(cfg, record, cell)


def reused(cfg: DictConfig, chain: list[Compressor], cell) -> bool:
    """A chain whose compressors all act on the fine-tuned weights (none, dq, int8wo, int4wo, smoothquant, gptq,
    wanda, sparsegpt): in a sweep (or with baseline.reuse=true) that fine-tuned model comes from the store,
    trained once. rows and heads prune before fine-tuning, so they fine-tune their own model. `chain`: the cell's
    compressors, or their classes (after_training is a class attribute: squeeze.plan decides without building)."""
    if not all(c.after_training for c in chain) or cfg.trainer.get("max_steps", -1) == 0:
        return False
    if cfg.get("ckpt_path") not in (None, "last_or_new"):  # resuming this cell's own checkpoint on purpose
        return False
    if checkpointing.last_checkpoint(cell.run_dir) is not None:
        return False  # a cell killed while fine-tuning in its own directory goes on there
    strategy = str(cfg.trainer.get("strategy") or "")
    if strategy.startswith("ddp") or sharding.is_sharded(strategy):  # ranks would each train the store entry
        return False
    return reuse_enabled(cfg, cell.multirun)


def on_stored(cfg: DictConfig, chain: list[Compressor], record: dict[str, Any], cell, train: Train,
              evaluate: Evaluate) -> dict[str, Any]:
    """The cell's chain applied to the stored fine-tuned baseline, then tested, saved and measured like an
    `evaluate.py ckpt=<baseline> compress=<chain>` run. Its train time and energy are the model's whole cost
    (the baseline's training + this cell's work); `spent` is what this cell itself cost (the report's totals)."""
    base = obtain(cfg, cell.run_dir, _fine_tuner(cell, train))
    with open_dict(cfg):
        cfg.ckpt = str(base.dir)
    evaluate(cfg, record, cell)
    if not chain:  # the baseline row itself: its model in its run directory too (evaluate.py ckpt=<this cell>)
        link_tree(base.dir / artifacts.RUN_MODEL, cell.run_dir / artifacts.RUN_MODEL)
    own_energy = record.get("energy")
    record.update(baseline=base.summary(), train_seconds=base.record.get("train_seconds"),
                  train_tokens=base.record.get("train_tokens"),
                  train_tokens_per_s=base.record.get("train_tokens_per_s"),
                  # a compressed model's own validation pass (evaluate); the baseline row is the stored model
                  validation=record.get("validation") or base.record.get("validation"),
                  energy=merged_energy(base.record.get("energy"), own_energy))
    record["spent"] = spent(base, own_energy)
    if not chain:  # the baseline row: its own cost is the fine-tuning it is
        record["cost"]["own"] = dict(record["cost"]["total"])
    return record


def auto_teachers(cfg: DictConfig, record: dict[str, Any], cell, train: Train) -> Baseline | None:
    """`teacher: auto` on a distillation compressor: the stored fine-tuned baseline of this model × task
    (this cell's training settings, or the best by validation over `teacher_best_of`), trained once."""
    teacher = None
    for name in used_compressors(cfg.get("compress")):
        node = cfg.compress[name]
        grid = node.get("teacher_best_of")
        if node.get("teacher") != "auto":
            if grid is not None:
                raise SqueezeError(f"compress.{name}.teacher_best_of chooses among stored baselines, so it needs "
                                   f"compress.{name}.teacher=auto (it is {node.get('teacher')!r})")
            continue
        grid = OmegaConf.to_container(grid, resolve=True) if grid is not None else None
        fine_tune = _fine_tuner(cell, train)
        base = best_of(cfg, cell.run_dir, fine_tune, grid) if grid else obtain(cfg, cell.run_dir, fine_tune)
        with open_dict(node):
            node.teacher = str(base.dir)
        record["baseline"] = base.summary()
        teacher = base
    return teacher


def _fine_tuner(cell, train: Train) -> Callable[[DictConfig, Path], dict[str, Any]]:
    """`obtain`'s train: a store entry fine-tuned by the recipe as a plain run in the entry's directory, its
    record written as any run's."""
    def fine_tune(cfg: DictConfig, entry: Path) -> dict[str, Any]:
        record = new_record(entry, {**cell.record_choices(cfg.get("compress")), "compress": "none"},
                            OmegaConf.to_container(cfg), cfg.get("seed"))
        write_record(entry, record)
        return guard.guarded(lambda: train(cfg, record, replace(cell, run_dir=entry), as_baseline=True), record,
                             entry, multirun=True)
    return fine_tune

def merged_energy(baseline: dict[str, Any] | None, own: dict[str, Any] | None) -> dict[str, Any] | None:
    """The model's whole cost: the baseline's training phase plus this cell's own phases (its evaluation)."""
    if not baseline or not own:
        return own or baseline
    phases = {**{f"baseline_{k}": v for k, v in (baseline.get("phases") or {}).items()}, **(own.get("phases") or {})}
    kwh = float(baseline.get("kwh") or 0.0) + float(own.get("kwh") or 0.0)
    return {**own, "kwh": kwh, "co2_kg": kwh * float(own.get("co2_kg_per_kwh") or 0.0), "phases": phases}


def spent(base: Baseline, own_energy: dict[str, Any] | None, own_train_seconds: float = 0.0):
    """What this cell cost: its own work, plus the baseline's training when this cell did it."""
    train = own_train_seconds + (float(base.record.get("train_seconds") or 0.0) if base.trained_here else 0.0)
    kwh = (own_energy or {}).get("kwh")
    if base.trained_here and (base.record.get("energy") or {}).get("kwh") is not None:
        kwh = float(kwh or 0.0) + float(base.record["energy"]["kwh"])
    factor = (own_energy or base.record.get("energy") or {}).get("co2_kg_per_kwh")
    return {"train_seconds": train, "kwh": kwh, "co2_kg": None if kwh is None or factor is None else kwh * factor}


def link_tree(source: Path, target: Path) -> None:
    """A copy made of hard links where the file system allows (no second copy of the weights on disk)."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, copy_function=link)


@contextlib.contextmanager
def _locked(path: Path, entry: Path):
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("baseline %s is being trained by another process; waiting for it", entry)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _replace_strings(node: Any, old: str, new: str) -> Any:
    if isinstance(node, dict):
        return {k: _replace_strings(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_strings(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old.rstrip("/") + "/")):
        return new + node[len(old.rstrip("/")):]  # a path under `old`, not any string that contains it
    return node


def _slug(name: Any) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in str(name or "model").split("/")[-1])
