"""The resolvers squeeze's YAML uses and the model=local option, registered when the package is imported (before
Hydra composes); the run-wide checks on settings; the entry points' wrapping of Hydra's main. The sweeper's config
schema registers with its plugin (hydra_plugins/squeeze_sweeper)."""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Mapping

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf, open_dict

from squeeze.errors import SqueezeError
from squeeze.hardware import retention


def chain_name(compress_cfg: Mapping | None) -> str:
    """'none', 'imp', 'pkd+imp+dq': how a compressor chain is named in directories, tags and tables."""
    return "+".join(used_compressors(compress_cfg)) or "none"


# Hydra records no single choice for a group given as a list (compress=[pkd,imp]), so sweep
# directories and W&B tags name the chain from the composed config: ${compress_chain:${compress}}.
if not OmegaConf.has_resolver("compress_chain"):
    OmegaConf.register_new_resolver("compress_chain", chain_name)


def run_group() -> str:
    """${run_group:}, W&B's group of a run: squeeze.run.cell reads it from Hydra."""
    from squeeze.run.cell import run_group as of_this_run

    return of_this_run()


if not OmegaConf.has_resolver("run_group"):
    OmegaConf.register_new_resolver("run_group", run_group)

# model=local: `model.name_or_path=<directory>` with no model= (the entry points add it, lenient_settings); the
# kind (encoder | decoder) is read from the directory's config.json (squeeze.models.Pretrained), so no YAML
# describes it.
LOCAL_MODEL = "local"
PRETRAINED = "squeeze.models.Pretrained"
ConfigStore.instance().store(group="model", name=LOCAL_MODEL, provider="squeeze",
                             node={"_target_": PRETRAINED, "name": LOCAL_MODEL, "kind": None, "name_or_path": "???"})


# -- run-wide settings, checked before anything loads ------------------------------------------------
def check_counts(trainer_cfg: Mapping, data_cfg: Mapping | None = None) -> None:
    """Step, epoch and batch counts that Lightning or the data would reject deep inside a run
    (with a traceback) are refused here, with the setting and the values it accepts."""
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def bad(key: str, value, accepted: str):
        return SqueezeError(f"{key}={value!r} is not allowed: give {accepted}")

    t = dict(trainer_cfg or {})
    if "max_steps" in t and not (whole(t["max_steps"]) and t["max_steps"] >= -1):
        raise bad("trainer.max_steps", t["max_steps"], "a step count ≥ 1, 0 (no training: evaluate as loaded) or -1 (no limit)")
    epochs = t.get("max_epochs")
    if epochs is not None and not (whole(epochs) and (epochs >= 1 or epochs == -1)):
        raise bad("trainer.max_epochs", epochs, "an epoch count ≥ 1 or -1 (no limit, stop by max_steps)")
    for key in ("accumulate_grad_batches", "log_every_n_steps"):
        if t.get(key) is not None and not (whole(t[key]) and t[key] >= 1):
            raise bad(f"trainer.{key}", t[key], "a whole number ≥ 1")
    if t.get("check_val_every_n_epoch") is not None and not (whole(t["check_val_every_n_epoch"])
                                                              and t["check_val_every_n_epoch"] >= 1):
        raise bad("trainer.check_val_every_n_epoch", t["check_val_every_n_epoch"], "a whole number ≥ 1 or null")
    interval = t.get("val_check_interval")
    if interval is not None and not ((whole(interval) and interval >= 1)
                                     or (isinstance(interval, float) and 0 < interval <= 1)):
        raise bad("trainer.val_check_interval", interval, "a fraction of an epoch in (0, 1] or a step count ≥ 1")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = t.get(key)
        if value is not None and not ((whole(value) and value >= 0)
                                      or (isinstance(value, float) and 0 <= value <= 1)):
            raise bad(f"trainer.{key}", value, "a batch count ≥ 0, a fraction in [0, 1] or null (all)")
    d = dict(data_cfg or {})
    for key in ("batch_size", "eval_batch_size"):
        if d.get(key) is not None and not (whole(d[key]) and d[key] >= 1):
            raise bad(f"task.data.{key}", d[key], "a whole number ≥ 1")
    for split, limit in dict(d.get("max_examples") or {}).items():
        if limit is not None and not (whole(limit) and limit >= 1):
            raise bad(f"task.data.max_examples.{split}", limit, "a row count ≥ 1 or null (all)")


