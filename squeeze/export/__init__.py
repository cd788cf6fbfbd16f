"""A run's model as a directory that plain transformers loads, without squeeze (`python -m squeeze.export`).

A run's `model/` keeps squeeze's small on-disk formats (squeeze/formats): pruned weights as a bitmask, GPT-2's
quantized Conv1D and int4 embeddings packed, BERT/GPT-2/OPT with removed heads beside pruned_attention.py
(trust_remote_code). `export` writes the nearest thing `AutoModelFor<head>.from_pretrained(out)` reads in a
Python where squeeze is not installed, and says what that cost:

  format=compressed-tensors (default)   integer layers compressed-tensors can express stay integers (needs the
                                        compressed-tensors package where it is loaded); the others are dequantized
  format=transformers                   every layer float (dequantized): plain safetensors, no extra package
  either way                            pruned zeros stored densely (transformers 5 reads no sparse format);
                                        removed heads / head dims restored as zero rows and columns, so a stock
                                        class computes the same outputs (the MLP's removed rows need nothing:
                                        intermediate_size is a config field); dq's and QAT's input rounding kept
                                        in compressed-tensors, given up in float layers

The logits agree with squeeze's loader to float rounding where the same arithmetic runs (weight-only integers,
sparse and restored models), and to the activation rounding of the two libraries' int8 paths where inputs are
quantized. `squeeze_export.json` in the output says what was written and what was given up.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from squeeze import artifacts, formats
from squeeze.errors import SqueezeError

FORMATS = ("compressed-tensors", "transformers")
EXPORT_FILE = "squeeze_export.json"
# A causal LM's architecture name ends like the stock class: GPT2LMHeadModel, LlamaForCausalLM, ...
_HEAD_SUFFIXES = {"ForSequenceClassification": "sequence_classification",
                  "ForTokenClassification": "token_classification", "ForCausalLM": "causal_lm",
                  "LMHeadModel": "causal_lm", "ForMaskedLM": "masked_lm"}
AUTO_CLASS = {"sequence_classification": "AutoModelForSequenceClassification",
              "token_classification": "AutoModelForTokenClassification", "causal_lm": "AutoModelForCausalLM",
              "masked_lm": "AutoModelForMaskedLM"}


def saved_head(model_dir: Path) -> str:
    """The task head a saved directory was written with, from its config's architecture name."""
    try:
        names = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError) as e:
        raise SqueezeError(f"{model_dir / 'config.json'} could not be read ({e}); give a squeeze run directory") from e
    for name in names:
        for suffix, head in _HEAD_SUFFIXES.items():
            if name.endswith(suffix):
                return head
    raise SqueezeError(f"{model_dir} names no task head squeeze knows (architectures {names}); give the squeeze run "
                       "directory it was saved in")


def _check_out(out: Path, source: Path) -> None:
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise SqueezeError(f"OUT_DIR {out} is inside the model being exported ({source}); give a directory elsewhere")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_FILE).is_file())):
        raise SqueezeError(f"OUT_DIR {out} exists and is not an earlier export (no {EXPORT_FILE}); give a new or "
                           "empty directory (an export never overwrites other files)")


