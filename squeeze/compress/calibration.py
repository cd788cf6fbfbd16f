"""Calibration data for the post-training methods (SmoothQuant, GPTQ, Wanda, SparseGPT), and the
statistics they read from it.

Batches: `calibration_batches` takes either token-id sequences (a language-modelling corpus: seeded
random windows of `seq_len` tokens from the concatenated stream, as GPTQ and SparseGPT sample C4) or a
task's DataLoader (classification, NER: `samples` whole examples drawn with the seed, keeping the
task's own format and attention masks). Either way a list of input dicts ready for `model(**batch)`.

Statistics, per Linear (or GPT-2 Conv1D) input, over every real token (padding is skipped where the
batch carries an attention mask):
  absmax   max_t |x_tj|                 per input channel (SmoothQuant)
  sq_sum   Σ_t x_tj²                    per input channel; sqrt = ||X_j||₂ (Wanda)
  hessian  H = 2/n Σ_t x_t x_tᵀ         [in, in], a running mean in float32 (GPTQ, SparseGPT)

`collect_stats` runs the batches through the model once. `sequential` is what GPTQ / SparseGPT /
Wanda do instead: block by block through the layer stack, so block i is calibrated on the outputs of
the already-compressed blocks before it (errors of earlier layers are seen, and compensated, by
later ones). Memory: the inputs of one block for all samples are held (plus its outputs while it
runs): 2 × samples × seq_len × hidden × 4 bytes — 2 × 128 × 512 × 576 × 4 ≈ 300 MB for SmolLM2-135M,
~4 GB for a 4096-wide 7B model; the Hessians of one block's layers come on top (in² × 4 bytes each).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from squeeze.arch import adapter_for
from squeeze.arch.linear import as_out_in, features, projection_kind
from squeeze.compress import Compressor
from squeeze.errors import SqueezeError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# -- calibration batches ---------------------------------------------------------------------------
def calibration_windows(sequences: Iterable[Sequence[int]], samples: int = 128, seq_len: int = 512,
                        seed: int = 0, batch_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """`samples` windows of `seq_len` tokens at seeded random offsets of the concatenated sequences."""
    _check_counts(samples, seq_len, batch_size)
    pieces = [torch.as_tensor(seq, dtype=torch.long).reshape(-1) for seq in sequences]
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    if len(stream) < seq_len:
        raise SqueezeError(f"calibration needs at least seq_len={seq_len} tokens but the data has {len(stream)}; "
                           "lower seq_len or give more text (a larger train split or calibration.data_files)")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len + 1, (samples,), generator=generator)
    windows = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]


def calibration_examples(loader: Iterable[Mapping[str, torch.Tensor]], samples: int = 128, seq_len: int = 512,
                         seed: int = 0, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """`samples` examples drawn with the seed from a task's batches (model inputs only, cut to `seq_len`),
    rebatched by `batch_size`; padding columns that no chosen example uses are dropped."""
    _check_counts(samples, seq_len, batch_size)
    rows: list[dict[str, torch.Tensor]] = []
    for batch in loader:
        keys = [k for k in MODEL_INPUTS if k in batch]
        if "input_ids" not in keys:
            raise SqueezeError("calibration batches need an 'input_ids' entry; pass the task's train DataLoader")
        for i in range(len(batch["input_ids"])):
            rows.append({k: batch[k][i, :seq_len] for k in keys})
    if not rows:
        raise SqueezeError("the calibration data is empty; check the task's train split")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(rows), generator=generator)[:samples].tolist()
    out = []
    for i in range(0, len(chosen), batch_size):
        group = [rows[j] for j in chosen[i:i + batch_size]]
        width = max(r["input_ids"].shape[-1] for r in group)
        batch = {k: torch.stack([_pad(r[k], width) for r in group]) for k in group[0]}
        if "attention_mask" in batch:  # examples cut or padded unevenly: keep only columns some row uses
            used = int(batch["attention_mask"].any(0).nonzero().max()) + 1
            batch = {k: v[:, :used] for k, v in batch.items()}
        out.append(batch)
    return out


def calibration_batches(source, samples: int = 128, seq_len: int = 512, seed: int = 0,
                        batch_size: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Calibration inputs from token-id sequences (windows) or from a DataLoader of dict batches (examples)."""
    items = source if isinstance(source, (list, tuple)) else None
    if items is not None and (not items or not isinstance(items[0], Mapping)):
        return calibration_windows(items, samples, seq_len, seed, batch_size or 1)
    return calibration_examples(source, samples, seq_len, seed, batch_size or 8)


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # zeros: pad id 0 under a zero mask


