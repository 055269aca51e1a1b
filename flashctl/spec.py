"""Experiment specs: pydantic models, YAML loading, dotted overrides, hashing, JSON schema.

One spec describes one distillation run (and the data/teachers it needs). The recipe factors
studied by the paper are first-class fields: ``data`` (composition), ``guidance`` (teacher
guidance policy) and ``mixture`` (task mixture). ``ablations`` names levels of each factor as
overrides of this spec.

This module imports no torch: the CLI uses it for ``--help``/``validate`` at start-up speed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flashctl import yamlio
from flashctl.errors import UserError

Category = Literal["object", "scene", "text"]
Aspect = Literal["square", "landscape", "portrait"]
Task = Literal["t2i", "edit"]
OpenKind = Literal["position", "colour", "both", "background"]
FACTORS = ("data-composition", "teacher-guidance", "task-mixture")
T2I_ONLY_MODELS = ("Qwen/Qwen-Image",)
"""Hub ids of pipelines that cannot edit (no processor): a teacher with such a path cannot list `edit`."""


_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
_SLURM_NAMES = re.compile(r"[A-Za-z0-9_.+-]{1,128}(,[A-Za-z0-9_.+-]{1,128}){0,31}")
_SLURM_TIME = re.compile(r"(\d{1,5}-)?\d{1,6}(:\d{1,2}){0,2}|UNLIMITED|unlimited|INFINITE|infinite")
_HOST_CHARS = re.compile(r"[A-Za-z0-9._:,@-]{0,1024}")
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "file", "databricks", "databricks-uc")
"""URI schemes MLflow serves as tracking stores (a SQLAlchemy `+driver` suffix is allowed)."""


def check_tracking_uri(uri: str) -> str:
    """`uri` if it can name an MLflow tracking store, else ValueError saying why.

    Checked up front because MLflow's own failures come late (in the ranks of a launched job)
    and as tracebacks: a bare path, an unknown scheme, `sqlite://` (in-memory: the run would
    vanish), an http URI without host, control characters."""
    from urllib.parse import urlsplit

    if not uri or any(ord(c) < 32 or ord(c) == 127 for c in uri):
        raise ValueError("must be a non-empty URI without control characters")
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise ValueError(f"{uri[:60]!r}: scheme {scheme or '(none)'!r} is not one of {', '.join(TRACKING_SCHEMES)} "
                         "(e.g. sqlite:///mlflow.db, http://host:5000)")
    if scheme == "sqlite" and (not uri.startswith("sqlite:///") or uri.rstrip("/") == "sqlite:"):
        raise ValueError(f"{uri[:60]!r}: a SQLite store is sqlite:///relative/path.db or sqlite:////absolute/path.db")
    if scheme in ("http", "https") and not urlsplit(uri).hostname:
        raise ValueError(f"{uri[:60]!r}: no host")
    return uri


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

    @field_validator("*")
    @classmethod
    def _no_control_chars(cls, v: Any) -> Any:
        # a NUL in a path makes every os call raise ValueError; a newline in a name or path
        # breaks the job scripts and env files it is written into
        for item in v if isinstance(v, (list, tuple)) else (v,):
            if isinstance(item, (str, Path)) and any(ord(c) < 32 or ord(c) == 127 for c in str(item)):
                raise ValueError(f"{str(item)[:40]!r} contains control characters")
        return v


class DataSpec(_Model):
    """Where the training data comes from and what it is made of."""

    root: Path = Path("data/shapes")
    """Directory of the prepared Arrow shards (`prepare-data` writes it, `distill` reads it)."""
    source: Literal["shapes", "jsonl"] = "shapes"
    """`shapes`: the procedural shapes world; `jsonl`: the JSONL manifests in `manifests`."""
    manifests: list[Path] = Field(default_factory=list)
    """JSONL manifests (T2I rows: id, prompt, [category, size, image]; edit rows: id,
    instruction, source_image, [target_image]); image paths relative to the manifest."""
    n: int = Field(4000, ge=1)
    """Number of records to generate from the shapes world."""
    seed: int = 0
    """Seed of the shapes world (same seed, same rows, same digest)."""
    edit_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """Fraction of generated shapes records that are edit records (the rest are T2I)."""
    open_attributes: float | dict[OpenKind, float] = 0.0
    """Share of shapes T2I prompts (and of `add` edits) that leave attributes unstated, drawn
    from a known distribution stored with the row (scene JSON `open`). A number p in [0, 1]:
    p of the rows, the kind uniform over those the category allows (object: position, colour,
    both; scene: also background, "position" = the whole arrangement; text: colour; add:
    position, colour, both). A mapping {position|colour|both|background: share}, shares
    summing to <= 1: per-kind shares among the kinds a row allows. 0 = every prompt states
    everything (the world the shipped teachers were trained on; rows bit-identical to it)."""
    ref_edits: float = Field(0.0, ge=0.0, le=1.0)
    """Share of shapes recolour/remove/move edits on scenes that name the item by one property
    ("the red one", "the shape on the left"): edit types recolour-ref/remove-ref/move-ref.
    > 0 also puts those types in the eval set's cycle of edit types. 0 = none (default)."""
    categories: dict[Category, float] = Field(
        default_factory=lambda: {"object": 1.0, "scene": 1.0, "text": 1.0}
    )
    """Composition weight per category; 0 (or absent) filters the category out."""
    aspects: dict[Aspect, float] = Field(
        default_factory=lambda: {"square": 1.0, "landscape": 1.0, "portrait": 1.0}
    )
    """Composition weight per aspect ratio; 0 (or absent) filters the aspect out."""
    sizes: dict[Aspect, tuple[int, int]] = Field(
        default_factory=lambda: {"square": (32, 32), "landscape": (48, 32), "portrait": (32, 48)}
    )
    """Image size (width, height) per aspect; sides must be divisible by 8 (VAE x patch)."""
    rows_per_shard: int = Field(2000, ge=1)
    """Rows per Arrow shard."""
    cached_conditioning: bool | None = None
    """Train `distill` from the text embeddings and VAE latents that `prepare-data
    --cache-embeddings` stored with the shards, with no text encoder or VAE on the ranks.
    null (default): when the dataset has a cache; true: require one; false: encode on the fly."""

    @field_validator("open_attributes")
    @classmethod
    def _open_ok(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        shares = list(v.values()) if isinstance(v, dict) else [v]
        if any(not 0.0 <= w <= 1.0 for w in shares):
            raise ValueError("shares must be in [0, 1]")
        if sum(shares) > 1.0 + 1e-9:
            raise ValueError(f"shares sum to {sum(shares):g} > 1")
        return v

    @field_validator("categories", "aspects")
    @classmethod
    def _weights_ok(cls, v: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in v.values()):
            raise ValueError("weights must be >= 0")
        if not any(w > 0 for w in v.values()):
            raise ValueError("at least one weight must be > 0")
        return v

    @field_validator("sizes")
    @classmethod
    def _sizes_ok(cls, v: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        for aspect, (w, h) in v.items():
            if w % 8 or h % 8 or w <= 0 or h <= 0:
                raise ValueError(f"{aspect} size {w}x{h}: sides must be positive multiples of 8")
        return v


class TinyModelSpec(_Model):
    """Sizes of the tiny Qwen-Image components built offline (CPU scale)."""

    num_layers: int = Field(2, ge=1)
    """Transformer blocks of QwenImageTransformer2DModel."""
    num_attention_heads: int = Field(3, ge=1)
    """Attention heads of the transformer."""
    attention_head_dim: int = Field(16, ge=8)
    """Head dimension; the RoPE axes dims must sum to it."""
    axes_dims_rope: tuple[int, int, int] = (8, 4, 4)
    """RoPE dims per axis (frame, height, width)."""
    z_dim: int = Field(4, ge=1)
    """VAE latent channels."""
    vae_base_dim: int = Field(24, ge=8)
    """VAE base width."""
    text_hidden_size: int = Field(64, ge=16)
    """Hidden size of the tiny Qwen2.5-VL text encoder."""
    text_layers: int = Field(2, ge=1)
    """Layers of the tiny text encoder."""
    vocab_size: int = Field(2000, ge=300)
    """Target vocabulary of the locally trained byte-level BPE tokenizer."""

    @model_validator(mode="after")
    def _rope(self) -> "TinyModelSpec":
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {tuple(self.axes_dims_rope)} must sum to attention_head_dim "
                f"{self.attention_head_dim}"
            )
        return self


class ModelSpec(_Model):
    """The student's architecture and initialisation."""

    init_from: str = "base"
    """Teacher name (from `teachers`) the student and critic are initialised from, or a
    diffusers pipeline folder / hub id."""
    tiny: TinyModelSpec = Field(default_factory=TinyModelSpec)
    """Tiny component sizes (used when components are built offline)."""
    edit_max_pixels: int = Field(48 * 32, ge=64)
    """Cap of the edit pipelines' reference-image area (they hard-code ~1 MPix)."""


class TeacherSpec(_Model):
    """A frozen teacher."""

    path: str
    """diffusers pipeline folder (local path) or hub id."""
    cfg_scale: float = Field(4.0, ge=1.0)
    """Classifier-free guidance scale of the real score."""
    cfg_rescale: float = Field(0.0, ge=0.0, le=1.0)
    """Norm rescale of the CFG output towards the conditional norm (0 = off, 1 = full)."""
    tasks: list[Task] = Field(default_factory=lambda: ["t2i", "edit"])
    """Tasks this teacher can serve (a specialised teacher lists one). Validation rejects a
    spec whose guidance can pick a teacher for a task it does not list, and a teacher listing
    `edit` whose pipeline cannot edit (its model_index.json has no processor, e.g.
    `Qwen/Qwen-Image`; QwenImageEdit and QwenImageEditPlus pipelines can), see
    `ExperimentSpec.edit_family_errors`."""


class GuidanceSpec(_Model):
    """Teacher guidance policy (paper factor 2)."""

    policy: Literal["single", "specialised", "stepwise"] = "single"
    """`single`: base teacher for every sample; `specialised`: the task's specialised teacher
    supplies the real score for its task; `stepwise`: the base teacher anchors and the
    specialised teacher is used only at `steps` / in `student_sigma_range`."""
    base: str = "base"
    """Name of the base (anchor) teacher in `teachers`."""
    specialised: dict[Task, str] = Field(default_factory=dict)
    """Task -> teacher name of the task-specialised teacher(s)."""
    steps: list[int] = Field(default_factory=lambda: [2, 3])
    """Student step indices (0 = first, noisiest) where `stepwise` uses the specialised teacher."""
    student_sigma_range: tuple[float, float] | None = None
    """Optional range [lo, hi] (inclusive) of the student step's input noise level: `stepwise`
    uses the specialised teacher only at steps whose level sigma_k of the student's grid
    (`distill.student_steps`, `distill.shift`; 4 steps at shift 3: 1, .9, .75, .5) lies in it.
    It selects by the student step, not by the re-noise level tau of the DM gradient."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "sigma_range" in data:
            raise ValueError("sigma_range was renamed student_sigma_range (it selects by the student "
                             "step's input sigma, not by the re-noise level)")
        return data


class MixtureSpec(_Model):
    """Task mixture T2I : edit (paper factor 3)."""

    t2i: float = Field(5.0, ge=0.0)
    """Relative weight of text-to-image steps."""
    edit: float = Field(5.0, ge=0.0)
    """Relative weight of editing steps."""

    @model_validator(mode="after")
    def _nonzero(self) -> "MixtureSpec":
        if self.t2i + self.edit <= 0:
            raise ValueError("t2i + edit must be > 0")
        return self

    @property
    def edit_probability(self) -> float:
        return self.edit / (self.t2i + self.edit)


class DistillSpec(_Model):
    """The DMD2 objective and optimisation."""

    objective: Literal["dmd2", "dmd", "decoupled-dmd"] = "dmd2"
    """Distillation objective (held fixed in the paper's study): `dmd2` (K critic updates per
    generator update), `dmd` (one critic update per generator update, no two-time-scale rule),
    `decoupled-dmd` (Liu et al. 2025: distribution matching re-noised over [tau_min, tau_max], the
    CFG-augmentation term only below the student step's input level; teachers' `cfg_rescale`
    must be 0 with it)."""
    student_steps: int = Field(4, ge=1)
    """Student sampling steps (NFE)."""
    shift: float = Field(3.0, gt=0.0)
    """Timestep shift of the student's sigma grid: s*sigma / (1 + (s-1)*sigma)."""
    critic_updates: int = Field(5, ge=1)
    """Critic (fake score) updates per generator update (K)."""
    tau_min: float = Field(0.02, ge=0.0, le=1.0)
    """Lower bound of the re-noise level for the DM gradient."""
    tau_max: float = Field(0.98, ge=0.0, le=1.0)
    """Upper bound of the re-noise level for the DM gradient."""
    lr_generator: float = Field(2e-5, gt=0.0)
    """Student learning rate."""
    lr_critic: float = Field(4e-5, gt=0.0)
    """Critic learning rate."""
    warmup_steps: int = Field(0, ge=0)
    """Linear learning-rate warm-up over this many generator steps (0 = none), for student and
    critic alike (the critic over as many of its updates as those steps hold: `critic_updates`
    per step, one under DMD; with `grad_accum` > 1 an engine updates once per `grad_accum`
    micro-steps): DeepSpeed's own `WarmupLR` scheduler, from 0 to `lr_generator` / `lr_critic`,
    then constant. Why: Adam's first updates move every weight by about the full learning rate
    whatever the gradient's size. Measured on the embedded default at lr 5e-4, a 50-step warm-up
    did not keep the student's accuracy (T2I / edit 0.685 / 0.427, against 0.734 / 0.409
    without); a lower rate did. WarmupLR counts from 0 at the first update: the first two
    updates run at rate 0, while Adam's moments gather, and the full rate is reached at update
    max(2, updates) + 2 (DeepSpeed's shortest warm-up is 2 updates)."""
    batch_size: int = Field(4, ge=1)
    """Micro-batch per rank."""
    grad_accum: int = Field(1, ge=1)
    """Gradient accumulation steps."""
    steps: int = Field(200, ge=1)
    """Generator steps."""
    checkpoint_every: int = Field(50, ge=1)
    """Checkpoint interval in generator steps."""
    log_every: int = Field(5, ge=1)
    """Metric logging interval in generator steps."""
    sample_every: int = Field(100, ge=0)
    """Interval (generator steps) of the periodic student samples (0 = off), taken at step 0 (the
    student as initialised, on a run that starts fresh) and then every `sample_every` steps: a
    grid of square samples as an MLflow artifact, and the verifier's accuracy on them as the
    metrics `samples/t2i_acc` / `samples/edit_acc` with their row counts `samples/t2i_n` /
    `samples/edit_n` -- the report's training curves with Wilson bands, where a recipe that
    destabilises shows as a drop."""
    sample_rows: int = Field(16, ge=1)
    """Eval rows per task (the first of the seeded eval set) sampled at each periodic sample."""
    seed: int = 0
    """Training seed."""
    gan_weight: float = Field(0.0, ge=0.0)
    """DMD2's GAN term (Yin et al. 2024), 0 = off. When > 0 the critic carries a classifier head
    on its middle transformer block's image features; each critic update adds the logistic
    discriminator loss (the batch's real target latents vs the student's samples, both noised
    to the same level) and each generator update adds `gan_weight` x the non-saturating generator
    loss softplus(-D(student sample)). The same weight scales the discriminator term in the
    critic's loss. Needs target images in the data (every prepared shapes row has one)."""
    gradient_checkpointing: bool | None = None
    """Activation checkpointing of student and critic (recompute block activations in the
    backward pass: ~an order of magnitude less activation memory for one more forward).
    Default (null): on for `launch.device: cuda`, off on CPU where the tiny model's activations
    are small and the recompute would only cost time."""

    @model_validator(mode="after")
    def _taus(self) -> "DistillSpec":
        if self.tau_min >= self.tau_max:
            raise ValueError(f"tau_min {self.tau_min} must be < tau_max {self.tau_max}")
        return self


class TeacherTrainSpec(_Model):
    """Flow-matching training of a teacher (`train-teacher`)."""

    init_from: str | None = None
    """Pipeline folder to fine-tune from (None = build tiny components from scratch)."""
    output: Path = Path("runs/teacher")
    """Where the trained teacher pipeline folder is written."""
    t2i: float = Field(1.0, ge=0.0)
    """Relative weight of T2I batches."""
    edit: float = Field(1.0, ge=0.0)
    """Relative weight of edit batches."""
    steps: int = Field(2000, ge=1)
    """Optimizer steps of the transformer."""
    vae_steps: int = Field(1500, ge=0)
    """Reconstruction steps of the VAE when building from scratch (0 = keep random VAE)."""
    vae_lr: float = Field(5e-4, gt=0.0)
    """VAE learning rate."""
    vae_batch_size: int = Field(8, ge=1)
    """VAE batch size."""
    lr: float = Field(1e-3, gt=0.0)
    """Learning rate."""
    decay_steps: int = Field(0, ge=0)
    """Warmup-stable-decay: the learning rate is constant after warm-up and falls linearly to 0
    over the last `decay_steps` steps (0 = constant to the end). Chosen over cosine because the
    stable phase does not depend on `steps`: a finished run's checkpoint before the decay is the
    same as a longer run's, so `steps` can be raised and training resumed from it."""
    batch_size: int = Field(32, ge=1)
    """Batch size."""
    cond_dropout: float = Field(0.1, ge=0.0, le=1.0)
    """Probability of dropping the prompt (enables CFG)."""
    checkpoint_every: int = Field(250, ge=1)
    """Checkpoint interval in steps."""
    seed: int = 0
    """Training seed."""

    @model_validator(mode="after")
    def _decay(self) -> "TeacherTrainSpec":
        if self.decay_steps > self.steps:
            raise ValueError(f"decay_steps {self.decay_steps} must be <= steps {self.steps}")
        return self


class DeepSpeedSpec(_Model):
    """DeepSpeed engine settings (flashctl computes every number; no "auto")."""

    zero_stage: Literal[0, 1, 2, 3] = 3
    """ZeRO stage."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """Optimizer state offload."""
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    """Parameter offload (stage 3 only)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision."""
    gradient_clipping: float = Field(1.0, ge=0.0)
    """Gradient norm clip (always explicit)."""
    param_persistence_threshold: int | None = Field(None, ge=0)
    """ZeRO-3 `stage3_param_persistence_threshold`: parameters with fewer elements stay whole on
    every rank. None: DeepSpeed's default (100,000, which keeps every tensor of the tiny CPU
    models whole); 0 partitions every tensor (exercises ZeRO-3's gathers for real)."""
    gather: Literal["block", "submodule"] = "block"
    """ZeRO-3 gather unit of partitioned models. `block`: each transformer block is gathered whole
    on entry and released on exit (DeepSpeed leaf modules; one gather per block, as FSDP wraps
    per block); `submodule`: DeepSpeed's own default, every Linear and norm gathered apart, a few
    hundred Python hooks per forward. Peak memory per rank grows by one gathered block. With
    `distill.gan_weight` > 0 the critic keeps `submodule` (its generator-step backward would
    reduce a block's gradients twice)."""
    memory_efficient_linear: bool | None = None
    """ZeRO-3 `memory_efficient_linear`: DeepSpeed routes every `F.linear` of the process (teachers
    and eval included) through its own autograd Function. None: DeepSpeed's default (on). Off
    measured 1.65x vs 1.78x the minimal loop's round time at 1 CPU rank (bench/distill_step.py,
    row flashctl-1-mel0), within the machine's noise, so the embedded default leaves it on."""
    prefetch_bucket_size: int | None = Field(None, ge=0)
    """ZeRO-3 `stage3_prefetch_bucket_size` (elements fetched ahead). None: DeepSpeed's default
    (50,000,000)."""
    max_live_parameters: int | None = Field(None, ge=0)
    """ZeRO-3 `stage3_max_live_parameters` (gathered elements kept before release). None:
    DeepSpeed's default (1,000,000,000)."""
    reduce_bucket_size: int | None = Field(None, ge=1)
    """ZeRO `reduce_bucket_size` (elements per gradient reduce). None: DeepSpeed's default
    (500,000,000)."""
    teacher_shard: Literal["world", "node"] = "world"
    """Ranks each partitioned frozen teacher (CUDA, ZeRO-3) is split over. `world`: all ranks (least
    memory: teacher / world size per GPU, but every teacher forward all-gathers ~(nnodes-1)/nnodes
    of its weights over the inter-node network). `node`: the ranks of one node, each node holding
    a whole copy (teacher / GPUs per node per GPU; the forwards' all-gathers stay on NVLink). A
    teacher has no gradients or optimizer states to spread wider, so on multi-node GPU jobs `node`
    is the faster choice whenever `flashctl plan` shows it fits; the default stays `world` because
    with few GPUs per node `node` can exceed a GPU. Same thing on one node."""


class SlurmSpec(_Model):
    """Slurm job settings."""

    partition: str | None = None
    """Partition (`-p`)."""
    account: str | None = None
    """Account (`-A`)."""
    time: str = "04:00:00"
    """Wall-time limit."""
    gpus_per_node: int = Field(8, ge=0)
    """GPUs per node."""
    cpus_per_task: int = Field(8, ge=1)
    """CPUs per task."""
    array_parallel: int = Field(4, ge=1)
    """`%N` concurrency of ablation job arrays."""

    @field_validator("partition", "account")
    @classmethod
    def _slurm_name(cls, v: str | None) -> str | None:
        # written into `#SBATCH` lines of a shell script: a newline or `;` would run commands
        if v is not None and not _SLURM_NAMES.fullmatch(v):
            raise ValueError(f"{v[:40]!r}: only letters, digits and . _ + - (commas between names) are allowed")
        return v

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, v: str) -> str:
        if not _SLURM_TIME.fullmatch(v):
            raise ValueError(f"{v[:40]!r} is not a Slurm time (MM, HH:MM:SS, D-HH[:MM[:SS]] or UNLIMITED)")
        return v


