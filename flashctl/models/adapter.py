"""One interface over Qwen-Image T2I + edit components, real (GPU scale) or tiny (CPU scale).

The adapter owns the shared, frozen parts (VAE, text encoder, tokenizer, processor, scheduler
config) and borrows diffusers' own pipeline code wherever the pipelines define behaviour:
prompt templates and encoding (`encode_prompt`), latent packing, VAE normalisation, image
pre/post-processing, the sigma schedule and the Euler step. Conditioning in training is
therefore the conditioning the exported pipeline uses at inference.

Transformers are passed in explicitly (`velocity`, `sample`), because the trainer runs the
student, critic and teachers against one VAE / text encoder.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flashctl import flow  # the one home of the flow-matching maths
from flashctl.errors import UserError

_FULL_AREA = 1024 * 1024  # the edit pipelines' hard-coded reference area (EditPlus: VAE_IMAGE_SIZE)
_CONDITION_AREA = 384 * 384  # EditPlus's CONDITION_IMAGE_SIZE: the image its text encoder sees

T2I_FAMILY, EDIT_FAMILY, EDIT_PLUS_FAMILY = "QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline"
FAMILIES = (T2I_FAMILY, EDIT_FAMILY, EDIT_PLUS_FAMILY)
"""Pipeline families (model_index.json `_class_name`) whose conditioning the adapter encodes.

