"""The teacher's outputs on the training set, computed once and kept on disk (memory-mapped).

Distillation runs the frozen teacher on every training batch; a sweep over students (layers, α, T,
β) runs it on the same data again and again. With `teacher_cache=true` the outputs the losses need
(logits, or an LM's top-k log-probabilities, and the chosen layers' normalised hidden states) are
written once into .npy files under a directory named by the teacher's weights, the data and the
settings, so every later run with the same teacher and data reads them instead.

Batches carry no example index (squeeze/tasks/ keeps batches to what the model takes), so an
example is keyed by its content: a hash of its unpadded input ids (and token type ids). That key
survives shuffling, DDP sampling and re-padding, and two identical inputs share one teacher output,
which is exactly right since the teacher sees nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from squeeze.errors import SqueezeError

log = logging.getLogger("squeeze")
FORMAT = 1  # bump when the files change meaning: old caches are then simply not found
MARKER = ".complete"
INPUT_FIELDS = ("input_ids", "token_type_ids")
TARGET_FIELDS = ("logits", "top_logprobs", "top_indices", "hidden")


@dataclass(frozen=True)
class TargetSpec:
    """What the losses take from the teacher, and where.

    level          "sequence": one target per example (classification); "token": one per token
    pool           sequence level: the position whose hidden state is matched ("first" = [CLS],
                   "last" = the last non-pad token, which decoder classification heads read)
    teacher_layers hidden-state numbers matched by the patient loss (1 = first layer's output)
    student_layers the student's hidden-state numbers, pairwise with teacher_layers
    top_k          causal LM: keep the teacher's top-k log-probabilities (plus the rest's mass)
    temperature    the log-probabilities are taken at this temperature (only with top_k)
    attention      the last layer's self-attention distributions too (MiniLM's transfer); never cached:
                   [B, heads, T, T] per batch is far more than the cache is for
    """

    level: str = "sequence"
    pool: str = "first"
    teacher_layers: tuple[int, ...] = ()
    student_layers: tuple[int, ...] = ()
    top_k: int | None = None
    temperature: float = 1.0
    attention: bool = False

    @property
    def hidden(self) -> bool:
        return bool(self.teacher_layers)


@dataclass
class Targets:
    """The teacher's side of the losses for one batch: full logits, or top-k log-probs with their
    token ids; plus normalised hidden states [B, (T,) P, H] when the patient loss is on."""

    logits: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    top_indices: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    attention: torch.Tensor | None = None  # [B, heads, T, T], the last layer's; computed live, never cached

    def present(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in TARGET_FIELDS if getattr(self, k) is not None}


def example_keys(batch: dict[str, torch.Tensor]) -> list[int]:
    """One 64-bit key per example: a hash of its input ids (and token type ids) where attended."""
    mask = batch["attention_mask"].bool().cpu() if "attention_mask" in batch else None
    fields = [batch[k].cpu() for k in INPUT_FIELDS if k in batch]
    keys = []
    for i in range(fields[0].shape[0]):
        h = hashlib.blake2b(digest_size=8)
        for values in fields:
            row = values[i][mask[i]] if mask is not None else values[i]
            h.update(row.to(torch.int64).numpy().tobytes())
        keys.append(int.from_bytes(h.digest(), "little"))
    return keys


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of a model's weights and their names: the teacher's identity, whatever it was loaded from."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(teacher: str, keys: Iterable[int], spec: TargetSpec, teacher_dtype: str) -> str:
    """The cache's directory name: teacher weights + the set of training examples + the settings."""
    data = hashlib.blake2b(np.array(sorted(keys), dtype=np.uint64).tobytes(), digest_size=16).hexdigest()
    settings = asdict(spec)
    settings.pop("student_layers")  # the student's side does not change what the teacher outputs
    settings.pop("attention")  # never cached (a run that wants it has no cache)
    if spec.top_k is None:
        settings.pop("temperature")  # raw logits are stored; T is applied in the loss
    blob = json.dumps({"format": FORMAT, "teacher": teacher, "data": data, "dtype": teacher_dtype, **settings},
                      sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=12).hexdigest()


# -- rows: a batch's targets as one row per example (sequence) or per attended token ---------------
def to_rows(targets: Targets, mask: torch.Tensor, level: str) -> dict[str, np.ndarray]:
    rows = {}
    keep = mask.bool()
    for name, tensor in targets.present().items():
        flat = (tensor if level == "sequence" else tensor[keep]).detach().cpu()
        rows[name] = flat.numpy().astype(np.int32) if name == "top_indices" else flat.float().numpy()
    return rows


