"""Physical removal: cut heads, head dims and MLP neurons out of a model through its family adapter,
and write the new sizes into its config so the saved model reloads.

What stock transformers 5 can express decides what is allowed (the adapter says which case a family is):
  config head counts (Llama)   num_attention_heads, num_key_value_heads, head_dim and intermediate_size
             are config fields, so a pruned model reloads with plain `from_pretrained`. Heads go as whole
             KV groups; one config holds all layers, so counts must be the same in every layer.
  no such fields (BERT, GPT-2, OPT)   the attention size is hidden_size / num_attention_heads and
             config.pruned_heads is gone from transformers 5. The model is saved with
             `pruned_attention.py` beside its weights and `attention_layout` ([heads, head_dim] per
             layer, so per-layer counts are allowed) in its config, and loads with
             `from_pretrained(dir, trust_remote_code=True)` (squeeze.arch.loading picks squeeze's own copy).
  every family   the MLP width is one config field (adapter.intermediate_key): the same in every layer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from squeeze.arch import Adapter, HeadLayout, adapter_for, loading
from squeeze.arch.linear import sliced
from squeeze.compress.structured.amounts import keep_highest, units_to_remove
from squeeze.compress.structured.importance import head_dim_scores, neuron_scores
from squeeze.errors import SqueezeError


@dataclass
class Surgery:
    """Replaces modules and remembers which new parameter took each old one's place (an optimizer
    built before the cut must be pointed at the new ones)."""

    replaced: dict[nn.Parameter, nn.Parameter] = field(default_factory=dict)

    def keep(self, parent: nn.Module, name: str, index: Sequence[int] | torch.Tensor, out: bool) -> None:
        old = getattr(parent, name)
        new = sliced(old, torch.as_tensor(index, dtype=torch.long), out)
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


def structured_adapter(model, what: str) -> Adapter:
    """The model's family adapter, after checking structured pruning can cut and save this model."""
    adapter = adapter_for(model)
    if adapter.structured_unsupported:
        raise SqueezeError(f"{what}: {adapter.structured_unsupported}")
    adapter.check_structured(model)
    if not adapter.config_head_counts:
        loading.check_twin(model, what)
    return adapter


def chosen_layers(adapter: Adapter, model, patterns: Sequence[str | int] | None, what: str) -> list[int]:
    """Indices of the layers named by `patterns` (fnmatch on names like `bert.encoder.layer.3`, or
    plain layer numbers); all layers when `patterns` is empty."""
    names = [name for name, _ in adapter.layers(model)]
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


def shapes_of(adapter: Adapter, model) -> list[HeadLayout]:
    return [adapter.shape(layer) for _, layer in adapter.layers(model)]


def check_expressible(model, adapter: Adapter, shapes: list[HeadLayout], what: str) -> None:
    """Refuse planned sizes the family's config could not hold (see the module docstring)."""
    if len({s.intermediate for s in shapes}) > 1:
        raise SqueezeError(f"{what}: MLP widths would differ between layers ({[s.intermediate for s in shapes]}), "
                           f"but {adapter.family}'s config has one {adapter.intermediate_key}; prune every layer "
                           "(drop the layers setting)")
    if not adapter.config_head_counts:
        return
    if len({(s.heads, s.kv_heads, s.head_dim) for s in shapes}) > 1:
        raise SqueezeError(f"{what}: head counts would differ between layers ({[s.heads for s in shapes]}), but a "
                           f"{adapter.family} config has one num_attention_heads for all layers; prune every "
                           "layer (drop the layers setting)")
    heads, hidden = shapes[0].heads, model.config.hidden_size
    if hidden % heads:
        raise SqueezeError(f"{what}: keeping {heads} heads per layer cannot be saved: {adapter.family}'s config "
                           f"requires hidden_size ({hidden}) to be a multiple of num_attention_heads; choose an "
                           "amount that keeps a divisor of it")


def record_shapes(model, adapter: Adapter, what: str) -> None:
    """Write the pruned sizes into the config so the saved model reloads (see the module docstring).
    Callers check the planned shapes with check_expressible before they cut."""
    shapes = shapes_of(adapter, model)
    check_expressible(model, adapter, shapes, what)
    config = model.config
    widths = {s.intermediate for s in shapes}
    setattr(config, adapter.intermediate_key, widths.pop())
    if adapter.config_head_counts:
        config.head_dim = shapes[0].head_dim
        config.num_key_value_heads = shapes[0].kv_heads
        config.num_attention_heads = shapes[0].heads
        return
    stock_dim = config.hidden_size // config.num_attention_heads
    if all(s.heads == config.num_attention_heads and s.head_dim == stock_dim for s in shapes):
        return
    config.attention_layout = [[s.heads, s.head_dim] for s in shapes]
    loading.use_twin(model)


