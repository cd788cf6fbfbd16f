"""Build a model + tokenizer for a task head, from a hub id, a local directory, an offline asset,
or a random-init config of a real architecture.

A model config (conf/model/*.yaml) instantiates a *spec*; the run asks the spec for a tokenizer and
for a model with the head the task needs. Keeping the head out of the model config is what lets
every model go with every task in a sweep.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from squeeze import arch, assets
from squeeze.arch.loading import HEADS
from squeeze.errors import SqueezeError

log = logging.getLogger("squeeze")

# model.kind in conf/model/*.yaml (encoder | decoder), as the adapters call it; which heads make sense for
# each kind is their knowledge (squeeze.arch.base).
KINDS = tuple(arch.HEADS_FOR_KIND)


def check_compatible(model_name: str, kind: str, task_name: str, head: str) -> None:
    """Fail fast, before any data or weights load, on a model × task pair that cannot work."""
    if kind not in KINDS:
        raise SqueezeError(f"model.kind={kind!r} is not one of {list(KINDS)}")
    if head not in HEADS:
        raise SqueezeError(f"task.head={head!r} is not one of {sorted(HEADS)}")
    if head not in arch.HEADS_FOR_KIND[kind]:
        fix = ("an encoder model (e.g. model=tiny_bert, minilm, bert-base-uncased)" if head == "masked_lm"
               else "a decoder model (e.g. model=tiny_gpt2, gpt2, smollm2)")
        raise SqueezeError(f"task={task_name} needs a {head} head, which model={model_name} ({kind}) does not have; "
                           f"pick {fix}")


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total, non-zero) parameters, counting shared (tied) tensors once."""
    seen: set[int] = set()
    total = nonzero = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()).item())
    return total, nonzero


LM_HEADS = ("causal_lm", "masked_lm")  # predict tokens: no label set