class LaunchSpec(_Model):
    """How the distillation job is launched."""

    backend: Literal["local", "hostfile", "slurm"] = "local"
    """`local`: one machine; `hostfile`: DeepSpeed multi-node launcher; `slurm`: sbatch."""
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    """Process launcher on each node."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Accelerator (cpu uses DeepSpeed's CPU accelerator and gloo)."""
    nproc_per_node: int = Field(2, ge=1)
    """Processes (ranks) per node."""
    nnodes: int = Field(1, ge=1)
    """Nodes."""
    hostfile: Path | None = None
    """DeepSpeed hostfile (`host slots=N` lines) for `hostfile`."""
    include: str = ""
    """DeepSpeed `--include` filter of hostfile resources (`host1:0,1@host2`)."""
    exclude: str = ""
    """DeepSpeed `--exclude` filter of hostfile resources."""
    master_addr: str = "127.0.0.1"
    """Rendezvous address."""
    master_port: int = Field(29511, ge=1024, le=65535)
    """Rendezvous port."""
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    """Slurm settings for `slurm`."""
    gpu_memory_gb: float = Field(80.0, gt=0)
    """Memory per GPU assumed by `plan`."""

    @field_validator("master_addr", "include", "exclude")
    @classmethod
    def _host_chars(cls, v: str) -> str:
        # host names / DeepSpeed filters (`host1:0,1@host2`) end up in launch commands
        if not _HOST_CHARS.fullmatch(v):
            raise ValueError(f"{v[:40]!r}: only letters, digits and . _ - : , @ are allowed")
        return v


