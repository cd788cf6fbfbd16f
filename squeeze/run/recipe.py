"""One run, top to bottom: what `train.py` and `evaluate.py` do.

build the model, the task's data and the compressor chain → fit (resumable; the best validation checkpoint
restored) → finalize the chain → test → measure → save the model → result.json, written whatever happens.
evaluate.py is the same minus fit, from a finished run, a saved model or a pretrained one. In a sweep, a chain
that acts only on the fine-tuned weights starts instead from the stored fine-tuned baseline (trained once), as
evaluate.py would from a finished run, and a chain that trains then compresses ([imp,dq]) from the sweep's finished
cell that trained its head ([imp]). A failure at any step is written into result.json with status "failed";
in a sweep the next cell then runs, alone it ends the program with one line.

Beside it in squeeze/run/: build (config → model, data, chain, module, Trainer), cell (what Hydra says about
this run and what its directory held before: the one reader of HydraConfig besides the entry points and the
sweeper), guard (the record written, loggers closed), baselines (the store), cost, summary, loggers, sweep.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from squeeze import artifacts, formats, measure, models
from squeeze.compress import calibrate, chain_summary, check_post_training
from squeeze.config import chain_name
from squeeze.hardware import checkpointing, pipeline, sharding
from squeeze.measure import energy, speculative
from squeeze.record import dir_bytes
from squeeze.run import baselines, build, cost, trained_head
from squeeze.run.cell import Cell, guarded


def train(cfg: DictConfig) -> dict[str, Any]:
    speculative.check_decode(cfg.get("decode"), None, cfg.task.head, evaluating=False)
    if cfg.get("pipeline") is not None:  # hardware=pipeline: torch's pipeline schedules, not Lightning
        return guarded(cfg, _train_pipeline)
    return guarded(cfg, _train, sweep_rerun=True)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    return guarded(cfg, _evaluate)


def _train(cfg: DictConfig, record: dict[str, Any], cell: Cell, as_baseline: bool = False) -> dict[str, Any]:
    teacher = baselines.auto_teachers(cfg, record, cell, _train)  # compress.<kd|pkd>.teacher=auto: the store's
    chain = build.chain(cfg.compress)
    if not as_baseline and baselines.reused(cfg, chain, cell):
        return baselines.on_stored(cfg, chain, record, cell, train=_train, evaluate=_evaluate)
    if not as_baseline and (head := trained_head.finished_head(cfg, record, chain, cell)) is not None:
        return trained_head.on_finished_head(cfg, chain, head, record, cell, evaluate=_evaluate)  # [imp,dq] on imp's
    sharding.check_compressors(chain, cfg.trainer.get("strategy"))  # hardware=fsdp: refuse what cannot shard
    spec, tokenizer, data = build.prepare(cfg)
    # post-training methods calibrate on its train split (or calibration.data_files)
    calibrate(chain, data, cfg.get("calibration"), fitting=cfg.trainer.get("max_steps", -1) != 0)
    trainer, loggers = build.trainer(cfg, cell, extra_callbacks=chain)  # first: its energy meter times what follows
    record["_loggers"] = loggers
    model = spec.build(cfg.task.head, build.labels(data))
    models.finish_model(model, tokenizer)
    record["memory_after_load"] = measure.memory_after_load(model)
    with cost.compress_phase(trainer.callbacks, record, chain):
        for compressor in chain:
            model = compressor.prepare_model(model, tokenizer)
    data.check_model(model)
    module = build.module(cfg, model)
    for compressor in chain:
        module = compressor.wrap_module(module)

    if cfg.trainer.get("max_steps", -1) != 0:
        ckpt_path = checkpointing.resume_from(cfg.get("ckpt_path"), cell.run_dir, record, loggers)
        with checkpointing.fitting(trainer, record, cfg.get("ckpt_path")):  # stop signals; train_seconds
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        best = all(c.test_best_checkpoint for c in chain)  # else the last weights are tested (a pruner's choice)
        if best:
            checkpointing.restore_sharded_best(trainer)  # hardware=fsdp: a sharded best loads while still sharded
        sharding.gather(trainer, module)  # hardware=fsdp: the whole model again, for what follows fit
        record["fine_tuning_version"] = baselines.FINE_TUNING_VERSION  # the code that trained this model
        record["train_tokens"] = getattr(module, "train_tokens", None)
        record["train_tokens_per_s"] = measure.tokens_per_s(record["train_tokens"], record["train_seconds"])
        record["checkpoint_seconds"] = checkpointing.checkpoint_seconds(trainer)
        record["validation"] = checkpointing.best_validation(trainer, cfg.task.monitor, cfg.task.monitor_mode)
        if best:
            checkpointing.restore_best(trainer, module)
    else:
        record["train_seconds"] = 0.0  # zero-shot: the pretrained weights, untouched

    # Compression made permanent, in the configured order, before the model is tested and saved:
    # what is measured is exactly what is on disk.
    with cost.compress_phase(trainer.callbacks, record, chain):
        _finalize(chain, module, record)
    if as_baseline:  # a store entry (squeeze.run.baselines): the cells that use it test their own model
        if trainer.is_global_zero:
            _save(module, tokenizer, cell.run_dir, record)
        record["energy"] = energy.measured(trainer.callbacks)
        return record
    _test(trainer, module, data, record)
    sharding.gather(trainer, module)  # hardware=fsdp: test sharded it again
    if trainer.is_global_zero:
        _save(module, tokenizer, cell.run_dir, record)
        _measure(cfg, trainer, module.model, data, record)
    if teacher is not None:  # what this cell spent, the teacher's training counted once (the report's totals)
        record["spent"] = baselines.spent(teacher, record.get("energy"), float(record.get("train_seconds") or 0.0))
    post_training = bool(chain) and all(c.after_training for c in chain)
    started = teacher.record if teacher is not None else cost.starting_run(cfg, record)
    record["cost"] = cost.of_training(record, data, post_training, started)
    return record


def _train_pipeline(cfg: DictConfig, record: dict[str, Any], cell: Cell) -> dict[str, Any]:
    """hardware=pipeline (squeeze.hardware.pipeline): fine-tuning in stages; the stages' figures, then the trained
    model tested, saved and measured in this process like any run's, so it is a row beside the others."""
    pipeline.check(cfg.task.head, build.chain(cfg.compress))
    spec, tokenizer, data = build.prepare(cfg)
    batches = pipeline.train_batches(data, int(cfg.trainer.get("max_steps") or -1))
    figures, model = pipeline.run(functools.partial(spec.build, cfg.task.head, None), batches, **cfg.pipeline,
                                  lr=float(cfg.optimizer.lr), seed=int(cfg.seed))
    record.update(pipeline=figures, train_seconds=figures["train_seconds"], train_tokens=figures["train_tokens"],
                  train_tokens_per_s=figures["tokens_per_s"], fine_tuning_version=baselines.FINE_TUNING_VERSION)
    models.finish_model(model, tokenizer)
    module = build.module(cfg, model)
    trainer, record["_loggers"] = build.trainer(cfg, cell)
    _test(trainer, module, data, record)
    record["metrics"]["train/loss"] = figures["loss"]
    _save(module, tokenizer, cell.run_dir, record)
    _measure(cfg, trainer, module.model, data, record)
    record["cost"] = cost.row_cost(record, trains=True, own_train_seconds=figures["train_seconds"], base=None,
                                   units=cost.evaluated_units(data, record.get("perplexity")))
    return record


