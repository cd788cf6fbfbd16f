"""Compose the real config (as train.py does) with overrides, and run cells in-process or as the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
import squeeze  # noqa: F401  registers the config resolvers before any compose

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Small and quick on 2 cores: slices of every split and a few steps.
FAST = [
    "logger=csv",
    "hardware=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "task.data.max_examples.train=64",
    "task.data.max_examples.validation=32",
    "task.data.max_examples.test=32",
    "task.data.batch_size=8",
    "task.data.eval_batch_size=16",
    "perf.warmup=1",
    "perf.repeats=3",
]
LM_FAST = ["task.data.block_size=32", "task.data.max_examples.train=300",
           "task.data.max_examples.validation=100", "task.data.max_examples.test=100"]


def fast(task: str) -> list[str]:
    return FAST + (LM_FAST if task in ("austen", "wikitext2", "wikitext103", "c4", "lambada") else [])


def compose_cfg(config_name: str, overrides: list[str], run_dir: Path):
    """The config train.py/evaluate.py would get, with HydraConfig set so ${hydra:...} resolves."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def run_cli(script: str, args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    """Run train.py/evaluate.py as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env=full_env,
    )


def read_result(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "result.json").read_text())


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    # Two cores: keep torch from oversubscribing when tests start subprocesses.
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the thread
    # hand-offs cost more than the math (measured ~13× slower loops with the default 2 threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