def train_batch_sizes(perf: Mapping | None) -> list[int]:
    """perf.train_batch_sizes as a list of batch sizes ([] or missing: training throughput is not measured)."""
    sizes = (perf or {}).get("train_batch_sizes")
    if sizes is None:
        return []
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes):
        shown = list(sizes) if isinstance(sizes, Sequence) and not isinstance(sizes, (str, bytes)) else sizes
        raise SqueezeError(f"perf.train_batch_sizes={shown!r} must be a list of whole numbers ≥ 1 "
                           "(e.g. [4, 12]), or [] to skip training throughput")
    return [int(b) for b in sizes]


# -- compressor settings in a mixed sweep --------------------------------------------------------------
_COMPRESSOR_SETTING = re.compile(r"^compress\.[A-Za-z_][\w-]*\.")


def lenient_compressor_settings(argv: list[str]) -> list[str]:
    """`compress.<name>.<key>=v` set once for a whole command line: `python train.py -m compress=none,imp
    compress.imp.end_step=10`. The `none` cell has no `compress.imp` node, and Hydra refuses a key that is not
    in the config, so such overrides are made `++` (set or add); a node that holds settings but no
    `_target_` is a compressor this cell does not use, and squeeze.run.build.chain skips it. The sweeper
    (squeeze.run.sweep) also drops them from the cells that do not use them, so no duplicate cells run."""
    return [f"++{arg}" if _COMPRESSOR_SETTING.match(arg) else arg for arg in argv]


def used_compressors(compress_cfg: Mapping | None) -> dict:
    """The entries of cfg.compress that build a compressor (a `_target_`), in order; settings given for
    a compressor the cell does not use are left out."""
    return {str(k): v for k, v in (compress_cfg or {}).items()
            if v is not None and (not isinstance(v, Mapping) or "_target_" in v)}


# -- compressor settings, checked before anything loads ------------------------------------------------
_CONF = Path(__file__).resolve().parent.parent / "conf"
_HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_convert_", "_recursive_")


@functools.cache
def compressor_options() -> dict[str, dict]:
    """Every compressor (conf/compress/<name>.yaml) and its settings as its YAML lists them (`none`: none)."""
    options = {}
    for path in sorted((_CONF / "compress").glob("*.yaml")):
        node = (OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}).get(path.stem)
        options[path.stem] = node if isinstance(node, dict) else {}
    return options


def check_compressor_setting(name: str, path: list[str], target: str | None = None) -> None:
    """`compress.<name>.<path>`: `name` must be a compressor and `path` one of its settings: a key of its YAML
    (nested ones too, e.g. student.layers), `label` (the report's, every compressor has it), or a parameter of
    its class. `target`: the node's own `_target_`, for a compressor given on the command line."""
    options = compressor_options()
    names = [n for n in options if n != "none"]
    if name not in options and target is None:
        raise SqueezeError(f"compress.{name}: no compressor {name!r}{_did_you_mean(name, names)} "
                           f"(compressors: {', '.join(names)})")
    yaml_node = options.get(name, {})
    known = set(yaml_node) | {"label"}
    where = ".".join(["compress", name, *path])
    if path[0] not in known:  # only then the class is imported, for the parameters its YAML leaves out
        parameters, anything = _parameters(target or yaml_node.get("_target_"))
        known |= parameters
        if path[0] not in known and not anything:
            raise SqueezeError(f"{where}: {name} has no setting {path[0]!r}"
                               f"{_did_you_mean(path[0], sorted(known - set(_HYDRA_KEYS))) or _listed(yaml_node)}")
    node = yaml_node.get(path[0])
    for depth in range(1, len(path)):  # nested settings are checked as deep as the YAML spells them out
        if not isinstance(node, dict) or not node:
            return
        if path[depth] not in node:
            prefix = ".".join(path[:depth]) + "."
            raise SqueezeError(f"{where}: {name} has no setting {prefix + path[depth]!r}"
                               f"{_did_you_mean(path[depth], list(node), prefix)}")
        node = node[path[depth]]


