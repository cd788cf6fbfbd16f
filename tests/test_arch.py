"""The family adapters (squeeze.arch) on each family's tiny random-init model, built from its real
conf/model/*.yaml: layer stack, attention and MLP shapes, orientation, pooling, pruning defaults."""

from __future__ import annotations

import pytest
import torch
import conftest
from conftest import build_tiny, tiny_spec, tiny_tokenizer
from torch import nn

from squeeze.arch import Adapter, adapter_for, find_adapter
from squeeze.arch.linear import as_out_in, features, is_transposed
from squeeze.arch.tokenizers import words_as_in_text, words_need_space
from squeeze.compress.pruning import select_weights
from squeeze.errors import SqueezeError

# model config → (family, kind, pool, layer-stack name, transposed projections)
FAMILIES = {
    "tiny_bert": ("bert", "encoder", "first", "bert.encoder.layer", False),
    "tiny_gpt2": ("gpt2", "decoder", "last", "transformer.h", True),
    "tiny_llama": ("llama", "decoder", "last", "model.layers", False),
    "tiny_opt": ("opt", "decoder", "last", "model.decoder.layers", False),
}
TINY = list(FAMILIES)
assert TINY == conftest.FAMILIES  # every family the shared fixtures build is described here


def _tiny(name: str, head: str = "sequence_classification"):
    return build_tiny(name, head)[0]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", TINY)
def test_one_lookup_from_model_config_or_model_type(name):
    model = _tiny(name)
    family, kind, pool, _, _ = FAMILIES[name]
    adapter = adapter_for(model)
    assert adapter.family == family and adapter.kind == kind and adapter.pool == pool
    assert type(adapter_for(model.config)) is type(adapter) is type(adapter_for(model.config.model_type))
    assert kind == tiny_spec(name).kind  # the config's model.kind agrees with the adapter


def test_an_unknown_architecture_is_refused_naming_the_families():
    with pytest.raises(SqueezeError, match=r"'t5'.*bert \(bert\).*gpt2 \(gpt2\).*llama \(llama\).*opt \(opt\)") as error:
        adapter_for("t5")
    assert "\n" not in str(error.value)
    assert find_adapter("t5") is None


@pytest.mark.parametrize("head", ["sequence_classification", "causal_lm"])
@pytest.mark.parametrize("name", TINY)
def test_layers_attention_and_mlp_shapes(name, head):
    if head not in adapter_for(tiny_spec(name).model_type()).heads:
        pytest.skip(f"{name} has no {head} head")
    model = _tiny(name, head)
    adapter, config = adapter_for(model), model.config
    _, _, _, stack, transposed = FAMILIES[name]
    layers = adapter.layers(model)
    assert len(layers) == config.num_hidden_layers == 2
    hidden = config.hidden_size
    for i, (layer_name, layer) in enumerate(layers):
        if head == "sequence_classification":  # a headed model: the stack sits under the base model
            assert layer_name == f"{stack}.{i}"
        assert model.get_submodule(layer_name) is layer
        s = adapter.shape(layer)
        assert s.heads == config.num_attention_heads and s.heads * s.head_dim == hidden
        assert s.kv_heads == getattr(config, "num_key_value_heads", s.heads)
        q, k, v, o = adapter.qkvo(layer)
        assert q.shape == (s.heads * s.head_dim, hidden)
        assert k.shape == v.shape == (s.kv_heads * s.head_dim, hidden)
        assert o.shape == (hidden, s.heads * s.head_dim)
        assert is_transposed(adapter.o_proj(layer)) is transposed
        assert as_out_in(adapter.o_proj(layer)).data_ptr() == o.data_ptr()  # views, not copies
        ins, (out_parent, out_name) = adapter.mlp(layer)
        for parent, attr in ins:
            assert features(getattr(parent, attr)) == (s.intermediate, hidden)
            assert is_transposed(getattr(parent, attr)) is transposed
        assert features(getattr(out_parent, out_name)) == (hidden, s.intermediate)
        assert getattr(config, adapter.intermediate_key) in (s.intermediate, None)  # GPT-2's n_inner: None = 4×


