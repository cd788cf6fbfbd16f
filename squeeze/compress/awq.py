"""AWQ, activation-aware weight quantization (Lin et al. 2023), written for squeeze.

A few input channels of each Linear carry much larger activations than the rest, and the weights they multiply
matter most to the output. Scaling those weight columns up by s_j before rounding (and the activations down by
s_j, folded into whatever produces them, so the float function is unchanged) gives them a finer share of each
group's grid. Per group of layers that share an input (the family adapter's `smoothing_pairs`: Llama's q/k/v
after the attention norm, gate/up after the MLP norm, down after up; o after v is folded only where v's output
has o's input width, which grouped-query attention rules out), s = mean|X|^α, normalised by sqrt(max·min), with
α searched on a grid in [0, 1) for the smallest output error of the group's layers after quantizing W·diag(s)
(α = 0 is plain round-to-nearest, so the search never does worse than RTN on its objective).

Layers no norm or layer before them can absorb scales for (`scale_unfoldable`, on by default): BERT's post-norm
q/k/v and FFN (a post-norm LayerNorm's output is also the next residual), the projections after GELU, o_proj
under grouped-query attention. Each gets its own α search; where it beats round-to-nearest (α > 0) the layer
keeps s as a per-channel divisor of its input (QuantizedLinear.input_divisor): one elementwise division per
layer at inference, and a format compressed-tensors cannot write (saved packed; export dequantizes them).
AutoAWQ does the same for activations it cannot fold into (its ScaledActivation), for GELU models.

Then, per layer except the attention scores' q and k (as the reference does), a clipping search: each
(row, group)'s range shrunk to r × its max, r from 1 down to 1 − max_shrink, keeping the r with the smallest
output error of that group's slice of the row. The rounded weights are group-wise int4 (int4wo's storage and
CPU kernels); embeddings and the output head stay float, as with GPTQ.

Output error here is the layer's, on the calibration inputs, computed from the input Hessian H = 2XᵀX/n that
GPTQ also uses: a weight error E costs tr(E H Eᵀ) (the whole layer, for α) or e_g H_gg e_gᵀ (one group's slice,
for clipping, as the reference compares each group's contribution to the output). Calibration runs block by
block (calibration.sequential): each block's statistics are taken on the outputs of the already-quantized blocks
before it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from squeeze.arch import adapter_for
from squeeze.arch.linear import as_out_in, features, replace_module
from squeeze.compress.calibration import Calibrated, LayerStats, layer_stack, linear_layers, sequential
from squeeze.compress.gptq import GPTQResult, as_quantized_linear, check_scheme, rtn_quantize
from squeeze.compress.smoothquant import apply_smoothing
from squeeze.errors import SqueezeError

SWITCHES = ("symmetric", "clip", "quantize", "scale_unfoldable")  # true/false settings
_FLOOR = 1e-4  # smallest activation magnitude a scale is raised from: a dead channel keeps a finite scale


def check_settings(bits: int, group_size: int | None, grid: int, clip_grid: int, max_shrink: float,
                   in_features: int | None = None, switches: dict | None = None, duo_scaling=False) -> None:
    check_scheme("awq", bits, group_size, in_features)
    if not isinstance(duo_scaling, bool) and duo_scaling != "both":
        raise SqueezeError(f"awq duo_scaling={duo_scaling!r} must be true, false or both (both: the better per α)")
    for key, value in (switches or {}).items():  # bool("no") is True: a typo must not switch anything on
        if not isinstance(value, bool):
            raise SqueezeError(f"awq {key}={value!r} must be true or false")
    for key, value in (("grid", grid), ("clip_grid", clip_grid)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SqueezeError(f"awq {key}={value!r} must be a positive integer (20 is the reference's)")
    if not 0 <= max_shrink < 1:
        raise SqueezeError(f"awq max_shrink={max_shrink} must be in [0, 1) (0.5: ranges shrunk to half at most)")


def output_error(error: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E H Eᵀ): the summed squared output error of a weight error E [out, in] on the calibration inputs."""
    return float(((error @ hessian) * error).sum())


