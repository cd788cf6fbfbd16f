"""GPTQ (Frantar et al. 2022): quantize a weight matrix column by column, pushing each column's
rounding error onto the columns not yet quantized so that the layer's output on calibration inputs,
not its weights, stays close: min ||XWᵀ − XŴᵀ||², whose curvature is the Hessian H = 2XXᵀ/n.

With U the upper Cholesky factor of H⁻¹, quantizing column j with error e_j = (w_j − q_j)/U_jj is
compensated by w_{j+1:} −= e_j U_{j,j+1:} (the OBS update, row-wise). Columns run in blocks of
`block_size`; inside a block the updates are applied at once, the rest of the matrix gets the block's
errors in one matrix product afterwards ("lazy batch" updates: same result, far less memory traffic).

Integer layout, matching squeeze/compress/quantization.py's Scheme so the packed format stores it:
symmetric codes in ±(2^(b−1)−1), value = code × scale; asymmetric codes in [−2^(b−1), 2^(b−1)−1],
value = (code − zero_point) × scale; scales [out, groups] with `group_size` consecutive input columns
per group (one group per row when group_size is None).

act_order (quantize the columns with the largest diag(H) first, while there is most freedom left to
compensate) with groups: the groups' scales are fixed up front from the original weights ("static
groups"), so the groups stay contiguous in the stored column order and no per-column group index
(g_idx) is needed: the result loads like any group-wise quantized weight. Without act_order, each
group's scale is chosen when GPTQ reaches it, from the already-updated weights (slightly better).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from squeeze.arch.linear import as_out_in, features, is_transposed, replace_module
from squeeze.compress.calibration import Calibrated, LayerStats, layer_stack, linear_layers, relative_output_error, sequential
from squeeze.errors import SqueezeError
from squeeze.formats.quantized_layers import QuantizedLinear

_TINY = 1e-12  # scale floor: an all-zero group quantizes to zeros


@dataclass(frozen=True)
class GPTQResult:
    codes: torch.Tensor  # int8 [out, in] (4-bit codes too, one per int8)
    scale: torch.Tensor  # float32 [out, groups]
    zero_point: torch.Tensor | None  # int8 [out, groups], asymmetric only
    dequantized: torch.Tensor  # float32 [out, in]: what the layer now computes with
    input_divisor: torch.Tensor | None = None  # [in]: the input is divided by it first (AWQ's unfoldable scales)


def check_scheme(method: str, bits: int, group_size: int | None, in_features: int | None = None) -> None:
    """The integer scheme a calibrated quantizer (gptq, awq) writes: 4 or 8 bits, groups that divide the layer."""
    if bits not in (4, 8):
        raise SqueezeError(f"{method} bits={bits}: only 4 or 8 bits are supported (set bits=4 or bits=8)")
    if group_size is not None:
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise SqueezeError(f"{method} group_size={group_size!r} must be a positive integer, or null for one scale "
                               "per output channel")
        if in_features is not None and in_features % group_size:
            raise SqueezeError(f"{method} group_size={group_size} does not divide in_features={in_features}; pick a "
                               "divisor of every layer's input size (e.g. 32 or 64)")


def check_settings(bits: int, group_size: int | None, in_features: int | None = None,
                   percdamp: float = 0.01, block_size: int = 128) -> None:
    check_scheme("gptq", bits, group_size, in_features)
    if not 0 < percdamp < 1:
        raise SqueezeError(f"gptq percdamp={percdamp} must be in (0, 1) (0.01 is the paper's)")
    if block_size < 1:
        raise SqueezeError(f"gptq block_size={block_size} must be a positive integer (128 is the paper's)")


def _range(bits: int, symmetric: bool) -> tuple[int, int]:
    return -(2 ** (bits - 1)) + (1 if symmetric else 0), 2 ** (bits - 1) - 1


def quant_params(w: torch.Tensor, bits: int, symmetric: bool):
    """Scale [rows] and zero point [rows] (None when symmetric) covering each row of `w`."""
    qmin, qmax = _range(bits, symmetric)
    if symmetric:
        return (w.abs().amax(1) / qmax).clamp(min=_TINY), None
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)  # zero stays exactly representable
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=_TINY)
    return scale, (qmin - torch.round(lo / scale)).clamp(qmin, qmax)


def _quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, symmetric: bool):
    """(codes as float, dequantized) of a column `w` [rows] with per-row scale and zero point."""
    qmin, qmax = _range(bits, symmetric)
    q = torch.round(w / scale) + (0 if zero is None else zero)
    q = q.clamp(qmin, qmax)
    return q, (q - (0 if zero is None else zero)) * scale


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int | None = None,
                 symmetric: bool = True) -> GPTQResult:
    """Round-to-nearest with the same scheme: the baseline GPTQ improves on."""
    check_settings(bits, group_size, weight.shape[1])
    w = weight.detach().float()
    rows, cols = w.shape
    g = group_size or cols
    groups = w.reshape(rows * cols // g, g)
    scale, zero = quant_params(groups, bits, symmetric)
    q, _ = _quantize(groups, scale.unsqueeze(1), None if zero is None else zero.unsqueeze(1), bits, symmetric)
    return _result(q.reshape(rows, cols), scale.reshape(rows, -1), None if zero is None else zero.reshape(rows, -1),
                   g)


def _result(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> GPTQResult:
    # The dequantized weight is recomputed from the stored integers, so it is exactly what a loader gets.
    expand = lambda t: t.repeat_interleave(group, dim=1)  # noqa: E731
    deq = (codes - (0 if zero is None else expand(zero))) * expand(scale)
    return GPTQResult(codes.to(torch.int8), scale.float(), None if zero is None else zero.to(torch.int8), deq)


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (H⁻¹ = UᵀU), λ = percdamp × mean diag(H)."""
    h = hessian.clone()
    h.diagonal().add_(percdamp * float(h.diagonal().mean()))
    try:
        lower = torch.linalg.cholesky(h)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    except torch.linalg.LinAlgError as err:
        raise SqueezeError(f"the calibration Hessian is not positive definite even with percdamp={percdamp}; raise "
                           "percdamp (e.g. 0.1) or calibrate on more samples") from err


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int | None = None,
                  act_order: bool = False, symmetric: bool = True, percdamp: float = 0.01,
                  block_size: int = 128) -> GPTQResult:
    """GPTQ for one weight [out, in] given the Hessian [in, in] of its inputs (see the module docstring)."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    check_settings(bits, group_size, cols, percdamp, block_size)
    h = hessian.detach().float().clone().to(w.device)
    if h.shape != (cols, cols):
        raise SqueezeError(f"gptq: the Hessian is {tuple(h.shape)} but the weight takes {cols} inputs")
    dead = h.diagonal() == 0  # an input that never fired: its weights cannot matter, so zero them
    h[dead, dead] = 1
    w[:, dead] = 0

    g = group_size or cols
    static = act_order or group_size is None  # all scales fixed up front (see the module docstring)
    scale = torch.zeros(rows, cols // g)
    zero = None if symmetric else torch.zeros(rows, cols // g)
    if static:
        s, z = quant_params(w.reshape(rows * cols // g, g), bits, symmetric)
        scale = s.reshape(rows, -1)
        zero = None if z is None else z.reshape(rows, -1)

    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_cholesky(h, percdamp)
    codes = torch.zeros_like(w)
    # A group's columns must all be current when its scale is chosen: within one block, or starting one.
    block = block_size if (g % block_size == 0 or block_size % g == 0) else g
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if not static and col % g == 0:
                group = w1[:, i:i + g] if g <= block else w[:, i1:i1 + g]
                s, z = quant_params(group, bits, symmetric)
                scale[:, col // g] = s
                if zero is not None:
                    zero[:, col // g] = z
            s = scale[:, col // g]
            z = None if zero is None else zero[:, col // g]
            q, deq = _quantize(w1[:, i], s, z, bits, symmetric)
            codes[:, i1 + i] = q
            e = (w1[:, i] - deq) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    unpermuted = torch.empty_like(codes)
    unpermuted[:, perm] = codes
    return _result(unpermuted, scale, zero, g)


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    """||XWᵀ − XŴᵀ||_F: what GPTQ minimises (for tests and reports)."""
    return float((x.float() @ (weight.float() - approx.float()).t()).norm())


def quantize_layer(module: nn.Module, stats: LayerStats, **settings) -> GPTQResult:
    """GPTQ one Linear/Conv1D in place (its weight becomes the dequantized values); the integers."""
    result = gptq_quantize(as_out_in(module), stats.hessian, **settings)
    with torch.no_grad():
        as_out_in(module).copy_(result.dequantized.to(module.weight.dtype))
    return result


def gptq_model(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], bits: int = 4,
               group_size: int | None = 128, act_order: bool = False, symmetric: bool = True,
               percdamp: float = 0.01, block_size: int = 128,
               errors: dict[str, float] | None = None) -> dict[str, GPTQResult]:
    """GPTQ every Linear/Conv1D of the layer stack, block by block on the compressed model's own inputs
    (calibration.sequential). Weights are replaced by their dequantized values; the integers, scales
    and zero points are returned by layer name for packing. Embeddings and heads are left alone.
    `errors`, if given, receives each layer's relative output error on its calibration inputs."""
    settings = dict(bits=bits, group_size=group_size, act_order=act_order, symmetric=symmetric,
                    percdamp=percdamp, block_size=block_size)
    check_settings(bits, group_size, None, percdamp, block_size)
    names = {id(m): n for n, m in model.named_modules()}
    for module in linear_layers(layer_stack(model)).values():  # fail before any calibration runs
        check_settings(bits, group_size, features(module)[1], percdamp, block_size)
    results: dict[str, GPTQResult] = {}

    def compress_block(index: int, block: nn.Module, stats: dict[str, LayerStats]) -> None:
        for short, module in linear_layers(block).items():
            original = as_out_in(module).detach().clone() if errors is not None else None
            results[names[id(module)]] = quantize_layer(module, stats[short], **settings)
            if errors is not None:
                errors[names[id(module)]] = relative_output_error(original, as_out_in(module), stats[short])

    sequential(model, batches, compress_block)
    return results