class TrackingSpec(_Model):
    """MLflow tracking."""

    enabled: bool = True
    """Log to MLflow."""
    uri: str = "sqlite:///mlflow.db"
    """Tracking URI (relative sqlite paths resolve against the working directory)."""
    experiment: str = "flashctl"
    """Experiment name."""

    @field_validator("uri")
    @classmethod
    def _uri_ok(cls, v: str) -> str:
        return check_tracking_uri(v)


class EvalSpec(_Model):
    """Evaluation of student vs teacher on a fixed, seeded prompt set."""

    n_t2i: int = Field(48, ge=0)
    """T2I eval prompts."""
    n_edit: int = Field(48, ge=0)
    """Edit eval instructions."""
    seed: int = 1234
    """Seed of the eval set and of sampling noise."""
    student_nfe: int = Field(4, ge=1)
    """Student sampling steps (= network evaluations: the student runs without CFG); the teacher
    is also evaluated at this budget (`teacher_fast`: the same steps, no CFG)."""
    teacher_nfe: int = Field(40, ge=1)
    """Teacher sampling steps (with CFG each step costs two network evaluations)."""
    teacher_cfg: float = Field(4.0, ge=1.0)
    """Teacher CFG scale at evaluation."""
    diversity_seeds: int = Field(4, ge=0)
    """Diversity: eval rows whose prompt leaves attributes open (`data.open_attributes`) are
    sampled this many more times (other seeds) per model, and how the images cover the open
    attributes is reported (`shapes.diversity`); 0 = off. Costs K samplings of the open rows."""
    reuse_teacher: bool = True
    """Keep the teacher's evaluation (`teacher_nfe` steps + CFG) in `run.out_dir/eval-cache/`
    and reuse it in every run or ablation cell with the same teacher files, eval rows, steps,
    CFG, precision and device: a grid samples the costly teacher once (its timing is then the
    first run's)."""
    enabled: bool = True
    """Run the evaluation at the end of `distill`."""


