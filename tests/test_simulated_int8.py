"""compress=int8sim: weights rounded to int8 per tensor and dequantized back through bf16, post-training and
zero-shot (the nanoGPT study's int8 row): against a plain re-computation, the clamp range, a real zero-shot run
whose saved model reloads with plain transformers, and bad settings."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from squeeze import run
from squeeze.compress.quantization.simulated import SimulatedInt8, simulate
from squeeze.errors import SqueezeError

from conftest import compose_cfg, fast, read_result


def test_weights_land_on_the_int8_grid_of_one_scale_per_tensor_rounded_through_bf16():
    torch.manual_seed(0)
    w = torch.randn(64, 48)
    out, clamped = simulate(w, (-127, 127), 127, torch.bfloat16)
    # By hand: S = max|w| / 127, round, back to float through bf16.
    scale = w.abs().max() / 127
    expected = (torch.round(w / scale) * scale).to(torch.bfloat16).float()
    assert torch.equal(out, expected) and clamped == 0 and out.dtype == w.dtype
    assert 0 < (out - w).abs().max() <= scale / 2 + 1e-2 * w.abs().max()  # rounding, plus bf16's 8 bits
    levels = torch.round(out.double() / scale.double())
    assert levels.abs().max() == 127 and len(levels.unique()) > 100  # the grid's extremes and many of its levels


def test_the_clamp_range_matters_only_when_the_scale_lets_weights_reach_minus_128():
    w = torch.tensor([[-1.0, -0.5, 0.25, 0.9]])
    for clamp in ((-127, 127), (-128, 127)):  # S = max|w| / 127: the largest weight is ±127, no clamp
        assert simulate(w, clamp, 127, torch.float32)[1] == 0
    symmetric, n_sym = simulate(w, (-127, 127), 128, torch.float32)
    full, n_full = simulate(w, (-128, 127), 128, torch.float32)
    assert n_sym == 1 and n_full == 0  # -1.0 / (1/128) = -128: clamped to -127 in the symmetric range only
    assert full[0, 0] == -1.0 and symmetric[0, 0] == pytest.approx(-127 / 128)
    assert torch.equal(symmetric[0, 1:], full[0, 1:])


def test_a_zero_shot_run_evaluates_the_simulated_model_and_saves_it_as_float(tmp_path):
    common = ["model=tiny_gpt2", "task=austen", *fast("austen"), "trainer.max_steps=0", "perf=null",
              "callbacks.energy=null", "task.data.block_size=64"]
    plain = run.train(compose_cfg("train", [*common, "compress=none"], tmp_path / "none"))
    sim = run.train(compose_cfg("train", [*common, "compress=int8sim", "compress.int8sim.label=int8-sim"],
                                tmp_path / "sim"))
    assert plain["status"] == sim["status"] == "ok", sim["error"]
    summary = read_result(tmp_path / "sim")["compress"]["int8sim"]
    assert summary["activations"] == "untouched" and summary["weights_changed"] > 0.5 * summary["weights"]
    assert 0 < summary["relative_error"] < 0.02 and summary["weights_clamped"] == 0
    # Same test text, no training: the rounding moves perplexity a little, not a lot.
    ratio = sim["metrics"]["test/perplexity"] / plain["metrics"]["test/perplexity"]
    assert ratio != 1.0 and abs(ratio - 1) < 0.05
    # Saved as float, as large as before (a simulation), loadable without squeeze, every linear weight on its grid.
    assert sim["checkpoint_bytes"] == pytest.approx(plain["checkpoint_bytes"], rel=0.01)
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "none" / "model")
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "sim" / "model")
    w0 = before.transformer.h[0].mlp.c_fc.weight.detach()
    w1 = after.transformer.h[0].mlp.c_fc.weight.detach()
    assert torch.equal(w1, simulate(w0, (-127, 127), 127, torch.bfloat16)[0])
    assert torch.equal(before.transformer.wte.weight, after.transformer.wte.weight)  # embeddings=false


@pytest.mark.parametrize("setting, message", [
    ({"clamp": [0, 127]}, r"compress.int8sim.clamp=\[0, 127\]: give \[low, high\] within int8"),
    ({"scale_max": 100}, r"compress.int8sim.scale_max=100: give 127"),
    ({"dtype": "int8"}, r"compress.int8sim.dtype='int8' is not one of"),
])
def test_bad_settings_are_one_line(setting, message):
    with pytest.raises(SqueezeError, match=message):
        SimulatedInt8(**setting)
