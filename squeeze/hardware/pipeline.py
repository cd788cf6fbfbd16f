"""Pipeline parallelism (`hardware=pipeline`): a causal LM cut into N stages of consecutive layers, one
process per stage, micro-batches through torch's own schedules (torch.distributed.pipelining: GPipe
or 1F1B). Causal-LM fine-tuning only; the record gets the mean training loss, tokens/s (over the whole run,
and over a window of iterations past the warm-up: pipeline.window) and every stage's peak memory, and the
stages' trained weights come back to the parent as one model, which the run tests, saves and measures like
any other (squeeze.run).

torch does the scheduling and the stage-to-stage sends; what is written here is the cut, which torch
cannot do on a transformers model without tracing it: every stage keeps the model's own forward, fed
with input ids on the first stage and with the previous stage's hidden states (`inputs_embeds`) on the
others. Position embeddings and embedding dropout, which that forward applies to `inputs_embeds`, are
neutralised after the first stage, and the final norm and head run on the last stage only. A head tied
to the input embeddings (GPT-2) lives on the first and the last stage: their gradients are summed between
the two before every step, so both copies stay the one tensor a single process trains.
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from squeeze.errors import SqueezeError

SCHEDULES = ("gpipe", "1f1b")  # interleaved schedules are left out: over gloo they have been reported to hang


class Stage(nn.Module):
    """Layers [start, stop) of a causal LM, with the embeddings on the first stage and norm + head on the last."""

    def __init__(self, model: nn.Module, start: int, stop: int, first: bool, last: bool):
        super().__init__()
        from squeeze.arch import adapter_for
        from squeeze.arch.linear import replace_module

        model = copy.deepcopy(model)
        model.config.use_cache = False
        adapter = adapter_for(model)
        name, stack = adapter.layer_stack(model)
        replace_module(model, name, nn.ModuleList(list(stack)[start:stop]))
        positions, dropout, norm = (adapter.position_embeddings(model), adapter.embedding_dropout(model),
                                    adapter.final_norm(model))
        if not first and positions:  # positions were added on stage 0: add zeros (the forward still adds them)
            zero = copy.deepcopy(model.get_submodule(positions)).requires_grad_(False)
            nn.init.zeros_(zero.weight)
            replace_module(model, positions, zero)
        if not first and dropout:  # the embedding dropout, applied on stage 0
            replace_module(model, dropout, nn.Identity())
        if not last and norm:  # the final norm belongs to the last stage
            replace_module(model, norm, nn.Identity())
        self.model, self.first, self.last = model, first, last
        self.base = model.get_submodule(model.base_model_prefix)
        self.start, self.stack_name = start, name
        tokens = model.get_input_embeddings()
        self.embedding_prefixes = tuple(f"{n}." for n, m in model.named_modules() if m is tokens or n == positions)

    def owned_state(self) -> dict[str, torch.Tensor]:
        """The weights this stage trained, named as in the whole model: its layers (renumbered from `start`),
        the embeddings on the first stage, the rest (final norm, head) on the last."""
        state, prefix = {}, self.stack_name + "."
        for key, value in self.model.state_dict().items():
            if key.startswith(prefix):
                index, rest = key[len(prefix):].split(".", 1)
                state[f"{prefix}{int(index) + self.start}.{rest}"] = value
            elif key.startswith(self.embedding_prefixes):
                if self.first:
                    state[key] = value
            elif self.last:
                state[key] = value
        return state

    def tied_weight(self) -> nn.Parameter | None:
        """The input embedding on the first stage, the output head on the last, when the model ties the two."""
        head, embeddings = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if head is None or head.weight is not embeddings.weight:
            return None
        return embeddings.weight if self.first else head.weight if self.last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": x} if self.first else {"inputs_embeds": x}
        if self.last:
            return self.model(**inputs, use_cache=False).logits
        return self.base(**inputs, use_cache=False).last_hidden_state


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: token t predicts token t+1, mean over the scored tokens."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                       labels[:, 1:].reshape(-1), ignore_index=-100)


def bounds(layers: int, stages: int) -> list[tuple[int, int]]:
    """Consecutive layer ranges, as even as possible, earlier stages taking the remainder."""
    if not 1 <= stages <= layers:
        raise SqueezeError(f"hardware.pipeline.stages={stages}: the model has {layers} layers; use 1..{layers} stages")
    size, extra = divmod(layers, stages)
    out, start = [], 0
    for i in range(stages):
        stop = start + size + (i < extra)
        out.append((start, stop))
        start = stop
    return out


def check_window(window) -> tuple[int, int] | None:
    """pipeline.window as (first, last): iterations counted from 1, both included; None (null) skips it."""
    if window is None:
        return None
    if (isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in window)
            or not 1 <= window[0] <= window[1]):
        raise SqueezeError(f"pipeline.window={window!r} must be [first, last] iterations, counted from 1 and both "
                           "included, with 1 ≤ first ≤ last (e.g. [20, 40]), or null")
    return int(window[0]), int(window[1])


def window_figures(window: tuple[int, int] | None, batches: list[dict[str, torch.Tensor]], begin: float,
                   ends: list[float]) -> dict[str, Any] | None:
    """Throughput over iterations first..last (from 1, both included): their tokens over the wall time from the
    end of iteration first-1 (the start of the loop for first=1) to the end of iteration last; tokens_per_s None,
    with the reason, when the run is shorter than the window."""
    if window is None:
        return None
    first, last = window
    if len(ends) < last:
        return {"iterations": [first, last], "tokens_per_s": None, "seconds": None, "tokens": None,
                "reason": f"the run has {len(ends)} iterations, fewer than the window's last ({last}); "
                          f"give trainer.max_steps ≥ {last}"}
    seconds = ends[last - 1] - (ends[first - 2] if first > 1 else begin)
    tokens = sum(int(b["input_ids"].numel()) for b in batches[first - 1:last])
    return {"iterations": [first, last], "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def check(head: str, chain: list) -> None:
    if head != "causal_lm":
        raise SqueezeError(f"hardware=pipeline trains causal language models only; this task's head is {head}")
    if chain:
        raise SqueezeError(f"hardware=pipeline runs plain fine-tuning; compress={'+'.join(c.name for c in chain)} "
                           "needs the whole model in one process (use hardware=cpu, gpu or ddp)")



def train_batches(data, max_steps: int) -> list[dict[str, torch.Tensor]]:
    """The task's training batches, taken up front (every stage process gets them): `max_steps` of them, or
    one epoch's when max_steps is -1."""
    data.setup("fit")
    return [b for _, b in zip(range(max_steps) if max_steps > 0 else iter(int, 1), data.train_dataloader())]

