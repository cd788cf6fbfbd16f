"""Inference performance of a model: latency per batch, throughput, peak memory.

Latency is the wall time of one forward pass (no labels, no gradients) on real test examples, after
warm-up passes, repeated; the median is reported with the 10th/90th percentiles so a noisy machine shows
as spread instead of a wrong number. On a GPU every timing waits for the device (`synchronize`): CUDA
calls return before the work is done.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any, Callable, Sequence

import torch

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


def example_batch(dataloader, batch_size: int) -> dict[str, torch.Tensor]:
    """The first `batch_size` test examples, collated as the test loader collates them."""
    dataset = dataloader.dataset
    if len(dataset) < batch_size:
        # Repeat examples rather than measure a smaller batch than the one asked for.
        indices = [i % len(dataset) for i in range(batch_size)]
    else:
        indices = list(range(batch_size))
    batch = dataloader.collate_fn([dataset[i] for i in indices])
    return {k: v for k, v in batch.items() if k in INPUT_KEYS}


def measure_inference(
    model: torch.nn.Module,
    dataloader,
    batch_sizes: Sequence[int] = (1, 16),
    warmup: int = 3,
    repeats: int = 10,
    device: str = "cpu",
) -> dict[str, Any]:
    """Latency per batch size and throughput at the largest one, on `device`."""
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise SqueezeError(f"perf.batch_sizes={list(batch_sizes)} must be positive integers")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SqueezeError(f"perf on {device} asked for, but no CUDA device is visible; use perf.devices=[cpu]")
    was_training = model.training
    original = next(model.parameters()).device
    model.eval().to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    latency, tokens = {}, {}
    try:
        with torch.inference_mode():
            for size in sorted(set(batch_sizes)):
                batch = {k: v.to(device) for k, v in example_batch(dataloader, size).items()}
                latency[f"batch_{size}"] = time_call(lambda: model(**batch), warmup, repeats, sync)
                mask = batch.get("attention_mask")
                tokens[size] = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
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
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        out["peak_memory_kind"] = "cuda_max_allocated"
    else:
        out["peak_memory_bytes"], out["peak_memory_kind"] = process_peak_rss(), "cpu_rss"
    return out


def process_peak_rss() -> int:
    # ru_maxrss is KiB on Linux: the process's peak resident set so far (model, data and all).
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
