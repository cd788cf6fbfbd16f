"""Checkpoint files are read as data, never run as code.

A Lightning `.ckpt` is a pickle, and `torch.load(..., weights_only=False)` calls whatever the file names while
reading it: `evaluate.py ckpt=<file>` or `ckpt_path=<file>` from someone else could run any code. squeeze reads
every checkpoint with torch's weights-only unpickler instead: tensors, numbers, strings, lists, tuples, dicts and
the few types in `SAFE_TYPES`. squeeze's own checkpoints (best, last, mid-epoch; every compressor's state) hold
nothing more (squeeze.hardware.checkpointing keeps the RNG states as tensors and tuples for this reason). A file
that needs more stops with one line, unless the run says `trust_checkpoint=true`.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from squeeze.errors import SqueezeError

FLAG = "trust_checkpoint"  # conf/train.yaml, conf/eval.yaml
_trusted = False  # the running entry point's trust_checkpoint (see `trusting`)


def safe_types() -> list[type]:
    """Lightning's hyper-parameter containers (save_hyperparameters): plain dict subclasses, nothing runs."""
    from lightning.fabric.utilities.data import AttributeDict as FabricAttributeDict
    from lightning.pytorch.utilities.parsing import AttributeDict

    return [FabricAttributeDict, AttributeDict]


@contextlib.contextmanager
def trusting(trust: Any) -> Iterator[None]:
    """Within: checkpoints loaded without an explicit `trust` follow the run's trust_checkpoint (the entry points
    set it; Lightning's own resume reads through squeeze.hardware.checkpointing.AtomicCheckpointIO, which asks here)."""
    global _trusted
    before, _trusted = _trusted, bool(trust)
    try:
        yield
    finally:
        _trusted = before


def trusted() -> bool:
    return _trusted


def load(path: str | Path, map_location: Any = "cpu", mmap: bool = False, trust: bool | None = None) -> Any:
    """torch.load of a checkpoint file, weights-only unless trusted; a refusal is one SqueezeError line."""
    if _trusted if trust is None else trust:
        return torch.load(str(path), map_location=map_location, mmap=mmap, weights_only=False)
    try:
        with torch.serialization.safe_globals(safe_types()):
            return torch.load(str(path), map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        raise SqueezeError(
            f"checkpoint {path} holds more than weights and plain data ({_needs(e)}): unpickling it could run "
            f"any code the file names, so it was not loaded; if you trust where it comes from, add {FLAG}=true"
        ) from None


def _needs(error: BaseException) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return f"it needs {found.group(1)}" if found else str(error).strip().splitlines()[0]
