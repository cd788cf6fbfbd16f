"""Speculative decoding (Chen et al. 2023; Leviathan et al. 2023), measured against plain decoding.

A small draft model proposes a few tokens; the target checks them all in one forward pass and keeps
the longest prefix it agrees with, plus one token of its own. Under greedy decoding the output is
exactly the target's own; the gain is fewer target passes per token. transformers implements it
(`generate(assistant_model=draft)`); this module times it against plain `generate` on the same
prompts, one prompt at a time (assisted generation takes batch size 1), the two alternating so a
busy machine slows both alike, and counts the draft tokens the target accepted.

transformers reports no acceptance figures, so they are read at the one place the loop hands them
out: the candidate generator's `update_candidate_strategy(input_ids, scores, num_matches)`, called
once per target pass with the target's scores for the drafted tokens plus one (so drafted =
scores.shape[1] - 1) and the number of them accepted.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from squeeze import artifacts
from squeeze.arch import adapter_for
from squeeze import formats
from squeeze.errors import SqueezeError

log = logging.getLogger("squeeze")
DECODES = ("plain", "speculative")
SCHEDULES = ("constant", "heuristic", "heuristic_transient")
DRAFTS = (artifacts.RUN, artifacts.MODEL_DIR)  # besides a layer count
DRAFTS_TEXT = "a layer count, a squeeze run directory (with model/) or a model directory (with config.json)"


# -- the draft ------------------------------------------------------------------------------------
def first_layers(model: nn.Module, layers: int) -> nn.Module:
    """A draft: a copy of `model` keeping its embeddings, its first `layers` decoder layers and its
    head (Chen et al.'s cheapest draft needs no training, though a trained one accepts more)."""
    _check_layers(layers, model)
    return adapter_for(model).keep_layers(model, range(layers)).eval()


def _check_layers(layers: int, target: nn.Module) -> None:
    total = target.config.num_hidden_layers
    if not 0 < layers < total:
        raise SqueezeError(f"draft={layers} layers: a draft cut from a {total}-layer target keeps 1 to {total - 1}")


def check_same_tokenizer(tokenizer, draft_tokenizer, where: str = "the draft") -> None:
    """Assisted generation hands token ids from draft to target: both must mean the same text."""
    if draft_tokenizer is None:
        return
    differences = []
    if tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        differences.append(f"vocabularies differ ({len(tokenizer)} vs {len(draft_tokenizer)} tokens)")
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(tokenizer, key) != getattr(draft_tokenizer, key):
            differences.append(f"{key} {getattr(tokenizer, key)} vs {getattr(draft_tokenizer, key)}")
    if differences:
        raise SqueezeError(f"{where} does not share the target's tokenizer ({'; '.join(differences)}); speculative "
                           "decoding needs a draft of the same model family and vocabulary (e.g. a smaller or "
                           "truncated model trained from the same base)")


def _check_vocab_size(target: nn.Module, draft: nn.Module, tokenizer) -> None:
    vocab = len(tokenizer)
    for who, model in (("target", target), ("draft", draft)):
        size = model.get_output_embeddings().weight.shape[0]
        if size < vocab:
            raise SqueezeError(f"the {who} predicts {size} tokens but the tokenizer has {vocab}; the draft must share "
                               "the target's vocabulary")


# -- counting accepted tokens ---------------------------------------------------------------------
@contextlib.contextmanager
def count_accepted(target: nn.Module, counts: dict[str, int]) -> Iterator[dict[str, int]]:
    """While active, adds each assisted `generate` call's drafted/accepted tokens and target passes
    to `counts`, by wrapping the candidate generator transformers builds inside `generate`."""
    build = target._get_candidate_generator  # bound method; shadowed on the instance, then restored

    def counted(*args, **kwargs):
        generator = build(*args, **kwargs)
        update = generator.update_candidate_strategy

        def record(input_ids, scores, num_matches):
            counts["drafted"] += int(scores.shape[1]) - 1
            counts["accepted"] += int(num_matches)
            counts["target_passes"] += 1
            return update(input_ids, scores, num_matches)

        generator.update_candidate_strategy = record
        return generator

    target._get_candidate_generator = counted
    try:
        yield counts
    finally:
        del target._get_candidate_generator


@contextlib.contextmanager
def _draft_settings(draft: nn.Module, num_assistant_tokens: int, schedule: str, confidence_threshold: float):
    # transformers reads these from the draft's generation config; set them for this run only.
    config = draft.generation_config
    keys = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
    saved = {k: getattr(config, k, None) for k in keys}
    config.num_assistant_tokens = num_assistant_tokens
    config.num_assistant_tokens_schedule = schedule
    config.assistant_confidence_threshold = confidence_threshold
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(config, k, v)


# -- the measurement ------------------------------------------------------------------------------
def _prompt_ids(tokenizer, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = tokenizer(p)["input_ids"] if isinstance(p, str) else [int(t) for t in p]
        if not ids:
            raise SqueezeError("speculative decoding: an empty prompt; every prompt needs at least one token")
        out.append(list(ids))
    return out


def _timing(seconds: float, tokens: int) -> dict[str, float | int | None]:
    return {"seconds": seconds, "new_tokens": tokens,
            "ms_per_token": 1000 * seconds / tokens if tokens else None,
            "tokens_per_s": tokens / seconds if seconds > 0 else None}


def measure_speculative(
    target: nn.Module,
    draft: nn.Module,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int = 32,
    num_assistant_tokens: int = 5,
    schedule: str = "constant",
    confidence_threshold: float = 0.0,
    do_sample: bool = False,
    draft_tokenizer=None,
    warmup: int = 1,
) -> dict[str, Any]:
    """Plain vs speculative decoding of `prompts` (texts or token ids) by `target`, with `draft`.

    Returns per-token latency and tokens/s of both, the speed-up (plain ms/token ÷ speculative
    ms/token), the acceptance rate (accepted ÷ drafted tokens), tokens per target pass, and, for
    greedy decoding, the fraction of prompts whose two outputs are identical (1.0 unless float
    rounding flips a near-tie). `confidence_threshold` 0 lets the draft always propose
    `num_assistant_tokens` (transformers' default 0.4 stops it early when unsure)."""
    if schedule not in SCHEDULES:
        raise SqueezeError(f"speculative schedule={schedule!r} is not one of {list(SCHEDULES)}")
    if num_assistant_tokens < 1 or max_new_tokens < 1:
        raise SqueezeError("speculative decoding needs num_assistant_tokens >= 1 and max_new_tokens >= 1")
    if not prompts:
        raise SqueezeError("speculative decoding needs at least one prompt")
    check_same_tokenizer(tokenizer, draft_tokenizer)
    _check_vocab_size(target, draft, tokenizer)
    device = next(target.parameters()).device
    if next(draft.parameters()).device != device:
        raise SqueezeError(f"the draft is on {next(draft.parameters()).device}, the target on {device}; "
                           "put both on one")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "pad_token_id": pad}
    ids = _prompt_ids(tokenizer, prompts)
    was_training = (target.training, draft.training)
    target.eval()
    draft.eval()

    def run(prompt: list[int], assisted: bool) -> tuple[float, list[int]]:
        inputs = torch.tensor([prompt], device=device)
        extra = {"assistant_model": draft} if assisted else {}
        sync()
        start = time.perf_counter()
        out = target.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), **settings, **extra)
        sync()
        return time.perf_counter() - start, out[0, len(prompt):].tolist()

    counts = {"drafted": 0, "accepted": 0, "target_passes": 0}
    plain_s = spec_s = 0.0
    plain_tokens = spec_tokens = same = 0
    try:
        with torch.inference_mode(), _draft_settings(draft, num_assistant_tokens, schedule, confidence_threshold):
            for prompt in ids[: max(0, warmup)]:
                run(prompt, False)
                run(prompt, True)
            with count_accepted(target, counts):
                for prompt in ids:
                    seconds, plain_out = run(prompt, False)
                    plain_s, plain_tokens = plain_s + seconds, plain_tokens + len(plain_out)
                    seconds, spec_out = run(prompt, True)
                    spec_s, spec_tokens = spec_s + seconds, spec_tokens + len(spec_out)
                    same += plain_out == spec_out
    finally:
        target.train(was_training[0])
        draft.train(was_training[1])
    plain, speculative = _timing(plain_s, plain_tokens), _timing(spec_s, spec_tokens)
    if counts["target_passes"] == 0 and spec_tokens:
        log.warning("speculative: transformers did not report drafted tokens (its assisted-generation internals "
                    "changed?); acceptance rate not measured")
    speculative.update(
        drafted=counts["drafted"], accepted=counts["accepted"], target_passes=counts["target_passes"],
        acceptance_rate=counts["accepted"] / counts["drafted"] if counts["drafted"] else None,
        tokens_per_target_pass=spec_tokens / counts["target_passes"] if counts["target_passes"] else None,
    )
    speedup = (plain["ms_per_token"] / speculative["ms_per_token"]
               if plain["ms_per_token"] and speculative["ms_per_token"] else None)
    return {
        "prompts": len(ids), "max_new_tokens": max_new_tokens, "do_sample": do_sample,
        "num_assistant_tokens": num_assistant_tokens, "schedule": schedule,
        "confidence_threshold": confidence_threshold, "device": device.type, "threads": torch.get_num_threads(),
        "target_layers": target.config.num_hidden_layers, "draft_layers": draft.config.num_hidden_layers,
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "plain": plain, "speculative": speculative, "speedup": speedup,
        "same_output": None if do_sample else same / len(ids),
    }