def from_rows(rows: dict[str, np.ndarray], mask: torch.Tensor, level: str, device) -> Targets:
    out = Targets()
    keep = mask.bool()
    for name, array in rows.items():
        values = torch.from_numpy(array)
        if name == "top_indices":
            values = values.long()
        if level == "token":
            full = values.new_zeros((*keep.shape, *values.shape[1:]))
            full[keep.cpu()] = values  # row-major order of the mask = the rows' order
            values = full
        setattr(out, name, values.to(device, non_blocking=True))
    return out


class TeacherCache:
    """A finished cache directory, opened memory-mapped; `targets(batch)` looks a batch up."""

    def __init__(self, directory: str | Path, spec: TargetSpec):
        self.directory = Path(directory)
        self.spec = spec
        meta = json.loads((self.directory / "meta.json").read_text())
        self.names = meta["arrays"]
        self.arrays = {n: np.load(self.directory / f"{n}.npy", mmap_mode="r") for n in self.names}
        keys = np.load(self.directory / "keys.npy")
        self.starts = np.load(self.directory / "starts.npy")
        self.lengths = np.load(self.directory / "lengths.npy")
        self.index = {int(k): i for i, k in enumerate(keys)}

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())

    def targets(self, batch: dict[str, torch.Tensor]) -> Targets:
        mask = batch["attention_mask"]
        examples = []
        for key in example_keys(batch):
            i = self.index.get(key)
            if i is None:
                raise SqueezeError(
                    f"teacher cache {self.directory} has no entry for a training example (the data changed "
                    "under the same key); delete that directory and run again"
                )
            examples.append(i)
        if self.spec.level == "sequence":
            rows_at = self.starts[examples]
        else:
            want = mask.sum(-1).cpu().numpy()
            if not np.array_equal(self.lengths[examples], want):
                raise SqueezeError(f"teacher cache {self.directory} holds other lengths for this batch's examples; "
                                   "delete that directory and run again")
            rows_at = np.concatenate([np.arange(self.starts[i], self.starts[i] + self.lengths[i]) for i in examples])
        rows = {n: np.asarray(a[rows_at]) for n, a in self.arrays.items()}
        return from_rows(rows, mask, self.spec.level, mask.device)


def build(
    directory: str | Path,
    batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
    compute: Callable[[dict[str, torch.Tensor]], Targets],
    spec: TargetSpec,
    meta: dict[str, Any],
) -> None:
    """Run `compute` (the teacher) over every batch once and write the rows. Written into a
    temporary directory and renamed into place, so a killed build never leaves a half cache."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # First pass without the teacher: how many examples and rows, to size the memory maps.
        n_examples = n_rows = 0
        for batch in batches():
            n_examples += batch["attention_mask"].shape[0]
            n_rows += int(batch["attention_mask"].sum()) if spec.level == "token" else batch["attention_mask"].shape[0]
        keys = np.zeros(n_examples, dtype=np.uint64)
        starts = np.zeros(n_examples, dtype=np.int64)
        lengths = np.zeros(n_examples, dtype=np.int64)
        arrays: dict[str, np.ndarray] = {}
        example = row = 0
        for batch in batches():
            mask = batch["attention_mask"]
            rows = to_rows(compute(batch), mask, spec.level)
            if not arrays:
                for name, values in rows.items():
                    arrays[name] = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=values.dtype,
                                                             shape=(n_rows, *values.shape[1:]))
            n = next(iter(rows.values())).shape[0]
            for name, values in rows.items():
                arrays[name][row : row + n] = values
            per_example = mask.sum(-1).cpu().numpy() if spec.level == "token" else np.ones(mask.shape[0], np.int64)
            b = len(per_example)
            keys[example : example + b] = example_keys(batch)
            lengths[example : example + b] = per_example
            starts[example : example + b] = row + np.concatenate([[0], np.cumsum(per_example)[:-1]])
            example, row = example + b, row + n
        if (example, row) != (n_examples, n_rows):
            raise SqueezeError("the training data changed between two passes over it; teacher cache not written")
        for array in arrays.values():
            array.flush()
        np.save(tmp / "keys.npy", keys)
        np.save(tmp / "starts.npy", starts)
        np.save(tmp / "lengths.npy", lengths)
        info = {**meta, "arrays": sorted(arrays), "examples": n_examples, "rows": n_rows, "spec": asdict(spec)}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        (tmp / MARKER).touch()
        del arrays
        try:
            tmp.rename(directory)
        except OSError:
            if not is_complete(directory):  # another run finished the same cache first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / MARKER).is_file()