@pytest.mark.parametrize("name", TINY)
def test_pruning_defaults_select_attention_and_mlp_only(name):
    model = _tiny(name)
    adapter = adapter_for(model)
    selected, transposed = select_weights(model, [adapter.prune_include], [adapter.prune_exclude])
    expected = set()
    for _, layer in adapter.layers(model):
        expected |= {_storage(w) for w in adapter.qkvo(layer)}
        ins, (p, n) = adapter.mlp(layer)
        expected |= {_storage(getattr(q, m).weight) for q, m in [*ins, (p, n)]}
    assert {_storage(w) for w in selected.values()} == expected
    for param_name in selected:
        module = model.get_submodule(param_name.rpartition(".")[0])
        assert not isinstance(module, (nn.Embedding, nn.LayerNorm)) and "norm" not in type(module).__name__.lower()
    assert bool(transposed) is FAMILIES[name][4]


# model config → (norms per layer, final norm, position table, embedding dropout, attention dropout), as named
# under the base model; the family's real module names, so the answers are checked against the built model.
AROUND = {
    "tiny_bert": (2, None, None, None, "attention.self.dropout"),
    "tiny_gpt2": (2, "ln_f", "wpe", "drop", "attn.attn_dropout"),
    "tiny_llama": (2, "norm", None, None, "self_attn.attention_dropout"),
    "tiny_opt": (2, "decoder.final_layer_norm", "decoder.embed_positions", None, "self_attn.dropout"),
}


@pytest.mark.parametrize("name", TINY)
def test_norms_dropouts_and_what_sits_around_the_stack(name):
    head = "sequence_classification" if name == "tiny_bert" else "causal_lm"
    model = _tiny(name, head)
    adapter = adapter_for(model)
    per_layer, final, positions, dropout, attention_dropout = AROUND[name]
    base = model.base_model_prefix
    assert (adapter.final_norm(model), adapter.position_embeddings(model), adapter.embedding_dropout(model)) == \
           tuple(f"{base}.{p}" if p else None for p in (final, positions, dropout))
    norms = adapter.norms(model)
    assert norms and all(isinstance(m.weight, nn.Parameter) for m in norms.values())
    for layer_name, _ in adapter.layers(model):
        assert sum(n.startswith(layer_name + ".") for n in norms) == per_layer
    if final:
        assert f"{base}.{final}" in norms
    owner, attr = attention_dropout.rsplit(".", 1)
    (module, found), = adapter.attention_dropouts(adapter.layers(model)[-1][1])
    assert module is adapter.layers(model)[-1][1].get_submodule(owner) and found == attr
    assert adapter.max_positions(model.config) == 512 == model.config.max_position_embeddings
    # A model squeeze has no adapter for still has its norms found, by transformers' class names.
    assert adapter.norms(model).keys() == Adapter().norms(model).keys()


@pytest.mark.parametrize("name", TINY)
def test_a_cut_keeps_the_chosen_layers(name):
    model = _tiny(name)
    adapter = adapter_for(model)
    cut = adapter.keep_layers(model, [1])
    assert cut.config.num_hidden_layers == 1 and model.config.num_hidden_layers == 2
    (_, kept), = adapter.layers(cut)
    assert kept is not adapter.layers(model)[1][1]  # a copy: the model itself is untouched
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), adapter.layers(model)[1][1].state_dict().values()))


@pytest.mark.parametrize("name, needs_space", [("tiny_bert", False), ("tiny_gpt2", True), ("tiny_llama", True),
                                               ("tiny_opt", True)])
