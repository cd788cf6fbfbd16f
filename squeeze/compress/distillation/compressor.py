"""`compress=kd` / `compress=pkd`: the Distillation compressor. `prepare_model` loads the frozen teacher
(teacher.py) and returns the student (student.py); `wrap_module` returns the objective (module.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from squeeze import assets
from squeeze.arch import adapter_for
from squeeze.compress import Compressor
from squeeze.compress.distillation.module import Distill
from squeeze.compress.distillation.student import (
    cut_layers,
    param_stats,
    pkd_layer_pairs,
    student_layer_ids,
    vocab_of,
)
from squeeze.compress.distillation.teacher import load_teacher
from squeeze.compress.teacher_cache import TargetSpec
from squeeze.errors import SqueezeError
from squeeze.record import dir_bytes
from squeeze.tasks.base import FineTune

log = logging.getLogger("squeeze")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
# Heads whose teacher targets a cache holds exactly (one output per example, whatever the batch): teacher_cache=auto.
EXACT_CACHE = {"sequence_classification": True, "token_classification": True}


class Distillation(Compressor):
    """Distil a frozen teacher into a smaller student (see the module docstring).

    teacher        a finished squeeze run directory, a saved model directory, an offline asset name
                   (minilm, smollm2) or a hub id; None: the run's configured model; auto: this model × task's
                   fine-tuned baseline from the baseline store (squeeze.run.baselines; train.py resolves it)
    teacher_best_of  with teacher=auto: the stored baseline with the best validation score over these
                   settings, e.g. {optimizer.lr: [2e-5, 5e-5]} (resolved by train.py too)
    alpha          weight of the KD term (1-alpha on the task loss)
    temperature    softmax temperature T of the KD term
    beta           weight of the patient (hidden-state) loss; 0 = plain KD
    attention      weight of MiniLM's self-attention transfer (KL between the teacher's and the student's
                   last-layer attention distributions, head by head); 0 = off. It needs the live teacher
                   (the cache holds no attention maps) and teacher and student of one head count
    strategy       pkd: skip | last | [teacher layers]
    student        {layers: N (None = half the teacher's), init: first|alternate|skip|[layers],
                    from: teacher (cut from it) | model (the run's configured model, same tokenizer)}
    teacher_dtype  float32 | bfloat16 | float16, used on GPU only (CPU keeps float32)
    teacher_cache  compute the teacher's outputs once into cache_dir (default $SQUEEZE_CACHE/teacher_outputs);
                   auto: on where the cached targets are the live ones (classification, NER: one frozen
                   teacher output per example), off for language modelling (top-k targets) and dialog
    top_k          causal LM: the teacher's distribution kept to its top-k tokens plus the rest (None: all)
    head           the task's head (set from the config)
    family         ignored: the pooled position now comes from the model's family adapter (accepted so
                   configs written before still compose)
    """

    trains = True
    replaces_objective = True

    def __init__(
        self,
        teacher: str | None = None,
        teacher_best_of: dict[str, Any] | None = None,
        alpha: float = 0.5,
        temperature: float = 2.0,
        beta: float = 0.0,
        attention: float = 0.0,
        strategy: str | Sequence[int] = "skip",
        student: dict[str, Any] | None = None,
        teacher_dtype: str = "float32",
        teacher_cache: bool | str = "auto",
        cache_dir: str | None = None,
        top_k: int | None = 64,
        head: str = "sequence_classification",
        family: str | None = None,
    ):
        student = dict(student or {})
        unknown = set(student) - {"layers", "init", "from"}
        if unknown:
            raise SqueezeError(f"student.{sorted(unknown)[0]} is not a student setting; use layers, init, from")
        self.teacher_source = teacher
        self.alpha, self.temperature, self.beta = float(alpha), float(temperature), float(beta)
        self.attention = float(attention)
        self.strategy = strategy
        self.student_layers = student.get("layers")
        self.student_init = student.get("init") or "first"
        self.student_from = student.get("from") or "teacher"
        self.teacher_dtype = teacher_dtype
        if teacher_cache not in (True, False, "auto"):
            raise SqueezeError(f"teacher_cache={teacher_cache!r} is not true, false or auto")
        if teacher_cache is True and self.attention > 0:
            raise SqueezeError(f"attention={self.attention} transfers the teacher's attention maps of every batch, "
                               "which the teacher cache does not hold; set teacher_cache=auto (off with attention) "
                               "or attention=0")
        exact = EXACT_CACHE.get(head, False) and self.attention == 0
        self.teacher_cache = exact if teacher_cache == "auto" else bool(teacher_cache)
        self.cache_dir = cache_dir
        self.top_k = int(top_k) if top_k and head == "causal_lm" else None
        self.head = head
        self._check_settings()
        self._teacher: nn.Module | None = None
        self._module: Distill | None = None
        self._attn_implementation: str | None = None  # the student's own kernel, while attention transfer swaps it
        self._summary: dict[str, Any] = {}

    def _check_settings(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise SqueezeError(f"alpha={self.alpha} must be in [0, 1] (the KD term's share of the loss)")
        if self.temperature <= 0:
            raise SqueezeError(f"temperature={self.temperature} must be above 0")
        if self.beta < 0:
            raise SqueezeError(f"beta={self.beta} must be 0 or more")
        if self.attention < 0:
            raise SqueezeError(f"attention={self.attention} must be 0 or more")
        if self.student_from not in ("teacher", "model"):
            raise SqueezeError(f"student.from={self.student_from!r} is not 'teacher' or 'model'")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise SqueezeError(f"teacher_dtype={self.teacher_dtype!r} is not one of {list(TEACHER_DTYPES)}")
        if self.teacher_cache and self.head == "causal_lm" and self.top_k is None:
            raise SqueezeError("teacher_cache on a language-modelling task needs top_k (a full vocabulary per "
                               "token would not fit on disk); set top_k=64")
        if self.teacher_source is None and self.student_from == "model":
            raise SqueezeError("student.from=model makes the configured model the student, so it cannot also be "
                               "the teacher; set teacher=<run dir, model dir or hub id>")

    # -- prepare: teacher in, student out ------------------------------------------------------------
    def prepare_model(self, model, tokenizer):
        if self.teacher_source == "auto":  # train.py replaces it with the stored baseline's directory
            raise SqueezeError(f"compress.{self.name}.teacher=auto is resolved by train.py (the fine-tuned baseline "
                               "of its model × task); elsewhere give teacher=<a run or model directory>")
        teacher, where, teacher_dir = load_teacher(self.teacher_source, self.head, model, tokenizer)
        self._check_labels(teacher, model, where)
        L = teacher.config.num_hidden_layers
        base = model if self.student_from == "model" else teacher
        kept = None
        if self.student_layers is None and self.student_from == "model":
            student = model  # the configured model as it is
        else:
            base_layers = base.config.num_hidden_layers
            wanted = int(self.student_layers) if self.student_layers is not None else max(1, L // 2)
            if wanted > L:
                raise SqueezeError(f"student.layers={wanted} is more than the teacher's {L} layers; choose 1..{L}")
            keep = student_layer_ids(base_layers, wanted, self.student_init)
            student = cut_layers(base, keep)
            kept = [i + 1 for i in keep]
        M = student.config.num_hidden_layers
        if M > L:
            raise SqueezeError(f"the student has {M} layers, more than the teacher's {L}; a student must be smaller")
        if self.head == "causal_lm" and vocab_of(student) != vocab_of(teacher):
            raise SqueezeError(f"teacher {where} predicts {vocab_of(teacher)} tokens but the student "
                               f"{vocab_of(student)}; distil between models of one vocabulary")
        pairs = pkd_layer_pairs(L, M, self.strategy) if self.beta > 0 else []
        if self.beta > 0:
            self._check_pairs(pairs, teacher, student, where)
        self.spec = TargetSpec(
            level="sequence" if self.head == "sequence_classification" else "token",
            pool=adapter_for(student).pool,  # what the student's sequence head reads: [CLS] or the last real token
            teacher_layers=tuple(t for t, _ in pairs), student_layers=tuple(s for _, s in pairs),
            top_k=self.top_k, temperature=self.temperature, attention=self.attention > 0,
        )
        if self.attention > 0:
            self._attention_transfer(teacher, student, where)
        if teacher is model and self.head != "causal_lm":
            log.warning("distillation: the teacher is the configured model, whose %s head is untrained; for "
                        "useful soft targets give teacher=<a fine-tuned run directory>", self.head)
        teacher.eval().requires_grad_(False)
        self._teacher = teacher
        self._summary = dict(
            teacher={"source": where, "layers": L, **param_stats(teacher),
                     "checkpoint_bytes": dir_bytes(teacher_dir) if teacher_dir else None},
            student={"from": self.student_from, "layers": M, "init": self.student_init,
                     "kept_layers": kept, **param_stats(student)},
            layer_pairs=[list(p) for p in pairs],
        )
        return student

    def _check_labels(self, teacher, model, where: str) -> None:
        if self.head == "causal_lm" or teacher is model:
            return
        have = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
        want = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if have != want:
            raise SqueezeError(f"label set mismatch: teacher {where} predicts {have} but the task has {want}; "
                               "give a teacher trained on this task")

    def _check_pairs(self, pairs, teacher, student, where: str) -> None:
        if not pairs:
            raise SqueezeError(f"pkd: a {student.config.num_hidden_layers}-layer student has no layer below its top "
                               "to match; give more student layers, an explicit strategy=[teacher layers], or use kd")
        t, s = teacher.config.hidden_size, student.config.hidden_size
        if t != s:
            raise SqueezeError(f"pkd matches hidden states, but teacher {where} is {t} wide and the student {s}; "
                               "use a student of the teacher's width, or kd")

    def _attention_transfer(self, teacher, student, where: str) -> None:
        """Make both models return their attention probabilities, the student's undropped."""
        t, s = (adapter_for(m).shape(adapter_for(m).layers(m)[-1][1]).heads for m in (teacher, student))
        if t != s:
            raise SqueezeError(f"attention transfer compares heads one to one, but teacher {where} has {t} heads "
                               f"in its last layer and the student {s}; use attention=0")
        # Only the eager kernels return attention probabilities (sdpa fuses them away); the student
        # goes back to its own kernel at finalize, so what is measured and saved is the usual model.
        self._attn_implementation = student.config._attn_implementation
        for m in (teacher, student):
            m.set_attn_implementation("eager")
        # Eager attention returns its probabilities after dropout, which zeroes some and rescales the rest:
        # the last layer's attention dropout is turned off so the student's rows stay distributions.
        adapter = adapter_for(student)
        for module, attr in adapter.attention_dropouts(adapter.layers(student)[-1][1]):
            value = getattr(module, attr)
            if isinstance(value, nn.Dropout):
                value.p = 0.0
            else:  # the probability the attention's forward hands to its kernel
                setattr(module, attr, 0.0)

    def finalize(self, model):
        if self._attn_implementation is not None:
            model.set_attn_implementation(self._attn_implementation)
        return model

    # -- the objective ------------------------------------------------------------------------------
    def wrap_module(self, module):
        if not isinstance(module, FineTune):
            raise SqueezeError(f"distillation wraps a squeeze FineTune module, not a {type(module).__name__}; "
                               "put kd/pkd first in the compress chain")
        cache = None
        if self.teacher_cache:
            cache = Path(self.cache_dir).expanduser() if self.cache_dir else assets.cache_dir() / "teacher_outputs"
        self._module = Distill(module, self._teacher, self.spec, self.alpha, self.beta,
                               teacher_dtype=self.teacher_dtype, cache_root=cache, gamma=self.attention)
        self._teacher = None  # the module owns it now (and drops it once a cache is ready)
        return self._module

    def summary(self) -> dict[str, Any]:
        out = {"alpha": self.alpha, "temperature": self.temperature, "beta": self.beta, "attention": self.attention,
               "strategy": list(self.strategy) if not isinstance(self.strategy, str) else self.strategy,
               "top_k": self.top_k, "teacher_dtype": self.teacher_dtype, **self._summary}
        out["teacher_cache"] = self._module.cache_info if self._module is not None else None
        return out
