"""The result record (`result.json`): one per run, written atomically, read by reports.

Keys (schema 1; later features add keys, never change these):
  schema, status ("ok" | "failed"; also "running" while it runs, "interrupted" after SIGTERM/SIGINT),
  error (one line or null), run_dir, created,
  choices      {model, task, compress, hardware}: the config options the cell was built from
  config       the fully resolved config
  metrics      test metrics, named as logged ("test/accuracy", "test/perplexity", ...); sentiment adds
               test/precision and test/recall (macro, like test/f1), LAMBADA test/last_word_accuracy and
               test/last_word_perplexity
  kernels      {"linear" | "lm_head": {kernel: layers}}: which kernels the integer linear layers ran by the end
               of the test (int8pack_mm_bf16, int4pack_mm_bf16, dequantize_bf16 (many rows), dequantize_fp32,
               fbgemm_dynamic(_per_token), torchao, not_run; a layer that ran two counts under both;
               squeeze/formats/quantized_layers.py kernels_used), null without integer linears
  compress     {chain: [names in order], <name>: what that compressor records}
  sparsity     global fraction of pruned weights (the last pruner in the chain), null without pruning
  validation   {monitor, mode, best}: the best validation value of the monitored metric (for
               expected-validation-performance curves), null without validation
  perplexity   {protocol, block_size, stride, scored_tokens} for runs that report perplexity; LAMBADA
               (protocol "last_word") adds last_word: {passages, target_tokens, truncated, max_length,
               perplexity: how it is averaged}; a multiple-choice task (protocol "multiple_choice") holds its scoring
               there instead: multiple_choice: {examples, endings, max_length, score, ...}
  params, nonzero_params          parameter counts (tied tensors once)
  checkpoint_bytes                size on disk of the saved model directory
  model_loads_in_transformers     whether plain transformers (no squeeze) loads model/: "yes", "yes, with the
               compressed-tensors package installed", "with trust_remote_code=True ..." or "no: ..." (squeeze's own
               sparse or packed format; `python -m squeeze.export <run> <dir>` writes a copy that loads)
  train_seconds, eval_seconds     wall time of fit and of test
  train_tokens, train_tokens_per_s  non-padding input tokens of the fit's training steps (all ranks), and
               that over train_seconds (validation and checkpointing included); null without training
  peak_memory_bytes, peak_memory_kind   ("cpu_rss" or "cuda_max_allocated")
  pipeline     hardware=pipeline only (squeeze/hardware/pipeline.py; the trained model is then tested, saved and
               measured in one process like any run's, metrics.train/loss added): {stages,
               microbatches, schedule, steps, losses (per step), loss (their mean, also metrics.train/loss),
               train_seconds, train_tokens, tokens_per_s, per_stage: [{stage, layers: [start, stop),
               peak_memory_bytes, peak_memory_kind, params}]}
  energy       {kwh, co2_kg, method ("measured" | "estimated" | "partly measured"), pue, co2,
               co2_kg_per_kwh, phases: {train|eval: {kwh, co2_kg, kwh_it, seconds, cpu_kwh, ram_kwh,
               gpu_kwh, methods, method}}}  (facility kWh = IT kWh × PUE), null when not measured
  perf         {device, threads, latency: {batch_<n>: {median_s, p10_s, p90_s, mean_s, repeats}},
               throughput: {batch_size, examples_per_s, tokens_per_s}, peak_memory_bytes,
               peak_memory_kind, by_device: {<device>: same},
               <device>: {batch_<n>: {peak_memory_bytes, peak_increase_bytes, peak_memory_kind}  (inference
                         peak over that batch size's timed passes; kind "cpu_rss" (process VmHWM),
                         "cpu_rss_sampled" or "cuda_max_allocated"; increase = peak minus in use before),
                         decode_tokens_per_s: {batch_<n>: greedy new tokens/s} or null (cannot generate),
                         decode: {new_tokens, prompt_tokens, warmup, latency: {batch_<n>: {median_s, p10_s,
                         p90_s, mean_s, repeats, prompt_tokens, tokens_per_s, peak_memory_bytes,
                         peak_increase_bytes, peak_memory_kind}}} or null}  (one per measured device)},
               null with perf=null
  versions     python and library versions;  seed;  git_commit
  resumed_from {checkpoint, step, epoch}: the checkpoint a resumed run continued from, null for a fresh run
  interrupted  {signal, step, epoch, checkpoint, checkpoint_step}: how far an interrupted run got and the
               checkpoint to resume from (null when none was written yet), null unless interrupted
  checkpoint_seconds  {mid_epoch_saves, seconds}: what the mid-epoch checkpoints (squeeze.hardware.checkpointing)
               cost, within train_seconds; null without them
  compress_seconds  wall time of the compression work (prepare, calibration, finalize), also energy's
               `compress` phase
  cost         {own: {seconds, kwh}, total: {seconds, kwh}, inference: {kwh_per_1k, unit ("examples" |
               "tokens"), count}}: what the row spent beyond the model it started from, that plus what the
               starting model cost, and the evaluation's energy per 1,000 test examples or tokens
               (squeeze/run/cost.py says what counts where); kwh null without energy measurement
  started_from the finished run whose saved model this run fine-tuned (model.name_or_path=<run>/model): its total
               cost is in cost.total (a model pruned while pre-training, then fine-tuned: "IMP Full")
  trained_head a sweep's [imp,dq] cell started from this finished cell of the same sweep, which trained its head
               alone (squeeze/run/trained_head.py): train_seconds and cost.total include that training, spent not
  hits_rank    dialog: what ranked the Hits@k candidates (lm: reply likelihood; mc: the MC head)
  fine_tuning_version  squeeze.run.baselines.FINE_TUNING_VERSION of the code that fine-tuned this run's model
               (runs that trained); a cell on a stored baseline has it under baseline.fine_tuning_version
  validation   (post-training rows: {monitor, mode, best, from}: one validation pass of the compressed model)
  checkpoints_after_success  {keep, dropped, bytes_freed, kept[, note]}: what checkpoint.keep_after_success removed
               from checkpoints/ once the run finished ok (squeeze/hardware/retention.py); absent when nothing was
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"
SCHEMA = 1
LIBRARIES = ("torch", "lightning", "transformers", "datasets", "torchmetrics", "hydra-core", "omegaconf")


def new_record(run_dir: str | Path, choices: dict[str, str], config: dict, seed: int | None) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "status": "running",
        "error": None,
        "run_dir": str(run_dir),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "choices": choices,
        "config": config,
        "metrics": {},
        "compress": {"chain": []},
        "validation": None,
        "sparsity": None,
        "perplexity": None,
        "params": None,
        "nonzero_params": None,
        "checkpoint_bytes": None,
        "model_loads_in_transformers": None,
        "train_seconds": None,
        "eval_seconds": None,
        "train_tokens": None,
        "train_tokens_per_s": None,
        "peak_memory_bytes": None,
        "peak_memory_kind": None,
        "energy": None,
        "perf": None,
        "versions": versions(),
        "seed": seed,
        "git_commit": git_commit(),
        "resumed_from": None,
        "interrupted": None,
        "checkpoint_seconds": None,
        "compress_seconds": None,
        "cost": None,
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """The commit of the squeeze checkout that ran, with '-dirty' when it had local changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write to a temp file in the same directory, fsync, then rename: a reader (or a crash) never
    sees a half-written file, and an earlier complete file survives a failed write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a result is for everyone to read
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=jsonable)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # tensors and numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_record(run_dir: str | Path, record: dict[str, Any]) -> Path:
    return write_json_atomic(Path(run_dir) / RESULT_FILE, record)


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    with open(path, encoding="utf-8") as f:
        return _current(json.load(f))


