"""Measurements for issue #15 on the default job (minilm x rotten_tomatoes, 100 steps, seed 42).

Usage: python benchmarks/resume_kill.py whole | kill [seed]   (outputs under $SQUEEZE_BENCH_OUT, default /tmp/squeeze-resume).
"""
import csv, json, os, random, signal, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]; PY = sys.executable; OUT = Path(os.environ.get("SQUEEZE_BENCH_OUT", "/tmp/squeeze-resume")); OUT.mkdir(parents=True, exist_ok=True)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}

def start(args, log):
    return subprocess.Popen([PY, str(ROOT / "train.py"), *args], cwd=OUT, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT)

def rec(d): return json.loads((Path(d) / "result.json").read_text())

def csv_max_step(d):
    try:
        rows = list(csv.DictReader(open(Path(d) / "csv" / "metrics.csv")))
    except (OSError, csv.Error):
        return -1
    return max([int(r["step"]) for r in rows if r.get("train/loss")] or [-1])

what = sys.argv[1]
if what == "whole":
    d = OUT / "whole"; t = time.time()
    assert start([f"hydra.run.dir={d}"], OUT / "whole.log").wait() == 0
    r = rec(d); print(json.dumps({"wall": time.time() - t, "train_seconds": r["train_seconds"], "checkpoint_seconds": r["checkpoint_seconds"], "metrics": r["metrics"]}))
elif what == "noresume":
    d = OUT / "noresume"
    assert start([f"hydra.run.dir={d}", "callbacks.resume=null"], OUT / "noresume.log").wait() == 0
    r = rec(d); print(json.dumps({"train_seconds": r["train_seconds"], "metrics": r["metrics"]}))
elif what == "kill":
    random.seed(int(sys.argv[2]) if len(sys.argv) > 2 else None)
    target = random.randint(30, 95)
    d = OUT / f"killed_{target}"
    args = [f"hydra.run.dir={d}", "+logger.csv.flush_logs_every_n_steps=1", "perf=null"]
    p = start(args, OUT / f"killed_{target}.log")
    while csv_max_step(d) < target and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    killed_at = csv_max_step(d)
    status = rec(d)["status"]
    last = d / "checkpoints" / "last.ckpt"
    t = time.time()
    code = start([*args, "ckpt_path=last"], OUT / f"resumed_{target}.log").wait()
    r = rec(d)
    print(json.dumps({"target": target, "killed_after_step": killed_at, "status_after_kill": status, "resume_exit": code,
                      "resumed_from": r.get("resumed_from"), "steps_lost": killed_at + 1 - (r.get("resumed_from") or {}).get("step", 0),
                      "resume_wall": time.time() - t, "metrics": r["metrics"], "train_seconds": r["train_seconds"]}))
