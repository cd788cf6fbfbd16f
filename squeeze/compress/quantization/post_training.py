"""Post-training quantization: dynamic int8 (`compress=dq`) and weight-only int8/int4 (`int8wo`,
`int4wo`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from squeeze.compress.quantization.base import _Quantization, check_scheme
from squeeze.errors import SqueezeError
from squeeze.formats.quantized_layers import dynamic_kernels_available, reduce_range


class DynamicQuantization(_Quantization):
    """Post-training dynamic int8 (`compress=dq`): integer weights; activations quantized to int8 on each call,
    one scale per token (`activations=token`) or per tensor. `backend=fbgemm` (torch's CPU kernel, the fastest
    here) or `torchao` (also on GPU; per token). `bits=7` stores weights on ±63 so that fbgemm keeps 8-bit
    activations on CPUs without VNNI too (quantized_layers.activation_bits); `bits=8` drops them to 7 there;
    `auto` (default) takes 8 on a CPU with VNNI and 7 without."""

    after_training = True

    def __init__(self, bits: int | str = "auto", granularity: str = "channel", group_size: int | None = None,
                 backend: str = "fbgemm", embeddings: bool = True, exclude: Sequence[str] = (),
                 lm_head: bool = True, activations: str = "token"):
        self.bits_asked = bits
        if bits == "auto":  # the most bits that keep 8-bit activations on the CPU that quantizes
            bits = 7 if backend == "fbgemm" and reduce_range() else 8
        super().__init__(bits, granularity, group_size, "symmetric", embeddings, exclude, lm_head)
        self.backend = backend
        self.activations = activations

    @classmethod
    def check_values(cls, name: str, settings: dict) -> None:
        """The settings' values, before anything loads (squeeze.config): a throwaway instance checks them."""
        known = {k: v for k, v in settings.items() if k != "label"}
        try:
            probe = cls(**known)
        except TypeError:
            return  # an unknown key: the key checks name it
        probe.name = name
        probe.check()

    @property
    def kernel(self) -> str:
        return "dynamic_fbgemm_token" if self.backend == "fbgemm" and self.activations == "token" else \
            f"dynamic_{self.backend}"

    def check(self) -> None:
        if self.bits not in (7, 8) or isinstance(self.bits, bool):
            raise SqueezeError(f"{self.where}.bits={self.bits_asked!r}: dynamic quantization takes auto, 8 or 7 (int7 "
                               "weights keep 8-bit activations on CPUs without VNNI); use compress=int4wo for 4 bits")
        check_scheme(self.where, 8, self.granularity, self.group_size)
        if self.group_size is not None:
            raise SqueezeError(f"{self.where}.group_size={self.group_size}: the int8 dynamic kernels take one scale "
                               "per channel or per tensor; use compress=int8wo for group-wise scales")
        if self.backend not in ("fbgemm", "torchao"):
            raise SqueezeError(f"{self.where}.backend={self.backend!r} is not one of ['fbgemm', 'torchao']")
        if self.activations not in ("token", "tensor"):
            raise SqueezeError(f"{self.where}.activations={self.activations!r} is not one of ['token', 'tensor']")
        if self.backend == "torchao" and self.activations != "token":
            raise SqueezeError(f"{self.where}.activations=tensor: torchao's dynamic int8 scales activations per "
                               "token only; use compress.dq.backend=fbgemm for one scale per tensor")
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
        from squeeze.formats.quantized_layers import activation_bits, cpu_has_int8_dot

        bits = activation_bits(self.bits) if self.backend == "fbgemm" else 8
        where = "per token" if self.activations == "token" else "per tensor"
        cpu = "VNNI" if cpu_has_int8_dot() else "no VNNI (AVX2)"
        return {**super().summary(), "bits_asked": self.bits_asked, "backend": self.backend,
                "activations": self.activations,
                "activation_bits": bits, "cpu_int8_dot": cpu,
                "activations_described": f"int{bits} dynamic per call ({where})" + (
                    "; 7-bit range: this CPU has no VNNI and the weights are int8 (compress.dq.bits=7 keeps 8)"
                    if bits == 7 else "")}


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
