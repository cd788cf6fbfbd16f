"""Speculative decoding (Chen et al. 2023; Leviathan et al. 2023), measured against plain decoding.

A draft proposes a few tokens; the target checks them all in one forward pass and keeps the longest
prefix it agrees with, plus one token of its own. Under greedy decoding the output is exactly the
target's own; the gain is fewer target passes per token. Two kinds of draft, both implemented by
transformers:

  a model          a smaller model of the same vocabulary (`generate(assistant_model=draft)`)
  prompt_lookup    no model: the tokens that followed an earlier occurrence of the text's last
                   n-gram in the prompt or the text so far (Saxena 2023,
                   `generate(prompt_lookup_num_tokens=N, max_matching_ngram_size=n)`);
                   free to draft, so it pays off wherever the continuation repeats the prompt
                   (quoting a persona or context, code edits) and costs little where it does not

This module times it against plain `generate` on the same prompts, one prompt at a time (assisted
generation takes batch size 1), plain and each tried number of draft tokens alternating so a busy
machine slows them alike, and counts the draft tokens the target accepted.

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
PROMPT_LOOKUP = "prompt_lookup"  # draft=prompt_lookup: no draft model, n-grams of the prompt propose
DRAFTS = (artifacts.RUN, artifacts.MODEL_DIR)  # besides a layer count and prompt_lookup
DRAFTS_TEXT = ("a layer count, a squeeze run directory (with model/), a model directory (with config.json) or "
               f"{PROMPT_LOOKUP} (no draft model)")
Draft = nn.Module | str  # a draft model, or PROMPT_LOOKUP


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
    to `counts`, by wrapping the candidate generator transformers builds inside `generate` (a draft
    model's or prompt lookup's alike; a pass where prompt lookup found no n-gram drafted nothing)."""
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


# -- the settings ---------------------------------------------------------------------------------
def draft_token_counts(num_assistant_tokens: int | Sequence[int]) -> list[int]:
    """`num_assistant_tokens` as the list of draft lengths to try: one number, or several to compare."""
    counts = [num_assistant_tokens] if isinstance(num_assistant_tokens, (int, str)) else list(num_assistant_tokens)
    try:
        counts = [int(n) for n in counts]
    except (TypeError, ValueError):
        counts = []
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise SqueezeError(f"speculative.num_assistant_tokens={num_assistant_tokens} must be a number >= 1 or a list "
                           "of different ones (e.g. [2,4,8]) to try each")
    return counts


def check_settings(draft: Any, num_assistant_tokens: int | Sequence[int] = 5, schedule: str = "constant",
                   confidence_threshold: float = 0.0, max_matching_ngram_size: int | None = None,
                   max_new_tokens: int = 32, **_) -> None:
    """Fail fast on `speculative:` settings that cannot work, or would be silently ignored, with `draft`."""
    draft_token_counts(num_assistant_tokens)
    if schedule not in SCHEDULES:
        raise SqueezeError(f"speculative schedule={schedule!r} is not one of {list(SCHEDULES)}")
    if int(max_new_tokens) < 1:
        raise SqueezeError(f"speculative.max_new_tokens={max_new_tokens} must be 1 or more")
    if is_prompt_lookup(draft):
        # transformers' prompt lookup proposes a fixed number of tokens and has no confidence to stop on.
        if schedule != "constant" or confidence_threshold:
            raise SqueezeError(f"draft={PROMPT_LOOKUP} drafts a fixed number of tokens: speculative.schedule="
                               f"{schedule} and confidence_threshold={confidence_threshold} apply to a draft model "
                               "only; use schedule=constant confidence_threshold=0, and list several "
                               "num_assistant_tokens (e.g. [2,4,8]) to compare lengths")
        if max_matching_ngram_size is not None and int(max_matching_ngram_size) < 1:
            raise SqueezeError(f"speculative.max_matching_ngram_size={max_matching_ngram_size} must be 1 or more "
                               "(the longest n-gram looked up in the prompt), or null for transformers' 2")
    elif max_matching_ngram_size is not None:
        raise SqueezeError(f"speculative.max_matching_ngram_size={max_matching_ngram_size} is used by "
                           f"draft={PROMPT_LOOKUP} only; set it to null with a draft model")


