"""Structured pruning: whole attention heads (`compress=heads`) and whole rows of weight matrices
(`compress=rows`: MLP neurons, per-head q/k/v dims), physically removed, so the saved model is
smaller and faster, and reloadable by transformers without squeeze.

What stock transformers 5 can express decides what is allowed and how a pruned model reloads:
  llama      num_attention_heads, num_key_value_heads, head_dim and intermediate_size are config
             fields, so a pruned Llama reloads with plain `from_pretrained`. Heads go as whole KV
             groups (a key/value head with all its query heads), so every layer keeps
             num_heads = groups × num_key_value_groups; one config holds all layers, so counts must
             be the same in every layer (per-layer variation is refused). q/k/v dims are refused:
             RoPE's frequencies depend on head_dim.
  bert, gpt2 the attention size is hidden_size / num_attention_heads, with no head_dim field, and
             config.pruned_heads is gone from transformers 5: no stock config can express removed
             heads. The model is saved with `pruned_attention.py` beside its weights and
             `attention_layout` ([heads, head_dim] per layer, so per-layer counts are allowed) in its
             config, and loads with `from_pretrained(dir, trust_remote_code=True)` (squeeze itself
             loads it with its own copy of those classes: `loading_class`).
  all three  the MLP width is one config field (intermediate_size, GPT-2's n_inner): it must stay
             the same in every layer.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from squeeze.compress import Compressor, pruned_attention
from squeeze.errors import SqueezeError
from squeeze.models import count_params

log = logging.getLogger("squeeze")
METHODS = ("magnitude", "gradient")


# -- amounts and schedules (pure) -------------------------------------------------------------------
def check_amount(amount: Any, what: str) -> None:
    """`amount` follows torch.nn.utils.prune: a float in [0, 1) is a fraction, an int a count."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise SqueezeError(f"{what}={amount!r} is neither a fraction in [0, 1) nor a whole count")
    if isinstance(amount, float) and not 0.0 <= amount < 1.0:
        count = f", or a count as an integer ({what}={int(amount)})" if amount >= 1 and amount.is_integer() else ""
        raise SqueezeError(f"{what}={amount} is a fraction outside [0, 1); give e.g. 0.25{count}")
    if isinstance(amount, int) and amount < 0:
        raise SqueezeError(f"{what}={amount} is a negative count; give a count ≥ 0 or a fraction in [0, 1)")


def units_to_remove(amount: float, units: int, group: int, what: str, where: str) -> int:
    """How many of a layer's `units` to remove; a unit is `group` heads (or dims, or neurons).

    A fraction is of the units (rounded to nearest); a count is of heads, so under grouped-query
    attention it must be a whole number of groups. Removing every unit is refused.
    """
    if isinstance(amount, float):
        n = int(amount * units + 0.5)
        if n >= units:
            raise SqueezeError(f"{what}={amount} would leave none of {where}; use a smaller fraction "
                               f"(below {(units - 0.5) / units:.3g})")
        return n
    if amount >= units * group:
        raise SqueezeError(f"{what}={amount} is not fewer than {where}; give a count below {units * group}")
    if amount % group:
        raise SqueezeError(f"{what}={amount}: {where} go in whole groups of {group} (grouped-query attention "
                           f"prunes a key/value head with its {group} query heads); give a multiple of {group}")
    return amount // group


def removed_by(total: int, iteration: int, iterations: int) -> int:
    """Units removed in total after `iteration` (0-based) of `iterations` equal pruning steps."""
    return int(total * (iteration + 1) / iterations + 0.5)


def keep_highest(scores: torch.Tensor, remove: int) -> list[int]:
    """Indices of the units to keep (all but the `remove` lowest scores), in their original order."""
    order = torch.argsort(scores, stable=True)
    return sorted(order[remove:].tolist())


