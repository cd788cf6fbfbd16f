"""Iterative magnitude pruning (`compress=imp`): what to prune, when, and keeping it pruned.

What: the weight matrices whose names match `include` and no `exclude` pattern (regular expressions,
case-insensitive; by default the model family's attention and MLP projections, never the embeddings
or norms: squeeze.arch's adapter says which names those are), ranked by |w| over all of them (`global`), within each matrix (`layer`), or
within each output row (`row`: the incoming weights of one unit; GPT-2's Conv1D stores those as
columns).
When: a schedule, a pure function of the optimizer step (`fixed`, `cubic`) or of the validation
loss (`adaptive`). After each pruning event the surviving weights can be rewound to their values
at step `rewind_step` (0: the pretrained weights), as in lottery-ticket rewinding.
Recovery: no event (so no rewind, which belongs to its event) after the deadline, the step that leaves the
last `recovery` share of the run's optimizer steps (0.3: 30%) to train at the final sparsity; a schedule
that cannot finish by then is refused before training. Each event restarts the best-validation checkpoint,
so the model tested and saved, and validation.best, are the best one after the last event.
Kept pruned: pruned entries' gradients are zeroed before every optimizer step (so Adam's moments
stay zero and clipping ignores them), their moments are zeroed when they are pruned, and the masks
are re-applied after every step, so AdamW and weight decay leave them exactly zero. Masks, schedule
state and rewind values live in the Lightning checkpoint, so a resumed run continues the same
schedule. `finalize` folds the masks into the weights; checkpoint.save then stores them sparsely.

Written by hand rather than with torch.nn.utils.prune: that module reparametrizes each weight as
`weight_orig * weight_mask`, which renames state-dict keys (breaking checkpoints, resume and
save_pretrained) and keeps a second dense copy of every pruned matrix.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from squeeze import measure
from squeeze.arch import adapter_for
from squeeze.arch.linear import is_transposed
from squeeze.compress import RECOVERY, Compressor, check_recovery, pruning_deadline
from squeeze.errors import SqueezeError

log = logging.getLogger("squeeze")

SCHEDULES = ("fixed", "cubic", "adaptive")
GRANULARITIES = ("global", "layer", "row")
_EPS = 1e-9


# -- schedules: pure functions of the step -------------------------------------------------------
STEP_OF = ("remaining", "original")


def stage_sparsity(stage: int, target: float, fraction: float, step_of: str = "remaining") -> float:
    """Sparsity after `stage` events, capped at `target`: each event prunes `fraction` of the remaining
    weights (`remaining`), or of the original ones (`original`: 10% steps reach 90% in 9 events)."""
    level = stage * fraction if step_of == "original" else 1.0 - (1.0 - fraction) ** stage
    return target if level >= target - _EPS else level


def stages_to_target(target: float, fraction: float, step_of: str = "remaining") -> int:
    """How many `fraction` events reach `target` (counted the way stage_sparsity caps, for consistency)."""
    stages = 1
    while stage_sparsity(stages, target, fraction, step_of) < target:
        stages += 1
    return stages


def fixed_sparsity(step: int, target: float, fraction: float, frequency: int, start: int = 0,
                   step_of: str = "remaining") -> float:
    """`fraction` (of the remaining or the original weights) every `frequency` steps after `start`, until `target`."""
    if step < start:
        return 0.0
    return stage_sparsity((step - start) // frequency, target, fraction, step_of)


def cubic_sparsity(step: int, target: float, start: int, end: int, frequency: int) -> float:
    """Zhu & Gupta (2017): target·(1 − (1 − progress)³), updated every `frequency` steps after `start`;
    fast at first, while there are many small weights to take, and the target from `end` on."""
    if step >= end:
        return target
    if step < start:
        return 0.0
    progress = (step - start) // frequency * frequency / (end - start)
    return target * (1.0 - (1.0 - progress) ** 3)


def adaptive_should_prune(val_loss: float, threshold: float, level: float, target: float) -> bool:
    """Prune the next stage only while the model is good enough (validation loss under the threshold)."""
    return level < target - _EPS and math.isfinite(val_loss) and val_loss < threshold


def first_validation(val_check_batch: float | None, epoch_batches: float, every_n_epochs: int | None,
                     accumulate: int = 1) -> float | None:
    """The optimizer step after which a run first validates, by Lightning's rules (validation after every
    `val_check_batch` batches of an epoch, or counted across epochs when `every_n_epochs` is None, and at
    each epoch's last batch); None when that depends on time or on data of unknown length."""
    if val_check_batch is None or not math.isfinite(epoch_batches):
        return None
    if every_n_epochs is None:
        return val_check_batch // accumulate if math.isfinite(val_check_batch) else None
    at = min(val_check_batch, epoch_batches)
    steps = math.ceil(at / accumulate) if at == epoch_batches else int(at) // accumulate  # the last batch steps
    return (every_n_epochs - 1) * math.ceil(epoch_batches / accumulate) + steps


