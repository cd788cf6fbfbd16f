"""Logger factories whose behaviour depends on the machine (W&B online vs offline) or on the run directory
(a run resumed in its own directory continues its W&B run; the CSV logger that continues is
squeeze.hardware.checkpointing's), and what a squeeze run tells W&B: its name (the report's row label), its config,
its summaries and files.

Imported by squeeze.report too (wandb_has_key, earlier_wandb_id): Lightning, Hydra (through squeeze.run.cell) and
wandb are imported only inside the functions that need them."""

from __future__ import annotations

import logging
import netrc
import os
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from omegaconf import OmegaConf

from squeeze.record import RESULT_FILE, read_record

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger("squeeze")
WANDB_TARGET = "squeeze.run.loggers.wandb_logger"
BASELINE_GROUP = "baselines"  # the stored baselines' W&B runs, one group across sweeps
TAG_LENGTH = 64  # W&B refuses longer tags


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
    log_model: bool = False,
    **kwargs,
) -> "WandbLogger":
    """W&B logger that runs offline by itself when there is no key (or WANDB_MODE=offline), so a
    laptop without an account or network still gets a local run directory to `wandb sync` later.
    The run directory lives inside the run's own output directory.

    When `save_dir` is a squeeze run directory (its result.json is written before the run builds its loggers), the
    W&B run starts here, with the run's config (wandb_config) and its monitored metric's best kept as the summary
    (define_metric), so a running or killed run can be filtered like a finished one; without a `name` it is named
    and tagged (`row:<label>`) by its report row's label (row_label). The name is not a config value: a resolved
    one would enter result.json's config, and a sweep rerun with one more setting would take its finished cells
    for other configs. `log_model` uploads the saved model directory at the end (wandb_outcome), not Lightning's
    checkpoints."""
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    if offline is None:
        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_has_key()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    earlier = earlier_wandb_id(save_dir)
    if earlier is not None and "id" not in kwargs:  # a run resumed in its own directory continues its W&B run
        kwargs.update(id=earlier, resume="allow")
    record = _record_in(save_dir)
    tags = [str(t) for t in tags if t]
    if name is None and record is not None:
        name = row_label(record["config"].get("compress"))
        tags.append(f"row:{name}")
    logger = WandbLogger(
        project=project, save_dir=save_dir, group=group, tags=[t[:TAG_LENGTH] for t in tags],
        name=name, offline=offline, **kwargs,
    )
    logger.squeeze_log_model = bool(log_model)  # Lightning's own log_model means checkpoints, and refuses offline
    if record is not None and rank_zero_only.rank == 0:  # other ranks log nothing
        run = logger.experiment
        run.config.update(wandb_config(record), allow_val_change=True)  # a resumed run may have changed settings
        _define_monitor(run, record)
    return logger


def earlier_wandb_id(save_dir: str | Path) -> str | None:
    """The id of the W&B run an earlier attempt of this run started in `save_dir` (wandb/latest-run points at
    run-<time>-<id> or offline-run-<time>-<id>), or None."""
    latest = Path(save_dir) / "wandb" / "latest-run"
    try:
        name = latest.resolve(strict=True).name
    except OSError:
        return None
    return name.rsplit("-", 1)[-1] if name.count("-") >= 2 else None


def wandb_run_dir(run_dir: str | Path) -> Path | None:
    """The local directory of the W&B run a squeeze run directory holds (its latest), or None."""
    try:
        return (Path(run_dir) / "wandb" / "latest-run").resolve(strict=True)
    except OSError:
        return None


# -- what a run tells W&B ---------------------------------------------------------------------------
def wandb_config(record: Mapping[str, Any]) -> dict[str, Any]:
    """The run's resolved config flattened to dotted keys (`compress.imp.target`, `optimizer.lr`), with what the
    record adds: the options it was built from (`choices/…`), seed, squeeze's version and commit, library
    versions."""
    config = _flat({k: v for k, v in (record.get("config") or {}).items() if k != "hydra"})
    config.update({f"choices/{k}": v for k, v in (record.get("choices") or {}).items()})
    config.update({f"versions/{k}": v for k, v in (record.get("versions") or {}).items()})
    config.update({"seed": record.get("seed"), "squeeze/version": _version(),
                   "squeeze/git_commit": record.get("git_commit")})
    return config


