"""A 6-cell sweep killed -9 half-way (3 cells done, the 4th training) and rerun with the same sweep dir.

Usage: python benchmarks/resume_sweep.py   (outputs under $SQUEEZE_BENCH_OUT, default /tmp/squeeze-resume).
"""
import json, os, signal, subprocess, sys, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]; PY = sys.executable; OUT = Path(os.environ.get("SQUEEZE_BENCH_OUT", "/tmp/squeeze-resume")); OUT.mkdir(parents=True, exist_ok=True); SW = OUT / "sweep"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
ARGS = ["-m", "model=tiny_bert,tiny_gpt2", "seed=1,2,3", "perf=null", "callbacks.energy=null", "trainer.enable_progress_bar=false",
        "task.data.max_examples.train=512", "task.data.max_examples.validation=32", "task.data.max_examples.test=32",
        "task.data.batch_size=8", "trainer.max_steps=120", "checkpoint.every_n_steps=10", f"hydra.sweep.dir={SW}"]
def cells():
    out = {}
    for d in sorted(p for p in SW.iterdir() if p.is_dir() and p.name[0].isdigit()):
        try: r = json.loads((d / "result.json").read_text())
        except (OSError, ValueError): r = {}
        out[d.name] = r
    return out
p = subprocess.Popen([PY, str(ROOT / "train.py"), *ARGS], cwd=OUT, env=ENV, stdout=open(OUT / "sweep1.log", "w"), stderr=subprocess.STDOUT)
def ready():
    c = cells() if SW.exists() else {}
    done = [n for n, r in c.items() if r.get("status") == "ok"]
    fourth = [n for n in c if n.startswith("3_")]
    return len(done) >= 3 and fourth and (SW / fourth[0] / "checkpoints" / "last.ckpt").is_file()
while not ready() and p.poll() is None: time.sleep(0.05)
p.send_signal(signal.SIGKILL); p.wait()
before = {n: (r.get("status"), r.get("created")) for n, r in cells().items()}
print("after kill:", json.dumps(before, indent=1))
t = time.time()
code = subprocess.run([PY, str(ROOT / "train.py"), *ARGS], cwd=OUT, env=ENV, stdout=open(OUT / "sweep2.log", "w"), stderr=subprocess.STDOUT).returncode
after = cells()
print("rerun exit", code, "wall", round(time.time() - t, 1))
for n, r in after.items():
    s0, c0 = before.get(n, (None, None))
    what = "skipped (unchanged)" if c0 == r.get("created") and s0 == "ok" else ("resumed from step %s" % r["resumed_from"]["step"] if r.get("resumed_from") else "ran from scratch")
    print(n, s0, "->", r.get("status"), what, "train_seconds=%.1f" % (r.get("train_seconds") or 0))
