"""Calibration batches and the input statistics the post-training methods read."""

import pytest
import torch
from conftest import PTQ_FAMILIES as FAMILIES, tiny_family as tiny, token_batches
from torch import nn

from squeeze.compress.calibration import (LayerStats, calibration_batches, collect_stats, layer_stack, linear_layers,
                                          sequential)
from squeeze.errors import SqueezeError


def test_windows_are_seeded_and_sized():
    docs = [list(range(i * 100, i * 100 + 60)) for i in range(5)]
    a = calibration_batches(docs, samples=6, seq_len=32, seed=1, batch_size=4)
    b = calibration_batches(docs, samples=6, seq_len=32, seed=1, batch_size=4)
    c = calibration_batches(docs, samples=6, seq_len=32, seed=2, batch_size=4)
    assert [x["input_ids"].shape for x in a] == [(4, 32), (2, 32)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
    stream = torch.tensor([t for d in docs for t in d])
    first = a[0]["input_ids"][0]
    start = int((stream == first[0]).nonzero())
    assert torch.equal(stream[start:start + 32], first)  # a contiguous window of the concatenated stream


def test_examples_from_a_loader_keep_masks_and_are_seeded():
    loader = token_batches(n=5, batch=4, length=12, padded=True)
    a = calibration_batches(loader, samples=7, seq_len=10, seed=0, batch_size=3)
    assert sum(len(x["input_ids"]) for x in a) == 7
    assert set(a[0]) == {"input_ids", "attention_mask"} and a[0]["input_ids"].shape[1] <= 10
    b = calibration_batches(loader, samples=7, seq_len=10, seed=0, batch_size=3)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


def test_bad_settings_name_the_fix():
    with pytest.raises(SqueezeError, match="lower seq_len"):
        calibration_batches([[1, 2, 3]], samples=2, seq_len=8)
    with pytest.raises(SqueezeError, match="samples=0 must be a positive integer"):
        calibration_batches([[1, 2, 3]], samples=0, seq_len=2)


def test_stats_match_the_definitions():
    x = torch.randn(50, 6) * torch.tensor([1.0, 2, 3, 4, 5, 60])
    stats = LayerStats(6)
    for chunk in x.split(7):  # running updates equal the formula over all rows
        stats.add(chunk)
    torch.testing.assert_close(stats.hessian, 2 * x.t() @ x / 50, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.norms, x.norm(dim=0))
    torch.testing.assert_close(stats.absmax, x.abs().amax(0))
    assert stats.tokens == 50


@pytest.mark.parametrize("family", FAMILIES)
def test_collect_skips_padding_and_covers_conv1d(family):
    model = tiny(family)
    batches = token_batches(n=2, batch=2, length=16, padded=True)
    stats = collect_stats(model, batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    first = next(iter(linear_layers(layer_stack(model)[0])))
    name = next(n for n in stats if n.endswith(first))
    assert stats[name].tokens == real
    assert stats[name].hessian.shape == (64, 64)  # GPT-2's c_attn is a Conv1D: in_features read correctly


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_sees_the_compressed_outputs_of_earlier_blocks(family):
    model = tiny(family)
    batches = token_batches(n=2, batch=2, length=16, padded=True)
    seen = []

    def zero_first_block(i, block, stats):
        seen.append((i, {n: s.tokens for n, s in stats.items()}, {n: s.hessian.clone() for n, s in stats.items()}))
        if i == 0:  # "compress" block 0 by zeroing its output projections: block 1's inputs must change
            for m in linear_layers(block).values():
                nn.init.zeros_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    reference = collect_stats(tiny(family), batches)
    sequential(model, batches, zero_first_block)
    assert [entry[0] for entry in seen] == [0, 1]
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert all(t == real for _, counts, _ in seen for t in counts.values())
    after = collect_stats(model, batches)
    short, hessian = next(iter(seen[1][2].items()))
    full = next(n for n in reference if n.endswith(".1." + short))
    torch.testing.assert_close(hessian, after[full].hessian, rtol=1e-4, atol=1e-5)  # block 0 as compressed
    assert not torch.allclose(hessian, reference[full].hessian)
    assert not model.training
