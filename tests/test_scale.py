"""Scale-out without a cluster: pipeline stages on 2 CPU processes (same loss as one process), DDP and FSDP on
2 CPU processes (what one process trains; only rank 0 writes), the FSDP strategy as hardware=fsdp builds it and the compressors it (and hardware=deepspeed) refuses, and the Slurm job scripts a
sweep submits (a stand-in sbatch on PATH captures them)."""

from __future__ import annotations

import functools
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from squeeze import run
from squeeze.errors import SqueezeError
from squeeze.hardware import pipeline, sharding
from squeeze.run.build import chain as build_chain

from conftest import CONF, compose_cfg, fast, read_result, run_cli


def _tiny_gpt2(dropout: float = 0.1):
    spec = instantiate(OmegaConf.load(CONF / "model" / "tiny_gpt2.yaml"), _convert_="all")
    model = spec.build("causal_lm", None)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    return model


# -- pipeline ---------------------------------------------------------------------------------------
def test_two_stages_compute_the_loss_of_the_whole_model():
    model = _tiny_gpt2().eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    whole = model(input_ids=ids, labels=ids).loss
    first, last = pipeline.Stage(model, 0, 1, True, False).eval(), pipeline.Stage(model, 1, 2, False, True).eval()
    torch.testing.assert_close(pipeline.causal_lm_loss(last(first(ids)), ids), whole)


def test_stage_bounds_and_refusals():
    assert pipeline.bounds(5, 2) == [(0, 3), (3, 5)]
    with pytest.raises(SqueezeError, match="1..2 stages"):
        pipeline.bounds(2, 3)
    with pytest.raises(SqueezeError, match="causal language models only"):
        pipeline.check("sequence_classification", [])
    with pytest.raises(SqueezeError, match="compress=imp"):
        pipeline.check("causal_lm", build_chain(OmegaConf.create(
            {"imp": {"_target_": "squeeze.compress.pruning.IterativeMagnitudePruning"}})))


def test_pipeline_on_two_processes_trains_like_one():
    build = functools.partial(_tiny_gpt2, 0.0)  # no dropout: the stages' RNG streams differ from one process's
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 50257, (8, 32), generator=g)} for _ in range(3)]
    # A learning rate that moves the weights: stages that trained their copies of GPT-2's tied embedding apart
    # would end with another model.
    one, whole = pipeline.run(build, batches, stages=1, lr=1e-2)
    two, stitched = pipeline.run(build, batches, stages=2, microbatches=4, schedule="1f1b", lr=1e-2, window=[2, 3])
    # Same weights, same batches: the same loss at every step (micro-batch means of equal-sized pieces,
    # gradients summed and scaled by the schedule), to float tolerance.
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-3)
    torch.manual_seed(0)  # pipeline.run's seed: the weights both started from
    start = build().transformer.wte.weight
    assert (whole.transformer.wte.weight - start).abs().max() > 1e-3  # the optimizer really moved the tied weight
    # The stages' weights come back as the one model a single process trains, the tied embedding included.
    trained = dict(whole.named_parameters())
    for name, p in stitched.named_parameters():
        # Adam at lr 1e-2 turns float noise in near-zero gradients into ~1e-3 steps; unsynced tied copies differ by 5e-2.
        torch.testing.assert_close(p, trained[name], atol=3e-3, rtol=0, msg=name)
    assert stitched.lm_head.weight is stitched.transformer.wte.weight
    assert [s["layers"] for s in two["per_stage"]] == [[0, 1], [1, 2]]
    assert all(s["peak_memory_bytes"] > 0 for s in two["per_stage"]) and two["tokens_per_s"] > 0
    # The leaderboard's window figure, measured across the stage processes (the slowest stage's time).
    window = two["window"]
    assert window["iterations"] == [2, 3] and window["tokens"] == 2 * 8 * 32
    assert 0 < window["seconds"] <= two["train_seconds"] and window["tokens_per_s"] > 0