def _check_counts(samples: int, seq_len: int, batch_size: int) -> None:
    for name, value in (("samples", samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SqueezeError(f"calibration {name}={value!r} must be a positive integer")


# -- which layers ----------------------------------------------------------------------------------
def linear_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The Linear and Conv1D layers inside `module`, by name relative to it."""
    return {n: m for n, m in module.named_modules() if projection_kind(m) is not None}


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The transformer's block list, as the model family's adapter knows it."""
    return adapter_for(model).layer_stack(model)[1]


# -- statistics ------------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """Running input statistics of one layer (see the module docstring)."""

    in_features: int
    with_hessian: bool = True
    tokens: int = field(default=0, init=False)
    absmax: torch.Tensor = field(init=False)
    abs_sum: torch.Tensor = field(init=False)
    sq_sum: torch.Tensor = field(init=False)
    hessian: torch.Tensor | None = field(default=None, init=False)

    def __post_init__(self):
        self.absmax = torch.zeros(self.in_features)
        self.abs_sum = torch.zeros(self.in_features)
        self.sq_sum = torch.zeros(self.in_features)
        if self.with_hessian:
            self.hessian = torch.zeros(self.in_features, self.in_features)

    @property
    def mean_abs(self) -> torch.Tensor:
        """mean |X_j| per input channel (AWQ's activation term)."""
        return self.abs_sum / max(self.tokens, 1)

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||₂ per input channel (Wanda's activation term)."""
        return self.sq_sum.sqrt()

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        if self.absmax.device != x.device:  # accumulate where the model runs (a GPU's matmul for H)
            self.absmax, self.sq_sum = self.absmax.to(x.device), self.sq_sum.to(x.device)
            self.abs_sum = self.abs_sum.to(x.device)
            self.hessian = None if self.hessian is None else self.hessian.to(x.device)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.abs_sum += x.abs().sum(0)
        self.sq_sum += (x * x).sum(0)
        if self.hessian is not None:
            # H stays the mean of 2·x xᵀ: rescale the old mean, add the new rows scaled by sqrt(2/total).
            total = self.tokens + n
            self.hessian *= self.tokens / total
            x = x * (2.0 / total) ** 0.5
            self.hessian += x.t() @ x
        self.tokens += n


class _Mask:
    """The attention mask of the batch running now, so hooks can skip padded tokens."""

    current: torch.Tensor | None = None


def _real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device).bool()]
    return x


@contextlib.contextmanager
def recording(layers: Mapping[str, nn.Module], hessian: bool = True):
    """Hooks that feed every call's input of `layers` into a LayerStats per name (yielded)."""
    stats = {name: LayerStats(features(m)[1], hessian) for name, m in layers.items()}
    handles = [m.register_forward_pre_hook(lambda mod, args, s=stats[name]: s.add(_real_tokens(args[0], _Mask.current)))
               for name, m in layers.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def collect_stats(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]],
                  layers: Mapping[str, nn.Module] | None = None, hessian: bool = True) -> dict[str, LayerStats]:
    """Stream `batches` through `model` once; input statistics of `layers` (default: every Linear/Conv1D)."""
    layers = linear_layers(model) if layers is None else layers
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        with recording(layers, hessian) as stats:
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                _Mask.current = batch.get("attention_mask")
                model(**batch)
    finally:
        _Mask.current = None
        model.train(was_training)
    return stats


