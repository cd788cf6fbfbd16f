"""The sparse model directory: bit-identical round trip (GPT-2 Conv1D, BERT, Llama; tied weights; bf16;
-0.0), really smaller, no dense copy, transformers still reads its config and tokenizer, a plain
model stays a plain save_pretrained directory, and foreign files fail with one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from squeeze import formats
from squeeze.arch import adapter_for
from squeeze.compress.pruning import magnitude_masks, select_weights
from squeeze.errors import SqueezeError
from squeeze.record import dir_bytes


def _prune(model, sparsity, include=None, exclude=None):
    adapter = adapter_for(model)  # the family's own attention + MLP patterns unless given
    include = adapter.prune_include if include is None else include
    exclude = adapter.prune_exclude if exclude is None else exclude
    weights, transposed = select_weights(model, [include], [exclude] if exclude else [])
    masks = magnitude_masks(weights, sparsity, "global", None, transposed)
    with torch.no_grad():
        for n, p in weights.items():
            p.masked_fill_(~masks[n], 0)
    return weights


def _bits(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("name, head, dtype", [
    ("tiny_gpt2", "causal_lm", torch.float32),   # Conv1D, lm_head tied to wte
    ("tiny_gpt2", "sequence_classification", torch.bfloat16),
    ("tiny_bert", "sequence_classification", torch.float32),
    ("tiny_llama", "causal_lm", torch.float32),  # tied embeddings, grouped-query attention
])
def test_sparse_round_trip_is_bit_identical(name, head, dtype, tmp_path):
    model, tokenizer = build_tiny(name, head)
    model.to(dtype)
    weights = _prune(model, 0.7)
    first = next(iter(weights.values()))
    with torch.no_grad():  # a -0.0 is a value, not a pruned entry: it must come back as -0.0
        kept = (first.view(-1) != 0).nonzero()[0]
        first.view(-1)[kept] = -0.0
    directory = tmp_path / "model"
    formats.save(model, tokenizer, directory)
    files = {p.name for p in directory.iterdir()}
    assert formats.sparse.SPARSE_FILE in files and "config.json" in files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}  # no dense copy

    loaded = formats.load(directory, head)
    assert type(loaded) is type(model) and loaded.dtype == dtype
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key, t in want.items():
        assert got[key].dtype == t.dtype and torch.equal(_bits(got[key]), _bits(t)), key
    assert torch.signbit(loaded.state_dict()[next(iter(weights))].view(-1)[kept]).item()
    if head == "causal_lm":  # still one tensor, as trained
        assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    # transformers reads the config and tokenizer, and refuses (rather than random-initialises) the weights.
    assert AutoConfig.from_pretrained(directory).architectures == [type(model).__name__]
    assert AutoTokenizer.from_pretrained(directory)("a fine film")["input_ids"] == tokenizer("a fine film")["input_ids"]
    auto = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    with pytest.raises(OSError):
        auto.from_pretrained(directory)


def test_sparse_directory_is_really_smaller(tmp_path):
    model, tokenizer = build_tiny("tiny_bert", "sequence_classification")
    formats.save(model, tokenizer, tmp_path / "dense")
    assert (tmp_path / "dense" / "model.safetensors").exists()  # a plain model stays plain
    dense_weights = (tmp_path / "dense" / "model.safetensors").stat().st_size
    # Default selection (attention + MLP) at 50%: smaller, though tiny_bert is mostly embeddings.
    _prune(model, 0.5)
    formats.save(model, tokenizer, tmp_path / "half")
    assert dir_bytes(tmp_path / "half") < dir_bytes(tmp_path / "dense")
    # Every matrix at 50%: half the values plus one bit per entry, about 53% of the dense file.
    model, tokenizer = build_tiny("tiny_bert", "sequence_classification")
    _prune(model, 0.5, include=".", exclude="")
    formats.save(model, tokenizer, tmp_path / "all")
    sparse_weights = (tmp_path / "all" / formats.sparse.SPARSE_FILE).stat().st_size
    assert sparse_weights < 0.6 * dense_weights


def test_plain_model_stays_a_plain_transformers_directory(tmp_path):
    model, tokenizer = build_tiny("tiny_gpt2", "sequence_classification")
    with torch.no_grad():  # a few incidental zeros do not make a model sparse
        model.score.weight[0, :8] = 0
    formats.save(model, tokenizer, tmp_path / "m")
    assert not (tmp_path / "m" / formats.sparse.SPARSE_FILE).exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert torch.equal(reloaded.score.weight, model.score.weight)
    assert torch.equal(formats.load(tmp_path / "m", "sequence_classification").score.weight, model.score.weight)


def test_which_tensors_are_stored_sparse():
    t = torch.randn(16, 16)
    assert not formats.sparse.stored_sparse(t)
    t.view(-1)[:40] = 0  # 16% zeros
    assert not formats.sparse.stored_sparse(t)
    t.view(-1)[:128] = 0  # 50%
    assert formats.sparse.stored_sparse(t)
    assert not formats.sparse.stored_sparse(torch.zeros(64))  # 1-D (biases, norms) stay dense
    # In a model already saved sparse, a lightly pruned matrix packs smaller too: 16% zeros in float32
    # cost 1/32 + 0.84 of the dense bytes.
    t.view(-1)[:] = torch.randn(256)
    t.view(-1)[:40] = 0
    assert formats.sparse.stored_sparse(t, min_sparsity=0.0)
    assert not formats.sparse.stored_sparse(torch.randn(16, 16), min_sparsity=0.0)  # no zeros: larger sparse
    assert not formats.sparse.stored_sparse(torch.zeros(8, 8, dtype=torch.int64))


@pytest.mark.parametrize("count", [1, 7, 8, 9, 1001])
def test_bitmask_packs_and_unpacks(count):
    mask = torch.rand(count, generator=torch.Generator().manual_seed(count)) > 0.5
    packed = formats.sparse.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (count + 7) // 8
    assert torch.equal(formats.sparse.unpack_bits(packed, count), mask)
    t = torch.randn(count, 3, dtype=torch.float16) * (torch.rand(count, 3) > 0.6)
    assert torch.equal(_bits(formats.sparse.decode(*formats.sparse.encode(t), list(t.shape))), _bits(t))


def test_foreign_or_newer_files_fail_with_one_line(tmp_path):
    model, tokenizer = build_tiny("tiny_bert", "sequence_classification")
    _prune(model, 0.7)
    directory = tmp_path / "m"
    formats.save(model, tokenizer, directory)
    path = directory / formats.sparse.SPARSE_FILE
    with pytest.raises(SqueezeError, match="does not hold a BertLMHeadModel: 6 missing keys .* 4 unexpected keys"):
        formats.load(directory, "causal_lm")
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "squeeze-sparse", "version": "9",
                                                         "shapes": "{}", "tied": "{}"})
    with pytest.raises(SqueezeError, match="sparse format version '9', this squeeze reads version 1"):
        formats.load(directory, "sequence_classification")
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(SqueezeError, match="is not a squeeze sparse checkpoint"):
        formats.load(directory, "sequence_classification")
    # A state dict that does not fit the config's model is named, not silently random-initialised.
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "squeeze-sparse", "version": "1",
                                                         "shapes": json.dumps({}), "tied": json.dumps({})})
    with pytest.raises(SqueezeError, match="does not hold a BertForSequenceClassification"):
        formats.load(directory, "sequence_classification")


@pytest.mark.parametrize("name, bits, kernel", [("tiny_llama", 8, "dequantize"), ("tiny_gpt2", 4, "dequantize"),
                                                ("tiny_bert", 8, "dequantize")])
def test_pruned_and_quantized_weights_store_only_their_survivors(name, bits, kernel, tmp_path):
    """[imp,int8wo] / [wanda,int4wo]: the integer matrices keep the pruned zeros (quantization maps 0 to 0), and
    the saved directory holds a bitmask and the non-zero integers instead of every integer; read back bit for bit."""
    from squeeze.compress import quantization as q
    from squeeze.formats import packed

    head = "sequence_classification" if name == "tiny_bert" else "causal_lm"
    model, tokenizer = build_tiny(name, head)
    pruned = _prune(model, 0.7)
    quantizer = q.WeightOnlyQuantization(bits=bits, group_size=32 if bits == 4 else None, embeddings=False,
                                         cpu_kernel=kernel)
    quantizer.name = "q"
    quantizer.prepare_model(model, tokenizer)
    model = quantizer.finalize(model).eval()
    state = model.state_dict()
    weights = packed.integer_weights(model)
    zeros = [n for n in weights if float((state[n] == 0).float().mean()) >= 0.5]
    assert zeros, "pruned matrices keep their zeros once quantized"
    formats.save(model, tokenizer, tmp_path / "both")
    assert formats.saved_format(tmp_path / "both") == packed.FORMAT  # not compressed-tensors: it stores zeros
    again = formats.load(tmp_path / "both", head).eval()
    for n, t in again.state_dict().items():
        assert torch.equal(t, state[n]), n
    ids = torch.randint(5, 200, (2, 12))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    # The matrices' own bytes: one bit per entry plus the 30 % kept (a byte each, or half a byte at int4).
    with safe_open(str(tmp_path / "both" / packed.PACKED_FILE), framework="pt") as f:
        meta = json.loads(f.metadata()["sparse"])
        stored = sum(f.get_slice(k).get_shape()[0]  # 1-D uint8 / int8: bytes
                     for k in f.keys() if k.endswith((":bitmask", ":values", ":values:int4")))  # noqa: SIM118
    assert set(meta) == set(zeros)
    entries = sum(state[n].numel() for n in meta)
    dense = entries if bits == 8 else entries / 2
    assert stored <= (1 / 8 + (0.3 if bits == 8 else 0.15) + 0.02) * entries < dense
    assert len(pruned) >= len(meta) > 0


def test_a_pruned_int8_model_is_a_fraction_of_its_float_checkpoint(tmp_path):
    """Every matrix (embeddings included) 70 % pruned then int8: at most 0.12 x the fp32 directory's weights file
    (dense int8: ~0.26 x), where compressed-tensors would have kept the zeros. 256 wide: each row's float32
    scale costs 4/256 of a byte an entry (4/576 on SmolLM2; at tiny_llama's 64 it alone would add 0.016 x)."""
    from squeeze.compress import quantization as q

    model, tokenizer = build_tiny("tiny_llama", "causal_lm", hidden_size=256, intermediate_size=512)
    formats.save(model, tokenizer, tmp_path / "fp32")
    _prune(model, 0.7, include=".", exclude="norm")
    quantizer = q.WeightOnlyQuantization(cpu_kernel="dequantize")
    quantizer.name = "q"
    quantizer.prepare_model(model, tokenizer)
    model = quantizer.finalize(model)
    formats.save(model, tokenizer, tmp_path / "both")
    fp32 = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    both = (tmp_path / "both" / formats.packed.PACKED_FILE).stat().st_size
    assert both <= 0.12 * fp32, both / fp32


def test_a_few_zero_heavy_integer_layers_keep_the_loadable_format(tmp_path):
    """Rounding alone can leave a layer a quarter zeros; survivors-only storage is chosen only where it saves at
    least packed.MIN_SAVING of the integer bytes, so an unpruned int8 model stays compressed-tensors (plain
    transformers loads it) even with one such layer, and the pruned one goes packed."""
    from squeeze.compress import quantization as q
    from squeeze.formats import packed

    model, tokenizer = build_tiny("tiny_llama", "causal_lm")
    quantizer = q.WeightOnlyQuantization(embeddings=False, cpu_kernel="dequantize")
    quantizer.name = "q"
    model = quantizer.finalize(quantizer.prepare_model(model, tokenizer))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.weight[:, : layer.weight.shape[1] // 2] = 0  # half of one of 14 layers: a few % of the bytes
    assert packed.sparse_pays(layer.weight, 8) and not packed.has_sparse_integers(model)
    formats.save(model, tokenizer, tmp_path / "few")
    assert formats.saved_format(tmp_path / "few") == formats.COMPRESSED
    assert formats.loads_in_transformers(tmp_path / "few").startswith("yes")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, q.QuantizedLinear):
                m.weight[:, : m.weight.shape[1] // 2] = 0
    assert packed.has_sparse_integers(model)
