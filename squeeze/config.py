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