# -- module surgery ---------------------------------------------------------------------------------
def as_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (GPT-2's Conv1D stores it transposed)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def _sliced(module: nn.Module, index: torch.Tensor, out: bool) -> nn.Module:
    """A copy of a Linear or Conv1D keeping only the output (`out`) or input features in `index`."""
    w = module.weight.detach()
    conv = isinstance(module, Conv1D)
    out_dim = 1 if conv else 0  # Conv1D's weight is [in, out]
    index = index.to(w.device)
    weight = w.index_select(out_dim if out else 1 - out_dim, index).clone()
    bias = None
    if module.bias is not None:
        bias = module.bias.detach().index_select(0, index).clone() if out else module.bias.detach().clone()
    with torch.device("meta"):  # shapes only; the sliced tensors replace the parameters below
        if conv:
            new = Conv1D(weight.shape[1], weight.shape[0])
        else:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=module.bias.requires_grad)
    return new


@dataclass
class Surgery:
    """Replaces modules and remembers which new parameter took each old one's place (an optimizer
    built before the cut must be pointed at the new ones)."""

    replaced: dict[nn.Parameter, nn.Parameter] = field(default_factory=dict)

    def keep(self, parent: nn.Module, name: str, index: Sequence[int] | torch.Tensor, out: bool) -> None:
        old = getattr(parent, name)
        new = _sliced(old, torch.as_tensor(index, dtype=torch.long), out)
        for attr in ("weight", "bias"):
            if getattr(old, attr, None) is not None:
                self.replaced[getattr(old, attr)] = getattr(new, attr)
        setattr(parent, name, new)

    def repoint(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Point optimizers at the new parameters; their moments restart (the shapes changed)."""
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["params"] = [self.replaced.get(p, p) for p in group["params"]]
            for old in self.replaced:
                optimizer.state.pop(old, None)


# -- architectures ----------------------------------------------------------------------------------
@dataclass
class LayerShape:
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


class Layout:
    """Where an architecture keeps each layer's attention and MLP projections."""

    model_type = ""
    config_head_counts = False  # head counts are config fields (stock reload), else attention_layout
    head_dims_ok = True  # q/k/v dims may be removed
    intermediate_key = "intermediate_size"

    def layers(self, model) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def shape(self, layer) -> LayerShape:
        raise NotImplementedError

    def qkvo(self, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v, o weights as [out, in]."""
        raise NotImplementedError

    def o_proj(self, layer) -> nn.Module:
        raise NotImplementedError

    def cut_attention(self, surgery: Surgery, layer, q: list[int], k: list[int], v: list[int], o: list[int],
                      heads: int, head_dim: int) -> None:
        """Keep the q, k and v output rows and the o input columns listed; `heads` × `head_dim` remain."""
        raise NotImplementedError

    def mlp(self, layer) -> tuple[list[tuple[nn.Module, str]], tuple[nn.Module, str]]:
        """(modules whose outputs are the neurons, module whose inputs are), as (parent, name)."""
        raise NotImplementedError

    def check(self, model) -> None:
        pass


def _base(model):
    return getattr(model, model.base_model_prefix, model)


def _named(prefix: str, modules) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}.{i}", m) for i, m in enumerate(modules)]


class BertLayout(Layout):
    model_type = "bert"

    def layers(self, model):
        prefix = "bert.encoder.layer" if hasattr(model, "bert") else "encoder.layer"
        return _named(prefix, _base(model).encoder.layer)

    def shape(self, layer):
        s = layer.attention.self
        heads = s.num_attention_heads
        return LayerShape(heads, heads, s.attention_head_size, layer.intermediate.dense.out_features)

    def qkvo(self, layer):
        s = layer.attention.self
        return s.query.weight, s.key.weight, s.value.weight, layer.attention.output.dense.weight

    def o_proj(self, layer):
        return layer.attention.output.dense

    def cut_attention(self, surgery, layer, q, k, v, o, heads, head_dim):
        s = layer.attention.self
        surgery.keep(s, "query", q, out=True)
        surgery.keep(s, "key", k, out=True)
        surgery.keep(s, "value", v, out=True)
        surgery.keep(layer.attention.output, "dense", o, out=False)
        pruned_attention.set_sizes(layer.attention, heads, head_dim)

    def mlp(self, layer):
        return [(layer.intermediate, "dense")], (layer.output, "dense")

    def check(self, model):
        if model.config.add_cross_attention:
            raise SqueezeError("structured pruning of BERT with cross-attention is not supported; "
                               "use an encoder-only BERT")


class GPT2Layout(Layout):
    model_type = "gpt2"
    intermediate_key = "n_inner"

    def layers(self, model):
        prefix = "transformer.h" if hasattr(model, "transformer") else "h"
        return _named(prefix, _base(model).h)

    def shape(self, layer):
        heads = layer.attn.num_heads
        return LayerShape(heads, heads, layer.attn.head_dim, layer.mlp.c_fc.nf)

    def qkvo(self, layer):
        q, k, v = as_out_in(layer.attn.c_attn).split(layer.attn.split_size, dim=0)
        return q, k, v, as_out_in(layer.attn.c_proj)

    def o_proj(self, layer):
        return layer.attn.c_proj

    def cut_attention(self, surgery, layer, q, k, v, o, heads, head_dim):
        # c_attn's outputs are [Q | K | V] column blocks of split_size each.
        width = layer.attn.split_size
        fused = list(q) + [width + i for i in k] + [2 * width + i for i in v]
        surgery.keep(layer.attn, "c_attn", fused, out=True)
        surgery.keep(layer.attn, "c_proj", o, out=False)
        pruned_attention.set_sizes(layer.attn, heads, head_dim)

    def mlp(self, layer):
        return [(layer.mlp, "c_fc")], (layer.mlp, "c_proj")

    def check(self, model):
        if model.config.add_cross_attention:
            raise SqueezeError("structured pruning of GPT-2 with cross-attention is not supported; "
                               "use a decoder-only GPT-2")


class LlamaLayout(Layout):
    model_type = "llama"
    config_head_counts = True
    head_dims_ok = False

    def layers(self, model):
        prefix = "model.layers" if hasattr(model, "model") else "layers"
        return _named(prefix, _base(model).layers)

    def shape(self, layer):
        a = layer.self_attn
        return LayerShape(a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim, a.head_dim,
                          layer.mlp.up_proj.out_features)

    def qkvo(self, layer):
        a = layer.self_attn
        return a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight

    def o_proj(self, layer):
        return layer.self_attn.o_proj

    def cut_attention(self, surgery, layer, q, k, v, o, heads, head_dim):
        # Whole KV groups go, so head_dim and num_key_value_groups stay as they are.
        a = layer.self_attn
        surgery.keep(a, "q_proj", q, out=True)
        surgery.keep(a, "k_proj", k, out=True)
        surgery.keep(a, "v_proj", v, out=True)
        surgery.keep(a, "o_proj", o, out=False)

    def mlp(self, layer):
        return [(layer.mlp, "gate_proj"), (layer.mlp, "up_proj")], (layer.mlp, "down_proj")


LAYOUTS = {c.model_type: c for c in (BertLayout, GPT2Layout, LlamaLayout)}


def layout_of(model, what: str) -> Layout:
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in LAYOUTS:
        raise SqueezeError(f"{what} supports {', '.join(sorted(LAYOUTS))} models, not {model_type}; "
                           "pick e.g. model=minilm, tiny_bert, tiny_gpt2, tiny_llama or smollm2")
    layout = LAYOUTS[model_type]()
    layout.check(model)
    if not layout.config_head_counts:
        stock = type(model)
        if stock not in pruned_attention.TWINS and stock not in _twin_classes():
            raise SqueezeError(f"{what}: {stock.__name__} has no reloadable pruned twin; supported heads are "
                               f"{', '.join(sorted(c.__name__ for c in pruned_attention.TWINS))}")
    return layout


def _twin_classes() -> set[type]:
    return {twin for twin, _ in pruned_attention.TWINS.values()}


def select_layers(layout: Layout, model, patterns: Sequence[str | int] | None, what: str) -> list[int]:
    """Indices of the layers named by `patterns` (fnmatch on names like `bert.encoder.layer.3`, or
    plain layer numbers); all layers when `patterns` is empty."""
    names = [name for name, _ in layout.layers(model)]
    if not patterns:
        return list(range(len(names)))
    chosen: set[int] = set()
    for pattern in patterns:
        pattern = str(pattern)
        hits = [i for i, name in enumerate(names)
                if fnmatch.fnmatchcase(name, pattern) or pattern == str(i)]
        if not hits:
            raise SqueezeError(f"{what}: pattern {pattern!r} matches no layer; layers are numbered 0–{len(names) - 1} "
                               f"and named {names[0]} … {names[-1]}")
        chosen.update(hits)
    return sorted(chosen)


def record_shapes(model, layout: Layout, what: str) -> None:
    """Write the pruned sizes into the config so the saved model reloads (see the module docstring).
    Callers check the planned shapes with check_expressible before they cut."""
    shapes = [layout.shape(layer) for _, layer in layout.layers(model)]
    check_expressible(model, layout, shapes, what)
    config = model.config
    widths = {s.intermediate for s in shapes}
    setattr(config, layout.intermediate_key, widths.pop())
    if layout.config_head_counts:
        config.head_dim = shapes[0].head_dim
        config.num_key_value_heads = shapes[0].kv_heads
        config.num_attention_heads = shapes[0].heads
        return
    stock_dim = config.hidden_size // config.num_attention_heads
    if all(s.heads == config.num_attention_heads and s.head_dim == stock_dim for s in shapes):
        return
    config.attention_layout = [[s.heads, s.head_dim] for s in shapes]
    if type(model) not in _twin_classes():
        twin, auto_class = pruned_attention.TWINS[type(model)]
        model.__class__ = twin  # the twin only adds a constructor that resizes: same forward, same state
        twin.register_for_auto_class(auto_class)  # save_pretrained copies pruned_attention.py and writes auto_map


def check_expressible(model, layout: Layout, shapes: list[LayerShape], what: str) -> None:
    if len({s.intermediate for s in shapes}) > 1:
        raise SqueezeError(f"{what}: MLP widths would differ between layers ({[s.intermediate for s in shapes]}), "
                           f"but {layout.model_type}'s config has one {layout.intermediate_key}; prune every layer "
                           "(drop the layers setting)")
    if not layout.config_head_counts:
        return
    if len({(s.heads, s.kv_heads, s.head_dim) for s in shapes}) > 1:
        raise SqueezeError(f"{what}: head counts would differ between layers ({[s.heads for s in shapes]}), but a "
                           f"{layout.model_type} config has one num_attention_heads for all layers; prune every "
                           "layer (drop the layers setting)")
    heads, hidden = shapes[0].heads, model.config.hidden_size
    if hidden % heads:
        raise SqueezeError(f"{what}: keeping {heads} heads per layer cannot be saved: {layout.model_type}'s config "
                           f"requires hidden_size ({hidden}) to be a multiple of num_attention_heads; choose an "
                           "amount that keeps a divisor of it")


def reload_kind(model) -> str:
    """How plain transformers loads the saved model: "stock", or "trust_remote_code" when its
    directory carries pruned_attention.py."""
    return "trust_remote_code" if getattr(model.config, pruned_attention.LAYOUT, None) else "stock"


def loading_class(config, auto_class) -> type:
    """The class that loads a saved model with `config` as `auto_class` (AutoModelFor...): the stock
    class, or, when config.attention_layout says heads were removed, its twin from squeeze's own
    pruned_attention.py, so squeeze never needs to run code a model directory brings."""
    from transformers.models.auto.auto_factory import _get_model_class

    cls = _get_model_class(config, auto_class._model_mapping)
    if not getattr(config, pruned_attention.LAYOUT, None):
        return cls
    if cls not in pruned_attention.TWINS:
        raise SqueezeError(f"a {config.model_type} model with pruned attention cannot be loaded as {cls.__name__}; "
                           f"supported: {', '.join(sorted(c.__name__ for c in pruned_attention.TWINS))}")
    return pruned_attention.TWINS[cls][0]


# -- importance -------------------------------------------------------------------------------------
def magnitude_head_scores(layout: Layout, layer) -> torch.Tensor:
    """Per KV group: Σ over its query heads of ‖W_V,kv‖·‖W_O,h‖. Attention rows sum to one, so this
    bounds what a head can add to the residual stream (the q/k weights only decide where it looks)."""
    s = layout.shape(layer)
    _, _, v, o = layout.qkvo(layer)
    d = s.head_dim
    v_norm = v.detach().float().reshape(s.kv_heads, d, -1).norm(dim=(1, 2))
    o_norm = o.detach().float().reshape(o.shape[0], s.heads, d).norm(dim=(0, 2))
    return (o_norm.reshape(s.kv_heads, s.group) * v_norm[:, None]).sum(dim=1)


def gradient_head_scores(layout: Layout, model, batches: Iterable[dict]) -> list[torch.Tensor]:
    """Michel et al. 2019: a gate ξ_h = 1 on each head's output, importance Σ_batches |∂L/∂ξ_h|,
    summed per KV group. Only the gates take gradients: the weights' .grad is left untouched."""
    layers = [layer for _, layer in layout.layers(model)]
    shapes = [layout.shape(layer) for layer in layers]
    device = next(model.parameters()).device
    gates = [torch.ones(s.heads, device=device, requires_grad=True) for s in shapes]
    totals = [torch.zeros(s.heads, device=device) for s in shapes]

    def gate_hook(gate, head_dim):
        def hook(module, args):
            x = args[0]
            gated = x.unflatten(-1, (-1, head_dim)) * gate[:, None].to(x.dtype)
            return (gated.flatten(-2), *args[1:])
        return hook

    handles = [layout.o_proj(layer).register_forward_pre_hook(gate_hook(g, s.head_dim))
               for layer, g, s in zip(layers, gates, shapes)]
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    seen = 0
    try:
        model.eval()  # no dropout: the gradient of the model that will be kept
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for batch in batches:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                loss = model(**batch).loss
                if loss is None:
                    raise SqueezeError("gradient head importance needs batches with labels (the model returned no loss)")
                loss.backward()
                for gate, total in zip(gates, totals):
                    total += gate.grad.abs()
                    gate.grad = None
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if seen == 0:
        raise SqueezeError("gradient head importance got no batches; the training split is empty")
    return [total.reshape(s.kv_heads, s.group).sum(dim=1).cpu() for total, s in zip(totals, shapes)]


# -- cutting ----------------------------------------------------------------------------------------
def prune_heads(model, layout: Layout, keep_groups: dict[int, list[int]], what: str) -> Surgery:
    """Remove every KV group not in `keep_groups[layer]` (with its query heads) from those layers."""
    layers = [layer for _, layer in layout.layers(model)]
    shapes = [layout.shape(layer) for layer in layers]
    planned = [LayerShape(len(keep_groups[i]) * s.group, len(keep_groups[i]), s.head_dim, s.intermediate)
               if i in keep_groups else s for i, s in enumerate(shapes)]
    check_expressible(model, layout, planned, what)
    surgery = Surgery()
    for i, kept in keep_groups.items():
        s, layer = shapes[i], layers[i]
        if len(kept) == s.kv_heads:
            continue
        d, g = s.head_dim, s.group
        q = [(u * g + j) * d + t for u in kept for j in range(g) for t in range(d)]
        kv = [u * d + t for u in kept for t in range(d)]
        layout.cut_attention(surgery, layer, q, kv, kv, q, len(kept) * g, d)
    record_shapes(model, layout, what)
    return surgery


def plan_head_dims(model, layout: Layout, layer_ids: Sequence[int], amount, what: str) -> dict[int, int]:
    """Dims to remove from every head, per layer; checked before anything is cut."""
    if not layout.head_dims_ok and amount:
        raise SqueezeError(f"{what}: {layout.model_type} applies rotary position embeddings whose frequencies "
                           "depend on head_dim, so q/k dims cannot be removed exactly; set it to 0 (prune MLP "
                           "rows, or whole heads with compress=heads)")
    layers = layout.layers(model)
    plan = {}
    for i in layer_ids:
        d = layout.shape(layers[i][1]).head_dim
        plan[i] = units_to_remove(amount, d, 1, what, f"the {d} dims of each head in layer {i}")
    return plan


def prune_head_dims(model, layout: Layout, plan: dict[int, int]) -> None:
    """Remove the same number of dims from every head: q/k dims by ‖q_i‖·‖k_i‖ (their product is
    what dim i adds to a score), v dims by ‖v_i‖·‖o_i‖. The score scaling is left as it was."""
    surgery = Surgery()
    for i, remove in plan.items():
        layer = layout.layers(model)[i][1]
        s = layout.shape(layer)
        if remove == 0:
            continue
        wq, wk, wv, wo = (w.detach().float() for w in layout.qkvo(layer))
        qk_score = (wq.norm(dim=1) * wk.norm(dim=1)).reshape(s.heads, s.head_dim)
        v_score = (wv.norm(dim=1) * wo.norm(dim=0)).reshape(s.heads, s.head_dim)
        qk = [h * s.head_dim + t for h in range(s.heads) for t in keep_highest(qk_score[h], remove)]
        v = [h * s.head_dim + t for h in range(s.heads) for t in keep_highest(v_score[h], remove)]
        layout.cut_attention(surgery, layer, qk, qk, v, v, s.heads, s.head_dim - remove)


def plan_mlp(model, layout: Layout, layer_ids: Sequence[int], amount, what: str) -> dict[int, int]:
    """Neurons to remove per layer; checked before anything is cut."""
    layers = layout.layers(model)
    if len(layer_ids) != len(layers) and amount:
        raise SqueezeError(f"{what}: MLP widths would differ between layers, but {layout.model_type}'s config has one "
                           f"{layout.intermediate_key}; prune every layer (drop the layers setting)")
    plan = {}
    for i in layer_ids:
        width = layout.shape(layers[i][1]).intermediate
        plan[i] = units_to_remove(amount, width, 1, what, f"the {width} MLP neurons of layer {i}")
    return plan


def prune_mlp(model, layout: Layout, plan: dict[int, int]) -> None:
    """Remove intermediate neurons by ‖input rows‖·‖output column‖ (the neuron's weight magnitude)."""
    surgery = Surgery()
    for i, remove in plan.items():
        if remove == 0:
            continue
        ins, (out_parent, out_name) = layout.mlp(layout.layers(model)[i][1])
        in_norm = sum(as_out_in(getattr(p, n)).detach().float().norm(dim=1) ** 2 for p, n in ins) ** 0.5
        out_norm = as_out_in(getattr(out_parent, out_name)).detach().float().norm(dim=0)
        kept = keep_highest(in_norm * out_norm, remove)
        for parent, name in ins:
            surgery.keep(parent, name, kept, out=True)
        surgery.keep(out_parent, out_name, kept, out=False)
        if hasattr(ins[0][0], "intermediate_size"):
            ins[0][0].intermediate_size = len(kept)  # Llama's MLP keeps it as an attribute; keep it true


# -- compressors ------------------------------------------------------------------------------------
class HeadPruning(Compressor):
    """Removes whole attention heads, ranked per layer by weight magnitude or by Michel et al.'s
    gradient importance, once before fine-tuning or in `iterations` steps `every_n_steps` apart
    with fine-tuning in between.

    `amount`: a fraction of each layer's heads (float in [0, 1)) or a count of heads (int).
    `layers`: which layers to prune (fnmatch patterns or numbers); null prunes all of them.
    """

    name = "heads"

    def __init__(self, amount: float = 0.25, method: str = "gradient", importance_batches: int = 8,
                 iterations: int = 1, every_n_steps: int = 0, layers: Sequence[str | int] | None = None):
        what = self._what
        check_amount(amount, f"{what}.amount")
        if method not in METHODS:
            raise SqueezeError(f"{what}.method={method!r} is not one of {list(METHODS)}")
        if iterations < 1 or (iterations > 1 and every_n_steps < 1):
            raise SqueezeError(f"{what}: iterations={iterations}, every_n_steps={every_n_steps}; give iterations ≥ 1, "
                               "and every_n_steps ≥ 1 when pruning in more than one step")
        if method == "gradient" and importance_batches < 1:
            raise SqueezeError(f"{what}.importance_batches={importance_batches}; gradient importance needs ≥ 1 batch")
        self.amount, self.method, self.importance_batches = amount, method, importance_batches
        self.iterations, self.every_n_steps = iterations, every_n_steps
        self.layer_patterns = list(layers) if layers else None
        # Gradient importance needs training batches, and later steps need fine-tuning between them.
        self.trains = method == "gradient" or iterations > 1
        # Shapes change during fit when pruning in steps: an early best checkpoint no longer fits.
        self.test_best_checkpoint = iterations == 1
        self._done = 0
        self._layout: Layout | None = None
        self._targets: dict[int, int] = {}  # layer → KV groups to remove in the end
        self._before: dict[str, Any] = {}
        self._after: dict[str, Any] = {}

    @property
    def _what(self) -> str:
        return f"compress.{self.name}"

    # The first step runs on the model as built; magnitude needs no data, so it runs in
    # prepare_model (also in evaluate.py); gradient importance waits for the data, in setup.
    def prepare_model(self, model, tokenizer):
        self._plan(model)
        if self.method == "magnitude":
            self._step(model, batches=None)
        return model

    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and self._done == 0 and self._layout is not None:
            # Before the optimizer exists, so it is built on the pruned parameters; on the run's
            # device (Lightning would move the model there next anyway), not on the CPU.
            pl_module.model.to(trainer.strategy.root_device)
            self._step(pl_module.model, self._batches(trainer))

    def on_train_start(self, trainer, pl_module):
        if self.iterations > 1 and trainer.world_size > 1:
            raise SqueezeError(f"{self._what}: pruning in {self.iterations} steps changes parameter shapes during fit, "
                               "which distributed training cannot follow; use iterations=1 or a single device")
        last = (self.iterations - 1) * self.every_n_steps
        if self.iterations > 1 and last >= trainer.estimated_stepping_batches:
            raise SqueezeError(f"{self._what}: the last of {self.iterations} pruning steps every {self.every_n_steps} "
                               f"steps comes at step {last}, but the run trains {trainer.estimated_stepping_batches} "
                               "steps; lower every_n_steps or iterations, or train longer")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._done < self.iterations and trainer.global_step >= self._done * self.every_n_steps:
            surgery = self._step(pl_module.model, self._batches(trainer) if self.method == "gradient" else None)
            surgery.repoint(trainer.optimizers)

    def finalize(self, model):
        self._after = {"params": count_params(model)[0], "heads": self._heads(model), "reload": reload_kind(model)}
        return model

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "amount": self.amount,
            "unit": "kv_group" if self._layout is not None and self._layout.config_head_counts else "head",
            "iterations": self.iterations,
            "steps_done": self._done,
            "heads_per_layer_before": self._before.get("heads"),
            "heads_kept_per_layer": self._after.get("heads"),
            "params_before": self._before.get("params"),
            "params_after": self._after.get("params"),
            "reload": self._after.get("reload"),
        }

    # -- internals -----------------------------------------------------------------------------
    def _plan(self, model) -> None:
        """Check the request against the model (before anything is cut) and fix the final amounts."""
        what = self._what
        layout = layout_of(model, what)
        chosen = select_layers(layout, model, self.layer_patterns, f"{what}.layers")
        layers = layout.layers(model)
        targets = {}
        for i in chosen:
            s = layout.shape(layers[i][1])
            targets[i] = units_to_remove(self.amount, s.kv_heads, s.group, f"{what}.amount",
                                         f"the {s.heads} heads of layer {i}")
        planned = [LayerShape((s.kv_heads - targets.get(i, 0)) * s.group, s.kv_heads - targets.get(i, 0), s.head_dim,
                              s.intermediate) for i, s in enumerate(layout.shape(l) for _, l in layers)]
        check_expressible(model, layout, planned, what)
        self._layout, self._targets = layout, targets
        self._before = {"params": count_params(model)[0], "heads": self._heads(model)}

    def _heads(self, model) -> list[int]:
        return [self._layout.shape(layer).heads for _, layer in self._layout.layers(model)]

    def _batches(self, trainer) -> list[dict]:
        if trainer.datamodule is None:
            raise SqueezeError(f"{self._what}.method=gradient needs the run's data module for its importance batches")
        # A separate RNG stream: drawing these batches must not change the run's data order.
        with torch.random.fork_rng(devices=[]):
            batches = []
            for batch in trainer.datamodule.train_dataloader():
                batches.append(batch)
                if len(batches) == self.importance_batches:
                    break
        return batches

    def _step(self, model, batches) -> Surgery:
        layout, i = self._layout, self._done
        layers = [layer for _, layer in layout.layers(model)]
        if self.method == "gradient":
            scores = gradient_head_scores(layout, model, batches)
        else:
            scores = [magnitude_head_scores(layout, layer) for layer in layers]
        keep = {}
        for idx, total in self._targets.items():
            s = layout.shape(layers[idx])
            original = self._before["heads"][idx] // s.group
            remove_now = removed_by(total, i, self.iterations) - (original - s.kv_heads)
            keep[idx] = keep_highest(scores[idx], remove_now)
        surgery = prune_heads(model, layout, keep, self._what)
        self._done += 1
        log.info("%s: step %d/%d, heads per layer %s", self._what, self._done, self.iterations, self._heads(model))
        return surgery


class RowPruning(Compressor):
    """Removes whole rows by weight magnitude, once, before fine-tuning: MLP intermediate neurons
    (rows of the up/fc1 projections and the matching down/fc2 columns) and, on BERT and GPT-2, the
    same number of q/k and v dims from every head.

    `mlp_amount` / `qkv_amount`: a fraction (float in [0, 1)) or a count (int) of each layer's
    neurons / of each head's dims. `layers`: which layers (patterns or numbers); null means all.
    """

    name = "rows"

    def __init__(self, mlp_amount: float = 0.25, qkv_amount: float = 0,
                 layers: Sequence[str | int] | None = None):
        check_amount(mlp_amount, f"{self._what}.mlp_amount")
        check_amount(qkv_amount, f"{self._what}.qkv_amount")
        self.mlp_amount, self.qkv_amount = mlp_amount, qkv_amount
        self.layer_patterns = list(layers) if layers else None
        self._before: dict[str, Any] = {}
        self._after: dict[str, Any] = {}

    @property
    def _what(self) -> str:
        return f"compress.{self.name}"

    def prepare_model(self, model, tokenizer):
        what = self._what
        layout = layout_of(model, what)
        chosen = select_layers(layout, model, self.layer_patterns, f"{what}.layers")
        self._layout = layout
        self._before = {"params": count_params(model)[0], **self._sizes(model)}
        dims = plan_head_dims(model, layout, chosen, self.qkv_amount, f"{what}.qkv_amount")
        neurons = plan_mlp(model, layout, chosen, self.mlp_amount, f"{what}.mlp_amount")
        prune_head_dims(model, layout, dims)
        prune_mlp(model, layout, neurons)
        record_shapes(model, layout, what)
        return model

    def finalize(self, model):
        self._after = {"params": count_params(model)[0], **self._sizes(model), "reload": reload_kind(model)}
        return model

    def summary(self) -> dict[str, Any]:
        return {
            "method": "magnitude",
            "mlp_amount": self.mlp_amount,
            "qkv_amount": self.qkv_amount,
            "intermediate_before": self._before.get("intermediate"),
            "intermediate_after": self._after.get("intermediate"),
            "head_dim_before": self._before.get("head_dim"),
            "head_dim_after": self._after.get("head_dim"),
            "params_before": self._before.get("params"),
            "params_after": self._after.get("params"),
            "reload": self._after.get("reload"),
        }

    def _sizes(self, model) -> dict[str, list[int]]:
        shapes = [self._layout.shape(layer) for _, layer in self._layout.layers(model)]
        return {"intermediate": [s.intermediate for s in shapes], "head_dim": [s.head_dim for s in shapes]}
