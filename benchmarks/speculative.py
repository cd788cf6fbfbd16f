"""Speculative decoding on real prompts: which draft, and how many draft tokens, pay off.

What it measures
    For each task (`--tasks`, default austen and chatterbot) the model (`--model`, default smollm2,
    SmolLM2-135M's real weights) greedily continues `--prompts` test prompts the way evaluate.py's
    `decode=speculative` takes them (austen: the first `--prompt-tokens` tokens of test blocks;
    chatterbot: each example's context, "User: ...\\nBot:"), `--new-tokens` tokens each, plainly and
    with each draft (`--drafts`) proposing each number of tokens per target pass (`--lengths`):

        prompt_lookup   no draft model: the tokens that followed the text's last n-gram earlier in
                        the prompt or the text so far (transformers' prompt lookup decoding)
        N               the model's own first N layers, untrained (Chen et al.'s cheapest draft)
        <dir>           a run directory or saved model of the same tokenizer (e.g. a kd or dq run)

    All of it through squeeze.measure.speculative.measure_speculative: one prompt at a time (assisted
    generation takes batch size 1), plain and every draft length alternating per prompt so a busy
    machine slows them alike, after one warm-up prompt.

The table (markdown)
    task, draft, draft tokens per pass, acceptance (accepted ÷ drafted tokens; "-" when nothing was
    drafted), tokens per target pass, ms/token plain and speculative, speed-up (plain ÷ speculative
    ms/token) and same output (fraction of prompts whose greedy output equals plain decoding's:
    1.0 unless float rounding flips a near-tie in the several-token verification pass).

What to expect
    Prompt lookup drafts for free, so it wins whenever the continuation repeats text already there
    (a small model's greedy continuation often loops; a reply quoting its question) and costs a
    longer verification pass where it does not. An untrained cut draft costs N/L of a target pass
    per drafted token and agrees with the target less the fewer layers it keeps.
    Generation is not stopped at the end of a reply line (as evaluate.py's decode=speculative does
    not): on chatterbot the 32 tokens run on into new "User: ... / Bot: ..." turns, which repeat the
    prompt's layout and words, and that is much of what prompt lookup finds there.

Measured (2-core shared CPU, 2 threads, fp32, 32 new tokens; a second job was running, so the
milliseconds are noisy: read the speed-ups, plain and speculative alternating per prompt, as rough)
    --prompts 4 --lengths 2 4 8 --drafts prompt_lookup                          (61 s)
    | task | draft | draft tokens | acceptance | tokens/pass | ms/token plain | ms/token spec. | speed-up | same |
    |---|---|---|---|---|---|---|---|---|
    | austen | prompt_lookup | 2 | 0.13 | 1.16 | 45.0 | 68.5 | 0.66 | 1.00 |
    | austen | prompt_lookup | 4 | 0.08 | 1.19 | 45.0 | 52.2 | 0.86 | 1.00 |
    | austen | prompt_lookup | 8 | 0.05 | 1.22 | 45.0 | 54.5 | 0.83 | 1.00 |
    | chatterbot | prompt_lookup | 2 | 0.54 | 1.83 | 44.8 | 43.9 | 1.02 | 1.00 |
    | chatterbot | prompt_lookup | 4 | 0.44 | 2.25 | 44.8 | 26.9 | 1.66 | 1.00 |
    | chatterbot | prompt_lookup | 8 | 0.41 | 3.12 | 44.8 | 21.4 | 2.09 | 1.00 |
    --prompts 3 --lengths 2 4 --drafts 6                                        (79 s)
    | austen | first 6 of 30 layers | 2 | 0.06 | 1.12 | 48.6 | 114.3 | 0.43 | 1.00 |
    | austen | first 6 of 30 layers | 4 | 0.03 | 1.12 | 48.6 | 116.0 | 0.42 | 1.00 |
    | chatterbot | first 6 of 30 layers | 2 | 0.02 | 1.03 | 42.7 | 116.3 | 0.37 | 1.00 |
    | chatterbot | first 6 of 30 layers | 4 | 0.01 | 1.03 | 42.7 | 126.0 | 0.34 | 1.00 |
    So on these prompts: prompt lookup pays off on dialog (about 2x at 8 draft tokens) and loses
    10-35% on Austen's prose, where the text rarely repeats; an untrained 6-layer cut of SmolLM2
    almost never agrees with it and halves the speed (a distilled draft, compress=kd, is what would
    make a model draft pay). Few prompts: the figures move by tens of percent between runs.

Run
    .venv/bin/python benchmarks/speculative.py                                # smollm2, austen + chatterbot
    .venv/bin/python benchmarks/speculative.py --prompts 4 --lengths 2 4 --drafts prompt_lookup
    .venv/bin/python benchmarks/speculative.py --model tiny_gpt2 --drafts prompt_lookup 1   # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# Run from a checkout without installing: make `import squeeze` find the package.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

import squeeze  # noqa: E402,F401  registers the config resolvers
from squeeze import models  # noqa: E402
from squeeze.measure.speculative import load_draft, measure_speculative, task_prompts  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="a conf/model option (default smollm2)")
    p.add_argument("--tasks", nargs="+", default=["austen", "chatterbot"], help="causal-LM tasks")
    p.add_argument("--drafts", nargs="+", default=["prompt_lookup", "6"],
                   help="prompt_lookup, N (the model's first N layers) or a run/model directory")
    p.add_argument("--lengths", nargs="+", type=int, default=[2, 4, 8], help="draft tokens per target pass")
    p.add_argument("--prompts", type=int, default=8, help="test prompts per task (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="LM tasks: prompt length in tokens (default 64)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    p.add_argument("--ngram", type=int, default=None, help="prompt lookup's longest n-gram (default: transformers' 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def prompts_of(task: str, model_name: str, count: int, prompt_tokens: int, tokenizer):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=[f"model={model_name}", f"task={task}"])
    data = instantiate(cfg.task.data, tokenizer=tokenizer, seed=cfg.seed, _convert_="all")
    data.setup("test")
    return task_prompts(data, count, prompt_tokens)


def build_model(model_name: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=[f"model={model_name}", "task=austen"])
    spec = instantiate(cfg.model, _convert_="all")
    tokenizer = spec.tokenizer()
    torch.manual_seed(cfg.seed)
    return models.finish_model(spec.build("causal_lm"), tokenizer).eval(), tokenizer


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = build_model(args.model)
    rows = []
    for task in args.tasks:
        prompts = prompts_of(task, args.model, args.prompts, args.prompt_tokens, tokenizer)
        lengths = sorted(len(p) for p in prompts)
        print(f"{task}: {len(prompts)} prompts of {lengths[0]}-{lengths[-1]} tokens", file=sys.stderr)
        for name in args.drafts:
            draft = load_draft(name, model, tokenizer)
            result = measure_speculative(model, draft, tokenizer, prompts, max_new_tokens=args.new_tokens,
                                         num_assistant_tokens=args.lengths, max_matching_ngram_size=args.ngram
                                         if name == "prompt_lookup" else None)
            label = name if name == "prompt_lookup" else (
                f"first {name} of {model.config.num_hidden_layers} layers" if name.isdigit() else name)
            for t in result["tries"]:
                s = t["speculative"]
                rows.append([task, label, str(t["num_assistant_tokens"]), _f(s["acceptance_rate"]),
                             _f(s["tokens_per_target_pass"]), _f(result["plain"]["ms_per_token"], 1),
                             _f(s["ms_per_token"], 1), _f(t["speedup"]), _f(t["same_output"])])
            print(f"  {label}: done ({time.perf_counter() - start:.0f} s so far)", file=sys.stderr)
    header = ["task", "draft", "draft tokens", "acceptance", "tokens/pass", "ms/token plain",
              "ms/token spec.", "speed-up", "same output"]
    print(f"\nmodel={args.model}, {torch.get_num_threads()} threads, {args.prompts} prompts per task, "
          f"{args.new_tokens} new tokens each, greedy\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{time.perf_counter() - start:.0f} s in all", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
