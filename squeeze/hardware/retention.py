"""What a run directory keeps once its run has finished ok (`checkpoint.keep_after_success`).

Lightning's checkpoints hold the weights twice over with the optimizer state beside them (a SmolLM2 cell's
best.ckpt and last.ckpt are ~1.6 GB each, ten times its saved model): a sweep of such cells fills a disk. Once the
record says "ok", the saved model (model/) and the record are the run's result; the checkpoints only serve a
resume, which a finished run no longer needs.

  model  (default) drop checkpoints/ entirely: what stays is model/, result.json, the logs
  best   keep the best validation checkpoint (best.ckpt), drop last.ckpt and the mid-epoch / Slurm ones
  all    keep everything

A checkpoint is never dropped while it is the only copy of the trained weights: without a complete model/ the
best checkpoint stays whatever the setting says. The record says what was dropped (`checkpoints_after_success`),
written once the files are gone, so it never claims a removal that did not happen.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from squeeze.errors import SqueezeError
from squeeze.record import dir_bytes, read_record, write_record

log = logging.getLogger("squeeze")
MODES = ("model", "best", "all")
RECORD_KEY = "checkpoints_after_success"
_CHECKPOINTS = "checkpoints"
_BEST = "best"  # ModelCheckpoint's filename (conf/callbacks/default.yaml): best.ckpt


def check(keep: Any) -> str:
    if keep not in MODES:
        raise SqueezeError(f"checkpoint.keep_after_success={keep!r} is not one of {list(MODES)}; model keeps the "
                           "saved model and record, best also best.ckpt, all every checkpoint")
    return str(keep)


def after_success(record: dict[str, Any], run_dir: Path, keep: str) -> dict[str, Any] | None:
    """Drop what only a resume needs from a finished run's checkpoints/ (module docstring); the record gains what
    was dropped and is written again. Returns that entry, or None when nothing was there to drop."""
    keep = check(keep)
    folder = run_dir / _CHECKPOINTS
    if keep == "all" or record.get("status") != "ok" or not folder.is_dir():
        return None
    has_model = (run_dir / "model" / "config.json").is_file()
    keep_best = keep == "best" or not has_model
    dropped, freed = [], 0
    for path in sorted(folder.iterdir()):
        if keep_best and path.name.startswith(_BEST) and not path.name.endswith(".tmp"):
            continue
        size = dir_bytes(path) if path.is_dir() else path.stat().st_size
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError as e:  # a file we cannot remove stays; the run's result is unaffected
            log.warning("could not remove %s after the run finished: %s", path, e)
            continue
        dropped.append(path.name)
        freed += size
    if not any(folder.iterdir()):
        folder.rmdir()
    if not dropped:
        return None
    entry = {"keep": keep, "dropped": dropped, "bytes_freed": freed,
             "kept": sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []}
    if keep == "model" and not has_model:
        entry["note"] = "no complete model/ was saved, so best.ckpt stays as the trained weights"
    record[RECORD_KEY] = entry
    write_record(run_dir, record)
    log.info("run finished: dropped %s from %s (%.1f MB; checkpoint.keep_after_success=%s)", ", ".join(dropped),
             folder, freed / 1e6, keep)
    return entry


def dropped_note(run_dir: Path) -> str:
    """For an error about a missing checkpoint: that this finished run dropped it on purpose, and how to keep it."""
    try:
        entry = (read_record(run_dir) or {}).get(RECORD_KEY)
    except Exception:  # an unreadable record: say nothing rather than fail the error message
        return ""
    if not entry:
        return ""
    return (f" (the run finished and checkpoint.keep_after_success={entry.get('keep')} dropped "
            f"{', '.join(entry.get('dropped', []))}; keep_after_success=all keeps them)")
