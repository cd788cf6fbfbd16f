"""compress=dq's activations: one int8 scale per token, and 8 bits on CPUs without VNNI (int7 weights).

The per-token path divides each row by its absolute maximum around fbgemm's per-tensor kernel; checked against
the float product of the same integer weights, row by row, on inputs whose tokens differ 1000-fold in size
(the per-tensor path fails the same bound on the small rows). The AVX2 path is checked in a child Python with
FBGEMM_ENABLE_INSTRUCTIONS=AVX2, fbgemm's own switch, so a VNNI machine runs the kernels an AVX2-only one does:
there 8-bit activations against int8 weights saturate (shown), against int7 weights they do not."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from squeeze.compress.quantization import DynamicQuantization
from squeeze.formats.quantized_layers import QuantizedLinear

ROOT = Path(__file__).resolve().parents[1]


def _quantized_layer(activations: str, bits: int) -> tuple[QuantizedLinear, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    dq = DynamicQuantization(bits=bits, activations=activations)
    dq.name = "dq"
    dq.finalize(model)
    layer = model[0]
    assert isinstance(layer, QuantizedLinear)
    x = torch.randn(6, 64)
    x[1] *= 1000.0  # an outlier token: per tensor it takes the whole grid
    x[4] *= 1e-3
    return layer, x


def _row_errors(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """Each row's largest error against the float product of the layer's own integer weights, relative to
    that row's largest product (the bias, added exactly, would hide a tiny row's error)."""
    with torch.no_grad():
        product = x @ layer.dequantized().T
        out = layer(x) - layer.bias
    return (out - product).abs().amax(-1) / product.abs().amax(-1)


@pytest.mark.parametrize("bits", [8, 7])
def test_per_token_scales_keep_every_row_within_rounding(bits):
    layer, x = _quantized_layer("token", bits)
    assert layer.kernel == "dynamic_fbgemm_token"
    errors = _row_errors(layer, x)
    assert errors.max() < 0.03, errors  # 8 (or, with int8 weights on AVX2, 7) bits per row
    assert layer.kernels_ran == {"fbgemm_dynamic_per_token"}
    per_tensor, _ = _quantized_layer("tensor", bits)
    assert _row_errors(per_tensor, x)[[0, 2, 3, 4, 5]].min() > 0.2  # the outlier row took the grid


def test_summary_names_the_activation_grid():
    dq = DynamicQuantization()
    dq.name = "dq"
    dq.finalize(nn.Sequential(nn.Linear(16, 16)))
    summary = dq.summary()
    assert summary["bits_asked"] == "auto" and summary["bits"] in (7, 8)
    assert summary["activations"] == "token" and summary["activation_bits"] == 8
    assert "per token" in summary["activations_described"]


def test_without_vnni_int7_weights_keep_8_bit_activations_exact_where_int8_would_saturate():
    code = textwrap.dedent("""
        import json, torch
        from torch import nn
        from squeeze.compress.quantization import DynamicQuantization
        from squeeze.formats import quantized_layers as ql

        def layer(bits):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(256, 64, bias=False))
            with torch.no_grad():  # every weight at the edge of its grid: the worst case for int16 pair sums
                model[0].weight.copy_(torch.where(torch.rand(64, 256) < 0.5, 1.0, -1.0))
            dq = DynamicQuantization(bits=bits)
            dq.name = "dq"
            dq.finalize(model)
            return model[0], dq.summary()

        x = torch.where(torch.rand(8, 256) < 0.5, 1.0, -1.0)  # activations at the edge of theirs
        def error(l):
            with torch.no_grad():
                ref = x @ l.dequantized().T
                return float(((l(x) - ref).abs().amax(-1) / ref.abs().amax(-1)).max())

        auto, summary = layer("auto")
        int8, summary8 = layer(8)
        forced = layer(8)[0]
        forced(x)
        forced._cache.reduce_range = False  # what an AVX2 CPU computes if int8 weights met 8-bit activations
        print(json.dumps({"int8_dot": ql.cpu_has_int8_dot(), "auto_bits": summary["bits"],
                          "auto_activation_bits": summary["activation_bits"], "cpu": summary["cpu_int8_dot"],
                          "int8_activation_bits": summary8["activation_bits"],
                          "auto_error": error(auto), "int8_error": error(int8), "saturated_error": error(forced)}))
    """)
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert result["int8_dot"] is False and result["cpu"] == "no VNNI (AVX2)"
    assert result["auto_bits"] == 7 and result["auto_activation_bits"] == 8
    assert result["int8_activation_bits"] == 7  # int8 weights: fbgemm's 7-bit fallback, recorded
    assert result["auto_error"] < 0.01 and result["int8_error"] < 0.03
    assert result["saturated_error"] > 0.1  # the fallback is needed: without it the int16 sums clip


# -- bad values stop a run, and a whole -m sweep, before anything loads ----------------------------------------------
@pytest.mark.parametrize("cell, message", [
    (["compress=dq", "compress.dq.activations=chanel"], "compress.dq.activations='chanel' is not one of"),
    (["compress=dq", "compress.dq.bits=6"], "compress.dq.bits=6: dynamic quantization takes auto, 8 or 7"),
    (["compress=awq", "compress.awq.max_shrink=2"], r"compress.awq: awq max_shrink=2 must be in \[0, 1\)"),
    (["compress=awq", "compress.awq.grid=0"], "compress.awq: awq grid=0 must be a positive integer"),
])
def test_a_bad_value_stops_the_sweep_before_its_first_cell(cell, message):
    from squeeze.errors import SqueezeError
    from squeeze.run.sweep import check_settings

    with pytest.raises(SqueezeError, match=message) as error:
        check_settings([["compress=none"], cell], default=[])
    assert "\n" not in str(error.value)
    cells, _ = check_settings([["compress=none"], ["compress=dq", "compress.dq.bits=7", "compress.dq.label=DQ"],
                               ["compress=awq", "compress.awq.grid=10"]], default=[])
    assert len(cells) == 3  # good values pass
