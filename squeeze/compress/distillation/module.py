"""`Distill`: the task's LightningModule trained against a teacher (the distillation objective)."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.compress import teacher_cache as tc
from squeeze.compress.distillation.losses import loss_parts, pick_hidden
from squeeze.compress.teacher_cache import TargetSpec, Targets
from squeeze.errors import SqueezeError
from squeeze.tasks.base import FineTune

log = logging.getLogger("squeeze")


@torch.no_grad()
def teacher_targets(teacher: nn.Module, batch: dict, spec: TargetSpec) -> Targets:
    """Run the teacher on a batch: what the losses need from it, in float32."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = teacher(**inputs, output_hidden_states=spec.hidden, output_attentions=spec.attention)
    targets = Targets()
    if spec.attention:
        targets.attention = out.attentions[-1].float()
    if spec.hidden:
        hidden = pick_hidden(out.hidden_states, spec.teacher_layers, batch["attention_mask"], spec)
        targets.hidden = F.normalize(hidden.float(), dim=-1)
    if spec.top_k:
        log_p = F.log_softmax(out.logits.float() / spec.temperature, dim=-1)
        targets.top_logprobs, targets.top_indices = log_p.topk(min(spec.top_k, log_p.shape[-1]), dim=-1)
    else:
        targets.logits = out.logits.float()
    return targets


class Distill(FineTune):
    """The task's module trained against a teacher: same student (`.model`), metrics, evaluation steps
    and optimiser; the training step adds the distillation losses and logs each part.

    The task share of the loss is the task module's own training loss (`task_loss`): the dialog
    task's keeps its next-utterance (MC) term, and its MC head trains with the student. The teacher
    has no MC head to distil (a run saves a plain causal LM), so only its token distribution is.

    The teacher is kept out of the registered children (set with object.__setattr__): it is in no
    checkpoint, no optimiser and no `.train()`; it is moved to the module's device at fit start.
    """

    def __init__(self, task: FineTune, teacher: nn.Module | None, spec: TargetSpec, alpha: float, beta: float,
                 teacher_dtype: str = "float32", cache_root: Path | None = None, gamma: float = 0.0):
        object.__setattr__(self, "_task", task)
        super().__init__(task.model, optimizer=task.optimizer_factory, scheduler=task.scheduler_factory)
        self.metrics = task.metrics  # the very metrics the task module built
        # The task module's trainable parts outside the model (the dialog task's MC head): registered
        # here, so they are in this module's optimiser, device moves and checkpoint.
        self.task_heads = nn.ModuleDict({name: child for name, child in task.named_children()
                                         if name not in ("model", "metrics")})
        object.__setattr__(self, "teacher", teacher)
        self.spec, self.alpha, self.beta, self.gamma = spec, alpha, beta, gamma
        self.teacher_dtype = teacher_dtype
        self.cache_root = cache_root
        self.cache: tc.TeacherCache | None = None
        self.cache_info: dict[str, Any] | None = None

    # The task's definitions, so every head's metrics work unchanged.
    def make_metrics(self):
        return self._task.make_metrics()

    def update_metrics(self, metrics, batch, outputs):
        self._task.update_metrics(metrics, batch, outputs)

    def compute_metrics(self, metrics):
        return self._task.compute_metrics(metrics)

    def eval_outputs(self, batch):
        return self._task.eval_outputs(batch)  # e.g. the dialog task's packed candidate scoring

    def setup(self, stage: str) -> None:
        # The task module's own set-up too (the dialog task takes its tokenizer from the data module).
        self._task.trainer = self.trainer
        self._task.setup(stage)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.teacher is not None:
            # Half precision only where it is fast and supported; CPU matmuls in bf16/fp16 are slow.
            dtype = torch.float32 if self.device.type == "cpu" else getattr(torch, self.teacher_dtype)
            self.teacher.to(device=self.device, dtype=dtype).eval()
        if self.cache_root is not None and self.cache is None:
            # The passes over the shuffled training data draw from torch's RNG; keep it untouched so a
            # run with the cache trains exactly like one without (same batches, same dropout).
            cuda = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                self._open_cache()

    def teacher_targets(self, batch: dict) -> Targets:
        if self.cache is not None:
            return self.cache.targets(batch)
        if self.teacher is None:
            raise SqueezeError("distillation has neither a teacher nor a teacher cache")
        return teacher_targets(self.teacher, batch, self.spec)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The training loss on `batch` and its parts: loss_task (the task module's own training loss),
        loss_kd, loss_hidden (pkd), loss_attention (attention > 0), and the task loss's parts (dialog:
        lm_loss, mc_loss)."""
        student_out = self.model(**batch, output_hidden_states=self.spec.hidden or self._task.wants_hidden_states,
                                 output_attentions=self.spec.attention)
        task = self._task.task_loss(batch, student_out)
        # alpha=0 with no hidden or attention term: the student alone on the task (the study's reference row),
        # so the teacher is not run at all.
        wanted = self.alpha > 0 or self.spec.hidden or self.spec.attention
        targets = self.teacher_targets(batch) if wanted else Targets()
        parts = loss_parts(student_out, targets, batch, self.spec, self.alpha, self.beta,
                           task_loss=task.pop("loss"), gamma=self.gamma)
        return {**parts, **task}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        parts = self.losses(batch)
        self.check_finite(parts["loss"])
        size = batch["input_ids"].shape[0]
        for name, value in parts.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=size)
        return parts["loss"]

    # -- teacher cache ------------------------------------------------------------------------------
    def _open_cache(self) -> None:
        data = self.trainer.datamodule
        if data is None:
            raise SqueezeError("teacher_cache needs the run's data module; set teacher_cache=false")
        keys = [k for batch in data.train_dataloader() for k in tc.example_keys(batch)]
        dtype = "float32" if self.device.type == "cpu" else self.teacher_dtype
        name = tc.cache_key(tc.weights_fingerprint(self.teacher), keys, self.spec, dtype)
        directory = Path(self.cache_root) / name
        reused = tc.is_complete(directory)
        if not reused and self.trainer.is_global_zero:
            log.info("distillation: computing the teacher's outputs on %d training examples into %s", len(keys),
                     directory)
            tc.build(directory, lambda: self._on_device(data.train_dataloader()),
                                lambda batch: teacher_targets(self.teacher, batch, self.spec), self.spec,
                                meta={"teacher_dtype": dtype})
        self.trainer.strategy.barrier("teacher_cache")
        self.cache = tc.TeacherCache(directory, self.spec)
        self.cache_info = {"dir": str(directory), "reused": reused, "bytes": self.cache.nbytes}
        # The cache now answers for the teacher: free its memory for the student.
        object.__setattr__(self, "teacher", None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _on_device(self, loader):
        for batch in loader:
            yield {k: v.to(self.device) for k, v in batch.items()}
