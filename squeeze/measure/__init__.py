"""Performance of a model: latency per batch, throughput, peak memory per batch size, decoding speed,
and the training throughput of a fit.

Latency is the wall time of one forward pass (no labels, no gradients) on real test examples, after
warm-up passes, repeated; the median is reported with the 10th/90th percentiles so a noisy machine shows
as spread instead of a wrong number. On a GPU every timing waits for the device (`synchronize`): CUDA
calls return before the work is done.

Peak memory per batch size is taken over that batch size's timed passes: on a GPU the most memory
allocated by tensors (`max_memory_allocated`, after `reset_peak_memory_stats`); on CPU the process's
resident set high-water mark (Linux: VmHWM, reset before the batch through /proc/self/clear_refs, so
nothing perturbs the timing; elsewhere the resident set sampled every millisecond). The CPU figure is the
whole process (weights, data, Python, allocator caches), so `peak_increase_bytes` (peak minus what was
resident just before) is the batch's own working memory.

Decoding speed is greedy `generate` of exactly `new_tokens` tokens from the first tokens of real test
examples, timed like latency; models that cannot generate (encoders, classification heads) skip it.

Training throughput at fixed batch sizes (perf.train_batch_sizes, `measure_training`) is one optimizer step on
real test examples with their labels, on a copy of the model in train mode, timed like latency; a model that
cannot be trained (integer weights, nothing trainable) gets the reason instead of figures.

A run's own figures (result.json `perf`, `peak_memory_bytes`): `of_run`, `peak_memory`. Beside this module:
squeeze.measure.energy (energy and CO2 per phase, the run's EnergyMeter callback) and
squeeze.measure.speculative (speculative decoding against plain decoding).

Comparing rows of a sweep: squeeze.measure.side_by_side (`python -m squeeze.measure DIR`) times several saved
models in one process, in interleaved rounds, with these helpers.
"""

from __future__ import annotations

import copy
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from squeeze.config import train_batch_sizes
from squeeze.errors import SqueezeError

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def time_call(fn: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None] = lambda: None) -> dict:
    """Median and spread of `repeats` timed calls of `fn`, after `warmup` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise SqueezeError(f"perf.repeats={repeats} must be ≥ 1 and perf.warmup={warmup} ≥ 0")
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return {
        "median_s": statistics.median(times),
        "p10_s": _quantile(times, 0.1),
        "p90_s": _quantile(times, 0.9),
        "mean_s": statistics.fmean(times),
        "repeats": repeats,
    }


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values."""
    pos = q * (len(sorted_values) - 1)
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def example_batch(dataloader, batch_size: int, keys: Sequence[str] = INPUT_KEYS) -> dict[str, torch.Tensor]:
    """The first `batch_size` test examples, collated as the test loader collates them (only `keys`)."""
    dataset = dataloader.dataset
    if len(dataset) < batch_size:
        # Repeat examples rather than measure a smaller batch than the one asked for.
        indices = [i % len(dataset) for i in range(batch_size)]
    else:
        indices = list(range(batch_size))
    batch = dataloader.collate_fn([dataset[i] for i in indices])
    return {k: v for k, v in batch.items() if k in keys}


def perf_devices(asked) -> list[str] | None:
    """perf.devices as a list (None: the run's device); `all`: the CPU and, where one is visible, the GPU. Checked
    before a run loads anything (squeeze.config), as perf is measured only after training and testing."""
    if asked is None:
        return None
    if asked == "all":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if isinstance(asked, str) or not all(isinstance(d, str) for d in asked):
        raise SqueezeError(f"perf.devices={asked!r}: give a list ([cpu], [cpu,cuda]), all, or null for the run's device")
    return list(asked)


def of_run(model: torch.nn.Module, data, perf: Mapping[str, Any], device: str) -> dict[str, Any]:
    """result.json's `perf`: the tested (and saved) model timed on the run's `device`, or on each of
    perf.devices (the first one's figures at the top level, each one's under by_device and its own name);
    perf.devices=all: the CPU and, where one is visible, the GPU (a table's CPU and GPU latency side by side)."""
    devices = perf_devices(perf.get("devices")) or [device]
    by_device = {
        d: measure_inference(model, data.test_dataloader(), list(perf["batch_sizes"]), int(perf["warmup"]),
                             int(perf["repeats"]), d, decode_settings(perf))
        for d in devices
    }
    train_sizes = train_batch_sizes(perf)
    if train_sizes:
        for d in devices:
            by_device[d]["train"] = measure_training(model, data.test_dataloader(), train_sizes, int(perf["warmup"]),
                                                     int(perf["repeats"]), d)
    figures = dict(by_device[devices[0]])  # a copy: by_device holds the original
    if len(by_device) > 1:
        figures["by_device"] = by_device
    figures.update({d: measured[d] for d, measured in by_device.items()})
    return figures


