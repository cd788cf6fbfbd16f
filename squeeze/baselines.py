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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, OmegaConf

from squeeze import assets, loggers
from squeeze.errors import SqueezeError
from squeeze.record import read_record

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
    return record if record.get("status") == "ok" and (entry / "model").is_dir() else None


def obtain(cfg: DictConfig, run_dir: Path, train: Callable[[DictConfig, Path], dict[str, Any]],
           overrides: Mapping[str, Any] | None = None) -> Baseline:
    """The stored baseline for this cell's settings (+ overrides), trained with `train(config, entry_dir)`
    when the store does not hold it yet."""
    config = baseline_config(cfg, run_dir, overrides)
    key = key_of(config)
    names = f"{_slug(config['model'].get('name'))}_{_slug(config['task'].get('name'))}"
    store = store_dir(cfg)
    entry = store / f"{names}_{key}"
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
    keys = list(grid)
    values = [list(v) if isinstance(v, (list, tuple)) else [v] for v in (grid[k] for k in keys)]
    best: tuple[float, Baseline] | None = None
    for combination in itertools.product(*values):
        found = obtain(cfg, run_dir, train, dict(zip(keys, combination)))
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
