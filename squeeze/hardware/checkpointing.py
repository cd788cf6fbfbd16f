"""A killed run loses minutes, not the run: mid-epoch checkpoints, stop signals, exact resume.

  ResumeCheckpoint   last.ckpt every N optimizer steps and/or every T minutes (stretched so saving costs at
                     most `max_overhead` of train time), and when SIGTERM/SIGINT arrive; RNG states inside
  AtomicCheckpointIO every checkpoint written beside its target and renamed over it
  StopSignals        SIGTERM/SIGINT: during fit, Lightning's own SIGTERM stop at the end of the batch; elsewhere
                     at once. Either way the run ends as `Interrupted` (recorded by squeeze.run.guard)
  resumable()        the train loader, able to continue mid-epoch at the batch it stopped at
  last_checkpoint()  the newest checkpoint in a run directory (last.ckpt or Lightning's Slurm hpc_ckpt_N.ckpt)
  cluster_plugins()  on Slurm: Lightning's requeue on the pre-emption signal
  CSVLogger          Lightning's, continuing metrics.csv on resume (the W&B run id: squeeze.run.loggers)
  resume_from()      where fit starts from (ckpt_path=last | last_or_new | a file | a run), said in the record
  fitting()          fit under the stop signals, timed, a checkpoint of another architecture said in one line
  restore_best()     after fit, the best validation checkpoint Lightning's ModelCheckpoint kept (the weights
                     the run tests and saves), its score (best_validation) and what mid-epoch saving cost

Resuming from a step checkpoint reproduces the uninterrupted run (same seed): weights, optimizer, scheduler and
loop state are Lightning's; compressor state is their callbacks' state_dict; the data order and the position in
the epoch are the loader's state_dict (below); dropout's RNG is saved here.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import numpy as np
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, RandomSampler, Sampler

from squeeze import artifacts
from squeeze.errors import Interrupted, SqueezeError, out_of_space
from squeeze.hardware import retention, safe_load

log = logging.getLogger("squeeze")
LAST = "last.ckpt"
HPC_GLOB = "hpc_ckpt_*.ckpt"  # what Lightning's SLURMEnvironment requeue handler saves in the run directory
RNG_KEY = "squeeze_rng_states"
CSV_ROWS_KEY = "squeeze_csv_rows"  # rows metrics.csv held when the checkpoint was written


# -- where to resume from ---------------------------------------------------------------------------
SHARDED_META = "meta.pt"


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest of <run_dir>/checkpoints/last.ckpt and Lightning's <run_dir>/hpc_ckpt_N.ckpt, or None."""
    run_dir = Path(run_dir)
    found = [p for p in [run_dir / "checkpoints" / LAST, *run_dir.glob(HPC_GLOB)] if p.is_file() or is_sharded(p)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def is_sharded(path: str | Path) -> bool:
    """A sharded checkpoint (hardware=fsdp, state_dict_type=sharded): a directory of per-rank shards and the
    trainer's own state in meta.pt, as Lightning's FSDP strategy writes it."""
    return (Path(path) / SHARDED_META).is_file()


def checkpoint_position(path: str | Path) -> dict[str, Any]:
    """The optimizer step and epoch a checkpoint holds (memory-mapped: the tensors are not read)."""
    file = Path(path) / SHARDED_META if is_sharded(path) else Path(path)
    ckpt = safe_load.load(file, mmap=True)  # read as data before Lightning resumes from it (squeeze.hardware.safe_load)
    return {"checkpoint": str(path), "step": int(ckpt.get("global_step", 0)), "epoch": int(ckpt.get("epoch", 0)),
            "csv_rows": ckpt.get(CSV_ROWS_KEY)}


# -- atomic saving ----------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temp file beside the target, fsync, then os.replace: a kill at any moment leaves
    the previous checkpoint loadable. (Lightning's own _atomic_save serialises into memory and commits an
    fsspec transaction whose temp file lives in the system temp dir; moved across filesystems, as from a
    node's /tmp to shared storage, that is a copy, not a rename.) Remote URLs keep Lightning's path."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            written = tmp.stat().st_size if tmp.exists() else 0
            tmp.unlink(missing_ok=True)
            if out_of_space(e):
                free = shutil.disk_usage(path.parent).free
                raise SqueezeError(
                    f"disk full while saving checkpoint {path} ({written / 2**20:.0f} MiB written, {free / 2**20:.0f} "
                    "MiB free now); the previous checkpoint is intact. Free space (old multirun/ and outputs/ "
                    "checkpoints/ folders), or write runs elsewhere with hydra.run.dir / hydra.sweep.dir") from e
            raise
        try:  # the rename itself survives a power cut only once the directory is synced
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None):
        """Lightning's resume (`trainer.fit(ckpt_path=...)`) asks for weights_only=False; read it as data instead
        (squeeze.hardware.safe_load: refused with one line unless trust_checkpoint=true). Remote URLs keep Lightning's
        reader, weights-only too unless trusted."""
        if "://" in str(path):
            with torch.serialization.safe_globals(safe_load.safe_types()):
                return super().load_checkpoint(path, map_location, weights_only=not safe_load.trusted())
        if not Path(path).exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return safe_load.load(path, map_location=map_location)


def cluster_plugins() -> list[Any]:
    """On Slurm: Lightning's SLURMEnvironment(auto_requeue=True) on the signal the launcher asks Slurm for
    before the time limit (submitit's USR2, `hydra.launcher.signal_delay_s` ahead): it saves hpc_ckpt_N.ckpt in
    the run directory and requeues the job, and the requeued cell resumes from it (squeeze.run)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    requeue = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
    if threading.current_thread() is threading.main_thread():
        # submitit's own handler would requeue without a checkpoint, and Lightning registers its handler only
        # where none is set: hand the signal to Lightning.
        signal.signal(requeue, signal.SIG_DFL)
    return [SLURMEnvironment(auto_requeue=True, requeue_signal=requeue)]


# -- signals ----------------------------------------------------------------------------------------
class StopSignals:
    """SIGTERM (what schedulers and `timeout` send) and SIGINT (Ctrl-C) for the length of a run.

    During fit the first one asks Lightning to stop at the end of the current batch (its SIGTERM flag), where
    ResumeCheckpoint saves last.ckpt; a second Ctrl-C stops at once. Outside fit the run stops at once. Either
    way `Interrupted` reaches squeeze.run.guard, which records status "interrupted". Lightning handles SIGTERM during
    its loops only, and SIGINT not at all (a KeyboardInterrupt lands mid-step): that is what is added here."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.fitting = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        self.signum, self.fitting = None, False
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        self.fitting = False

    def _handle(self, signum: int, frame) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if self.fitting and first:
            log.warning("%s: stopping at the end of this batch and saving last.ckpt (Ctrl-C again: stop now)",
                        signal.Signals(signum).name)
            if signum != signal.SIGTERM:
                # Lightning's SIGTERM handler (which calls this one too) sets the flag its loops stop on.
                signal.raise_signal(signal.SIGTERM)
            return
        if self.fitting and signum == signal.SIGTERM:
            return  # a repeat, or the SIGTERM raised above: Lightning is already stopping
        raise Interrupted(self.signum or signum)


signals = StopSignals()  # signal handlers are per process; squeeze.run.cell.guarded enters it around each run


# -- the checkpoint callback ------------------------------------------------------------------------
class ResumeCheckpoint(Checkpoint):
    """Writes <dirpath>/last.ckpt mid-epoch: every `every_n_steps` optimizer steps and/or every
    `every_minutes` of training, and at the end of the batch in which SIGTERM/SIGINT arrived. The time interval
    is stretched so that saving costs at most `max_overhead` of train time (a checkpoint that takes a minute to
    write is not written every two), to no more than `max_minutes`. Lightning's ModelCheckpoint saves on steps
    *or* on time, not both, with no bound on its cost, and its step saves would also move its best-model check
    off validation: hence this one.

    A Checkpoint subclass so Lightning runs it after every other callback (compressors included): what it saves
    is the state after the whole batch. It also saves the RNG states into every checkpoint (dropout continues
    exactly) and puts them back when training restarts."""

    def __init__(self, dirpath: str, every_n_steps: int | None = None, every_minutes: float | None = None,
                 max_overhead: float = 0.02, max_minutes: float | None = 10):
        super().__init__()
        self.path = Path(dirpath) / LAST
        self.every_n_steps = int(every_n_steps) if every_n_steps else None
        self.every_seconds = float(every_minutes) * 60 if every_minutes else None
        self.max_overhead = float(max_overhead)
        self.max_seconds = float(max_minutes) * 60 if max_minutes else float("inf")
        self.saves: list[float] = []  # seconds each mid-epoch save took (the overhead, for records and tests)
        self.saved_step: int | None = None
        self.resumed: dict[str, Any] | None = None
        self._rng: dict[str, Any] | None = None
        self._loader_state: list[dict] | None = None
        self._since = time.monotonic()
        self._step_before = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._since = time.monotonic()
        if self._loader_state is not None:
            # Lightning loads the train loader's state only where it builds the loader after the restore; a
            # scheduler that asks for trainer.estimated_stepping_batches (ours) has it built before.
            loaders = trainer.train_dataloader
            loaders = loaders if isinstance(loaders, (list, tuple)) else \
                list(loaders.values()) if isinstance(loaders, dict) else [loaders]
            resumable_loaders = [dl for dl in loaders if isinstance(dl, ResumableLoader)]
            for loader, state in zip(resumable_loaders, self._loader_state):
                loader.load_state_dict(state)
            self._loader_state = None
        if self._rng is not None:  # the last thing before the first batch after a restart
            set_rng_states(self._rng)
            self._rng = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_before or trainer.sanity_checking:
            return  # mid gradient-accumulation: the optimizer has not stepped, nothing new to keep
        step = trainer.global_step
        due = signals.signum is not None
        if self.every_n_steps and step % self.every_n_steps == 0:
            due = True
        if self.every_seconds is not None and time.monotonic() - self._since >= self._interval():
            due = True
        if trainer.strategy.broadcast(due):  # every rank saves, or none (time differs between ranks)
            log_train_row_ahead(trainer)
            self.save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Lightning stopped for SIGTERM somewhere else than after a training batch (between validation batches):
        # the training state is whole there too. A hard stop (a second Ctrl-C) may land mid-step: nothing saved.
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if fitting and isinstance(exception, SIGTERMException) and self.saved_step != trainer.global_step \
                and trainer.global_step > 0:
            self.save(trainer)

    def _interval(self) -> float:
        """every_minutes, stretched to keep saving under max_overhead of train time, capped at max_minutes."""
        last = self.saves[-1] if self.saves else 0.0
        stretched = last * (1 - self.max_overhead) / max(self.max_overhead, 1e-6)
        return max(self.every_seconds or 0.0, min(stretched, self.max_seconds))

    def save(self, trainer) -> None:
        start = time.monotonic()
        trainer.save_checkpoint(str(self.path), weights_only=False)  # said, or Lightning logs it every save
        for logger in trainer.loggers:  # the logged curve up to this checkpoint survives a kill -9
            logger.save()
        self.saves.append(time.monotonic() - start)
        self.saved_step = trainer.global_step
        self._since = time.monotonic()

    # what goes into every checkpoint (ModelCheckpoint's too)
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = rng_states()
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger) and trainer.is_global_zero:
                logger.save()
                checkpoint[CSV_ROWS_KEY] = logger.experiment.rows_written

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._rng = checkpoint.get(RNG_KEY)
        fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        self._loader_state = (fit_loop.get("state_dict") or {}).get("combined_loader")
        self.resumed = {"step": int(checkpoint.get("global_step", 0)), "epoch": int(checkpoint.get("epoch", 0))}
        self.saved_step = self.resumed["step"]


