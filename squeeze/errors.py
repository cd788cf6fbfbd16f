"""User-facing errors: one line that names the problem and the fix (and what counts as a full disk)."""

import errno
import sys


class SqueezeError(Exception):
    """An error caused by input or environment, reported as one clear line (no traceback)."""


def main_exit(error: BaseException) -> None:
    """Entry points: a SqueezeError is one line on stderr and exit code 2, not a traceback."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2)


def out_of_space(error: BaseException) -> bool:
    """A write that failed because the disk is full: ENOSPC, or torch's zip writer saying so its own way."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("unexpected pos" in text or "file write failed" in text)


class Interrupted(BaseException):
    """The run was stopped by a signal (SIGTERM, SIGINT): not an error of the run, so like KeyboardInterrupt
    it is no Exception. Carries how far training got and the checkpoint to resume from
    (squeeze.hardware.checkpointing)."""

    def __init__(self, signum: int, step: int | None = None, epoch: int | None = None,
                 checkpoint: str | None = None, checkpoint_step: int | None = None):
        import signal

        self.signum = int(signum)
        self.signal = signal.Signals(self.signum).name
        self.step, self.epoch, self.checkpoint, self.checkpoint_step = step, epoch, checkpoint, checkpoint_step
        super().__init__(f"interrupted by {self.signal}" + (f" at step {step}" if step is not None else ""))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for a process ended by a signal

    def record(self) -> dict:
        return {"signal": self.signal, "step": self.step, "epoch": self.epoch, "checkpoint": self.checkpoint,
                "checkpoint_step": self.checkpoint_step}