def is_prompt_lookup(draft: Any) -> bool:
    return isinstance(draft, str) and draft == PROMPT_LOOKUP


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
    draft: Draft,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int = 32,
    num_assistant_tokens: int | Sequence[int] = 5,
    schedule: str = "constant",
    confidence_threshold: float = 0.0,
    max_matching_ngram_size: int | None = None,
    do_sample: bool = False,
    draft_tokenizer=None,
    warmup: int = 1,
) -> dict[str, Any]:
    """Plain vs speculative decoding of `prompts` (texts or token ids) by `target`, with `draft` (a
    model, or PROMPT_LOOKUP: n-grams of the prompt, up to `max_matching_ngram_size` long, null: 2).

    `num_assistant_tokens`, the tokens drafted per target pass, may list several lengths: each is
    timed on the same prompts, alternating with plain decoding, and `tries` holds, per length, the
    acceptance rate (accepted ÷ drafted tokens), ms/token and tokens/s, tokens per target pass, the
    speed-up (plain ms/token ÷ speculative ms/token) and, for greedy decoding, the fraction of
    prompts whose output equals plain decoding's (1.0 unless float rounding flips a near-tie). The
    top-level `num_assistant_tokens`, `speculative` and `speedup` are those of the fastest length
    (`best`); the top-level `same_output` is the lowest of all tries. `confidence_threshold` 0 lets a
    draft model always propose `num_assistant_tokens` (transformers' default 0.4 stops it early when
    unsure)."""
    check_settings(draft, num_assistant_tokens, schedule, confidence_threshold, max_matching_ngram_size,
                   max_new_tokens)
    lengths = draft_token_counts(num_assistant_tokens)
    if not prompts:
        raise SqueezeError("speculative decoding needs at least one prompt")
    lookup = is_prompt_lookup(draft)
    if not lookup:
        if not isinstance(draft, nn.Module):
            raise SqueezeError(f"draft={draft!r} is neither a model nor {PROMPT_LOOKUP!r}")
        check_same_tokenizer(tokenizer, draft_tokenizer)
        _check_vocab_size(target, draft, tokenizer)
    device = next(target.parameters()).device
    if not lookup and next(draft.parameters()).device != device:
        raise SqueezeError(f"the draft is on {next(draft.parameters()).device}, the target on {device}; "
                           "put both on one")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "pad_token_id": pad}
    ngram = int(max_matching_ngram_size) if max_matching_ngram_size is not None else 2  # transformers' default
    ids = _prompt_ids(tokenizer, prompts)
    models = [target] if lookup else [target, draft]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()

    def run(prompt: list[int], length: int | None, counts: dict[str, int] | None = None) -> tuple[float, list[int]]:
        """One generate call: plain (length None) or drafting `length` tokens per target pass."""
        inputs = torch.tensor([prompt], device=device)
        extra: dict[str, Any] = {}
        drafting = contextlib.nullcontext()
        if length is not None and lookup:
            extra = {"prompt_lookup_num_tokens": length, "max_matching_ngram_size": ngram}
        elif length is not None:
            extra = {"assistant_model": draft}
            drafting = _draft_settings(draft, length, schedule, confidence_threshold)
        counting = count_accepted(target, counts) if counts is not None else contextlib.nullcontext()
        with drafting, counting:
            sync()
            start = time.perf_counter()
            out = target.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), **settings, **extra)
            sync()
            seconds = time.perf_counter() - start
        return seconds, out[0, len(prompt):].tolist()

    counts = {n: {"drafted": 0, "accepted": 0, "target_passes": 0} for n in lengths}
    spent = {n: [0.0, 0, 0] for n in lengths}  # seconds, new tokens, prompts with the plain output
    plain_s, plain_tokens = 0.0, 0
    try:
        with torch.inference_mode():
            for prompt in ids[: max(0, warmup)]:
                run(prompt, None)
                for n in lengths:
                    run(prompt, n)
            for prompt in ids:
                seconds, plain_out = run(prompt, None)
                plain_s, plain_tokens = plain_s + seconds, plain_tokens + len(plain_out)
                for n in lengths:
                    seconds, spec_out = run(prompt, n, counts[n])
                    spent[n][0] += seconds
                    spent[n][1] += len(spec_out)
                    spent[n][2] += plain_out == spec_out
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
    plain = _timing(plain_s, plain_tokens)
    tries = [_try(n, plain, _timing(*spent[n][:2]), counts[n], spent[n][2] / len(ids), do_sample) for n in lengths]
    best = min(tries, key=lambda t: t["speculative"]["ms_per_token"] or float("inf"))
    return {
        "prompts": len(ids), "max_new_tokens": max_new_tokens, "do_sample": do_sample,
        "draft_kind": PROMPT_LOOKUP if lookup else "model",
        "num_assistant_tokens": best["num_assistant_tokens"], "schedule": schedule,
        "confidence_threshold": confidence_threshold, "max_matching_ngram_size": ngram if lookup else None,
        "device": device.type, "threads": torch.get_num_threads(),
        "target_layers": target.config.num_hidden_layers,
        "draft_layers": None if lookup else draft.config.num_hidden_layers,
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": 0 if lookup else sum(p.numel() for p in draft.parameters()),
        "plain": plain, "speculative": best["speculative"], "speedup": best["speedup"],
        "same_output": None if do_sample else min(t["same_output"] for t in tries),
        "tries": tries,
    }