def _head_kwargs(head: str, labels: Sequence[str] | None) -> dict[str, Any]:
    if head in LM_HEADS:
        return {}
    if not labels:
        raise SqueezeError(f"a {head} head needs task.data.labels (the list of class names)")
    labels = list(labels)
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def prepare_tokenizer(tokenizer, model_type: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer with its family's quirks settled (a pad token); the generic rule when the family
    is not known offline (a hub id without network)."""
    adapter = (arch.find_adapter(model_type) if model_type else None) or arch.Adapter()
    return adapter.prepare_tokenizer(tokenizer)


def check_head(model_type: str | None, head: str, model_name: str) -> None:
    """Refuse a head transformers does not have for this family (e.g. OPT has no token classification)."""
    adapter = arch.find_adapter(model_type) if model_type else None
    if adapter is not None and head not in adapter.heads:
        raise SqueezeError(f"model={model_name} ({adapter.family}) has no {head} head in transformers; it has "
                           f"{', '.join(adapter.heads)}: pick a task that needs one of those, or another model")


def finish_model(model: PreTrainedModel, tokenizer) -> PreTrainedModel:
    """Make the model agree with the tokenizer on padding (sequence heads pool the last non-pad)."""
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def check_labels(model: PreTrainedModel, head: str, labels: Sequence[str] | None, source: str) -> None:
    """A fine-tuned head must predict the task's label set, in the same order."""
    if head in LM_HEADS or not labels:
        return
    have = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if have != list(labels):
        raise SqueezeError(
            f"label set mismatch: {source} predicts {have} but the task has {list(labels)}; "
            f"evaluate it on the task it was trained on, or set task.data.labels to match"
        )


class ModelSpec:
    """What a model config builds: a name, a kind (encoder | decoder), a tokenizer and a model for a head."""

    def __init__(self, name: str, kind: str):
        self.name = name
        self.kind = kind

    def tokenizer(self):
        raise NotImplementedError

    def build(self, head: str, labels: Sequence[str] | None = None) -> PreTrainedModel:
        raise NotImplementedError

    def model_type(self) -> str | None:
        """The transformers architecture name ("bert", "gpt2", "llama", "opt"), if knowable offline."""
        raise NotImplementedError


class Pretrained(ModelSpec):
    """Pretrained weights from a hub id, a local directory, or an offline asset (by asset name). `kind: null`
    (model=local, or any model= given model.name_or_path=<dir>): encoder or decoder as config.json's
    architecture says (its adapter in squeeze.arch)."""

    def __init__(
        self,
        name: str,
        kind: str | None,
        name_or_path: str | None = None,
        asset: str | None = None,
        dtype: str = "float32",
    ):
        super().__init__(name, kind)
        if (name_or_path is None) == (asset is None):
            raise SqueezeError(f"model {name}: give exactly one of name_or_path or asset")
        self.name_or_path = name_or_path
        self.asset = asset
        self.dtype = dtype

    # Read when first asked (the run asks before anything loads), not in __init__: Hydra's instantiate would wrap
    # the one-line error of a bad directory in its own.
    @property
    def kind(self) -> str:
        if self._kind is None:
            self._kind = self._read_kind()
        return self._kind

    @kind.setter
    def kind(self, value: str | None) -> None:
        self._kind = value

    def _read_kind(self) -> str:
        config = self._load(AutoConfig.from_pretrained, "config")
        adapter = arch.find_adapter(config.model_type)
        if adapter is None:
            raise SqueezeError(f"model {self.name}: {self.location} holds a {config.model_type!r} model, which squeeze "
                               f"has no adapter for, so it cannot tell encoder from decoder; give model.kind=encoder "
                               f"or decoder (families with adapters: {arch.supported()})")
        self._model_type = config.model_type
        return adapter.kind

    @property
    def location(self) -> str:
        return str(assets.locate(self.asset)) if self.asset else str(self.name_or_path)

    def _load(self, fn, what: str, **kwargs):
        location = self.location
        local = location.startswith((".", "/", "~"))
        if local and not Path(location).expanduser().exists():
            raise SqueezeError(f"model directory {location} does not exist; check model.name_or_path")
        try:
            return fn(str(Path(location).expanduser()) if local else location, **kwargs)
        except OSError as e:
            if local or Path(location).is_dir():  # no network involved: say what the directory lacks
                raise SqueezeError(f"could not load the {what} of model {self.name} from directory {location} "
                                   f"({_first_line(e)}); give a directory save_pretrained wrote (config.json, "
                                   "weights, tokenizer files)") from e
            raise SqueezeError(
                f"could not load the {what} of model {self.name} from {location!r} ({_first_line(e)}); "
                "without network use an offline model (model=minilm, smollm2, tiny_bert, tiny_gpt2, "
                "tiny_llama) or a local directory (model.name_or_path=/path/to/model)"
            ) from e

    def tokenizer(self):
        return prepare_tokenizer(self._load(AutoTokenizer.from_pretrained, "tokenizer"), self.model_type())

    def model_type(self) -> str | None:
        # Asked for the tokenizer and again for the model: read config.json once.
        if not hasattr(self, "_model_type"):
            try:
                self._model_type = AutoConfig.from_pretrained(self.location).model_type
            except (OSError, SqueezeError):
                self._model_type = None
        return self._model_type

    def build(self, head: str, labels: Sequence[str] | None = None) -> PreTrainedModel:
        kwargs = _head_kwargs(head, labels)
        check_head(self.model_type(), head, self.name)
        pruned = self._pruned_directory()
        if pruned is not None:  # a pruned squeeze run's model: its body, zeros kept, under this task's head
            from squeeze.formats.sparse import load_sparse_body

            model, left, new = load_sparse_body(pruned, head, **kwargs)
            log.info("model %s: the pruned model's body under a new %s head (initialised: %s; left: %s)", self.name,
                     head, ", ".join(new) or "nothing", ", ".join(left) or "nothing")
            return model.to(getattr(torch, self.dtype))
        return self._load(
            HEADS[head].from_pretrained, "weights", dtype=getattr(torch, self.dtype), **kwargs
        )

    def _pruned_directory(self) -> Path | None:
        """The directory when it holds squeeze's sparse format (a pruned run's model/), which from_pretrained cannot
        read; None otherwise."""
        from squeeze.formats import sparse

        directory = Path(self.location).expanduser()
        return directory if (directory / sparse.SPARSE_FILE).is_file() else None


class RandomInit(ModelSpec):
    """A random-init model of a real architecture (`config` holds its sizes) with a real tokenizer.

    Built without any network: the tokenizer comes from an offline asset, a directory, or a transformers
    tokenizer class that needs no files (`tokenizer_class: ByT5Tokenizer`: UTF-8 bytes, a 384-token
    vocabulary, for a character-level model trained from scratch), and the vocabulary size is taken from
    it so the two always agree.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        config: dict[str, Any],
        tokenizer_asset: str | None = None,
        tokenizer_path: str | None = None,
        tokenizer_class: str | None = None,
    ):
        super().__init__(name, kind)
        if sum(t is not None for t in (tokenizer_asset, tokenizer_path, tokenizer_class)) != 1:
            raise SqueezeError(f"model {name}: give exactly one of tokenizer_asset, tokenizer_path or tokenizer_class")
        if tokenizer_class is not None and not _needs_no_files(tokenizer_class):
            raise SqueezeError(f"model {name}: tokenizer_class={tokenizer_class} is not a transformers tokenizer that "
                               "builds without files; use ByT5Tokenizer, or tokenizer_asset / tokenizer_path")
        self.config = dict(config)
        self.tokenizer_asset = tokenizer_asset
        self.tokenizer_path = tokenizer_path
        self.tokenizer_class = tokenizer_class

    def model_type(self) -> str | None:
        return self.config["model_type"]

    def tokenizer(self):
        if self.tokenizer_class is not None:
            return prepare_tokenizer(getattr(transformers, self.tokenizer_class)(), self.model_type())
        path = assets.locate(self.tokenizer_asset) if self.tokenizer_asset else self.tokenizer_path
        return prepare_tokenizer(AutoTokenizer.from_pretrained(str(path)), self.model_type())

    def build(self, head: str, labels: Sequence[str] | None = None) -> PreTrainedModel:
        check_head(self.model_type(), head, self.name)
        tokenizer = self.tokenizer()
        settings = dict(self.config)
        model_type = settings.pop("model_type")
        settings.setdefault("vocab_size", len(tokenizer))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token_id = getattr(tokenizer, key, None)
            if token_id is not None:
                settings.setdefault(key, token_id)
        config = AutoConfig.for_model(model_type, **settings, **_head_kwargs(head, labels))
        # from_config draws weights from torch's global RNG, which the run has seeded.
        return HEADS[head].from_config(config)


def _needs_no_files(name: str) -> bool:
    """A tokenizer class transformers builds with no vocabulary file that still reads text (byte-level: ByT5,
    CANINE); GPT2Tokenizer() or BertTokenizer() build too, empty, and turn text into nothing or [UNK]."""
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
        return False
    try:
        tokenizer = cls()
        text = "Pride, 1813"
        return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    except Exception:  # noqa: BLE001 - any failure means it needs files or arguments
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
