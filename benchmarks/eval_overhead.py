"""Dialog evaluation's Hits@k pass: every candidate with its full context, against each context once.

What it measures
    The wall time of scoring the same test batches two ways in one process:

    full     `model(**batch)` on the rows as the data module collates them (C rows per example, each
             the whole context followed by one candidate reply), then
             `squeeze.tasks.dialog.scoring.scores_from_logits` (mean reply log-likelihood per candidate, the
             gold reply's logits for perplexity): the way dialog evaluation ran before.
    packed   `squeeze.tasks.dialog.scoring.score_candidates`: one packed row per example, its context once and
             then every candidate's reply, a reply seeing only the context and itself (what
             `DialogModule` now runs).

    Model: any model config (`--model`, default tiny_gpt2; smollm2 is the real one), built as train.py
    builds it (random-init models seeded). Data: `task=chatterbot` test examples (`--examples`, the
    seeded sample train.py would take), 20 candidates each, `--rows` rows per batch (the config's
    eval_batch_size, 40 = 2 examples). Only the model's forward and the scoring are timed, not
    generation or BERTScore.

How the two are interleaved
    One warm-up pass each (discarded), then `--rounds` rounds of one full pass over the batches each
    way, the order alternating from round to round, so a drift of the machine's speed (the CPU may
    be shared) hits both alike. Reported: per-round times, the median per side and the ratio
    full/packed of the medians, with the spread of per-round ratios.

The check (exit status 1 if it fails)
    Both ways give the same numbers: per candidate |full - packed| < --tol (1e-4), the same ranking of
    every example's candidates (up to ties within --tol), the same gold rank (so the same Hits@1/5/10),
    and the same reply perplexity (relative 1e-5).

Run
    .venv/bin/python benchmarks/eval_overhead.py                                   # tiny_gpt2
    .venv/bin/python benchmarks/eval_overhead.py --model smollm2 --examples 30 --rounds 3
"""

from __future__ import annotations

import argparse
import math
import statistics
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
from squeeze.tasks.dialog.metrics import hits_at_k  # noqa: E402
from squeeze.tasks.dialog.scoring import score_candidates, scores_from_logits  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny_gpt2", help="a conf/model option (default tiny_gpt2)")
    p.add_argument("--examples", type=int, default=40, help="chatterbot test examples (default 40)")
    p.add_argument("--rows", type=int, default=40, help="rows per batch, a multiple of 20 (default 40)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--tol", type=float, default=1e-4, help="largest score difference allowed (default 1e-4)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def build(model_name: str, examples: int, rows: int):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model_name}", "task=chatterbot",
                                          f"task.data.max_examples.test={examples}", f"task.data.eval_batch_size={rows}"])
    spec = instantiate(cfg.model, _convert_="all")
    tokenizer = spec.tokenizer()
    data = instantiate(cfg.task.data, tokenizer=tokenizer, seed=cfg.seed, _convert_="all")
    data.setup()
    torch.manual_seed(cfg.seed)
    model = models.finish_model(spec.build("causal_lm"), tokenizer).eval()
    return model, list(data.test_dataloader()), cfg.task.data.num_candidates


def full_rows(model, batches, candidates):
    return [scores_from_logits(model(**batch).logits, batch, candidates) for batch in batches]


def packed_rows(model, batches, candidates):
    return [score_candidates(model, batch, candidates) for batch in batches]


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def perplexity(results) -> float:
    logits = torch.cat([r.gold_logits for r in results]).float()
    targets = torch.cat([r.gold_targets for r in results])
    return math.exp(torch.nn.functional.cross_entropy(logits, targets).item())


def compare(full, packed, tol: float) -> list[str]:
    """What differs between the two ways' results (empty when they agree)."""
    problems = []
    old = torch.cat([r.scores for r in full])
    new = torch.cat([r.scores for r in packed])
    diff = (old - new).abs().max().item()
    print(f"scores: {old.shape[0]} examples x {old.shape[1]} candidates, max |full - packed| = {diff:.2e}")
    if not diff < tol:
        problems.append(f"scores differ by {diff:.2e} >= {tol}")
    # Same ranking: the packed scores, in the full scores' order, never rise by more than tol.
    order = old.argsort(dim=1, descending=True)
    rises = new.gather(1, order).diff(dim=1).max().item()
    if rises > tol:
        problems.append(f"rankings differ (a packed score rises by {rises:.2e} along the full ranking)")
    ks = [k for k in (1, 5, 10) if k <= old.shape[1]]
    old_hits, new_hits = hits_at_k(old, ks), hits_at_k(new, ks)
    for k in ks:
        a, b = old_hits[k].float().mean().item(), new_hits[k].float().mean().item()
        print(f"hits@{k}: full {a:.4f}  packed {b:.4f}")
        if not torch.equal(old_hits[k], new_hits[k]):
            problems.append(f"hits@{k} differs")
    a, b = perplexity(full), perplexity(packed)
    print(f"reply perplexity: full {a:.4f}  packed {b:.4f}")
    if not math.isclose(a, b, rel_tol=1e-5):
        problems.append(f"perplexity differs: {a} vs {b}")
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, batches, candidates = build(args.model, args.examples, args.rows)
    rows = sum(b["input_ids"].shape[0] for b in batches)
    print(f"model={args.model}, {rows // candidates} examples x {candidates} candidates in {len(batches)} batches, "
          f"{torch.get_num_threads()} threads")
    sides = {"full": full_rows, "packed": packed_rows}
    times = {name: [] for name in sides}
    with torch.inference_mode():
        results = {name: fn(model, batches, candidates) for name, fn in sides.items()}  # warm-up, and the check
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
            for name in order:
                seconds, _ = timed(sides[name], model, batches, candidates)
                times[name].append(seconds)
            print(f"round {round_ + 1}: " + "  ".join(f"{n} {times[n][-1]:.3f}s" for n in sides))
    full, packed = (statistics.median(times[n]) for n in sides)
    ratios = [f / c for f, c in zip(times["full"], times["packed"])]
    print(f"median: full {full:.3f}s  packed {packed:.3f}s  ratio full/packed {full / packed:.2f}x "
          f"(per round {min(ratios):.2f}x-{max(ratios):.2f}x)")
    problems = compare(results["full"], results["packed"], args.tol)
    for problem in problems:
        print("MISMATCH:", problem)
    print("same scores: " + ("no" if problems else "yes"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
