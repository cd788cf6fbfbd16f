"""One run, top to bottom: the function `train.py` and `evaluate.py` share.

config → model spec + task compatibility → tokenizer → data module → model (head from the task)
→ LightningModule → callbacks, loggers, Trainer → fit → test (best checkpoint) → save the model
→ result.json (atomically) → loggers closed. In a sweep, a chain that acts only on the fine-tuned weights
starts instead from the stored fine-tuned baseline (squeeze.baselines, trained once), as evaluate.py would
from a finished run. A failure at any step is written into result.json
with status "failed"; in a sweep the next cell then runs, alone it ends the program with one line.

Beside it: squeeze.guard (the record written whatever happens, loggers closed, the one-line exit),
squeeze.summary (what is printed at the end), squeeze.artifacts (what ckpt= and ckpt_path= mean).
This module and the entry points are the only code that knows Hydra.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from squeeze import artifacts, baselines, cost
from squeeze import compress as compression
from squeeze import models
from squeeze import formats
from squeeze import guard, measure, resume, speculative
from squeeze import pipeline, safe_load, sharding
from squeeze.energy import EnergyMeter
from squeeze.config import check_counts
from squeeze.errors import SqueezeError
from squeeze.errors import main_exit  # noqa: F401  the entry points' API: run.main_exit(error)
from squeeze.record import dir_bytes, jsonable, new_record, read_record, write_record
from squeeze.summary import print_summary  # noqa: F401  the entry points' API: run.print_summary(record)

log = logging.getLogger("squeeze")
CHOICE_GROUPS = ("model", "task", "compress", "hardware")
MODEL_DIR = artifacts.RUN_MODEL
EVALUATES = (artifacts.RUN, artifacts.MODEL_DIR, artifacts.CKPT)  # what evaluate.py's ckpt= takes
EVALUATES_TEXT = "a run directory, a model directory or a .ckpt file"


def train(cfg: DictConfig) -> dict[str, Any]:
    speculative.check_decode(cfg.get("decode"), None, cfg.task.head, evaluating=False)
    if cfg.get("pipeline") is not None:  # hardware=pipeline: torch's pipeline schedules, not Lightning
        return _guarded(cfg, _train_pipeline)
    return _guarded(cfg, _train)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    return _guarded(cfg, _evaluate)


# -- the two paths --------------------------------------------------------------------------------
def _train(cfg: DictConfig, record: dict[str, Any], run_dir: Path, as_baseline: bool = False) -> dict[str, Any]:
    teacher = _auto_teachers(cfg, record, run_dir)  # compress.<kd|pkd>.teacher=auto: the stored baseline
    chain = compression.build_chain(cfg.compress)
    if not as_baseline and _reuses_baseline(cfg, chain):
        return _on_stored_baseline(cfg, chain, record, run_dir)
    sharding.check_compressors(chain, cfg.trainer.get("strategy"))  # hardware=fsdp: refuse what cannot shard
    spec, tokenizer, data = _prepare(cfg)
    compression.calibrate(chain, data, cfg.get("calibration"))  # post-training methods calibrate on its train split
    trainer, loggers = _trainer(cfg, run_dir, extra_callbacks=chain)  # first: its energy meter times what follows
    record["_loggers"] = loggers
    model = spec.build(cfg.task.head, data_labels(data))
    models.finish_model(model, tokenizer)
    with _compress_phase(trainer, record, chain):
        for compressor in chain:
            model = compressor.prepare_model(model, tokenizer)
    data.check_model(model)
    module = _module(cfg, model)
    for compressor in chain:
        module = compressor.wrap_module(module)

    if cfg.trainer.get("max_steps", -1) != 0:
        ckpt_path = _resume_path(cfg.get("ckpt_path"), run_dir)
        if ckpt_path is not None:
            record["resumed_from"] = resume.checkpoint_position(ckpt_path)
            log.info("resuming from %s (step %d)", ckpt_path, record["resumed_from"]["step"])
            rows = record["resumed_from"].pop("csv_rows")
            for logger in loggers:  # the curves logged before the checkpoint are kept
                if isinstance(logger, resume.CSVLogger):
                    logger.resume_at(record["resumed_from"]["step"], rows)
        start = time.perf_counter()
        try:
            resume.signals.fitting = True  # a stop signal now ends fit at the end of the batch, with last.ckpt
            with _readable_checkpoint_errors(cfg.get("ckpt_path")):
                trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        except (SIGTERMException, KeyboardInterrupt, resume.Interrupted) as e:
            raise resume.interrupted(trainer, e) from None
        finally:
            resume.signals.fitting = False
            record["train_seconds"] = time.perf_counter() - start
        if all(c.test_best_checkpoint for c in chain):
            _restore_sharded_best(trainer)  # hardware=fsdp: a sharded best checkpoint loads while still sharded
        sharding.gather(trainer, module)  # hardware=fsdp: the whole model again, for what follows fit
        record["fine_tuning_version"] = baselines.FINE_TUNING_VERSION  # the code that trained this model
        record["train_tokens"] = getattr(module, "train_tokens", None)
        record["train_tokens_per_s"] = measure.tokens_per_s(record["train_tokens"], record["train_seconds"])
        record["checkpoint_seconds"] = _checkpoint_seconds(trainer)
        record["validation"] = _best_validation(cfg, trainer)
        if all(c.test_best_checkpoint for c in chain):
            _restore_best(trainer, module)
    else:
        record["train_seconds"] = 0.0  # zero-shot: the pretrained weights, untouched

    # Compression made permanent, in the configured order, before the model is tested and saved:
    # what is measured is exactly what is on disk.
    with _compress_phase(trainer, record, chain):
        _finalize(chain, module, record)
    if as_baseline:  # a store entry (squeeze.baselines): the cells that use it test their own model
        if trainer.is_global_zero:
            _save_model(module.model, tokenizer, run_dir, record)
        record["energy"] = _energy(trainer)
        return record
    _test(trainer, module, data, record, ckpt_path=None)
    sharding.gather(trainer, module)  # hardware=fsdp: test sharded it again
    if trainer.is_global_zero:
        _save_model(module.model, tokenizer, run_dir, record)
        _measure(cfg, trainer, module.model, data, record)
    if teacher is not None:
        record["spent"] = baselines.spent(teacher, record.get("energy"), float(record.get("train_seconds") or 0.0))
    # A post-training chain fine-tuned here starts from that fine-tuned model: its training is what it started
    # from, not its own cost. A distilled student started from its teacher.
    post_training = bool(chain) and all(c.after_training for c in chain)
    base = (cost.started_from(teacher.record) if teacher is not None else
            {"seconds": record["train_seconds"], "kwh": cost.phase(record, "train").get("kwh")} if post_training
            else None)
    record["cost"] = cost.row_cost(record, trains=not post_training, own_train_seconds=record["train_seconds"],
                                   base=base, units=cost.evaluated_units(data, record.get("perplexity")))
    return record


def _reuses_baseline(cfg: DictConfig, chain) -> bool:
    """A chain whose compressors all act on the fine-tuned weights (none, dq, int8wo, int4wo, smoothquant, gptq,
    wanda, sparsegpt): in a sweep (or with baseline.reuse=true) that fine-tuned model comes from the baseline
    store, trained once. rows and heads prune before fine-tuning, so they fine-tune their own model."""
    if not all(c.after_training for c in chain) or cfg.trainer.get("max_steps", -1) == 0:
        return False
    if cfg.get("ckpt_path") not in (None, "last_or_new"):  # resuming this cell's own checkpoint on purpose
        return False
    if resume.last_checkpoint(Path(HydraConfig.get().runtime.output_dir)) is not None:
        return False  # a cell killed while fine-tuning in its own directory goes on there
    strategy = str(cfg.trainer.get("strategy") or "")
    if strategy.startswith("ddp") or sharding.is_sharded(strategy):  # ranks would each train the store entry
        return False
    return baselines.reuse_enabled(cfg, HydraConfig.get().mode == RunMode.MULTIRUN)


def _train_baseline(cfg: DictConfig, entry: Path) -> dict[str, Any]:
    """Fine-tune a store entry (squeeze.baselines): a plain run whose record is written as any run's."""
    record = new_record(entry, {**_choices(cfg), "compress": "none"}, OmegaConf.to_container(cfg), cfg.get("seed"))
    write_record(entry, record)
    return guard.guarded(lambda: _train(cfg, record, entry, as_baseline=True), record, entry, multirun=True)


