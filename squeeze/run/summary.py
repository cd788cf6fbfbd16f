"""What a finished run says in brief: the lines printed at its end, and its figures as flat metric names
for loggers."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_only


def headline_figures(record: dict[str, Any]) -> dict[str, float]:
    """The record's figures as flat metric names (`result/…`, `perf/…`, `energy/…`, `cost/…`) for loggers."""
    out = {f"result/{k}": record[k] for k in ("params", "nonzero_params", "checkpoint_bytes", "sparsity",
                                               "train_seconds", "eval_seconds", "compress_seconds",
                                               "peak_memory_bytes") if record.get(k) is not None}
    if (record.get("validation") or {}).get("best") is not None:  # the model tested: fit's best, or its own pass
        out["result/validation_best"] = record["validation"]["best"]
    out.update({k: v for k, v in record["metrics"].items()})
    perf = record.get("perf") or {}
    for name, timing in perf.get("latency", {}).items():
        out[f"perf/latency_{name}_ms"] = timing["median_s"] * 1000
    for name, value in perf.get("throughput", {}).items():
        out[f"perf/{name}"] = value
    on_device = perf.get(perf.get("device"), {}) if perf else {}  # the run's device: per batch size
    for name, figures in on_device.items():
        if name.startswith("batch_") and figures.get("peak_memory_bytes") is not None:
            out[f"perf/peak_memory_{name}_bytes"] = figures["peak_memory_bytes"]
    for name, value in (on_device.get("decode_tokens_per_s") or {}).items():
        out[f"perf/decode_tokens_per_s_{name}"] = value
    if record.get("train_tokens_per_s") is not None:
        out["perf/train_tokens_per_s"] = record["train_tokens_per_s"]
    energy = record.get("energy") or {}
    if energy:
        out["energy/kwh"], out["energy/co2_kg"] = energy["kwh"], energy["co2_kg"]
    cost = record.get("cost") or {}
    for part in ("own", "total"):
        for unit in ("seconds", "kwh"):
            if (cost.get(part) or {}).get(unit) is not None:
                out[f"cost/{part}_{unit}"] = cost[part][unit]
    inference = cost.get("inference") or {}
    if inference.get("kwh_per_1k") is not None:
        out[f"cost/inference_kwh_per_1k_{inference['unit']}"] = inference["kwh_per_1k"]
    return {k: float(v) for k, v in out.items()}


def headline_text(record: dict[str, Any]) -> dict[str, str]:
    """The record's outcome in words, for loggers that keep text (W&B summaries): its status, the error line of a
    run that did not finish, and how its energy was measured ("measured", "estimated", "partly measured")."""
    out = {"status": str(record["status"])}
    if record.get("error"):
        out["error"] = str(record["error"])
    method = (record.get("energy") or {}).get("method")
    if method:
        out["energy/method"] = str(method)
    return out


@rank_zero_only
def print_summary(record: dict[str, Any]) -> None:
    print(summary(record))


def summary(record: dict[str, Any]) -> str:
    """What a person wants to see at the end of a run."""
    if record["status"] != "ok":
        return f"run failed: {record['error']}\nrecord: {record['run_dir']}/result.json"
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(record["metrics"].items()))
    lines = [f"test: {metrics}"]
    if record.get("perplexity"):
        p = record["perplexity"]
        if p.get("last_word"):
            w = p["last_word"]
            lines.append(f"last word: {w['passages']} passages scored one by one (up to {w['max_length']} tokens, "
                         f"{w['truncated']} cut); perplexity {w['perplexity']}")
        elif p.get("multiple_choice"):
            m = p["multiple_choice"]
            lines.append(f"multiple choice: {m.get('examples')} examples, {m.get('endings')} endings scored "
                         f"({m['score']})")
        else:
            lines.append(f"perplexity protocol: {p['protocol']} (block {p['block_size']}, stride {p['stride']})")
    lines.append(f"record: {record['run_dir']}/result.json")
    return "\n".join(lines)
