"""benchmarks/pruning.py's quick mode: the sparse checkpoint shrinks with sparsity, latencies are measured."""

from __future__ import annotations

import importlib.util
from itertools import pairwise

from conftest import ROOT

spec = importlib.util.spec_from_file_location("benchmark_pruning", ROOT / "benchmarks" / "pruning.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_quick_run_sizes_fall_with_sparsity_and_latencies_are_measured(capsys):
    sizes, latencies = bench.main(["--quick", "--repeats", "1", "--threads", "1", "--sparsities", "0.3,0.5,0.7,0.9"])
    for kind in ("bert", "gpt2"):
        rows = [r for r in sizes if r["model"] == kind]
        assert [r["sparsity"] for r in rows] == [0.0, 0.3, 0.5, 0.7, 0.9]
        ratios = [r["size_ratio"] for r in rows]
        assert all(a > b for a, b in pairwise(ratios)), ratios
        at70 = next(r for r in rows if r["sparsity"] == 0.7)
        assert at70["size_ratio"] < 1 and at70["prunable_ratio"] < at70["size_ratio"]  # embeddings stay dense
        assert at70["format"] == "sparse" and abs(at70["reached"] - 0.7) < 1e-3

        variants = {r["variant"]: r for r in latencies if r["model"] == kind}
        assert list(variants) == ["dense", "heads-25%", "heads-50%"]
        assert variants["dense"]["heads"] == [4, 4] and variants["heads-50%"]["heads"] == [2, 2]
        assert variants["heads-50%"]["params"] < variants["heads-25%"]["params"] < variants["dense"]["params"]
        assert all(r[f"b{b}_s"] > 0 for r in variants.values() for b in bench.BATCHES)
    printed = capsys.readouterr().out
    assert "prunable×dense" in printed and "heads-50%" in printed
