"""Knowledge distillation: `compress=kd` (soft targets) and `compress=pkd` (plus the patient loss).

    kd    loss = (1-α)·task + α·T²·KL(teacher_T ‖ student_T)          (Hinton et al., 2015)
    pkd   loss = kd + β·Σ_pairs mean ‖h_s/‖h_s‖ − h_t/‖h_t‖‖²          (Sun et al., 2019)

`prepare_model` loads the frozen teacher (a finished run, a saved model directory, an offline asset
or hub id, or the run's own model) and returns the student: the teacher cut to its first, alternate
or every k-th layers, or the run's configured model. `wrap_module` returns `Distill`, the task's own
module (same metrics, evaluation and optimiser) whose training step adds the teacher's losses. The
teacher is held outside the module's registered children, so it is in no checkpoint and no optimiser.

Layer numbers a user writes are 1-based hidden-state numbers: 1 is the first layer's output (0 would
be the embeddings), as in the PKD paper's teacher layers {2,4,6,8,10} for a 12→6 student.
"""

from __future__ import annotations

import copy
import gc
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer

from squeeze import assets, models
from squeeze.compress import Compressor, checkpoint
from squeeze.compress import teacher_cache as tc
from squeeze.compress.teacher_cache import TargetSpec, Targets
from squeeze.errors import SqueezeError
from squeeze.modules import FineTune
from squeeze.record import RESULT_FILE, dir_bytes, read_record

log = logging.getLogger("squeeze")
INITS = ("first", "alternate", "skip")
STRATEGIES = ("skip", "last")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")