They share the T2I template and the VAE geometry; they differ in edit conditioning:
`QwenImageEditPipeline` puts one source image, resized to ~1 MPix, into its template
(`<|vision_start|><|image_pad|><|vision_end|>{prompt}`); `QwenImageEditPlusPipeline`
(Qwen-Image-Edit-2509) prefixes `Picture 1: <|vision_start|>...` to the prompt and gives the text
encoder the source at ~384x384 (CONDITION_IMAGE_SIZE) while the VAE gets it at ~1 MPix
(VAE_IMAGE_SIZE). Both drop the same 64 template tokens, pack the source latents the same way
and append them after the noisy tokens with `img_shapes` [target, source]."""


# --------------------------------------------------------------------------------------------
# Edit reference size (the pipelines resize the source image to ~1 MPix; capped on CPU)


def capped_dimensions(target_area: float, ratio: float, multiple: int) -> tuple[int, int]:
    """Largest (width, height) with width/height ~ ratio, area <= target_area, sides multiples
    of `multiple` (at least one multiple). Rounds down, unlike diffusers' `calculate_dimensions`
    (which rounds to 32 and would turn a tiny 48x32 source into 64x64)."""
    w = math.sqrt(target_area * ratio)
    h = w / ratio
    eps = 1e-6  # sqrt/division round-off must not floor 48.0 to 40
    return (
        max(multiple, int(w / multiple + eps) * multiple),
        max(multiple, int(h / multiple + eps) * multiple),
    )


def reference_size(width: int, height: int, max_pixels: int | None, multiple: int) -> tuple[int, int]:
    """(width, height) the edit pipeline gives a `width` x `height` source image.

    `max_pixels=None` (or >= 1 MPix) is the pipeline's own rule; a smaller cap is the rule
    `cap_edit_pipeline` installs."""
    if max_pixels is None or max_pixels >= _FULL_AREA:
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as mod

        calc = getattr(mod, "_flashctl_uncapped_calculate_dimensions", mod.calculate_dimensions)
        w, h, _ = calc(_FULL_AREA, width / height)
        return int(w), int(h)
    return capped_dimensions(max_pixels, width / height, multiple)


def condition_size(width: int, height: int, max_pixels: int | None, multiple: int) -> tuple[int, int]:
    """(width, height) `QwenImageEditPlusPipeline` gives its text encoder for a `width` x
    `height` source: ~384x384 (CONDITION_IMAGE_SIZE), rounded to 32 like the pipeline. Under a
    cap below 1 MPix (CPU scale) the area shrinks by the same factor as the VAE image's
    (max_pixels / 1 MPix), so the condition image stays smaller than the reference, as at scale."""
    if max_pixels is None or max_pixels >= _FULL_AREA:
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as mod

        calc = getattr(mod, "_flashctl_uncapped_calculate_dimensions", mod.calculate_dimensions)
        w, h = calc(mod.CONDITION_IMAGE_SIZE, width / height)[:2]
        return int(w), int(h)
    return capped_dimensions(max_pixels * _CONDITION_AREA / _FULL_AREA, width / height, multiple)


def cap_edit_pipeline(pipe: Any, max_pixels: int) -> Any:
    """Cap the reference-image area of a diffusers `QwenImageEditPipeline` (or
    `QwenImageEditPlusPipeline`) to `max_pixels`.

    The pipelines hard-code `calculate_dimensions(1024 * 1024, ratio)` (30-60 s per call on a
    CPU); there is no argument for it, so this replaces that module function with the capped
    rules of `reference_size` (and, for EditPlus, `condition_size`: its condition-image area
    is scaled by the same factor). It affects every pipeline of that class in the process (the
    function is module-global); calling it again replaces the cap. Returns `pipe`.
    """
    module = sys.modules[type(pipe).__module__]
    plus = hasattr(module, "VAE_IMAGE_SIZE") and hasattr(module, "CONDITION_IMAGE_SIZE")
    if not hasattr(module, "calculate_dimensions") or (hasattr(module, "VAE_IMAGE_SIZE") and not plus):
        raise ValueError(f"cap_edit_pipeline supports the Qwen-Image edit pipelines, not {type(pipe).__name__}")
    original = getattr(module, "_flashctl_uncapped_calculate_dimensions", module.calculate_dimensions)
    module._flashctl_uncapped_calculate_dimensions = original
    multiple = pipe.vae_scale_factor * 2

    def calculate_dimensions(target_area: float, ratio: float) -> tuple:
        if max_pixels >= _FULL_AREA or (not plus and target_area <= max_pixels):
            return original(target_area, ratio)
        if plus:  # VAE_IMAGE_SIZE and the literal 1024 * 1024 -> max_pixels; CONDITION_IMAGE_SIZE scaled alike
            return capped_dimensions(target_area * max_pixels / _FULL_AREA, ratio, multiple)
        return (*capped_dimensions(max_pixels, ratio, multiple), None)

    module.calculate_dimensions = calculate_dimensions
    return pipe


# --------------------------------------------------------------------------------------------


def _load_components(path: str, dtype: torch.dtype, transformer: bool = True, encoders: bool = True) -> dict[str, Any]:
    """The pipeline's components; `transformer=False` / `encoders=False` leave out the transformer
    / the text encoder and VAE (None), whose weights are then never read. Without the VAE its
    config is still loaded (`vae_config`): the latent geometry depends on it."""
    from diffusers import DiffusionPipeline

    import flashctl.models.processor  # noqa: F401  (diffusers' loader finds the tiny processor class)

    local = Path(path)
    if local.exists() or path.startswith((".", "/", "~")):
        if not (local.expanduser() / "model_index.json").is_file():
            raise UserError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        path = str(local.expanduser())
    try:
        skip = {} if transformer else {"transformer": None}  # the trainer builds its own, partitioned
        if not encoders:  # training from cached conditioning (flashctl.data.conditioning)
            skip.update(text_encoder=None, vae=None)
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, use_safetensors=True, **skip)
        vae_config = None
        if not encoders:
            from diffusers import AutoencoderKLQwenImage

            vae_config = dict(AutoencoderKLQwenImage.load_config(path, subfolder="vae"))
    except (OSError, ValueError) as exc:  # missing folder / hub id, offline, bad model_index
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot load a diffusers pipeline ({first})") from None
    comps = dict(pipe.components)
    comps["pipeline_class"] = type(pipe).__name__  # the family: how edits are conditioned
    if vae_config is not None:
        comps["vae_config"] = vae_config
    needed = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")[0 if transformer else 1:]
    if not encoders:
        needed = tuple(k for k in needed if k not in ("vae", "text_encoder"))
    missing = [k for k in needed if comps.get(k) is None]
    if missing:
        raise UserError(f"{path}: pipeline lacks {', '.join(missing)} (need a Qwen-Image pipeline)")
    return comps


def _to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a module; cast only when its dtype differs (diffusers warns on every dtype cast)."""
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module.to(device)