def _choices(cfg: DictConfig) -> dict[str, Any]:
    choices = {g: HydraConfig.get().runtime.choices.get(g) for g in CHOICE_GROUPS}
    choices["compress"] = compression.chain_name(cfg.get("compress"))  # a list choice has no single name
    return choices


def _on_stored_baseline(cfg: DictConfig, chain, record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The cell's chain applied to the stored fine-tuned baseline, then tested, saved and measured like an
    `evaluate.py ckpt=<baseline> compress=<chain>` run. Its train time and energy are the model's whole cost
    (the baseline's training + this cell's work); `spent` is what this cell itself cost (the report's totals)."""
    base = baselines.obtain(cfg, run_dir, _train_baseline)
    with open_dict(cfg):
        cfg.ckpt = str(base.dir)
    _evaluate(cfg, record, run_dir)
    if not chain:  # the baseline row itself: its model in its run directory too (evaluate.py ckpt=<this cell>)
        baselines.link_tree(base.dir / MODEL_DIR, run_dir / MODEL_DIR)
    own_energy = record.get("energy")
    record.update(baseline=base.summary(), train_seconds=base.record.get("train_seconds"),
                  train_tokens=base.record.get("train_tokens"), train_tokens_per_s=base.record.get("train_tokens_per_s"),
                  # a compressed model's own validation pass (_evaluate); the baseline row is the stored model
                  validation=record.get("validation") or base.record.get("validation"),
                  energy=baselines.merged_energy(base.record.get("energy"), own_energy))
    record["spent"] = baselines.spent(base, own_energy)
    if not chain:  # the baseline row: its own cost is the fine-tuning it is
        record["cost"]["own"] = dict(record["cost"]["total"])
    return record


def _auto_teachers(cfg: DictConfig, record: dict[str, Any], run_dir: Path) -> baselines.Baseline | None:
    """`teacher: auto` on a distillation compressor: the stored fine-tuned baseline of this model × task
    (this cell's training settings, or the best by validation over `teacher_best_of`), trained once."""
    teacher = None
    for name in compression.used_compressors(cfg.get("compress")):
        node = cfg.compress[name]
        grid = node.get("teacher_best_of")
        if node.get("teacher") != "auto":
            if grid is not None:
                raise SqueezeError(f"compress.{name}.teacher_best_of chooses among stored baselines, so it needs "
                                   f"compress.{name}.teacher=auto (it is {node.get('teacher')!r})")
            continue
        grid = OmegaConf.to_container(grid, resolve=True) if grid is not None else None
        base = (baselines.best_of(cfg, run_dir, _train_baseline, grid) if grid
                else baselines.obtain(cfg, run_dir, _train_baseline))
        with open_dict(node):
            node.teacher = str(base.dir)
        record["baseline"] = base.summary()
        teacher = base
    return teacher


def _train_pipeline(cfg: DictConfig, record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """hardware=pipeline (squeeze/pipeline.py): fine-tuning in stages; the stages' figures, then the trained
    model tested, saved and measured in this process like any run's, so it is a row beside the others."""
    pipeline.check(cfg.task.head, compression.build_chain(cfg.compress))
    spec, tokenizer, data = _prepare(cfg)
    data.setup("fit")
    steps = int(cfg.trainer.get("max_steps") or -1)
    batches = [b for _, b in zip(range(steps) if steps > 0 else iter(int, 1), data.train_dataloader())]
    figures, model = pipeline.run(functools.partial(spec.build, cfg.task.head, None), batches, **cfg.pipeline,
                                  lr=float(cfg.optimizer.lr), seed=int(cfg.seed))
    record.update(pipeline=figures, train_seconds=figures["train_seconds"], train_tokens=figures["train_tokens"],
                  train_tokens_per_s=figures["tokens_per_s"], fine_tuning_version=baselines.FINE_TUNING_VERSION)
    models.finish_model(model, tokenizer)
    module = _module(cfg, model)
    trainer, loggers = _trainer(cfg, run_dir)
    record["_loggers"] = loggers
    _test(trainer, module, data, record, ckpt_path=None)
    record["metrics"]["train/loss"] = figures["loss"]
    _save_model(module.model, tokenizer, run_dir, record)
    _measure(cfg, trainer, module.model, data, record)
    record["cost"] = cost.row_cost(record, trains=True, own_train_seconds=figures["train_seconds"], base=None,
                                   units=cost.evaluated_units(data, record.get("perplexity")))
    return record


def _evaluate(cfg: DictConfig, record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    speculative.check_decode(cfg.get("decode"), cfg.get("draft"), cfg.task.head,
                             settings=OmegaConf.to_container(cfg.speculative) if cfg.get("speculative") else None)
    ckpt = cfg.get("ckpt")
    chain = compression.build_chain(cfg.compress)
    _check_post_training(chain)
    trained = None if ckpt is None else artifacts.resolve(ckpt, "ckpt", accept=EVALUATES, expected=EVALUATES_TEXT)
    spec, tokenizer, data = _prepare(cfg, trained_model=_trained_model(trained))
    labels = data_labels(data)
    if trained is None:
        model = spec.build(cfg.task.head, labels)
        size_from = None
    else:
        model, tokenizer, size_from = _load_checkpoint(cfg, spec, tokenizer, trained, labels, record)
    models.finish_model(model, tokenizer)
    speculative.check_draft(cfg.get("draft"), model, tokenizer)  # fails before testing, which can be long
    data.tokenizer = tokenizer
    data.check_model(model)
    compression.calibrate(chain, data, cfg.get("calibration"))
    trainer, loggers = _trainer(cfg, run_dir)  # first: its energy meter times the compression
    record["_loggers"] = loggers
    with _compress_phase(trainer, record, chain):
        for compressor in chain:
            model = compressor.prepare_model(model, tokenizer)
        module = _module(cfg, model)
        _finalize(chain, module, record)
    record["train_seconds"] = 0.0
    if chain:  # validation.best describes the model that is tested: the compressed one
        record["validation"] = _validation_pass(cfg, trainer, module, data)
    _test(trainer, module, data, record, ckpt_path=None)
    # What it started from: the finished run it compressed (its whole cost), or a pretrained model.
    base = None if trained is None else cost.started_from(trained.record) if trained.record else \
        {"seconds": None, "kwh": None}
    record["cost"] = cost.row_cost(record, trains=False, own_train_seconds=0.0, base=base,
                                   units=cost.evaluated_units(data, record.get("perplexity")))
    if trainer.is_global_zero:
        _measure(cfg, trainer, module.model, data, record)
        if cfg.get("decode") == "speculative":
            record["speculative"] = speculative.from_config(module.model, tokenizer, data, cfg.draft,
                                                            OmegaConf.to_container(cfg.speculative))
    if chain:
        # The checkpoint's own compression (if any) followed by what this evaluation applied.
        trained = record["choices"]["compress"] if size_from is not None else "none"
        record["choices"]["compress"] = "+".join(n for n in (trained, compression.chain_name(cfg.compress)) if n != "none")
        if trainer.is_global_zero:  # what was measured is saved, so its size on disk is real
            _save_model(module.model, tokenizer, run_dir, record)
        return record
    total, nonzero = models.count_params(module.model)
    record.update(params=total, nonzero_params=nonzero)
    if size_from is not None:
        record["checkpoint_bytes"] = dir_bytes(size_from)
    return record


# -- steps ------------------------------------------------------------------------------------------
def _prepare(cfg: DictConfig, trained_model: dict | None = None):
    check_counts(cfg.trainer, cfg.task.data)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    spec = _build(cfg.model, _convert_="all")
    name, kind = (trained_model["name"], trained_model["kind"]) if trained_model else (spec.name, spec.kind)
    models.check_compatible(name, kind, cfg.task.name, cfg.task.head)
    tokenizer = spec.tokenizer()
    data = _build(cfg.task.data, tokenizer=tokenizer, seed=cfg.seed, _convert_="all")
    return spec, tokenizer, data


def data_labels(data) -> list[str] | None:
    return getattr(data, "labels", None)


def _module(cfg: DictConfig, model) -> L.LightningModule:
    kwargs: dict[str, Any] = {"model": model}
    if cfg.get("optimizer") is not None:
        kwargs["optimizer"] = _build(cfg.optimizer)
    if cfg.get("scheduler") is not None:
        kwargs["scheduler"] = _build(cfg.scheduler)
    return _build(cfg.task.module, _convert_="all", **kwargs)


def _trainer(cfg: DictConfig, run_dir: Path, extra_callbacks=()):
    _check_sweep_strategy(cfg)
    callbacks = [_build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks += list(extra_callbacks)
    loggers = [_build(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    plugins = list(instantiate(cfg.trainer.get("plugins") or [], _convert_="all"))
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(resume.AtomicCheckpointIO())
    plugins += resume.cluster_plugins()
    trainer = _build(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(run_dir),
                     plugins=plugins)
    return trainer, loggers


def _build(node, **kwargs):
    """hydra.utils.instantiate, where a SqueezeError raised while building (a data module reading its files, a
    strategy builder) stays its own one line instead of Hydra's wrapped traceback."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, SqueezeError):
            raise e.__cause__ from None
        raise


def _model_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The callback that keeps the best validation checkpoint (resume.ResumeCheckpoint is a Checkpoint too)."""
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)


def _checkpoint_seconds(trainer: L.Trainer) -> dict[str, Any] | None:
    callback = next((c for c in trainer.callbacks if isinstance(c, resume.ResumeCheckpoint)), None)
    if callback is None:
        return None
    return {"mid_epoch_saves": len(callback.saves), "seconds": sum(callback.saves)}


def _best_validation(cfg: DictConfig, trainer: L.Trainer) -> dict[str, Any] | None:
    callback = _model_checkpoint(trainer)
    score = getattr(callback, "best_model_score", None) if callback else None
    if score is None:
        return None
    return {"monitor": cfg.task.monitor, "mode": cfg.task.monitor_mode, "best": float(score)}


def _restore_sharded_best(trainer: L.Trainer) -> None:
    callback = _model_checkpoint(trainer)
    best = callback.best_model_path if callback else ""
    if best and resume.is_sharded(best):
        trainer.strategy.load_checkpoint(best)  # every rank its own shard; then gathered like the last weights


def _restore_best(trainer: L.Trainer, module: L.LightningModule) -> None:
    """Load the best validation checkpoint's weights (if one was kept) into the module."""
    callback = _model_checkpoint(trainer)
    best = callback.best_model_path if callback else ""
    if best and Path(best).is_file():
        state = safe_load.load(best)["state_dict"]
        module.load_state_dict(state)


def _finalize(chain, module: L.LightningModule, record: dict[str, Any]) -> None:
    for compressor in chain:
        module.model = compressor.finalize(module.model)
    record["compress"] = {"chain": [c.name for c in chain],
                          **{c.name: {**c.summary(), **({"label": c.label} if c.label else {})} for c in chain}}
    # The global sparsity a pruner reached, at the top level where reports look for it.
    sparsities = [record["compress"][c.name].get("sparsity") for c in chain]
    record["sparsity"] = next((s for s in reversed(sparsities) if s is not None), None)


class _compress_phase:
    """A chain's compression work (prepare, calibration, finalize) timed into record["compress_seconds"] and
    measured as the energy meter's `compress` phase (summed over the times it is entered): a row's own cost
    (squeeze.cost). Without compressors there is no such phase."""

    def __init__(self, trainer: L.Trainer, record: dict[str, Any], chain):
        meter = next((c for c in trainer.callbacks if isinstance(c, EnergyMeter)), None)
        self.meter, self.record, self.active = meter, record, bool(chain)

    def __enter__(self):
        self.start = time.perf_counter()
        if self.active and self.meter is not None:
            self.meter.start("compress")
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        if self.meter is not None:
            self.meter.stop("compress")
        self.record["compress_seconds"] = (self.record.get("compress_seconds") or 0.0) + time.perf_counter() - self.start


def _validation_pass(cfg: DictConfig, trainer: L.Trainer, module, data) -> dict[str, Any] | None:
    """The monitored metric of one validation pass over this model (a post-training row's validation.best), or
    None when the task has no validation split here (evaluate.py scoring one file)."""
    data.setup("test")
    if "validation" not in (getattr(data, "datasets", None) or {}):
        return None
    results = trainer.validate(module, datamodule=data, verbose=False)
    value = (results[0] if results else {}).get(cfg.task.monitor)
    return None if value is None else {"monitor": cfg.task.monitor, "mode": cfg.task.monitor_mode,
                                       "best": float(value), "from": "validation pass of the compressed model"}


def _check_post_training(chain) -> None:
    for c in chain:
        if c.trains:
            raise SqueezeError(f"compress={c.name} trains the model; run `python train.py compress={c.name}` and "
                               f"then `python evaluate.py ckpt=<that run directory>`")


def _test(trainer: L.Trainer, module, data, record: dict[str, Any], ckpt_path: str | None) -> None:
    start = time.perf_counter()
    results = trainer.test(module, datamodule=data, ckpt_path=ckpt_path, verbose=False)
    record["eval_seconds"] = time.perf_counter() - start
    record["kernels"] = formats.kernels_used(module.model) or None  # what the integer layers ran in the test
    record["metrics"] = {k: float(v) for k, v in (results[0] if results else {}).items()}
    if hasattr(data, "protocol_record"):
        record["perplexity"] = data.protocol_record
    record["peak_memory_bytes"], record["peak_memory_kind"] = peak_memory()
    energy = _energy(trainer)
    if energy is not None:
        record["energy"] = energy


def _energy(trainer: L.Trainer) -> dict[str, Any] | None:
    meter = next((c for c in trainer.callbacks if isinstance(c, EnergyMeter)), None)
    return meter.record() if meter is not None else None


def peak_memory() -> tuple[int, str]:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    return measure.process_peak_rss(), "cpu_rss"


def _measure(cfg: DictConfig, trainer: L.Trainer, model, data, record: dict[str, Any]) -> None:
    """Latency and throughput of the tested (and saved) model on the run's device, or perf.devices."""
    perf = cfg.get("perf")
    if perf is None:
        return
    devices = list(perf.get("devices") or [trainer.strategy.root_device.type])
    by_device = {
        device: measure.measure_inference(model, data.test_dataloader(), list(perf.batch_sizes),
                                          int(perf.warmup), int(perf.repeats), device, measure.decode_settings(perf))
        for device in devices
    }
    record["perf"] = dict(by_device[devices[0]])  # a copy: by_device holds the original
    if len(by_device) > 1:
        record["perf"]["by_device"] = by_device
    record["perf"].update({device: figures[device] for device, figures in by_device.items()})


def _save_model(model, tokenizer, run_dir: Path, record: dict[str, Any]) -> None:
    """The run's deliverable: a plain transformers directory (loadable without squeeze), written
    beside and then renamed over any earlier one so a failed save never loses a finished model."""
    final = run_dir / MODEL_DIR
    tmp = run_dir / f".{MODEL_DIR}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        formats.save(model, tokenizer, tmp)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (isinstance(e, OSError) or resume.out_of_space(e)):
            raise
        raise SqueezeError(f"could not save the model to {final} ({getattr(e, 'strerror', None) or e}); free disk space and "
                           f"evaluate the checkpoint in {run_dir / 'checkpoints'}") from e
    old = run_dir / f".{MODEL_DIR}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    total, nonzero = models.count_params(model)
    record.update(params=total, nonzero_params=nonzero, checkpoint_bytes=dir_bytes(final))


def _resume_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """`last` (resume in this run directory; none there is an error), `last_or_new` (resume, or start fresh on
    purpose), a checkpoint file, or an earlier run directory."""
    if ckpt_path is None:
        return None
    if ckpt_path in ("last", "last_or_new"):
        found = resume.last_checkpoint(run_dir)
        if found is not None:
            return str(found)
        if ckpt_path == "last":
            raise SqueezeError(f"ckpt_path=last: no checkpoint in {run_dir} to resume from (checkpoints/last.ckpt); "
                               "give hydra.run.dir=<the killed run's directory>, or ckpt_path=last_or_new to start "
                               "fresh when there is none")
        log.info("ckpt_path=last_or_new: no checkpoint in %s, starting fresh", run_dir)
        return None
    return str(artifacts.resume_checkpoint(ckpt_path))


class _readable_checkpoint_errors:
    """A checkpoint whose tensors do not fit the model means another architecture: say so."""

    def __init__(self, ckpt: Any):
        self.ckpt = ckpt

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is RuntimeError and "state_dict" in str(error):
            raise SqueezeError(
                f"checkpoint {self.ckpt} is from another architecture than the configured model "
                f"({str(error).splitlines()[0]}); use the model= and task= it was trained with"
            ) from error
        return False


def _load_checkpoint(cfg, spec, tokenizer, trained: artifacts.Artifact, labels, record):
    """evaluate.py's `ckpt`, resolved: a squeeze run directory, a saved model directory, or a Lightning .ckpt."""
    head = cfg.task.head
    ckpt = Path(trained.reference)
    if trained.kind == artifacts.CKPT:
        model = spec.build(head, labels)
        state = safe_load.load(trained.checkpoint, trust=bool(cfg.get(safe_load.FLAG)))["state_dict"]
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        with _readable_checkpoint_errors(ckpt):
            model.load_state_dict(weights)
        record["ckpt"] = str(ckpt)
        return model, tokenizer, trained.checkpoint
    if trained.record is not None:
        record["choices"]["model"] = trained.choices.get("model")
        record["choices"]["compress"] = trained.choices.get("compress")
    _check_architecture(spec, trained)
    # The checkpoint's own tokenizer comes with it, whatever model= says (the default model is an encoder).
    model, tokenizer = artifacts.load(trained, head, "ckpt")
    models.check_labels(model, head, labels, f"checkpoint {ckpt}")
    record["ckpt"] = str(ckpt)
    return model, tokenizer, trained.model_dir


def _trained_model(trained: artifacts.Artifact | None) -> dict | None:
    """evaluate.py ckpt=<squeeze run> without model=: the run's own model config (name, kind), so the
    task is checked against the model the checkpoint holds, not the default model=."""
    if trained is None or _override_value("model") is not None:
        return None
    return trained.model_config


def _check_architecture(spec, trained: artifacts.Artifact) -> None:
    """A checkpoint brings its own architecture; an explicit model= that disagrees is a mistake."""
    explicit = _override_value("model")
    if explicit is None:
        return
    wanted = spec.model_type()
    if wanted is not None and wanted != trained.model_type:
        raise SqueezeError(
            f"checkpoint {trained.model_dir} is a {trained.model_type} model but model={explicit} is {wanted}; "
            "drop model= (the checkpoint brings its own) or pass the model it was trained from"
        )


def _check_sweep_strategy(cfg: DictConfig) -> None:
    """Lightning's DDP launcher starts the other ranks by re-running the command line; inside a local
    `-m` sweep that re-runs the whole sweep. On Slurm the scheduler starts the ranks instead."""
    hydra_cfg = HydraConfig.get()
    strategy = cfg.trainer.get("strategy")
    launcher = str(hydra_cfg.launcher.get("_target_", ""))
    spawns = str(strategy or "").startswith("ddp") or sharding.is_sharded(strategy)  # fsdp launches like ddp
    if hydra_cfg.mode == RunMode.MULTIRUN and spawns and "Slurm" not in launcher:
        raise SqueezeError(
            "hardware=ddp inside a local -m sweep would re-run the whole sweep in every rank; run the cells "
            "one by one, or sweep on a cluster with hydra/launcher=cluster (Slurm starts the ranks)"
        )


# -- Hydra glue ------------------------------------------------------------------------------------
def _override_value(group: str) -> str | None:
    for override in HydraConfig.get().overrides.task:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == group:
            return value
    return None


def _guarded(cfg: DictConfig, body) -> dict[str, Any]:
    """Run `body` under squeeze.guard: a record written whatever happens (the Hydra side: where, what)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    choices = _choices(cfg)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun and body is _train:
        previous = _previous_cell(cfg, run_dir)
        if previous is not None:
            return previous
    config = _resolved(cfg)
    record = new_record(run_dir, choices, config, cfg.get("seed"))
    if guard._is_global_zero():
        write_record(run_dir, record)  # status "running": a killed run is told from one that never started
    with resume.signals:
        return guard.guarded(lambda: body(cfg, record, run_dir), record, run_dir, multirun=multirun)


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as result.json records it."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # e.g. an asset path resolver failing: record what we can
        log.warning("config did not fully resolve: %s", e)
        return OmegaConf.to_container(cfg, resolve=False)


def _same_cell(config: dict[str, Any]) -> str:
    """A cell's config as result.json holds it (JSON), without what only steers this invocation (resuming,
    rerunning failed cells)."""
    kept = {k: v for k, v in config.items() if k not in ("ckpt_path", "rerun_failed", "trust_checkpoint", "hydra")}
    return json.dumps(kept, sort_keys=True, default=jsonable)


def _previous_cell(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """A sweep rerun in the same sweep directory: a finished cell is skipped (its record returned), a failed one
    too unless rerun_failed=true, and an interrupted or killed one resumes from its newest checkpoint. A cell
    whose directory holds a run of another config (a preset's row edited, then rerun into its fixed sweep
    directory) is not that cell: its outputs move into <cell>/replaced-<time>/, kept, and the cell runs afresh."""
    try:
        previous = read_record(run_dir)
        status = previous.get("status")
    except (OSError, ValueError):
        return None
    if previous.get("config") is not None and _same_cell(previous["config"]) != _same_cell(_resolved(cfg)):
        # Hydra's own files (.hydra/, the job's log) stay; the run's outputs move into a kept folder.
        aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for item in run_dir.iterdir():
            if item != aside and item.name not in (".hydra",) and not item.name.endswith(".log"):
                item.rename(aside / item.name)
        log.info("cell %s: its directory held a run of another config (now in %s); running the cell afresh",
                 run_dir.name, aside)
        return None
    if status == "ok" or (status == "failed" and not cfg.get("rerun_failed")):
        log.info("cell %s: %s before, skipped%s", run_dir.name, "finished" if status == "ok" else "failed",
                 "" if status == "ok" else " (rerun_failed=true runs it again)")
        return read_record(run_dir)
    if status in ("running", "interrupted") and cfg.get("ckpt_path") is None:
        with open_dict(cfg):
            cfg.ckpt_path = "last_or_new"
    return None