def prune_heads(model, adapter: Adapter, keep_groups: dict[int, list[int]], what: str) -> Surgery:
    """Remove every KV group not in `keep_groups[layer]` (with its query heads) from those layers."""
    layers = [layer for _, layer in adapter.layers(model)]
    shapes = [adapter.shape(layer) for layer in layers]
    planned = [HeadLayout(len(keep_groups[i]) * s.group, len(keep_groups[i]), s.head_dim, s.intermediate)
               if i in keep_groups else s for i, s in enumerate(shapes)]
    check_expressible(model, adapter, planned, what)
    surgery = Surgery()
    for i, kept in keep_groups.items():
        s, layer = shapes[i], layers[i]
        if len(kept) == s.kv_heads:
            continue
        d, g = s.head_dim, s.group
        q = [(u * g + j) * d + t for u in kept for j in range(g) for t in range(d)]
        kv = [u * d + t for u in kept for t in range(d)]
        adapter.cut_attention(surgery, layer, q, kv, kv, q, len(kept) * g, d)
    record_shapes(model, adapter, what)
    return surgery


def plan_head_dims(model, adapter: Adapter, layer_ids: Sequence[int], amount, what: str) -> dict[int, int]:
    """Dims to remove from every head, per layer; checked before anything is cut."""
    if not adapter.head_dims_ok and amount:
        raise SqueezeError(f"{what}: {adapter.family} applies rotary position embeddings whose frequencies "
                           "depend on head_dim, so q/k dims cannot be removed exactly; set it to 0 (prune MLP "
                           "rows, or whole heads with compress=heads)")
    layers = adapter.layers(model)
    plan = {}
    for i in layer_ids:
        d = adapter.shape(layers[i][1]).head_dim
        plan[i] = units_to_remove(amount, d, 1, what, f"the {d} dims of each head in layer {i}")
    return plan


def prune_head_dims(model, adapter: Adapter, plan: dict[int, int], surgery: Surgery | None = None) -> Surgery:
    """Remove the same number of dims from every head (importance.head_dim_scores). The score scaling
    is left as it was."""
    surgery = surgery if surgery is not None else Surgery()
    for i, remove in plan.items():
        layer = adapter.layers(model)[i][1]
        s = adapter.shape(layer)
        if remove == 0:
            continue
        qk_score, v_score = head_dim_scores(adapter, layer)
        qk = [h * s.head_dim + t for h in range(s.heads) for t in keep_highest(qk_score[h], remove)]
        v = [h * s.head_dim + t for h in range(s.heads) for t in keep_highest(v_score[h], remove)]
        adapter.cut_attention(surgery, layer, qk, qk, v, v, s.heads, s.head_dim - remove)
    return surgery


def plan_mlp(model, adapter: Adapter, layer_ids: Sequence[int], amount, what: str) -> dict[int, int]:
    """Neurons to remove per layer; checked before anything is cut."""
    layers = adapter.layers(model)
    if len(layer_ids) != len(layers) and amount:
        raise SqueezeError(f"{what}: MLP widths would differ between layers, but {adapter.family}'s config has one "
                           f"{adapter.intermediate_key}; prune every layer (drop the layers setting)")
    plan = {}
    for i in layer_ids:
        width = adapter.shape(layers[i][1]).intermediate
        plan[i] = units_to_remove(amount, width, 1, what, f"the {width} MLP neurons of layer {i}")
    return plan


def prune_mlp(model, adapter: Adapter, plan: dict[int, int], surgery: Surgery | None = None) -> Surgery:
    """Remove the intermediate neurons with the lowest importance.neuron_scores."""
    surgery = surgery if surgery is not None else Surgery()
    for i, remove in plan.items():
        if remove == 0:
            continue
        layer = adapter.layers(model)[i][1]
        kept = keep_highest(neuron_scores(adapter, layer), remove)
        ins, (out_parent, out_name) = adapter.mlp(layer)
        for parent, name in ins:
            surgery.keep(parent, name, kept, out=True)
        surgery.keep(out_parent, out_name, kept, out=False)
        adapter.resized_mlp(layer, len(kept))
    return surgery
