"""Post-training quantization: dynamic int8 (`compress=dq`) and weight-only int8/int4 (`int8wo`,
`int4wo`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from squeeze.compress.quantization.base import _Quantization
from squeeze.errors import SqueezeError
from squeeze.formats.quantized_layers import dynamic_kernels_available


class DynamicQuantization(_Quantization):
    """Post-training dynamic int8 (`compress=dq`): int8 weights; activations quantized on each call.
    `backend=fbgemm` (torch's CPU kernel, the fastest here) or `torchao` (also on GPU)."""

    after_training = True

    def __init__(self, bits: int = 8, granularity: str = "channel", group_size: int | None = None,
                 backend: str = "fbgemm", embeddings: bool = True, exclude: Sequence[str] = (),
                 lm_head: bool = True):
        super().__init__(bits, granularity, group_size, "symmetric", embeddings, exclude, lm_head)
        self.backend = backend

    @property
    def kernel(self) -> str:
        return f"dynamic_{self.backend}"

    def check(self) -> None:
        super().check()
        if self.bits != 8:
            raise SqueezeError(f"{self.where}.bits={self.bits}: dynamic quantization is int8 only; "
                               "use compress=int4wo for 4-bit weights")
        if self.group_size is not None:
            raise SqueezeError(f"{self.where}.group_size={self.group_size}: the int8 dynamic kernels take one scale "
                               "per channel or per tensor; use compress=int8wo for group-wise scales")
        if self.backend not in ("fbgemm", "torchao"):
            raise SqueezeError(f"{self.where}.backend={self.backend!r} is not one of ['fbgemm', 'torchao']")
        if self.backend == "fbgemm" and (why := dynamic_kernels_available()):
            raise SqueezeError(f"{self.where}: {why}; use compress.dq.backend=torchao or compress=int8wo")

    def setup(self, trainer, pl_module, stage: str) -> None:
        device = trainer.strategy.root_device
        if self.backend == "fbgemm" and device.type != "cpu":
            raise SqueezeError(f"compress=dq (fbgemm) has CPU kernels only, but this run uses {device.type}; "
                               "use hardware=cpu, compress.dq.backend=torchao, or compress=int8wo / int4wo on GPU")

    def finalize(self, model):
        device = next(model.parameters()).device
        if self.backend == "fbgemm" and device.type != "cpu":
            raise SqueezeError(f"compress=dq (fbgemm) has CPU kernels only, but the model is on {device.type}; "
                               "use hardware=cpu, compress.dq.backend=torchao, or compress=int8wo")
        return self.convert(model)

    def summary(self) -> dict[str, Any]:
        from squeeze.formats.quantized_layers import reduce_range

        bits = 7 if self.backend == "fbgemm" and reduce_range() else 8
        return {**super().summary(), "backend": self.backend,
                "activations": f"int{bits} dynamic per call (per tensor)" if bits == 8 else
                               "int8 dynamic per call, 7-bit range (this CPU has no VNNI)"}


class WeightOnlyQuantization(_Quantization):
    """Post-training weight-only quantization (`compress=int8wo`, `compress=int4wo`): integer weights
    with per-channel or group-wise scales; activations stay in float. `cpu_kernel`: "auto" runs torch's
    int8/int4 CPU kernels (bf16 activations around the matmul) where a layer's scheme fits them,
    "dequantize" the whole weight dequantized per call, as before them (for comparisons). It is saved
    with the model, so an evaluation of the saved model runs the same path."""

    after_training = True

    def __init__(self, bits: int = 8, granularity: str = "channel", group_size: int | None = None,
                 weights: str = "symmetric", embeddings: bool = True, exclude: Sequence[str] = (),
                 lm_head: bool = True, cpu_kernel: str = "auto"):
        super().__init__(bits, granularity, group_size, weights, embeddings, exclude, lm_head)
        self.cpu_kernel = cpu_kernel

    def finalize(self, model):
        return self.convert(model)