class GPTQ(Calibrated):
    """GPTQ (`compress=gptq`): every Linear/Conv1D of the layer stack to `bits`-bit integers with
    `group_size` columns per scale, layer by layer on the run's calibration data (embeddings and the
    output head stay float). The layers become QuantizedLinear (weight-only kernel), saved packed like
    int4wo; nothing that trains may follow it."""

    integer_weights = True
    float_weights = True  # it reads float weights: after another quantizer there are none to read
    unsharded = "it leaves integer weights, and FSDP shards only floating-point parameters"

    def __init__(self, bits: int = 4, group_size: int | None = 64, act_order: bool = True, symmetric: bool = True,
                 damping: float = 0.01, block_size: int = 128):
        super().__init__()
        self.bits, self.group_size, self.act_order, self.symmetric = bits, group_size, bool(act_order), bool(symmetric)
        self.damping, self.block_size = damping, block_size
        check_settings(bits, group_size, None, damping, block_size)
        self.quantized = 0

    def check(self, model):
        for module in linear_layers(layer_stack(model)).values():
            check_settings(self.bits, self.group_size, features(module)[1], self.damping, self.block_size)

    def apply(self, model, batches):
        results = gptq_model(model, batches, self.bits, self.group_size, self.act_order, self.symmetric,
                             self.damping, self.block_size, errors=self.layer_error)
        for name, r in results.items():
            replace_module(model, name, as_quantized_linear(model.get_submodule(name), r, self.bits))
        self.quantized = len(results)
        return model

    def summary(self):
        return {"bits": self.bits, "group_size": self.group_size, "act_order": self.act_order,
                "symmetric": self.symmetric, "damping": self.damping, "quantized_modules": self.quantized,
                "kernel": "weight_only", "layer_error_kind": "relative output error on the calibration inputs",
                **super().summary()}


def as_quantized_linear(module: nn.Module, result: GPTQResult, bits: int) -> QuantizedLinear:
    """The integer layer holding GPTQ's codes, scales and zero points (int4wo's layout: the same format
    saves and reloads it); it computes with exactly `result.dequantized`."""
    out_features, in_features = features(module)
    new = QuantizedLinear(in_features, out_features, bits, tuple(result.scale.shape), result.zero_point is not None,
                          bias=module.bias is not None, kernel="weight_only", from_conv1d=is_transposed(module))
    new.set_weight(result.codes.cpu(), result.scale.cpu(), None if result.zero_point is None else result.zero_point.cpu())
    new.set_input_divisor(result.input_divisor)
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.detach().float().clone(), requires_grad=False)
    return new.to(module.weight.device)
