"""A killed run loses minutes, not the run (squeeze.hardware.checkpointing): a kill -9 and a resume from a mid-epoch step
checkpoint give the uninterrupted run's metrics, SIGTERM/SIGINT save and record "interrupted", a kill during a
save leaves the previous checkpoint loadable, ckpt_path=last says when there is nothing to resume, and a
sweep rerun skips finished cells. The kill tests run train.py as a subprocess and sync on files, not sleeps."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from conftest import ROOT, compose_cfg, fast, read_result
from squeeze import run
from squeeze.errors import SqueezeError
from squeeze.run.loggers import earlier_wandb_id
from squeeze.hardware.checkpointing import EpochSampler, ResumableLoader, ResumeCheckpoint, resumable

# tiny_gpt2 (dropout on) on 64 examples, 8 a batch: 8 steps an epoch, so runs cross epoch boundaries.
CELL = ["model=tiny_gpt2", "task=rotten_tomatoes", *fast("rotten_tomatoes"), "perf=null", "callbacks.energy=null",
        "trainer.limit_val_batches=1", "trainer.max_epochs=100"]
POLL = 0.02


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)


def _wait_for(what, proc: subprocess.Popen, log: Path, timeout: float = 300):
    """Poll `what()` until it is true; fail (with the child's output) if the child ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        if proc.poll() is not None:
            pytest.fail(f"child exited ({proc.returncode}) before the condition held:\n{log.read_text()[-3000:]}")
        time.sleep(POLL)
    proc.kill()
    pytest.fail(f"timed out waiting:\n{log.read_text()[-3000:]}")


def _train(args: list[str], cwd: Path, log: Path, timeout: float = 600) -> int:
    proc = _start(args, cwd, log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        proc.kill()


def _start_killed_after_save(args: list[str], cwd: Path, log: Path, step: int) -> subprocess.Popen:
    """train.py, killed (SIGKILL, by itself) the moment its last.ckpt of optimizer step `step` is renamed into
    place: the worst moment for what the checkpoint covers, hit every time rather than by a poll's luck."""
    script = textwrap.dedent(f"""
        import os, runpy, signal, sys
        from squeeze.hardware.checkpointing import AtomicCheckpointIO
        save = AtomicCheckpointIO.save_checkpoint
        def save_then_die(self, checkpoint, path, storage_options=None):
            save(self, checkpoint, path, storage_options)
            if os.path.basename(path) == "last.ckpt" and checkpoint["global_step"] == {step}:
                os.kill(os.getpid(), signal.SIGKILL)
        AtomicCheckpointIO.save_checkpoint = save_then_die
        sys.argv = [{str(ROOT / "train.py")!r}, *sys.argv[1:]]
        runpy.run_path(sys.argv[0], run_name="__main__")
    """)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=cwd, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)


def _csv_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_kill_9_and_resume_from_a_step_checkpoint_matches_the_uninterrupted_run(tmp_path):
    args = [*CELL, "trainer.max_steps=40", "checkpoint.every_n_steps=5", "checkpoint.every_minutes=null"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _train([*args, f"hydra.run.dir={whole}"], tmp_path, tmp_path / "whole.log") == 0

    # Killed mid-epoch (8 steps an epoch) the instant the step-15 checkpoint lands: nothing after it reached the disk.
    proc = _start_killed_after_save([*args, f"hydra.run.dir={parts}"], tmp_path, tmp_path / "parts.log", step=15)
    assert proc.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "parts.log").read_text()[-3000:]
    last = parts / "checkpoints" / "last.ckpt"
    killed = read_result(parts)
    assert killed["status"] == "running"  # a killed run is told from one that never started
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert step == 15
    assert _csv_steps(parts) == list(range(15))  # the rows the checkpoint covers were written before it

    assert _train([*args, f"hydra.run.dir={parts}", "ckpt_path=last"], tmp_path, tmp_path / "resume.log") == 0
    resumed, uninterrupted = read_result(parts), read_result(whole)
    assert resumed["status"] == "ok"
    assert resumed["resumed_from"]["checkpoint"] == str(last) and resumed["resumed_from"]["step"] >= step
    # Same seed, same data order, same dropout, same optimizer state: the same model.
    assert resumed["metrics"] == pytest.approx(uninterrupted["metrics"], rel=1e-6, abs=1e-7)
    assert resumed["validation"]["best"] == pytest.approx(uninterrupted["validation"]["best"], rel=1e-6)
    # The curve before the kill is kept and continues: every step logged once.
    assert _csv_steps(parts) == _csv_steps(whole) == list(range(40))
    assert uninterrupted["checkpoint_seconds"]["mid_epoch_saves"] == 8  # every 5 of 40 steps


# SIGTERM is what Slurm and `kill` send; SIGINT (Ctrl-C) takes the same path and runs with -m slow (the suite's time)
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_stop_signal_saves_last_ckpt_records_interrupted_and_the_run_resumes(tmp_path, sig):
    run_dir = tmp_path / "run"
    args = [*CELL, f"hydra.run.dir={run_dir}", "trainer.max_steps=100000", "checkpoint.every_n_steps=3",
            "checkpoint.every_minutes=null"]
    log = tmp_path / "run.log"
    proc = _start(args, tmp_path, log)
    _wait_for((run_dir / "checkpoints" / "last.ckpt").is_file, proc, log)  # training is under way
    proc.send_signal(sig)
    code = proc.wait(timeout=300)
    assert code == 128 + sig, log.read_text()[-3000:]
    record = read_result(run_dir)
    assert record["status"] == "interrupted"
    stopped = record["interrupted"]
    assert stopped["signal"] == sig.name and stopped["checkpoint"] == str(run_dir / "checkpoints" / "last.ckpt")
    # Saved at the end of the batch the signal arrived in, not at the last every-3-steps checkpoint.
    ckpt = torch.load(stopped["checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == stopped["step"] == stopped["checkpoint_step"]
    assert f"{sig.name}" in log.read_text() and "ckpt_path=last" in log.read_text()

    resumed_to = stopped["step"] + 4
    assert _train([*args[:-3], f"trainer.max_steps={resumed_to}", "ckpt_path=last"], tmp_path,
                  tmp_path / "resume.log") == 0
    record = read_result(run_dir)
    assert record["status"] == "ok" and record["interrupted"] is None
    assert record["resumed_from"]["step"] == stopped["step"]
    assert _csv_steps(run_dir) == list(range(resumed_to))


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    script = textwrap.dedent(f"""
        import torch
        from squeeze.hardware.checkpointing import AtomicCheckpointIO
        io, n = AtomicCheckpointIO(), 0
        while True:  # large enough that a save takes a while; the first one completes before the test kills
            io.save_checkpoint({{"n": n, "w": torch.full((64, 1024, 1024), float(n))}}, {str(path)!r})
            n += 1
    """)
    log = tmp_path / "save.log"
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    _wait_for(path.is_file, proc, log)
    _wait_for(lambda: any(tmp_path.glob(".last.ckpt.*.partial")), proc, log)  # a save in progress
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    ckpt = torch.load(path, weights_only=True)  # the previous, complete checkpoint
    assert torch.equal(ckpt["w"], torch.full((64, 1024, 1024), float(ckpt["n"])))


def test_ckpt_path_last_with_nothing_to_resume_says_so_and_last_or_new_starts_fresh(tmp_path):
    with pytest.raises(SqueezeError, match=r"ckpt_path=last: no checkpoint in .* ckpt_path=last_or_new"):
        run.train(compose_cfg("train", [*CELL, "trainer.max_steps=2", "ckpt_path=last"], tmp_path / "a"))
    assert not (tmp_path / "a" / "result.json").exists()  # refused before a record replaces what the directory held
    record = run.train(compose_cfg("train", [*CELL, "trainer.max_steps=2", "ckpt_path=last_or_new"], tmp_path / "b"))
    assert record["status"] == "ok" and record["resumed_from"] is None


def test_the_cli_stops_with_exit_2_and_one_line_when_there_is_no_checkpoint(tmp_path):
    code = _train([*CELL, f"hydra.run.dir={tmp_path / 'none'}", "ckpt_path=last"], tmp_path, tmp_path / "log")
    lines = [line for line in (tmp_path / "log").read_text().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "ckpt_path=last_or_new" in lines[0]


def _cell(overrides: list[str], run_dir: Path):
    cfg = compose_cfg("train", overrides, run_dir)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    swept = cfg.copy()  # what HydraConfig says, as in a -m sweep; the cell's own config stays plain
    OmegaConf.set_readonly(swept.hydra, False)
    with open_dict(swept):
        swept.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(swept)
    return cfg


def test_a_sweep_rerun_skips_finished_cells_resumes_killed_ones_and_reruns_failed_ones_when_asked(tmp_path):
    # Cells that fine-tune in their own directory (a none cell in a sweep otherwise takes the stored baseline,
    # which resumes in the store: the next test).
    common = [*CELL, "trainer.max_steps=8", "checkpoint.every_n_steps=2", "baseline.reuse=false"]
    done, killed, failed = tmp_path / "0_done", tmp_path / "1_killed", tmp_path / "2_failed"
    assert run.train(_cell(common, done))["status"] == "ok"
    before = (done / "result.json").read_bytes()
    # A cell killed -9 after its step-4 checkpoint: its record still says "running".
    run.train(_cell([*CELL, "trainer.max_steps=4", "checkpoint.every_n_steps=2", "baseline.reuse=false",
                     "checkpoint.keep_after_success=all"], killed))  # a kill leaves its checkpoints
    record = read_result(killed)
    # Its record as the killed 8-step run wrote it at its start (same config as the rerun's, status running).
    config = json.loads(json.dumps(read_result(done)["config"]).replace(str(done), str(killed)))
    (killed / "result.json").write_text(json.dumps({**record, "status": "running", "config": config}))
    failed.mkdir()
    (failed / "result.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: boom"}))

    # The sweep, rerun in the same directories:
    assert run.train(_cell(common, done))["status"] == "ok"
    assert (done / "result.json").read_bytes() == before  # skipped, untouched
    resumed = run.train(_cell(common, killed))
    assert resumed["status"] == "ok" and resumed["resumed_from"]["step"] == 4
    assert run.train(_cell(common, failed))["status"] == "failed"  # kept as it was
    assert read_result(failed)["error"] == "RuntimeError: boom"
    assert run.train(_cell([*common, "rerun_failed=true"], failed))["status"] == "ok"


def test_disk_full_while_saving_a_checkpoint_is_named_and_keeps_the_previous_one(tmp_path, monkeypatch):
    from squeeze.hardware.checkpointing import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1632145728 vs 1632145616")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SqueezeError, match="disk full while saving checkpoint .*last.ckpt.*previous checkpoint is intact"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=False) == {"step": 1}
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_a_killed_stored_baseline_resumes_from_its_own_checkpoint(tmp_path):
    common = [*CELL, "trainer.max_steps=4", "checkpoint.every_n_steps=2", f"baseline.store_dir={tmp_path / 'store'}"]
    first = run.train(_cell(common, tmp_path / "0_none"))
    entry = Path(first["baseline"]["dir"])
    assert first["status"] == "ok" and first["baseline"]["trained_here"]
    assert not (entry / "checkpoints").exists() and (entry / "model").is_dir()  # a finished entry keeps its model
    # As if killed -9 after its step-4 checkpoint: the record says running and the checkpoint is there.
    stored = read_result(entry)
    assert run.train(_cell([*common, "baseline.reuse=false", "checkpoint.keep_after_success=all"],
                           tmp_path / "own"))["status"] == "ok"  # the same training
    shutil.copytree(tmp_path / "own" / "checkpoints", entry / "checkpoints")
    (entry / "result.json").write_text(json.dumps({**stored, "status": "running"}))
    again = run.train(_cell(common, tmp_path / "1_again"))
    assert again["status"] == "ok" and again["baseline"]["trained_here"]  # the store had no finished entry
    assert read_result(entry)["resumed_from"]["step"] == 4  # it went on from its own last.ckpt


def test_the_loader_continues_mid_epoch_with_the_same_batches():
    data = list(range(20))
    full = resumable(torch.utils.data.DataLoader(data, batch_size=3, shuffle=True), seed=7)
    assert isinstance(full, ResumableLoader)
    full.sampler.set_epoch(2)
    epoch = [b.tolist() for b in full]
    assert sorted(sum(epoch, [])) == data
    full.sampler.set_epoch(3)
    assert [b.tolist() for b in full] != epoch  # another order each epoch, from (seed, epoch) alone

    first = resumable(torch.utils.data.DataLoader(data, batch_size=3, shuffle=True), seed=7)
    first.sampler.set_epoch(2)
    it = iter(first)
    seen = [next(it).tolist() for _ in range(4)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 4, "batch_size": 3}
    again = resumable(torch.utils.data.DataLoader(data, batch_size=3, shuffle=True), seed=7)
    again.load_state_dict(state)
    again.sampler.set_epoch(2)
    assert seen + [b.tolist() for b in again] == epoch
    # A state from another epoch (a checkpoint at an epoch's end) starts the next epoch from its beginning.
    later = resumable(torch.utils.data.DataLoader(data, batch_size=3, shuffle=True), seed=7)
    later.load_state_dict(state)
    later.sampler.set_epoch(3)
    assert len([b for b in later]) == 7
    assert isinstance(later.sampler, EpochSampler)


def test_the_time_interval_is_stretched_to_bound_the_overhead_and_capped():
    callback = ResumeCheckpoint("unused", every_minutes=1, max_overhead=0.02, max_minutes=10)
    assert callback._interval() == 60
    callback.saves = [0.5]
    assert callback._interval() == 60  # 0.5 s a save: 49 × 0.5 s is under a minute
    callback.saves = [5.0]
    assert callback._interval() == pytest.approx(245)  # 5 s a save: every 245 s keeps saving at 2 %
    callback.saves = [60.0]
    assert callback._interval() == 600  # but a kill never loses more than max_minutes


def test_a_wandb_run_resumed_in_its_directory_keeps_its_id(tmp_path):
    assert earlier_wandb_id(tmp_path) is None
    run_dir = tmp_path / "wandb" / "offline-run-20260101_120000-abc123xy"
    run_dir.mkdir(parents=True)
    (tmp_path / "wandb" / "latest-run").symlink_to(run_dir.name)
    assert earlier_wandb_id(tmp_path) == "abc123xy"


def test_a_sweep_rerun_with_an_edited_cell_runs_it_afresh_and_keeps_the_old_one(tmp_path):
    common = [*CELL, "trainer.max_steps=2", "baseline.reuse=false"]
    cell = tmp_path / "0_cell"
    first = run.train(_cell(common, cell))
    assert first["status"] == "ok"
    assert run.train(_cell([*common, "rerun_failed=true"], cell))["created"] == first["created"]  # same cell: skipped
    edited = run.train(_cell([*CELL, "trainer.max_steps=3", "baseline.reuse=false"], cell))
    assert edited["status"] == "ok" and edited["config"]["trainer"]["max_steps"] == 3
    (kept,) = cell.glob("replaced-*")
    assert read_result(kept)["config"]["trainer"]["max_steps"] == 2 and (kept / "model").is_dir()


def test_a_cell_that_fails_after_a_stop_signal_still_ends_the_sweep(tmp_path):
    """SIGTERM during a cell, then a failure on the way out (its directory removed under the checkpoint save):
    the cell is recorded as failed and the sweep stops as asked, instead of starting the next cell."""
    import signal

    from squeeze.hardware import checkpointing
    from squeeze.run import guard

    def body():
        checkpointing.signals.signum = signal.SIGTERM  # what the handler keeps when the signal arrives mid-fit
        raise FileNotFoundError("last.ckpt.partial -> last.ckpt")

    record = {"status": "running"}
    try:
        with pytest.raises(SystemExit) as stopped:
            guard.guarded(body, record, tmp_path, multirun=True)
    finally:
        checkpointing.signals.signum = None
    assert stopped.value.code == 128 + signal.SIGTERM
    assert read_result(tmp_path)["status"] == "failed" and "last.ckpt" in read_result(tmp_path)["error"]
    # Without a stop signal a failed cell is recorded and the sweep goes on.
    assert guard.guarded(lambda: (_ for _ in ()).throw(OSError("disk")), {}, tmp_path, multirun=True)["status"] == "failed"