def _evaluate(cfg: DictConfig, record: dict[str, Any], cell: Cell) -> dict[str, Any]:
    speculative.check_decode(cfg.get("decode"), cfg.get("draft"), cfg.task.head,
                             settings=OmegaConf.to_container(cfg.speculative) if cfg.get("speculative") else None)
    chain = build.chain(cfg.compress)
    check_post_training(chain)
    trained = build.trained(cfg.get("ckpt"))
    spec, tokenizer, data = build.prepare(cfg, trained_model=build.trained_model(trained, cell))
    calibrate(chain, data, cfg.get("calibration"), fitting=False)  # a one-file test split refused before loading
    labels = build.labels(data)
    if trained is None:
        model, size_from = spec.build(cfg.task.head, labels), None
    else:
        model, tokenizer, size_from = build.load_trained(cfg, spec, tokenizer, trained, labels, record, cell)
    models.finish_model(model, tokenizer)
    record["memory_after_load"] = measure.memory_after_load(model)
    speculative.check_draft(cfg.get("draft"), model, tokenizer)  # fails before testing, which can be long
    data.tokenizer = tokenizer
    data.check_model(model)
    trainer, record["_loggers"] = build.trainer(cfg, cell)  # first: its energy meter times the compression
    with cost.compress_phase(trainer.callbacks, record, chain):
        for compressor in chain:
            model = compressor.prepare_model(model, tokenizer)
        module = build.module(cfg, model)
        if hasattr(module, "load_task_head"):  # dialog's MC head, saved beside the model it was trained with
            module.load_task_head(size_from if size_from is not None and Path(size_from).is_dir() else None)
        _finalize(chain, module, record)
    record["train_seconds"] = 0.0
    if chain:  # validation.best describes the model that is tested: the compressed one
        record["validation"] = _validation_pass(cfg, trainer, module, data)
    _test(trainer, module, data, record)
    # What it started from: the finished run it compressed (its whole cost), or a pretrained model (nothing).
    record["cost"] = cost.row_cost(record, trains=False, own_train_seconds=0.0,
                                   base=None if trained is None else cost.started_from(trained.record),
                                   units=cost.evaluated_units(data, record.get("perplexity")))
    if trainer.is_global_zero:
        _measure(cfg, trainer, module.model, data, record)
        if cfg.get("decode") == "speculative":
            record["speculative"] = speculative.from_config(module.model, tokenizer, data, cfg.draft,
                                                            OmegaConf.to_container(cfg.speculative))
    if chain:
        # The checkpoint's own compression (if any) followed by what this evaluation applied.
        before = record["choices"]["compress"] if size_from is not None else "none"
        record["choices"]["compress"] = "+".join(n for n in (before, chain_name(cfg.compress)) if n != "none")
        if trainer.is_global_zero:  # what was measured is saved, so its size on disk is real
            _save(module, tokenizer, cell.run_dir, record)
        return record
    total, nonzero = models.count_params(module.model)
    record.update(params=total, nonzero_params=nonzero)
    if size_from is not None:
        record["checkpoint_bytes"] = dir_bytes(size_from)
    return record