def test_hardware_pipeline_writes_an_ok_record(tmp_path):
    run_dir = tmp_path / "run"  # in this process: the stages are processes of their own either way
    returned = run.train(compose_cfg("train", ["model=tiny_gpt2", "task=austen", *fast("austen"), "hardware=pipeline",
                                               "trainer.max_steps=2"], run_dir))
    record = read_result(run_dir)
    assert record["status"] == returned["status"] == "ok", record["error"]
    figures = record["pipeline"]
    assert (figures["stages"], figures["steps"], figures["schedule"]) == (2, 2, "gpipe")
    assert len(figures["per_stage"]) == 2 and record["train_tokens"] == 2 * 8 * 32
    assert record["metrics"]["train/loss"] == pytest.approx(figures["loss"])
    assert all(s["peak_memory_kind"] == "cpu_rss" for s in figures["per_stage"])  # CPU processes, whatever the host
    # Its model is tested, saved and measured like any run's: a row of the report beside the one-process run.
    assert record["metrics"]["test/perplexity"] > 1 and (run_dir / "model" / "config.json").is_file()
    assert record["checkpoint_bytes"] > 0 and record["cost"]["own"]["seconds"] >= figures["train_seconds"]


# -- FSDP ---------------------------------------------------------------------------------------------
def test_hardware_fsdp_builds_lightnings_strategy_with_a_layer_policy(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    cfg = compose_cfg("train", ["model=tiny_gpt2", "task=austen", "hardware=fsdp",
                                "trainer.strategy.sharding=HYBRID_SHARD"], tmp_path)
    assert cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy == ShardingStrategy.HYBRID_SHARD
    policy = strategy.kwargs["auto_wrap_policy"]
    assert strategy._activation_checkpointing_kwargs == {"auto_wrap_policy": policy}
    module = instantiate(cfg.task.module, model=_tiny_gpt2(), _convert_="all")
    assert policy(module, recurse=True) and policy.classes == (GPT2Block,)
    wrapped = [m for m in module.modules() if policy(m, recurse=False)]
    assert len(wrapped) == 2 and all(isinstance(m, GPT2Block) for m in wrapped)
    with pytest.raises(SqueezeError, match="not an FSDP sharding strategy"):
        sharding.fsdp(sharding="ZERO9")


REFUSED = {"imp": "masks", "qat": "fake quantization", "dq": "integer weights", "int8wo": "integer weights",
           "int4wo": "integer weights", "gptq": "integer weights"}


_WRITE_SPY = """
import os
_log, _replace, _rename = os.environ["SQUEEZE_TEST_WRITES"], os.replace, os.rename
def _note(dst):
    name = os.path.basename(os.fspath(dst))
    if name in ("result.json", "model", "started"):
        with open(_log, "a") as f:
            f.write(f"{os.environ.get('LOCAL_RANK', '0')} {os.getpid()} {name}\\n")
def replace(src, dst, *a, **k):
    _note(dst)
    return _replace(src, dst, *a, **k)
def rename(src, dst, *a, **k):
    _note(dst)
    return _rename(src, dst, *a, **k)
os.replace, os.rename = replace, rename
_note("started")
"""



def test_ddp_and_fsdp_on_two_cpu_processes_train_what_one_process_does_and_only_rank_0_writes(tmp_path):
    """hardware=ddp and hardware=fsdp end to end (gloo, fp32), beside the one-process run: DDP records the same
    metrics with the training tokens of both ranks, and only rank 0 writes the record and the model; FSDP
    (FULL_SHARD with activation checkpointing) gives DDP's model exactly (GPT-2's tied embedding included), its
    checkpoints are sharded directories (the best one is restored while sharded), the saved model is the gathered
    whole one."""
    common = ["model=tiny_gpt2", "task=austen", *fast("austen"), "trainer.accelerator=cpu",
              "trainer.precision=32-true", "trainer.max_steps=4", "task.data.block_size=64", "perf=null",
              "callbacks.energy=null", "checkpoint.keep_after_success=best"]
    run.train(compose_cfg("train", [*common, "hardware=cpu"], tmp_path / "cpu"))  # one process: this one
    # No hydra.run.dir for DDP on purpose: Lightning re-runs train.py for rank 1 with hydra.run.dir=<rank 0's
    # dir>, and that has to hold with conf/hydra/default.yaml's timestamped run dir and job.chdir=false. A fresh
    # cwd makes the directory unique.
    ddp_cwd, spy, writes = tmp_path / "ddp_cwd", tmp_path / "spy", tmp_path / "writes.txt"
    ddp_cwd.mkdir()
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(_WRITE_SPY)
    pythonpath = os.pathsep.join(p for p in (str(spy), os.environ.get("PYTHONPATH")) if p)
    ddp = run_cli("train.py", [*common, "hardware=ddp", "trainer.devices=2"], cwd=ddp_cwd,
                  env={"PYTHONPATH": pythonpath, "SQUEEZE_TEST_WRITES": str(writes)})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in ddp.stdout + ddp.stderr  # two processes really ran
    run_dirs = list((ddp_cwd / "outputs" / "tiny_gpt2" / "austen").iterdir())
    assert len(run_dirs) == 1, f"ranks wrote to different run dirs: {run_dirs}"
    ddp_dir = run_dirs[0]
    assert (ddp_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran under Hydra in rank 0's directory ...
    # ... and only rank 0 wrote the record and the model: one of each, no leftovers of a second writer.
    assert [p.relative_to(ddp_cwd) for p in ddp_cwd.rglob("result.json")] == [ddp_dir.relative_to(ddp_cwd) / "result.json"]
    assert [p.parent for p in ddp_cwd.rglob("model.safetensors")] == [ddp_dir / "model"]
    assert not list(ddp_cwd.rglob(".result.json.*")) and not (ddp_dir / ".model.partial").exists()
    noted = [line.split() for line in writes.read_text().splitlines()]
    # First start per rank: rank 0's own helper subprocesses (py-cpuinfo re-runs Python, for one) load the
    # spy too, later and without LOCAL_RANK, so they must not replace rank 0's pid.
    started = {}
    for rank, pid, name in noted:
        if name == "started":
            started.setdefault(rank, pid)
    assert {"0", "1"} <= set(started), noted  # the spy ran in both ranks
    written = [(rank, pid, name) for rank, pid, name in noted if name != "started"]
    # (result.json twice: status "running" when the run starts, its outcome at the end.)
    assert sorted(set(written)) == [("0", started["0"], "model"), ("0", started["0"], "result.json")], noted
    fsdp_run = run_cli("train.py", [*common, "hardware=fsdp", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'fsdp'}"],
                       cwd=tmp_path)
    assert fsdp_run.returncode == 0, fsdp_run.stderr[-3000:]

    cpu, ddp, fsdp = read_result(tmp_path / "cpu"), read_result(ddp_dir), read_result(tmp_path / "fsdp")
    assert cpu["status"] == ddp["status"] == fsdp["status"] == "ok"
    trainer_cfg = ddp["config"]["trainer"]
    assert (trainer_cfg["strategy"], trainer_cfg["devices"], trainer_cfg["accelerator"]) == ("ddp", 2, "cpu")
    assert set(ddp["metrics"]) == set(cpu["metrics"]) == set(fsdp["metrics"]) >= {"test/perplexity", "test/loss"}
    # Sizes come from saving the model, which only rank 0 does: a record from rank 1 would lack them.
    assert ddp["params"] == cpu["params"] > 0 and ddp["checkpoint_bytes"] > 0
    # Training tokens are summed over the ranks: two ranks of 4 steps see more than one (each rank's last batch
    # of a split epoch can be short).
    assert ddp["train_tokens"] > 1.5 * cpu["train_tokens"] > 0
    assert fsdp["metrics"]["test/loss"] == pytest.approx(ddp["metrics"]["test/loss"], rel=1e-5)
    assert fsdp["validation"]["best"] == pytest.approx(ddp["validation"]["best"], rel=1e-5)
    assert (tmp_path / "fsdp" / "checkpoints" / "best.ckpt" / "meta.pt").is_file()  # sharded, per rank
    # The saved model is the whole gathered one: the same weights as DDP's, loadable without squeeze's sharding.
    from squeeze import formats
    sharded = formats.load(tmp_path / "fsdp" / "model", "causal_lm").state_dict()
    replicated = formats.load(ddp_dir / "model", "causal_lm").state_dict()
    assert sharded.keys() == replicated.keys()
    assert all(torch.allclose(sharded[k], replicated[k], atol=1e-6) for k in sharded)


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("hardware", ["fsdp", "deepspeed"])
def test_compressors_that_cannot_shard_refuse_in_one_line(tmp_path, name, hardware):
    cfg = compose_cfg("train", ["model=tiny_gpt2", "task=austen", f"hardware={hardware}", f"compress={name}"], tmp_path)
    trains = build_chain(cfg.compress)[0].trains
    reason = REFUSED[name] if hardware == "fsdp" else "ZeRO trains flat copies" if trains else "integer weights, and DeepSpeed"
    with pytest.raises(SqueezeError, match=reason) as e:
        sharding.check_compressors(build_chain(cfg.compress), cfg.trainer.strategy)
    assert "\n" not in str(e.value) and f"compress={name} cannot run under hardware={hardware}" in str(e.value)
    sharding.check_compressors(build_chain(cfg.compress), "ddp")  # unsharded: no refusal


def test_hardware_deepspeed_says_what_it_needs(tmp_path, monkeypatch):
    """ZeRO 1/2 through Lightning's DeepSpeedStrategy: CUDA only and an optional package, so on a machine
    without either a run fails before loading anything, naming the fix; ZeRO-3 points to hardware=fsdp."""
    import importlib.util

    with pytest.raises(SqueezeError, match="ZeRO stage 1 or 2; .* use hardware=fsdp"):
        sharding.deepspeed(stage=3)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    with pytest.raises(SqueezeError, match=r"pip install -e '.\[deepspeed\]'"):
        sharding.deepspeed()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SqueezeError, match="runs only on CUDA GPUs .* hardware=fsdp trainer.accelerator=cpu"):
        sharding.deepspeed()
    with pytest.raises(SqueezeError, match="hardware=deepspeed runs only on CUDA GPUs"):
        run.train(compose_cfg("train", [*fast("rotten_tomatoes"), "model=tiny_bert", "hardware=deepspeed"],
                              tmp_path / "run"))
    record = read_result(tmp_path / "run")
    assert record["status"] == "failed" and "hardware=deepspeed runs only on CUDA GPUs" in record["error"]
    assert record["train_seconds"] is None


def test_one_shot_compressors_may_shard(tmp_path):
    cfg = compose_cfg("train", ["model=tiny_gpt2", "task=austen", "hardware=fsdp", "compress=[rows,heads,wanda]"],
                      tmp_path)
    sharding.check_compressors(build_chain(cfg.compress), cfg.trainer.strategy)
    cfg = compose_cfg("train", ["model=tiny_gpt2", "task=austen", "hardware=fsdp", "compress=heads",
                                "compress.heads.iterations=3", "compress.heads.every_n_steps=5"], tmp_path)
    with pytest.raises(SqueezeError, match="pruning in steps"):
        sharding.check_compressors(build_chain(cfg.compress), cfg.trainer.strategy)


# -- Slurm ----------------------------------------------------------------------------------------------
# Stand-ins for Slurm's commands: sbatch keeps the job script and answers with a job id; sacct reports
# the array's tasks as CANCELLED, so submitit stops waiting at once; srun only has to exist.
SBATCH = """#!/bin/sh
n=$(ls "$CAPTURE" | wc -l)
cp "$1" "$CAPTURE/job_$n.sh"
echo "Submitted batch job $((4242 + n))"
"""
SACCT = """#!/bin/sh
echo "JobID|State|NodeList"
for id in 4242 4243; do for t in 0 1; do echo "${id}_$t|CANCELLED|node1"; done; echo "$id|CANCELLED|node1"; done
"""


def test_cluster_launcher_submits_one_slurm_job_per_cell(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    bin_dir, capture = tmp_path / "bin", tmp_path / "captured"
    bin_dir.mkdir(), capture.mkdir()
    for name, text in {"sbatch": SBATCH, "sacct": SACCT, "srun": "#!/bin/sh\nexit 0\n"}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CAPTURE": str(capture)}
    run_cli("train.py", ["-m", "hydra/launcher=cluster", "hydra.launcher.partition=gpu-a100",
                         "hydra.launcher.timeout_min=90", "hardware=ddp", "trainer.devices=4",
                         "model=tiny_gpt2", "task=austen", "seed=1,2", f"hydra.sweep.dir={tmp_path}/sweep"],
            cwd=tmp_path, timeout=120, env=env)
    scripts = sorted(capture.iterdir())
    assert len(scripts) == 1, scripts  # one array job holding both cells
    text = scripts[0].read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", text, re.M))
    assert sbatch["partition"] == "gpu-a100"
    assert sbatch["gpus-per-node"] == "4" and sbatch["ntasks-per-node"] == "4"  # tasks per node = devices
    assert sbatch["time"] == "90" and sbatch["nodes"] == "1"
    assert sbatch["array"].startswith("0-1")  # the two cells
    assert re.search(r"^srun .*submitit", text, re.M)  # srun starts the ranks, one per task
    (tmp_path / "slurm_job.sh").write_text(text)


def test_ddp_ranks_come_from_slurms_environment(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for key, value in {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
                       "SLURM_NODEID": "0", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "node1",
                       "SLURM_JOB_ID": "4242"}.items():
        monkeypatch.setenv(key, value)
    assert SLURMEnvironment.detect()
    env = SLURMEnvironment()
    assert (env.global_rank(), env.local_rank(), env.world_size(), env.creates_processes_externally) == (3, 3, 4, True)
