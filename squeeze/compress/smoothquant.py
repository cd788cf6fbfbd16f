"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights before int8 quantization.

A few input channels of a transformer's Linear layers carry values 10-100× the rest, so one
per-tensor (or per-token) activation scale wastes most of the int8 range on them. For a layer
computing y = x Wᵀ, dividing channel j of x by s_j and multiplying column j of W by s_j leaves y
unchanged; with s_j = max|X_j|^α / max|W_j|^(1−α) the activation and weight ranges meet in between
(α = 0.5 by default; larger α moves more difficulty to the weights).

The division must be folded into whatever produces x, so that nothing is added at run time: a norm
whose output feeds only these layers (weight and bias divided by s), or a Linear whose output feeds
only these layers linearly (its rows and bias divided by s). Which producer feeds which layers is
family knowledge, so each family adapter answers it (squeeze/arch/<family>.py, `smoothing_pairs`):

  GPT-2   ln_1 → attn.c_attn;  ln_2 → mlp.c_fc                    (pre-norm: exact)
  Llama   input_layernorm → q/k/v_proj;  post_attention_layernorm → gate/up_proj;
          up_proj → down_proj (the MLP computes act(gate(x)) ⊙ up(x), elementwise per channel, so
          up's rows divided by s divide down_proj's input by s exactly; down_proj's input carries
          the largest outliers of all, see benchmarks/ptq_quality.py)
  BERT    attention.self.value → attention.output.dense (per layer)
          BERT is post-norm: a LayerNorm's output is also the residual added after the next sublayer,
          so dividing it by s would change the residual path — not foldable. The value projection is:
          attention mixes tokens, never channels, so softmax(QKᵀ)·(V/s) = (softmax(QKᵀ)·V)/s exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from squeeze.arch.linear import as_out_in, features, is_transposed
from squeeze.arch import adapter_for
from squeeze.compress.calibration import Calibrated, collect_stats
from squeeze.errors import SqueezeError

Pair = tuple[nn.Module, list[nn.Module]]  # (producer: a norm or a Linear/Conv1D, its consuming layers)
_FLOOR = 1e-5  # smallest scale: a dead channel (max 0) must not divide a weight by zero


def check_alpha(alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise SqueezeError(f"smoothquant alpha={alpha} must be in [0, 1] (0.5 balances activations and weights; "
                           "0.75-0.85 for models with strong outliers)")


def smoothing_scales(act_absmax: torch.Tensor, linears: Sequence[nn.Module], alpha: float = 0.5) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1−α), W_j column j of every consuming layer; 1 where a channel is dead."""
    check_alpha(alpha)
    w_absmax = torch.stack([as_out_in(m).detach().abs().amax(0).float().cpu() for m in linears]).amax(0)
    act = act_absmax.float().cpu()
    if act.shape != w_absmax.shape:
        raise SqueezeError(f"smoothquant: {act.numel()} activation channels but the layers take {w_absmax.numel()}")
    scales = act.clamp(min=_FLOOR).pow(alpha) / w_absmax.clamp(min=_FLOOR).pow(1 - alpha)
    return torch.where((act > 0) & (w_absmax > 0), scales.clamp(min=_FLOOR), torch.ones_like(scales))


@torch.no_grad()
def apply_smoothing(producer: nn.Module, linears: Sequence[nn.Module], scales: torch.Tensor) -> None:
    """Fold x/s into `producer` (a norm's weight and bias, or a Linear's output rows and bias) and s into
    the input columns of `linears`; the composed function is unchanged."""
    if type(producer) in (nn.Linear,) or is_transposed(producer):
        rows = as_out_in(producer)  # a view: writing it writes the stored weight (Conv1D's too)
        rows.div_(scales.to(rows.device, rows.dtype).unsqueeze(1))
    elif isinstance(getattr(producer, "weight", None), nn.Parameter):
        producer.weight.div_(scales.to(producer.weight.device, producer.weight.dtype))
    else:
        raise SqueezeError(f"smoothquant cannot fold scales into a {type(producer).__name__}: "
                           "the producer must be a LayerNorm/RMSNorm or a Linear")
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(scales.to(producer.bias.device, producer.bias.dtype))
    for m in linears:
        w = as_out_in(m)
        w.mul_(scales.to(w.device, w.dtype).unsqueeze(0))


def smoothing_pairs(model: nn.Module) -> list[Pair]:
    """The (producer, consumers) pairs where smoothing folds exactly, layer by layer: the model family's
    adapter knows them (squeeze/arch/<family>.py, `smoothing_pairs`)."""
    adapter = adapter_for(model)
    return [pair for _, layer in adapter.layers(model) for pair in adapter.smoothing_pairs(layer)]


@torch.no_grad()
def smooth(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], alpha: float = 0.5,
           pairs: Sequence[Pair] | None = None) -> dict[str, torch.Tensor]:
    """Calibrate on `batches` (one float pass) and smooth every pair in place; the scales by consumer name."""
    check_alpha(alpha)
    pairs = smoothing_pairs(model) if pairs is None else list(pairs)
    names = {id(m): n for n, m in model.named_modules()}
    for producer, linears in pairs:
        ins = {features(m)[1] for m in linears}
        if not linears or len(ins) != 1:
            raise SqueezeError(f"smoothquant: the layers fed by {names.get(id(producer), producer)} must share one "
                               f"input size, got {sorted(ins)}")
    first = {names[id(ls[0])]: ls[0] for _, ls in pairs}  # consumers of one producer see the same input
    stats = collect_stats(model, batches, first, hessian=False)
    applied = {}
    for producer, linears in pairs:
        name = names[id(linears[0])]
        scales = smoothing_scales(stats[name].absmax, linears, alpha)
        apply_smoothing(producer, linears, scales)
        applied[name] = scales
    return applied


class SmoothQuant(Calibrated):
    """SmoothQuant (`compress=[smoothquant,dq]`, or before qat / int8wo / gptq): per-channel scales folded
    into each family's smoothing pairs, calibrated on the run's train split; the float model computes
    the same function, with activation outliers moved into the weights for the quantizer after it."""

    float_weights = True
    folds_scales = True  # [smoothquant,awq] is refused (check_order)

    def __init__(self, alpha: float = 0.8):
        super().__init__()
        check_alpha(alpha)
        self.alpha = alpha
        self._figures: dict = {}

    def check(self, model):
        smoothing_pairs(model)  # a family without pairs fails before anything runs

    def apply(self, model, batches):
        scales = smooth(model, batches, self.alpha)
        all_scales = torch.cat([s.flatten() for s in scales.values()]) if scales else torch.ones(1)
        self._figures = {"alpha": self.alpha, "smoothed_layers": len(scales),
                         "scale_range": [round(float(all_scales.min()), 6), round(float(all_scales.max()), 6)]}
        return model

    def summary(self):
        return {"alpha": self.alpha, **self._figures, **super().summary()}