def _rounded(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    return rtn_quantize(weight, bits, group_size, symmetric).dequantized


def weight_mean(weights: Sequence[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """Per input channel, the mean over all rows of |w| relative to the largest |w| of its (row, group): how much
    of its groups' ranges a channel's weights use (duo scaling's weight term)."""
    w = torch.cat([w.detach().float() for w in weights]).abs()
    rows, cols = w.shape
    g = group_size or cols
    grouped = w.reshape(rows, cols // g, g)
    return (grouped / (grouped.amax(-1, keepdim=True) + 1e-6)).reshape(rows, cols).mean(0)


@torch.no_grad()
def search_scales(weights: Sequence[torch.Tensor], mean_abs: torch.Tensor, hessian: torch.Tensor, bits: int = 4,
                  group_size: int | None = 64, symmetric: bool = True, grid: int = 20,
                  duo_scaling: bool | str = False) -> dict:
    """The per-input-channel scales with the smallest summed output error of `weights` (layers sharing one input)
    after rounding W·diag(s), normalised by sqrt(max·min), over α on the grid: s = mean|X|^α, or with duo scaling
    s = mean|X|^α / w_mean^(1−α) (channels whose weights use little of their groups' ranges are scaled up more),
    or the better of both per α (`duo_scaling="both"`); {scales, alpha, duo, error, rtn_error}."""
    weights = [w.detach().float() for w in weights]
    activation = mean_abs.float().clamp(min=_FLOOR)
    forms = {"both": (False, True), True: (True,), False: (False,)}[duo_scaling]
    w_mean = weight_mean(weights, group_size) if True in forms else None
    best = None
    rtn_error = None
    for step in range(grid):
        alpha = step / grid
        # α = 0 without duo scaling is plain rounding: always a candidate, so the search never loses to it
        for duo in forms if step else tuple(dict.fromkeys((False, *forms))):
            s = activation.pow(alpha)
            if duo:
                s = s / (w_mean.pow(1 - alpha) + _FLOOR)
            s = s / (s.max() * s.min()).sqrt()
            error = sum(output_error(_rounded(w * s, bits, group_size, symmetric) / s - w, hessian) for w in weights)
            if step == 0 and not duo:
                rtn_error = error
            if best is None or error < best["error"]:
                best = {"scales": s, "alpha": alpha, "duo": duo, "error": error}
    return {**best, "rtn_error": rtn_error}


@torch.no_grad()
def search_clip(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int | None = 64,
                symmetric: bool = True, grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """`weight` [out, in] with each (row, group) clamped to the fraction r of its range (r in 1, 1 − 1/grid, …,
    down to 1 − max_shrink) whose rounding gives that group's slice of the row the smallest output error."""
    w = weight.detach().float()
    rows, cols = w.shape
    g = group_size or cols
    groups = cols // g
    wg = w.reshape(rows, groups, g)
    blocks = torch.stack([hessian[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(groups)]).float()
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    if symmetric:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    best_error = torch.full((rows, groups), float("inf"))
    best_ratio = torch.ones(rows, groups, 1)
    for step in range(max(1, int(max_shrink * grid))):  # the reference's ratios: 1, 1 - 1/grid, ...
        ratio = 1 - step / grid
        clamped = torch.minimum(torch.maximum(wg, lo * ratio), hi * ratio)
        error = _rounded(clamped.reshape(rows, cols), bits, g, symmetric).reshape(rows, groups, g) - wg
        cost = (torch.einsum("rgi,gij->rgj", error, blocks) * error).sum(-1)
        better = cost < best_error
        best_error = torch.where(better, cost, best_error)
        best_ratio = torch.where(better.unsqueeze(-1), torch.full_like(best_ratio, ratio), best_ratio)
    clamped = torch.minimum(torch.maximum(wg, lo * best_ratio), hi * best_ratio)
    return clamped.reshape(rows, cols)


def _scores_projections(adapter, block: nn.Module) -> set[int]:
    """ids of the weights that make attention scores (q, k): their rounding is not clipped (the reference's
    choice: a clipped q or k distorts every attention score). A fused qkv layer (GPT-2) is clipped whole."""
    try:
        q, k, _, _ = adapter.qkvo(block)
    except (AttributeError, NotImplementedError):
        return set()
    return {id(q), id(k)}


def awq_model(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], bits: int = 4,
              group_size: int | None = 64, symmetric: bool = True, grid: int = 20, clip: bool = True,
              clip_grid: int = 20, max_shrink: float = 0.5, quantize: bool = True,
              scale_unfoldable: bool = True, duo_scaling: bool | str = False) -> tuple[dict[str, GPTQResult], dict]:
    """AWQ every Linear/Conv1D of the layer stack, block by block; the weights become their dequantized values and
    the integers are returned by layer name for packing (with the input divisor of layers whose scales could not
    be folded), with what the searches chose. `quantize=False`: the scales are searched and folded, and the
    weights stay float (for another quantizer: [awq,gptq]); no unfoldable layer is scaled then."""
    adapter = adapter_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    results: dict[str, GPTQResult] = {}
    chosen = {"alpha": {}, "error_vs_rtn": {}, "clipped_layers": 0, "divided_layers": 0, "duo": 0}
    divisors: dict[str, torch.Tensor] = {}
    hooks = []  # until the end: the float model between blocks computes as the integer layers will

    def note(name: str, found: dict) -> None:  # what a scale search chose, for the record
        chosen["alpha"][name] = found["alpha"]
        chosen["duo"] += found["duo"]
        chosen["error_vs_rtn"][name] = found["error"] / max(found["rtn_error"], 1e-30)

    def compress_block(index: int, block: nn.Module, stats: dict[str, LayerStats]) -> None:
        short = {id(m): n for n, m in block.named_modules()}
        hessians = {n: st.hessian for n, st in stats.items()}
        folded = set()
        for producer, consumers in adapter.smoothing_pairs(block):
            folded |= {id(c) for c in consumers}
            first = short[id(consumers[0])]
            found = search_scales([as_out_in(c) for c in consumers], stats[first].mean_abs, hessians[first], bits,
                                  group_size, symmetric, grid, duo_scaling)
            scales = found["scales"]
            apply_smoothing(producer, consumers, scales)
            for c in consumers:  # their inputs are now X / s
                n = short[id(c)]
                hessians[n] = hessians[n] / torch.outer(scales, scales).to(hessians[n])
            note(names[id(consumers[0])], found)
        if not quantize:
            return
        for n, module in linear_layers(block).items() if scale_unfoldable else ():
            if id(module) in folded:
                continue
            weight = as_out_in(module)
            found = search_scales([weight], stats[n].mean_abs, hessians[n], bits, group_size, symmetric, grid,
                                  duo_scaling)
            note(names[id(module)], found)
            if found["alpha"] == 0 and not found["duo"]:  # round-to-nearest was best: no divisor, no cost
                continue
            scales = found["scales"]
            with torch.no_grad():
                weight.mul_(scales.to(weight).unsqueeze(0))
            hessians[n] = hessians[n] / torch.outer(scales, scales).to(hessians[n])
            divisors[names[id(module)]] = scales
            hooks.append(module.register_forward_pre_hook(_divide_input(scales)))
        unclipped = _scores_projections(adapter, block)
        for n, module in linear_layers(block).items():
            weight = as_out_in(module)
            target = weight.detach().float()
            if clip and id(module.weight) not in unclipped:
                target = search_clip(target, hessians[n], bits, group_size, symmetric, clip_grid, max_shrink)
                chosen["clipped_layers"] += 1
            result = rtn_quantize(target, bits, group_size, symmetric)
            with torch.no_grad():
                weight.copy_(result.dequantized.to(weight.dtype))
            results[names[id(module)]] = result

    try:
        sequential(model, batches, compress_block)
    finally:
        for hook in hooks:
            hook.remove()
    for name, scales in divisors.items():
        results[name] = dataclasses.replace(results[name], input_divisor=scales)
    chosen["divided_layers"] = len(divisors)
    return results, chosen


def _divide_input(scales: torch.Tensor):
    def hook(module, args):
        return (args[0] / scales.to(args[0]),) + tuple(args[1:])
    return hook


class AWQ(Calibrated):
    """AWQ (`compress=awq`): activation-aware scales folded into the norms / producing layers, then clipped
    group-wise round-to-nearest of every Linear of the layer stack (embeddings and the output head stay float),
    calibrated on the run's train split. Saved packed like int4wo; nothing that trains or rescales may follow."""

    integer_weights = True
    float_weights = True  # it reads float weights: after another quantizer there are none to read
    keeps_float_with = "compress.{name}.quantize=false"  # said when a quantizer follows it: [awq,gptq]
    folds_scales = True  # into the norms: a second method doing so ([smoothquant,awq]) is refused (check_order)
    unsharded = "it leaves integer weights, and FSDP shards only floating-point parameters"

    def __init__(self, bits: int = 4, group_size: int | None = 64, symmetric: bool = False, grid: int = 20,
                 clip: bool = True, clip_grid: int = 20, max_shrink: float = 0.5, quantize: bool = True,
                 scale_unfoldable: bool = True, duo_scaling: bool | str = False):
        super().__init__()
        check_settings(bits, group_size, grid, clip_grid, max_shrink,
                       switches={"symmetric": symmetric, "clip": clip, "quantize": quantize,
                                 "scale_unfoldable": scale_unfoldable}, duo_scaling=duo_scaling)
        self.bits, self.group_size, self.symmetric = bits, group_size, bool(symmetric)
        self.grid, self.clip, self.clip_grid, self.max_shrink = grid, bool(clip), clip_grid, max_shrink
        # quantize=false: scales only, float weights left for a quantizer after it ([awq,gptq]); the scales are
        # still chosen for this scheme's rounding (bits, group_size, symmetric: set them as the quantizer's)
        self.quantize = bool(quantize)
        self.scale_unfoldable = bool(scale_unfoldable)
        self.duo_scaling = duo_scaling
        self.integer_weights = self.quantize
        self.quantized = 0
        self._chosen: dict = {}

    @classmethod
    def check_values(cls, name: str, settings: dict) -> None:
        """The settings' values, before anything loads (squeeze.config)."""
        merged = {"bits": 4, "group_size": 64, "grid": 20, "clip_grid": 20, "max_shrink": 0.5, **settings}
        try:
            check_settings(merged["bits"], merged["group_size"], merged["grid"], merged["clip_grid"],
                           merged["max_shrink"], switches={k: settings[k] for k in SWITCHES if k in settings},
                           duo_scaling=settings.get("duo_scaling", False))
        except SqueezeError as e:
            raise SqueezeError(f"compress.{name}: {e}") from None

    def check(self, model):
        adapter = adapter_for(model)  # a family squeeze has no adapter for fails here, before calibration
        if not self.scale_unfoldable and not any(adapter.smoothing_pairs(layer) for _, layer in adapter.layers(model)):
            raise SqueezeError(f"{self.where}: this model's family has no layers whose scales fold exactly; leave "
                               f"compress.{self.name}.scale_unfoldable=true, or use compress=gptq or int4wo")
        for module in linear_layers(layer_stack(model)).values():
            check_settings(self.bits, self.group_size, self.grid, self.clip_grid, self.max_shrink,
                           features(module)[1])

    def apply(self, model, batches):
        results, self._chosen = awq_model(model, batches, self.bits, self.group_size, self.symmetric, self.grid,
                                          self.clip, self.clip_grid, self.max_shrink, self.quantize,
                                          self.scale_unfoldable, self.duo_scaling)
        for name, r in results.items():
            replace_module(model, name, as_quantized_linear(model.get_submodule(name), r, self.bits))
        self.quantized = len(results)
        return model

    def summary(self):
        alphas = list(self._chosen.get("alpha", {}).values())
        ratios = list(self._chosen.get("error_vs_rtn", {}).values())
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "grid": self.grid,
                "quantize": self.quantize, "clip": self.clip and self.quantize, "clip_grid": self.clip_grid, "max_shrink": self.max_shrink,
                "quantized_modules": self.quantized, "kernel": "weight_only",
                "scale_unfoldable": self.scale_unfoldable and self.quantize,
                "scaled_groups": len(alphas), "clipped_layers": self._chosen.get("clipped_layers", 0),
                "divided_layers": self._chosen.get("divided_layers", 0), "duo_scaling": self.duo_scaling,
                "duo_scaled": self._chosen.get("duo", 0),
                "alpha": {k: round(v, 3) for k, v in self._chosen.get("alpha", {}).items()},
                "mean_alpha": round(sum(alphas) / len(alphas), 4) if alphas else None,
                "mean_error_vs_rtn": round(sum(ratios) / len(ratios), 4) if ratios else None,
                **super().summary()}
