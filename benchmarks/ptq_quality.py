"""Post-training compression quality, side by side in one run (issue 12): SmolLM2-135M on austen (perplexity
of the first `--lines` lines of Persuasion, the test novel, in non-overlapping 128-token blocks) and, given a
fine-tuned MiniLM run, rotten_tomatoes test accuracy. Each method starts from a fresh copy of the fp32 model;
the calibration data is the task's own train split (`calibration_from_data`: 128-token windows of the four
training novels; whole training reviews for rotten_tomatoes), seeded, shared by every method.

  OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/ptq_quality.py [--minilm-run <train.py run dir>] [--quick]

(`python train.py` — the default job — gives the MiniLM run. One thread on a shared 2-core machine: GPTQ and
SparseGPT run many small column operations that two competing OpenMP threads slow down badly.)

Rows: fp32; torch's quantize_dynamic with per-channel weights (the peer); squeeze dq with one activation scale
per tensor as it was (7-bit activations everywhere; then 8-bit on VNNI), dq as it is (one scale per token, int8 or
int7 weights, `bits=auto`), and with lm_head in float; [smoothquant,dq]; int4 round-to-nearest (int4wo, group 64,
layer stack only, as GPTQ); gptq 4-bit g64 (act_order; 64, not 128: SmolLM2's width 576 is 4.5 × 128, and groups
must divide it); one-shot magnitude / Wanda / SparseGPT at 50% unstructured and 2:4 (layer stack). Printed:
the metric, its ratio to fp32 (perplexity: method / fp32; accuracy: the difference in points), and the
seconds each method took to compress (calibration included); then CPU latency of fp32 and the dq rows (batch
1 × 128 tokens, median of `--repeats`). `--only REGEX` runs those methods (and fp32). An AVX2-only CPU's path
on a VNNI one: FBGEMM_ENABLE_INSTRUCTIONS=AVX2 (fbgemm's own switch; squeeze's dq reads it too).

Per-token dq, measured 2026-12-06 on this 2-core AVX512-VNNI CPU, nothing else running, defaults (600 lines:
65 test blocks; 128 calibration windows), `OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/ptq_quality.py
--only "dq|peer"`, then the same with FBGEMM_ENABLE_INSTRUCTIONS=AVX2 (perplexity, ratio to fp32 55.40):
                                                  VNNI             AVX2 path
  torch quantize_dynamic per-channel (peer)    196.43  3.546×   196.43  3.546×
  dq per tensor, 7-bit activations (before)    198.39  3.581×   198.39  3.581×
  dq per tensor, int8 weights (before)          96.16  1.736×   198.39  3.581×  (AVX2: 7-bit activations)
  dq per token, int8 weights                    57.97  1.046×    62.94  1.136×  (AVX2: 7-bit activations)
  dq per token, int7 weights                    58.53  1.056×    58.53  1.056×  (8-bit activations on both)
  squeeze dq (bits=auto: int8 | int7)           57.97  1.046×    58.53  1.056×
  squeeze dq, lm_head float                     57.25  1.033×    57.80  1.043×
  [smoothquant,dq] a=0.8                        56.28  1.016×    57.80  1.043×
  [smoothquant,dq] a=0.8, lm_head float         55.81  1.007×    57.38  1.036×
  CPU latency, batch 1 × 128 tokens, one thread, median of 10 (each model in turn, not interleaved):
  VNNI: fp32 533.3 ms, dq per tensor 227.1, dq per token 239.8, [smoothquant,dq] 214.5, lm_head float 287.3;
  AVX2 path: fp32 475.5, dq per tensor 276.0, dq per token 280.4, [smoothquant,dq] 297.1, lm_head float 317.0.

AWQ against GPTQ and RTN, the same defaults, measured 2026-12-06 (one thread; each method beside one other job, so
its seconds are inflated; `--only "awq|gptq|int4"`, the affine rows run on their own with the same data):
                                       symmetric int4          affine int4 (zero points)
  round-to-nearest g64 (layer stack)    79.08  1.427×           68.06  1.228×
  gptq g64 act_order                    60.64  1.095×  235 s    58.04  1.048×  254 s
  awq g64 (scales + clipping)           63.88  1.153×  265 s    62.52  1.128×  264 s
AWQ halves most of RTN's loss but stays behind GPTQ on this 135M model.
With scales for the layers whose scales cannot fold (compress.awq.scale_unfoldable, the default since; SmolLM2:
o_proj, under grouped-query attention), measured 2026-12-06, one thread, `--only "awq 4-bit g64 \(affine\)|folded
scales only|gptq 4-bit g64 affine"` (my tests ran beside part of it: seconds inflated):
  gptq g64 act_order affine                              58.04  1.048×  196 s
  awq g64 affine (the default: o_proj divides its input)  61.33  1.107×  244 s
  awq g64 affine, folded scales only (as before)          62.52  1.128×  206 s
MiniLM on rotten_tomatoes (`python train.py`'s run, fp32 75.96 %; `--skip-smollm2 --minilm-run <run> --only
"awq|int4 RTN g64 affine|gptq 4-bit g64 affine"`, nothing else running; points vs fp32): RTN g64 affine −0.70,
GPTQ affine −0.16, AWQ affine (default; BERT's q/k/v and FFN divide their inputs) +0.23, AWQ folded scales only
(value → output alone) −0.55, AWQ symmetric 0.00, AWQ without clipping 0.00, AWQ g32 0.00, [awq scales, gptq]
−0.39. The same models' agreement with fp32's predictions / mean KL(fp32 ‖ method) × 1e3: RTN 96.80 % / 3.72,
GPTQ 97.81 % / 0.92, AWQ default 97.58 % / 1.75, AWQ folded only 97.11 % / 2.86.
Duo scaling (compress.awq.duo_scaling: s = mean|X|^α / w_mean^(1−α), llmcompressor's default), the same protocol,
nothing else running, `--only "duo scaling"`: SmolLM2 true 62.43 1.127× (199 s), both (the better per α) 61.51
1.110× (241 s), against the default's (false) 1.107×; MiniLM −0.31 / −0.31 points against +0.23. Not the default.

Wanda with mask swaps (issue 28 §2; squeeze/compress/mask_swaps.py), measured 2026-12-06, one thread, nothing else
running: `--only wanda` (the 2:4 default row again with `--only "wanda 2:4$"` after the N:M swaps were fixed):
  wanda 50% (OWL 20/0.08 + 64 swaps, the default)      75.14  1.356×  272 s
  wanda 50%, no swaps (OWL; the default before)        91.99  1.660×  150 s
  wanda 2:4 (64 swaps, the default)                   126.96  2.292×  280 s
  wanda 2:4, no swaps (the paper's)                   223.60  4.036×   90 s

Earlier, before per-token dq (shared 2-core AVX512-VNNI CPU under load ~7-10 from other jobs, so seconds are inflated;
`--lines 100 --samples 16 --train-lines 4000`: 10 test blocks of Persuasion, 16 calibration windows from the
first 4000 lines of the train split; perplexity, ratio to fp32, compress seconds):
  fp32                                          53.26   1.000
  torch quantize_dynamic per-channel (peer)    176.41   3.312    11.4
  squeeze dq, 7-bit activations (before)       187.57   3.522     1.8
  squeeze dq (8-bit activations: the fix)       91.76   1.723     1.5
  squeeze dq, lm_head float                     88.25   1.657     0.9
  [smoothquant,dq] a=0.8                        59.37   1.115    40.0
  [smoothquant,dq] a=0.8, lm_head float         56.49   1.061    34.4
  int4 RTN g64 (layer stack)                    79.59   1.494     0.8
  gptq 4-bit g64 act_order                      62.28   1.169   181.2
  magnitude 50%                                423.25   7.947     8.7
  wanda 50%                                     98.60   1.851    40.5
  sparsegpt 50%                                 94.18   1.768   114.4
  magnitude 2:4                               1503.57  28.231     3.6
  wanda 2:4                                    216.01   4.056    20.7
  sparsegpt 2:4                                136.89   2.570    35.4
  CPU latency, batch 1 x 128 tokens: fp32 424.0 ms, dq 95.7 ms, [smoothquant,dq] 94.1 ms
  MiniLM on rotten_tomatoes (the default job's run, fp32 test accuracy 77.13%; points vs fp32):
  peer -0.86, dq before -1.64, dq -0.62, dq lm_head float -0.62, [smoothquant,dq] -0.94, int4 RTN -0.70,
  gptq -0.62, magnitude 50% -3.98, wanda 50% -3.36, sparsegpt 50% -1.87, magnitude 2:4 -6.95,
  wanda 2:4 -4.53, sparsegpt 2:4 -2.97

Earlier single-variable measurements that found the dq loss (folded in from the former
benchmarks/dq_perplexity.py and ptq_smollm2.py; SmolLM2, first 20 / 64 128-token blocks of the 600-line
slice, perplexity; 2-core AVX512-VNNI CPU, torch 2.13):
  fp32                                                   53.96 / 53.42
  int8 weights only (int8wo, per-channel)                54.17 / 53.52   weights are not the problem
  only the embeddings int8 | only lm_head int8            53.96 | 58.22
  torch quantize_dynamic per-tensor | per-channel        224.0 | 191.0 / 187.0
  squeeze dq with 7-bit activations (before the fix)     185.7 / 182.1   same kernel and scheme as torch's
  squeeze dq with 8-bit activations (the fix)             96.9 / 92.8
  squeeze dq, 8-bit, mlp.down_proj float                  58.3 / 57.4
  simulated per-token int8 | int7 activations             56.4 | 63.1
  SmoothQuant a=0.5 | a=0.8 + dq 8-bit                    65.7 | 58.0
  (32 calibration windows of Emma) int4 g64: RTN 78.71, GPTQ 68.65, GPTQ act_order 61.44;
  50%: magnitude 390.2, Wanda 99.5, SparseGPT 83.4;  2:4: magnitude 1360, Wanda 219.0, SparseGPT 125.4
The loss is the per-tensor dynamic activation scale: one int8 grid for a whole [tokens, channels] input
whose outlier channels (largest at down_proj's input) take the range; 7-bit activations halve it again.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from squeeze import formats, models
from squeeze.arch.linear import as_out_in
from squeeze.assets import cache_dir
from squeeze.compress.calibration import calibration_from_data, layer_stack, linear_layers
from squeeze.compress.awq import AWQ
from squeeze.compress.gptq import GPTQ
from squeeze.compress.quantization import DynamicQuantization, WeightOnlyQuantization
from squeeze.compress.smoothquant import SmoothQuant
from squeeze.compress.sparsegpt import SparseGPT
from squeeze.compress.sparsity_pattern import nm_mask, row_mask
from squeeze.compress.wanda import Wanda
from squeeze.formats import quantized_layers

CONF = Path(__file__).resolve().parents[1] / "conf"


# -- the methods: each takes (model, calibration batches) and returns the compressed model ------------
def named(compressor, name):
    compressor.name = name
    return compressor


def chain(*make):
    def build(model, batches):
        for m in make:
            c = m()
            if hasattr(c, "use_batches"):
                c.use_batches(batches)
            model = c.finalize(model)
        return model
    return build


def peer(model, batches):
    """torch's own dynamic int8: quantize_dynamic with per-channel weight scales (7-bit activations)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def seven_bit_dq(model, batches):
    """squeeze dq before both fixes: one activation scale per tensor, 7 bits (reduce_range=True) on every CPU."""
    return chain(lambda: named(DynamicQuantization(bits=8, activations="tensor"), "dq"))(model, batches)


