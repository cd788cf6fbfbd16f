"""A sweep cell whose chain trains and then compresses after training (`compress=[imp,dq]`) starts from the finished
cell of the same sweep that trained its head alone (`compress=imp`, same model, task and training settings), as
`evaluate.py ckpt=<that cell> compress=dq` would: the [imp,dq] row is the IMP row's model quantized, not a second
IMP training of the same settings. Where no such cell has finished (it is not in the sweep, failed, or runs at the
same time on another worker) the cell trains its own, as before; `baseline.reuse=false` turns both stores off.

Its record is an evaluation of that cell's model with the whole chain's summary (the head's from the cell it
started from), the model's whole cost (that cell's training + this cell's work, `cost.total`), and `spent` its
own work only, so the report's totals count the training once; `trained_head` names the cell."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, open_dict

from squeeze import artifacts
from squeeze.compress import Compressor
from squeeze.hardware import checkpointing, sharding
from squeeze.record import RESULT_FILE, read_record
from squeeze.run import baselines

log = logging.getLogger("squeeze")
IGNORED = ("label",)  # a compressor setting that names the row, not what it trains


def split(chain: list[Compressor]) -> tuple[list[Compressor], list[Compressor]]:
    """(the training head, the post-training tail) of a chain: [imp, dq] -> ([imp], [dq]); a chain with no tail,
    no head, or a training step after a post-training one has nothing to start from ((chain, []))."""
    tail = 0
    while tail < len(chain) and chain[len(chain) - 1 - tail].after_training:
        tail += 1
    head = chain[:len(chain) - tail]
    if not tail or not head or any(c.after_training for c in head):
        return chain, []
    return head, chain[len(head):]


def _shaping(config: dict[str, Any], run_dir: str, head: list[str]) -> dict[str, Any]:
    """What makes two runs' trained models the same: the fine-tuning settings and the head's compressors' (its
    own run directory replaced, so two cells' paths compare equal)."""
    config = baselines._replace_strings(config, run_dir, baselines.RUN_PLACEHOLDER)
    compress = config.get("compress") or {}
    return {**{k: config.get(k) for k in baselines.KEY_SECTIONS},
            "compress": {name: {k: v for k, v in (compress.get(name) or {}).items() if k not in IGNORED}
                         for name in head},
            "chain": [k for k, v in compress.items() if isinstance(v, dict) and "_target_" in v]}


def shapes(config: dict[str, Any], run_dir: str, chain: list[Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the training this cell's model is the result of; the training a finished cell must have done for this one
    to start from it, None when its chain has no head and tail): finished_head's test, for squeeze.plan, which
    knows every cell of a sweep before any has run. `chain`: objects with .name and .after_training."""
    head, tail = split(chain)
    wants = None
    if tail:
        wants = _shaping(config, run_dir, [c.name for c in head])
        wants["chain"] = [c.name for c in head]
    return _shaping(config, run_dir, [c.name for c in chain]), wants


def finished_head(cfg: DictConfig, record: dict[str, Any], chain: list[Compressor], cell) -> Path | None:
    """The finished cell of this sweep that trained this cell's head alone with the same settings, or None."""
    head, tail = split(chain)
    if not tail or not cell.multirun or not cell.sweep_dir or not baselines.reuse_enabled(cfg, True):
        return None
    if cfg.get("ckpt_path") not in (None, "last_or_new") or checkpointing.last_checkpoint(cell.run_dir) is not None:
        return None  # resuming this cell's own training, on purpose or after a kill
    strategy = str(cfg.trainer.get("strategy") or "")
    if strategy.startswith("ddp") or sharding.is_sharded(strategy):  # every rank would evaluate: train as before
        return None
    names = [c.name for c in head]
    wanted = _shaping(record["config"], str(cell.run_dir), names)
    wanted["chain"] = names
    for candidate in sorted(Path(cell.sweep_dir).glob(f"*/{RESULT_FILE}"), key=_job_order):
        run_dir = candidate.parent
        if run_dir.resolve() == Path(cell.run_dir).resolve() or not (run_dir / artifacts.RUN_MODEL).is_dir():
            continue
        try:
            found = read_record(run_dir)
        except (OSError, ValueError):
            continue
        if found.get("status") == "ok" and isinstance(found.get("config"), dict) and \
                _shaping(found["config"], str(run_dir), names) == wanted:
            return run_dir
    return None


def _job_order(result: Path) -> tuple[int, str]:
    """A cell directory's place in the sweep (its hydra.job.num prefix), so the earliest such cell is taken."""
    number = result.parent.name.split("_", 1)[0]
    return (int(number) if number.isdigit() else 1 << 30, result.parent.name)


def on_finished_head(cfg: DictConfig, chain: list[Compressor], head_dir: Path, record: dict[str, Any], cell,
                     evaluate: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """The chain's tail applied to the finished head cell's model, tested, saved and measured (module docstring)."""
    head, tail = split(chain)
    started = read_record(head_dir)
    log.info("compress=%s: starting from %s, which trained %s with these settings",
             "+".join(c.name for c in chain), head_dir, "+".join(c.name for c in head))
    with open_dict(cfg):
        cfg.ckpt = str(head_dir)
        for c in head:  # the head is in the model already; evaluate applies the tail
            del cfg.compress[c.name]
    evaluate(cfg, record, cell)
    own_energy = record.get("energy")
    started_compress = started.get("compress") or {}
    record["compress"] = {"chain": [c.name for c in chain], **{c.name: started_compress.get(c.name) for c in head},
                          **{c.name: record["compress"].get(c.name) for c in tail}}
    if record.get("sparsity") is None:  # a quantizer keeps the head's zeros
        record["sparsity"] = started.get("sparsity")
    record.update(trained_head=str(head_dir), train_seconds=started.get("train_seconds"),
                  train_tokens=started.get("train_tokens"), train_tokens_per_s=started.get("train_tokens_per_s"),
                  fine_tuning_version=started.get("fine_tuning_version"),
                  validation=record.get("validation") or started.get("validation"),
                  energy=baselines.merged_energy(started.get("energy"), own_energy))
    record["spent"] = baselines.spent(baselines.Baseline(head_dir, "", started, trained_here=False), own_energy)
    return record