def export(source: str | Path, out: str | Path, fmt: str = "compressed-tensors") -> dict:
    """Write the model of run directory (or saved model directory) `source` to `out` (module docstring); the
    summary, also written to out/squeeze_export.json."""
    if fmt not in FORMATS:
        raise SqueezeError(f"--format {fmt!r} is not one of {' | '.join(FORMATS)}")
    artifact = artifacts.resolve(source, "RUN_DIR", accept=(artifacts.RUN, artifacts.MODEL_DIR),
                                 expected="a squeeze run directory (with model/) or a saved model directory")
    out = Path(out)
    _check_out(out, artifact.model_dir)
    head = artifact.head or saved_head(artifact.model_dir)
    model, tokenizer = artifacts.load(artifact, head, "RUN_DIR")
    source_format = formats.saved_format(artifact.model_dir)
    given_up = _to_stock(model, fmt)
    summary = {
        "source": str(artifact.model_dir), "source_format": source_format,
        "format": formats.COMPRESSED if formats.has_quantized_weights(model) else formats.DENSE,
        "head": head, "load": f"transformers.{AUTO_CLASS[head]}.from_pretrained({str(out)!r})",
        "needs": ["transformers", "compressed-tensors"] if formats.has_quantized_weights(model) else ["transformers"],
        "given_up": given_up,
    }
    pruned = _pruned_matrices(model)
    if pruned:
        entries = sum(n for n, _ in pruned)
        summary["given_up"].append(
            f"sparse storage: {len(pruned)} weight matrices are {sum(z for _, z in pruned) / entries:.1%} zeros, "
            "stored densely (transformers 5 and compressed-tensors 0.20 read no sparse format)")
    tmp, old = out.parent / f".{out.name}.partial", out.parent / f".{out.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    written = False
    try:
        _write(model, tokenizer, tmp, artifact.model_dir)
        summary["bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        summary["source_bytes"] = sum(f.stat().st_size for f in artifact.model_dir.rglob("*") if f.is_file())
        (tmp / EXPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if out.exists():  # an earlier export (checked above), kept until the new one is in place
            out.rename(old)
        tmp.rename(out)
        written = True
    except OSError as e:
        raise SqueezeError(f"could not write the export to {out} ({e.strerror or e}); free disk space or give another "
                           "OUT_DIR") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if written:
            shutil.rmtree(old, ignore_errors=True)
        elif old.exists() and not out.exists():
            old.rename(out)
    return summary


def _to_stock(model, fmt: str) -> list[str]:
    """Rewrite the loaded model, in place, into what stock classes hold; what that gave up, one line each."""
    from squeeze.arch.pruned_attention import LAYOUT, restore_stock
    from squeeze.formats.float_layers import dequantize_layers

    given_up: list[str] = []
    restoring = bool(getattr(model.config, LAYOUT, None))
    if formats.has_quantized_weights(model) and (fmt == "transformers" or restoring):
        inputs = _quantized_inputs(model)
        names = dequantize_layers(model)
        why = "--format transformers" if fmt == "transformers" else \
            "its attention heads are restored as zeros, which needs float layers"
        given_up.append(f"integer storage of {len(names)} layers ({why}): dequantized to float")
        if inputs:
            given_up.append(f"input quantization of {inputs} layers (dq/qat): float layers compute with float inputs")
    elif formats.has_quantized_weights(model):
        refused = {n: why for n, m in model.named_modules() if (why := formats.compressed_tensors_refuses(m))}
        names = dequantize_layers(model, lambda n, m: n in refused)
        for why in dict.fromkeys(refused.values()):
            layers = [n for n, w in refused.items() if w == why]
            more = f" and {len(layers) - 1} more" if len(layers) > 1 else ""
            given_up.append(f"integer storage of {layers[0]}{more}: dequantized, because {why}")
        if len(names) > len(refused):
            given_up.append(f"integer storage of {len(names) - len(refused)} layers tied to those (a tied weight is "
                            "one tensor): dequantized")
    layout = restore_stock(model)
    if layout:
        given_up.append(f"the smaller attention: the removed heads and head dims ({layout} [heads, head_dim] per "
                        "layer) are zero rows and columns again, so a stock class loads it at the unpruned size")
    return given_up


def _quantized_inputs(model) -> int:
    from squeeze.formats.quantized_layers import QuantizedLinear

    return sum(1 for m in model.modules() if isinstance(m, QuantizedLinear)
               and (m.kernel.startswith("dynamic") or m.input_scale is not None))


def _pruned_matrices(model) -> list[tuple[int, int]]:
    """(entries, zeros) of each weight matrix, float or integer, at least a quarter zeros (pruned: a pruned then
    quantized layer keeps its zeros)."""
    out = []
    for p in model.parameters():
        if p.dim() == 2 and p.numel():
            zeros = int((p == 0).sum())
            if zeros >= 0.25 * p.numel():
                out.append((p.numel(), zeros))
    return out


def _write(model, tokenizer, directory: Path, source: Path) -> None:
    from squeeze.formats import compressed

    if formats.has_quantized_weights(model):
        compressed.save_compressed(model, tokenizer, directory)
    else:
        if hasattr(model.config, "quantization_config"):  # read from a compressed-tensors model/: no longer true
            del model.config.quantization_config
        formats.save_dense(model, directory)
        tokenizer.save_pretrained(str(directory))
    for extra in source.glob("task_head.safetensors"):  # dialog's MC head: not part of the transformers model
        shutil.copy2(extra, directory / extra.name)
