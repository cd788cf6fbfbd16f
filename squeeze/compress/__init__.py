"""Compressors and how a run chains them.

A compressor option (`conf/compress/<name>.yaml`) holds one key, its name, whose value instantiates
a `Compressor` (the run builds them: squeeze.run.build.chain). Choosing several (`compress=[pkd,imp,dq]`)
merges their keys in the order given, and the run applies them in that order at four points of one run:

    prepare_model(model)   before the LightningModule exists (a student cut from a teacher, heads removed)
    wrap_module(module)    the objective (distillation brings its own LightningModule)
    Lightning hooks        during fit: every compressor is also a Lightning callback (masks, fake-quant)
    finalize(model)        after fit, on the weights that are tested and saved (masks folded in,
                           fake-quant converted, post-training quantization applied)

Post-training methods that read calibration data (SmoothQuant, GPTQ, Wanda, SparseGPT) are handed the
run's data module first (`calibrate_with(data, settings)`, the shared `calibration:` settings): they
calibrate on its train split, or on `calibration.data_files` when set (required when the task's data is one
file scored as the test split: evaluate.py task.data.data_files=<file>).

Order rules, checked before anything loads (`check_order`):
  - a compressor that trains (`trains=True`) cannot come after one that turns the weights into
    integers (`integer_weights=True`): gradients do not flow through int8 weights;
  - a compressor that prepares float weights for quantization or prunes them once (`float_weights=True`:
    smoothquant, wanda, sparsegpt) comes before every one that turns them into integers;
  - at most one compressor may replace the training objective (`replaces_objective=True`), and it comes
    first: distillation builds the student the later compressors prune or quantize, so whatever an
    earlier one planned on the model it started from would not apply to the student.
A one-shot method followed by a compressor that trains is applied before training, so training starts
from its result (`trained_after`, set here): `[wanda, imp]` fine-tunes from Wanda's mask, `[smoothquant,
qat]` trains the smoothed model. Otherwise it is applied at finalize, to the weights that are saved.
So `[pkd, imp, dq]` distills a pruned student and quantizes the result; `[dq, qat]` fails fast.

Pruning during fine-tuning (imp, heads in steps) ends early enough for the model to recover: no pruning event
in the last `recovery` share of the run's optimizer steps (`pruning_deadline`), and each event makes Lightning's
ModelCheckpoint forget its best checkpoint (`Compressor.restart_best_checkpoint`), so the best validation it keeps,
which the run tests and records as validation.best, is one of the model at its final sparsity.

A compressor never imports another one; chaining is the run's job (squeeze/run/recipe.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from squeeze.errors import SqueezeError


class Compressor(L.Callback):
    """One compression technique. Subclasses override the hooks they need; the defaults do nothing."""

    name: str = "compressor"
    label: str | None = None  # compress.<name>.label: the report row's name for this setting (e.g. AH90)
    trains: bool = False  # needs gradient steps on float weights (pruning, QAT, distillation)
    integer_weights: bool = False  # finalize leaves integer weights (dq, weight-only, converted QAT)
    replaces_objective: bool = False  # wrap_module returns a module with another loss (distillation)
    float_weights: bool = False  # works on float weights: comes before every integer_weights compressor
    folds_scales: bool = False  # folds per-channel scales into the norms (smoothquant, awq): one per chain
    trained_after: bool = False  # set by check_order: a later compressor of the chain trains
    # Acts only on the fine-tuned weights (at finalize), so applying it to a stored fine-tuned model is the
    # same run (squeeze.run.baselines). Not so for what prunes before fine-tuning (rows, heads) or trains.
    after_training: bool = False
    # The weights tested and saved: the best validation checkpoint, or the last weights. A pruner keeps the
    # best one among the validations after its last event (restart_best_checkpoint), so it can test the best.
    test_best_checkpoint: bool = True
    # Why it cannot run under a sharding strategy (hardware=fsdp), in one clause; None: it can.
    unsharded: str | None = None

    def calibrate_with(self, data, settings: Mapping | None = None, fitting: bool | None = None) -> None:
        """The run's data module and the shared `calibration:` settings, before prepare_model. Methods
        that calibrate keep them (the train split or calibration.data_files is the calibration data), and
        check where it comes from when `fitting` (whether the run fine-tunes on the data) is given; the rest
        ignore them."""

    def prepare_model(self, model, tokenizer):
        return model

    def wrap_module(self, module: L.LightningModule) -> L.LightningModule:
        return module

    def finalize(self, model):
        return model

    def summary(self) -> dict[str, Any]:
        """What result.json records under compress.<name> (settings and achieved figures)."""
        return {}

    def restart_best_checkpoint(self, trainer) -> None:
        """The model just changed (pruned): the validations so far scored another, denser model. Lightning's
        ModelCheckpoint forgets its best ones (scores, paths and files), so the best it keeps, which the run
        tests and records, is among the validations from now on. Its state is in every checkpoint, so a
        resumed run keeps forgetting what the uninterrupted one forgot."""
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint):
                continue
            stale = [p for p in callback.best_k_models if p and p != callback.last_model_path]
            callback.best_k_models, callback.kth_best_model_path = {}, ""
            callback.best_model_score, callback.best_model_path, callback.current_score = None, "", None
            callback.kth_value = torch.tensor(torch.inf if callback.mode == "min" else -torch.inf)
            resumed_from = Path(trainer.ckpt_path).resolve() if trainer.ckpt_path else None
            for path in stale:  # a denser model's checkpoint left as best.ckpt would pass for the result
                if Path(path).resolve() != resumed_from:
                    trainer.strategy.remove_checkpoint(path)


RECOVERY = 0.3  # the share of a run's optimizer steps after the last pruning event, by default


def pruning_deadline(total_steps: float, recovery: float) -> int:
    """The last optimizer step at which a pruning event may fall in a run of `total_steps` steps: the last
    `recovery` share of them (at least one step) trains the model at its final sparsity, so what is validated,
    tested and saved has recovered from the last event. 100 steps, recovery 0.3: events up to step 70."""
    total = int(total_steps)
    return total - max(1, math.ceil(round(recovery * total, 9)))  # round: 0.3 * 10 is 3.0000000000000004


def check_steps_fit(what: str, trainer, iterations: int, every_n_steps: int, start_step: int,
                    recovery: float) -> int:
    """Structured pruning in `iterations` cuts, the first at `start_step`, then every `every_n_steps`: the last one
    must fall before the run's recovery window (pruning_deadline). Returns the deadline; refuses what cannot fit,
    naming the fix, before training starts. Shapes change during fit, which distributed training cannot follow."""
    if trainer.world_size > 1:
        raise SqueezeError(f"{what}: pruning in {iterations} steps changes parameter shapes during fit, "
                           "which distributed training cannot follow; use iterations=1 or a single device")
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise SqueezeError(f"{what}: pruning in {iterations} steps needs a run of known length to keep "
                           f"its last steps for recovery ({what}.recovery); set trainer.max_steps")
    total = int(total)
    deadline = pruning_deadline(total, recovery)
    last = start_step + (iterations - 1) * every_n_steps
    if last > deadline:
        most = (deadline - start_step) // (iterations - 1)
        fix = f"lower every_n_steps to ≤ {most} or iterations" if most >= 1 else "lower iterations or start_step"
        raise SqueezeError(f"{what}: the last of {iterations} pruning steps every {every_n_steps} "
                           f"steps comes at step {last}, but this run's last {total - deadline} of {total} "
                           f"optimizer steps are kept to recover ({what}.recovery={recovery}), so "
                           f"pruning ends by step {deadline}; {fix}, or train longer")
    return deadline


def check_recovery(recovery: Any, what: str) -> None:
    if isinstance(recovery, bool) or not isinstance(recovery, (int, float)) or not 0 <= recovery < 1:
        raise SqueezeError(f"{what}={recovery!r} must be a share in [0, 1) of the run's optimizer steps kept to "
                           "recover after the last pruning event (0.3: no pruning in the last 30%)")


def check_post_training(chain: Iterable[Compressor]) -> None:
    """evaluate.py applies a chain to a finished model: only what trains nothing."""
    for c in chain:
        if c.trains:
            raise SqueezeError(f"compress={c.name} trains the model; run `python train.py compress={c.name}` and "
                               f"then `python evaluate.py ckpt=<that run directory>`")


def chain_summary(chain: Iterable[Compressor]) -> dict[str, Any]:
    """result.json's `compress`: the chain's names in order, and what each compressor records (its label too)."""
    chain = list(chain)
    return {"chain": [c.name for c in chain],
            **{c.name: {**c.summary(), **({"label": c.label} if c.label else {})} for c in chain}}


def calibrate(chain: Iterable[Compressor], data, settings: Mapping | None, fitting: bool | None = None) -> None:
    """Hand every compressor the run's data module and the calibration settings (the run calls this, before the
    model loads). `fitting`: whether the run fine-tunes on the data; given, a calibration source that cannot be
    (evaluate.py's one scored file and no calibration.data_files, a missing calibration file) is refused now, else
    when calibration runs."""
    for c in chain:
        c.calibrate_with(data, settings, fitting)


def check_order(chain: Iterable[Compressor]) -> None:
    chain = list(chain)
    converted = None
    objective = None
    folded = None
    for i, c in enumerate(chain):
        c.trained_after = any(later.trains for later in chain[i + 1:])
        if c.folds_scales:
            if folded is not None:
                raise SqueezeError(f"compress: {folded.name} and {c.name} both fold per-channel scales into the same "
                                   "norms, each chosen for the unscaled model; choose one of them")
            folded = c
        if c.float_weights and converted is not None:
            keep_float = getattr(converted, "keeps_float_with", None)
            # two quantizers that each read float weights ([awq,gptq]): swapping them is refused too
            fix = ("keep one of them" if c.integer_weights and converted.float_weights else
                   f"put {c.name} before {converted.name}, e.g. [{c.name},{converted.name}]")
            raise SqueezeError(
                f"compress order: {c.name} works on float weights but comes after {converted.name}, which has "
                f"already turned them into integers; {fix}" + (
                    f", or leave {converted.name}'s weights float with {keep_float.format(name=converted.name)}"
                    if keep_float else ""))
        if c.trains and converted is not None:
            raise SqueezeError(
                f"compress order: {c.name} trains the model but comes after {converted.name}, which has already "
                f"turned the weights into integers; put {c.name} before {converted.name}"
            )
        if c.integer_weights:
            converted = c
        if c.replaces_objective:
            if objective is not None:
                raise SqueezeError(f"compress: {objective.name} and {c.name} both replace the training objective; "
                                   "choose one of them")
            if c is not chain[0]:
                raise SqueezeError(f"compress order: {c.name} builds the student model that the other compressors "
                                   f"work on, so it comes first; put {c.name} first, e.g. [{c.name},{chain[0].name}]")
            objective = c
