"""The dialog LightningModule: reply LM loss plus next-utterance classification in training; perplexity,
Hits@k and generated replies (BLEU, TER, BERTScore) in evaluation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.text import Perplexity, TranslationEditRate

from squeeze import assets
from squeeze.errors import SqueezeError
from squeeze.tasks.base import IGNORE_INDEX, STAGES, FineTune
from squeeze.tasks.dialog.metrics import BLEU_SMOOTHING, CorpusBLEU, HitsAtK, context_lengths
from squeeze.tasks.dialog.scoring import CandidateScores, score_candidates, scores_from_logits

HITS_RANKINGS = ("lm", "mc")
TASK_HEAD_FILE = "task_head.safetensors"  # the MC head beside a saved model (the model itself stays a causal LM)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each right-padded row's last real token."""
    return attention_mask.sum(dim=1).clamp(min=1) - 1


def _generation_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
    settings = dict(settings)
    if not settings.get("do_sample", False):  # sampling knobs would only raise "unused flag" warnings
        for key in ("temperature", "top_p", "top_k"):
            settings.pop(key, None)
    return settings


class DialogModule(FineTune):
    """Fine-tunes a causal LM on replies (LM loss) plus next-utterance classification (MC loss).

    loss = lm_coef · reply LM loss + mc_coef · cross-entropy of the MC head over the candidates.
    Validation/test: reply perplexity and Hits@k, candidates ranked by `hits_rank`: "lm", the mean reply
    log-likelihood, each example's context encoded once for all its candidates (scoring.py); "mc", the MC head's
    score of each full row at its last token (the double-heads model's multiple-choice head, as the thesis
    ranked; it is saved beside the model, TASK_HEAD_FILE, and read back with it). On the
    stages in `generate_on`, replies to the first `generate_max_examples` examples (null: all; per
    process) are generated from the context with `generate` settings, `generate_batch_size` prompts at
    a time, and scored against the gold reply by BLEU (sacreBLEU's definition and scale, 0-100, with its
    default "exp" smoothing unless `bleu_smoothing` is none, so short replies with no 4-gram match do not
    all score 0) and TER as a ratio (edits per reference word, as torchmetrics returns it: 1.016 is 101.6 on
    sacreBLEU's ×100 scale; above 1 when a reply needs more edits than the reference has words), and by
    BERTScore F1 with a local encoder (`bertscore`: an asset name or a model directory; null skips it).
    """

    def __init__(
        self,
        model: nn.Module,
        lm_coef: float = 2.0,
        mc_coef: float = 1.0,
        train_candidates: int = 2,
        eval_candidates: int = 20,
        hits_at: Sequence[int] = (1, 5, 10),
        generate: Mapping[str, Any] | None = None,
        generate_on: Sequence[str] = ("test",),
        generate_max_examples: int | None = 64,
        generate_batch_size: int = 16,
        bertscore: str | None = "minilm",
        bertscore_batch_size: int = 32,
        bleu_smoothing: str = "exp",
        hits_rank: str = "lm",
        tokenizer=None,
        **kwargs,
    ):
        if mc_coef > 0 and train_candidates < 2:
            raise SqueezeError("task.module.mc_coef>0 needs distractors: set task.data.train_candidates>=2 "
                               "or task.module.mc_coef=0")
        if lm_coef < 0 or mc_coef < 0 or lm_coef + mc_coef == 0:
            raise SqueezeError(f"task.module.lm_coef={lm_coef} and mc_coef={mc_coef} must be >= 0, not both 0")
        unknown = set(generate_on) - set(STAGES)
        if unknown:
            raise SqueezeError(f"task.module.generate_on has {sorted(unknown)}; use stages from {list(STAGES)}")
        self.lm_coef, self.mc_coef = lm_coef, mc_coef
        self.train_candidates, self.eval_candidates = train_candidates, eval_candidates
        self.hits_at = [int(k) for k in hits_at]
        for k in self.hits_at:
            if k > eval_candidates:
                raise SqueezeError(f"Hits@{k} needs at least {k} candidates per example but task.data.num_candidates="
                                   f"{eval_candidates}; raise it or drop {k} from task.module.hits_at")
        self.generate_settings = dict(generate or {"do_sample": False, "max_new_tokens": 32})
        self.generate_on = tuple(generate_on)
        if generate_max_examples is not None and generate_max_examples < 0 or generate_batch_size < 1:
            raise SqueezeError(f"task.module.generate_max_examples={generate_max_examples} must be >= 0 or null and "
                               f"generate_batch_size={generate_batch_size} >= 1")
        self.generate_max_examples, self.generate_batch_size = generate_max_examples, generate_batch_size
        self.bertscore_path = _bertscore_location(bertscore) if bertscore else None
        self.bertscore_batch_size = bertscore_batch_size
        self.check_settings({"bleu_smoothing": bleu_smoothing, "hits_rank": hits_rank, "mc_coef": mc_coef})
        self.bleu_smoothing, self.hits_rank = bleu_smoothing, hits_rank
        super().__init__(model, **kwargs)
        self.tokenizer = tokenizer
        self._stop_ids: list[int] | None = None
        # Per stage: examples offered to generation this epoch, and prompts waiting for a full batch.
        self._generation: dict[str, dict[str, Any]] = {}
        # The MC head lives here, not in the model: the saved model stays a plain causal LM.
        self.mc_head = nn.Linear(model.config.hidden_size, 1)

    @staticmethod
    def check_settings(settings: Mapping[str, Any]) -> None:
        """The choices among task.module's settings, checked before anything loads (squeeze.config) and here."""
        bleu, rank = settings.get("bleu_smoothing", "exp"), settings.get("hits_rank", "lm")
        if bleu not in BLEU_SMOOTHING:
            raise SqueezeError(f"task.module.bleu_smoothing={bleu!r} is not one of {list(BLEU_SMOOTHING)}")
        if rank not in HITS_RANKINGS:
            raise SqueezeError(f"task.module.hits_rank={rank!r} is not one of {list(HITS_RANKINGS)}")
        if rank == "mc" and settings.get("mc_coef", 1.0) == 0:
            raise SqueezeError("task.module.hits_rank=mc ranks by the MC head, which mc_coef=0 never trains; "
                               "set task.module.mc_coef>0 or task.module.hits_rank=lm")

    def setup(self, stage: str) -> None:
        if self.tokenizer is None and self.trainer.datamodule is not None:
            self.tokenizer = self.trainer.datamodule.tokenizer

    # -- metrics ---------------------------------------------------------------------------------
    def make_metrics(self) -> nn.Module:
        metrics = {"perplexity": Perplexity(ignore_index=IGNORE_INDEX), "hits": HitsAtK(self.hits_at),
                   "bleu": CorpusBLEU(self.bleu_smoothing), "ter": TranslationEditRate()}
        if self.bertscore_path is not None:
            from torchmetrics.text import BERTScore

            metrics["bertscore"] = BERTScore(model_name_or_path=self.bertscore_path,
                                             batch_size=self.bertscore_batch_size, max_length=256, truncation=True)
        return nn.ModuleDict(metrics)

    def _check_rows(self, batch) -> None:
        if batch["input_ids"].shape[0] % self.eval_candidates:
            raise SqueezeError(f"a dialog batch of {batch['input_ids'].shape[0]} rows is not groups of "
                               f"{self.eval_candidates} candidates; task.module.eval_candidates must be "
                               "task.data.num_candidates")

    def eval_outputs(self, batch: dict) -> CandidateScores:
        self._check_rows(batch)
        if self.hits_rank == "mc":  # the MC head reads each full row's last token: every row through the model
            return self.mc_scores(batch, self.model(**batch, output_hidden_states=True))
        # Not the full rows through the model: one packed row per example, its context once, then every reply.
        return score_candidates(self.model, batch, self.eval_candidates)

    def mc_scores(self, batch: dict, outputs) -> CandidateScores:
        """CandidateScores of a model output on the full rows (with hidden states) whose ranking scores are the
        MC head's; perplexity still comes from the gold replies' logits."""
        lm = scores_from_logits(outputs.logits, batch, self.eval_candidates)
        return CandidateScores(self._mc_logits(batch, outputs, self.eval_candidates), lm.gold_logits, lm.gold_targets)

    def _mc_logits(self, batch: dict, outputs, candidates: int) -> torch.Tensor:
        """[examples, candidates]: the MC head on the last layer's state at each row's last token."""
        rows = batch["input_ids"].shape[0]
        device = self.mc_head.weight.device
        last = outputs.hidden_states[-1][torch.arange(rows, device=device), last_token_index(batch["attention_mask"])]
        return self.mc_head(last.to(self.mc_head.weight.dtype)).view(-1, candidates).float()

    # -- the MC head beside a saved model ---------------------------------------------------------
    def save_task_head(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.mc_head.state_dict().items()},
                  str(Path(directory) / TASK_HEAD_FILE))

    def load_task_head(self, directory: Path | None) -> None:
        """The MC head saved beside the model in `directory`; ranking by it (hits_rank=mc) without one is refused."""
        path = None if directory is None else Path(directory) / TASK_HEAD_FILE
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            self.mc_head.load_state_dict(load_file(str(path)))
        elif self.hits_rank == "mc":
            where = "a pretrained model has none" if directory is None else f"{path} is missing (saved before " \
                "squeeze kept it, or not a dialog run)"
            raise SqueezeError(f"task.module.hits_rank=mc needs the MC head trained with the model: {where}; "
                               "fine-tune it with task=<dialog task> first, or use task.module.hits_rank=lm")

    def update_metrics(self, metrics, batch, outputs):
        """`outputs`: CandidateScores, or a model output on the full rows (scored as scoring.py's module
        docstring says; the numbers are the same)."""
        self._check_rows(batch)
        if not isinstance(outputs, CandidateScores):
            outputs = (self.mc_scores(batch, outputs) if self.hits_rank == "mc"
                       else scores_from_logits(outputs.logits, batch, self.eval_candidates))
        metrics["hits"].update(outputs.scores)
        metrics["perplexity"].update(outputs.gold_logits.float()[None], outputs.gold_targets[None])
        stage = next((s for s in STAGES if self.metrics[s] is metrics), None)
        if stage in self.generate_on:
            self.update_generation(metrics, batch, stage)

    def update_generation(self, metrics, batch, stage: str) -> None:
        """Queue the batch's prompts (up to `generate_max_examples` this epoch); generate full batches of them."""
        if self.tokenizer is None:
            raise SqueezeError("dialog generation metrics need the tokenizer, which DialogModule takes from the data "
                               "module at setup; pass tokenizer= or set task.module.generate_on=[]")
        candidates = self.eval_candidates
        state = self._generation.setdefault(stage, {"offered": 0, "queue": []})
        room = len(batch["input_ids"]) // candidates
        if self.generate_max_examples is not None:
            room = min(room, self.generate_max_examples - state["offered"])
        if room <= 0:
            return
        gold_ids = batch["input_ids"][candidates - 1 :: candidates][:room]
        gold_labels = batch["labels"][candidates - 1 :: candidates][:room]
        starts = context_lengths(batch["labels"], candidates)[:room].tolist()
        for row, labels, start in zip(gold_ids, gold_labels, starts):
            reference = self.tokenizer.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True).strip()
            state["queue"].append((row[:start].tolist(), reference))
        state["offered"] += room
        while len(state["queue"]) >= self.generate_batch_size:
            self._generate_and_score(metrics, state["queue"][: self.generate_batch_size])
            del state["queue"][: self.generate_batch_size]

    def _generate_and_score(self, metrics, queued: Sequence[tuple[list[int], str]]) -> None:
        replies = self.generate_replies([prompt for prompt, _ in queued])
        references = [reference for _, reference in queued]
        metrics["bleu"].update(replies, [[r] for r in references])
        metrics["ter"].update(replies, [[r] for r in references])
        if "bertscore" in metrics:
            metrics["bertscore"].update(replies, references)

    @torch.no_grad()
    def generate_replies(self, prompts: Sequence[Sequence[int]]) -> list[str]:
        """Greedy or sampled replies (per `generate`) to context prompts, cut at the end of the line."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        device = next(self.model.parameters()).device
        # Left padding: every prompt ends where generation starts.
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = self.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad,
                                  eos_token_id=self.stop_ids(), **_generation_kwargs(self.generate_settings))
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [t.split("\n", 1)[0].strip() for t in texts]

    def stop_ids(self) -> list[int]:
        """EOS and every token that holds a line break: a reply is one line. (transformers'
        stop_strings would do the same but rebuilds a vocabulary table on every generate call.)"""
        if self._stop_ids is None:
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            self._stop_ids = [self.tokenizer.eos_token_id] + [i for i, t in enumerate(texts) if "\n" in t]
        return self._stop_ids

    def compute_metrics(self, metrics):
        stage = next((s for s in STAGES if self.metrics[s] is metrics), None)
        state = self._generation.pop(stage, None)  # the epoch is over: generate what is queued, start afresh
        if state and state["queue"]:
            self._generate_and_score(metrics, state["queue"])
        out = {"perplexity": metrics["perplexity"].compute(), **metrics["hits"].compute()}
        if metrics["bleu"].update_count:
            out["bleu"] = metrics["bleu"].compute() * 100
            out["ter"] = metrics["ter"].compute()  # a ratio, as the thesis reports it (1.016), not × 100
        if "bertscore" in metrics and metrics["bertscore"].update_count:
            metrics["bertscore"].embedding_device = metrics["bertscore"].device  # the run's device
            scores = metrics["bertscore"].compute()
            out.update(bertscore_means(scores))
        return out

    # -- training --------------------------------------------------------------------------------
    @property
    def wants_hidden_states(self) -> bool:
        return self.mc_coef > 0  # the MC head reads the last layer's state at each row's last token

    def task_loss(self, batch: dict, outputs) -> dict[str, torch.Tensor]:
        """lm_coef · reply LM loss + mc_coef · MC loss (`outputs` with hidden states when mc_coef > 0),
        and the two parts (`lm_loss`, `mc_loss`)."""
        rows = batch["input_ids"].shape[0]
        if rows % self.train_candidates:
            raise SqueezeError(f"a dialog training batch of {rows} rows is not groups of {self.train_candidates} "
                               "candidates; task.module.train_candidates must be task.data.train_candidates")
        parts = {"lm_loss": outputs.loss}
        loss = self.lm_coef * outputs.loss
        if self.mc_coef > 0:
            mc_logits = self._mc_logits(batch, outputs, self.train_candidates)
            gold = torch.full((mc_logits.shape[0],), self.train_candidates - 1, device=mc_logits.device)
            parts["mc_loss"] = F.cross_entropy(mc_logits, gold)
            loss = loss + self.mc_coef * parts["mc_loss"]
        return {"loss": loss, **parts}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        outputs = self.model(**batch, output_hidden_states=self.wants_hidden_states)
        parts = self.task_loss(batch, outputs)
        self.check_finite(parts["loss"])
        for name, value in parts.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss",
                     batch_size=batch["input_ids"].shape[0] // self.train_candidates)
        return parts["loss"]


def _bertscore_location(name_or_path: str) -> str:
    """An offline asset name (minilm) or a local model directory for BERTScore's encoder."""
    if name_or_path in assets.ASSETS:
        try:
            return str(assets.locate(name_or_path))
        except SqueezeError as e:
            raise SqueezeError(f"{e}; or skip BERTScore with task.module.bertscore=null") from e
    path = Path(str(name_or_path)).expanduser()
    if not (path / "config.json").exists():
        raise SqueezeError(f"task.module.bertscore={name_or_path} is neither an asset ({', '.join(assets.ASSETS)}) "
                           "nor a model directory with config.json; set it to minilm, a directory, or null")
    return str(path)


def bertscore_means(scores) -> dict[str, torch.Tensor]:
    """Mean BERTScore precision/recall/F1 over the replies. An empty reply has no tokens to be precise about
    (0/0 = nan in torchmetrics); it scores 0, as its F1 does, instead of turning the whole mean into nan."""
    return {f"bertscore_{part}": torch.nan_to_num(torch.as_tensor(scores[part]).float(), nan=0.0).mean()
            for part in ("precision", "recall", "f1")}