class _Captured(Exception):
    """Raised by the hook on block 0 once its inputs are stored: nothing after it needs to run."""


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def sequential(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]],
               compress_block: Callable[[int, nn.Module, dict[str, LayerStats]], None],
               hessian: bool = True, stack: nn.ModuleList | None = None, within_block: bool = False) -> None:
    """Calibrate and compress the layer stack block by block.

    Block 0's inputs (hidden states and the keyword arguments the model passes every block: masks,
    rotary embeddings) are captured for every batch; then for each block i: its Linear layers' input
    statistics are recorded on those inputs, `compress_block(i, block, stats)` rewrites the block in
    place, and the block is run again so its compressed outputs become block i+1's inputs.

    `within_block`: the same inside each block ("true sequential"): its layers are taken in groups that
    read one input (Llama: q/k/v, then o, then gate/up, then down), in the order the block calls them,
    and each group's statistics are recorded after the groups before it were compressed, so o_proj is
    calibrated on the compressed attention's output; `compress_block` is then called once per group,
    with that group's stats only. One more pass over the block's inputs per group."""
    stack = layer_stack(model) if stack is None else stack
    device = _device(model)
    inputs: list[tuple[torch.Tensor, dict, torch.Tensor | None]] = []

    def capture(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        inputs.append((hidden, {**kwargs, **({"_args": args[1:]} if len(args) > 1 else {})}, _Mask.current))
        raise _Captured

    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        config.use_cache = False  # no key/value cache is built for a pass that stops at block 0
    model.eval()
    handle = stack[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            _Mask.current = batch.get("attention_mask")
            with contextlib.suppress(_Captured):
                model(**batch)
        handle.remove()
        for i, block in enumerate(stack):
            groups = _input_groups(block, inputs[0]) if within_block else [linear_layers(block)]
            for group in groups:
                with recording(group, hessian) as stats:
                    for hidden, kwargs, mask in inputs:
                        _Mask.current = mask
                        _run(block, hidden, kwargs)
                compress_block(i, block, stats)
                del stats  # the Hessians of this group are no longer needed
            if i == len(stack) - 1:
                break  # nothing consumes the last block's outputs here
            outputs = []
            for hidden, kwargs, mask in inputs:
                _Mask.current = mask
                outputs.append((_run(block, hidden, kwargs), kwargs, mask))
            inputs = outputs
    finally:
        handle.remove()
        _Mask.current = None
        if use_cache is not None:
            config.use_cache = use_cache
        model.train(was_training)


def _input_groups(block: nn.Module, sample: tuple) -> list[dict[str, nn.Module]]:
    """The block's Linear/Conv1D layers grouped by the input tensor they read, in call order (one run of `sample`)."""
    layers = linear_layers(block)
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: calls.append((n, args[0])))
               for name, m in layers.items()]
    hidden, kwargs, mask = sample
    try:
        _Mask.current = mask
        _run(block, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[dict[str, nn.Module]] = []
    seen: dict[str, int] = {}
    last_input = None
    for name, x in calls:
        if name in seen:
            continue  # a layer called twice keeps the group of its first call
        if last_input is None or x is not last_input:
            groups.append({})
        groups[-1][name] = layers[name]
        seen[name] = len(groups) - 1
        last_input = x
    missed = {n: m for n, m in layers.items() if n not in seen}  # never called on this input: left to the end
    return groups + ([missed] if missed else [])


def _run(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    kwargs = dict(kwargs)
    extra = kwargs.pop("_args", ())
    return _block_output(block(hidden, *extra, **kwargs))



# -- the compressors that calibrate ------------------------------------------------------------------
CALIBRATION = {"samples": 128, "seq_len": None, "seed": None, "batch_size": 8,  # conf/common.yaml's calibration:
               "data_files": None}
TRAIN_SPLIT, DATA_FILES = "train split", "calibration.data_files"  # record's calibration.source


def calibration_text(data, data_files=None, fitting: bool = False) -> tuple[str, list[str] | None]:
    """Where a run's calibration text comes from: (DATA_FILES, the files resolved) when calibration.data_files
    is set, else (TRAIN_SPLIT, None), the task's train split. Refused when the task's data is one file scored
    whole as the test split (evaluate.py task.data.data_files=<file>): calibrating on the very text that is
    scored would flatter the result, so the user names the calibration text. `fitting`: the run fine-tunes
    on the data first (then a single file is carved into splits and has a train split)."""
    if data_files is not None:
        return DATA_FILES, data.calibration_files(data_files)
    if not data.has_train_split(fitting):
        raise SqueezeError("calibration: task.data.data_files=<one file> is scored whole as the test split, so there "
                           "is no train split to calibrate on; set calibration.data_files=<file or [files]> (text "
                           "in the task's format), or give the task's splits (task.data.data_files={train: ..., "
                           "test: ...})")
    return TRAIN_SPLIT, None


def calibration_from_data(data, samples: int = 128, seq_len: int | None = None, seed: int | None = None,
                          batch_size: int = 8, data_files=None, fitting: bool = False) -> list[dict[str, torch.Tensor]]:
    """Calibration batches from a run's data module (`calibration_text` says which): its train split, or
    `data_files` (calibration.data_files) read as the task reads its files; `samples` drawn with `seed`
    (default: the data's), `seq_len` tokens each (default: the task's input length)."""
    source, files = calibration_text(data, data_files, fitting)
    if source == TRAIN_SPLIT:
        data.setup("fit")
        if "train" not in getattr(data, "datasets", {}):
            raise SqueezeError("calibration draws from the task's train split, which this data has none of; set "
                               "calibration.data_files=<file or [files]>")
    seq_len = seq_len or getattr(data, "input_length", None) or 512
    seed = getattr(data, "seed", 0) if seed is None else seed
    return calibration_batches(data.calibration_source(files), samples, seq_len, seed, batch_size)


class Calibrated(Compressor):
    """A post-training method that reads calibration data and rewrites the model once (`apply`).

    It runs in prepare_model when a later compressor of the chain trains (`trained_after`: training
    starts from its result), otherwise in finalize, on the weights that are tested and saved. The run
    hands it its data module (`calibrate_with`): it calibrates on the task's train split, or on
    calibration.data_files when set; `use_batches` hands it ready batches instead (benchmarks, tests)."""

    after_training = True

    def __init__(self):
        self._data = None
        self._settings = dict(CALIBRATION)
        self._batches: list[dict[str, torch.Tensor]] | None = None
        self.applied = False
        self.calibration: dict = {}
        self.layer_error: dict[str, float] = {}

    @property
    def where(self) -> str:
        return f"compress.{self.name}"

    def calibrate_with(self, data, settings=None, fitting: bool | None = None) -> None:
        unknown = set(settings or {}) - set(CALIBRATION)
        if unknown:
            raise SqueezeError(f"calibration.{sorted(unknown)[0]} is not a calibration setting (known: "
                               f"{', '.join(CALIBRATION)})")
        self._data = data
        self._settings = {**CALIBRATION, **{k: v for k, v in (settings or {}).items()}}
        if data is not None and (fitting is not None or self._settings["data_files"] is not None):
            # What can be told now is refused now, before the model loads: a missing calibration file, or (once
            # the run says whether it fits on the data) no calibration text but the scored file.
            calibration_text(data, self._settings["data_files"], bool(fitting) or self.trained_after)

    def use_batches(self, batches: Sequence[Mapping[str, torch.Tensor]]) -> Calibrated:
        self._batches = list(batches)
        return self

    def check(self, model: nn.Module) -> None:
        """Refuse settings this model cannot take, before anything is trained or calibrated."""

    def apply(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> nn.Module:
        raise NotImplementedError

    def prepare_model(self, model, tokenizer):
        self.check(model)
        return self.run_once(model) if self.trained_after else model

    def finalize(self, model):
        return model if self.applied else self.run_once(model)

    def run_once(self, model: nn.Module) -> nn.Module:
        self.check(model)
        start = time.perf_counter()
        batches, source, files = self._batches, "given batches", None
        if batches is None:
            if self._data is None:
                raise SqueezeError(f"{self.where} needs calibration data: run it through train.py / evaluate.py "
                                   "(the task's train split), or hand it batches with use_batches")
            # Before training (trained_after) the run fits on the data next; after it, a fitted data has its splits.
            source, files = calibration_text(self._data, self._settings["data_files"], self.trained_after)
            batches = calibration_from_data(self._data, **self._settings, fitting=self.trained_after)
        tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                     for b in batches)
        model = self.apply(model, batches)
        self.applied = True
        self.calibration = {
            "source": source,
            **({"data_files": files} if files is not None else {}),
            "samples": sum(len(b["input_ids"]) for b in batches),
            "seq_len": max(b["input_ids"].shape[-1] for b in batches),
            "tokens": tokens,
            "seed": self._settings.get("seed"),
            "applied": "before training" if self.trained_after else "after training",
            "calibrate_seconds": round(time.perf_counter() - start, 3),
        }
        return model

    def summary(self) -> dict:
        out = {"calibration": self.calibration, "calibrate_seconds": self.calibration.get("calibrate_seconds")}
        if self.layer_error:
            out["layer_error"] = {k: round(v, 6) for k, v in self.layer_error.items()}
            out["mean_layer_error"] = round(sum(self.layer_error.values()) / len(self.layer_error), 6)
        return out


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, stats: LayerStats) -> float:
    """||XWᵀ − XŴᵀ||² / ||XWᵀ||² over the calibration tokens, from their Hessian (exact: tr(ΔHΔᵀ) /
    tr(WHWᵀ)); without a Hessian, its diagonal (Σ Δ_ij² ||X_j||², an estimate that ignores correlations)."""
    w, delta = weight.detach().float(), weight.detach().float() - approx.detach().float()
    if stats.hessian is not None:
        h = stats.hessian.to(w.device)
        num, den = ((delta @ h) * delta).sum(), ((w @ h) * w).sum()
    else:
        d = stats.sq_sum.to(w.device)
        num, den = (delta * delta * d).sum(), (w * w * d).sum()
    return float(num / den) if float(den) > 0 else 0.0


def prune_layer_stack(model: nn.Module, batches, prune_one, nm: tuple[int, int] | None, hessian: bool,
                      errors: dict[str, float] | None = None, block_sparsity: Sequence[float] | None = None,
                      within_block: bool = False) -> dict[str, torch.Tensor]:
    """One-shot pruning (Wanda, SparseGPT) of every Linear/Conv1D of the layer stack, block by block on the
    pruned model's own inputs: `prune_one(module, stats, sparsity)` prunes a layer in place and returns its
    keep-mask (stored orientation); `sparsity` is block i's entry of `block_sparsity` (None: the pruner's own).
    Keep-masks by layer name; `errors` (if given) gets each layer's relative output error."""
    from squeeze.compress.sparsity_pattern import check_width

    names = {id(m): n for n, m in model.named_modules()}
    for module in linear_layers(layer_stack(model)).values():  # fail before any calibration runs
        check_width(features(module)[1], nm, names[id(module)])
    masks: dict[str, torch.Tensor] = {}

    def prune_block(index: int, block: nn.Module, stats: dict[str, LayerStats]) -> None:
        sparsity = None if block_sparsity is None else block_sparsity[index]
        for short, module in linear_layers(block).items():
            if short not in stats:
                continue  # another group of this block (within_block)
            original = as_out_in(module).detach().clone() if errors is not None else None
            masks[names[id(module)]] = prune_one(module, stats[short], sparsity)
            if errors is not None:
                errors[names[id(module)]] = relative_output_error(original, as_out_in(module), stats[short])

    sequential(model, batches, prune_block, hessian=hessian, within_block=within_block)
    return masks
