"""On a machine with a GPU, in under ~10 minutes: one line per check, each with its ratio or figure.

    python benchmarks/gpu_check.py            # prints "no GPU: nothing checked" and exits 0 elsewhere

Checks: hardware=gpu fine-tune in bf16 (with NVML energy), torchao int8/int4 weight-only vs bf16 matmul
speed, 2:4 semi-structured sparse vs dense, a bf16 teacher (kd), speculative decoding, hardware=fsdp on one
device, hardware=deepspeed (ZeRO-2) on one device where deepspeed is installed. Each check runs on its own; a failure prints its line and the rest go on.
Written without a GPU at hand: unverified until it has run on one (see the README's Scale-out).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model=tiny_gpt2", "task=austen", "task.data.block_size=128", "task.data.max_examples.train=2000",
         "task.data.max_examples.validation=200", "task.data.max_examples.test=200", "trainer.max_steps=30",
         "trainer.enable_progress_bar=false", "perf.repeats=3"]


def _train(args: list[str], script: str = "train.py") -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    proc = subprocess.run([sys.executable, str(ROOT / script), *args, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                          timeout=240, capture_output=True, text=True)
    if not (run_dir / "result.json").exists():  # died before its record: the last lines say why
        raise RuntimeError(" | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:]))
    record = json.loads((run_dir / "result.json").read_text())
    if record["status"] != "ok":
        raise RuntimeError(record["error"])
    record["_dir"] = str(run_dir)
    return record


def _time(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


BASELINE: dict = {}


def check_gpu_bf16():
    r = BASELINE.setdefault("run", _train([*SMALL, "hardware=gpu", "perf.devices=[cpu,cuda]"]))
    energy = (r.get("energy") or {})
    return f"ppl {r['metrics']['test/perplexity']:.1f}, {r['train_tokens_per_s']:.0f} train tok/s, " \
           f"energy {energy.get('kwh')} kWh via {energy.get('gpu_source', energy.get('source'))}"


def _linear_pair(quantize):
    lin = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    dense = _time(lambda: lin(x))
    quantize(lin)
    return dense / _time(lambda: lin(x))


def check_torchao_int8():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    return f"speed ratio int8wo/bf16 {_linear_pair(lambda m: quantize_(m, Int8WeightOnlyConfig())):.2f}x"


def check_torchao_int4():
    from torchao.quantization import Int4WeightOnlyConfig, quantize_
    return f"speed ratio int4wo/bf16 {_linear_pair(lambda m: quantize_(m, Int4WeightOnlyConfig(group_size=64))):.2f}x"


def check_semi_structured():
    from torch.sparse import to_sparse_semi_structured
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    w = w * torch.tensor([1, 1, 0, 0], device="cuda", dtype=w.dtype).repeat(4096, 1024)  # 2:4 pattern
    x = torch.randn(4096, 128, device="cuda", dtype=torch.bfloat16)
    sparse = to_sparse_semi_structured(w)
    return f"speed ratio 2:4 sparse/dense {_time(lambda: w @ x) / _time(lambda: sparse @ x):.2f}x"


def check_weight_only_in_squeeze():
    """squeeze's own int8wo / int4wo after a GPU fine-tune: torchao's kernels on CUDA, its CPU kernels beside."""
    base = BASELINE.get("run") or BASELINE.setdefault("run", _train([*SMALL, "hardware=gpu", "perf.devices=[cpu,cuda]"]))
    parts = []
    for q in ("int8wo", "int4wo"):
        r = _train([*SMALL, "hardware=gpu", f"compress={q}", "perf.devices=[cpu,cuda]"])
        ratio = r["metrics"]["test/perplexity"] / base["metrics"]["test/perplexity"]
        speeds = {dev: (r["perf"].get(dev) or {}).get("decode_tokens_per_s", {}).get("batch_1")
                  for dev in ("cpu", "cuda")}
        parts.append(f"{q}: ppl x{ratio:.3f} of bf16 run, kernels {r.get('kernels')}, decode b1 tok/s {speeds}")
    return "; ".join(parts)


def check_teacher_bf16():
    teacher = _train([*SMALL, "hardware=gpu", "trainer.max_steps=10"])
    r = _train([*SMALL, "hardware=gpu", "compress=kd", f"compress.kd.teacher={teacher['_dir']}",
                "compress.kd.teacher_dtype=bfloat16", "compress.kd.student.layers=1"])
    return f"kd student ppl {r['metrics']['test/perplexity']:.1f} (teacher {teacher['metrics']['test/perplexity']:.1f})"


def check_speculative():
    target = _train([*SMALL, "hardware=gpu"])
    r = _train(["model=tiny_gpt2", "task=austen", f"ckpt={target['_dir']}", "hardware=gpu", "decode=speculative",
                f"draft={target['_dir']}", "task.data.max_examples.test=50"], script="evaluate.py")
    return f"speculative: {json.dumps(r.get('speculative'))[:200]}"


def check_fsdp_one_device():
    r = _train([*SMALL, "hardware=fsdp", "trainer.devices=1"])
    return f"fsdp 1 device: ppl {r['metrics']['test/perplexity']:.1f}, {r['train_tokens_per_s']:.0f} train tok/s"


def check_deepspeed_zero2():
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return "skipped: deepspeed is not installed (pip install -e '.[deepspeed]')"
    r = _train([*SMALL, "hardware=deepspeed"])
    plain = _train([*SMALL, "hardware=gpu"])
    return (f"deepspeed ZeRO-2 1 device: ppl {r['metrics']['test/perplexity']:.1f} vs gpu "
            f"{plain['metrics']['test/perplexity']:.1f}, train tok/s ratio "
            f"{r['train_tokens_per_s'] / plain['train_tokens_per_s']:.2f}")


CHECKS = [check_gpu_bf16, check_weight_only_in_squeeze, check_torchao_int8, check_torchao_int4, check_semi_structured, check_teacher_bf16,
          check_speculative, check_fsdp_one_device, check_deepspeed_zero2]


def main() -> int:
    if not torch.cuda.is_available():
        print("no GPU: nothing checked")
        return 0
    print(f"device: {torch.cuda.get_device_name()}")
    failed = 0
    for check in CHECKS:
        start = time.perf_counter()
        try:
            line = check()
        except Exception as e:  # one line per check, whatever happens
            line, failed = f"FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", failed + 1
        print(f"{check.__name__.removeprefix('check_')}: {line} [{time.perf_counter() - start:.0f}s]", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