class RunSpec(_Model):
    """Run identity and outputs."""

    name: str = "run"
    """Run name (the run directory is `out_dir/name`): 1-255 letters, digits, `.`, `_`, `+`, `-`,
    starting with a letter or digit."""
    out_dir: Path = Path("runs")
    """Parent directory of run directories."""

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        # it names a directory, a Slurm job and an MLflow run: `a/b`, `..`, `` or spaces would
        # escape out_dir, collide or break the scripts that use it
        if not _RUN_NAME.fullmatch(v):
            raise ValueError(f"{v[:40]!r}: a run name is 1-255 letters, digits, '.', '_', '+', '-', "
                             "starting with a letter or digit")
        return v


class ExperimentSpec(_Model):
    """A whole distillation experiment."""

    run: RunSpec = Field(default_factory=RunSpec)
    """Run identity and outputs."""
    data: DataSpec = Field(default_factory=DataSpec)
    """Training data and its composition (factor 1)."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    """Student architecture and initialisation."""
    teachers: dict[str, TeacherSpec] = Field(default_factory=dict)
    """Named frozen teachers; `guidance.base` must be one of them."""
    guidance: GuidanceSpec = Field(default_factory=GuidanceSpec)
    """Teacher guidance policy (factor 2)."""
    mixture: MixtureSpec = Field(default_factory=MixtureSpec)
    """Task mixture T2I:edit (factor 3)."""
    distill: DistillSpec = Field(default_factory=DistillSpec)
    """Objective and optimisation."""
    train_teacher: TeacherTrainSpec = Field(default_factory=TeacherTrainSpec)
    """Teacher training (`train-teacher`)."""
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    """DeepSpeed settings."""
    launch: LaunchSpec = Field(default_factory=LaunchSpec)
    """Launch settings."""
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    """MLflow tracking."""
    eval: EvalSpec = Field(default_factory=EvalSpec)
    """Evaluation."""
    ablations: dict[Literal["data-composition", "teacher-guidance", "task-mixture"], dict[str, dict[str, Any]]] = Field(
        default_factory=dict
    )
    """Per factor: level name -> dotted overrides (e.g. `mixture.edit: 5`)."""

    @model_validator(mode="after")
    def _cross(self) -> "ExperimentSpec":
        errors = []
        if self.teachers and self.guidance.base not in self.teachers:
            errors.append(f"guidance.base: teacher {self.guidance.base!r} is not in teachers")
        for task, name in self.guidance.specialised.items():
            if name not in self.teachers:
                errors.append(f"guidance.specialised.{task}: teacher {name!r} is not in teachers")
        if self.guidance.policy != "single" and not self.guidance.specialised:
            errors.append(f"guidance.specialised: policy {self.guidance.policy!r} needs a specialised teacher")
        if self.distill.objective == "decoupled-dmd":
            for name, t in self.teachers.items():
                if t.cfg_rescale:
                    errors.append(f"teachers.{name}.cfg_rescale: {t.cfg_rescale:g} has no meaning with "
                                  "distill.objective=decoupled-dmd (its CFG term is not renormalised); set it to 0")
        bad = [s for s in self.guidance.steps if not 0 <= s < self.distill.student_steps]
        if bad:
            errors.append(f"guidance.steps: {bad} outside 0..{self.distill.student_steps - 1}")
        rng = self.guidance.student_sigma_range
        if rng is not None and self.guidance.policy == "stepwise":
            levels = self.student_sigma_levels()
            lo, hi = rng
            if not any(lo <= levels[k] <= hi for k in self.guidance.steps if 0 <= k < len(levels)):
                shown = ", ".join(f"{levels[k]:.4g}" for k in self.guidance.steps if 0 <= k < len(levels))
                errors.append(f"guidance.student_sigma_range: [{lo:g}, {hi:g}] holds none of the sigmas of "
                              f"guidance.steps ({shown}); the specialised teacher would never be used")
        if not errors and self.teachers:
            for task in ("t2i", "edit"):
                for name in self.teachers_picked(task):
                    if task not in self.teachers[name].tasks:
                        errors.append(f"teachers.{name}.tasks: {self.teachers[name].tasks} lacks {task!r}, but "
                                      f"guidance ({self.guidance.policy}) picks {name!r} for {task} samples "
                                      f"(mixture.{task} = {getattr(self.mixture, task):g})")
            errors += self.edit_family_errors()
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def run_dir(self) -> Path:
        return self.run.out_dir / self.run.name

    def student_sigma_levels(self) -> list[float]:
        """The student's input sigma per step: linspace(1, 1/S, S)_k = 1 - k/S, shifted by
        s*x / (1 + (s-1)*x). Same values as `flow.student_sigmas` (without its
        terminal 0), computed here without torch so validation stays light."""
        s, n = self.distill.shift, self.distill.student_steps
        return [s * x / (1 + (s - 1) * x) for x in (1 - k / n for k in range(n))]

    def edit_family_errors(self) -> list[str]:
        """Problems with the teachers' pipeline families for edits (one line each), from their
        model_index.json (`pipelines.pipeline_info`; a pipeline it cannot read without a
        download is not judged here, the worker asks again once the files are there).

        A teacher listing `edit` must be an edit pipeline (it ships a processor). And one edit
        family per run: the base teacher's pipeline encodes the conditioning of every sample
        (`models.adapter.FAMILIES`: QwenImageEdit and QwenImageEditPlus differ in template and
        condition-image size), which student, critic and the picked teacher all see -- so a
        teacher picked for edits must be of the base's edit family, and the base must be able
        to edit when edits are drawn. Sharing one conditioning across families would feed a
        teacher inputs it was not trained on; encoding per teacher would need one text-encoder
        pass and one cache per family for the same DMD2 sample."""
        from flashctl.pipelines import pipeline_info

        info = {name: pipeline_info(t.path) for name, t in self.teachers.items()}
        errors = []
        for name, t in self.teachers.items():
            i = info[name]
            if "edit" in t.tasks and (t.path in T2I_ONLY_MODELS or (i is not None and not i[1])):
                cls = i[0] if i is not None else "a T2I pipeline"
                errors.append(f"teachers.{name}.tasks: {t.path} cannot edit ({cls} without processor); "
                              "use an edit pipeline such as Qwen/Qwen-Image-Edit-2509")
        picked = self.teachers_picked("edit")
        base = self.guidance.base
        if errors or not picked or base not in self.teachers:
            return errors

        def family(name: str) -> str | None:
            i = info[name]
            return None if i is None or not i[1] else (
                "QwenImageEditPlusPipeline" if i[0] == "QwenImageEditPlusPipeline" else "QwenImageEditPipeline")

        if info[base] is not None and not info[base][1]:
            return [f"teachers.{base}.path: {self.teachers[base].path} ({info[base][0]}) cannot encode edit "
                    f"conditioning, but the mixture draws edits (mixture.edit = {self.mixture.edit:g}) and the "
                    "base teacher's pipeline encodes every sample's conditioning; use an edit pipeline as base"]
        for name in picked:
            if name != base and None not in (family(name), family(base)) and family(name) != family(base):
                errors.append(f"teachers.{name}.path: {self.teachers[name].path} is a {family(name)}, but the base "
                              f"teacher ({self.teachers[base].path}) is a {family(base)} and encodes the edit "
                              "conditioning of every sample (one edit family per run: template and "
                              "condition-image size differ)")
        return errors

    def teachers_picked(self, task: str) -> list[str]:
        """Teachers the guidance policy can pick for the real score of `task` samples; none when
        the task mixture never draws `task` (weight 0).

        `single`: the base teacher. `specialised`: the task's specialised teacher, else the
        base. `stepwise`: the task's specialised teacher and, unless it covers every student
        step (all steps in `steps` and no `student_sigma_range`), the base teacher.
        """
        if getattr(self.mixture, task) <= 0:
            return []
        g = self.guidance
        expert = g.specialised.get(task) if g.policy != "single" else None
        if expert is None:
            return [g.base]
        if g.policy == "specialised":
            return [expert]
        covers_all = set(range(self.distill.student_steps)) <= set(g.steps) and g.student_sigma_range is None
        return [expert] if covers_all else [g.base, expert]

    def gradient_checkpointing(self) -> bool:
        """Whether student and critic recompute activations (`distill.gradient_checkpointing`,
        default on for CUDA); `plan` and the worker read it here."""
        gc = self.distill.gradient_checkpointing
        return self.launch.device == "cuda" if gc is None else gc

    def teachers_partitioned(self) -> bool:
        """Whether the worker holds frozen teachers as ZeRO-3 partitioned engines (CUDA, stage 3)
        rather than plain replicas; `plan` counts the same placement."""
        return self.launch.device == "cuda" and self.deepspeed.zero_stage == 3

    def gather_unit(self, model: str) -> str:
        """ZeRO-3 gather unit of `model` (student | critic | teacher): `deepspeed.gather`, except a
        critic with the GAN head, whose generator-step backward (w.r.t. its input only) would make
        DeepSpeed reduce a block's gradients twice; `plan` and the worker read it here."""
        if model == "critic" and self.distill.gan_weight > 0:
            return "submodule"
        return self.deepspeed.gather

    def teacher_shard_ranks(self) -> int:
        """Ranks one partitioned teacher is split over (`deepspeed.teacher_shard`): the world
        size, or the ranks per node; `plan` divides by it, the worker builds the same groups."""
        per_node = self.launch.nproc_per_node
        return per_node if self.deepspeed.teacher_shard == "node" else per_node * self.launch.nnodes

    def teachers_held(self) -> list[str]:
        """Teachers the distillation worker loads (frozen), base first: the one decision that
        `plan` (memory, NFE) and the worker share.

        The base teacher is always held (it anchors the guidance, its pipeline encodes the
        conditioning and the final evaluation samples it); every other teacher only when the
        policy can pick it for a task the mixture draws.
        """
        names = [self.guidance.base]
        for task in ("t2i", "edit"):
            names += self.teachers_picked(task)
        return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------
