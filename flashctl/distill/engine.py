"""DeepSpeed plumbing, model-agnostic: config, process group, one engine per trainable model.

Rules we follow (design §5): flashctl computes every number of the DeepSpeed config (no
"auto"); each trainable model (student, critic) gets its own engine, optimizer and config
copy; frozen models (teachers, text encoder, VAE) stay out of the trainable engines, either
as plain replicas (`freeze`) or, when they are too big to replicate, as ZeRO-3 engines
without an optimizer (`make_frozen_engine`). Every collective runs on all ranks.

deepspeed is imported lazily inside functions: on CPU, ``DS_ACCELERATOR=cpu`` must be in the
environment before deepspeed is first imported, and `--help` must not pay for the import.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from flashctl.errors import UserError
from flashctl.launch import select_accelerator
from flashctl.spec import ExperimentSpec
from flashctl.system import free_port

Device = Literal["cpu", "cuda"]

# DeepSpeed's default persistence threshold (parameters with fewer elements are kept whole on
# every rank), for reference: flashctl leaves the key out unless
# `deepspeed.param_persistence_threshold` is set. At CPU scale every tensor of the tiny models
# is below it, so their parameters stay whole (ZeRO-3 still partitions gradients and optimizer
# state); 0 partitions every tensor. On 2 CPU ranks 0 is the faster of the two
# (bench/distill_step.py), and the embedded default sets it.
DEEPSPEED_PERSISTENCE_THRESHOLD = 100_000

# Adam settings of DMD2 (Yin et al., 2024): AdamW, betas (0.9, 0.999), weight decay 0.01.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.01

_NEVER_PRINT = 1 << 30


def ds_config(spec: ExperimentSpec, lr: float, world_size: int, export: bool = False,
              warmup_updates: int = 0) -> dict[str, Any]:
    """The DeepSpeed config of one trainable engine, every number computed (no "auto").

    `lr` is the engine's learning rate (student and critic differ); `world_size` the number
    of data-parallel ranks; `export` turns on gathering 16-bit weights on save (needed to
    write a consolidated model from a ZeRO-3 engine); `warmup_updates` > 0 adds DeepSpeed's
    `WarmupLR` scheduler, linear from 0 to `lr` over that many optimizer steps of this engine
    (its count starts at 0 on the first update, so the first two run at rate 0; the
    `distill.warmup_steps` generator steps in updates of each engine: `warmup_updates_for`).
    """
    ds = spec.deepspeed
    if world_size < 1:
        raise ValueError(f"world_size {world_size} must be >= 1")
    if lr <= 0:
        raise ValueError(f"learning rate {lr} must be > 0")
    if ds.offload_param != "none" and ds.zero_stage != 3:
        raise UserError(f"deepspeed.offload_param: {ds.offload_param!r} needs zero_stage 3, not {ds.zero_stage}")
    if ds.offload_optimizer != "none" and ds.zero_stage == 0:
        raise UserError(f"deepspeed.offload_optimizer: {ds.offload_optimizer!r} needs zero_stage >= 1")
    if spec.launch.device == "cpu" and ds.precision == "fp16":
        raise UserError("deepspeed.precision: fp16 is not supported on the CPU accelerator; use fp32 or bf16")

    micro = spec.distill.batch_size
    accum = spec.distill.grad_accum
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update({"contiguous_gradients": True, "overlap_comm": spec.launch.device == "cuda"})
        if ds.reduce_bucket_size is not None:
            zero["reduce_bucket_size"] = ds.reduce_bucket_size
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = bool(export)
        # the knobs the spec leaves unset (None) are left out: DeepSpeed's own defaults apply
        for key, value in (("stage3_param_persistence_threshold", ds.param_persistence_threshold),
                           ("stage3_prefetch_bucket_size", ds.prefetch_bucket_size),
                           ("stage3_max_live_parameters", ds.max_live_parameters),
                           ("memory_efficient_linear", ds.memory_efficient_linear)):
            if value is not None:
                zero[key] = value
    nvme_path = str(spec.run_dir() / "nvme")
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": spec.launch.device == "cuda"}
        if ds.offload_optimizer == "nvme":
            zero["offload_optimizer"]["nvme_path"] = nvme_path
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": spec.launch.device == "cuda"}
        if ds.offload_param == "nvme":
            zero["offload_param"]["nvme_path"] = nvme_path

    # torch's AdamW needs no compiled op; with optimizer offload DeepSpeed's CPUAdam is the
    # fast path (it JIT-compiles once, ~80 s on CPU).
    torch_adam = ds.offload_optimizer == "none"
    config: dict[str, Any] = {
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(ds.gradient_clipping),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": float(lr),
                "betas": list(ADAM_BETAS),
                "eps": ADAM_EPS,
                "weight_decay": WEIGHT_DECAY,
                "torch_adam": torch_adam,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {
            "enabled": ds.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": _NEVER_PRINT,
        "wall_clock_breakdown": False,
    }
    if warmup_updates > 0:
        config["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": float(lr), "warmup_num_steps": int(warmup_updates),
            "warmup_type": "linear"}}
    return config


def warmup_updates_for(spec: ExperimentSpec, model: Literal["student", "critic"]) -> int:
    """Optimizer steps of `model`'s engine that `distill.warmup_steps` generator steps span: the
    student steps once per generator step, the critic `critic_updates` times (once under DMD),
    and with gradient accumulation an engine steps once per `grad_accum` of those micro-steps."""
    d = spec.distill
    per_step = 1 if model == "student" or d.objective == "dmd" else d.critic_updates
    return -(-d.warmup_steps * per_step // d.grad_accum)  # ceil: a started warm-up lasts >= 1 update


def frozen_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` for a frozen ZeRO-3 engine: no optimizer, no 16-bit export gather."""
    out = copy.deepcopy(config)
    out.pop("optimizer", None)
    out.pop("scheduler", None)
    zero = out.get("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    zero["stage3_gather_16bit_weights_on_model_save"] = False
    return out


# --------------------------------------------------------------------------------------------
# Process group


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def quiet_collective_warnings() -> None:
    """Silence torch's per-collective deprecation FutureWarnings (one per call per rank)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def init_distributed(device: Device) -> DistInfo:
    """Join (or, in a bare single process, create) the process group: gloo on CPU, nccl on CUDA.

    On CPU this sets ``DS_ACCELERATOR=cpu`` before deepspeed is imported; if deepspeed was
    already imported with another accelerator that is an error (`flashctl.launch.select_accelerator`).
    A bare ``python`` start (no torchrun) becomes a 1-rank group on a free local port.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    select_accelerator(device)
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    quiet_collective_warnings()
    import deepspeed

    if device == "cpu":
        from flashctl.distill.ops import shm_op_or_gloo

        if not shm_op_or_gloo() and os.environ.get("RANK", "0") == "0":
            print("distill: DeepSpeed's CPU comm op is not built (`python -m flashctl.distill.ops` builds it, "
                  "`make setup` runs it); allreduce goes through gloo", file=sys.stderr, flush=True)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, dev)