def check_compressor_config(compress_cfg: Mapping | None) -> None:
    """A run's composed `compress`: every node names a compressor and holds only its settings. A node without
    `_target_` holds settings for a compressor the run does not use; squeeze's sweeper keeps such settings only
    in the cells that use them, so in a run they are a mistake (a misspelt or missing compress= choice)."""
    nodes = OmegaConf.to_container(compress_cfg, resolve=False) if OmegaConf.is_config(compress_cfg) \
        else dict(compress_cfg or {})
    for name, node in nodes.items():
        if not isinstance(node, dict):
            continue
        paths = list(_setting_paths(node, compressor_options().get(str(name)) or {}))
        for path in paths:
            check_compressor_setting(str(name), path, node.get("_target_"))
        if "_target_" in node:
            check_compressor_values(str(name), node)
        if "_target_" not in node:
            check_compressor_setting(str(name), paths[0] if paths else ["_target_"])  # an unknown name first
            chain = chain_name(nodes)
            with_it = name if chain == "none" else "[" + chain.replace("+", ",") + f",{name}]"
            raise SqueezeError(f"compress.{'.'.join([str(name), *(paths[0] if paths else [])])}: this run's chain "
                               f"(compress={chain}) does not use {name}; add it (compress={with_it}) or drop the "
                               "setting")


def check_compressor_values(name: str, node: Mapping) -> None:
    """A compressor class's own check of its settings' values (`check_values(name, settings)`, where it has one), so a
    bad value stops a run, or a whole -m sweep, before anything loads rather than when that cell builds its chain."""
    module, _, cls = str(node["_target_"]).rpartition(".")
    try:
        check = getattr(getattr(importlib.import_module(module), cls), "check_values", None)
    except (ImportError, AttributeError):
        return  # an unimportable _target_ fails where the chain is built, with its own message
    if check is not None:
        check(name, {k: v for k, v in node.items() if k != "_target_"})


def _setting_paths(node: Mapping, yaml_node: Mapping, prefix: tuple = ()):
    for key, value in node.items():
        if key == "_target_":
            continue
        spelt_out = yaml_node.get(key) if isinstance(yaml_node, Mapping) else None
        if isinstance(value, Mapping) and value and isinstance(spelt_out, Mapping) and spelt_out:
            yield from _setting_paths(value, spelt_out, (*prefix, str(key)))
        else:
            yield [*prefix, str(key)]


def _parameters(target: str | None) -> tuple[set[str], bool]:
    """The keyword parameters `target` takes, and whether it takes any (**kwargs)."""
    if not target:
        return set(), False
    module, _, attribute = str(target).rpartition(".")
    try:
        signature = inspect.signature(getattr(importlib.import_module(module), attribute))
    except Exception:  # an unimportable target fails later with its own message; its YAML keys still hold
        return set(), False
    params = signature.parameters.values()
    return ({p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)},
            any(p.kind == p.VAR_KEYWORD for p in params))


def _did_you_mean(word: str, candidates, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def _listed(yaml_node: Mapping) -> str:
    keys = [k for k in yaml_node if k not in _HYDRA_KEYS]
    return f" (settings: {', '.join(keys)})" if keys else ""


# -- optimizer and scheduler, tried before anything loads ------------------------------------------------
def check_optimizer(optimizer_cfg: Mapping | None, scheduler_cfg: Mapping | None) -> None:
    """Build the optimizer and scheduler once on a dummy parameter: a value torch refuses (optimizer.lr=-1) or a
    setting the class does not take would otherwise stop the run inside fit with a traceback."""
    if optimizer_cfg is None:
        return
    import torch

    optimizer = _tried("optimizer", optimizer_cfg, lambda make: make([torch.nn.Parameter(torch.zeros(1))]))
    if scheduler_cfg is not None:  # squeeze.tasks.base.FineTune hands it the optimizer and the step count
        _tried("scheduler", scheduler_cfg, lambda make: make(optimizer, total_steps=100))


def _tried(group: str, node: Mapping, call: Callable):
    from hydra.utils import instantiate

    settings = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in _HYDRA_KEYS} \
        if OmegaConf.is_config(node) else {k: v for k, v in dict(node).items() if k not in _HYDRA_KEYS}
    target = str(node.get("_target_"))
    known, anything = _parameters(target)
    for key in settings:
        if known and key not in known and not anything:
            raise SqueezeError(f"{group}.{key}: {target} has no setting {key!r}"
                               f"{_did_you_mean(key, sorted(known - {'params', 'optimizer'}))}")
    try:
        return call(instantiate(node))
    except Exception as e:
        cause = e.__cause__ if e.__cause__ is not None and type(e).__name__ == "InstantiationException" else e
        text = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        named = [k for k, v in settings.items()  # the settings whose value the message quotes
                 if not isinstance(v, bool) and re.search(rf"(?<![\w.]){re.escape(str(v))}(?![\w.])", text)]
        what = ", ".join(f"{group}.{k}={settings[k]}" for k in named) if named else f"{group} ({target})"
        raise SqueezeError(f"{what}: {target} refuses it ({text}); fix the setting") from None