def _first_validation_of(trainer) -> float | None:
    if not trainer.enable_validation:  # limit_val_batches=0, or no validation data
        return math.inf
    return first_validation(trainer.val_check_batch, trainer.num_training_batches, trainer.check_val_every_n_epoch,
                            trainer.accumulate_grad_batches)


# -- what to prune ---------------------------------------------------------------------------------
def select_weights(model: nn.Module, include: Sequence[str], exclude: Sequence[str]):
    """(name → parameter, names stored transposed): the ≥2-D `*.weight` parameters that match an
    `include` pattern and no `exclude` pattern. Each include pattern must match something: a typo
    would otherwise prune nothing and the run would look fine."""
    candidates: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.dim() < 2 or not name.endswith("weight") or id(p) in seen:
            continue  # tied weights (lm_head = embeddings) are one tensor: count it once
        seen.add(id(p))
        if not any(re.search(x, name, re.IGNORECASE) for x in exclude):
            candidates[name] = p
    selected: dict[str, nn.Parameter] = {}
    for pattern in include:
        hits = {n: p for n, p in candidates.items() if re.search(pattern, n, re.IGNORECASE)}
        if not hits:
            examples = ", ".join(list(candidates)[:3]) or "none"
            raise SqueezeError(
                f"compress.imp.include pattern {pattern!r} matches no weight matrix of {type(model).__name__} "
                f"(not excluded by {list(exclude)}; e.g. {examples}); fix the pattern"
            )
        selected.update(hits)
    transposed = {n for n in selected if is_transposed(model.get_submodule(n.rpartition(".")[0]))}
    return selected, transposed


# -- masks -----------------------------------------------------------------------------------------
def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly the `k` lowest entries of a 1-D tensor (ties broken by position)."""
    prune = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return prune
    if k >= scores.numel():
        return ~prune
    threshold = scores.kthvalue(k).values
    prune = scores < threshold
    missing = k - int(prune.sum())
    if missing > 0:
        ties = (scores == threshold).nonzero().flatten()[:missing]
        prune[ties] = True
    return prune


def magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    granularity: str,
    keep: Mapping[str, torch.Tensor] | None = None,
    transposed: set[str] | frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Boolean masks (True = kept) pruning the smallest |w| to `sparsity`: round(sparsity·n) entries of
    all weights together (`global`), of each matrix (`layer`) or of each output row (`row`). Entries
    that `keep` already prunes stay pruned, so masks only ever grow."""
    scores = {}
    for name, w in weights.items():
        s = w.detach().abs().float()
        if keep is not None and name in keep:
            s = s.masked_fill(~keep[name].to(s.device), -1.0)  # below any magnitude: pruned first
        scores[name] = s
    if granularity == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        pruned = _lowest(flat, round(sparsity * flat.numel())).split([s.numel() for s in scores.values()])
        return {n: ~p.view_as(scores[n]) for n, p in zip(scores, pruned)}
    if granularity == "layer":
        return {n: ~_lowest(s.flatten(), round(sparsity * s.numel())).view_as(s) for n, s in scores.items()}
    if granularity == "row":
        masks = {}
        for name, s in scores.items():
            flip = name in transposed  # Conv1D is (in, out): one unit's incoming weights are a column
            rows = (s.t() if flip else s).reshape(s.shape[1] if flip else s.shape[0], -1)
            order = rows.argsort(dim=1, stable=True)[:, : round(sparsity * rows.shape[1])]
            pruned = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, order, True)
            masks[name] = ~(pruned.t() if flip else pruned.view_as(s))
        return masks
    raise SqueezeError(f"compress.imp.granularity={granularity!r} is not one of {', '.join(GRANULARITIES)}")


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m).sum()) for m in masks.values()) / total if total else 0.0


