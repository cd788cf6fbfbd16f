"""Sharded training with Lightning's FSDP strategy (`hardware=fsdp`): the strategy built from plain
settings, the wrap policy that finds a model's transformer layers through its family adapter, the
compressors that cannot run sharded, and the whole model gathered back after fit so that testing,
compression and saving see ordinary tensors.

Lightning and torch do the sharding; what is written here is only what they cannot know: which modules
are a squeeze model's layers, and that a run continues on the full model after fit.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from squeeze.errors import SqueezeError

SHARDINGS = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2", "NO_SHARD")


class LayerPolicy:
    """FSDP's callable wrap policy `(module, recurse, nonwrapped_numel) -> bool`: one FSDP unit (and one
    activation-checkpointed unit) per transformer layer, the layers found by the family adapter. The model
    is not known when the config builds the strategy, so the layer classes are read on the first call,
    which FSDP makes on the root (the LightningModule)."""

    def __init__(self):
        self.classes: tuple[type, ...] | None = None

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        if self.classes is None:
            self.classes = layer_classes(module)
        if recurse:
            return True  # look inside every module: layers may sit at any depth
        return isinstance(module, self.classes)


def layer_classes(root: nn.Module) -> tuple[type, ...]:
    """The classes of the transformer layers of every squeeze-known model inside `root`."""
    from squeeze.arch import find_adapter

    classes: set[type] = set()
    for module in root.modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(module, "base_model_prefix"):
            continue
        adapter = find_adapter(module)
        if adapter is None:
            continue
        classes.update(type(layer) for _, layer in adapter.layers(module))
    return tuple(classes)


def fsdp(sharding: str = "FULL_SHARD", activation_checkpointing: bool = True, cpu_offload: bool = False,
         state_dict_type: str = "full", **kwargs: Any):
    """Lightning's FSDPStrategy with squeeze's per-layer wrap policy.

    sharding: FULL_SHARD (ZeRO-3), SHARD_GRAD_OP (ZeRO-2), HYBRID_SHARD (full shard inside a node,
    replicas across nodes), NO_SHARD (DDP). activation_checkpointing recomputes each layer's activations
    in backward. state_dict_type=full: rank 0 writes one ordinary checkpoint file, which squeeze's resume
    and best-checkpoint restore read."""
    name = str(sharding).upper()
    if name not in SHARDINGS:
        raise SqueezeError(f"hardware.sharding={sharding} is not an FSDP sharding strategy; one of {', '.join(SHARDINGS)}")
    policy = LayerPolicy()
    return _strategy_class()(sharding_strategy=name, auto_wrap_policy=policy,
                        activation_checkpointing_policy=policy if activation_checkpointing else None,
                        cpu_offload=cpu_offload, state_dict_type=state_dict_type, use_orig_params=True, **kwargs)


def _strategy_class():
    from lightning.pytorch.strategies import FSDPStrategy

    class SqueezeFSDP(FSDPStrategy):
        """Lightning's FSDPStrategy, plus CPU processes over gloo: how squeeze tests sharding without a GPU.
        Lightning's connector refuses `type(strategy) is FSDPStrategy` with accelerator=cpu (a subclass
        passes), and it hands FSDP device_id=None on CPU, where torch's FSDP wants device_id=cpu."""

        def setup(self, trainer) -> None:
            super().setup(trainer)
            # Lightning's FSDPPrecision refuses clipping by norm (it has no handle on the wrapped model);
            # FSDP's own clip_grad_norm_ computes the norm over all shards, which is what the config asks.
            self.precision_plugin.clip_grad_by_norm = lambda optimizer, clip_val: self.model.clip_grad_norm_(clip_val)

        def _setup_model(self, model: nn.Module) -> nn.Module:
            from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            if self.root_device.type != "cpu" or any(isinstance(m, FSDP) for m in model.modules()):
                return super()._setup_model(model)
            model = FSDP(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)
            _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
            return model

    return SqueezeFSDP


DEEPSPEED_STAGES = (1, 2)


