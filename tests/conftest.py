"""Compose the real config (as train.py does) with overrides, and run cells in-process or as the CLI;
build the tiny random-init models of conf/model/tiny_*.yaml with their real tokenizers."""

from __future__ import annotations

import functools
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
from omegaconf import OmegaConf, open_dict
import squeeze  # noqa: F401  registers the config resolvers before any compose
from squeeze import models

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
    # Measured, with every path taken, but small: decode timing was half of a short LM run's time
    "perf.batch_sizes=[1,4]",
    "perf.decode_batch_sizes=[1,2]",
    "perf.decode_new_tokens=4",
    "perf.decode_repeats=1",
]
LM_FAST = ["task.data.block_size=32", "task.data.max_examples.train=300",
           "task.data.max_examples.validation=100", "task.data.max_examples.test=100"]


def fast(task: str) -> list[str]:
    return FAST + (LM_FAST if task in ("austen", "wikitext2", "wikitext103", "c4", "lambada", "austen_mlm",
                                       "wikitext103_mlm") else [])


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


# -- tiny models ---------------------------------------------------------------------------------
# Every family squeeze supports, as its random-init 2-layer conf/model/<name>.yaml with a real tokenizer.
FAMILIES = ["tiny_bert", "tiny_gpt2", "tiny_llama", "tiny_opt"]
LABELS = ["neg", "pos"]
TEXTS = ("a fine film , well acted", "dull", "the plot is thin but the cast is good")
_LAYERS_KEY = {"gpt2": "n_layer"}  # GPT-2 names its sizes its own way; the others say num_hidden_layers


def layers_override(name: str, layers: int) -> str:
    """The compose override that gives conf/model/<name>.yaml `layers` layers."""
    model_type = OmegaConf.load(CONF / "model" / f"{name}.yaml").config.model_type
    return f"model.config.{_LAYERS_KEY.get(model_type, 'num_hidden_layers')}={layers}"


def tiny_spec(name: str, layers: int | None = None, **config) -> models.RandomInit:
    """conf/model/<name>.yaml's spec, with `layers` and any config key (e.g. n_inner=128) overridden."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
    cfg.pop("_target_")
    if layers is not None:
        config[_LAYERS_KEY.get(cfg["config"]["model_type"], "num_hidden_layers")] = layers
    cfg["config"].update(config)
    spec = models.RandomInit(**cfg)
    spec.tokenizer = functools.partial(tiny_tokenizer, name)  # loaded once per family
    return spec


@functools.cache
def tiny_tokenizer(name: str):
    """The family's real tokenizer, prepared as a run prepares it (shared: do not change it)."""
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    return models.RandomInit(name, cfg.kind, {"model_type": cfg.config.model_type},
                             tokenizer_asset=cfg.get("tokenizer_asset"),
                             tokenizer_path=cfg.get("tokenizer_path")).tokenizer()


def build_tiny(name: str, head: str = "sequence_classification", labels=LABELS, *, layers: int | None = None,
               seed: int = 0, **config):
    """(model in eval mode, tokenizer): a fresh random-init tiny model, the same for the same arguments."""
    spec = tiny_spec(name, layers, **config)
    torch.manual_seed(seed)
    model = spec.build(head, None if head == "causal_lm" else list(labels))
    return models.finish_model(model, spec.tokenizer()).eval(), spec.tokenizer()


@pytest.fixture(scope="session")
def tiny_model():
    """The factory build_tiny(name, head=..., labels=..., layers=..., seed=..., **config overrides)."""
    return build_tiny


# The post-training tests' families, by short name: BERT as a sequence classifier, the decoders as causal LMs.
PTQ_FAMILIES = ("bert", "gpt2", "llama")


def tiny_family(family: str, seed: int = 0):
    """A fresh tiny model of a family by its short name (bert, gpt2, llama, opt), in eval mode."""
    return build_tiny(f"tiny_{family}", "sequence_classification" if family == "bert" else "causal_lm", seed=seed)[0]


def token_batches(n: int = 4, batch: int = 2, length: int = 16, seed: int = 0, padded: bool = False) -> list[dict]:
    """Seeded random token batches (ids 1..999, in every family's vocabulary); `padded`: the first row half padding."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 1000, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        if padded:
            mask[0, length // 2:] = 0
            ids[0, length // 2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def random_ids(model, batch: int = 2, length: int = 12, seed: int = 1, low: int = 0) -> dict:
    """input_ids drawn from the model's vocabulary (seeded) and a full attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, model.config.vocab_size, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def text_batch(tokenizer, texts=TEXTS) -> dict:
    """Real sentences, padded the family's way."""
    return dict(tokenizer(list(texts), padding=True, return_tensors="pt"))


def logits_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(autouse=True)
def _own_baseline_store(monkeypatch, tmp_path_factory):
    # Every test its own baseline store (squeeze/run/baselines.py): no test reuses another's fine-tuned model.
    monkeypatch.setenv("SQUEEZE_BASELINES", str(tmp_path_factory.mktemp("baselines")))
    monkeypatch.setenv("SQUEEZE_TEACHER_OUTPUTS", str(tmp_path_factory.mktemp("teacher_outputs")))


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    # Two cores: keep torch from oversubscribing when tests start subprocesses.
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # The runs a test starts (train.py, evaluate.py) one thread each too: two test workers share the two cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the thread
    # hand-offs cost more than the math (measured ~13× slower loops with the default 2 threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