def test_pre_split_words_encode_as_in_running_text(name, needs_space):
    # NER rows arrive as words; each must get the tokens it has inside a sentence ("Ġfilm", not "fil"+"m").
    tokenizer = tiny_tokenizer(name)
    words = ["Jane", "wrote", "Persuasion", "in", "Chawton"]
    enc = tokenizer(words_as_in_text(tokenizer, [words]), is_split_into_words=True, add_special_tokens=False)
    assert enc["input_ids"][0] == tokenizer(" " + " ".join(words), add_special_tokens=False)["input_ids"]
    assert sorted(set(enc.word_ids(0))) == list(range(len(words)))
    assert words_need_space(tokenizer) is needs_space


@pytest.mark.parametrize("name", TINY)
def test_the_tokenizer_can_pad(name):
    tokenizer = tiny_tokenizer(name)
    assert tokenizer.pad_token is not None


def test_tiny_opt_speaks_the_gpt2_bpe_with_a_bos_in_front_like_opt():
    tokenizer = tiny_tokenizer("tiny_opt")
    ids = tokenizer("good film")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 50256 and ids[1:] == [11274, 2646]  # the GPT-2 BPE, after BOS
    model = _tiny("tiny_opt", "causal_lm")
    config = model.config
    assert config.vocab_size == len(tokenizer) == 50257
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # OPT has no token-classification head in transformers: refused by name, before any weights exist.
    with pytest.raises(SqueezeError, match="tiny_opt \\(opt\\) has no token_classification head"):
        tiny_spec("tiny_opt").build("token_classification", ["O", "B-x"])


def test_opt_default_patterns_take_its_mlp_which_the_old_shared_ones_missed():
    # The one-size-fits-all patterns squeeze used before each family had its own.
    old_include, old_exclude = r"attention|attn|mlp|intermediate|output\.dense|ffn", r"embed|wte|wpe|norm|ln_"
    model = _tiny("tiny_opt")
    adapter = adapter_for(model)
    new, _ = select_weights(model, [adapter.prune_include], [adapter.prune_exclude])
    old, _ = select_weights(model, [old_include], [old_exclude])
    assert {n for n in new if ".fc1." in n or ".fc2." in n} and not {n for n in old if ".fc1." in n or ".fc2." in n}
    assert len(new) == 2 * 6  # q, k, v, out_proj, fc1, fc2 in each of 2 layers


def test_a_byte_level_gpt2_builds_with_no_tokenizer_file_and_reloads_with_plain_transformers(tmp_path):
    """model=gpt2_char: transformers' ByT5Tokenizer (UTF-8 bytes) built from its class, the vocabulary the
    config's, and the saved directory loads back in plain transformers with the same logits."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from squeeze import models

    cfg = OmegaConf.to_container(OmegaConf.load(conftest.CONF / "model" / "gpt2_char.yaml"))
    cfg.pop("_target_")
    spec = models.RandomInit(**cfg)
    tokenizer = spec.tokenizer()
    ids = tokenizer("Emma é")["input_ids"]
    assert ids == [b + 3 for b in "Emma é".encode()] + [tokenizer.eos_token_id]  # bytes after 3 specials, then </s>
    torch.manual_seed(0)
    model = models.finish_model(spec.build("causal_lm"), tokenizer).eval()
    assert model.config.vocab_size == len(tokenizer) and model.config.pad_token_id == tokenizer.pad_token_id
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, reloaded = AutoTokenizer.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    batch = torch.tensor([ids])
    assert again("Emma é")["input_ids"] == ids
    assert torch.equal(reloaded(batch).logits, model(batch).logits)
    for wrong in ("GPT2Tokenizer", "BertTokenizer", "NoSuchTokenizer"):  # built empty / does not exist
        with pytest.raises(SqueezeError, match=f"tokenizer_class={wrong} is not a transformers tokenizer"):
            models.RandomInit(**{**cfg, "tokenizer_class": wrong})
    with pytest.raises(SqueezeError, match="exactly one of tokenizer_asset, tokenizer_path or tokenizer_class"):
        models.RandomInit(**cfg, tokenizer_asset="gpt2_tokenizer")
