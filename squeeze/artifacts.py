"""What a model reference means, and the one loader: one resolver for evaluate.py's `ckpt=`, resuming
(`ckpt_path=`), a speculative draft (`draft=`) and a distillation teacher (`teacher=`).

A reference is one of
  run        a squeeze run directory (result.json, model/, checkpoints/): its saved model, its last
             checkpoint and its record (the model config and task head it was trained with)
  model_dir  a saved transformers directory (config.json)
  ckpt       a Lightning checkpoint file (.ckpt)
  asset      an offline asset name (squeeze.assets), e.g. minilm, smollm2
  hub        anything else: a Hugging Face hub id (a local HF cache copy is used when there is one)

`resolve` answers with an `Artifact`; every refusal is one SqueezeError line that names the fix. It only
reads directories, result.json and config.json, so it is cheap and safe to call before anything loads.
`load` turns an Artifact into (model, tokenizer): a saved directory in its own format (squeeze.formats), a
hub id that is not in the local cache through from_pretrained.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from squeeze import assets
from squeeze.errors import SqueezeError
from squeeze.hardware import retention
from squeeze.record import RESULT_FILE, read_record

RUN, MODEL_DIR, CKPT, ASSET, HUB = "run", "model_dir", "ckpt", "asset", "hub"
KINDS = (RUN, MODEL_DIR, CKPT, ASSET, HUB)
MODELS = (RUN, MODEL_DIR, ASSET, HUB)  # the kinds that hold a whole model (a .ckpt needs model= to rebuild it)
RUN_MODEL, RUN_CHECKPOINT = "model", Path("checkpoints") / "last.ckpt"
DESCRIBE = {
    RUN: "a squeeze run directory",
    MODEL_DIR: "a saved model directory",
    CKPT: "a Lightning checkpoint file (.ckpt)",
    ASSET: "an offline asset name",
    HUB: "a hub id",
}


@dataclass(frozen=True)
class Artifact:
    """One resolved reference. `model_dir` holds config.json (None for a .ckpt, or a hub id not in
    the local HF cache); `checkpoint` is a Lightning .ckpt (a run's checkpoints/last.ckpt when present)."""

    reference: str
    kind: str
    model_dir: Path | None = None
    checkpoint: Path | None = None
    run_dir: Path | None = None
    record: dict[str, Any] | None = None
    model_type: str | None = None  # config.json's architecture name ("bert", "gpt2", "llama")

    @property
    def location(self) -> str:
        """What transformers' from_pretrained takes: the model directory, else the hub id."""
        return str(self.model_dir) if self.model_dir is not None else self.reference

    @property
    def model_config(self) -> dict[str, Any] | None:
        """The run's `model` config (name, kind, ...) when its record has one with a name and kind."""
        model = ((self.record or {}).get("config") or {}).get("model") or {}
        return model if model.get("name") and model.get("kind") else None

    @property
    def model_name(self) -> str | None:
        return (self.model_config or {}).get("name")

    @property
    def model_kind(self) -> str | None:
        """encoder | decoder, as the run's model config says."""
        return (self.model_config or {}).get("kind")

    @property
    def head(self) -> str | None:
        """The task head the run was trained with (None when not a run, or not recorded)."""
        return (((self.record or {}).get("config") or {}).get("task") or {}).get("head")

    @property
    def choices(self) -> dict[str, Any]:
        return (self.record or {}).get("choices") or {}


def resolve(reference: Any, what: str = "model", accept: Collection[str] = KINDS, need: str = "model",
            expected: str | None = None) -> Artifact:
    """Resolve `reference` (given as `what`=..., named in errors) to an Artifact of one of the `accept`ed
    kinds. `need="model"`: a run must have a saved model; `need="checkpoint"`: a run must have
    checkpoints/last.ckpt (resuming). `expected` overrides the "give ..." list in error messages."""
    source = str(reference)
    give = expected or _give(accept)
    path = Path(source).expanduser()
    if path.is_dir():
        artifact = _directory(path, source, what, need, give)
    elif path.is_file():
        if path.suffix != ".ckpt":
            raise SqueezeError(f"{what}={source} is a file but not a Lightning checkpoint (.ckpt); give {give}")
        artifact = Artifact(source, CKPT, checkpoint=path)
    elif source in assets.ASSETS:
        artifact = _asset(source, what, give)
    elif (HUB not in accept or source.startswith((".", "/", "~")) or source.count("/") > 1
          or source.endswith(".ckpt")):  # a path, or no hub id is taken here: nothing to look up
        raise SqueezeError(f"{what}={source} does not exist; give {give}")
    elif "/" not in source and (close := difflib.get_close_matches(source, list(assets.ASSETS), n=1, cutoff=0.8)):
        raise SqueezeError(f"{what}={source} is neither a path nor a known asset (did you mean {close[0]}?); "
                           f"offline assets: {', '.join(assets.ASSETS)}")
    else:
        artifact = _hub(source, what, give)
    if artifact.kind not in accept:
        raise SqueezeError(f"{what}={source} is {DESCRIBE[artifact.kind]}, which {what}= does not take; give {give}")
    return artifact


RESUMES_TEXT = "a .ckpt file, a run directory with checkpoints/last.ckpt, or ckpt_path=last to resume in this run directory"


def resume_checkpoint(reference: Any, what: str = "ckpt_path") -> Path:
    """The Lightning checkpoint to resume from: a .ckpt file, or a run directory's checkpoints/last.ckpt."""
    return resolve(reference, what, accept=(RUN, CKPT), need="checkpoint", expected=RESUMES_TEXT).checkpoint


def require_head(artifact: Artifact, head: str, what: str = "model") -> None:
    """A run trained with another task head cannot serve where `head` is needed (a draft or teacher)."""
    if artifact.head not in (None, head):
        raise SqueezeError(f"{what} run {artifact.run_dir} was trained with a {artifact.head} head but a {head} "
                           f"model is needed here; give a {what} trained on a {head} task")


def load_error(artifact: Artifact, error: BaseException, what: str = "model") -> SqueezeError:
    """A SqueezeError for a failure to load `artifact` (from_pretrained's OSError/ValueError): a hub id
    offline says so and names the offline alternatives."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if artifact.kind == HUB:
        return SqueezeError(_offline(artifact.reference, what, f"{first}"))
    return SqueezeError(f"{what}={artifact.reference}: {artifact.location} could not be loaded ({first}); give "
                        f"a finished run directory, a saved model directory or an offline asset")


def load(artifact: Artifact, head: str, what: str = "model"):
    """(model with `head`, tokenizer with its family's quirks settled) of a resolved reference that holds a
    whole model; a failure to read it is one SqueezeError line. A .ckpt holds weights only: its caller
    rebuilds the model from model= and loads them."""
    # Imported here, so resolving a reference (and importing this module) loads no model code.
    from transformers import AutoTokenizer

    from squeeze import formats, models

    if artifact.kind == CKPT:
        raise SqueezeError(f"{what}={artifact.reference} is {DESCRIBE[CKPT]}, which holds weights but not the "
                           f"model; give {_give(MODELS)}")
    try:
        if artifact.model_dir is not None:
            model = formats.load(artifact.model_dir, head)
        else:  # a hub id not in the local cache: from_pretrained downloads it
            model = models.HEADS[head].from_pretrained(artifact.location)
        tokenizer = AutoTokenizer.from_pretrained(artifact.location)
    except (OSError, ValueError) as e:
        raise load_error(artifact, e, what) from e
    return model, models.prepare_tokenizer(tokenizer, artifact.model_type)


# -- the kinds --------------------------------------------------------------------------------------
def _is_run(path: Path) -> bool:
    return (path / RESULT_FILE).is_file() or (path / RUN_MODEL).is_dir() or (path / "checkpoints").is_dir()


def _directory(path: Path, source: str, what: str, need: str, give: str) -> Artifact:
    if not _is_run(path):
        if need == "checkpoint":
            raise SqueezeError(f"{what}={source}: no checkpoint at {path / RUN_CHECKPOINT}; give {give}")
        if not (path / "config.json").is_file():
            raise SqueezeError(f"{what}={source} is neither a squeeze run directory (result.json + model/) nor a "
                               f"saved model directory (config.json): the {what} checkpoint is missing; give {give}")
        return Artifact(source, MODEL_DIR, model_dir=path, model_type=_model_type(path))
    record = read_record(path) if (path / RESULT_FILE).is_file() else None
    model_dir = path / RUN_MODEL if (path / RUN_MODEL / "config.json").is_file() else None
    checkpoint = path / RUN_CHECKPOINT if (path / RUN_CHECKPOINT).is_file() else None
    status = {"failed": "failed", "ok": "finished, but model/ was removed"}.get((record or {}).get("status"),
                                                                               "did not finish")
    if need == "checkpoint" and checkpoint is None:
        raise SqueezeError(f"{what}={source}: no checkpoint at {path / RUN_CHECKPOINT} (the run {status})"
                           f"{retention.dropped_note(path)}; give {give}")
    if need == "model" and model_dir is None:
        if checkpoint is not None:
            fix = (f"evaluate its checkpoint (evaluate.py ckpt={checkpoint} with the model= it was trained from) "
                   f"or resume it (train.py ckpt_path={path})")
        else:
            fix = "it has no checkpoint either (checkpoints/last.ckpt), so train it again"
        raise SqueezeError(f"{what} run {path} has no saved model ({path / RUN_MODEL} is missing: the run {status}); "
                           f"{fix}")
    return Artifact(source, RUN, model_dir=model_dir, checkpoint=checkpoint, run_dir=path, record=record,
                    model_type=_model_type(model_dir) if model_dir else None)


def _asset(name: str, what: str, give: str) -> Artifact:
    directory = assets.locate(name)  # AssetMissingError names the fetch command
    if not (directory / "config.json").is_file():
        raise SqueezeError(f"{what}={name}: the offline asset {name} holds a tokenizer or data, not a model; give {give}")
    return Artifact(name, ASSET, model_dir=directory, model_type=_model_type(directory))


def _hub(source: str, what: str, give: str) -> Artifact:
    """A hub id: its local HF cache copy when there is one; offline without one is refused here, online
    the caller's from_pretrained downloads it."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
    except Exception:  # not a valid repo id at all (e.g. a typo with spaces): say what is accepted
        raise SqueezeError(f"{what}={source} is not a path, an offline asset nor a hub id; give {give}") from None
    if isinstance(cached, str):
        directory = Path(cached).parent
        return Artifact(source, HUB, model_dir=directory, model_type=_model_type(directory))
    if constants.HF_HUB_OFFLINE:
        raise SqueezeError(_offline(source, what, "HF_HUB_OFFLINE is set and it is not in the local cache"))
    return Artifact(source, HUB)


def _offline(source: str, what: str, why: str) -> str:
    fetched = [n for n in assets.ASSETS if (assets.cache_dir() / n / "config.json").is_file()]
    return (f"{what}={source} was taken as a hub id (it is no local path nor an offline asset), which could not be "
            f"loaded ({why}); without network give a run directory, a saved model directory or an offline model "
            f"asset ({'fetched: ' + ', '.join(fetched) + '; ' if fetched else ''}python -m squeeze.assets list)")


def _model_type(directory: Path) -> str | None:
    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def _give(accept: Collection[str]) -> str:
    names = [DESCRIBE[k] for k in KINDS if k in accept]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
