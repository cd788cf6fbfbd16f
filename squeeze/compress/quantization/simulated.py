"""`compress=int8sim`: post-training, zero-shot simulated int8 (the nanoGPT study's int8 row).

Each weight matrix is rounded to int8 with one scale per tensor (S = max|W| / 127), clamped to the chosen integer
range, and dequantized straight back to float, rounded through `dtype` (bf16 in the study): the model keeps float
weights that lie on the int8 grid; activations are untouched and nothing trains. It measures what int8 weights
cost in quality, not what they save: the saved model is float and as large as before (weight-only int8 with its
kernels and packed storage is compress=int8wo).

The clamp range is a setting because the study compared the two: [-127, 127] is symmetric, [-128, 127] the int8
type's full range. With S = max|W| / 127 no weight rounds beyond ±127, so the two agree; with `scale_max: 128`
(S = max|W| / 128) the largest weights round to ±128 and the clamp decides what they become. The record counts the
weights the clamp changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from squeeze.compress import Compressor
from squeeze.compress.quantization.base import select_layers
from squeeze.errors import SqueezeError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class SimulatedInt8(Compressor):
    """Weights rounded to int8 per tensor and dequantized back to float after training; see the module docstring."""

    name = "int8sim"
    after_training = True  # acts on the fine-tuned weights only: a sweep cell starts from the stored baseline
    float_weights = True  # rounds float weights in place: before any compressor that leaves integer weights

    def __init__(self, label: str | None = None, clamp: Sequence[int] = (-127, 127), scale_max: int = 127,
                 dtype: str = "bfloat16", embeddings: bool = False, exclude: Sequence[str] = ()):
        where = f"compress.{self.name}"
        lo, hi = (int(v) for v in clamp) if len(clamp) == 2 else (None, None)
        if lo is None or not (-128 <= lo < 0 < hi <= 127):
            raise SqueezeError(f"{where}.clamp={list(clamp)}: give [low, high] within int8, e.g. [-127, 127] "
                               "(symmetric) or [-128, 127] (the int8 type's full range)")
        if scale_max not in (127, 128):
            raise SqueezeError(f"{where}.scale_max={scale_max}: give 127 (S = max|W| / 127) or 128")
        if dtype not in DTYPES:
            raise SqueezeError(f"{where}.dtype={dtype!r} is not one of {list(DTYPES)}")
        self.label, self.clamp, self.scale_max, self.dtype = label, (lo, hi), scale_max, dtype
        self.embeddings, self.exclude = embeddings, list(exclude)
        self._stats: dict[str, Any] = {}

    def finalize(self, model):
        layers = select_layers(model, self.embeddings, self.exclude)
        if not layers:
            raise SqueezeError(f"compress.{self.name}: no weight matrix to quantize (exclude={self.exclude})")
        changed = clamped = total = 0
        error_sq = norm_sq = 0.0
        seen: set[int] = set()
        with torch.no_grad():
            for module in layers.values():
                weight = module.weight
                if id(weight) in seen:  # a tied weight (GPT-2's lm_head and wte) is rounded once
                    continue
                seen.add(id(weight))
                simulated, n_clamped = simulate(weight, self.clamp, self.scale_max, DTYPES[self.dtype])
                changed += int((simulated != weight).sum())
                clamped += n_clamped
                total += weight.numel()
                error_sq += float((simulated.double() - weight.double()).pow(2).sum())
                norm_sq += float(weight.double().pow(2).sum())
                weight.copy_(simulated)
        self._stats = {"layers": len(seen), "weights": total, "weights_changed": changed, "weights_clamped": clamped,
                       "relative_error": (error_sq / norm_sq) ** 0.5 if norm_sq else 0.0}
        return model

    def summary(self) -> dict[str, Any]:
        return {"clamp": list(self.clamp), "scale": f"max|W| / {self.scale_max} per tensor", "dtype": self.dtype,
                "embeddings": self.embeddings, "exclude": self.exclude, "activations": "untouched",
                "storage": "float (simulated: the saved model is as large as before)", **self._stats}


def simulate(weight: torch.Tensor, clamp: tuple[int, int], scale_max: int, dtype: torch.dtype
             ) -> tuple[torch.Tensor, int]:
    """`weight` rounded to the int8 grid of one per-tensor scale, clamped, dequantized and rounded through `dtype`;
    and how many entries the clamp changed."""
    w = weight.detach().float()
    scale = w.abs().max() / scale_max
    if scale == 0:
        return weight.clone(), 0
    q = torch.round(w / scale)
    clamped = q.clamp(*clamp)
    return (clamped * scale).to(dtype).to(weight.dtype), int((clamped != q).sum())