def magnitude(pattern):
    @torch.no_grad()  # on the inner function: the outer one only builds it
    def build(model, batches):
        for module in linear_layers(layer_stack(model)).values():
            w = as_out_in(module)
            keep = row_mask(w.abs(), 0.5) if pattern == "unstructured" else nm_mask(w.abs(), 2, 4)
            w.mul_(keep.to(w.dtype))
        return model
    return build


def methods(quick: bool, only: str | None = None):
    dq = lambda **kw: named(DynamicQuantization(**kw), "dq")  # noqa: E731
    rows = {
        "fp32": lambda m, b: m,
        "torch quantize_dynamic per-channel (peer)": peer,
        "squeeze dq, 7-bit activations (before)": seven_bit_dq,
        "squeeze dq per tensor, int8 weights (before)": chain(lambda: dq(bits=8, activations="tensor")),
        "squeeze dq int8 weights": chain(lambda: dq(bits=8)),
        "squeeze dq int7 weights": chain(lambda: dq(bits=7)),
        "squeeze dq": chain(dq),
        "squeeze dq, lm_head float": chain(lambda: dq(lm_head=False)),
        "[smoothquant,dq] a=0.8": chain(lambda: named(SmoothQuant(0.8), "smoothquant"), dq),
        "[smoothquant,dq] a=0.8, lm_head float": chain(lambda: named(SmoothQuant(0.8), "smoothquant"),
                                                       lambda: dq(lm_head=False)),
        "int4 RTN g64 (int4wo, layer stack)": chain(lambda: named(WeightOnlyQuantization(
            bits=4, group_size=64, embeddings=False, lm_head=False), "int4wo")),
        "int4 RTN g64 affine (layer stack)": chain(lambda: named(WeightOnlyQuantization(
            bits=4, group_size=64, weights="affine", embeddings=False, lm_head=False), "int4wo")),
        "gptq 4-bit g64": chain(lambda: named(GPTQ(bits=4, group_size=64), "gptq")),
        "gptq 4-bit g64 affine": chain(lambda: named(GPTQ(bits=4, group_size=64, symmetric=False), "gptq")),
        "awq 4-bit g64 symmetric": chain(lambda: named(AWQ(bits=4, group_size=64, symmetric=True), "awq")),
        "awq 4-bit g64 (affine)": chain(lambda: named(AWQ(bits=4, group_size=64), "awq")),
        "awq 4-bit g64, folded scales only": chain(lambda: named(AWQ(bits=4, group_size=64, scale_unfoldable=False),
                                                               "awq")),
        "awq 4-bit g64, duo scaling": chain(lambda: named(AWQ(bits=4, group_size=64, duo_scaling=True), "awq")),
        "awq 4-bit g64, duo scaling both": chain(lambda: named(AWQ(bits=4, group_size=64, duo_scaling="both"), "awq")),
        "awq 4-bit g64, no clipping": chain(lambda: named(AWQ(bits=4, group_size=64, clip=False), "awq")),
        "awq 4-bit g32": chain(lambda: named(AWQ(bits=4, group_size=32), "awq")),
        "[awq scales, gptq] 4-bit g64 affine": chain(lambda: named(AWQ(bits=4, group_size=64, quantize=False), "awq"),
                                                     lambda: named(GPTQ(bits=4, group_size=64, symmetric=False), "gptq")),
        "magnitude 50%": magnitude("unstructured"),
        "wanda 50%": chain(lambda: named(Wanda(0.5), "wanda")),
        "wanda 50%, no swaps (the paper's mask, OWL)": chain(lambda: named(Wanda(0.5, swaps=0), "wanda")),
        "sparsegpt 50%": chain(lambda: named(SparseGPT(0.5), "sparsegpt")),
        "magnitude 2:4": magnitude("2:4"),
        "wanda 2:4": chain(lambda: named(Wanda(None, "2:4"), "wanda")),
        "wanda 2:4, no swaps (the paper's)": chain(lambda: named(Wanda(None, "2:4", swaps=0), "wanda")),
        "sparsegpt 2:4": chain(lambda: named(SparseGPT(None, "2:4"), "sparsegpt")),
    }
    if quick:
        keep = ("fp32", "squeeze dq", "[smoothquant,dq] a=0.8", "gptq 4-bit g64", "wanda 50%", "sparsegpt 2:4")
        rows = {k: v for k, v in rows.items() if k in keep}
    if only:
        rows = {k: v for k, v in rows.items() if k == "fp32" or re.search(only, k)}
    return rows


