"""Tiny Qwen-Image components built fully offline (CPU scale).

The classes are the real diffusers / transformers ones (`QwenImageTransformer2DModel`,
`AutoencoderKLQwenImage`, `Qwen2_5_VLForConditionalGeneration`, `Qwen2Tokenizer`,
`FlowMatchEulerDiscreteScheduler`), only their configs are small. The tokenizer is a byte-level
BPE trained locally with `tokenizers` on a caller-given corpus.

Prompt-template pitfall: the pipelines drop a hard-coded number of leading template tokens
(`prompt_template_encode_start_idx`: 34 for T2I, 64 for edit) from the text-encoder output.
Those numbers are the pre-token counts of the template prefixes (everything before the
prompt, up to and including `<|im_start|>user\\n`). A BPE tokenizer can never split a
prefix into fewer tokens than the pre-tokenizer's pieces, so the prompt's own tokens are never
dropped; and because the template texts are part of the BPE training corpus here, every
template word becomes one token and the drop is exact, as with the real Qwen tokenizer.
`template_prefix_lengths` measures it and `build_tokenizer` refuses a tokenizer that would
drop prompt tokens.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch

from flashctl.spec import TinyModelSpec

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Component construction is seeded per component (seed + offset), so resizing one component
# does not change the initial weights of the others.
_SEED_OFFSETS = {"text_encoder": 1, "vae": 2, "transformer": 3}


@functools.lru_cache(maxsize=1)
def pipeline_templates() -> dict[str, tuple[str, int]]:
    """The pipelines' own prompt templates and drop indices: {"t2i": (template, drop), "edit": ...}.

    Read from diffusers' pipeline instances (built without components) rather than copied, so
    a diffusers upgrade that changes them is picked up.
    """
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    t2i = QwenImagePipeline(None, None, None, None, None)
    edit = QwenImageEditPipeline(None, None, None, None, None, None)
    return {
        "t2i": (t2i.prompt_template_encode, t2i.prompt_template_encode_start_idx),
        "edit": (edit.prompt_template_encode, edit.prompt_template_encode_start_idx),
    }


def _template_texts() -> list[str]:
    """Plain-text parts of both templates (special tokens removed), for the BPE corpus."""
    texts = []
    for template, _ in pipeline_templates().values():
        text = template.replace("{}", "\n")
        for tok in SPECIAL_TOKENS:
            text = text.replace(tok, "\n")
        texts.append(text)
    return texts


def template_prefix_lengths(tokenizer: Any) -> dict[str, tuple[int, int]]:
    """Tokens before the prompt in each template vs the pipeline's drop index: {task: (n, drop)}.

    For the edit template the count stops before `<|vision_start|>`: the image tokens that
    follow are kept by the real pipeline too.
    """
    out = {}
    for task, (template, drop) in pipeline_templates().items():
        prefix = template.split("{}")[0]
        if task == "edit":
            prefix = prefix.split("<|vision_start|>")[0]
        out[task] = (len(tokenizer(prefix).input_ids), drop)
    return out


def build_tokenizer(corpus: list[str], vocab_size: int) -> Any:
    """Train a byte-level BPE on `corpus` (+ the prompt templates) and wrap it as `Qwen2Tokenizer`.

    The pre-tokenizer is Qwen2's own (split regex + byte level), so the trained merges are the
    ones `Qwen2Tokenizer` (which rebuilds that pre-tokenizer) applies. Special tokens get the
    first ids.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(
        BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    )
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus) + _template_texts(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        model_max_length=32768,
    )
    tok.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    for task, (n, drop) in template_prefix_lengths(tok).items():
        if n < drop:  # cannot happen with Qwen's pre-tokenizer; guards against a changed template
            raise ValueError(f"{task} template prefix is {n} tokens < drop index {drop}: prompt tokens would be dropped")
    return tok


def build_text_encoder(spec: TinyModelSpec, tokenizer: Any) -> Any:
    """A tiny `Qwen2_5_VLForConditionalGeneration` (text + vision tower) told the tokenizer's ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = max(1, spec.text_hidden_size // 16)
    head_dim = spec.text_hidden_size // heads
    half = head_dim // 2  # mrope sections split the rotary half-dim over (t, h, w)
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden_size,
        intermediate_size=2 * spec.text_hidden_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=spec.text_hidden_size,
        fullatt_block_indexes=[0],
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_processor(tokenizer: Any) -> Any:
    """Image-only Qwen2-VL processor (PIL image backend, no torchvision) around `tokenizer`."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from flashctl.models.processor import Qwen2VLImageOnlyProcessor

    return Qwen2VLImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer)


def build_vae(spec: TinyModelSpec) -> Any:
    """Tiny `AutoencoderKLQwenImage`: spatial factor 4, latents_mean 0 / std 1 until trained."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=spec.vae_base_dim,
        z_dim=spec.z_dim,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True],
        latents_mean=[0.0] * spec.z_dim,
        latents_std=[1.0] * spec.z_dim,
    ).eval()


def build_transformer(spec: TinyModelSpec) -> Any:
    """Tiny `QwenImageTransformer2DModel` (patch 2, packed 2x2 latents in, z channels out)."""
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * spec.z_dim,
        out_channels=spec.z_dim,
        num_layers=spec.num_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.text_hidden_size,
        guidance_embeds=False,
        axes_dims_rope=tuple(spec.axes_dims_rope),
    ).eval()


def build_scheduler(shift: float = 3.0) -> Any:
    """Flow-matching Euler scheduler with a static shift: 4 steps -> sigmas {1, .9, .75, .5}."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)


def build_tiny_pipeline(spec: TinyModelSpec, corpus: list[str], seed: int) -> dict[str, Any]:
    """All tiny components, seeded: {transformer, vae, text_encoder, tokenizer, processor, scheduler}.

    The dict has the keys of `QwenImageEditPipeline(**components)`; drop `processor` for
    `QwenImagePipeline`. The global torch RNG is left untouched.
    """
    tokenizer = build_tokenizer(corpus, spec.vocab_size)
    components: dict[str, Any] = {"tokenizer": tokenizer, "processor": build_processor(tokenizer)}
    builders = {
        "text_encoder": lambda: build_text_encoder(spec, tokenizer),
        "vae": lambda: build_vae(spec),
        "transformer": lambda: build_transformer(spec),
    }
    for name, build in builders.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + _SEED_OFFSETS[name])
            components[name] = build()
    components["scheduler"] = build_scheduler()
    return components
