"""What a run is made of, built from its config: the model spec, tokenizer and data module (`prepare`), the
compressor chain in its configured order (`chain`: compressors are instantiated here, not by squeeze.compress),
the LightningModule, the Trainer with its callbacks, loggers and plugins, and evaluate.py's `ckpt=` loaded
(`trained`, `load_trained`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.plugins.io import CheckpointIO
from omegaconf import DictConfig, OmegaConf

from squeeze import artifacts, models
from squeeze.compress import Compressor, check_order
from squeeze.config import check_counts, used_compressors
from squeeze.errors import SqueezeError
from squeeze.hardware import checkpointing, safe_load
from squeeze.run.cell import Cell

EVALUATES = (artifacts.RUN, artifacts.MODEL_DIR, artifacts.CKPT)  # what evaluate.py's ckpt= takes
EVALUATES_TEXT = "a run directory, a model directory or a .ckpt file"


def built(node, **kwargs):
    """hydra.utils.instantiate, where a SqueezeError raised while building (a data module reading its files, a
    strategy builder, a compressor's settings) stays its own one line instead of Hydra's wrapped traceback."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, SqueezeError):
            raise e.__cause__ from None
        raise


def prepare(cfg: DictConfig, trained_model: dict | None = None):
    """(model spec, tokenizer, data module), after the seed is set: what every path of the run starts with.
    trained_model: the model config a checkpoint was trained with, checked against the task instead."""
    check_counts(cfg.trainer, cfg.task.data)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    spec = built(cfg.model, _convert_="all")
    name, kind = (trained_model["name"], trained_model["kind"]) if trained_model else (spec.name, spec.kind)
    models.check_compatible(name, kind, cfg.task.name, cfg.task.head)
    tokenizer = spec.tokenizer()
    data = built(cfg.task.data, tokenizer=tokenizer, seed=cfg.seed, _convert_="all")
    return spec, tokenizer, data


def labels(data) -> list[str] | None:
    return getattr(data, "labels", None)


def chain(compress_cfg: Mapping | None) -> list[Compressor]:
    """cfg.compress's compressors in order, checked (squeeze.compress.check_order); `none` (null) entries are the
    baseline, and settings for a compressor this cell does not use (no `_target_`: a mixed sweep's shared
    settings) are skipped."""
    compressors: list[Compressor] = []
    for key, node in used_compressors(compress_cfg).items():
        node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        label = node.pop("label", None)  # the report's, not the compressor's
        compressor = built(node, _convert_="all")
        if not isinstance(compressor, Compressor):
            raise SqueezeError(f"compress.{key} built a {type(compressor).__name__}, not a squeeze Compressor; "
                               "check its _target_")
        compressor.name = str(key)
        compressor.label = None if label is None else str(label)
        compressors.append(compressor)
    check_order(compressors)
    return compressors


def module(cfg: DictConfig, model) -> L.LightningModule:
    kwargs: dict[str, Any] = {"model": model}
    if cfg.get("optimizer") is not None:
        kwargs["optimizer"] = built(cfg.optimizer)
    if cfg.get("scheduler") is not None:
        kwargs["scheduler"] = built(cfg.scheduler)
    return built(cfg.task.module, _convert_="all", **kwargs)


def trainer(cfg: DictConfig, cell: Cell, extra_callbacks=()) -> tuple[L.Trainer, list]:
    """The Trainer writing into the cell's run directory, and its loggers. Checkpoints are written atomically
    unless the config brings its own CheckpointIO; on Slurm the job requeues itself."""
    cell.check_strategy(cfg.trainer.get("strategy"))
    callbacks = [built(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks += list(extra_callbacks)
    loggers = [built(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    plugins = list(instantiate(cfg.trainer.get("plugins") or [], _convert_="all"))
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(checkpointing.AtomicCheckpointIO())
    plugins += checkpointing.cluster_plugins()
    made = built(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(cell.run_dir),
                 plugins=plugins)
    return made, loggers


# -- evaluate.py's ckpt= -----------------------------------------------------------------------------------
def trained(ckpt: Any) -> artifacts.Artifact | None:
    return None if ckpt is None else artifacts.resolve(ckpt, "ckpt", accept=EVALUATES, expected=EVALUATES_TEXT)


def trained_model(found: artifacts.Artifact | None, cell: Cell) -> dict | None:
    """evaluate.py ckpt=<squeeze run> without model=: the run's own model config (name, kind), so the
    task is checked against the model the checkpoint holds, not the default model=."""
    if found is None or cell.override("model") is not None:
        return None
    return found.model_config


def load_trained(cfg: DictConfig, spec, tokenizer, found: artifacts.Artifact, data_labels, record: dict, cell: Cell):
    """(model, tokenizer, what its size on disk is measured from) for a squeeze run directory, a saved model
    directory, or a Lightning .ckpt (rebuilt from model=)."""
    head = cfg.task.head
    ckpt = Path(found.reference)
    if found.kind == artifacts.CKPT:
        model = spec.build(head, data_labels)
        state = safe_load.load(found.checkpoint, trust=bool(cfg.get(safe_load.FLAG)))["state_dict"]
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        with checkpointing.readable_checkpoint_errors(ckpt):
            model.load_state_dict(weights)
        record["ckpt"] = str(ckpt)
        return model, tokenizer, found.checkpoint
    if found.record is not None:
        record["choices"]["model"] = found.choices.get("model")
        record["choices"]["compress"] = found.choices.get("compress")
    _check_architecture(spec, found, cell.override("model"))
    # The checkpoint's own tokenizer comes with it, whatever model= says (the default model is an encoder).
    model, tokenizer = artifacts.load(found, head, "ckpt")
    models.check_labels(model, head, data_labels, f"checkpoint {ckpt}")
    record["ckpt"] = str(ckpt)
    return model, tokenizer, found.model_dir


def _check_architecture(spec, found: artifacts.Artifact, explicit: str | None) -> None:
    """A checkpoint brings its own architecture; an explicit model= that disagrees is a mistake."""
    if explicit is None:
        return
    wanted = spec.model_type()
    if wanted is not None and wanted != found.model_type:
        raise SqueezeError(
            f"checkpoint {found.model_dir} is a {found.model_type} model but model={explicit} is {wanted}; "
            "drop model= (the checkpoint brings its own) or pass the model it was trained from"
        )
