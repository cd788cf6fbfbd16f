"""The student: which teacher layers it keeps, which layer pairs PKD matches (pure), and the cut itself,
done by the model family's adapter (squeeze.arch).

Layer numbers a user writes are 1-based hidden-state numbers: 1 is the first layer's output (0 would
be the embeddings), as in the PKD paper's teacher layers {2,4,6,8,10} for a 12→6 student.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from squeeze.arch import adapter_for
from squeeze.errors import SqueezeError

INITS = ("first", "alternate", "skip")
STRATEGIES = ("skip", "last")


def student_layer_ids(teacher_layers: int, student_layers: int, init: str | Sequence[int]) -> list[int]:
    """The teacher layers (0-based) the student keeps, bottom to top.

    first      the first M layers (the thesis' student)
    alternate  one in every L/M, from the bottom: 0,2,4,6,8,10 for 12→6 (DistilBERT's choice)
    skip       one in every L/M, ending at the top: 1,3,5,7,9,11 for 12→6 (the layers PKD-skip matches)
    a list     those teacher layers (1-based)
    """
    L, M = teacher_layers, student_layers
    if M < 1:
        raise SqueezeError(f"student.layers={M}: a student needs at least one layer")
    if M > L:
        raise SqueezeError(f"student.layers={M} is more than the {L} layers it is cut from; choose 1..{L}")
    if isinstance(init, str):
        if init == "first":
            return list(range(M))
        if init == "alternate":
            return [i * L // M for i in range(M)]
        if init == "skip":
            return [(i + 1) * L // M - 1 for i in range(M)]
        raise SqueezeError(f"student.init={init!r} is not one of {list(INITS)} or a list of teacher layers")
    chosen = [int(x) for x in init]
    _check_layer_numbers(chosen, L, "student.init")
    if len(chosen) != M:
        raise SqueezeError(f"student.init lists {len(chosen)} teacher layers but student.layers={M}; list {M}")
    return [x - 1 for x in chosen]


def pkd_layer_pairs(teacher_layers: int, student_layers: int, strategy: str | Sequence[int]) -> list[tuple[int, int]]:
    """(teacher, student) hidden-state numbers the patient loss matches.

    The student's last layer is left to the logits, as in PKD: M−1 pairs.
    skip   every k-th teacher layer, k = L // M: {2,4,6,8,10} for 12→6
    last   the teacher's last M−1 layers below its top: {7,8,9,10,11} for 12→6
    a list those teacher layers, matched to the student's layers 1, 2, ... in order
    """
    L, M = teacher_layers, student_layers
    if isinstance(strategy, str):
        if strategy == "skip":
            k = L // M
            return [(k * j, j) for j in range(1, M)]
        if strategy == "last":
            return [(L - M + j, j) for j in range(1, M)]
        raise SqueezeError(f"strategy={strategy!r} is not one of {list(STRATEGIES)} or a list of teacher layers")
    chosen = [int(x) for x in strategy]
    _check_layer_numbers(chosen, L, "strategy")
    if len(chosen) > M:
        raise SqueezeError(f"strategy lists {len(chosen)} teacher layers but the student has only {M}; list at most {M}")
    return [(t, s) for s, t in enumerate(chosen, start=1)]


def _check_layer_numbers(numbers: Sequence[int], teacher_layers: int, where: str) -> None:
    bad = [x for x in numbers if not 1 <= x <= teacher_layers]
    if bad:
        raise SqueezeError(f"{where}: teacher layer {bad[0]} is out of range; the teacher has layers 1..{teacher_layers}")


def cut_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A copy of `model` with only the layers `keep` (0-based, in order); embeddings and heads copied,
    the config's layer count updated so the saved directory reloads with plain from_pretrained."""
    return adapter_for(model).keep_layers(model, keep)


def param_stats(model: nn.Module) -> dict[str, int]:
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    return {"params": sum(p.numel() for p in seen.values()),
            "param_bytes": sum(p.numel() * p.element_size() for p in seen.values())}


def vocab_of(model: nn.Module) -> int:
    return model.get_input_embeddings().num_embeddings