# -- wiring for evaluate.py (decode=speculative draft=...) ----------------------------------------
def check_decode(decode: str | None, draft: Any, head: str, evaluating: bool = True) -> None:
    """Fail fast, before anything loads, on a decode setting that cannot work."""
    decode = decode or "plain"
    if decode not in DECODES:
        raise SqueezeError(f"decode={decode!r} is not one of {list(DECODES)}")
    if decode == "plain":
        if draft is not None:
            raise SqueezeError(f"draft={draft} is only used by decode=speculative; add decode=speculative or "
                               "drop draft=")
        return
    if not evaluating:
        raise SqueezeError("decode=speculative is an evaluate.py option: train first, then run `python evaluate.py "
                           "ckpt=<this run directory> decode=speculative draft=<run dir | model dir | layers>`")
    if head != "causal_lm":
        raise SqueezeError(f"decode=speculative generates text, so it needs a causal-LM task (e.g. task=austen or "
                           f"task=chatterbot); this task's head is {head}")
    if draft is None:
        raise SqueezeError("decode=speculative needs draft=<run dir | model dir | number of the target's first "
                           "layers to keep>")


def _layer_count(draft: Any) -> int | None:
    """A number of the target's first layers to keep; anything else is a reference to a saved draft."""
    return int(draft) if isinstance(draft, int) or str(draft).isdigit() else None


