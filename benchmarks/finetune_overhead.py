"""Training-step overhead of squeeze's fine-tune path against a plain PyTorch loop.

What it measures
    The wall time of one optimisation step (forward with labels -> backward -> AdamW step ->
    zero_grad) of the same model, on the same batches, done two ways in one process:

    squeeze  `squeeze.tasks.lm.CausalLM` driven by a `lightning.Trainer` (CPU, fp32, no logger,
             no checkpointing, no progress bar, no validation), i.e. the code path `train.py` uses
             for a causal-LM task, including `FineTune.check_finite` (`loss.item()`), `self.log`,
             Lightning's optimizer closure and loop bookkeeping.
    plain    `loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()` on an
             identical copy of the model (deep-copied before either side trains).

    Model: a 6-layer GPT-2-shaped `GPT2LMHeadModel` (n_embd 768, 12 heads, 1024 positions, the
    GPT-2 vocabulary), random init. Data: Jane Austen's *Emma* (offline `austen` asset) tokenized
    with the real GPT-2 tokenizer (offline `gpt2_tokenizer` asset), cut into fixed batches of
    `--batch` x `--seq` tokens shaped as squeeze's `LanguageModelingData` gives them for training
    (input_ids, attention_mask of ones, labels = input_ids). Step k of each side sees batch k.
    AdamW, lr 5e-5.

How the two are interleaved
    The plain loop runs inside a Lightning Callback, so both sides alternate in one process with
    the same threads and allocator: `--warmup` squeeze steps, `--warmup` plain steps (both
    discarded), then `--rounds` rounds of `--steps` squeeze steps followed by `--steps` plain
    steps. A drift of the machine's speed (the CPU may be shared with other work) then hits both
    sides alike. Reported per side: median, min, max and IQR of the timed steps; the ratio of the
    medians squeeze/plain (goal <= 1.03); and the ratio per round, whose spread shows the noise.

    Two step times are reported for squeeze:
      hook   on_train_batch_start -> on_train_batch_end (the training_step, backward, optimizer
             step and zero_grad, as Lightning runs them)
      cycle  from the end of the previous step (after the plain block, if one ran) to the end of
             this one: also the batch fetch, device transfer, LR-scheduler update and Lightning's
             per-batch bookkeeping. This is what a training run actually pays per step.

Run
    .venv/bin/python benchmarks/finetune_overhead.py                      # the full config
    .venv/bin/python benchmarks/finetune_overhead.py --layers 2 --batch 2 --seq 64 --rounds 3 --steps 3
    .venv/bin/python benchmarks/finetune_overhead.py --breakdown          # + where squeeze's time goes

    `--breakdown` additionally times, in the squeeze steps, the parts of the step (forward,
    `check_finite`, `self.log`, backward, optimizer step, zero_grad) by wrapping the module's
    methods from outside; it adds a few microseconds per wrapped call, so the headline ratio is
    taken without it unless you pass it.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

# Run from a checkout without installing: make `import squeeze` find the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

import squeeze.assets
import squeeze.tasks.lm


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=6, help="GPT-2 blocks (default 6)")
    p.add_argument("--embd", type=int, default=768, help="hidden size (default 768; heads = embd // 64)")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per side per round (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--breakdown", action="store_true", help="also time the parts of squeeze's step")
    return p.parse_args(argv)


# -- data -----------------------------------------------------------------------------------------
def make_batches(n_batches: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """Contiguous blocks of Emma, as squeeze's LanguageModelingData gives training blocks."""
    tokenizer = AutoTokenizer.from_pretrained(str(squeeze.assets.locate("gpt2_tokenizer")))
    need = n_batches * batch * seq
    ids: list[int] = []
    with open(squeeze.assets.locate("austen") / "emma.txt", encoding="utf-8") as f:
        lines = f.readlines()
    for start in range(0, len(lines), 2000):  # tokenize only as much text as the batches need
        chunk = lines[start : start + 2000]
        enc = tokenizer([t if t.endswith("\n") else t + "\n" for t in chunk], add_special_tokens=False)
        ids.extend(itertools.chain.from_iterable(enc["input_ids"]))
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(
            f"emma.txt has {len(ids)} tokens, fewer than the {need} the batches need; "
            "lower --rounds/--steps/--batch/--seq"
        )
    blocks = torch.tensor(ids[:need], dtype=torch.long).view(n_batches, batch, seq)
    return [{"input_ids": b.clone(), "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in blocks]


# -- timing ---------------------------------------------------------------------------------------
class Interleave(L.Callback):
    """Times squeeze's steps and, between blocks of them, runs and times the plain loop."""

    def __init__(self, plain_step, batches, warmup: int, rounds: int, steps: int):
        self.plain_step = plain_step
        self.batches = batches
        self.warmup, self.rounds, self.steps = warmup, rounds, steps
        self.hook: dict[int, list[float]] = defaultdict(list)  # round -> squeeze hook times
        self.cycle: dict[int, list[float]] = defaultdict(list)  # round -> squeeze cycle times
        self.plain: dict[int, list[float]] = defaultdict(list)  # round -> plain step times
        self.squeeze_losses: list[float] = []
        self.plain_losses: list[torch.Tensor] = []
        self.plain_done = 0
        self.threads_seen: int | None = None
        self._resume = self._start = 0.0

    def on_train_start(self, trainer, pl_module):
        self.threads_seen = torch.get_num_threads()
        self._resume = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        end = time.perf_counter()
        step = trainer.global_step - 1  # already incremented by the optimizer step
        rnd = self.round_of(step)
        self.hook[rnd].append(end - self._start)
        self.cycle[rnd].append(end - self._resume)
        self.squeeze_losses.append(float(outputs["loss"]))  # outside the timed span
        if self.block_ends(step):
            self.run_plain_block(rnd, self.warmup if rnd < 0 else self.steps)
            name = "warm-up" if rnd < 0 else f"round {rnd}"
            print(
                f"  {name:<8} squeeze steps (ms): {' '.join(f'{t * 1e3:.0f}' for t in self.cycle[rnd])}   "
                f"plain steps (ms): {' '.join(f'{t * 1e3:.0f}' for t in self.plain[rnd])}",
                flush=True,
            )
        self._resume = time.perf_counter()

    def round_of(self, step: int) -> int:
        return -1 if step < self.warmup else (step - self.warmup) // self.steps

    def block_ends(self, step: int) -> bool:
        return step == self.warmup - 1 or (step >= self.warmup and (step - self.warmup) % self.steps == self.steps - 1)

    def run_plain_block(self, rnd: int, n: int) -> None:
        for _ in range(n):
            batch = self.batches[self.plain_done]
            start = time.perf_counter()
            loss = self.plain_step(batch)
            self.plain[rnd].append(time.perf_counter() - start)
            self.plain_losses.append(loss)
            self.plain_done += 1


class Breakdown:
    """Wraps the parts of squeeze's step from outside (no squeeze code changed) and sums their time."""

    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)
        self.active = False

    def wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.active:
                    self.total[label] += time.perf_counter() - start
                    self.count[label] += 1

        setattr(obj, name, timed)

    def install(self, module: L.LightningModule, optimizer_holder: dict) -> None:
        for name in (
            "forward",
            "check_finite",
            "log",
            "training_step",
            "backward",
            "optimizer_zero_grad",
            "optimizer_step",
        ):
            self.wrap(module, name, name)
        # Lightning calls AdamW.step(closure): the closure (training_step, zero_grad, backward) runs inside.
        optimizer_holder["wrap"] = lambda opt: self.wrap(opt, "step", "AdamW.step")


def summarize(name: str, times: list[float]) -> str:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return (
        f"{name:<16} median {statistics.median(times) * 1e3:9.1f} ms   min {min(times) * 1e3:9.1f}   "
        f"max {max(times) * 1e3:9.1f}   IQR {(q[2] - q[0]) * 1e3:7.1f} ms   (n={len(times)})"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    total = args.warmup + args.rounds * args.steps

    batches = make_batches(total, args.batch, args.seq)
    config = GPT2Config(
        n_layer=args.layers, n_embd=args.embd, n_head=args.embd // 64, n_positions=1024, vocab_size=50257
    )
    model = GPT2LMHeadModel(config)
    plain_model = copy.deepcopy(model)  # identical init weights, before either side trains
    plain_model.train()
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=5e-5)

    def plain_step(batch):
        loss = plain_model(**batch).loss
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad()  # set_to_none=True, as Lightning's default
        return loss.detach()

    holder: dict = {}

    def make_optimizer(params):
        opt = torch.optim.AdamW(params, lr=5e-5)
        if "wrap" in holder:
            holder["wrap"](opt)
        return opt

    module = squeeze.tasks.lm.CausalLM(model, optimizer=make_optimizer)
    breakdown = Breakdown() if args.breakdown else None
    if breakdown:
        breakdown.install(module, holder)

    timer = Interleave(plain_step, batches, args.warmup, args.rounds, args.steps)
    callbacks: list[L.Callback] = [timer]
    if breakdown:

        class Gate(L.Callback):  # count only timed (non-warm-up) squeeze steps
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                breakdown.active = trainer.global_step >= args.warmup

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                breakdown.active = False

        callbacks.insert(0, Gate())

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    loader = DataLoader(batches, batch_size=None, shuffle=False)  # the fixed batches, in order
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: GPT2LMHeadModel n_layer={args.layers} n_embd={args.embd} n_head={args.embd // 64} "
        f"vocab=50257, {n_params / 1e6:.1f}M params, fp32, random init"
    )
    print(f"batch: {args.batch} x {args.seq} tokens of emma.txt (GPT-2 tokenizer); AdamW lr 5e-5; CPU")
    print(
        f"schedule: {args.warmup} warm-up steps each side, then {args.rounds} rounds x {args.steps} steps "
        f"each side, squeeze block then plain block"
    )
    print(
        f"torch {torch.__version__}, lightning {L.__version__}; torch threads {torch.get_num_threads()}; "
        f"os.cpu_count() {os.cpu_count()}; load average before {os.getloadavg()[0]:.2f} "
        "(the CPU may be shared with another process)"
    )
    wall = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    wall = time.perf_counter() - wall
    print(
        f"threads inside the Trainer: {timer.threads_seen}; load average after {os.getloadavg()[0]:.2f}; "
        f"fit wall {wall:.1f} s"
    )

    rounds = range(args.rounds)
    hook = [t for r in rounds for t in timer.hook[r]]
    cycle = [t for r in rounds for t in timer.cycle[r]]
    plain = [t for r in rounds for t in timer.plain[r]]
    if len(hook) != args.rounds * args.steps or len(plain) != args.rounds * args.steps:
        print(
            f"warning: timed {len(hook)} squeeze and {len(plain)} plain steps, expected {args.rounds * args.steps} each"
        )
    print()
    print(summarize("plain", plain))
    print(summarize("squeeze (hook)", hook))
    print(summarize("squeeze (cycle)", cycle))
    print()
    med_plain = statistics.median(plain)
    ratio_hook = statistics.median(hook) / med_plain
    ratio_cycle = statistics.median(cycle) / med_plain
    print("per round   plain ms   squeeze hook ms   squeeze cycle ms   ratio hook   ratio cycle")
    per_round_hook, per_round_cycle = [], []
    for r in rounds:
        p, h, c = (statistics.median(x[r]) for x in (timer.plain, timer.hook, timer.cycle))
        per_round_hook.append(h / p)
        per_round_cycle.append(c / p)
        print(f"  {r:>5}   {p * 1e3:9.1f}   {h * 1e3:15.1f}   {c * 1e3:16.1f}   {h / p:10.3f}   {c / p:11.3f}")
    print()
    print(f"ratio squeeze/plain (median step): hook {ratio_hook:.3f}, cycle {ratio_cycle:.3f}  (goal <= 1.03)")
    print(
        f"  per-round ratios: hook {min(per_round_hook):.3f}..{max(per_round_hook):.3f}, "
        f"cycle {min(per_round_cycle):.3f}..{max(per_round_cycle):.3f}"
    )
    print(
        f"  median extra per step: hook {(statistics.median(hook) - med_plain) * 1e3:+.1f} ms, "
        f"cycle {(statistics.median(cycle) - med_plain) * 1e3:+.1f} ms"
    )
    verdict = "within" if ratio_cycle <= 1.03 else "ABOVE"
    print(f"  {verdict} the 1.03 goal (cycle ratio)")

    pl = [float(x) for x in timer.plain_losses]
    sq = timer.squeeze_losses
    print(f"sanity: loss first/last step  squeeze {sq[0]:.3f} -> {sq[-1]:.3f}   plain {pl[0]:.3f} -> {pl[-1]:.3f}")

    if breakdown:
        n = args.rounds * args.steps
        t = {k: v / n * 1e3 for k, v in breakdown.total.items()}  # ms per timed step
        g = lambda k: t.get(k, 0.0)
        print()
        print(f"breakdown of squeeze's timed steps (mean ms per step over {n} steps; indented = inside):")
        print(f"  hook window (on_train_batch_start -> end)    {sum(hook) / n * 1e3:10.3f}")
        print(f"    optimizer_step hook                        {g('optimizer_step'):10.3f}")
        print(f"      AdamW.step, closure included             {g('AdamW.step'):10.3f}")
        print(f"        training_step                          {g('training_step'):10.3f}")
        print(f"          forward (model + loss)               {g('forward'):10.3f}")
        print(f"          check_finite (loss.item())           {g('check_finite'):10.3f}")
        print(f"          self.log('train/loss')               {g('log'):10.3f}")
        print(f"        optimizer_zero_grad (in the closure)   {g('optimizer_zero_grad'):10.3f}")
        print(f"        backward                               {g('backward'):10.3f}")
        adam = g("AdamW.step") - g("training_step") - g("optimizer_zero_grad") - g("backward")
        print(f"        = AdamW update itself                  {adam:10.3f}")
        rest_ts = g("training_step") - g("forward") - g("check_finite") - g("log")
        print(f"        training_step minus its parts          {rest_ts:10.3f}")
        print(f"    hook window minus optimizer_step (loop)    {sum(hook) / n * 1e3 - g('optimizer_step'):10.3f}")
        print(
            f"  cycle minus hook window (fetch, transfer, scheduler, bookkeeping) "
            f"{(sum(cycle) - sum(hook)) / n * 1e3:8.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