def _try(length: int, plain: dict, speculative: dict, counts: dict[str, int], same: float,
         do_sample: bool) -> dict[str, Any]:
    """One number of draft tokens' figures, against plain decoding's."""
    if counts["target_passes"] == 0 and speculative["new_tokens"]:
        log.warning("speculative: transformers did not report drafted tokens (its assisted-generation internals "
                    "changed?); acceptance rate not measured")
    speculative = {
        **speculative, **counts,
        "acceptance_rate": counts["accepted"] / counts["drafted"] if counts["drafted"] else None,
        "tokens_per_target_pass": (speculative["new_tokens"] / counts["target_passes"]
                                   if counts["target_passes"] else None),
    }
    speedup = (plain["ms_per_token"] / speculative["ms_per_token"]
               if plain["ms_per_token"] and speculative["ms_per_token"] else None)
    return {"num_assistant_tokens": length, "speculative": speculative, "speedup": speedup,
            "same_output": None if do_sample else same}


# -- wiring for evaluate.py (decode=speculative draft=...) ----------------------------------------
def check_decode(decode: str | None, draft: Any, head: str, evaluating: bool = True,
                 settings: Mapping[str, Any] | None = None) -> None:
    """Fail fast, before anything loads, on a decode setting (and `speculative:` settings) that cannot work."""
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
                           f"ckpt=<this run directory> decode=speculative draft=<{PROMPT_LOOKUP} | run dir | "
                           "model dir | layers>`")
    if head != "causal_lm":
        raise SqueezeError(f"decode=speculative generates text, so it needs a causal-LM task (e.g. task=austen or "
                           f"task=chatterbot); this task's head is {head}")
    if draft is None:
        raise SqueezeError(f"decode=speculative needs draft=<{PROMPT_LOOKUP} (no draft model) | run dir | model dir "
                           "| number of the target's first layers to keep>")
    if settings is not None:
        check_settings(draft, **settings)


def _layer_count(draft: Any) -> int | None:
    """A number of the target's first layers to keep; anything else is a reference to a saved draft."""
    return int(draft) if isinstance(draft, int) or str(draft).isdigit() else None


def _saved_draft(draft: Any) -> artifacts.Artifact:
    """A saved draft (a run's model/, or a model directory), resolved; a run trained with another head than a
    causal LM's is refused."""
    resolved = artifacts.resolve(draft, "draft", accept=DRAFTS, expected=DRAFTS_TEXT)
    artifacts.require_head(resolved, "causal_lm", "draft")
    return resolved


def check_draft(draft: Any, target: nn.Module, tokenizer) -> None:
    """What can be checked before the evaluation's long part: the layer count a cut draft keeps, or
    a draft directory's tokenizer against the target's (prompt_lookup needs nothing)."""
    if draft is None or is_prompt_lookup(draft):
        return
    layers = _layer_count(draft)
    if layers is not None:
        _check_layers(layers, target)
        return
    model_dir = _saved_draft(draft).model_dir
    try:
        draft_tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise SqueezeError(f"draft={draft} has no tokenizer to compare with the target's ({e})") from e
    check_same_tokenizer(tokenizer, draft_tokenizer, where=f"draft {model_dir}")


def load_draft(draft: Any, target: nn.Module, tokenizer) -> Draft:
    """`draft`: prompt_lookup (returned as it is: no model), a layer count (the target cut to its first
    layers), a squeeze run directory, or a saved model directory (a quantized or pruned one loads in
    its saved form); refused when its tokenizer differs from the target's."""
    check_draft(draft, target, tokenizer)
    if is_prompt_lookup(draft):
        return PROMPT_LOOKUP
    layers = _layer_count(draft)
    if layers is not None:
        return first_layers(target, layers)
    model, _ = artifacts.load(_saved_draft(draft), "causal_lm", "draft")  # its tokenizer was checked above
    device = next(target.parameters()).device
    if formats.has_quantized_weights(model):
        # Cast, its integer layers' scales would lose precision and its integer embedding would still
        # return the dtype it was saved with, mixing dtypes. Nothing of the draft's meets the target's
        # numbers (only the tokens it proposes do), so it runs in the precision it was saved in.
        return model.to(device).eval()
    return model.to(device=device, dtype=_float_dtype(target)).eval()


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's float weights (a quantized target's first parameters may be int8)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


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
