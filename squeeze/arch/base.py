"""The adapter interface: what squeeze needs to know about a model family, asked in one place.

A family file (bert.py, gpt2.py, llama.py, opt.py, ...) subclasses `Adapter` and fills in where its
layers, attention projections, MLP, norms and dropouts live, what sits around the layer stack, how its
config names their sizes, and its defaults for the techniques (pruning patterns, pooling). Code elsewhere
asks `adapter_for(model)` and never tests a family name, a model_type, a class name or a module name itself
(tests/test_layout.py).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

ENCODER_HEADS = ("sequence_classification", "token_classification", "masked_lm")  # masked_lm: pre-training (task=*_mlm)
# Decoders carry their own classification heads in transformers (last-token pooling for sequences).
DECODER_HEADS = ("sequence_classification", "token_classification", "causal_lm")


@dataclass(frozen=True)
class HeadLayout:
    """One layer's attention and MLP sizes as its weights have them now."""

    heads: int  # query heads
    kv_heads: int
    head_dim: int
    intermediate: int  # MLP neurons

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads


class Cutter(Protocol):
    """What cut_attention is handed: something that replaces `parent.name` by the same Linear/Conv1D
    keeping only the output (`out`) or input features in `index` (squeeze.compress.structured's Surgery)."""

    def keep(self, parent: nn.Module, name: str, index: Sequence[int], out: bool) -> None: ...


