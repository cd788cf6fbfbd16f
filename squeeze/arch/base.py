"""The adapter interface: what squeeze needs to know about a model family, asked in one place.

A family file (bert.py, gpt2.py, llama.py, opt.py, ...) subclasses `Adapter` and fills in where its
layers, attention projections and MLP live, how its config names their sizes, and its defaults for
the techniques (pruning patterns, pooling). Code elsewhere asks `adapter_for(model)` and never tests a
family name or model_type itself.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

ENCODER_HEADS = ("sequence_classification", "token_classification")
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

    # -- the layer stack --------------------------------------------------------------------------
    def layer_stack(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """(its dotted name in `model`, the ModuleList of transformer layers)."""
        prefix = model.base_model_prefix
        if hasattr(model, prefix):  # a model with a head: the stack sits under the base model
            return f"{prefix}.{self.stack_path}", getattr(model, prefix).get_submodule(self.stack_path)
        return self.stack_path, model.get_submodule(self.stack_path)

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