# -- a local model directory, whatever model= says -------------------------------------------------------
def settle_model_directory(cfg) -> None:
    """`model.name_or_path=<directory>`: the directory is the model, whatever model= chose (an asset or random-init
    config has no such key: lenient_settings made it set-or-add). The spec becomes a Pretrained one named after the
    directory, whose kind (encoder/decoder) squeeze.models reads from its config.json."""
    node = cfg.get("model")
    if node is None or "name_or_path" not in node:
        return
    if OmegaConf.is_missing(node, "name_or_path"):
        raise SqueezeError(f"model={LOCAL_MODEL} needs model.name_or_path=<a saved transformers model directory>")
    location = str(node.name_or_path)
    local = location.startswith((".", "/", "~")) or Path(location).expanduser().is_dir()
    if node.get("_target_") == PRETRAINED and node.get("asset") is None and not local:
        return  # a hub id in a hub model's config, as that config means it
    if local and not Path(location).expanduser().is_dir():
        raise SqueezeError(f"model directory {location} does not exist; check model.name_or_path")
    is_local_choice = node.get("name") == LOCAL_MODEL
    spec = {"_target_": PRETRAINED,
            "name": Path(location).expanduser().resolve().name if local else str(node.get("name")),
            "kind": node.get("kind") if is_local_choice else None,  # None: from config.json
            "name_or_path": location, "dtype": str(node.get("dtype") or "float32")}
    with open_dict(cfg):
        cfg.model = spec


def check_before_loading(cfg, sweep: bool = False) -> None:
    """What the entry points check and settle on the composed config before a run loads anything; `sweep`: this
    job is a cell of a -m sweep."""
    if cfg.get("search") is not None and not sweep:  # hydra/sweeper=search or a preset's search: without -m
        raise SqueezeError("search: a search is a sweep and runs only with -m (python train.py -m "
                           "hydra/sweeper=search ...); without -m it would train one run and search nothing")
    check_compressor_config(cfg.get("compress"))
    if OmegaConf.select(cfg, "checkpoint.keep_after_success") is not None:
        retention.check(cfg.checkpoint.keep_after_success)
    if cfg.get("report") is not None:  # a preset's report layout: checked now, not when the report is drawn
        from squeeze.report.aggregate import check_report_section

        check_report_section(OmegaConf.to_container(cfg.report, resolve=True))
    if cfg.get("perf") is not None:  # measured after training: a bad value would otherwise surface only then
        from squeeze.measure import perf_devices

        perf = OmegaConf.to_container(cfg.perf, resolve=True)
        train_batch_sizes(perf)
        perf_devices(perf.get("devices"))
    if cfg.get("pipeline") is not None:  # hardware=pipeline's window of iterations
        from squeeze.hardware.pipeline import check_window

        check_window(OmegaConf.to_container(cfg.pipeline, resolve=True).get("window"))
    check_task_module(OmegaConf.select(cfg, "task.module"))
    if OmegaConf.select(cfg, "callbacks.energy") is not None:  # measured from the first step: checked now
        from squeeze.measure.energy import check_components

        check_components(OmegaConf.select(cfg, "callbacks.energy.components", default="all"))
    settle_model_directory(cfg)
    check_optimizer(cfg.get("optimizer"), cfg.get("scheduler"))


def check_task_module(module) -> None:
    """A task module's choices (dialog's bleu_smoothing, hits_rank) checked before the model loads: its class's
    `check_settings`, where it has one."""
    target = None if module is None else module.get("_target_")
    if not target:
        return
    from hydra.utils import get_class

    try:
        cls = get_class(str(target))
    except Exception:  # a target that does not import is reported when the run builds it, with Hydra's message
        return
    check = getattr(cls, "check_settings", None)
    if check is not None:
        check(OmegaConf.to_container(module, resolve=True))


