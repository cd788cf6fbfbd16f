"""A run's outcome, whatever happens: the body runs with a record that is written (atomically) when it ends,
ok, failed or interrupted, and the loggers are closed. In a sweep a failed cell is recorded and the sweep goes
on; a single run's error ends the program (squeeze.errors.main_exit: one line on stderr, exit code 2). A signal
(SIGTERM, SIGINT) ends the run and the sweep: recorded as "interrupted", one line on stderr, exit code 128 + signal;
a cell that fails after a stop signal came (saving its checkpoint into a removed directory, say) is recorded as
failed and still ends the sweep. squeeze.run.cell.guarded starts the record and calls this."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from squeeze.errors import Interrupted, SqueezeError
from squeeze.hardware import checkpointing
from squeeze.run.loggers import wandb_outcome
from squeeze.record import write_record
from squeeze.run.summary import headline_figures

log = logging.getLogger("squeeze")


def guarded(body: Callable[[], Any], record: dict[str, Any], run_dir: Path, multirun: bool) -> dict[str, Any]:
    """Run `body`, which fills `record`; then write the record (on global rank zero) and close its loggers.
    A failure is recorded with status "failed" and its error; alone (not `multirun`) it is raised again."""
    is_rank_zero = True
    try:
        body()
        record["status"] = "ok"
    except (Interrupted, KeyboardInterrupt) as e:
        stop = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
        record["status"] = "interrupted"
        record["error"] = str(stop)
        record["interrupted"] = stop.record()
        if _is_global_zero():
            _finish(record, run_dir)
        print(f"{stop}; {_resume_hint(stop, run_dir, multirun)}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    except Exception as e:
        record["status"] = "failed"
        record["error"] = _one_line(e)
        if not isinstance(e, SqueezeError):
            log.exception("run failed")
        if not multirun:
            _finish(record, run_dir)
            raise
        log.error("cell failed: %s (recorded in %s)", record["error"], run_dir / "result.json")
        asked = checkpointing.signals.signum
        if asked is not None:  # the user asked the sweep to stop: a failure on the way out must not move it on
            if _is_global_zero():
                _finish(record, run_dir)
            stop = Interrupted(asked)
            print(f"{stop}; the cell failed while stopping, so its rerun starts it afresh", file=sys.stderr)
            raise SystemExit(stop.exit_code) from None
    else:
        is_rank_zero = _is_global_zero()
    if is_rank_zero:
        _finish(record, run_dir)
    return record


def _finish(record: dict[str, Any], run_dir: Path) -> None:
    loggers = record.pop("_loggers", [])
    try:
        write_record(run_dir, record)  # first: a logger failing below must not cost the record
        figures = headline_figures(record) if record["status"] == "ok" else {}
        for logger in loggers:
            if figures:
                logger.log_metrics(figures)
            if type(logger).__name__ == "WandbLogger":  # failed and interrupted runs too: their error line
                try:
                    wandb_outcome(logger, record, run_dir, figures)
                except Exception as e:  # W&B's trouble must not turn a finished run into a failed one
                    log.warning("W&B did not take the run's summary and files: %s", e)
    finally:
        for logger in loggers:
            try:
                logger.finalize(record["status"] if record["status"] != "ok" else "success")
                if type(logger).__name__ == "WandbLogger":
                    import wandb

                    wandb.finish(exit_code=0 if record["status"] == "ok" else 1)
            except Exception as e:  # a logger failing to close must not hide the run's outcome
                log.warning("logger %s did not close cleanly: %s", type(logger).__name__, e)


def _resume_hint(stop: Interrupted, run_dir: Path, multirun: bool) -> str:
    if multirun:
        again = f"rerun the sweep with hydra.sweep.dir={run_dir.parent} (finished cells are skipped)"
    else:
        again = f"resume: python train.py hydra.run.dir={run_dir} ckpt_path=last"
    if not stop.checkpoint:
        return "no checkpoint was written yet; " + again.replace("resume:", "start again:").replace(" ckpt_path=last", " ckpt_path=last_or_new")
    at = f" (step {stop.checkpoint_step})" if stop.checkpoint_step is not None else ""
    return f"checkpoint {stop.checkpoint}{at}; {again}"


def _is_global_zero() -> bool:
    import lightning.fabric.utilities.rank_zero as rz

    return getattr(rz.rank_zero_only, "rank", 0) == 0


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


