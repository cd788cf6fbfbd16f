"""The resolvers squeeze's YAML uses, registered when the package is imported (before Hydra composes)."""

from __future__ import annotations

from typing import Mapping

from omegaconf import OmegaConf


def chain_name(compress_cfg: Mapping | None) -> str:
    """'none', 'imp', 'pkd+imp+dq': how a compressor chain is named in directories, tags and tables."""
    names = [str(k) for k, v in (compress_cfg or {}).items() if v is not None]
    return "+".join(names) or "none"


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
