"""Quantization: the math's error bound, Conv1D→Linear equivalence, QAT (straight-through, plain state
dict, converted = fake-quant outputs), embeddings quantized, packed checkpoints (same outputs, really
smaller), real runs (qat, qat+dq, resume, evaluate.py with compress=dq) and bad input."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST, LM_FAST, build_tiny, compose_cfg, random_ids, read_result
from transformers import AutoConfig, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from squeeze import run
from squeeze.run.build import chain as build_chain
from squeeze.compress import quantization as q
from squeeze.compress.quantization import post_training
from squeeze.formats.packed import PACKED_FILE, is_packed, load_packed, pack_int4, save_packed, unpack_int4
from squeeze.errors import SqueezeError
from squeeze.formats.compressed import is_compressed




# The CPU weight-only kernels against the dequantized path: bf16 activations (and scales) carry 8 bits of
# mantissa, ~0.4% per rounding; through a 2-layer tiny model the logits moved ≤ 0.7% of the largest one.
BF16_TOLERANCE = 2e-2


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _compressor(cls, name, **kwargs):
    c = cls(**kwargs)
    c.name = name
    return c


# -- the math --------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", [
    q.Scheme(8, True, "channel"), q.Scheme(8, False, "channel"), q.Scheme(8, True, "tensor"),
    q.Scheme(8, False, "tensor"), q.Scheme(4, True, "channel", 16), q.Scheme(4, False, "channel", 8),
])
def test_quantize_dequantize_error_is_within_half_a_step(scheme):
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.rand(48, 1) * 3 + 0.5 * torch.rand(48, 1)  # rows of different ranges
    w[3] = 0.0  # an all-zero row quantizes to zeros
    scale, zero_point = q.choose_qparams(w, scheme)
    codes = q.quantize(w, scale, zero_point, scheme)
    assert codes.dtype == torch.int8 and codes.min() >= scheme.qmin and codes.max() <= scheme.qmax
    error = (q.dequantize(codes, scale, zero_point) - w).abs()
    assert (error <= q.quantization_error_bound(scale, w.shape) * (1 + 1e-5) + 1e-7).all()
    assert error.max() > 0  # it really quantized
    assert torch.equal(q.dequantize(codes, scale, zero_point)[3], torch.zeros(64))


def test_symmetric_int8_is_q8bert():
    w = torch.tensor([[0.5, -2.0, 1.0, 0.01]])
    scale, zero_point = q.choose_qparams(w, q.Scheme(8, True, "tensor"))
    assert zero_point is None and scale.item() == pytest.approx(2.0 / 127)  # S = 127 / max|W| (inverted)
    codes = q.quantize(w, scale, zero_point, q.Scheme(8, True, "tensor"))
    assert codes.tolist() == [[32, -127, 64, 1]]  # round(x·127/max|W|), clamped to ±127


def test_affine_keeps_zero_exact_and_uses_the_whole_range():
    w = torch.tensor([[0.9, 1.0, 1.3, 2.0]])  # all positive, like LayerNorm weights
    scheme = q.Scheme(8, False, "tensor")
    scale, zero_point = q.choose_qparams(w, scheme)
    codes = q.quantize(w, scale, zero_point, scheme)
    assert codes.max().item() == 127 and q.dequantize(torch.tensor([[zero_point.item()]], dtype=torch.int8),
                                                      scale, zero_point).item() == 0.0


def test_straight_through_gradient():
    w = torch.randn(4, 8, requires_grad=True)
    q.fake_quant(w, q.Scheme(4, True, "channel")).mul(torch.arange(8.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(8.0).expand(4, 8))


def test_int4_nibbles_round_trip():
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(3)[:45].view(5, 9)  # odd count: padded
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.numel() == 23
    assert torch.equal(unpack_int4(packed, [5, 9]), values)


# -- Conv1D ----------------------------------------------------------------------------------------
def test_conv1d_to_linear_computes_the_same():
    conv = Conv1D(24, 16)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(q.conv1d_to_linear(conv)(x), conv(x), rtol=1e-6, atol=1e-6)
    model, _ = build_tiny("tiny_gpt2", "causal_lm")
    inputs = random_ids(model)
    before = _out(model, inputs)
    converted = q.convert_conv1d(model)
    assert len(converted) == 8 and not any(isinstance(m, Conv1D) for m in model.modules())
    torch.testing.assert_close(_out(model, inputs), before, rtol=1e-5, atol=1e-5)


# -- QAT without Lightning --------------------------------------------------------------------------
@pytest.mark.parametrize("name, head, settings", [
    ("tiny_gpt2", "causal_lm", {}),                                  # Conv1D, lm_head tied to wte
    ("tiny_bert", "sequence_classification", {"activations": "affine"}),
    ("tiny_llama", "causal_lm", {"granularity": "tensor", "activations": "symmetric"}),
    ("tiny_bert", "sequence_classification", {"bits": 4, "group_size": 16, "weights": "affine"}),
])
def test_qat_converted_integer_model_matches_its_fake_quant_outputs(name, head, settings):
    model, _ = build_tiny(name, head)
    names = list(model.state_dict())
    inputs = random_ids(model)
    qat = _compressor(q.QuantizationAwareTraining, "qat", **settings)
    qat.prepare_model(model, None)
    float_out = _out(model, inputs)
    qat.install(model)
    qat.active = True
    model.train()
    for _ in range(2):  # training forwards: gradients reach the float weights, EMA ranges are collected
        model(**inputs).logits.float().pow(2).mean().backward()
    emb = model.get_input_embeddings().weight
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert list(model.state_dict()) == names  # state-dict names stay plain while fake-quantizing
    model.eval()
    fake = _out(model, inputs)
    assert not torch.equal(fake, float_out)  # fake quantization changes the outputs
    qat.fake_quant_batches = 2
    qat.finalize(model)
    assert isinstance(model.get_input_embeddings(), q.QuantizedEmbedding)
    kernels = _out(model, inputs)  # torch's CPU kernels: activations rounded to bf16 around each matmul
    assert (kernels - fake).abs().max() <= BF16_TOLERANCE * fake.abs().max()
    q.use_cpu_kernel(model, "dequantize")  # the conversion itself is exact
    torch.testing.assert_close(_out(model, inputs), fake, rtol=1e-5, atol=1e-5)
    summary = qat.summary()
    assert summary["embeddings_quantized"] >= 1 and summary["quantized_modules"] >= 8


def test_qat_quantizes_biases_and_norms_affine_by_default():
    model, _ = build_tiny("tiny_bert", "sequence_classification")
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.weight.uniform_(0.8, 1.3)
    qat = _compressor(q.QuantizationAwareTraining, "qat")
    qat.finalize(model)
    ln = model.bert.embeddings.LayerNorm.weight
    assert len(ln.unique()) <= 256 and len(ln.unique()) > 16  # on an 8-bit grid, not collapsed
    step = (ln.max() - 0) / 255  # affine: the range [0, max] has 255 steps
    assert ((ln / step - torch.round(ln / step)).abs() < 1e-3).all()


# -- post-training conversion and packed checkpoints -------------------------------------------------
CONVERSIONS = [
    ("dq", q.DynamicQuantization, {"bits": 8}, 8),
    ("dq", q.DynamicQuantization, {"bits": 7, "activations": "tensor"}, 7),
    ("int8wo", q.WeightOnlyQuantization, {}, 8),
    ("int4wo", q.WeightOnlyQuantization, {"bits": 4, "group_size": 32}, 4),
]


@pytest.mark.parametrize("key, cls, settings, bits", CONVERSIONS)
@pytest.mark.parametrize("name, head", [("tiny_gpt2", "causal_lm"), ("tiny_bert", "sequence_classification"),
                                        ("tiny_llama", "causal_lm")])
def test_packed_round_trip_gives_the_same_quantized_model(key, cls, settings, bits, name, head,
                                                          tmp_path):
    model, tokenizer = build_tiny(name, head)
    inputs = random_ids(model)
    reference = _out(model, inputs)
    c = _compressor(cls, key, **settings)
    c.finalize(c.prepare_model(model, tokenizer))
    quantized = _out(model, inputs)
    assert (quantized - reference).abs().max() < (0.5 if bits == 4 else 0.1) * reference.abs().max()
    # Every Linear/Conv1D/Embedding is integer, the embeddings included.
    assert not any(q.layer_kind(m) and not isinstance(m, (q.QuantizedLinear, q.QuantizedEmbedding))
                   for m in model.modules())
    assert c.summary()["embeddings_quantized"] >= 1 and c.summary()["bits"] == bits
    if model.config.tie_word_embeddings and head == "causal_lm":
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    save_packed(model, tokenizer, tmp_path)
    assert is_packed(tmp_path) and not (tmp_path / "model.safetensors").exists()
    back = load_packed(tmp_path, head)
    assert torch.equal(_out(back, inputs), quantized)
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    if model.config.tie_word_embeddings and head == "causal_lm":
        assert back.get_output_embeddings().weight is back.get_input_embeddings().weight


def test_embeddings_left_in_float_keep_their_tied_head_in_float():
    model, _ = build_tiny("tiny_gpt2", "causal_lm")
    c = _compressor(q.WeightOnlyQuantization, "int8wo", embeddings=False, exclude=[r"\.0\.mlp\."])
    c.finalize(model)
    assert type(model.transformer.wte) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.transformer.wte.weight
    assert type(model.transformer.h[0].mlp.c_fc) is Conv1D  # excluded by pattern: left as it was
    assert c.summary()["quantized_modules"] == 6 and c.summary()["embeddings_quantized"] == 0


def test_a_bf16_model_reloads_in_bf16(tmp_path):
    model, tokenizer = build_tiny("tiny_gpt2", "sequence_classification")
    model.to(torch.bfloat16)
    _compressor(q.WeightOnlyQuantization, "int8wo").finalize(model)
    inputs = random_ids(model)
    quantized = _out(model, inputs)
    assert quantized.dtype == torch.bfloat16
    save_packed(model, tokenizer, tmp_path)
    back = load_packed(tmp_path, "sequence_classification")
    assert back.transformer.ln_f.weight.dtype == torch.bfloat16 and back.score.scale.dtype == torch.float32
    assert torch.equal(_out(back, inputs), quantized)


def test_packed_checkpoints_are_4x_and_7x_smaller_than_fp32(tmp_path):
    # BERT at a width where per-row scales are small (they are 6% of a 64-wide tiny model's rows).
    config = AutoConfig.for_model("bert", hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=1024, vocab_size=8000, num_labels=2)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(str(tmp_path / "fp32"))
    fp32 = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    tokenizer = SimpleNamespace(save_pretrained=lambda d: None)
    ratios = {}
    for key, cls, settings, _ in CONVERSIONS:
        m = copy.deepcopy(model)
        _compressor(cls, key, **{**settings, "group_size": 64} if key == "int4wo" else settings).finalize(m)
        save_packed(m, tokenizer, tmp_path / key)
        ratios[key] = (tmp_path / key / PACKED_FILE).stat().st_size / fp32
    assert ratios["dq"] <= 0.27 and ratios["int8wo"] <= 0.27
    assert ratios["int4wo"] <= 1 / 6.8


def test_dq_reuses_the_integers_qat_trained():
    model, _ = build_tiny("tiny_gpt2", "causal_lm")
    qat = _compressor(q.QuantizationAwareTraining, "qat")
    qat.finalize(model)
    codes = model.transformer.h[0].attn.c_attn.weight.clone()
    dq = _compressor(q.DynamicQuantization, "dq", bits=8)  # QAT's int8 grid (auto takes int7 without VNNI)
    dq.finalize(model)
    assert dq.summary()["by_kind"]["reused"] == dq.summary()["quantized_modules"] == 11
    layer = model.transformer.h[0].attn.c_attn
    assert layer.kernel == "dynamic_fbgemm_token" and torch.equal(layer.weight, codes)


# -- runs -------------------------------------------------------------------------------------------
RUN = [*FAST, "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "perf=null"]


def test_qat_run_resumes_and_evaluate_reloads_the_packed_model(tmp_path):
    overrides = [*RUN, "model=tiny_bert", "task=rotten_tomatoes", "compress=qat", "trainer.max_epochs=5",
                 "compress.qat.activations=affine", "compress.qat.start_step=1", "trainer.val_check_interval=2",
                 "trainer.limit_train_batches=4", "checkpoint.keep_after_success=all"]
    first = run.train(compose_cfg("train", [*overrides, "trainer.max_steps=2"], tmp_path))
    assert first["status"] == "ok", first["error"]
    assert first["compress"]["qat"]["fake_quant_batches"] == 1  # step 0 ran in float (start_step=1)
    # The Lightning checkpoint is plain (a fresh model loads it) and carries the EMA input ranges.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    plain, _ = build_tiny("tiny_bert", "sequence_classification")
    assert {k.removeprefix("model.") for k in ckpt["state_dict"] if k.startswith("model.")} == set(plain.state_dict())
    ranges = next(s["ranges"] for s in ckpt["callbacks"].values() if "ranges" in s)
    assert len(ranges) == 2 * 6 + 2 and all(r[0] < r[1] for r in ranges.values())
    resumed = run.train(compose_cfg("train", [*overrides, "trainer.max_steps=4", "ckpt_path=last"], tmp_path))
    assert resumed["status"] == "ok", resumed["error"]
    qat = resumed["compress"]["qat"]
    assert qat["fake_quant_batches"] == 3 and qat["embeddings_quantized"] == 3 and qat["activations"] == "affine"
    files = {p.name for p in (tmp_path / "model").iterdir()}
    # BERT's int8 weights, QAT's static input ranges and int8 embeddings: all in compressed-tensors
    assert "model.safetensors" in files and PACKED_FILE not in files and is_compressed(tmp_path / "model")
    evaluated = run.evaluate(compose_cfg("eval", [*RUN, "model=tiny_bert", "task=rotten_tomatoes",
                                                  f"ckpt={tmp_path}"], tmp_path / "eval"))
    assert evaluated["status"] == "ok", evaluated["error"]
    assert evaluated["choices"]["compress"] == "qat"
    for key, value in resumed["metrics"].items():
        assert evaluated["metrics"][key] == pytest.approx(value, abs=1e-6)
    assert evaluated["checkpoint_bytes"] == read_result(tmp_path)["checkpoint_bytes"]


def test_qat_then_dq_chain_runs_each_step_once_in_order(tmp_path):
    overrides = [*RUN, *LM_FAST, "model=tiny_gpt2", "task=austen", "compress=[qat,dq]", "trainer.max_steps=2",
                 "compress.dq.bits=8"]  # QAT's int8 grid, kept (auto takes int7 on a CPU without VNNI)
    record = run.train(compose_cfg("train", overrides, tmp_path))
    assert record["status"] == "ok", record["error"]
    saved = read_result(tmp_path)
    assert saved["compress"]["chain"] == ["qat", "dq"] and saved["choices"]["compress"] == "qat+dq"
    assert saved["compress"]["qat"]["fake_quant_batches"] == 2 and saved["compress"]["qat"]["by_kind"]["conv1d"] == 8
    dq = saved["compress"]["dq"]
    assert dq["by_kind"]["reused"] == dq["quantized_modules"] == 11  # dq found QAT's int8 layers, converted once
    model = load_packed(tmp_path / "model", "causal_lm")
    assert model.transformer.h[0].mlp.c_fc.kernel == "dynamic_fbgemm_token"
    evaluated = run.evaluate(compose_cfg("eval", [*RUN, *LM_FAST, "model=tiny_gpt2", "task=austen",
                                                  f"ckpt={tmp_path}"], tmp_path / "eval"))
    assert evaluated["status"] == "ok", evaluated["error"]
    assert evaluated["metrics"]["test/perplexity"] == pytest.approx(record["metrics"]["test/perplexity"], rel=1e-6)


def test_post_training_dq_through_evaluate(tmp_path):
    plain = tmp_path / "plain"
    common = [*RUN, "model=tiny_llama", "task=rotten_tomatoes"]
    assert run.train(compose_cfg("train", [*common, "trainer.max_steps=1"], plain))["status"] == "ok"
    evaluated = run.evaluate(compose_cfg("eval", [*common, f"ckpt={plain}", "compress=dq"], tmp_path / "dq"))
    assert evaluated["status"] == "ok", evaluated["error"]
    assert evaluated["choices"]["compress"] == "dq" and evaluated["compress"]["dq"]["quantized_modules"] == 16
    assert is_compressed(tmp_path / "dq" / "model") and not is_packed(tmp_path / "dq" / "model")
    assert evaluated["checkpoint_bytes"] < 0.5 * read_result(plain)["checkpoint_bytes"]
    again = run.evaluate(compose_cfg("eval", [*common, f"ckpt={tmp_path / 'dq'}"], tmp_path / "again"))
    assert again["status"] == "ok", again["error"]
    for key, value in evaluated["metrics"].items():
        assert again["metrics"][key] == pytest.approx(value, abs=1e-6)


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, overrides, message", [
    ("int8wo", ["compress.int8wo.bits=3"], "compress.int8wo.bits=3: only 4 or 8 bits are supported"),
    ("int4wo", ["compress.int4wo.group_size=48"], "compress.int4wo.group_size=48 does not divide the 64 entries"),
    ("dq", ["compress.dq.bits=4"], "compress.dq.bits=4: dynamic quantization takes auto, 8 or 7"),
    ("dq", ["compress.dq.activations=channel"], "compress.dq.activations='channel' is not one of"),
    ("dq", ["compress.dq.backend=torchao", "compress.dq.activations=tensor"], "torchao's dynamic int8 scales"),
    ("qat", ["compress.qat.biases=minmax"], "compress.qat.biases='minmax' is not one of"),
    ("int8wo", ["compress.int8wo.granularity=tensor", "compress.int8wo.group_size=32"], "needs granularity=channel"),
    ("int4wo", ["compress.int4wo.cpu_kernel=fast"], "compress.int4wo.cpu_kernel='fast' is not one of"),
])
def test_bad_settings_fail_with_one_line(option, overrides, message, tmp_path):
    cfg = compose_cfg("train", ["model=tiny_bert", f"compress={option}", *overrides], tmp_path)
    model, tokenizer = build_tiny("tiny_bert", "sequence_classification")
    with pytest.raises(SqueezeError, match=message.replace("(", r"\(")) as error:
        build_chain(cfg.compress)[0].prepare_model(model, tokenizer)
    assert "\n" not in str(error.value)


def test_qat_after_an_integer_conversion_fails_fast(tmp_path):
    cfg = compose_cfg("train", ["model=tiny_bert", "compress=[dq,qat]"], tmp_path)
    with pytest.raises(SqueezeError, match="qat trains the model but comes after dq"):
        build_chain(cfg.compress)


def test_dq_refuses_a_gpu_run_and_a_machine_without_kernels(monkeypatch):
    dq = _compressor(q.DynamicQuantization, "dq")
    gpu_trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    with pytest.raises(SqueezeError, match="compress=dq \\(fbgemm\\) has CPU kernels only, but this run uses cuda"):
        dq.setup(gpu_trainer, None, "fit")
    model, _ = build_tiny("tiny_bert", "sequence_classification")
    dq.finalize(model)
    with pytest.raises(SqueezeError, match="fbgemm kernel runs on CPU only, but this model runs on meta"):
        model.classifier(torch.zeros(1, 64, device="meta"))
    assert "no fbgemm int8 CPU kernels" in q.dynamic_kernels_available(["qnnpack"])
    monkeypatch.setattr(post_training, "dynamic_kernels_available", lambda engines=None: "no kernels here")
    with pytest.raises(SqueezeError, match="compress.dq: no kernels here; use compress.dq.backend=torchao"):
        _compressor(q.DynamicQuantization, "dq").prepare_model(model, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: torchao's GPU weight-only kernels not checked")
@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 64)])
def test_weight_only_runs_torchao_kernels_on_gpu(bits, group_size):
    model, _ = build_tiny("tiny_bert", "sequence_classification")
    _compressor(q.WeightOnlyQuantization, "wo", bits=bits, group_size=group_size).finalize(model)
    inputs = random_ids(model)
    cpu = _out(model, inputs)
    model.cuda()
    gpu = _out(model, {k: v.cuda() for k, v in inputs.items()}).cpu()
    assert "torchao" in model.bert.encoder.layer[0].intermediate.dense.kernels_ran  # torchao's weight was used
    torch.testing.assert_close(gpu, cpu, rtol=0.05, atol=0.05)


def test_packed_file_of_another_format_or_version_is_refused(tmp_path):
    from safetensors.torch import save_file

    from squeeze.formats.packed import FORMAT, read_packed

    path = tmp_path / PACKED_FILE
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "other", "version": "1"})
    with pytest.raises(SqueezeError, match="is not a squeeze packed checkpoint"):
        read_packed(path)
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": FORMAT, "version": "99"})
    with pytest.raises(SqueezeError, match="packed format version '99'"):
        read_packed(path)