# -- which layers (pure) -----------------------------------------------------------------------------
def student_layer_ids(teacher_layers: int, student_layers: int, init: str | Sequence[int]) -> list[int]:
    """The teacher layers (0-based) the student keeps, bottom to top.

    first      the first M layers (the thesis' student)
    alternate  one in every L/M, from the bottom: 0,2,4,6,8,10 for 12→6 (DistilBERT's choice)
    skip       one in every L/M, ending at the top: 1,3,5,7,9,11 for 12→6 (the layers PKD-skip matches)
    a list     those teacher layers (1-based)
    """
    L, M = teacher_layers, student_layers
    if M < 1:
        raise SqueezeError(f"student.layers={M}: a student needs at least one layer")
    if M > L:
        raise SqueezeError(f"student.layers={M} is more than the {L} layers it is cut from; choose 1..{L}")
    if isinstance(init, str):
        if init == "first":
            return list(range(M))
        if init == "alternate":
            return [i * L // M for i in range(M)]
        if init == "skip":
            return [(i + 1) * L // M - 1 for i in range(M)]
        raise SqueezeError(f"student.init={init!r} is not one of {list(INITS)} or a list of teacher layers")
    chosen = [int(x) for x in init]
    _check_layer_numbers(chosen, L, "student.init")
    if len(chosen) != M:
        raise SqueezeError(f"student.init lists {len(chosen)} teacher layers but student.layers={M}; list {M}")
    return [x - 1 for x in chosen]


def pkd_layer_pairs(teacher_layers: int, student_layers: int, strategy: str | Sequence[int]) -> list[tuple[int, int]]:
    """(teacher, student) hidden-state numbers the patient loss matches.

    The student's last layer is left to the logits, as in PKD: M−1 pairs.
    skip   every k-th teacher layer, k = L // M: {2,4,6,8,10} for 12→6
    last   the teacher's last M−1 layers below its top: {7,8,9,10,11} for 12→6
    a list those teacher layers, matched to the student's layers 1, 2, ... in order
    """
    L, M = teacher_layers, student_layers
    if isinstance(strategy, str):
        if strategy == "skip":
            k = L // M
            return [(k * j, j) for j in range(1, M)]
        if strategy == "last":
            return [(L - M + j, j) for j in range(1, M)]
        raise SqueezeError(f"strategy={strategy!r} is not one of {list(STRATEGIES)} or a list of teacher layers")
    chosen = [int(x) for x in strategy]
    _check_layer_numbers(chosen, L, "strategy")
    if len(chosen) > M:
        raise SqueezeError(f"strategy lists {len(chosen)} teacher layers but the student has only {M}; list at most {M}")
    return [(t, s) for s, t in enumerate(chosen, start=1)]


def _check_layer_numbers(numbers: Sequence[int], teacher_layers: int, where: str) -> None:
    bad = [x for x in numbers if not 1 <= x <= teacher_layers]
    if bad:
        raise SqueezeError(f"{where}: teacher layer {bad[0]} is out of range; the teacher has layers 1..{teacher_layers}")


# -- losses (pure) ----------------------------------------------------------------------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    weight = mask.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1)


def kd_loss(student_logits, teacher_logits, temperature: float, mask=None) -> torch.Tensor:
    """T²·KL(p_teacher ‖ p_student) at temperature T, averaged over examples (or attended tokens).
    The T² keeps the gradient's scale independent of T (Hinton et al.)."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return t * t * masked_mean(kl, mask)


def topk_kd_loss(student_logits, top_logprobs, top_indices, temperature: float, mask=None) -> torch.Tensor:
    """The same KL over the teacher's top-k tokens plus one bucket holding every other token.

    `top_logprobs` are the teacher's log-probabilities at temperature T over its whole vocabulary, so
    the bucket's mass is known exactly: the loss is a true KL (zero when student = teacher) between
    the two distributions coarsened to k+1 outcomes, and it stays bounded in size (k per token)."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, top_indices.long())
    log_p = top_logprobs.float()
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    rest_p = (-torch.expm1(torch.logsumexp(log_p, -1))).clamp_min(0)
    rest_q = (-torch.expm1(torch.logsumexp(log_q, -1))).clamp_min(1e-12)
    kl = kl + torch.xlogy(rest_p, rest_p) - rest_p * rest_q.log()
    return t * t * masked_mean(kl, mask)


def hidden_loss(student_hidden, teacher_hidden, mask=None) -> torch.Tensor:
    """PKD's patient loss on [B, (T,) P, H] hidden states: for each of the P layer pairs, the squared
    distance between the L2-normalised vectors, averaged over examples (or attended tokens); summed
    over the pairs."""
    s = F.normalize(student_hidden.float(), dim=-1)
    t = F.normalize(teacher_hidden.float(), dim=-1)
    return masked_mean((s - t).pow(2).sum(-1).sum(-1), mask)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the position of the last attended token (left or right padding alike)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def pick_hidden(hidden_states: Sequence[torch.Tensor], layers: Sequence[int], attention_mask, spec: TargetSpec):
    """The chosen layers' hidden states, [B, T, P, H] for token tasks, [B, P, H] at the pooled position
    for sequence tasks: [CLS] for encoders, the last real token for decoders (what their head reads)."""
    stacked = torch.stack([hidden_states[i] for i in layers], dim=-2)
    if spec.level == "token":
        return stacked
    if spec.pool == "first":
        return stacked[:, 0]
    return stacked[torch.arange(stacked.shape[0], device=stacked.device), last_token_index(attention_mask)]


def loss_parts(student_out, targets: Targets, batch: dict, spec: TargetSpec, alpha: float, beta: float) -> dict:
    """The training loss and its parts: task, kd and (pkd) hidden."""
    mask = batch["attention_mask"] if spec.level == "token" else None
    if targets.top_indices is not None:
        kd = topk_kd_loss(student_out.logits, targets.top_logprobs, targets.top_indices, spec.temperature, mask)
    else:
        kd = kd_loss(student_out.logits, targets.logits, spec.temperature, mask)
    parts = {"loss_task": student_out.loss, "loss_kd": kd}
    total = (1 - alpha) * student_out.loss + alpha * kd
    if spec.hidden:
        student_hidden = pick_hidden(student_out.hidden_states, spec.student_layers, batch["attention_mask"], spec)
        parts["loss_hidden"] = hidden_loss(student_hidden, targets.hidden, mask)
        total = total + beta * parts["loss_hidden"]
    return {"loss": total, **parts}


@torch.no_grad()
def teacher_targets(teacher: nn.Module, batch: dict, spec: TargetSpec) -> Targets:
    """Run the teacher on a batch: what the losses need from it, in float32."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = teacher(**inputs, output_hidden_states=spec.hidden)
    targets = Targets()
    if spec.hidden:
        hidden = pick_hidden(out.hidden_states, spec.teacher_layers, batch["attention_mask"], spec)
        targets.hidden = F.normalize(hidden.float(), dim=-1)
    if spec.top_k:
        log_p = F.log_softmax(out.logits.float() / spec.temperature, dim=-1)
        targets.top_logprobs, targets.top_indices = log_p.topk(min(spec.top_k, log_p.shape[-1]), dim=-1)
    else:
        targets.logits = out.logits.float()
    return targets


# -- the student (layer surgery) ---------------------------------------------------------------------
def layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The transformer's stack of layers (BERT encoder.layer, GPT-2 h, Llama layers) and its parent."""
    n = model.config.num_hidden_layers
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise SqueezeError(f"cannot tell the layer stack of a {type(model).__name__} (found {len(found)} lists of "
                           f"{n} modules); use student.from=model with a smaller model of the same tokenizer")
    path, layers = found[0]
    parent_path, _, attr = path.rpartition(".")
    return model.get_submodule(parent_path) if parent_path else model, attr, layers


def cut_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A copy of `model` with only the layers `keep` (0-based, in order); embeddings and heads copied,
    the config's layer count updated so the saved directory reloads with plain from_pretrained."""
    config = model.config
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and list(keep) != list(range(len(keep))):
        raise SqueezeError("this GPT-2 scales attention by layer number, so moved layers would change; "
                           "use student.init=first")
    student = copy.deepcopy(model)
    parent, attr, layers = layer_list(student)
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        for module in layer.modules():  # caches index their layers by this number
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    setattr(parent, attr, kept)
    student.config.num_hidden_layers = len(keep)
    if isinstance(getattr(student.config, "layer_types", None), list):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def param_stats(model: nn.Module) -> dict[str, int]:
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    return {"params": sum(p.numel() for p in seen.values()),
            "param_bytes": sum(p.numel() * p.element_size() for p in seen.values())}


def _vocab_of(model: nn.Module) -> int:
    return model.get_input_embeddings().num_embeddings


# -- the compressor ------------------------------------------------------------------------------------
class Distillation(Compressor):
    """Distil a frozen teacher into a smaller student (see the module docstring).

    teacher        a finished squeeze run directory, a saved model directory, an offline asset name
                   (minilm, smollm2) or a hub id; None: the run's configured model
    alpha          weight of the KD term (1-alpha on the task loss)
    temperature    softmax temperature T of the KD term
    beta           weight of the patient (hidden-state) loss; 0 = plain KD
    strategy       pkd: skip | last | [teacher layers]
    student        {layers: N (None = half the teacher's), init: first|alternate|skip|[layers],
                    from: teacher (cut from it) | model (the run's configured model, same tokenizer)}
    teacher_dtype  float32 | bfloat16 | float16, used on GPU only (CPU keeps float32)
    teacher_cache  compute the teacher's outputs once into cache_dir (default $SQUEEZE_CACHE/teacher_outputs)
    top_k          causal LM: the teacher's distribution kept to its top-k tokens plus the rest (None: all)
    head, family   the task's head and the model family (set from the config)
    """

    trains = True
    replaces_objective = True

    def __init__(
        self,
        teacher: str | None = None,
        alpha: float = 0.5,
        temperature: float = 2.0,
        beta: float = 0.0,
        strategy: str | Sequence[int] = "skip",
        student: dict[str, Any] | None = None,
        teacher_dtype: str = "float32",
        teacher_cache: bool = False,
        cache_dir: str | None = None,
        top_k: int | None = 64,
        head: str = "sequence_classification",
        family: str = "encoder",
    ):
        student = dict(student or {})
        unknown = set(student) - {"layers", "init", "from"}
        if unknown:
            raise SqueezeError(f"student.{sorted(unknown)[0]} is not a student setting; use layers, init, from")
        self.teacher_source = teacher
        self.alpha, self.temperature, self.beta = float(alpha), float(temperature), float(beta)
        self.strategy = strategy
        self.student_layers = student.get("layers")
        self.student_init = student.get("init") or "first"
        self.student_from = student.get("from") or "teacher"
        self.teacher_dtype = teacher_dtype
        self.teacher_cache = bool(teacher_cache)
        self.cache_dir = cache_dir
        self.top_k = int(top_k) if top_k and head == "causal_lm" else None
        self.head, self.family = head, family
        self._check_settings()
        self._teacher: nn.Module | None = None
        self._module: Distill | None = None
        self._summary: dict[str, Any] = {}

    def _check_settings(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise SqueezeError(f"alpha={self.alpha} must be in [0, 1] (the KD term's share of the loss)")
        if self.temperature <= 0:
            raise SqueezeError(f"temperature={self.temperature} must be above 0")
        if self.beta < 0:
            raise SqueezeError(f"beta={self.beta} must be 0 or more")
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
        teacher, where, teacher_dir = self._load_teacher(model, tokenizer)
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
        if self.head == "causal_lm" and _vocab_of(student) != _vocab_of(teacher):
            raise SqueezeError(f"teacher {where} predicts {_vocab_of(teacher)} tokens but the student "
                               f"{_vocab_of(student)}; distil between models of one vocabulary")
        pairs = pkd_layer_pairs(L, M, self.strategy) if self.beta > 0 else []
        if self.beta > 0:
            self._check_pairs(pairs, teacher, student, where)
        self.spec = TargetSpec(
            level="sequence" if self.head == "sequence_classification" else "token",
            pool="first" if self.family == "encoder" else "last",
            teacher_layers=tuple(t for t, _ in pairs), student_layers=tuple(s for _, s in pairs),
            top_k=self.top_k, temperature=self.temperature,
        )
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

    def _load_teacher(self, model, tokenizer):
        """(teacher, what to call it, its directory or None); the tokenizer must be the run's."""
        if self.teacher_source is None:
            return model, "the configured model", None
        source = str(self.teacher_source)
        path = Path(source).expanduser()
        if path.is_dir():
            model_dir = self._model_dir(path)
        elif source.startswith((".", "/", "~")):
            raise SqueezeError(f"teacher={source} does not exist; give a finished run directory, a saved model "
                               "directory, an asset name or a hub id")
        elif source in assets.ASSETS:
            model_dir = assets.locate(source)
        else:
            model_dir = None
        location = str(model_dir) if model_dir is not None else source
        try:
            teacher = checkpoint.load(model_dir, self.head) if model_dir is not None else \
                models.HEADS[self.head].from_pretrained(source)
            teacher_tokenizer = AutoTokenizer.from_pretrained(location)
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SqueezeError(f"teacher={source}: no teacher checkpoint could be loaded ({first}); "
                               "give a finished run directory, a saved model directory or an offline asset") from e
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise SqueezeError(
                f"teacher {source} uses another tokenizer than the run's model ({len(teacher_tokenizer)} vs "
                f"{len(tokenizer)} tokens, or other ids); pass the model= the teacher was trained from, or "
                "student.from=model with a model of the teacher's tokenizer"
            )
        return teacher, source, model_dir

    def _model_dir(self, path: Path) -> Path:
        if (path / RESULT_FILE).exists():
            record = read_record(path)
            trained_head = ((record.get("config") or {}).get("task") or {}).get("head")
            if trained_head and trained_head != self.head:
                raise SqueezeError(f"teacher run {path} was trained with a {trained_head} head but this task needs "
                                   f"{self.head}; give a teacher trained on this task")
            model_dir = path / "model"
            if not (model_dir / "config.json").exists():
                raise SqueezeError(f"teacher run {path} has no saved model ({model_dir} is missing: the run "
                                   f"{record.get('status', 'did not finish')}); train the teacher to the end first")
            return model_dir
        if (path / "config.json").exists():
            return path
        raise SqueezeError(f"teacher={path} is neither a squeeze run directory (result.json + model/) nor a saved "
                           "model directory (config.json): the teacher checkpoint is missing")

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

    # -- the objective ------------------------------------------------------------------------------
    def wrap_module(self, module):
        if not isinstance(module, FineTune):
            raise SqueezeError(f"distillation wraps a squeeze FineTune module, not a {type(module).__name__}; "
                               "put kd/pkd first in the compress chain")
        cache = None
        if self.teacher_cache:
            cache = Path(self.cache_dir).expanduser() if self.cache_dir else assets.cache_dir() / "teacher_outputs"
        self._module = Distill(module, self._teacher, self.spec, self.alpha, self.beta,
                               teacher_dtype=self.teacher_dtype, cache_root=cache)
        self._teacher = None  # the module owns it now (and drops it once a cache is ready)
        return self._module

    def summary(self) -> dict[str, Any]:
        out = {"alpha": self.alpha, "temperature": self.temperature, "beta": self.beta,
               "strategy": list(self.strategy) if not isinstance(self.strategy, str) else self.strategy,
               "top_k": self.top_k, "teacher_dtype": self.teacher_dtype, **self._summary}
        out["teacher_cache"] = self._module.cache_info if self._module is not None else None
        return out


# -- the LightningModule -------------------------------------------------------------------------------
class Distill(FineTune):
    """The task's module trained against a teacher: same student (`.model`), metrics, evaluation steps
    and optimiser; the training step adds the distillation losses and logs each part.

    The teacher is kept out of the registered children (set with object.__setattr__): it is in no
    checkpoint, no optimiser and no `.train()`; it is moved to the module's device at fit start.
    """

    def __init__(self, task: FineTune, teacher: nn.Module | None, spec: TargetSpec, alpha: float, beta: float,
                 teacher_dtype: str = "float32", cache_root: Path | None = None):
        object.__setattr__(self, "_task", task)
        super().__init__(task.model, optimizer=task.optimizer_factory, scheduler=task.scheduler_factory)
        self.metrics = task.metrics  # the very metrics the task module built
        object.__setattr__(self, "teacher", teacher)
        self.spec, self.alpha, self.beta = spec, alpha, beta
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

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        student_out = self.model(**batch, output_hidden_states=self.spec.hidden)
        parts = loss_parts(student_out, self.teacher_targets(batch), batch, self.spec, self.alpha, self.beta)
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
