"""The resolvers squeeze's YAML uses and the sweeper's config schema, registered when the package is imported
(before Hydra composes); the run-wide checks on settings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


def chain_name(compress_cfg: Mapping | None) -> str:
    """'none', 'imp', 'pkd+imp+dq': how a compressor chain is named in directories, tags and tables."""
    return "+".join(used_compressors(compress_cfg)) or "none"


# Hydra records no single choice for a group given as a list (compress=[pkd,imp]), so sweep
# directories and W&B tags name the chain from the composed config: ${compress_chain:${compress}}.
if not OmegaConf.has_resolver("compress_chain"):
    OmegaConf.register_new_resolver("compress_chain", chain_name)


def run_group() -> str:
    """W&B group of a run: its sweep (the sweep directory's name) in a -m sweep, else model-task."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return "sweep-" + str(hydra_cfg.sweep.dir).rstrip("/").rsplit("/", 1)[-1]
    return f"{hydra_cfg.runtime.choices.get('model')}-{hydra_cfg.runtime.choices.get('task')}"


if not OmegaConf.has_resolver("run_group"):
    OmegaConf.register_new_resolver("run_group", run_group)


@dataclass
class SqueezeSweeperConf:
    """hydra/sweeper=squeeze (train.yaml selects it): Hydra's basic sweeper's settings plus a preset's rows and
    setups (hydra_plugins/squeeze_sweeper). Registered here, on import of squeeze, so that it is known before
    Hydra composes however the entry point was started."""

    _target_: str = "hydra_plugins.squeeze_sweeper.SqueezeSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None
    rows: Optional[List[str]] = None  # each a string of overrides that go together (one report row)
    setups: Optional[List[str]] = None  # each a string of overrides (a model × task pair), crossed with rows


ConfigStore.instance().store(group="hydra/sweeper", name="squeeze", node=SqueezeSweeperConf, provider="squeeze")


# -- run-wide settings, checked before anything loads ------------------------------------------------
def check_counts(trainer_cfg: Mapping, data_cfg: Mapping | None = None) -> None:
    """Step, epoch and batch counts that Lightning or the data would reject deep inside a run
    (with a traceback) are refused here, with the setting and the values it accepts."""
    from squeeze.errors import SqueezeError

    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def bad(key: str, value, accepted: str):
        return SqueezeError(f"{key}={value!r} is not allowed: give {accepted}")

    t = dict(trainer_cfg or {})
    if "max_steps" in t and not (whole(t["max_steps"]) and t["max_steps"] >= -1):
        raise bad("trainer.max_steps", t["max_steps"], "a step count ≥ 1, 0 (no training: evaluate as loaded) or -1 (no limit)")
    epochs = t.get("max_epochs")
    if epochs is not None and not (whole(epochs) and (epochs >= 1 or epochs == -1)):
        raise bad("trainer.max_epochs", epochs, "an epoch count ≥ 1 or -1 (no limit, stop by max_steps)")
    for key in ("accumulate_grad_batches", "log_every_n_steps"):
        if t.get(key) is not None and not (whole(t[key]) and t[key] >= 1):
            raise bad(f"trainer.{key}", t[key], "a whole number ≥ 1")
    if t.get("check_val_every_n_epoch") is not None and not (whole(t["check_val_every_n_epoch"])
                                                              and t["check_val_every_n_epoch"] >= 1):
        raise bad("trainer.check_val_every_n_epoch", t["check_val_every_n_epoch"], "a whole number ≥ 1 or null")
    interval = t.get("val_check_interval")
    if interval is not None and not ((whole(interval) and interval >= 1)
                                     or (isinstance(interval, float) and 0 < interval <= 1)):
        raise bad("trainer.val_check_interval", interval, "a fraction of an epoch in (0, 1] or a step count ≥ 1")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = t.get(key)
        if value is not None and not ((whole(value) and value >= 0)
                                      or (isinstance(value, float) and 0 <= value <= 1)):
            raise bad(f"trainer.{key}", value, "a batch count ≥ 0, a fraction in [0, 1] or null (all)")
    d = dict(data_cfg or {})
    for key in ("batch_size", "eval_batch_size"):
        if d.get(key) is not None and not (whole(d[key]) and d[key] >= 1):
            raise bad(f"task.data.{key}", d[key], "a whole number ≥ 1")
    for split, limit in dict(d.get("max_examples") or {}).items():
        if limit is not None and not (whole(limit) and limit >= 1):
            raise bad(f"task.data.max_examples.{split}", limit, "a row count ≥ 1 or null (all)")


# -- compressor settings in a mixed sweep --------------------------------------------------------------
_COMPRESSOR_SETTING = re.compile(r"^compress\.[A-Za-z_][\w-]*\.")


def lenient_compressor_settings(argv: list[str]) -> list[str]:
    """`compress.<name>.<key>=v` set once for a whole command line: `python train.py -m compress=none,imp
    compress.imp.end_step=10`. The `none` cell has no `compress.imp` node, and Hydra refuses a key that is not
    in the config, so such overrides are made `++` (set or add); a node that holds settings but no
    `_target_` is a compressor this cell does not use, and build_chain skips it. The sweeper
    (squeeze.sweeper) also drops them from the cells that do not use them, so no duplicate cells run."""
    return [f"++{arg}" if _COMPRESSOR_SETTING.match(arg) else arg for arg in argv]


def used_compressors(compress_cfg: Mapping | None) -> dict:
    """The entries of cfg.compress that build a compressor (a `_target_`), in order; settings given for
    a compressor the cell does not use are left out."""
    return {str(k): v for k, v in (compress_cfg or {}).items()
            if v is not None and (not isinstance(v, Mapping) or "_target_" in v)}