def run(build, batches: list[dict[str, torch.Tensor]], stages: int, microbatches: int = 4, schedule: str = "gpipe",
        lr: float = 5e-5, seed: int = 0, steps: int | None = None,
        window=None) -> tuple[dict[str, Any], nn.Module]:
    """Train on `batches` (one optimizer step each) with `stages` processes; returns the record's
    `pipeline` figures and the trained model (the stages' weights in one model, built with `build()`).
    `window` ([first, last] iterations from 1, both included; None skips it): the figures' `window` holds the
    tokens/s over those iterations alone (window_figures), the slowest stage's time, past the first steps' warm-up.
    `build()` returns the model (called in every process: same seed, same weights). stages=1 runs the same
    loop in this process without pipelining, the baseline."""
    if schedule not in SCHEDULES:
        raise SqueezeError(f"hardware.pipeline.schedule={schedule!r} is not one of {list(SCHEDULES)}")
    window = check_window(window)
    steps = len(batches) if steps is None else min(steps, len(batches))
    batches = batches[:steps]
    if stages == 1:
        return _single(build, batches, lr, seed, window)
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="squeeze-pipeline-") as shards:
        results = mp.get_context("spawn").Manager().dict()
        mp.start_processes(_worker, args=(stages, port, build, batches, microbatches, schedule, lr, seed, results,
                                          shards), nprocs=stages, join=True, start_method="spawn")
        torch.manual_seed(seed)
        model = build()
        state: dict[str, torch.Tensor] = {}
        for rank in range(stages):  # weights only: files this run's own processes wrote
            state.update(torch.load(os.path.join(shards, f"stage-{rank}.pt"), map_location="cpu", weights_only=True))
        missing = set(model.state_dict()) - set(state)
        if missing:
            raise RuntimeError(f"the pipeline stages did not return {sorted(missing)[:3]}")
        model.load_state_dict(state)
    per_stage = [results[i] for i in range(stages)]
    last = per_stage[-1]
    seconds = max(s["seconds"] for s in per_stage)
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    windows = [window_figures(window, batches, s["begin"], s["ends"]) for s in per_stage]
    slowest = max(windows, key=lambda w: w["seconds"] or 0.0) if window is not None else None
    return {"stages": stages, "microbatches": microbatches, "schedule": schedule, "steps": steps,
            "batch_size": int(batches[0]["input_ids"].shape[0]),
            "losses": last["losses"], "loss": sum(last["losses"]) / len(last["losses"]),
            "train_seconds": seconds, "train_tokens": tokens, "tokens_per_s": tokens / seconds, "window": slowest,
            # The stages run on CPU processes (gloo): their peak is the process's resident set.
            "per_stage": [{"stage": i, "layers": s["layers"], "peak_memory_bytes": s["peak"],
                           "peak_memory_kind": "cpu_rss", "params": s["params"]}
                          for i, s in enumerate(per_stage)]}, model