def measure_inference(
    model: torch.nn.Module,
    dataloader,
    batch_sizes: Sequence[int] = (1, 16),
    warmup: int = 3,
    repeats: int = 10,
    device: str = "cpu",
    decode: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Latency per batch size and throughput at the largest one, on `device`; under the key `device`,
    peak memory per batch size and greedy decoding speed (`decode`: the keyword arguments of
    measure_decoding; None skips decoding)."""
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise SqueezeError(f"perf.batch_sizes={list(batch_sizes)} must be positive integers")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SqueezeError(f"perf on {device} asked for, but no CUDA device is visible; use perf.devices=[cpu]")
    was_training = model.training
    original = next(model.parameters()).device
    model.eval().to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    process_peak = process_peak_rss()  # before the per-batch resets below
    latency, tokens, memory = {}, {}, {}
    decoding = None
    try:
        with torch.inference_mode():
            for size in sorted(set(batch_sizes)):
                batch = {k: v.to(device) for k, v in example_batch(dataloader, size).items()}
                with PeakMemory(device) as peak:
                    latency[f"batch_{size}"] = time_call(lambda: model(**batch), warmup, repeats, sync)
                memory[f"batch_{size}"] = peak.record()
                mask = batch.get("attention_mask")
                tokens[size] = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            if decode is not None and can_generate(model):
                decoding = measure_decoding(model, dataloader, device=device, **decode)
    finally:
        model.to(original)
        model.train(was_training)
    largest = max(batch_sizes)
    seconds = latency[f"batch_{largest}"]["median_s"]
    out = {
        "device": device,
        "threads": torch.get_num_threads(),
        "latency": latency,
        "throughput": {
            "batch_size": largest,
            "examples_per_s": largest / seconds,
            "tokens_per_s": tokens[largest] / seconds,
        },
        "warmup": warmup,
    }
    if device.startswith("cuda"):
        # The most allocated over all batch sizes (each was reset before its own timing).
        out["peak_memory_bytes"] = max(m["peak_memory_bytes"] for m in memory.values())
        out["peak_memory_kind"] = "cuda_max_allocated"
    else:
        out["peak_memory_bytes"], out["peak_memory_kind"] = max(process_peak, process_peak_rss()), "cpu_rss"
    out[device] = {
        **memory,
        "decode_tokens_per_s": None if decoding is None else
        {name: timing["tokens_per_s"] for name, timing in decoding["latency"].items()},
        "decode": decoding,
    }
    return out


# -- decoding -----------------------------------------------------------------------------------------
def can_generate(model: torch.nn.Module) -> bool:
    """A model `generate` can decode with (a causal LM head, not an encoder or a classifier)."""
    check = getattr(model, "can_generate", None)
    return bool(check()) if callable(check) else False


def decode_prompts(dataloader, batch_size: int, prompt_tokens: int) -> torch.Tensor:
    """(batch_size, length) prompt ids: the first tokens of the first test examples, all cut to the
    shortest of them (at most `prompt_tokens`), so the batch needs no padding."""
    batch = example_batch(dataloader, batch_size)
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    rows = [row[keep] for row, keep in zip(ids, mask)]
    length = min(prompt_tokens, *(len(r) for r in rows))
    if length < 1:
        raise SqueezeError("decoding speed: a test example has no tokens to prompt with")
    return torch.stack([r[:length] for r in rows])


def decode_settings(perf: Mapping[str, Any]) -> dict[str, Any] | None:
    """measure_decoding's arguments from the `perf` config; None when perf.decode_batch_sizes is empty."""
    sizes = perf.get("decode_batch_sizes", (1, 12))
    if not sizes:
        return None
    return {"batch_sizes": [int(b) for b in sizes], "new_tokens": int(perf.get("decode_new_tokens", 32)),
            "prompt_tokens": int(perf.get("decode_prompt_tokens", 32)), "repeats": int(perf.get("decode_repeats", 3)),
            "warmup": min(1, int(perf.get("warmup", 1)))}


def measure_decoding(
    model: torch.nn.Module,
    dataloader,
    batch_sizes: Sequence[int] = (1, 12),
    new_tokens: int = 32,
    prompt_tokens: int = 32,
    warmup: int = 1,
    repeats: int = 3,
    device: str = "cpu",
) -> dict[str, Any]:
    """Greedy decoding of exactly `new_tokens` tokens per prompt (no early stop at end-of-text), timed per
    batch size: new tokens per second = batch size × new_tokens / median seconds, prompt included."""
    if any(b < 1 for b in batch_sizes) or new_tokens < 1 or prompt_tokens < 1:
        raise SqueezeError(f"perf.decode_batch_sizes={list(batch_sizes)}, perf.decode_new_tokens={new_tokens} and "
                           f"perf.decode_prompt_tokens={prompt_tokens} must be positive")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    config = getattr(model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "num_beams": 1,
                "pad_token_id": pad}
    latency: dict[str, Any] = {}
    for size in sorted(set(batch_sizes)):
        prompts = decode_prompts(dataloader, size, prompt_tokens).to(device)
        mask = torch.ones_like(prompts)
        produced: list[int] = []

        def generate():
            out = model.generate(input_ids=prompts, attention_mask=mask, **settings)
            produced.append(out.shape[1] - prompts.shape[1])

        with PeakMemory(device) as peak:
            timing = time_call(generate, warmup, repeats, sync)
        if produced[-1] != new_tokens:
            raise SqueezeError(f"decoding speed: generate made {produced[-1]} tokens, not {new_tokens}")
        latency[f"batch_{size}"] = {**timing, "prompt_tokens": prompts.shape[1],
                                    "tokens_per_s": size * new_tokens / timing["median_s"], **peak.record()}
    return {"new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "warmup": warmup, "latency": latency}


# -- training throughput at fixed batch sizes ---------------------------------------------------------
def untrainable(model: torch.nn.Module) -> str | None:
    """Why an optimizer step cannot train `model` as it is (integer weights, nothing trainable), else None."""
    params = list(model.named_parameters())
    integer = [name for name, p in params if not p.is_floating_point()]
    if integer:
        return (f"integer weights take no gradient ({len(integer)} integer parameter tensors, e.g. {integer[0]}): "
                "the model cannot be trained as saved")
    if not any(p.requires_grad for _, p in params):
        return "no trainable parameter (every parameter has requires_grad=False)"
    return None


def measure_training(
    model: torch.nn.Module,
    dataloader,
    batch_sizes: Sequence[int],
    warmup: int = 3,
    repeats: int = 10,
    device: str = "cpu",
    lr: float = 1e-5,
) -> dict[str, Any]:
    """Training throughput per batch size: {batch_<n>: {median_s, p10_s, p90_s, mean_s, repeats, tokens,
    tokens_per_s, examples_per_s}}, or {"reason": why} for a model that cannot be trained.

    What one timed call is: forward of the first n test examples with their labels (the task's collated labels:
    for a causal LM the input ids, padding ignored; for classification the class labels), the loss's backward,
    `torch.optim.AdamW.step()` (torch's default implementation for the device) and `zero_grad(set_to_none=True)`.
    It runs on a deep copy of the model in train mode (dropout on), in the model's own dtype (no autocast, whatever
    the run's trainer.precision), so the measured model is untouched; AdamW's state is created in the first step
    (a warm-up one when warmup ≥ 1). Tokens are the batch's non-padding input tokens. A batch size that fails (out
    of memory, a layer without a backward) gets its own reason; the others keep their figures."""
    sizes = sorted(set(batch_sizes))
    if not sizes or any(b < 1 for b in sizes):
        raise SqueezeError(f"perf.train_batch_sizes={list(batch_sizes)} must be positive integers")
    reason = untrainable(model)
    if reason is not None:
        return {"reason": reason}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    trained = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=lr)
    out: dict[str, Any] = {"optimizer": "AdamW", "device": device}
    try:
        for size in sizes:
            batch = {k: v.to(device) for k, v in example_batch(dataloader, size, (*INPUT_KEYS, "labels")).items()}
            if "labels" not in batch:  # a causal LM's target is its input; padding is not scored
                mask = batch.get("attention_mask")
                labels = batch["input_ids"].clone()
                batch["labels"] = labels if mask is None else labels.masked_fill(mask == 0, -100)

            def step():
                loss = trained(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            try:
                timing = time_call(step, warmup, repeats, sync)
            # Out of memory, a layer without a backward, a forward that takes no labels or returns no loss.
            except (RuntimeError, NotImplementedError, TypeError, AttributeError) as e:
                optimizer.zero_grad(set_to_none=True)
                out[f"batch_{size}"] = {"reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                continue
            tokens = int(batch_tokens(batch))
            out[f"batch_{size}"] = {**timing, "tokens": tokens, "tokens_per_s": tokens / timing["median_s"],
                                    "examples_per_s": size / timing["median_s"]}
    finally:
        del trained, optimizer
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


# -- memory ------------------------------------------------------------------------------------------
_peak_before_resets = 0  # the process's peak RSS before PeakMemory first reset the kernel's high-water mark


def process_peak_rss() -> int:
    # ru_maxrss is KiB on Linux: the process's peak resident set so far (model, data and all). Resetting
    # the high-water mark (PeakMemory) lowers it, so the peak seen before the resets is kept.
    return max(_peak_before_resets, int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024)


def peak_memory() -> tuple[int, str]:
    """The run's peak memory so far and its kind: tensors on the GPU when it was used, else the process."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    return process_peak_rss(), "cpu_rss"


def _proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset the process's resident-set high-water mark (Linux ≥ 4.0); False where that is not possible."""
    global _peak_before_resets
    _peak_before_resets = process_peak_rss()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def memory_after_load(model: torch.nn.Module) -> dict[str, Any]:
    """What the loaded model occupies, right after loading: on a GPU the tensors allocated there
    (`cuda_allocated`); on CPU its parameters' and buffers' bytes (`cpu_tensors`, what a GPU would count),
    because the process's resident set (kept beside it, `rss_bytes`) also holds whatever earlier cells of a
    sweep left in the same process and the allocator's caches, and so does not tell the rows apart."""
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cuda":
        used, kind = int(torch.cuda.memory_allocated(param.device)), "cuda_allocated"
    else:
        tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()  # tied weights once
        used, kind = sum(t.numel() * t.element_size() for t in tensors), "cpu_tensors"
    return {"bytes": used, "kind": kind, "rss_bytes": current_rss()}


def current_rss() -> int | None:
    """The process's resident set now, in bytes (None where it cannot be read)."""
    rss = _proc_status_bytes("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil  # not a dependency: only where /proc is missing (macOS)

        return int(psutil.Process().memory_info().rss)
    except Exception:  # no psutil, or it cannot read the process
        return None


class PeakMemory:
    """Peak memory while the block runs (see the module docstring): `record()` gives peak_memory_bytes,
    peak_increase_bytes (the peak minus what was in use at the start) and peak_memory_kind."""

    def __init__(self, device: str = "cpu", sample_every_s: float = 0.001):
        self.device, self.sample_every_s = device, sample_every_s
        self.before = self.peak = None
        self.kind = "unavailable"
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before, self.kind = int(torch.cuda.memory_allocated(self.device)), "cuda_max_allocated"
            return self
        self.before = current_rss()
        if self.before is None:
            return self
        if _reset_rss_peak():
            self.kind = "cpu_rss"
        else:
            self.kind, self.peak = "cpu_rss_sampled", self.before
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_every_s):
            rss = current_rss()
            if rss is not None and rss > self.peak:
                self.peak = rss

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self.kind == "cpu_rss":
            self.peak = _proc_status_bytes("VmHWM")
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.peak = max(self.peak, current_rss() or 0)

    def record(self) -> dict[str, Any]:
        if self.peak is None or self.before is None:
            return {"peak_memory_bytes": None, "peak_increase_bytes": None, "peak_memory_kind": self.kind}
        return {"peak_memory_bytes": int(self.peak), "peak_increase_bytes": max(0, int(self.peak - self.before)),
                "peak_memory_kind": self.kind}


# -- training -----------------------------------------------------------------------------------------
def batch_tokens(batch: Mapping[str, Any]) -> int | torch.Tensor:
    """Non-padding input tokens of a batch (the attention mask's ones; every input id without a mask)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is not None:
        return mask.sum()
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    return ids.numel() if ids is not None else 0


def tokens_per_s(tokens: int | None, seconds: float | None) -> float | None:
    if not tokens or not seconds:
        return None
    return tokens / seconds
