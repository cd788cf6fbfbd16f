"""What Wanda and SparseGPT share as compressors: the target (`sparsity` or an N:M `pattern`), how it is spread over
the blocks (`allocation`: uniform, OWL's outlier-weighted amounts (squeeze/compress/layer_sparsity.py), or auto: OWL
where sparsity is unstructured and uniform with an N:M pattern, which fixes every block's amount), and how
sequential the calibration is (`sequential`: "blocks", each block calibrated on the pruned blocks before it, or
"layers", also each group of layers inside a block on the pruned groups before it; calibration.sequential)."""

from __future__ import annotations

import inspect

from squeeze.arch.linear import features
from squeeze.compress.calibration import Calibrated, layer_stack, linear_layers
from squeeze.compress.layer_sparsity import block_sparsities, check_allocation
from squeeze.compress.sparsity_pattern import check_width, masks_summary, resolve_sparsity
from squeeze.errors import SqueezeError

SEQUENTIAL = ("blocks", "layers")


def check_oneshot(where: str, sparsity, pattern, allocation, owl_threshold, owl_spread, sequential) -> tuple:
    """(fraction pruned, N:M or None) of valid settings; a bad one is one line naming `where` and the fix."""
    try:
        sparsity, nm = resolve_sparsity(sparsity, pattern)
    except SqueezeError as e:
        raise SqueezeError(f"{where}: {e}") from None
    check_allocation(allocation, owl_threshold, owl_spread, sparsity, where)
    if allocation == "owl" and nm is not None:
        raise SqueezeError(f"{where}.allocation={allocation}: an N:M pattern ({pattern}) fixes every block's "
                           "sparsity; use allocation=uniform, or pattern=unstructured")
    if sequential not in SEQUENTIAL:
        raise SqueezeError(f"{where}.sequential={sequential!r} is not one of {' | '.join(SEQUENTIAL)}")
    return sparsity, nm


class OneShotPruner(Calibrated):
    """A one-shot pruner of every layer-stack Linear/Conv1D; a subclass says how one stack is pruned (`prune`)."""

    float_weights = True
    method = ""

    def __init__(self, sparsity: float | None = 0.5, pattern: str = "unstructured", allocation: str = "uniform",
                 owl_threshold: float = 5.0, owl_spread: float = 0.08, sequential: str = "blocks"):
        super().__init__()
        self.sparsity, self.nm = check_oneshot(f"compress.{self.method}", sparsity, pattern, allocation,
                                               owl_threshold, owl_spread, sequential)
        self.pattern, self.sequential = pattern, sequential
        self.allocation_asked = allocation
        self.allocation = ("owl" if self.nm is None else "uniform") if allocation == "auto" else allocation
        self.owl_threshold, self.owl_spread = float(owl_threshold), float(owl_spread)
        self._figures: dict = {}

    @classmethod
    def check_values(cls, name: str, settings: dict) -> None:
        """The settings' values, before anything loads (squeeze.config); unset ones take the class's defaults."""
        keys = ("sparsity", "pattern", "allocation", "owl_threshold", "owl_spread", "sequential")
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k in keys}
        check_oneshot(f"compress.{name}", **{**defaults, **{k: v for k, v in settings.items() if k in keys}})

    def check(self, model):
        for name, module in linear_layers(layer_stack(model)).items():
            check_width(features(module)[1], self.nm, name)

    def prune(self, model, batches, block_sparsity, within_block: bool) -> dict:
        raise NotImplementedError

    def apply(self, model, batches):
        per_block, allocation = block_sparsities(model, batches, self.sparsity, self.allocation, self.owl_threshold,
                                                 self.owl_spread)
        masks = self.prune(model, batches, per_block, self.sequential == "layers")
        self._figures = {**masks_summary(masks, self.sparsity, self.pattern), **allocation,
                         "allocation_asked": self.allocation_asked, "sequential": self.sequential}
        return model

    def summary(self):
        return {**self._figures, "method": self.method, **super().summary()}