def barrier() -> None:
    """All ranks wait here (no-op outside a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def node_group():
    """This rank's node as a process group, for frozen teachers partitioned within a node
    (`deepspeed.teacher_shard: node`); None when the whole job is one node (use the world).

    A collective: every rank learns every rank's node and creates every node's group, in one
    order (torch requires each `new_group` on all ranks). The node is the launcher's node rank
    (torchrun's GROUP_RANK, DeepSpeed's CROSS_RANK: two loopback "nodes" on one host count as
    two), else the host name. Ranks are grouped by that key, not assumed contiguous.

    Not ZeRO++ hpZ (`zero_hpz_partition_size`): hpZ keeps the primary partition over the world
    and adds a secondary copy per node (DeepSpeed 0.19: made at every re-partition, gathered from
    once it exists; its docs sell it for the backward gathers of trained weights), so a frozen
    teacher would cost teacher/world + teacher/node per GPU and its first forward still crosses
    nodes. A frozen model has no gradients or optimizer states to spread over the world, so a
    node-sized partition group gives the intra-node gathers for teacher/node alone.
    """
    import socket

    dist = torch.distributed
    key = os.environ.get("GROUP_RANK") or os.environ.get("CROSS_RANK") or socket.gethostname()
    keys: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(keys, key)
    nodes: dict[str, list[int]] = {}
    for rank, k in enumerate(keys):
        nodes.setdefault(str(k), []).append(rank)
    if len(nodes) == 1:
        return None
    mine = None
    for ranks in sorted(nodes.values()):
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


# --------------------------------------------------------------------------------------------
# Engines


def gather_blocks(model: nn.Module) -> list[nn.Module]:
    """Make each transformer block of `model` one ZeRO-3 gather unit (DeepSpeed "leaf" modules).

    By default ZeRO-3 hooks every sub-module: each Linear and norm gathers and releases its own
    weights, forward and backward, a few hundred Python hooks per transformer forward. A leaf
    module is gathered whole on entry and released on exit, with no hooks inside: one gather per
    block, the unit FSDP wraps per block too. The peak holds one whole block per rank (Qwen-Image
    20B: ~0.35B parameters, 0.7 GB in bf16) instead of one Linear.

    The blocks are the model's `_no_split_modules` (the diffusers / transformers name for the
    unit never to split). DeepSpeed reduces a leaf's gradients in a full backward hook, which
    sees only positional inputs; diffusers calls its blocks with keyword arguments, so the hook
    would fire before the block's own backward ran (and its gradients be lost). A forward
    pre-hook therefore passes every argument of a block positionally, in signature order
    (defaults filled in; only a `**kwargs` catch-all stays keyword).
    """
    import inspect

    from deepspeed.utils import set_z3_leaf_modules

    names = list(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(model).__name__} names no blocks (_no_split_modules): use deepspeed.gather: submodule")
    blocks = set_z3_leaf_modules(model, names)
    for block in blocks:
        signature = inspect.signature(block.forward)

        def positional(module, args, kwargs, signature=signature):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()  # an argument left out must not shift the later ones
            return bound.args, bound.kwargs

        block.register_forward_pre_hook(positional, with_kwargs=True, prepend=True)
    return blocks


def make_engine(model: nn.Module, config: dict[str, Any], blocks: bool = False):
    """A DeepSpeed engine training `model`'s trainable parameters with its own optimizer.

    The config is deep-copied: DeepSpeed mutates the dict it is given, and two engines must
    never share one. `blocks`: under ZeRO-3, gather whole transformer blocks (`gather_blocks`).
    """
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("make_engine: the model has no trainable parameters (use make_frozen_engine)")
    if blocks and config["zero_optimization"]["stage"] == 3:
        gather_blocks(model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=copy.deepcopy(config))
    return engine


def make_frozen_engine(model: nn.Module, config: dict[str, Any], blocks: bool = False):
    """A ZeRO-3 partitioned, optimizer-free engine for a frozen model too big to replicate.

    Its forward is a collective: call it on every rank with the same control flow. `blocks` as
    in `make_engine`.
    """
    import deepspeed

    freeze(model)
    if blocks:
        gather_blocks(model)
    engine, _, _, _ = deepspeed.initialize(model=model, config=frozen_config(config))
    engine.eval()
    return engine


def freeze(model: nn.Module) -> nn.Module:
    """Make `model` a frozen plain replica (eval mode, no grads); returns it for chaining."""
    model.eval()
    model.requires_grad_(False)
    return model


def _is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def full_state_dict(engine_or_module: Any) -> dict[str, torch.Tensor]:
    """Full CPU copies of all parameters (gathered from ZeRO-3 partitions) and buffers.

    A collective when parameters are partitioned: call it on every rank. Every rank then holds
    the whole model at once, so it is for small models and tests; the student's export gathers
    one submodule at a time onto rank 0 instead (`models.weights.write_transformer`).
    """
    module = getattr(engine_or_module, "module", engine_or_module)
    params = list(module.named_parameters())
    partitioned = [p for _, p in params if _is_partitioned(p)]
    out: dict[str, torch.Tensor] = {}

    def copy_all() -> None:
        for name, p in params:
            out[name] = p.detach().to("cpu", copy=True)
        for name, b in module.named_buffers():
            out[name] = b.detach().to("cpu", copy=True)

    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            copy_all()
    else:
        copy_all()
    return out


def local_param_bytes(engine_or_module: Any) -> int:
    """Bytes of parameter storage this rank holds (its ZeRO-3 shard, or whole tensors)."""
    module = getattr(engine_or_module, "module", engine_or_module)
    total = 0
    for p in module.parameters():
        t = p.ds_tensor if _is_partitioned(p) else p
        total += t.numel() * t.element_size()
    return total


def full_param_bytes(engine_or_module: Any) -> int:
    """Bytes of all parameters unpartitioned (what one plain replica would hold)."""
    module = getattr(engine_or_module, "module", engine_or_module)
    total = 0
    for p in module.parameters():
        n = p.ds_numel if _is_partitioned(p) else p.numel()
        el = p.ds_tensor.element_size() if _is_partitioned(p) else p.element_size()
        total += n * el
    return total