# -- the callback ----------------------------------------------------------------------------------
class IterativeMagnitudePruning(Compressor):
    """Magnitude pruning to `target` sparsity on a schedule during fine-tuning (see the module docstring).

    schedule: `fixed` prunes `fraction` of the remaining weights every `frequency` steps after
    `start_step`; `cubic` follows Zhu & Gupta from `start_step` to `end_step`, updating every
    `frequency` steps; `adaptive` prunes one `fraction` stage at a validation whose val/loss is below
    `threshold`, then waits for the next validation under it. `rewind_step`: None (no rewind) or k.
    `recovery`: the share of the run's optimizer steps after the last event (no event after the deadline).
    """

    name = "imp"
    trains = True
    unsharded = "its masks cover whole weight matrices, and FSDP keeps each rank only a flat shard of them"

    def __init__(
        self,
        target: float = 0.7,
        schedule: str = "cubic",
        granularity: str = "global",
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        start_step: int = 0,
        end_step: int | None = None,
        frequency: int = 10,
        fraction: float = 0.2,
        step_of: str = "remaining",
        threshold: float | None = None,
        rewind_step: int | None = None,
        recovery: float = RECOVERY,
    ):
        self.target = target
        self.schedule = schedule
        self.granularity = granularity
        # None: the model family's default, filled in when the model is seen (prepare_model).
        self.include = None if include is None else [include] if isinstance(include, str) else list(include)
        self.exclude = None if exclude is None else [exclude] if isinstance(exclude, str) else list(exclude)
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.fraction, self.threshold, self.rewind_step = fraction, threshold, rewind_step
        self.step_of = step_of
        self.recovery = recovery
        self._check_settings()
        self.masks: dict[str, torch.Tensor] = {}
        self.level = 0.0  # the sparsity the masks implement
        self.stage = 0  # pruning events so far
        self.events: list[dict[str, float]] = []
        self.rewind_values: dict[str, torch.Tensor] | None = None
        self.deadline: int | None = None  # the last step an event may fall at (pruning_deadline), set at train start
        self._pending: float | None = None  # adaptive: the level a validation chose, pruned before the next step
        self._validations_after = 0  # validations since the last event: the candidates for the best checkpoint
        self._fit_end_step: int | None = None
        self._weights: dict[str, nn.Parameter] = {}
        self._transposed: set[str] = set()
        self._restored: dict[str, Any] | None = None
        self._figures: dict[str, Any] = {}
        self._warned: set[str] = set()
        # The trajectory: after each event, the last validation before the next one (or the end) and the training
        # throughput over that round (wall time of its training batches); before the first, the dense model's.
        self._dense_validation: dict[str, Any] | None = None
        self._round_seconds, self._round_tokens, self._batch_started = 0.0, 0, 0.0

    # -- settings ------------------------------------------------------------------------------------
    def _check_settings(self) -> None:
        def bad(field: str, value: Any, why: str) -> SqueezeError:
            return SqueezeError(f"compress.imp.{field}={value!r} {why}")

        if self.schedule not in SCHEDULES:
            raise bad("schedule", self.schedule, f"is not one of {', '.join(SCHEDULES)}")
        if self.granularity not in GRANULARITIES:
            raise bad("granularity", self.granularity, f"is not one of {', '.join(GRANULARITIES)}")
        if not isinstance(self.target, (int, float)) or not 0 < self.target < 1:
            raise bad("target", self.target, "must be a sparsity strictly between 0 and 1 (0.7 prunes 70% of "
                                             "the selected weights)")
        if not isinstance(self.frequency, int) or self.frequency < 1:
            raise bad("frequency", self.frequency, "must be a whole number of steps ≥ 1 between pruning events")
        if not isinstance(self.start_step, int) or self.start_step < 0:
            raise bad("start_step", self.start_step, "must be a step number ≥ 0")
        if self.schedule == "cubic" and self.end_step is not None and (
                not isinstance(self.end_step, int) or self.end_step < self.start_step):
            raise bad("end_step", self.end_step, f"must be a step number ≥ start_step ({self.start_step}), or null "
                                                 "(the target where the recovery steps start: 70% of the run)")
        check_recovery(self.recovery, "compress.imp.recovery")
        if self.step_of not in STEP_OF:
            raise bad("step_of", self.step_of, f"is not one of {', '.join(STEP_OF)}")
        if self.schedule in ("fixed", "adaptive") and not (isinstance(self.fraction, (int, float))
                                                           and 0 < self.fraction < 1):
            raise bad("fraction", self.fraction, "must be strictly between 0 and 1 (the share of the remaining "
                                                 "weights each pruning event removes)")
        if self.schedule == "adaptive" and not isinstance(self.threshold, (int, float)):
            raise bad("threshold", self.threshold, "must be a number for schedule=adaptive: a stage is pruned "
                                                   "only at a validation whose val/loss is below it")
        if self.rewind_step is not None:
            if not isinstance(self.rewind_step, int) or self.rewind_step < 0:
                raise bad("rewind_step", self.rewind_step, "must be null (no rewind) or a step number ≥ 0")
            # With end_step null the first step is known at train start; it is never after start + frequency.
            first = self.first_step() if self.end_step_known() else self.start_step + self.frequency
            if self.schedule != "adaptive" and self.rewind_step > first:
                raise bad("rewind_step", self.rewind_step, f"comes after the first pruning step "
                                                           f"({first}); rewind to an earlier step")
        if self.include is not None and not self.include:
            raise bad("include", self.include, "selects nothing; give at least one parameter-name pattern, or null "
                                               "for the model family's attention and MLP weights")
        for field, patterns in (("include", self.include or []), ("exclude", self.exclude or [])):
            for p in patterns:
                try:
                    re.compile(p)
                except (re.error, TypeError) as e:
                    raise bad(field, p, f"is not a valid regular expression ({e})") from e

    def sparsity_at(self, step: int) -> float:
        """The step schedule's sparsity after `step` optimizer steps (adaptive: not a step schedule)."""
        if self.schedule == "fixed":
            return fixed_sparsity(step, self.target, self.fraction, self.frequency, self.start_step, self.step_of)
        if self.schedule == "cubic":
            return cubic_sparsity(step, self.target, self.start_step, self.end_step, self.frequency)
        raise ValueError("the adaptive schedule depends on validation, not on the step")

    def end_step_known(self) -> bool:
        return self.schedule != "cubic" or self.end_step is not None

    def plan_for(self, total_steps: float, first_validation_step: float | None = None) -> None:
        """Fit the schedule into a run of `total_steps` optimizer steps before it trains: the deadline, cubic's
        end_step when null (the deadline itself: 70% of the run with recovery 0.3, where Zhu & Gupta leave the
        rest to recover), and a one-line refusal of a schedule that cannot finish by the deadline.
        `first_validation_step` (adaptive): when the run first validates, inf if never, None if unknown."""
        if not math.isfinite(total_steps):
            raise SqueezeError("compress.imp needs a run of known length to keep its last steps for recovery "
                               "(compress.imp.recovery); set trainer.max_steps")
        total = int(total_steps)
        self.deadline = deadline = pruning_deadline(total, self.recovery)
        window = (f"this run's last {total - deadline} of {total} optimizer steps are kept to recover "
                  f"(compress.imp.recovery={self.recovery}), so pruning ends by step {deadline}")
        if self.schedule == "adaptive":
            if self.start_step > deadline:
                raise SqueezeError(f"compress.imp schedule=adaptive warms up until step {self.start_step} "
                                   f"(compress.imp.start_step), but {window}; lower start_step or train longer")
            if first_validation_step is not None and first_validation_step > deadline:
                when = "never validates" if math.isinf(first_validation_step) else \
                    f"first validates after step {int(first_validation_step)}"
                raise SqueezeError(f"compress.imp schedule=adaptive prunes at validations, and this run {when}, but "
                                   f"{window}; validate more often (trainer.val_check_interval, limit_val_batches)")
            return
        if self.schedule == "cubic" and self.end_step is None:
            self.end_step = max(self.start_step, deadline)
        final = self.final_step()
        if final > deadline:
            longer = final + 1
            while pruning_deadline(longer, self.recovery) < final:
                longer += 1
            how = ""
            first = self.start_step + (0 if self.schedule == "cubic" else self.frequency)
            if first > deadline:
                fix = f"lower compress.imp.start_step to ≤ {max(0, deadline - first + self.start_step)}"
            elif self.schedule == "cubic":
                fix = f"set compress.imp.end_step ≤ {deadline} (or null: step {deadline})"
            else:
                stages = stages_to_target(self.target, self.fraction, self.step_of)
                how = f" ({stages} events every {self.frequency} steps from step {self.start_step})"
                most = (deadline - self.start_step) // stages
                fix = f"lower compress.imp.frequency to ≤ {most}" if most >= 1 else "prune more per event (fraction)"
            raise SqueezeError(f"compress.imp reaches its target at step {final}{how}, but {window}; {fix}, or "
                               f"train ≥ {longer} steps")
        if self.rewind_step is not None and self.rewind_step > self.first_step():
            raise SqueezeError(f"compress.imp.rewind_step={self.rewind_step} comes after the first pruning step "
                               f"({self.first_step()}); rewind to an earlier step")

    def first_step(self) -> int:
        if self.schedule == "cubic" and self.end_step <= self.start_step + self.frequency:
            return self.end_step
        return self.start_step + self.frequency

    def final_step(self) -> int:
        """The step at which a step schedule reaches the target."""
        if self.schedule == "fixed":
            return self.start_step + stages_to_target(self.target, self.fraction, self.step_of) * self.frequency
        return self.end_step

    def schedule_settings(self) -> dict[str, Any]:
        if self.schedule == "adaptive":
            return {"name": "adaptive", "fraction": self.fraction, "step_of": self.step_of, "threshold": self.threshold}
        settings: dict[str, Any] = {"name": self.schedule, "start_step": self.start_step, "frequency": self.frequency}
        if self.schedule == "cubic":
            return {**settings, "end_step": self.end_step}
        return {**settings, "fraction": self.fraction, "step_of": self.step_of}

    # -- the run's hooks -----------------------------------------------------------------------------
    def prepare_model(self, model, tokenizer):
        self._default_patterns(model)
        select_weights(model, self.include, self.exclude)  # bad patterns fail before training starts
        return model

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def on_train_start(self, trainer, pl_module) -> None:
        self._bind(pl_module.model)
        self.plan_for(trainer.estimated_stepping_batches,
                      _first_validation_of(trainer) if self.schedule == "adaptive" else None)
        self._keep_rewind_values(trainer.global_step)
        self._follow_schedule(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # adaptive: the stage a validation chose is pruned here, not at that validation's end, where
        # ModelCheckpoint would then keep the pruned weights under the denser model's score.
        if self._pending is not None:
            level, self._pending = self._pending, None
            self.prune(level, trainer)
        # A scheduled event of step k also falls here, after the validation at step k: that validation scores the
        # round that ends (the trajectory's point, a best checkpoint of it forgotten by the cut), not the cut.
        self._follow_schedule(trainer)
        self._batch_started = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Zero gradients stay zero through clipping and Adam's moments: the step cannot move pruned entries.
        for name, p in self._weights.items():
            if p.grad is not None:
                p.grad.masked_fill_(~self.masks[name], 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._round_seconds += time.perf_counter() - self._batch_started
        self._round_tokens = self._round_tokens + measure.batch_tokens(batch)  # read at validation: no sync per step
        self.apply_masks()
        self._keep_rewind_values(trainer.global_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._weights:
            return
        self._note_validation(trainer)
        self._validations_after += 1
        if self.schedule != "adaptive" or (self.deadline is not None and trainer.global_step > self.deadline):
            return  # adaptive: a validation in the recovery window prunes nothing
        if trainer.global_step < self.start_step:
            return  # adaptive: nor one in the warm-up (start_step)
        loss = trainer.callback_metrics.get("val/loss")
        if loss is None:
            self._warn_once("no-val-loss", "compress.imp schedule=adaptive found no val/loss after validation; "
                                           "nothing pruned")
            return
        if adaptive_should_prune(float(loss), self.threshold, self.level, self.target):
            self._pending = stage_sparsity(self.stage + 1, self.target, self.fraction, self.step_of)

    def _note_validation(self, trainer) -> None:
        """This validation as the trajectory's point for the current round (a later one in the round replaces it)."""
        point = {"step": trainer.global_step,
                 **{k: round(float(v), 6) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
                 "train_tokens_per_s": (round(int(self._round_tokens) / self._round_seconds, 3)
                                        if self._round_seconds > 0 else None)}
        if self.events:
            self.events[-1]["after"] = point
        else:
            self._dense_validation = {**point, "sparsity": round(self.level, 6)}

    def on_train_end(self, trainer, pl_module) -> None:
        self._fit_end_step = trainer.global_step
        if not self.events:
            log.warning("compress.imp pruned nothing during training%s", " (no validation loss under the threshold "
                        "before the deadline)" if self.schedule == "adaptive" else "")

    def state_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "stage": self.stage,
            "events": [dict(e) for e in self.events],
            "masks": {n: m.cpu() for n, m in self.masks.items()},
            "rewind_values": None if self.rewind_values is None else {n: t.cpu() for n, t in self.rewind_values.items()},
            "pending": self._pending,
            "validations_after_last_event": self._validations_after,
            "dense_validation": self._dense_validation,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict  # bound to the parameters at on_train_start, once they exist

    def finalize(self, model):
        """Fold the masks in (the weights are already zero there) and measure what was achieved."""
        self._default_patterns(model)
        weights, _ = select_weights(model, self.include, self.exclude)
        layer_sparsity, zeros, total = {}, 0, 0
        with torch.no_grad():
            for name, p in weights.items():
                if name in self.masks:
                    p.masked_fill_(~self.masks[name].to(p.device), 0)
                z = int((p == 0).sum())
                layer_sparsity[name] = round(z / p.numel(), 6)
                zeros, total = zeros + z, total + p.numel()
        self._figures = {"sparsity": round(zeros / total, 6), "layer_sparsity": layer_sparsity, "pruned_params": total}
        self.masks, self.rewind_values, self._weights = {}, None, {}  # training state is no longer needed
        return model

    def summary(self) -> dict[str, Any]:
        return {
            **self._figures,
            "target": self.target,
            "reached_target": self.level >= self.target - _EPS,
            "granularity": self.granularity,
            "schedule": self.schedule_settings(),
            "rewind_step": self.rewind_step,
            "include": self.include,
            "exclude": self.exclude,
            "events": self.events,
            # sparsity -> the validation after retraining and the training throughput of that round
            "trajectory": trajectory(self._dense_validation, self.events),
            "recovery": self.recovery,
            "deadline_step": self.deadline,
            # null: nothing pruned during training (events is empty), or no training
            "steps_after_last_event": (self._fit_end_step - self.events[-1]["step"]
                                       if self.events and self._fit_end_step is not None else None),
            # the best of these is the checkpoint tested and validation.best; 0: the last weights were tested
            "validations_after_last_event": self._validations_after if self.events else None,
        }

    # -- the work --------------------------------------------------------------------------------------
    def _default_patterns(self, model: nn.Module) -> None:
        """Fill in the family's patterns for those left null; the record then shows the ones used."""
        if self.include is None or self.exclude is None:
            adapter = adapter_for(model)
            if self.include is None:
                self.include = [adapter.prune_include]
            if self.exclude is None:
                self.exclude = [adapter.prune_exclude]

    def _bind(self, model: nn.Module) -> None:
        self._default_patterns(model)
        self._weights, self._transposed = select_weights(model, self.include, self.exclude)
        restored, self._restored = self._restored, None
        if restored is not None:
            if set(restored["masks"]) != set(self._weights):
                raise SqueezeError("the checkpoint's pruning masks are for other parameters than compress.imp "
                                   "selects now; resume with the include/exclude patterns it was trained with")
            self.level, self.stage, self.events = restored["level"], restored["stage"], list(restored["events"])
            self._pending = restored.get("pending")
            self._validations_after = restored.get("validations_after_last_event", 0)
            self._dense_validation = restored.get("dense_validation")
            values = restored["rewind_values"]
            self.rewind_values = None if values is None else {n: values[n] for n in self._weights}
            self.masks = {n: restored["masks"][n].to(p.device) for n, p in self._weights.items()}
        elif not self.masks:
            # Zeros already there (a one-shot pruner before it: [wanda, imp]) are the initial mask, so
            # fine-tuning starts from that mask and keeps it; a dense model has none.
            self.masks = {n: p.detach() != 0 for n, p in self._weights.items()}
        self.apply_masks()

    def apply_masks(self) -> None:
        with torch.no_grad():
            for name, p in self._weights.items():
                p.masked_fill_(~self.masks[name], 0)

    def _keep_rewind_values(self, step: int) -> None:
        if self.rewind_step is not None and self.rewind_values is None and step >= self.rewind_step:
            # Kept on the CPU: one copy of the pruned matrices, not in accelerator memory.
            self.rewind_values = {n: p.detach().to("cpu", copy=True) for n, p in self._weights.items()}

    def _follow_schedule(self, trainer) -> None:
        if self.schedule == "adaptive" or (self.deadline is not None and trainer.global_step > self.deadline):
            return  # past the deadline only if the run trains longer than it said: still no event there
        level = self.sparsity_at(trainer.global_step)
        if level > self.level + _EPS:
            self.prune(level, trainer)

    def prune(self, level: float, trainer=None) -> float:
        """Raise the masks to `level`, rewind the survivors if asked, zero the pruned entries' optimizer
        state, and log the sparsity reached; returns it."""
        self.masks = magnitude_masks(self._weights, level, self.granularity, self.masks, self._transposed)
        if self.rewind_step is not None and self.rewind_values is None:
            self._warn_once("no-rewind", f"compress.imp pruned before step {self.rewind_step}, so there are no "
                                         "values to rewind to yet; this pruning step does not rewind")
        with torch.no_grad():
            for name, p in self._weights.items():
                if self.rewind_values is not None:
                    p.copy_(self.rewind_values[name])
                p.masked_fill_(~self.masks[name], 0)
        for optimizer in (trainer.optimizers if trainer is not None else []):
            self.zero_optimizer_state(optimizer)
        if trainer is not None:
            self.restart_best_checkpoint(trainer)
        self._validations_after = 0
        self.level = level
        self.stage += 1
        reached = mask_sparsity(self.masks)
        step = trainer.global_step if trainer is not None else None
        self.events.append({"step": step, "sparsity": round(reached, 6)})
        self._round_seconds, self._round_tokens = 0.0, 0
        for logger in (trainer.loggers if trainer is not None else []):
            logger.log_metrics({"compress/sparsity": reached}, step=step)
        log.info("compress.imp: step %s, sparsity %.4f", step, reached)
        return reached

    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the pruned entries of every per-parameter state tensor (Adam's moments and the like)."""
        for name, p in self._weights.items():
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value.masked_fill_(~self.masks[name], 0)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def trajectory(dense: Mapping[str, Any] | None, events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per round: the sparsity reached and the last validation after it (its retraining), from the dense
    model's validation (sparsity 0) on; rounds with no validation after them are left out."""
    points = [dict(dense)] if dense else []
    for event in events:
        if event.get("after"):
            points.append({"sparsity": event["sparsity"], "pruned_at": event["step"], **event["after"]})
    return points