def wandb_outcome(logger: "WandbLogger", record: dict[str, Any], run_dir: Path, figures: Mapping[str, float]) -> None:
    """At the end of a run (squeeze.run.guard): the config as recorded then, the figures and the outcome in words
    (status, the error line, how energy was measured) as summaries, result.json attached, and with
    log_model=true the saved model directory as an artifact."""
    from lightning.pytorch.utilities import rank_zero_only

    from squeeze.run.summary import headline_text

    if rank_zero_only.rank != 0:  # a failed single run finishes on every rank; rank zero's W&B run is the run's
        return
    run = logger.experiment
    run.config.update(wandb_config(record), allow_val_change=True)  # evaluate.py names its chain only at the end
    run.summary.update({**figures, **headline_text(record)})
    result = Path(run_dir) / RESULT_FILE
    if result.is_file():  # offline it is linked into the W&B run's files/, and uploaded by `wandb sync`
        run.save(str(result), base_path=str(run_dir), policy="now")
    model = Path(run_dir) / "model"
    if getattr(logger, "squeeze_log_model", False) and record["status"] == "ok" and model.is_dir():
        import wandb

        artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata={
            "choices": record.get("choices"), "metrics": record.get("metrics"),
            "checkpoint_bytes": record.get("checkpoint_bytes"), "git_commit": record.get("git_commit")})
        artifact.add_dir(str(model))
        run.log_artifact(artifact)


def for_baseline(logger_cfg: Mapping[str, Any] | None, name: str) -> dict[str, Any] | None:
    """A stored baseline's logger config (squeeze.run.baselines), from the cell's that triggered its training: the W&B
    run under the baseline's own name, in the baselines' group, tagged compress:none, not as that cell's row."""
    if not logger_cfg:
        return logger_cfg  # type: ignore[return-value]
    out = dict(logger_cfg)
    for key, node in logger_cfg.items():
        if isinstance(node, Mapping) and node.get("_target_") == WANDB_TARGET:
            tags = [t for t in node.get("tags") or [] if not str(t).startswith("compress:")]
            out[key] = {**node, "name": name, "group": BASELINE_GROUP, "job_type": "baseline",
                        "tags": [*tags, "compress:none", "baseline"]}
    return out


def _define_monitor(run, record: Mapping[str, Any]) -> None:
    task = (record.get("config") or {}).get("task") or {}
    if task.get("monitor"):  # its best value as the summary, not the last; the step axis Lightning set for all
        run.define_metric(task["monitor"], summary=task.get("monitor_mode") or "max",
                          step_metric="trainer/global_step", step_sync=True)