# Loading, overrides, errors


class SpecError(UserError):
    """A spec could not be loaded; `errors` lists every problem as (location, message).

    A UserError (a caller that catches those catches this too); the CLI prints one line per
    problem and exits with 2."""

    exit_code = 2

    def __init__(self, source: str, errors: list[tuple[str, str]]):
        self.source = source
        self.errors = errors
        super().__init__("\n".join(f"{source}: {loc}: {msg}" for loc, msg in errors))


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map of key path -> 1-based YAML line, for error messages (empty if unreadable)."""
    try:
        return yamlio.key_lines(yamlio.compose(text))
    except yamlio.InputError:
        return {}


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], yaml-typed value)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ValueError(f"override {item!r} has an empty key")
    try:
        value = yamlio.load(raw, f"override {key}") if raw != "" else ""
    except yamlio.YamlSyntaxError:
        value = raw  # text that is not YAML (`a=b: c`) stays a string
    except yamlio.InputError as exc:  # a bomb, a repeated key, a value Python cannot hold
        raise ValueError(f"override {item[:80]!r}: {exc.problem}") from None
    return key.split("."), value


def set_dotted(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[path[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Return a deep copy of `data` with dotted overrides applied (list of `k=v` or a dict)."""
    out = json.loads(json.dumps(data, default=str))
    items = (
        [parse_override(o) for o in overrides]
        if isinstance(overrides, list)
        else [(k.split("."), v) for k, v in overrides.items()]
    )
    for path, value in items:
        set_dotted(out, path, value)
    return out


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def validate_data(data: dict[str, Any], source: str, text: str = "") -> ExperimentSpec:
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        lines = _yaml_lines(text) if text else {}
        errors = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            line = None
            for n in range(len(loc), 0, -1):
                if loc[:n] in lines:
                    line = lines[loc[:n]]
                    break
            where = _format_loc(loc) + (f" (line {line})" if line else "")
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            elif msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            errors.append((where, msg))
        raise SpecError(source, errors) from None


