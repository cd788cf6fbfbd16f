"""The saved model directory (`<run>/model`): how a (compressed) model is written and read back.

A plain model is a transformers directory (`save_pretrained`), loadable without squeeze. Compressed
formats (sparse weights, packed integers) are added here, so that `evaluate.py` reads any of them
through `load` and the size on disk is the size of what was really written.
"""

from __future__ import annotations

from pathlib import Path

from squeeze import models


def save(model, tokenizer, directory: str | Path) -> None:
    directory = Path(directory)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def load(directory: str | Path, head: str):
    """The model saved in `directory`, with the head it was trained with."""
    return models.load_saved(directory, head)