# -- the entry points around Hydra's main --------------------------------------------------------------
_MODEL_DIRECTORY = re.compile(r"^model\.name_or_path=")
_MODEL_CHOICE = re.compile(r"^\+{0,2}model=")
_one_line_errors = False


def lenient_settings(argv: list[str]) -> list[str]:
    """The command line as the entry points pass it to Hydra: compressor settings set-or-add (above), and
    `model.name_or_path=<dir>` taken whatever model= is (set-or-add), or with no model= as model=local."""
    argv = lenient_compressor_settings(argv)
    if not any(_MODEL_DIRECTORY.match(arg) for arg in argv):
        return argv
    if any(_MODEL_CHOICE.match(arg) for arg in argv):
        return [f"++{arg}" if _MODEL_DIRECTORY.match(arg) else arg for arg in argv]
    return [*argv, f"model={LOCAL_MODEL}"]


def run_entry(main: Callable[[], Any]) -> None:
    """train.py / evaluate.py: Hydra's main with the lenient command line, and what stops before a run starts
    (Hydra's own composition errors, the sweeper's refusals) as one `error:` line and exit code 2, not a
    traceback. Hydra prints such errors itself unless HYDRA_FULL_ERROR is set; set, it raises them here. Once
    runs start it is unset again (runs_started), so errors inside a run are reported as before. A user's own
    HYDRA_FULL_ERROR=1 keeps the full traceback."""
    global _one_line_errors
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    sys.argv[1:] = lenient_settings(sys.argv[1:])
    _one_line_errors = os.environ.get("HYDRA_FULL_ERROR") != "1"
    if _one_line_errors:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException, SqueezeError) as e:
        if not _one_line_errors:
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def runs_started() -> None:
    """The job's first step (and the sweeper's, once its cells are settled): from here on Hydra reports what goes
    wrong its own way again."""
    if _one_line_errors:
        os.environ.pop("HYDRA_FULL_ERROR", None)


def error_line(error: BaseException) -> str:
    """Hydra's (or OmegaConf's) message in one line, with the closest valid name where one can be told."""
    from hydra.errors import MissingConfigException

    if isinstance(error, SqueezeError):
        return str(error)
    if isinstance(error, MissingConfigException) and error.options:
        wanted = str(error.missing_cfg_file or "").rsplit("/", 1)[-1]
        group = str(error.missing_cfg_file or "").rpartition("/")[0]
        return (f"{_lines(str(error))[0]}{_did_you_mean(wanted, error.options)} "
                f"(options{f' in {group!r}' if group else ''}: {', '.join(error.options)})")
    cause = error.__cause__
    parent, key = getattr(cause, "parent_node", None), getattr(cause, "key", None)
    if parent is not None and key is not None and OmegaConf.is_dict(parent) and "not in struct" in str(cause):
        full_key = str(getattr(cause, "full_key", key))
        prefix = full_key[: len(full_key) - len(str(key))]
        if full_key == "search":  # the search's settings exist only once its sweeper is chosen
            return ("search: the search's settings come with its sweeper; add -m hydra/sweeper=search "
                    "(python train.py -m hydra/sweeper=search search.trials=... search.objectives=[...] ...)")
        first, *rest = _lines(str(error))
        close = difflib.get_close_matches(str(key), [str(k) for k in parent.keys()], n=1, cutoff=0.6)
        hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
        append = f"; {rest[0][0].lower()}{rest[0][1:]}" if rest else ""  # Hydra's "To append ... use +key=value"
        return f"{first.rstrip('.')}: {_lines(str(cause))[0]}{hint}{append}"
    return "; ".join(_lines(str(error)) + (_lines(str(cause)) if isinstance(cause, Exception) else []))


def _lines(text: str) -> list[str]:
    """The message's lines without OmegaConf's location lines and Hydra's config search path."""
    out = []
    for line in (x.strip() for x in text.splitlines()):
        if line.startswith("Config search path"):
            break
        if line and not line.startswith(("full_key:", "object_type=", "reference_type=")):
            out.append(line)
    return out or [text.strip()]