def _single(build, batches, lr, seed, window=None) -> tuple[dict[str, Any], nn.Module]:
    from squeeze.measure import process_peak_rss

    torch.manual_seed(seed)
    model = build()
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, ends, start = [], [], time.perf_counter()
    for batch in batches:
        loss = causal_lm_loss(model(input_ids=batch["input_ids"], use_cache=False).logits, batch["input_ids"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        ends.append(time.perf_counter())
    seconds = time.perf_counter() - start
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    layers = len(_stack(model))
    return {"stages": 1, "microbatches": 1, "schedule": None, "steps": len(batches),
            "batch_size": int(batches[0]["input_ids"].shape[0]), "losses": losses,
            "loss": sum(losses) / len(losses), "train_seconds": seconds, "train_tokens": tokens,
            "tokens_per_s": tokens / seconds, "window": window_figures(window, batches, start, ends),
            "per_stage": [{"stage": 0, "layers": [0, layers], "peak_memory_bytes": process_peak_rss(),
                           "peak_memory_kind": "cpu_rss", "params": sum(p.numel() for p in model.parameters())}]}, model


def _stack(model):
    from squeeze.arch import adapter_for

    return adapter_for(model).layer_stack(model)[1]


def _worker(rank, stages, port, build, batches, microbatches, schedule, lr, seed, results, shards):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from squeeze.measure import process_peak_rss

    torch.set_num_threads(1)  # one core per stage: the point is to overlap stages, not threads
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=stages)
    try:
        torch.manual_seed(seed)
        model = build()
        start, stop = bounds(len(_stack(model)), stages)[rank]
        module = Stage(model, start, stop, first=rank == 0, last=rank == stages - 1)
        del model
        module.train()
        stage = PipelineStage(module, rank, stages, torch.device("cpu"))
        cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        pipe = cls(stage, n_microbatches=microbatches, loss_fn=causal_lm_loss)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
        # Every rank joins the group (new_group is collective); only the two holding a tied weight use it.
        tied_group = dist.new_group([0, stages - 1])
        tied = module.tied_weight()
        losses, ends = [], []  # ends: each iteration's end on this stage (the window's figures)
        dist.barrier()
        begin = time.perf_counter()
        for batch in batches:
            ids = batch["input_ids"]
            if rank == 0:
                pipe.step(ids)
            elif rank == stages - 1:
                micro: list[torch.Tensor] = []
                pipe.step(target=ids, losses=micro)
                losses.append(float(torch.stack(micro).detach().mean()))
            else:
                pipe.step()
            if tied is not None and tied.grad is not None:  # the embedding's and the head's shares of one gradient
                dist.all_reduce(tied.grad, group=tied_group)
            optimizer.step()
            optimizer.zero_grad()
            ends.append(time.perf_counter())
        dist.barrier()
        seconds = time.perf_counter() - begin
        torch.save(module.owned_state(), os.path.join(shards, f"stage-{rank}.pt"))
        results[rank] = {"seconds": seconds, "losses": losses, "begin": begin, "ends": ends, "layers": [start, stop],
                         "peak": process_peak_rss(),
                         "params": sum(p.numel() for p in module.parameters() if p.requires_grad)}
    finally:
        dist.destroy_process_group()