def cat_conditioning(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (embeds, mask) pairs of different text lengths along the batch.

    Shorter ones are right-padded with zeros and mask 0, like the pipelines pad a batch, so
    e.g. conditional and unconditional prompts (or cached per-sample embeddings) can run in
    one transformer call."""
    length = max(e.shape[1] for e, _ in parts)
    embeds, masks = [], []
    for e, m in parts:
        pad = length - e.shape[1]
        embeds.append(torch.nn.functional.pad(e, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(m, (0, pad)))
    return torch.cat(embeds), torch.cat(masks)


class QwenImageAdapter:
    """Shared Qwen-Image components and the model maths the trainers and evaluators use.

    Attributes: `transformer` (the pipeline's own, e.g. the teacher), `vae`, `text_encoder`,
    `tokenizer`, `processor` (None for T2I-only pipelines), `scheduler` (its config defines the
    sampling schedule), `device`, `dtype`, `edit_max_pixels`, `family` (one of `FAMILIES`:
    the pipeline class of model_index.json, which decides how edits are conditioned).

    `vae` and `text_encoder` are None when loaded with `encoders=False` (training from cached
    conditioning); whatever then needs them (encoding, decoding, `components()`, `sample`)
    loads them from `source` on first use, on the calling rank only, and says so on stderr.
    """

    def __init__(
        self,
        components: dict[str, Any],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        edit_max_pixels: int | None = 64 * 64,
        source: str = "<components>",
        family: str | None = None,
    ):
        self.device = torch.device(device)
        # explicit > the loaded folder's class > by processor (an unknown class: conditioned like that)
        family = family or components.get("pipeline_class")
        if family not in FAMILIES:
            family = EDIT_FAMILY if components.get("processor") is not None else T2I_FAMILY
        self.family: str = family
        self.dtype = dtype
        self.edit_max_pixels = edit_max_pixels
        self.source = source
        # None when the caller builds its transformers itself (the trainer: partitioned engines)
        self.transformer = (_to(components["transformer"], self.device, dtype)
                            if components.get("transformer") is not None else None)
        self.vae = self.text_encoder = None
        self.text_encoder_device = self.device
        self.encoder_loads = 0  # loads by `load_encoders` (a cached run: none while training)
        self.tokenizer = components["tokenizer"]
        self.processor = components.get("processor")
        self.scheduler = components["scheduler"]
        if components.get("vae") is not None and components.get("text_encoder") is not None:
            self._set_encoders(components["vae"], components["text_encoder"])
        else:
            self._build_pipes()
        vae_config = dict(self.vae.config) if self.vae is not None else components["vae_config"]
        self._vae_config = vae_config
        # the pipelines' rule (2 ** number of temporal downsamplings), from the config alone
        self.vae_scale_factor: int = 2 ** len(vae_config["temperal_downsample"])
        self.z_dim: int = vae_config["z_dim"]

    def _build_pipes(self) -> None:
        from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline

        t2i = {"scheduler": self.scheduler, "vae": self.vae, "text_encoder": self.text_encoder,
               "tokenizer": self.tokenizer, "transformer": self.transformer}
        # The pipelines are used as libraries of the official code (templates, encoding,
        # packing, pre/post-processing); their denoising loop is not run here.
        self.t2i_pipe = QwenImagePipeline(**t2i)
        edit_cls = QwenImageEditPlusPipeline if self.family == EDIT_PLUS_FAMILY else QwenImageEditPipeline
        self.edit_pipe = edit_cls(**t2i, processor=self.processor) if self.processor else None
        for p in (self.t2i_pipe, self.edit_pipe):
            if p is not None:
                p.set_progress_bar_config(disable=True)

    def _set_encoders(self, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                      text_encoder_device: torch.device | None = None) -> None:
        self.text_encoder_device = torch.device(text_encoder_device or self.device)
        self.vae = _to(vae, self.device, self.dtype).eval().requires_grad_(False)
        self.text_encoder = _to(text_encoder, self.text_encoder_device, self.dtype).eval().requires_grad_(False)
        self._build_pipes()

    @property
    def has_encoders(self) -> bool:
        """Whether the text encoder and VAE are loaded (False after `encoders=False` until first use)."""
        return self.vae is not None and self.text_encoder is not None

    def load_encoders(self, text_encoder_device: str | torch.device | None = None) -> None:
        """Load the text encoder and VAE from `source` if they are not loaded (see the class doc).

        Lazy by design: a run trained from cached conditioning holds neither on its ranks. The
        export needs neither (it copies their files, `save_components(copy_from=...)`); the
        end-of-run evaluation calls this once with `text_encoder_device="cpu"`: the VAE (small,
        it decodes every sample) goes to `device`, the text encoder stays in host memory and
        its outputs are moved to `device` (`text_encoder_device`). `encoder_loads` counts the
        loads done here."""
        if self.has_encoders:
            return
        where = f" (text encoder on {text_encoder_device})" if text_encoder_device is not None else ""
        print(f"flashctl: loading the text encoder and VAE of {self.source}{where} (not held while training "
              "from cached conditioning)", file=sys.stderr, flush=True)
        comps = _load_components(self.source, self.dtype, transformer=False)
        self.encoder_loads += 1
        self._set_encoders(comps["vae"], comps["text_encoder"], text_encoder_device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        edit_max_pixels: int | None = 64 * 64,
        transformer: bool = True,
        encoders: bool = True,
    ) -> "QwenImageAdapter":
        """Load a diffusers Qwen-Image(-Edit) pipeline folder or hub id (safetensors weights).

        `transformer=False` skips the pipeline's transformer (`self.transformer` is None): the
        distillation worker builds student, critic and teachers partitioned from the files
        instead, so that no rank ever holds an unpartitioned copy (design §5).
        `encoders=False` skips the text encoder and VAE (None until `load_encoders`): the
        worker trains from conditioning cached by `prepare-data --cache-embeddings`, and at
        20B the ~7B text encoder does not belong on the training GPUs (design §5)."""
        comps = _load_components(str(path), dtype, transformer=transformer, encoders=encoders)
        return cls(comps, device, dtype, edit_max_pixels, source=str(path), family=comps["pipeline_class"])

    def components(self, transformer: torch.nn.Module | None = None, encoders: bool = True) -> dict[str, Any]:
        """Pipeline components (with `transformer` swapped in when given). `encoders=False`:
        the text encoder and VAE as held (None when not loaded), never loaded for this."""
        if encoders:
            self.load_encoders()
        comps = {
            "transformer": transformer if transformer is not None else self.transformer,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "scheduler": self.scheduler,
        }
        if self.processor is not None:
            comps["processor"] = self.processor
        return comps

    # ---------------------------------------------------------------------------------- text

    def _need_edit(self) -> Any:
        if self.edit_pipe is None:
            raise UserError(f"{self.source}: pipeline has no processor; editing needs a Qwen-Image-Edit pipeline")
        return self.edit_pipe

    def reference_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) a `width` x `height` edit source is resized to (capped by edit_max_pixels)."""
        return reference_size(width, height, self.edit_max_pixels, self.vae_scale_factor * 2)

    def prepare_sources(self, images: list[Image.Image]) -> tuple[list[Image.Image], tuple[int, int]]:
        """Resize edit source images to the reference size, as the edit pipeline does.

        Returns (resized RGB images, (height, width)); all sources must share one size (the
        pipeline sizes a batch by its first image)."""
        sizes = {im.size for im in images}
        if len(sizes) != 1:
            raise ValueError(f"edit sources in one batch must share a size, got {sorted(sizes)}")
        w, h = self.reference_size(*images[0].size)
        pipe = self._need_edit()
        return [pipe.image_processor.resize(im.convert("RGB"), h, w) for im in images], (h, w)

    def condition_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the source image the text encoder sees for an edit: the reference
        size for `QwenImageEditPipeline`, ~384x384 area for `QwenImageEditPlusPipeline`
        (module `condition_size`; both capped by edit_max_pixels)."""
        if self.family == EDIT_PLUS_FAMILY:
            return condition_size(width, height, self.edit_max_pixels, self.vae_scale_factor * 2)
        return self.reference_size(width, height)

    def condition_images(self, images: list[Image.Image]) -> list[Image.Image]:
        """Edit sources as this family's text encoder gets them (RGB, `condition_size`)."""
        if self.family != EDIT_PLUS_FAMILY:
            return self.prepare_sources(images)[0]
        pipe = self._need_edit()
        out = []
        for im in images:  # EditPlus resizes each source from the original, by its own ratio
            w, h = self.condition_size(*im.size)
            out.append(pipe.image_processor.resize(im.convert("RGB"), h, w))
        return out

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], source_images: list[Image.Image] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text(+image) conditioning through the pipelines' own `encode_prompt`.

        T2I prompts use the T2I template (every family); with `source_images` the family's edit
        template and condition image (`condition_images`) are encoded. EditPlus is encoded one
        row at a time: its template numbers the images of one prompt ("Picture 1: ..."), so a
        batched call would give every prompt all the batch's pictures; rows are then padded
        like a batch (`cat_conditioning`). "" is the unconditional prompt for CFG.
        Returns (embeds (B, L, D), mask (B, L) long; 0 marks padding) on `device`."""
        self.load_encoders()
        prompts = list(prompts)
        dev = self.text_encoder_device
        if source_images is None:
            embeds, mask = self.t2i_pipe.encode_prompt(prompts, device=dev)
        else:
            if len(source_images) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(source_images)} source images")
            images = self.condition_images(list(source_images))
            if self.family == EDIT_PLUS_FAMILY:
                parts = []
                for p, im in zip(prompts, images):
                    e, m = self._need_edit().encode_prompt([p], image=[im], device=dev)
                    parts.append((e, m if m is not None else torch.ones(e.shape[:2], dtype=torch.long, device=e.device)))
                embeds, mask = cat_conditioning(parts)
            else:
                embeds, mask = self._need_edit().encode_prompt(prompts, image=images, device=dev)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds.to(self.device, self.dtype), mask.to(self.device)

    # -------------------------------------------------------------------------------- latents

    def _check_size(self, height: int, width: int) -> None:
        m = self.vae_scale_factor * 2
        if height % m or width % m:
            raise ValueError(f"image size {width}x{height}: sides must be multiples of {m} (VAE factor x patch)")

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, z, 1, h, w) or (B, z, h, w) VAE latents -> packed (B, h*w/4, 4z)."""
        if latents.dim() == 5:
            latents = latents[:, :, 0]
        b, c, h, w = latents.shape
        return self.t2i_pipe._pack_latents(latents, b, c, h, w)

    def unpack(self, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed (B, seq, 4z) -> (B, z, 1, h, w) for an image of `height` x `width` pixels."""
        return self.t2i_pipe._unpack_latents(packed, height, width, self.vae_scale_factor)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self._vae_config["latents_mean"]).view(shape).to(like.device, like.dtype)
        std = torch.tensor(self._vae_config["latents_std"]).view(shape).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
        """Images -> packed, normalised latents (B, seq, 4z), as the pipelines prepare them.

        `images`: PIL images of one size, or a tensor in [-1, 1] of shape (B, 3, H, W) or
        (B, 3, 1, H, W). The posterior mode is used (the edit pipeline's "argmax") and
        normalised with the VAE config's latents_mean / latents_std."""
        self.load_encoders()
        if isinstance(images, torch.Tensor):
            x = images if images.dim() == 5 else images.unsqueeze(2)
        else:
            sizes = {im.size for im in images}
            if len(sizes) != 1:
                raise ValueError(f"images in one batch must share a size, got {sorted(sizes)}")
            w, h = images[0].size
            x = self.t2i_pipe.image_processor.preprocess([im.convert("RGB") for im in images], h, w).unsqueeze(2)
        self._check_size(x.shape[-2], x.shape[-1])
        x = x.to(self.device, self.vae.dtype)
        latents = self.vae.encode(x).latent_dist.mode()
        mean, std = self._latent_stats(latents)
        return self.pack((latents - mean) / std).to(self.dtype)

    @torch.no_grad()
    def encode_sources(self, images: list[Image.Image]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Edit sources -> (packed latents at the reference size, (height, width) of that size)."""
        resized, hw = self.prepare_sources(images)
        return self.encode_images(resized), hw

    @torch.no_grad()
    def decode_latents(self, packed: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        """Packed normalised latents -> PIL images (the pipelines' decode path)."""
        self.load_encoders()
        latents = self.unpack(packed, height, width).to(self.vae.dtype)
        mean, std = self._latent_stats(latents)
        image = self.vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0][:, :, 0]  # pipelines' order
        return self.t2i_pipe.image_processor.postprocess(image, output_type="pil")

    # ------------------------------------------------------------------------------- denoiser

    def img_shapes(
        self, batch: int, height: int, width: int, source_size: tuple[int, int] | None = None
    ) -> list[list[tuple[int, int, int]]]:
        """RoPE image shapes for the transformer: the target grid, then the source grid (edits)."""
        f = self.vae_scale_factor * 2
        shapes = [(1, height // f, width // f)]
        if source_size is not None:
            shapes.append((1, source_size[0] // f, source_size[1] // f))
        return [shapes] * batch

    def velocity(
        self,
        transformer: Any,
        x_t: torch.Tensor,
        sigma: torch.Tensor | float,
        embeds: torch.Tensor,
        mask: torch.Tensor | None,
        height: int,
        width: int,
        source_latents: torch.Tensor | None = None,
        source_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Velocity v_hat (B, seq, 4z) of `transformer` at noisy packed latents `x_t`, level `sigma`.

        For edits, the packed source latents are appended along the sequence (as
        QwenImageEditPipeline does) and only the noisy tokens' output is returned;
        `source_size` = (height, width) of the source in pixels (default: the target's).
        One batch must share one image size (the transformer's RoPE uses the first shape).
        Runs with gradients if enabled by the caller."""
        b = x_t.shape[0]
        out_dtype = x_t.dtype
        # Run in the transformer's own dtype (a bf16 engine, an fp32 teacher replica): inputs are
        # cast to it and the output back to the caller's dtype.
        model_dtype = next(transformer.parameters()).dtype
        x_t, embeds = x_t.to(model_dtype), embeds.to(model_dtype)
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.full((b,), float(sigma), device=x_t.device)
        sigma = sigma.to(x_t.device, x_t.dtype).reshape(-1).expand(b)
        hidden = x_t
        if source_latents is not None:
            source_size = source_size or (height, width)
            f = self.vae_scale_factor * 2
            if source_latents.shape[1] != (source_size[0] // f) * (source_size[1] // f):
                raise ValueError(f"source latents {tuple(source_latents.shape)} do not match source size {source_size}")
            hidden = torch.cat([x_t, source_latents.to(x_t.dtype)], dim=1)
        else:
            source_size = None
        if mask is not None and bool(mask.all()):
            mask = None  # as the pipelines' encode_prompt: no mask when nothing is padded
        out = transformer(
            hidden_states=hidden,
            timestep=sigma,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=self.img_shapes(b, height, width, source_size),
            return_dict=False,
        )[0]
        return out[:, : x_t.shape[1]].to(out_dtype)

    # ------------------------------------------------------------------------------- sampling

    def make_scheduler(self, template: Any | None = None) -> Any:
        """A fresh scheduler with the config of `template` (default: this pipeline's own);
        schedulers are stateful, so every sampling run gets its own."""
        template = self.scheduler if template is None else template
        return type(template).from_config(template.config)

    def set_timesteps(self, scheduler: Any, steps: int, height: int, width: int) -> torch.Tensor:
        """Set `scheduler` to the schedule the pipelines use for `steps` at this size; returns
        its timesteps (sigma * 1000); `scheduler.sigmas` has the `steps + 1` sigmas (last 0)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

        seq_len = (height // (self.vae_scale_factor * 2)) * (width // (self.vae_scale_factor * 2))
        cfg = scheduler.config
        mu = calculate_shift(
            seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / steps, steps)
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps

    def sigmas(self, steps: int, height: int, width: int) -> torch.Tensor:
        """The `steps + 1` sigmas (ending in 0) the pipelines sample with at this size."""
        scheduler = self.make_scheduler()
        self.set_timesteps(scheduler, steps, height, width)
        return scheduler.sigmas.clone()

    @torch.no_grad()
    def denoise(
        self,
        transformer: torch.nn.Module,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        negative: tuple[torch.Tensor, torch.Tensor] | None,
        height: int,
        width: int,
        steps: int,
        seed: int,
        cfg_scale: float = 1.0,
        cfg_rescale: float = 1.0,
        source_latents: torch.Tensor | None = None,
        source_size: tuple[int, int] | None = None,
        scheduler: Any | None = None,
    ) -> torch.Tensor:
        """The pipelines' Euler loop from seeded noise to packed latents (no encoding, no decoding):
        the part of sampling whose cost scales with the NFE. `negative` (embeds, mask) turns on
        CFG at `cfg_scale`. `sample` and the timed sampler of `flashctl.evaluate` share it."""
        from diffusers.utils.torch_utils import randn_tensor

        b = embeds.shape[0]
        f = self.vae_scale_factor * 2
        shape = (b, 1, self.z_dim, 2 * (height // f), 2 * (width // f))
        noise = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), device=self.device, dtype=embeds.dtype)
        latents = self.t2i_pipe._pack_latents(noise, b, self.z_dim, shape[3], shape[4])
        scheduler = self.make_scheduler(scheduler)
        timesteps = self.set_timesteps(scheduler, steps, height, width)
        scheduler.set_begin_index(0)
        for t in timesteps:
            sigma = t.expand(b).to(latents.dtype) / 1000
            v = self.velocity(transformer, latents, sigma, embeds, mask, height, width, source_latents, source_size)
            if negative is not None:
                v_u = self.velocity(transformer, latents, sigma, *negative, height, width, source_latents, source_size)
                v = flow.cfg_combine(v, v_u, cfg_scale, cfg_rescale)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        return latents

    def sample(
        self,
        transformer: Any,
        prompts: list[str],
        height: int,
        width: int,
        steps: int,
        cfg_scale: float = 1.0,
        seed: int = 0,
        source_images: list[Image.Image] | None = None,
        cfg_rescale: float = 0.0,
        negative_prompt: str = "",
        output_type: str = "pil",
        scheduler: Any | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate images with the pipelines' Euler flow-matching loop.

        Same schedule, noise (one CPU generator seeded with `seed`, drawn for the whole batch)
        and steps as `QwenImagePipeline(..., generator=torch.Generator().manual_seed(seed))`
        / `QwenImageEditPipeline`; with `cfg_scale > 1` the pipelines correspond to
        `cfg_rescale=1.0` and `negative_prompt=""`. `output_type="latent"` returns the packed
        latents instead of images. `scheduler` (default: this pipeline's) sets the schedule: a
        student samples on its own (`distill.schedules.student_scheduler`), not the teacher's."""

        self._check_size(height, width)
        b = len(prompts)
        embeds, mask = self.encode_prompts(prompts, source_images)
        do_cfg = cfg_scale > 1
        if do_cfg:
            n_embeds, n_mask = self.encode_prompts([negative_prompt] * b, source_images)
        src, src_size = (None, None)
        if source_images is not None:
            src, src_size = self.encode_sources(list(source_images))
        negative = (n_embeds, n_mask) if do_cfg else None
        latents = self.denoise(transformer, embeds, mask, negative, height, width, steps, seed,
                               cfg_scale, cfg_rescale, src, src_size, scheduler)
        if output_type == "latent":
            return latents
        return self.decode_latents(latents, height, width)

    # --------------------------------------------------------------------------------- export

    def save_pipeline(self, out_dir: str | Path, transformer: torch.nn.Module | None = None,
                      write_transformer: Any = None) -> Path:
        """Write a diffusers pipeline folder (safetensors) with `transformer` (default: this
        adapter's). `QwenImagePipeline.from_pretrained(out_dir)` loads it, and so does
        the adapter's edit family (`family`, named in model_index.json) when it has a processor.
        Replaces `out_dir` atomically.
        `write_transformer(folder)` writes the transformer subfolder instead (see
        `export.save_components`)."""
        from flashctl.models.export import save_components

        return save_components(self.components(transformer), out_dir, write_transformer, pipeline_class=self.family)