def _record_in(save_dir: str | Path) -> dict[str, Any] | None:
    try:
        record = read_record(Path(save_dir) / RESULT_FILE)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "config" in record else None


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, Mapping) or not node:
        return {prefix.rstrip("."): node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _version() -> str | None:
    try:
        return metadata.version("squeeze")
    except metadata.PackageNotFoundError:
        return None


# -- the run's name: its report row's label --------------------------------------------------------
def row_label(compress_cfg: Any, sweep: tuple[list[list[str]], list[str]] | None = None) -> str:
    """The label squeeze.report gives this run's row (squeeze.report.aggregate.row_name): the compressors' labels
    joined with '+', else the chain and the settings that tell the sweep's cells of this model × task and chain
    apart (`imp target=0.3`), with ` @ <hardware>` when the sweep runs this model × task on several. The sweep's
    cells are derived from its multirun.yaml as its sweeper built them, or given (`sweep`: its cells and default
    chain, as squeeze.plan knows them before the sweep writes anything). A single run: the chain and the
    compressor settings its command line gives."""
    from squeeze.config import chain_name
    from squeeze.report.aggregate import _text, row_name, setting_values
    from squeeze.report.cells import compress_settings
    from squeeze.run.cell import current
    from squeeze.run.sweep import chosen

    compress = OmegaConf.to_container(compress_cfg, resolve=True) if OmegaConf.is_config(compress_cfg) else compress_cfg
    compress = compress or {}
    chain = chain_name(compress)
    settings, labels = compress_settings({"config": {"compress": compress}}, chain)
    cell = current()
    if cell is None:
        return row_name(chain, "", labels)
    own = list(cell.overrides)
    jobs, default = (sweep or _sweep_jobs(cell.sweep_dir)) if cell.multirun else (None, [])
    if jobs:
        pair = [j for j in jobs if all(_value(j, g) == _value(own, g) for g in ("model", "task"))]
        peers = [_settings_of(j) for j in pair if chosen(j, default) == chosen(own, default)] or [_settings_of(own)]
        swept = {k for k in set().union(*peers) if len({p.get(k, "?") for p in peers}) > 1}
        hardware = {_value(j, "hardware") for j in pair}
    else:
        swept, hardware = set(_settings_of(own)), set()
    varying = {name: [k for k in flat if any(k == key or k.startswith(key + ".") for n, key in swept if n == name)]
               for name, flat in settings.items()}
    setting = " ".join(f"{k}={_text(v)}" for k, v in setting_values({"settings": settings}, varying))
    label = row_name(chain, setting, labels)
    if len(hardware) <= 1:
        return label
    label = f"{label} @ {cell.choices.get('hardware')}"
    # hardware=pipeline rows of a preset differ by batch size and carry no compressor label (as the report names them)
    pipelined = [j for j in pair if _value(j, "hardware") == "pipeline" and chosen(j, default) == chosen(own, default)]
    batches = {_value(j, "task.data.batch_size") for j in pipelined}
    if cell.choices.get("hardware") == "pipeline" and len(batches) > 1:
        label += f" batch {_value(own, 'task.data.batch_size')}"
    return label


def _sweep_jobs(sweep_dir: Any) -> tuple[list[list[str]] | None, list[str]]:
    """The cells of the sweep in `sweep_dir`, each its overrides, rebuilt from the multirun.yaml Hydra saved there
    as squeeze's sweeper builds them (its params and the command line crossed, a preset's rows and setups, the
    settings of unused compressors pruned), and the chain of a cell that chooses none; None when it cannot be
    read."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from squeeze.run.sweep import prune_cells, with_rows

    try:
        saved = OmegaConf.load(Path(str(sweep_dir)) / "multirun.yaml")
        if saved.get("search") is not None:  # a search's cells are its trials so far: each is named by its own settings
            return None, []
        sweeper = OmegaConf.to_container(saved.hydra.sweeper, resolve=False)
        args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        args += OmegaConf.to_container(saved.hydra.overrides.task, resolve=False)
        overrides = OverridesParser.create().parse_overrides(args)
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
        jobs = with_rows(jobs, list(sweeper.get("rows") or []), list(sweeper.get("setups") or []))
        default = [str(k) for k, v in (saved.get("compress") or {}).items() if v is not None and "_target_" in v]
        return prune_cells(jobs, default), default
    except Exception as e:  # the name is a convenience: a sweep it cannot read names the cell by its own overrides
        log.warning("W&B run name: could not read the sweep's cells from %s (%s)", sweep_dir, e)
        return None, []


def _value(job: Sequence[str], group: str) -> str | None:
    return next((o.split("=", 1)[1] for o in job if o.split("=", 1)[0].lstrip("+~") == group), None)


def _settings_of(job: Sequence[str]) -> dict[tuple[str, str], str]:
    """(compressor, setting) -> value of a cell's `compress.<name>.<setting>=value` overrides."""
    out = {}
    for o in job:
        key, _, value = o.partition("=")
        parts = key.lstrip("+~").split(".", 2)
        if len(parts) == 3 and parts[0] == "compress":
            out[(parts[1], parts[2])] = value
    return out