def deepspeed(stage: int = 2, offload_optimizer: bool = False, **kwargs: Any):
    """Lightning's DeepSpeedStrategy, ZeRO stage 1 (optimizer state sharded) or 2 (+ gradients), with
    optional ZeRO-Offload of the optimizer to CPU memory. Parameters stay whole on every rank, so testing,
    compression and saving after fit see the ordinary model; parameter sharding is hardware=fsdp's job
    (squeeze gathers FSDP's shards after fit, and has no such step for ZeRO-3's partitions)."""
    import importlib.util

    if int(stage) not in DEEPSPEED_STAGES:
        raise SqueezeError(f"hardware=deepspeed stage={stage}: squeeze runs ZeRO stage 1 or 2; to shard the "
                           "parameters themselves (ZeRO-3) use hardware=fsdp (FULL_SHARD)")
    if importlib.util.find_spec("deepspeed") is None:
        raise SqueezeError("hardware=deepspeed needs the deepspeed package: pip install -e '.[deepspeed]'")
    if not torch.cuda.is_available():
        raise SqueezeError("hardware=deepspeed runs only on CUDA GPUs (Lightning's DeepSpeed strategy) and this "
                           "machine has none; on CPU use hardware=fsdp trainer.accelerator=cpu "
                           "trainer.precision=32-true or hardware=ddp")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=int(stage), offload_optimizer=offload_optimizer, **kwargs)


def _target(strategy: Any) -> str:
    """What names a strategy: its string, a config entry's _target_, or an object's class name."""
    if isinstance(strategy, str):
        return strategy.lower()
    target = strategy.get("_target_", "") if hasattr(strategy, "get") else type(strategy).__name__
    return str(target).lower()


def hardware_name(strategy: Any) -> str:
    """The hardware= option a sharding strategy came from, for messages."""
    return "deepspeed" if "deepspeed" in _target(strategy) else "fsdp"


def is_sharded(strategy: Any) -> bool:
    """Is `trainer.strategy` (or a config's strategy entry) one that shards parameters?"""
    if strategy is None:
        return False
    if isinstance(strategy, str):
        return strategy.startswith(("fsdp", "deepspeed"))
    return any(word in _target(strategy) for word in ("fsdp", "deepspeed"))


def check_compressors(chain: Iterable, strategy: Any) -> None:
    """Refuse, with one line, a compressor that cannot work on sharded parameters (its `unsharded` reason).
    DeepSpeed's ZeRO keeps its own flat fp32 copies of the weights in the optimizer and copies them back
    after every step, so a mask or fake-quant applied to the module's weights would not hold there either."""
    if not is_sharded(strategy):
        return
    hardware = hardware_name(strategy)
    for c in chain:
        reason = getattr(c, "unsharded", None)
        if reason:
            if hardware == "deepspeed":
                reason = ("ZeRO trains flat copies of the weights inside its optimizer, which masks and fake-quant "
                          "do not reach" if c.trains else
                          "it leaves integer weights, and DeepSpeed's engine runs floating-point parameters only "
                          f"(quantize the finished run: python evaluate.py ckpt=<run dir> compress={c.name})")
            raise SqueezeError(f"compress={c.name} cannot run under hardware={hardware}: {reason}; train with "
                               "hardware=gpu or hardware=ddp instead")


def gather(trainer, module: nn.Module) -> None:
    """After fit or test under FSDP: put the whole model back into `module` as plain modules on every
    rank (a collective: all ranks call it), so compression, testing, measuring and saving see full
    tensors. Does nothing under other strategies."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # a torch without FSDP cannot have sharded anything
        return
    root = getattr(trainer.strategy, "model", None)
    if not isinstance(root, FSDP):
        return
    with FSDP.summon_full_params(root, writeback=False, recurse=True):
        full = {name: p.detach().clone() for name, p in _clean_names(module.named_parameters())}
    _unwrap(module)
    for name, p in module.named_parameters():
        p.data = full[name]
    trainer.strategy.model = module  # the next trainer.test wraps afresh from the plain module


def _clean_names(named: Iterable[tuple[str, torch.Tensor]]):
    # FSDP and the checkpoint wrapper insert their own module names; the plain model has neither.
    for name, p in named:
        yield name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", ""), p


def _unwrap(module: nn.Module) -> None:
    """Replace every FSDP / checkpoint wrapper below `module` by the module it wraps."""
    for name, child in list(module.named_children()):
        inner = child
        while hasattr(inner, "_fsdp_wrapped_module") or hasattr(inner, "_checkpoint_wrapped_module"):
            inner = getattr(inner, "_fsdp_wrapped_module", None) or inner._checkpoint_wrapped_module
        if inner is not child:
            setattr(module, name, inner)
        _unwrap(inner)
