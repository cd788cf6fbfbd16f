"""Where the teacher comes from: whatever squeeze.artifacts resolves (a finished run directory, a saved
model directory, an offline asset or a hub id), or the run's own model."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from squeeze import artifacts
from squeeze.errors import SqueezeError


def load_teacher(source, head: str, model: nn.Module, tokenizer) -> tuple[nn.Module, str, Path | None]:
    """(teacher, what to call it, its directory or None); the teacher's tokenizer must be the run's."""
    if source is None:
        return model, "the configured model", None
    source = str(source)
    found = artifacts.resolve(source, "teacher", accept=artifacts.MODELS)
    artifacts.require_head(found, head, "teacher")
    teacher, teacher_tokenizer = artifacts.load(found, head, "teacher")
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise SqueezeError(
            f"teacher {source} uses another tokenizer than the run's model ({len(teacher_tokenizer)} vs "
            f"{len(tokenizer)} tokens, or other ids); pass the model= the teacher was trained from, or "
            "student.from=model with a model of the teacher's tokenizer"
        )
    return teacher, source, found.model_dir
