"""Logger factories whose behaviour depends on the machine (W&B online vs offline) or on the run directory
(a run resumed in its own directory continues its W&B run; the CSV logger that continues is squeeze.resume's)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # Lightning is imported only when a logger is built: squeeze.report reuses wandb_has_key
    from lightning.pytorch.loggers import WandbLogger


def wandb_has_key() -> bool:
    """True when W&B could log online: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_logger(
    project: str,
    save_dir: str,
    group: str | None = None,
    tags: Sequence[str] = (),
    name: str | None = None,
    offline: bool | None = None,
    **kwargs,
) -> "WandbLogger":
    """W&B logger that runs offline by itself when there is no key (or WANDB_MODE=offline), so a
    laptop without an account or network still gets a local run directory to `wandb sync` later.
    The run directory lives inside the run's own output directory."""
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_has_key()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    earlier = earlier_wandb_id(save_dir)
    if earlier is not None and "id" not in kwargs:  # a run resumed in its own directory continues its W&B run
        kwargs.update(id=earlier, resume="allow")
    return WandbLogger(
        project=project, save_dir=save_dir, group=group, tags=[str(t) for t in tags if t],
        name=name, offline=offline, **kwargs,
    )


def earlier_wandb_id(save_dir: str | Path) -> str | None:
    """The id of the W&B run an earlier attempt of this run started in `save_dir` (wandb/latest-run points at
    run-<time>-<id> or offline-run-<time>-<id>), or None."""
    latest = Path(save_dir) / "wandb" / "latest-run"
    try:
        name = latest.resolve(strict=True).name
    except OSError:
        return None
    return name.rsplit("-", 1)[-1] if name.count("-") >= 2 else None