def load_spec_data(path: str | Path | None) -> tuple[dict[str, Any], str, str]:
    """Read a spec file (or the embedded default when `path` is None): (data, text, source)."""
    if path is None:
        path = default_spec_path()
    p = Path(path)
    if not p.is_file():
        raise SpecError(str(p), [("<file>", "no such spec file" if not p.exists() else "not a regular file")])
    try:
        text = yamlio.read_text(p, "spec file")
        data = yamlio.load(text, str(p))
    except yamlio.InputError as exc:
        raise SpecError(str(p), [(f"line {exc.line}" if exc.line else "<file>", exc.problem)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(str(p), [("<root>", "a spec must be a YAML mapping")])
    return data, text, str(p)


def load_spec(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None) -> ExperimentSpec:
    """Load, override and validate a spec; raises SpecError listing every problem."""
    data, text, source = load_spec_data(path)
    if overrides:
        try:
            data = apply_overrides(data, overrides)
        except ValueError as exc:
            raise SpecError(source, [("<override>", str(exc))]) from None
    return validate_data(data, source, text)


def default_spec_path() -> Path:
    """The embedded default spec (`experiments/tiny-cpu.yaml`, shipped inside the package)."""
    return Path(__file__).parent / "assets" / "tiny-cpu.yaml"


def resolved_dict(spec: ExperimentSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")


def to_yaml(spec: ExperimentSpec) -> str:
    return yaml.safe_dump(resolved_dict(spec), sort_keys=False)


def spec_hash(spec: ExperimentSpec,
              exclude: tuple[str, ...] = ("run", "tracking", "ablations", "train_teacher")) -> str:
    """Stable hash of the resolved spec (what the distill run computes), 12 hex chars.

    Run naming, tracking and the ablation table do not change what is trained, so they are
    left out: the same recipe under another name has the same hash. `train_teacher` configures
    the `train-teacher` command, not the distill job (which reads teachers by `teachers.*.path`),
    so a new teacher-training knob does not make every finished cell look like another recipe.
    """
    data = {k: v for k, v in resolved_dict(spec).items() if k not in exclude}
    if "launch" in data:  # where and how processes start does not change what is trained
        keep = ("device", "nproc_per_node", "nnodes")  # world size sets the global batch
        data["launch"] = {k: v for k, v in data["launch"].items() if k in keep}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def json_schema() -> dict[str, Any]:
    return ExperimentSpec.model_json_schema()
