"""`plan`: will this spec fit, and what does one training step cost?

Per-GPU memory under the spec's ZeRO stage for every model the distillation holds:

* trainable (student, critic): parameters, gradients, optimizer states. For 16-bit training under
  stages 1/2 the numbers are DeepSpeed's own estimator (`estimate_zero2_model_states_mem_needs`).
  Under stage 3 they are what the engine was measured to hold after a DMD2 round
  (bench/plan_vs_measured.py): 16 bytes per parameter partitioned over all GPUs (2 bf16 params +
  2 bf16 gradient partition + 4 fp32 master + 8 Adam moments; fp32 training: 4 + 4 + 8), 4 bytes
  x the gather unit (a gathered 16-bit transformer block, or layer with `deepspeed.gather:
  submodule`, and its gradient), the gradient reduce bucket
  (`DS_REDUCE_BUCKET_SIZE`), and while an engine steps `STEP_TEMP_BYTES` per partitioned
  parameter (fp32 gradient copy, Adam temporaries), one engine at a time. DeepSpeed's
  `estimate_zero3_model_states_mem_needs` (18 B/param + the layer, no bucket, no step
  transient) is shown next to it.
* frozen teachers: parameters only, in the training dtype, partitioned by ZeRO-3 (an engine
  without optimizer; on CUDA under stage 3) or replicated: exactly the teachers
  `ExperimentSpec.teachers_held()` names, which the worker loads.
* the pipeline's text encoder and VAE, replicated in fp32 (the worker's adapter loads them at
  its default dtype, `ADAPTER_PRECISION`).
* the end-of-run evaluation adds nothing: every rank samples its share of the eval rows with
  the engines and teachers it already holds (no whole copy on any rank).
* activations: an order of magnitude, from the transformer's width, depth, the micro-batch and
  the sequence length (image tokens + text tokens; edits add the source image's tokens).

Parameter counts come from the model *configs*, never from weights: the known Qwen-Image hub
ids map to configs written below; local pipeline folders are read (`transformer/config.json`,
...); the tiny CPU-scale models are built from `model.tiny`. Each model is instantiated on the
`meta` device (no memory, ~0.1 s for 20B parameters) and its parameters counted.

Sizes are GiB (2**30 bytes) throughout and printed as GiB (DeepSpeed's estimators compute the
same unit and print it as "GB"); `*_gb` fields hold GiB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from flashctl.errors import UserError
from flashctl.spec import ExperimentSpec, TinyModelSpec

GB = 1024**3
"""One GiB (the name predates the unit fix; every `/ GB` is a GiB)."""
ADAPTER_PRECISION = "fp32"
"""Precision of the text encoder and VAE the worker holds on every rank
(`QwenImageAdapter.from_pretrained`'s default dtype in `DistillJob.__init__`)."""

# Public config values of the Qwen-Image family on the Hugging Face hub
# (Qwen/Qwen-Image: transformer/config.json, text_encoder/config.json, vae/config.json; the
# Edit and Edit-2509 transformers have the same architecture). Only architecture fields.
QWEN_IMAGE_TRANSFORMER = {
    "_class_name": "QwenImageTransformer2DModel",
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
QWEN_IMAGE_VAE = {
    "_class_name": "AutoencoderKLQwenImage",
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}
# Qwen2.5-VL-7B-Instruct, the text encoder of the Qwen-Image pipelines.
QWEN_IMAGE_TEXT_ENCODER = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "tie_word_embeddings": False,
    "text_config": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_chans": 3,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
}
_QWEN_IMAGE = {"transformer": QWEN_IMAGE_TRANSFORMER, "text_encoder": QWEN_IMAGE_TEXT_ENCODER, "vae": QWEN_IMAGE_VAE}
KNOWN_MODELS: dict[str, dict[str, dict[str, Any]]] = {
    "Qwen/Qwen-Image": _QWEN_IMAGE,
    "Qwen/Qwen-Image-Edit": _QWEN_IMAGE,
    "Qwen/Qwen-Image-Edit-2509": _QWEN_IMAGE,
}

TEXT_TOKENS = 256
"""Assumed prompt length in text-encoder tokens (T2I). Edits add the reference image's vision
tokens: Qwen2.5-VL encodes 28x28-pixel cells of the (capped) reference image."""
VL_CELL_PIXELS = 28 * 28
ACTIVATION_BYTES_PER_TOKEN_DIM = 34
"""Bytes of saved activations per token per hidden unit per layer in 16-bit training, with
fused (flash) attention (Korthikanti et al. 2022, "Reducing activation recomputation")."""
CUDA_OVERHEAD_GB = 2.5
"""CUDA context, NCCL buffers and allocator fragmentation per GPU (rule of thumb)."""
ADDITIONAL_BUFFER_FACTOR = 1.5
"""DeepSpeed's estimator slack on offloaded CPU memory."""
DS_REDUCE_BUCKET_SIZE = 500_000_000
"""DeepSpeed's default `reduce_bucket_size` (elements). With contiguous gradients (flashctl's
config) every ZeRO-3 engine allocates one bucket of this many 16-bit elements (`ipg_buckets`),
~0.93 GiB in bf16 per trainable engine on a GPU; on CPU only the pages the gradients pass
through are touched (min(bucket, parameters)), bench/plan_vs_measured.py."""
DS_SUB_GROUP_SIZE = 1_000_000_000
"""DeepSpeed's default ZeRO-3 `sub_group_size`: the optimizer steps one sub-group at a time."""
STEP_TEMP_BYTES = {"cuda": 8, "cpu": 12}
"""Transient bytes per parameter of a ZeRO-3 sub-group while its engine steps: the fp32 copy of
the gradient partition (4) + torch AdamW's denominator (foreach on CUDA: one sqrt copy, 4; the
single-tensor CPU path: sqrt and its quotient, 8). Measured on CPU: peak minus held RSS of a
round = 12 B x the partition (bench/results/plan_vs_measured.txt). One engine steps at a time."""


# --------------------------------------------------------------------------------------------
# Parameter counts from configs


@dataclass(frozen=True)
class ModelSize:
    """Parameter count of one model, from its config."""

    total: int
    largest_layer: int
    """Parameters of the largest single module (not counting children): what ZeRO-3 gathers at a
    time with `deepspeed.gather: submodule`."""
    source: str
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    largest_block: int = 0
    """Parameters of the largest transformer block (the model's `_no_split_modules`, children
    included): what ZeRO-3 gathers at a time with `deepspeed.gather: block`; 0 if it names none."""

    def gathered(self, unit: str) -> int:
        """Parameters ZeRO-3 holds gathered at a time for the gather unit `unit` (block | submodule)."""
        return max(self.largest_block, self.largest_layer) if unit == "block" else self.largest_layer


def _count(module: Any) -> tuple[int, int, int]:
    """(total, largest layer, largest block) parameters. Written out instead of DeepSpeed's
    `model_to_params` because that one de-duplicates by `data_ptr()`, which is 0 for every meta tensor."""
    total = sum({id(p): p.numel() for p in module.parameters()}.values())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
    names = set(getattr(module, "_no_split_modules", None) or [])
    block = max((sum(p.numel() for p in m.parameters()) for m in module.modules() if type(m).__name__ in names),
                default=0)
    return total, largest, block


@lru_cache(maxsize=32)
def _size_from_config(kind: str, config_json: str) -> tuple[int, int, int]:
    import torch

    config = json.loads(config_json)
    with torch.device("meta"):
        if kind == "text_encoder":
            import transformers

            arch = (config.get("architectures") or ["Qwen2_5_VLForConditionalGeneration"])[0]
            rest = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
            cfg = transformers.AutoConfig.for_model(config.get("model_type", "qwen2_5_vl"), **rest)
            model = getattr(transformers, arch)(cfg)
        else:
            import diffusers

            cls = getattr(diffusers, config["_class_name"])
            model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return _count(model)


def tiny_configs(tiny: TinyModelSpec) -> dict[str, dict[str, Any]]:
    """Configs of the tiny CPU-scale components (the values `flashctl.models.tiny` builds)."""
    heads = max(1, tiny.text_hidden_size // 16)
    return {
        "transformer": {
            "_class_name": "QwenImageTransformer2DModel",
            "patch_size": 2,
            "in_channels": 4 * tiny.z_dim,
            "out_channels": tiny.z_dim,
            "num_layers": tiny.num_layers,
            "attention_head_dim": tiny.attention_head_dim,
            "num_attention_heads": tiny.num_attention_heads,
            "joint_attention_dim": tiny.text_hidden_size,
            "guidance_embeds": False,
            "axes_dims_rope": list(tiny.axes_dims_rope),
        },
        "vae": {
            "_class_name": "AutoencoderKLQwenImage",
            "base_dim": tiny.vae_base_dim,
            "z_dim": tiny.z_dim,
            "dim_mult": [1, 2, 4],
            "num_res_blocks": 1,
            "attn_scales": [],
            "temperal_downsample": [False, True],
        },
        "text_encoder": {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "text_config": {
                "vocab_size": tiny.vocab_size,
                "hidden_size": tiny.text_hidden_size,
                "intermediate_size": 2 * tiny.text_hidden_size,
                "num_hidden_layers": tiny.text_layers,
                "num_attention_heads": heads,
                "num_key_value_heads": heads,
                "bos_token_id": None,
                "eos_token_id": 2,
                "pad_token_id": 0,
            },
            "vision_config": {
                "depth": 1,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "out_hidden_size": tiny.text_hidden_size,
                "fullatt_block_indexes": [0],
            },
        },
    }


def model_configs(path: str, tiny: TinyModelSpec, where: str) -> tuple[dict[str, dict[str, Any]], str]:
    """({component: config}, source) of a pipeline named by a spec path.

    Known hub ids use the configs above; a local pipeline folder (or a shipped `builtin:`
    teacher folder) is read; a `builtin:` name without a shipped folder uses `model.tiny`.
    `where` names the spec field for errors.
    """
    if path in KNOWN_MODELS:
        return KNOWN_MODELS[path], f"{path} (known hub config)"
    folder: Path | None = None
    if path.startswith("builtin:"):
        from flashctl.pipelines import BUILTIN_DIR

        candidate = BUILTIN_DIR / path.split(":", 1)[1]
        if (candidate / "transformer" / "config.json").is_file():
            folder = candidate
        else:
            return tiny_configs(tiny), f"{path} (model.tiny)"
    else:
        folder = Path(path)
    if not (folder / "transformer" / "config.json").is_file():
        known = ", ".join(sorted(KNOWN_MODELS))
        raise UserError(
            f"{where}: {path!r} is neither a known model id ({known}) nor a local pipeline folder "
            "with transformer/config.json"
        )
    configs = {}
    for component in ("transformer", "text_encoder", "vae"):
        f = folder / component / "config.json"
        if f.is_file():
            try:
                configs[component] = json.loads(f.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"{f}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
    return configs, str(folder)


def model_size(config: dict[str, Any], kind: str, source: str) -> ModelSize:
    """Count the parameters of one component config by building it on the meta device."""
    total, largest, block = _size_from_config(kind, json.dumps(config, sort_keys=True))
    return ModelSize(total=total, largest_layer=largest, source=source, config=config, largest_block=block)


# --------------------------------------------------------------------------------------------
# Memory


@dataclass
class ComponentMemory:
    """Per-GPU memory of one model (GiB)."""

    name: str
    role: str
    """student | critic | teacher | text encoder | vae"""
    size: ModelSize
    trainable: bool
    placement: str
    params_gb: float
    grads_gb: float
    optim_gb: float
    working_gb: float
    """ZeRO-3 gathered layer(s) while the model runs, + a trainable engine's gradient reduce bucket."""
    deepspeed_gb: float | None = None
    """DeepSpeed's estimator for the same setup (16-bit trainable models only)."""
    offloaded_gb: float = 0.0
    """Bytes moved to CPU by offload, per GPU."""
    step_gb: float = 0.0
    """Transient while this engine's optimizer steps (not in `total_gb`; engines step one at a
    time, so a plan adds the largest: `states_gb`)."""

    @property
    def total_gb(self) -> float:
        return self.params_gb + self.grads_gb + self.optim_gb + self.working_gb


def states_gb(components: list[ComponentMemory]) -> float:
    """Model states per GPU at their peak: every component held, + the largest optimizer-step
    transient (student and critic step one after the other)."""
    return sum(c.total_gb for c in components) + max((c.step_gb for c in components), default=0.0)


def _bytes_per_param(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def trainable_memory(
    name: str,
    size: ModelSize,
    zero_stage: int,
    precision: str,
    gpus_per_node: int,
    nnodes: int,
    offload_optimizer: bool = False,
    offload_param: bool = False,
    reduce_bucket_size: int | None = None,
    device: str = "cuda",
    gather: str = "block",
) -> ComponentMemory:
    """Memory of a trainable model with Adam under ZeRO `zero_stage` (see the module docstring).
    `gather`: the ZeRO-3 gather unit (`deepspeed.gather`), whose parameters and gradient are held
    gathered while it runs.

    Under ZeRO-3 this is what the engine holds, as measured (bench/plan_vs_measured.py), not
    DeepSpeed's estimator (kept as `deepspeed_gb`): gradient partitions in the training dtype
    (DeepSpeed keeps them 16-bit unless `grad_accum_dtype` is set), the gradient reduce bucket
    (`reduce_bucket_size`, None: DeepSpeed's default), and `step_gb`, the fp32 gradient copy +
    Adam temporaries while the optimizer steps (`STEP_TEMP_BYTES[device]`).
    """
    n = gpus_per_node * nnodes
    p = size.total
    w = _bytes_per_param(precision)
    mixed = precision != "fp32"
    grad_b, optim_b = (4, 12) if mixed else (4, 8)
    if mixed and zero_stage in (1, 2):
        grad_b = 6  # DeepSpeed's stage 1/2 count: 16-bit + fp32 gradient partitions

    def part(nbytes: int, stage: int) -> float:
        """Bytes per GPU of `nbytes` per parameter, partitioned from ZeRO stage `stage` on."""
        return nbytes * p / (n if zero_stage >= stage else 1)

    if zero_stage == 3:
        grad_b = w
    params = part(w, 3)
    grads = part(grad_b, 2 if not mixed else 1)
    optim = part(optim_b, 1)
    working = 2 * w * size.gathered(gather) if zero_stage == 3 else 0.0
    step = 0.0
    if zero_stage == 3:
        bucket = reduce_bucket_size or DS_REDUCE_BUCKET_SIZE
        working += w * (bucket if device == "cuda" else min(bucket, p))
        if not offload_optimizer:
            step = STEP_TEMP_BYTES.get(device, STEP_TEMP_BYTES["cuda"]) * min(p / n, DS_SUB_GROUP_SIZE)
    offloaded = 0.0
    if offload_optimizer and zero_stage >= 1:
        offloaded += grads + optim
        grads = optim = 0.0
    if offload_param and zero_stage == 3:
        offloaded += params
        params = 0.0
    ds = None
    if mixed and zero_stage == 3 and (offload_optimizer or not offload_param):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            p, size.gathered(gather), gpus_per_node, nnodes, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_param, zero_init=True,
        )  # fmt: skip
        ds = gpu / GB
    elif mixed and zero_stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import (
            estimate_zero2_model_states_mem_needs,
        )

        _, gpu = estimate_zero2_model_states_mem_needs(p, gpus_per_node, nnodes, cpu_offload=offload_optimizer)
        ds = gpu / GB
    placement = f"ZeRO-{zero_stage} /{n}" if zero_stage else "replicated (DDP)"
    return ComponentMemory(
        name, name, size, True, placement, params / GB, grads / GB, optim / GB, working / GB, ds, offloaded / GB,
        step / GB,
    )


def frozen_memory(
    name: str, role: str, size: ModelSize, precision: str, world: int, partitioned: bool, offload_param: bool = False,
    within: str = "", gather: str = "block",
) -> ComponentMemory:
    """Memory of a frozen model: parameters only, partitioned over `world` GPUs or replicated.
    `world` is the partition group's size: all ranks, or one node's (`within` = " per node", shown
    in the placement) for teachers with `deepspeed.teacher_shard: node`."""
    w = _bytes_per_param(precision)
    if partitioned:
        params, working, placement = w * size.total / world, w * size.gathered(gather), f"ZeRO-3 /{world}{within}"
    else:
        params, working, placement = float(w * size.total), 0.0, "replicated"
    offloaded = 0.0
    if partitioned and offload_param:
        offloaded, params = params, 0.0
    return ComponentMemory(name, role, size, False, placement, params / GB, 0.0, 0.0, working / GB, None, offloaded / GB)


@dataclass
class ActivationEstimate:
    """Saved activations of one transformer forward with grad (order of magnitude)."""

    image_tokens: int
    text_tokens: int
    hidden: int
    layers: int
    micro_batch: int
    full_gb: float
    checkpointed_gb: float

    @property
    def seq_len(self) -> int:
        return self.image_tokens + self.text_tokens


def activation_estimate(spec: ExperimentSpec, transformer: dict[str, Any], vae: dict[str, Any]) -> ActivationEstimate:
    """Activations of the student / critic forward with grad at the largest configured image.

    ~34 bytes x tokens x hidden per layer in 16-bit (x2 in fp32); with gradient checkpointing
    per block only the block inputs (2 bytes x tokens x hidden per layer) plus one block's full
    activations are kept. Edits put the source image's tokens beside the target's.
    """
    sizes = [spec.data.sizes[a] for a, wgt in spec.data.aspects.items() if wgt > 0 and a in spec.data.sizes]
    width, height = max(sizes or list(spec.data.sizes.values()), key=lambda s: s[0] * s[1])
    factor = 2 ** (len(vae.get("dim_mult", [1, 2, 4, 4])) - 1) * transformer.get("patch_size", 2)
    image_tokens = (width // factor) * (height // factor)
    text_tokens = TEXT_TOKENS
    if spec.mixture.edit > 0:
        image_tokens *= 2
        text_tokens += int(min(spec.model.edit_max_pixels, width * height) // VL_CELL_PIXELS)
    hidden = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    layers = transformer["num_layers"]
    b = spec.distill.batch_size
    scale = 2 if spec.deepspeed.precision == "fp32" else 1
    per_layer = ACTIVATION_BYTES_PER_TOKEN_DIM * (image_tokens + text_tokens) * b * hidden * scale
    full = per_layer * layers
    ckpt = 2 * (image_tokens + text_tokens) * b * hidden * scale * layers + per_layer
    return ActivationEstimate(image_tokens, text_tokens, hidden, layers, b, full / GB, ckpt / GB)


# --------------------------------------------------------------------------------------------
# Network evaluations


@dataclass
class NfeEstimate:
    """Network forward evaluations per sample (batch element)."""

    student_steps: int
    critic_updates: int
    gen_student_mean: float
    """Backward simulation: k ~ U{0..S-1} steps without grad + 1 with grad."""
    gen_student_max: int
    gen_critic: int
    """Fake score at the re-noised sample (no CFG)."""
    gen_teacher: int
    """Real score: cond + uncond with CFG (decoupled-DMD: 3); one teacher per sample."""
    critic_student_mean: float
    """Student sampling for the critic's training sample (no grad)."""
    critic_forward: int
    """Critic forward with grad (+ its backward)."""
    teachers_used: list[str]

    @property
    def generator_step(self) -> float:
        return self.gen_student_mean + self.gen_critic + self.gen_teacher

    @property
    def critic_step(self) -> float:
        return self.critic_student_mean + self.critic_forward

    @property
    def per_cycle(self) -> float:
        """One generator update and its `critic_updates` critic updates."""
        return self.generator_step + self.critic_updates * self.critic_step

    @property
    def per_iteration(self) -> float:
        """Average per iteration (every iteration updates the critic, every K-th the generator)."""
        return self.per_cycle / self.critic_updates

    @property
    def backward_per_cycle(self) -> int:
        return 1 + self.critic_updates


def teachers_used(spec: ExperimentSpec) -> list[str]:
    """Teachers the worker holds: `ExperimentSpec.teachers_held()`, the decision the worker
    itself uses (base first, then every teacher the policy can pick for a task the mixture draws)."""
    return spec.teachers_held()


def teachers_called(spec: ExperimentSpec) -> list[str]:
    """Teachers that supply a real score (the NFE table): those picked for a drawn task."""
    names = [n for task in ("t2i", "edit") for n in spec.teachers_picked(task)]
    return list(dict.fromkeys(names)) or [spec.guidance.base]


def nfe_estimate(spec: ExperimentSpec) -> NfeEstimate:
    """NFE of one DMD2 cycle from the spec (student steps, critic updates, CFG, objective)."""
    d = spec.distill
    s = d.student_steps
    used = teachers_called(spec)
    cfg = any(spec.teachers[t].cfg_scale != 1.0 for t in used if t in spec.teachers) if spec.teachers else True
    teacher = 3 if d.objective == "decoupled-dmd" else (2 if cfg else 1)
    mean_sim = (s - 1) / 2 + 1
    return NfeEstimate(s, d.critic_updates, mean_sim, s, 1, teacher, mean_sim, 1, used)


# --------------------------------------------------------------------------------------------
# The plan


@dataclass
class OffloadOption:
    """Totals per GPU with one offload setting."""

    offload_optimizer: str
    offload_param: str
    model_states_gb: float
    total_gb: float
    total_ckpt_gb: float
    cpu_per_node_gb: float
    fits: bool
    fits_ckpt: bool

    @property
    def overrides(self) -> str:
        return f"deepspeed.offload_optimizer={self.offload_optimizer} deepspeed.offload_param={self.offload_param}"


@dataclass
class PlanResult:
    """Everything `plan` found (per GPU unless named otherwise)."""

    nnodes: int
    gpus_per_node: int
    zero_stage: int
    precision: str
    device: str
    gpu_memory_gb: float
    teacher_placement: str
    components: list[ComponentMemory]
    activations: ActivationEstimate
    nfe: NfeEstimate
    overhead_gb: float
    offload_options: list[OffloadOption]
    notes: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    """Whether the spec trains with activation checkpointing (`ExperimentSpec.gradient_checkpointing`)."""

    @property
    def world_size(self) -> int:
        return self.nnodes * self.gpus_per_node

    @property
    def model_states_gb(self) -> float:
        return states_gb(self.components)

    @property
    def total_gb(self) -> float:
        return self.model_states_gb + self.activations.full_gb + self.overhead_gb

    @property
    def total_ckpt_gb(self) -> float:
        return self.model_states_gb + self.activations.checkpointed_gb + self.overhead_gb

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.gpu_memory_gb

    @property
    def fits_ckpt(self) -> bool:
        return self.total_ckpt_gb <= self.gpu_memory_gb


def _components(
    spec: ExperimentSpec,
    sizes: dict[str, ModelSize],
    teacher_sizes: dict[str, ModelSize],
    partition_teachers: bool,
    offload_optimizer: bool,
    offload_param: bool,
) -> list[ComponentMemory]:
    ds, launch = spec.deepspeed, spec.launch
    world = launch.nnodes * launch.nproc_per_node
    comps = [
        trainable_memory(
            name, sizes["transformer"], ds.zero_stage, ds.precision, launch.nproc_per_node, launch.nnodes,
            offload_optimizer, offload_param, ds.reduce_bucket_size, launch.device,
            spec.gather_unit(name),
        )
        for name in ("student", "critic")
    ]  # fmt: skip
    shard = spec.teacher_shard_ranks()  # deepspeed.teacher_shard: all ranks, or one node's
    for name, size in teacher_sizes.items():
        comps.append(
            frozen_memory(f"teacher {name}", "teacher", size, ds.precision, shard, partition_teachers, offload_param,
                          " per node" if shard < world else "", spec.gather_unit("teacher"))
        )
    for role in ("text_encoder", "vae"):
        if role in sizes:
            comps.append(frozen_memory(role.replace("_", " "), role, sizes[role], ADAPTER_PRECISION, world, False))
    return comps


def plan(spec: ExperimentSpec, teacher_placement: str | None = None) -> PlanResult:
    """Memory per GPU, activation guidance, NFE per step and offload options for `spec`.

    `teacher_placement` is "partitioned" (ZeRO-3 engine without optimizer) or "replicated";
    default: what the worker does (`ExperimentSpec.teachers_partitioned()`: partitioned on CUDA
    under ZeRO-3, else replicated). On `launch.device: cpu` "GPU" means one rank's share of host
    memory and `launch.gpu_memory_gb` is read as that budget (GiB).
    """
    ds, launch = spec.deepspeed, spec.launch
    if teacher_placement is None:
        teacher_placement = "partitioned" if spec.teachers_partitioned() else "replicated"
    if teacher_placement not in ("partitioned", "replicated"):
        raise ValueError(f"teacher_placement {teacher_placement!r}: use 'partitioned' or 'replicated'")
    if teacher_placement == "partitioned" and ds.zero_stage != 3:
        raise UserError(f"deepspeed.zero_stage: partitioned teachers need stage 3, not {ds.zero_stage}")

    tiny = spec.model.tiny
    used = teachers_used(spec)
    teacher_cfgs: dict[str, tuple[dict[str, dict[str, Any]], str]] = {}
    for name in used:
        if name not in spec.teachers:
            raise UserError(f"guidance: teacher {name!r} is not in teachers")
        teacher_cfgs[name] = model_configs(spec.teachers[name].path, tiny, f"teachers.{name}.path")
    init = spec.model.init_from
    if init in spec.teachers:
        student_cfgs, student_src = model_configs(spec.teachers[init].path, tiny, f"teachers.{init}.path")
    else:
        student_cfgs, student_src = model_configs(init, tiny, "model.init_from")
    if "transformer" not in student_cfgs:
        raise UserError(f"model.init_from: {init!r} has no transformer config")

    sizes = {
        kind: model_size(cfg, kind, student_src) for kind, cfg in student_cfgs.items() if kind in ("transformer", "text_encoder", "vae")
    }
    teacher_sizes = {name: model_size(c["transformer"], "transformer", src) for name, (c, src) in teacher_cfgs.items()}
    partition = teacher_placement == "partitioned"
    comps = _components(spec, sizes, teacher_sizes, partition, ds.offload_optimizer != "none", ds.offload_param != "none")
    acts = activation_estimate(spec, student_cfgs["transformer"], student_cfgs.get("vae", QWEN_IMAGE_VAE))
    overhead = CUDA_OVERHEAD_GB if launch.device == "cuda" else 0.0

    options = []
    combos = [("none", "none")]
    if ds.zero_stage >= 1:
        combos.append(("cpu", "none"))
    if ds.zero_stage == 3:
        combos.append(("cpu", "cpu"))
    for opt, par in combos:
        cs = _components(spec, sizes, teacher_sizes, partition, opt == "cpu", par == "cpu")
        states = states_gb(cs)
        cpu = sum(c.offloaded_gb for c in cs) * launch.nproc_per_node * ADDITIONAL_BUFFER_FACTOR
        total, total_ckpt = states + acts.full_gb + overhead, states + acts.checkpointed_gb + overhead
        options.append(
            OffloadOption(opt, par, states, total, total_ckpt, cpu, total <= launch.gpu_memory_gb,
                          total_ckpt <= launch.gpu_memory_gb)
        )  # fmt: skip

    edits = "; edits add source-image and reference vision tokens" if spec.mixture.edit > 0 else ""
    notes = [
        (
            "activations are an order-of-magnitude estimate (34 B/token/hidden/layer in 16-bit, fused "
            f"attention); gradient checkpointing cuts them {acts.full_gb / max(acts.checkpointed_gb, 1e-12):.0f}x"
        ),
        (
            f"sequence = {acts.image_tokens} image + {acts.text_tokens} text tokens "
            f"(assumed {TEXT_TOKENS}-token prompts{edits})"
        ),
    ]
    if ds.precision == "fp32":
        notes.append("DeepSpeed's estimators assume 16-bit mixed precision; fp32 rows use 16 B/param (no master copy)")
    if partition:
        repl = sum(_bytes_per_param(ds.precision) * s.total for s in teacher_sizes.values()) / GB
        notes.append(f"teachers replicated instead of partitioned would need {repl:.3g} GiB per GPU")
        if launch.nnodes > 1:  # the other deepspeed.teacher_shard, teachers' parameters only
            node = ds.teacher_shard == "node"
            other = launch.nproc_per_node * (launch.nnodes if node else 1)
            notes.append(
                f"teachers sharded {'over all ' + str(other) + ' GPUs' if node else 'within each node'} "
                f"(deepspeed.teacher_shard={'world' if node else 'node'}) would hold {repl / other:.3g} GiB "
                f"of teacher parameters per GPU instead of {repl / spec.teacher_shard_ranks():.3g}"
                + ("" if node else "; their forward all-gathers would stay inside the node")
            )
    if "text_encoder" in sizes:
        notes.append(f"text encoder and VAE are held in {ADAPTER_PRECISION} on every rank; the text encoder row "
                     "can be dropped if prompt embeddings are cached")
    if launch.device == "cpu":
        notes.append("device cpu: 'per GPU' is one rank's share of host memory")
    return PlanResult(
        nnodes=launch.nnodes,
        gpus_per_node=launch.nproc_per_node,
        zero_stage=ds.zero_stage,
        precision=ds.precision,
        device=launch.device,
        gpu_memory_gb=launch.gpu_memory_gb,
        teacher_placement=teacher_placement,
        components=comps,
        activations=acts,
        nfe=nfe_estimate(spec),
        overhead_gb=overhead,
        offload_options=options,
        notes=notes,
        gradient_checkpointing=spec.gradient_checkpointing(),
    )


# --------------------------------------------------------------------------------------------
# Rendering


def _params(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def render_plan(result: PlanResult) -> list[Any]:
    """Rich tables: memory per GPU, offload options, NFE per step (+ notes as a caption).

    Sizes are in GiB, or in MiB when the whole plan is under 1 GiB (tiny CPU-scale specs).
    """
    from rich.table import Table

    r = result
    unit, scale = ("GiB", 1.0) if r.total_gb >= 1 else ("MiB", 1024.0)

    def _gb(x: float | None) -> str:
        if x is None:
            return "-"
        x *= scale
        return f"{x:.2f}" if x < 10 else f"{x:.1f}"

    mem = Table(
        title=f"Memory per GPU ({unit}): {r.nnodes} node(s) x {r.gpus_per_node}, ZeRO-{r.zero_stage}, {r.precision}",
        caption="\n".join(r.notes),
    )
    for col in ("model", "params", "placement", "params", "grads", "optim", "gathered", "total", "DeepSpeed est."):
        mem.add_column(col, justify="left" if col in ("model", "placement") else "right")
    for c in r.components:
        mem.add_row(
            c.name, _params(c.size.total), c.placement, _gb(c.params_gb), _gb(c.grads_gb), _gb(c.optim_gb),
            _gb(c.working_gb), _gb(c.total_gb), _gb(c.deepspeed_gb),
        )  # fmt: skip
    step = max((c.step_gb for c in r.components), default=0.0)
    if step:
        mem.add_row("optimizer step (transient)", "", "one engine at a time", "", "", "", "", _gb(step), "")
    mem.add_section()
    mem.add_row("model states", "", "", "", "", "", "", _gb(r.model_states_gb), "")
    a = r.activations
    mem.add_row(
        "activations", f"{a.seq_len} tok", f"micro-batch {a.micro_batch}", "", "", "", "", _gb(a.full_gb), ""
    )
    mem.add_row("  with grad. checkpointing", "", "", "", "", "", "", _gb(a.checkpointed_gb), "")
    if r.overhead_gb:
        mem.add_row("CUDA context / buffers", "", "", "", "", "", "", _gb(r.overhead_gb), "")
    mem.add_section()

    def verdict(ok: bool) -> str:
        return "[green]fits[/]" if ok else "[red]does not fit[/]"

    this = " ◀ this spec"
    mem.add_row("total" + ("" if r.gradient_checkpointing else this), "", f"budget {r.gpu_memory_gb:g} GiB", "",
                "", "", "", _gb(r.total_gb), verdict(r.fits))
    mem.add_row("total, checkpointing" + (this if r.gradient_checkpointing else ""), "", "", "", "", "", "",
                _gb(r.total_ckpt_gb), verdict(r.fits_ckpt))

    off = Table(title=f"Offload options (per GPU, {unit})")
    for col in ("overrides", "model states", "total", "total (ckpt)", "CPU RAM / node", "fits", "fits (ckpt)"):
        off.add_column(col, justify="left" if col == "overrides" else "right")
    for o in r.offload_options:
        off.add_row(
            o.overrides, _gb(o.model_states_gb), _gb(o.total_gb), _gb(o.total_ckpt_gb), _gb(o.cpu_per_node_gb),
            "yes" if o.fits else "no", "yes" if o.fits_ckpt else "no",
        )  # fmt: skip

    n = r.nfe
    nfe = Table(title=f"Network evaluations per sample (S={n.student_steps} student steps, K={n.critic_updates})")
    nfe.add_column("step")
    nfe.add_column("student", justify="right")
    nfe.add_column("critic", justify="right")
    nfe.add_column("teacher", justify="right")
    nfe.add_column("total", justify="right")
    nfe.add_row(
        "generator update", f"{n.gen_student_mean:g} (max {n.gen_student_max}, 1 w/ grad)", str(n.gen_critic),
        f"{n.gen_teacher} ({', '.join(n.teachers_used)})", f"{n.generator_step:g}",
    )  # fmt: skip
    nfe.add_row("critic update", f"{n.critic_student_mean:g}", f"{n.critic_forward} (w/ grad)", "0", f"{n.critic_step:g}")
    nfe.add_section()
    nfe.add_row(f"cycle (1 gen + {n.critic_updates} critic)", "", "", "", f"{n.per_cycle:g} + {n.backward_per_cycle} bwd")
    nfe.add_row("mean per iteration", "", "", "", f"{n.per_iteration:.2f}")
    return [mem, off, nfe]