# The classes and functions a config names (`_target_`) that have moved since records were first written: the
# task kinds into squeeze/tasks/ (December 2026), then the run's, hardware's and measurement's modules into their
# folders (squeeze/run/, hardware/, measure/).
MOVED_TARGETS = {
    "squeeze.data.ClassificationData": "squeeze.tasks.classification.ClassificationData",
    "squeeze.data.TokenClassificationData": "squeeze.tasks.tokens.TokenClassificationData",
    "squeeze.data.LanguageModelingData": "squeeze.tasks.lm.LanguageModelingData",
    "squeeze.data.LastWordData": "squeeze.tasks.lm.LastWordData",
    "squeeze.modules.SequenceClassification": "squeeze.tasks.classification.SequenceClassification",
    "squeeze.modules.TokenClassification": "squeeze.tasks.tokens.TokenClassification",
    "squeeze.modules.CausalLM": "squeeze.tasks.lm.CausalLM",
    "squeeze.modules.LastWordLM": "squeeze.tasks.lm.LastWordLM",
    "squeeze.modules.linear_warmup_decay": "squeeze.tasks.base.linear_warmup_decay",
    "squeeze.metrics.EntityF1": "squeeze.tasks.tokens.EntityF1",
    "squeeze.metrics.LastWord": "squeeze.tasks.lm.LastWord",
    "squeeze.dialog.data.DialogData": "squeeze.tasks.dialog.data.DialogData",
    "squeeze.dialog.module.DialogModule": "squeeze.tasks.dialog.module.DialogModule",
    "squeeze.energy.EnergyMeter": "squeeze.measure.energy.EnergyMeter",
    "squeeze.resume.ResumeCheckpoint": "squeeze.hardware.checkpointing.ResumeCheckpoint",
    "squeeze.resume.CSVLogger": "squeeze.hardware.checkpointing.CSVLogger",
    "squeeze.resume.AtomicCheckpointIO": "squeeze.hardware.checkpointing.AtomicCheckpointIO",
    "squeeze.sharding.fsdp": "squeeze.hardware.sharding.fsdp",
    "squeeze.sharding.deepspeed": "squeeze.hardware.sharding.deepspeed",
    "squeeze.loggers.wandb_logger": "squeeze.run.loggers.wandb_logger",
}


def _current(record: Any) -> Any:
    """A record in today's shape, so an older run still evaluates, resumes its sweep cell and rebuilds its data:
    model.family (encoder | decoder), written before it was named model.kind, reads as model.kind, and a moved
    `_target_` as where it lives now (MOVED_TARGETS)."""
    config = record.get("config") if isinstance(record, dict) else None
    model = config.get("model") if isinstance(config, dict) else None
    if isinstance(model, dict) and "family" in model and "kind" not in model:
        model["kind"] = model.pop("family")
    _moved_targets(config)
    return record


def _moved_targets(node: Any) -> None:
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str) and target in MOVED_TARGETS:
            node["_target_"] = MOVED_TARGETS[target]
        for value in node.values():
            _moved_targets(value)
    elif isinstance(node, list):
        for value in node:
            _moved_targets(value)


def dir_bytes(path: str | Path) -> int:
    """Bytes on disk of every file below `path` (a saved model directory)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