# -- steps ------------------------------------------------------------------------------------------
def _finalize(chain, module, record: dict[str, Any]) -> None:
    for compressor in chain:
        module.model = compressor.finalize(module.model)
    record["compress"] = chain_summary(chain)
    # The global sparsity the last pruner of the chain reached, at the top level where reports look for it.
    sparsities = [record["compress"][c.name].get("sparsity") for c in chain]
    record["sparsity"] = next((s for s in reversed(sparsities) if s is not None), None)


def _validation_pass(cfg: DictConfig, trainer, module, data) -> dict[str, Any] | None:
    """The monitored metric of one validation pass over this model (a post-training row's validation.best), or
    None when the task has no validation split here (evaluate.py scoring one file)."""
    data.setup("test")
    if "validation" not in (getattr(data, "datasets", None) or {}):
        return None
    results = trainer.validate(module, datamodule=data, verbose=False)
    value = (results[0] if results else {}).get(cfg.task.monitor)
    return None if value is None else {"monitor": cfg.task.monitor, "mode": cfg.task.monitor_mode,
                                       "best": float(value), "from": "validation pass of the compressed model"}


def _test(trainer, module, data, record: dict[str, Any]) -> None:
    start = time.perf_counter()
    results = trainer.test(module, datamodule=data, ckpt_path=None, verbose=False)
    record["eval_seconds"] = time.perf_counter() - start
    record["kernels"] = formats.kernels_used(module.model) or None  # what the integer layers ran in the test
    record["metrics"] = {k: float(v) for k, v in (results[0] if results else {}).items()}
    if getattr(_task_of(module), "hits_rank", None):  # which ranking the Hits@k figures are
        record["hits_rank"] = _task_of(module).hits_rank
    if hasattr(data, "protocol_record"):
        record["perplexity"] = data.protocol_record
    record["peak_memory_bytes"], record["peak_memory_kind"] = measure.peak_memory()
    measured = energy.measured(trainer.callbacks)
    if measured is not None:
        record["energy"] = measured


def _measure(cfg: DictConfig, trainer, model, data, record: dict[str, Any]) -> None:
    if cfg.get("perf") is not None:  # perf=null skips it; perf.devices: where, else the run's device
        record["perf"] = measure.of_run(model, data, cfg.perf, trainer.strategy.root_device.type)


def _task_of(module):
    """The task's own module (distillation wraps it)."""
    return getattr(module, "_task", module)


def _save(module, tokenizer, run_dir: Path, record: dict[str, Any]) -> None:
    """The run's deliverable: a plain transformers directory (loadable without squeeze), replacing any earlier
    one only once it is complete; a task's trained head outside the model (dialog's MC head) beside it."""
    model = module.model
    saved = formats.save_atomic(model, tokenizer, run_dir / artifacts.RUN_MODEL,
                                instead=f"evaluate the checkpoint in {run_dir / 'checkpoints'}",
                                extra=getattr(_task_of(module), "save_task_head", None))
    total, nonzero = models.count_params(model)
    record.update(params=total, nonzero_params=nonzero, checkpoint_bytes=dir_bytes(saved),
                  model_loads_in_transformers=formats.loads_in_transformers(saved))