def log_train_row_ahead(trainer) -> None:
    """Write this batch's train row to metrics.csv now, before the step checkpoint that covers it.

    Lightning logs a batch's train metrics only after every on_train_batch_end hook, i.e. after the checkpoint is
    on disk: a kill -9 between the two would lose the row for good (the resumed run starts after that step). The
    row is what Lightning's update_train_step_metrics is about to log (same values, step and epoch); the CSV
    logger then drops the repeat."""
    connector = trainer._logger_connector
    loggers = [logger for logger in trainer.loggers if isinstance(logger, CSVLogger)]
    if not loggers or not (connector.should_update_logs or trainer.fast_dev_run):
        return
    row = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in connector.metrics["log"].items()}
    if not row:
        return
    row.setdefault("epoch", trainer.current_epoch)
    for logger in loggers:
        logger.log_ahead(row, step=trainer.fit_loop.epoch_loop._batches_that_stepped)


def rng_states() -> dict[str, Any]:
    """torch (and CUDA), numpy and Python RNG states as tensors, ints and tuples: what a weights-only load
    (Lightning's default when resuming) accepts. (Lightning's _collect_rng_states keeps numpy's arrays.)"""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, python_gauss = random.getstate()
    states = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                         int(has_gauss), float(gauss)),
              "python": (version, torch.tensor(state, dtype=torch.int64), python_gauss)}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, python_gauss = states["python"]
    random.setstate((version, tuple(int(x) for x in state), python_gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def interrupted(trainer: L.Trainer, error: BaseException) -> Interrupted:
    """What stopped fit (Lightning's SIGTERMException, a KeyboardInterrupt, or Interrupted), as Interrupted
    with how far training got and the checkpoint to resume from."""
    signum = signals.signum or getattr(error, "signum", None) or \
        (signal.SIGINT if isinstance(error, KeyboardInterrupt) else signal.SIGTERM)
    callback = next((c for c in trainer.callbacks if isinstance(c, ResumeCheckpoint)), None)
    run_dir = Path(trainer.default_root_dir)
    latest = last_checkpoint(run_dir)
    checkpoint_step = callback.saved_step if callback is not None and latest == callback.path else None
    return Interrupted(signum, step=trainer.global_step, epoch=trainer.current_epoch,
                       checkpoint=str(latest) if latest else None, checkpoint_step=checkpoint_step)



# -- fit: where it starts, how it stops, the best checkpoint it kept ----------------------------------------
def resume_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """`last` (resume in this run directory; none there is an error), `last_or_new` (resume, or start fresh on
    purpose), a checkpoint file, or an earlier run directory."""
    if ckpt_path is None:
        return None
    if ckpt_path in ("last", "last_or_new"):
        found = last_checkpoint(run_dir)
        if found is not None:
            return str(found)
        if ckpt_path == "last":
            raise SqueezeError(f"ckpt_path=last: no checkpoint in {run_dir} to resume from (checkpoints/last.ckpt)"
                               f"{retention.dropped_note(run_dir)}; give hydra.run.dir=<the killed run's directory>, or ckpt_path=last_or_new to start "
                               "fresh when there is none")
        log.info("ckpt_path=last_or_new: no checkpoint in %s, starting fresh", run_dir)
        return None
    return str(artifacts.resume_checkpoint(ckpt_path))


def resume_from(ckpt_path: str | None, run_dir: Path, record: dict[str, Any], loggers) -> str | None:
    """The checkpoint fit resumes from (resume_path), recorded as `resumed_from`; the curves the CSV logger
    wrote before that checkpoint are kept."""
    path = resume_path(ckpt_path, run_dir)
    if path is not None:
        record["resumed_from"] = checkpoint_position(path)
        log.info("resuming from %s (step %d)", path, record["resumed_from"]["step"])
        rows = record["resumed_from"].pop("csv_rows")
        for logger in loggers:
            if isinstance(logger, CSVLogger):
                logger.resume_at(record["resumed_from"]["step"], rows)
    return path


@contextlib.contextmanager
def fitting(trainer: L.Trainer, record: dict[str, Any], ckpt: Any):
    """Around trainer.fit: a stop signal ends fit at the end of the batch, with last.ckpt, and the run as
    Interrupted; fit's wall time is record["train_seconds"] however it ends."""
    start = time.perf_counter()
    try:
        signals.fitting = True
        with readable_checkpoint_errors(ckpt):
            yield
    except (SIGTERMException, KeyboardInterrupt, Interrupted) as e:
        raise interrupted(trainer, e) from None
    finally:
        signals.fitting = False
        record["train_seconds"] = time.perf_counter() - start


class readable_checkpoint_errors:
    """A checkpoint whose tensors do not fit the model means another architecture: say so."""

    def __init__(self, ckpt: Any):
        self.ckpt = ckpt

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is RuntimeError and "state_dict" in str(error):
            raise SqueezeError(
                f"checkpoint {self.ckpt} is from another architecture than the configured model "
                f"({str(error).splitlines()[0]}); use the model= and task= it was trained with"
            ) from error
        return False


def model_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The callback that keeps the best validation checkpoint (ResumeCheckpoint is a Checkpoint too)."""
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)


def checkpoint_seconds(trainer: L.Trainer) -> dict[str, Any] | None:
    callback = next((c for c in trainer.callbacks if isinstance(c, ResumeCheckpoint)), None)
    if callback is None:
        return None
    return {"mid_epoch_saves": len(callback.saves), "seconds": sum(callback.saves)}


def best_validation(trainer: L.Trainer, monitor: str, mode: str) -> dict[str, Any] | None:
    callback = model_checkpoint(trainer)
    score = getattr(callback, "best_model_score", None) if callback else None
    if score is None:
        return None
    return {"monitor": monitor, "mode": mode, "best": float(score)}


def restore_sharded_best(trainer: L.Trainer) -> None:
    callback = model_checkpoint(trainer)
    best = callback.best_model_path if callback else ""
    if best and is_sharded(best):
        trainer.strategy.load_checkpoint(best)  # every rank its own shard; then gathered like the last weights


def restore_best(trainer: L.Trainer, module: L.LightningModule) -> None:
    """Load the best validation checkpoint's weights (if one was kept) into the module."""
    callback = model_checkpoint(trainer)
    best = callback.best_model_path if callback else ""
    if best and Path(best).is_file():
        state = safe_load.load(best)["state_dict"]
        module.load_state_dict(state)

# -- a train loader that resumes mid-epoch ---------------------------------------------------------
class EpochSampler(Sampler[int]):
    """Indices in an order seeded by (seed, epoch), optionally starting some way into the epoch. torch's
    RandomSampler draws its seed from the global RNG when the epoch begins, which a resumed run cannot replay.
    Lightning calls set_epoch at every epoch start (as for a DistributedSampler)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, int(seed), shuffle
        self.epoch = 0
        self.start = 0  # indices of this epoch already consumed (set on resume, used once)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed((self.seed << 16) + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        start, self.start = self.start, 0
        return iter(order[start:])


class ResumableLoader(DataLoader):
    """A DataLoader with state_dict/load_state_dict, which Lightning saves in every checkpoint and loads when
    it restarts (FitLoop: `combined_loader` states): the epoch and the batches handed out in it. On restart the
    sampler skips those batches' indices, so nothing is read twice. Lightning does not prefetch from a loader
    with a length, so the count at a checkpoint is exactly the batches trained on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._served = 0
        self._resume_at: dict[str, int] | None = None

    def __iter__(self):
        sampler = self.sampler
        resume, self._resume_at = self._resume_at, None
        if resume and isinstance(sampler, EpochSampler) and resume["epoch"] == sampler.epoch:
            sampler.start = resume["batches"] * self.batch_size
            self._served = resume["batches"]
        else:
            self._served = 0
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch = self.sampler.epoch if isinstance(self.sampler, EpochSampler) else 0
        return {"epoch": epoch, "batches": self._served, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("batch_size") == self.batch_size:  # another batch size: start the epoch afresh
            self._resume_at = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


def resumable(loader: DataLoader, seed: int) -> DataLoader:
    """`loader` (a data module's plain train DataLoader) as a ResumableLoader with the same batches; a loader
    with its own batch sampler is returned as it is."""
    if isinstance(loader, ResumableLoader) or loader.batch_size is None:
        return loader
    sampler = EpochSampler(len(loader.dataset), seed, shuffle=isinstance(loader.sampler, RandomSampler))
    # Its own generator: a DataLoader without one draws its workers' base seed from the global RNG each time an
    # epoch's iterator starts, which a resumed run does at another moment than the uninterrupted one.
    return ResumableLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                           collate_fn=loader.collate_fn, num_workers=loader.num_workers, drop_last=loader.drop_last,
                           pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                           persistent_workers=loader.persistent_workers,
                           generator=torch.Generator().manual_seed(int(seed)))


# -- a CSV log that continues ----------------------------------------------------------------------
class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, which continues metrics.csv when the run resumes (`resume_at`, called by
    squeeze.run): the rows written before the checkpoint (ResumeCheckpoint records how many) and those of the
    steps before it are kept, later ones (trained again) dropped. Lightning's deletes the file whenever its
    directory is not empty."""

    _resume: tuple[int, int] | None = None
    _ahead: tuple[int, dict[str, Any]] | None = None

    def resume_at(self, step: int, rows: int | None) -> None:
        self._resume = (int(step), int(rows or 0))

    def log_ahead(self, metrics: dict[str, Any], step: int) -> None:
        """Log and flush a row before Lightning does (log_train_row_ahead); its later call for that step adds
        only what was not in it."""
        self._ahead = (int(step), dict(metrics))
        super().log_metrics(metrics, step)
        self.save()

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._ahead is not None and step == self._ahead[0]:
            logged = self._ahead[1]
            self._ahead = None
            metrics = {k: v for k, v in metrics.items() if k not in logged}
            if not metrics or set(metrics) == {"epoch"}:
                return
        super().log_metrics(metrics, step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self._resume)
        return self._experiment


class _ContinuedWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume: tuple[int, int] | None):
        self._resume = resume
        self.rows_written = 0
        super().__init__(log_dir)

    def save(self) -> None:
        self.rows_written += len(self.metrics)
        super().save()

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self._resume is None or not path.is_file():
            return super()._check_log_dir_exists()
        step, saved_rows = self._resume
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys, rows = list(reader.fieldnames or []), list(reader)
        # Rows written before the checkpoint, and rows of earlier steps written just after it (Lightning logs a
        # batch's train metrics after its on_train_batch_end, where the step checkpoint was written).
        rows = [r for i, r in enumerate(rows) if i < saved_rows or _row_step(r) < step]
        self.rows_written = len(rows)
        tmp = path.with_name(f".{path.name}.partial")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.metrics_keys = keys


def _row_step(row: dict) -> float:
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")