# -- metrics ----------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model, loader) -> float:
    total, count = 0.0, 0
    for batch in loader:
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    return math.exp(total / count)


@torch.no_grad()
def accuracy(model, loader) -> float:
    right, count = 0, 0
    for batch in loader:
        labels = batch.pop("labels")
        right += int((model(**batch).logits.argmax(-1) == labels).sum())
        count += len(labels)
    return 100.0 * right / count


@torch.no_grad()
def latency_ms(model, ids, repeats: int) -> float:
    model(input_ids=ids)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=ids)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def task_data(task: str, tokenizer, **overrides):
    node = OmegaConf.load(CONF / "task" / f"{task}.yaml").data
    for key, value in overrides.items():
        OmegaConf.update(node, key, value, merge=True)
    data = instantiate(node, tokenizer=tokenizer, seed=42, _convert_="all")
    data.setup("fit")
    return data


def compare(title, base, data, batches, metric, rows, higher_better: bool):
    print(f"\n## {title}\n")
    print(f"| method | {'accuracy %' if higher_better else 'perplexity'} | "
          f"{'Δ points vs fp32' if higher_better else 'ratio to fp32'} | compress s | eval s |")
    print("|---|---|---|---|---|")
    reference, results = None, {}
    for name, build in rows.items():
        model = copy.deepcopy(base)
        original = quantized_layers.reduce_range
        if build is seven_bit_dq:
            quantized_layers.reduce_range = lambda: True
        try:
            start = time.perf_counter()
            model = build(model, batches).eval()
            spent = time.perf_counter() - start
            start = time.perf_counter()
            value = metric(model, data.test_dataloader())
            evaluated = time.perf_counter() - start
        finally:
            quantized_layers.reduce_range = original
        reference = value if reference is None else reference
        versus = f"{value - reference:+.2f}" if higher_better else f"{value / reference:.3f}×"
        print(f"| {name} | {value:.2f} | {versus} | {spent:.1f} | {evaluated:.1f} |", flush=True)
        results[name] = (model, value)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=600, help="first lines of Persuasion scored")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples")
    parser.add_argument("--train-lines", type=int, default=None,
                        help="calibrate on the first N lines of the train split (default: all of it)")
    parser.add_argument("--minilm-run", default=None, help="a finished `python train.py` run (minilm)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 lines, 8 samples, 6 methods")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--only", default=None, help="regex: the methods to run (fp32 always runs)")
    args = parser.parse_args()
    if args.quick:
        args.lines, args.samples, args.repeats, args.train_lines = 40, 8, 2, args.train_lines or 2000
    cpu = "an int8 dot product (VNNI)" if quantized_layers.cpu_has_int8_dot() else "no int8 dot product (AVX2)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); fbgemm on {cpu}: dq bits=auto takes "
          f"int{DynamicQuantization().bits} weights")

    if not args.skip_smollm2:
        path = cache_dir() / "smollm2"
        tokenizer = models.prepare_tokenizer(AutoTokenizer.from_pretrained(path))
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        data = task_data("austen", tokenizer, block_size=128, **{"max_examples.test": args.lines,
                                                                  "max_examples.train": args.train_lines,
                                                                  "max_examples.validation": 10,
                                                                  "eval_batch_size": 8})
        start = time.perf_counter()
        batches = calibration_from_data(data, samples=args.samples, seq_len=128, seed=0, batch_size=8)
        print(f"calibration: {args.samples} windows of 128 tokens from the train split "
              f"({time.perf_counter() - start:.1f} s); test: {len(data.datasets['test'])} blocks of 128 tokens")
        results = compare(f"smollm2 / austen (Persuasion, first {args.lines} lines, 128-token blocks)", base, data,
                          batches, perplexity, methods(args.quick, args.only), higher_better=False)
        ids = data.datasets["test"][0]["input_ids"]
        ids = torch.tensor(ids[:128]).unsqueeze(0)
        print("\n## CPU latency, smollm2, batch 1 × 128 tokens (median; shared machine)\n")
        for name in ("fp32", "squeeze dq per tensor, int8 weights (before)", "squeeze dq", "[smoothquant,dq] a=0.8",
                     "squeeze dq, lm_head float", "[smoothquant,dq] a=0.8, lm_head float"):
            if name in results:
                print(f"| {name} | {latency_ms(results[name][0], ids, args.repeats):.1f} ms |", flush=True)
        del results

    if args.minilm_run:
        directory = Path(args.minilm_run) / "model"
        tokenizer = models.prepare_tokenizer(AutoTokenizer.from_pretrained(directory))
        base = formats.load(directory, "sequence_classification").eval()
        data = task_data("rotten_tomatoes", tokenizer)
        batches = calibration_from_data(data, samples=args.samples, seq_len=None, seed=0, batch_size=8)
        compare("minilm / rotten_tomatoes (test accuracy; fine-tuned by `python train.py`)", base, data, batches,
                accuracy, methods(args.quick, args.only), higher_better=True)


if __name__ == "__main__":
    main()