def _draft_dir(draft: Any) -> Path:
    """The model directory of a saved draft (a run's model/, or a model directory); a run trained with
    another head than a causal LM's is refused."""
    resolved = artifacts.resolve(draft, "draft", accept=DRAFTS, expected=DRAFTS_TEXT)
    artifacts.require_head(resolved, "causal_lm", "draft")
    return resolved.model_dir


def check_draft(draft: Any, target: nn.Module, tokenizer) -> None:
    """What can be checked before the evaluation's long part: the layer count a cut draft keeps, or
    a draft directory's tokenizer against the target's."""
    if draft is None:
        return
    layers = _layer_count(draft)
    if layers is not None:
        _check_layers(layers, target)
        return
    model_dir = _draft_dir(draft)
    try:
        draft_tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise SqueezeError(f"draft={draft} has no tokenizer to compare with the target's ({e})") from e
    check_same_tokenizer(tokenizer, draft_tokenizer, where=f"draft {model_dir}")


def load_draft(draft: Any, target: nn.Module, tokenizer) -> nn.Module:
    """`draft`: a layer count (the target cut to its first layers), a squeeze run directory, or a saved
    model directory; refused when its tokenizer differs from the target's."""
    check_draft(draft, target, tokenizer)
    layers = _layer_count(draft)
    if layers is not None:
        return first_layers(target, layers)
    model = formats.load(_draft_dir(draft), "causal_lm")
    device = next(target.parameters()).device
    return model.to(device=device, dtype=next(target.parameters()).dtype).eval()


def task_prompts(data, count: int, prompt_tokens: int) -> list[list[int]]:
    """Prompts from the task's test split: dialog contexts where the task has them, otherwise the
    first `prompt_tokens` tokens of test examples."""
    if hasattr(data, "generation_prompts"):
        return data.generation_prompts("test", count)
    prompts: list[list[int]] = []
    for batch in data.test_dataloader():
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            prompts.append(ids[mask.bool()][:prompt_tokens].tolist())
            if len(prompts) == count:
                return prompts
    return prompts


def from_config(target: nn.Module, tokenizer, data, draft: Any, settings: Mapping[str, Any]) -> dict[str, Any]:
    """evaluate.py's `decode=speculative`: the evaluated model as target, `draft` as in load_draft,
    prompts from the task's test split; `settings` is cfg.speculative."""
    settings = dict(settings)
    prompts = task_prompts(data, int(settings.pop("prompts", 16)), int(settings.pop("prompt_tokens", 64)))
    model = load_draft(draft, target, tokenizer)
    result = measure_speculative(target, model, tokenizer, prompts, **settings)
    result["draft"] = str(draft)
    return result