class Adapter:
    """One model family. Class attributes are facts; methods find modules in a built model."""

    family = ""  # the name users see in messages
    model_types: tuple[str, ...] = ()  # transformers' config.model_type values this family covers
    kind = "decoder"  # "encoder" | "decoder": which task heads make sense
    heads: tuple[str, ...] = DECODER_HEADS  # the task heads transformers has for it
    pool = "last"  # the position a sequence head reads: "first" ([CLS]) or "last" (last real token)
    stack_path = ""  # the ModuleList of layers, under the base model (model.base_model_prefix)
    intermediate_key = "intermediate_size"  # the config field holding the MLP width
    config_head_counts = False  # heads/head_dim are config fields, so a pruned model reloads stock
    head_dims_ok = True  # q/k/v dims of a head may be removed (not under RoPE)
    # Why structured pruning cannot work on this family (None: it can).
    structured_unsupported: str | None = None
    # Iterative magnitude pruning's defaults: the attention and MLP weight matrices, never embeddings or norms.
    prune_include = ""
    prune_exclude = r"embed|norm"
    # The config field holding the longest input the position embeddings allow (transformers' usual name;
    # a family whose config names it otherwise says so).
    max_positions_key = "max_position_embeddings"
    # The normalisation layers' classes (None: any class named *LayerNorm or *RMSNorm, the rule for a model
    # squeeze has no adapter for, since transformers defines a norm class per family).
    norm_types: tuple[type, ...] | None = None
    # Around the layer stack, under the base model like stack_path ("": the family has none): the norm after
    # the last layer, and the learned position table and the dropout that the base model's forward applies
    # to the token embeddings (squeeze.hardware.pipeline keeps them on the first stage, the norm on the last).
    final_norm_path = ""
    position_embeddings_path = ""
    embedding_dropout_path = ""

    # -- the layer stack --------------------------------------------------------------------------
    @staticmethod
    def _in_model(model: nn.Module, path: str) -> str:
        """The dotted name in `model` of `path`, given under the base model."""
        prefix = model.base_model_prefix
        return f"{prefix}.{path}" if hasattr(model, prefix) else path  # a model with a head holds the base model

    def layer_stack(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """(its dotted name in `model`, the ModuleList of transformer layers)."""
        name = self._in_model(model, self.stack_path)
        return name, model.get_submodule(name)

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Each layer with its dotted name (`bert.encoder.layer.3`), bottom to top."""
        name, stack = self.layer_stack(model)
        return [(f"{name}.{i}", layer) for i, layer in enumerate(stack)]

    def check_layer_cut(self, config, keep: Sequence[int]) -> None:
        """Refuse a cut to the layers `keep` that would change what the kept layers compute."""

    def keep_layers(self, model: nn.Module, keep: Sequence[int]) -> nn.Module:
        """A copy of `model` with only the layers `keep` (0-based, in order); embeddings and heads copied,
        the config's layer count updated so the saved directory reloads with plain from_pretrained."""
        keep = list(keep)
        self.check_layer_cut(model.config, keep)
        student = copy.deepcopy(model)
        name, layers = self.layer_stack(student)
        kept = nn.ModuleList([layers[i] for i in keep])
        for new_index, layer in enumerate(kept):
            for module in layer.modules():  # caches index their layers by this number
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_index
        parent, _, attr = name.rpartition(".")
        setattr(student.get_submodule(parent) if parent else student, attr, kept)
        student.config.num_hidden_layers = len(keep)
        if isinstance(getattr(student.config, "layer_types", None), list):
            student.config.layer_types = [student.config.layer_types[i] for i in keep]
        return student

    # -- around the layer stack ------------------------------------------------------------------
    def _present(self, model: nn.Module, path: str) -> str | None:
        if not path:
            return None
        name = self._in_model(model, path)
        parent, _, attr = name.rpartition(".")
        # A configuration may leave the module out (OPT without its final norm sets it to None).
        return name if getattr(model.get_submodule(parent) if parent else model, attr, None) is not None else None

    def final_norm(self, model: nn.Module) -> str | None:
        """The dotted name of the norm applied after the last layer, or None."""
        return self._present(model, self.final_norm_path)

    def position_embeddings(self, model: nn.Module) -> str | None:
        """The dotted name of the learned position table added to the token embeddings, or None (RoPE)."""
        return self._present(model, self.position_embeddings_path)

    def embedding_dropout(self, model: nn.Module) -> str | None:
        """The dotted name of the dropout module applied to the embeddings before the first layer, or None."""
        return self._present(model, self.embedding_dropout_path)

    def norms(self, model: nn.Module) -> dict[str, nn.Module]:
        """Every normalisation layer (LayerNorm, RMSNorm) of `model`, by name."""
        if self.norm_types is None:
            return {n: m for n, m in model.named_modules() if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))}
        return {n: m for n, m in model.named_modules() if isinstance(m, self.norm_types)}

    def max_positions(self, config) -> int | None:
        """The longest input the model's position embeddings allow, or None if unbounded."""
        value = getattr(config, self.max_positions_key, None)
        return value if isinstance(value, int) and value > 0 else None

    # -- attention and MLP of one layer -----------------------------------------------------------
    def shape(self, layer: nn.Module) -> HeadLayout:
        raise NotImplementedError

    def qkvo(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q, k, v and o weights as [out, in] views."""
        raise NotImplementedError

    def o_proj(self, layer: nn.Module) -> nn.Module:
        """The attention output projection (its input is the heads' outputs side by side)."""
        raise NotImplementedError

    def cut_attention(self, cutter: Cutter, layer: nn.Module, q: Sequence[int], k: Sequence[int],
                      v: Sequence[int], o: Sequence[int], heads: int, head_dim: int) -> None:
        """Keep the q, k and v output rows and the o input columns listed; `heads` × `head_dim` remain."""
        raise NotImplementedError

    def attention_dropouts(self, layer: nn.Module) -> list[tuple[nn.Module, str]]:
        """Where the dropout of the attention probabilities lives in a layer, as (module, attribute): an
        nn.Dropout, or a float probability the attention's forward hands to the kernel."""
        raise NotImplementedError

    def mlp(self, layer: nn.Module) -> tuple[list[tuple[nn.Module, str]], tuple[nn.Module, str]]:
        """(modules whose outputs are the neurons, module whose inputs are), as (parent, attribute)."""
        raise NotImplementedError

    def resized_mlp(self, layer: nn.Module, width: int) -> None:
        """Tell a layer whose MLP now has `width` neurons (for modules that keep the width as an attribute)."""

    def check_structured(self, model: nn.Module) -> None:
        """Refuse a model of this family that structured pruning cannot cut (e.g. with cross-attention)."""

    def smoothing_pairs(self, layer: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
        """SmoothQuant's (producer, consumers) pairs in one layer: a norm or Linear whose output feeds only
        `consumers`, linearly per channel, so dividing it by s and multiplying their input columns by s is
        exactly the same function (squeeze/compress/smoothquant.py)."""
        from squeeze.errors import SqueezeError

        raise SqueezeError(f"smoothquant knows no smoothing pairs for the {self.family} family; "
                           "add smoothing_pairs to its adapter in squeeze/arch/")

    # -- tokenizer ---------------------------------------------------------------------------------
    def prepare_tokenizer(self, tokenizer):
        # GPT-2, OPT and Llama tokenizers have no pad token; batching needs one. Reusing EOS is the
        # usual choice and is safe because padded positions are masked out of losses and attention.
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer


class EncoderAdapter(Adapter):
    # An encoder has no trained next-token head, so LM perplexity on it would be meaningless.
    kind = "encoder"
    heads = ENCODER_HEADS
    pool = "first"


class DecoderAdapter(Adapter):
    kind = "decoder"
    heads = DECODER_HEADS
    pool = "last"


class SeparateQKVAdapter(DecoderAdapter):
    """A decoder whose layers keep attention as self_attn.{q,k,v}_proj and one output projection, each an
    nn.Linear (Llama, OPT): the families differ only in the output projection's and dropout's names and in
    what a cut must tell the attention module."""

    attention_path = "self_attn"
    out_name = "o_proj"  # the output projection, under the attention module
    dropout_name = "dropout"  # the attention probabilities' dropout (a float), under the attention module

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attention_path)

    def intermediate(self, layer: nn.Module) -> int:
        """The layer's MLP width (neurons)."""
        parent, name = self.mlp(layer)[0][0]
        return getattr(parent, name).out_features

    def shape(self, layer):
        a = self.attention(layer)
        return HeadLayout(a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim, a.head_dim,
                          self.intermediate(layer))

    def qkvo(self, layer):
        a = self.attention(layer)
        return a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, getattr(a, self.out_name).weight

    def o_proj(self, layer):
        return getattr(self.attention(layer), self.out_name)

    def cut_attention(self, cutter, layer, q, k, v, o, heads, head_dim):
        a = self.attention(layer)
        cutter.keep(a, "q_proj", q, out=True)
        cutter.keep(a, "k_proj", k, out=True)
        cutter.keep(a, "v_proj", v, out=True)
        cutter.keep(a, self.out_name, o, out=False)
        self.resized_attention(a, heads, head_dim)

    def resized_attention(self, attention: nn.Module, heads: int, head_dim: int) -> None:
        """Tell an attention module that now has `heads` heads of `head_dim` (for modules that keep them)."""

    def attention_dropouts(self, layer):
        return [(self.attention(layer), self.dropout_name)]
