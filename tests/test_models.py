"""Tiny Qwen-Image components, the adapter, diffusers pipeline export, VAE training."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from flashctl import flow
from flashctl.errors import UserError
from flashctl.flow import shift_sigmas
from flashctl.models.adapter import QwenImageAdapter, cap_edit_pipeline, cat_conditioning, reference_size
from flashctl.models.tiny import build_tiny_pipeline, build_tokenizer, build_vae, template_prefix_lengths
from flashctl.models.vae_train import images_to_tensor, reconstruction_l1, set_latent_stats, train_vae
from flashctl.spec import TinyModelSpec

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (10, 10, 10), "gray": (128, 128, 128)}
SHAPES = ["circle", "square"]
CORPUS = [f"a {c} {s} on a {b} background" for c in COLORS for s in SHAPES for b in BACKGROUNDS] + [
    f"make the {s} {c}" for c in COLORS for s in SHAPES
]
# Reference-image cap that keeps the tiny sizes 32x32, 48x32 and 32x48 at their own size.
EDIT_MAX_PIXELS = 48 * 32


def shape_image(width: int, height: int, rng: random.Random) -> Image.Image:
    """A coloured circle or square on a plain background."""
    im = Image.new("RGB", (width, height), rng.choice(list(BACKGROUNDS.values())))
    draw = ImageDraw.Draw(im)
    r = rng.randint(5, min(width, height) // 3)
    cx, cy = rng.randint(r, width - r), rng.randint(r, height - r)
    box = [cx - r, cy - r, cx + r, cy + r]
    fill = rng.choice(list(COLORS.values()))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return im


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    comps = build_tiny_pipeline(TinyModelSpec(), CORPUS, seed=0)
    adapter = QwenImageAdapter(comps, edit_max_pixels=EDIT_MAX_PIXELS)
    return adapter.save_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="module")
def adapter(folder):
    return QwenImageAdapter.from_pretrained(folder, edit_max_pixels=EDIT_MAX_PIXELS)


def test_template_drop_removes_exactly_the_template_prefix(adapter):
    tok = adapter.tokenizer
    assert template_prefix_lengths(tok) == {"t2i": (34, 34), "edit": (64, 64)}
    prompt = "a red circle on a white background"
    embeds, mask = adapter.encode_prompts([prompt])
    # kept: the prompt's own tokens + "<|im_end|>\n<|im_start|>assistant\n" (5 tokens)
    assert embeds.shape[1] == len(tok(prompt).input_ids) + 5
    assert mask.shape == embeds.shape[:2] and bool(mask.all())
    # a tokenizer with a tiny vocabulary splits the template into more tokens: never fewer
    small = build_tokenizer(CORPUS, vocab_size=300)
    assert all(n >= drop for n, drop in template_prefix_lengths(small).values())


def test_prompts_change_the_conditioning(adapter):
    a, _ = adapter.encode_prompts(["a red circle on a white background"])
    b, _ = adapter.encode_prompts(["a blue circle on a white background"])
    a2, _ = adapter.encode_prompts(["a red circle on a white background"])
    assert torch.equal(a, a2)
    assert a.shape == b.shape
    rel = (a - b).norm() / a.norm()
    assert rel > 0.05, f"colour word barely changes the embedding (rel diff {rel:.4f})"
    # the colour token itself (position 1 after the drop) differs, the leading "a" does not
    assert torch.allclose(a[0, 0], b[0, 0]) and not torch.allclose(a[0, 1], b[0, 1])
    src = [shape_image(32, 32, random.Random(1))]
    e1, _ = adapter.encode_prompts(["make the circle red"], src)
    e2, _ = adapter.encode_prompts(["make the circle blue"], src)
    e3, _ = adapter.encode_prompts(["make the circle red"], [shape_image(32, 32, random.Random(2))])
    assert (e1 - e2).norm() / e1.norm() > 0.05
    assert not torch.allclose(e1, e3), "the source image must change the edit conditioning"


def test_padded_batch_has_mask_and_matches_single(adapter):
    prompts = ["a red circle on a white background", ""]
    embeds, mask = adapter.encode_prompts(prompts)
    single, _ = adapter.encode_prompts([""])
    n = single.shape[1]
    assert mask[1].sum() == n and mask[0].all()
    assert torch.allclose(embeds[1, :n], single[0], atol=1e-5)
    # cond + uncond of different lengths in one transformer call == two separate calls
    cond = adapter.encode_prompts(["a red circle on a white background"])
    both = cat_conditioning([cond, (single, torch.ones(1, n, dtype=torch.long))])
    lat = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        joint = adapter.velocity(adapter.transformer, lat.repeat(2, 1, 1), 0.7, *both, 32, 32)
        sep_c = adapter.velocity(adapter.transformer, lat, 0.7, *cond, 32, 32)
        sep_u = adapter.velocity(adapter.transformer, lat, 0.7, single, None, 32, 32)
    assert torch.allclose(joint, torch.cat([sep_c, sep_u]), atol=1e-5)


def test_diffusers_t2i_pipeline_loads_folder_and_generates(folder):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle on a white background", height=32, width=32, num_inference_steps=3, true_cfg_scale=1.0)
    assert out.images[0].size == (32, 32)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_sample_equals_diffusers_pipeline(adapter, folder, cfg):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle on a white background", "a blue square on a black background"]
    ours = adapter.sample(adapter.transformer, prompts, 32, 32, steps=4, cfg_scale=cfg, cfg_rescale=1.0, seed=7, output_type="latent")
    theirs = pipe(
        prompts, height=32, width=32, num_inference_steps=4, true_cfg_scale=cfg,
        negative_prompt="" if cfg > 1 else None, generator=torch.Generator().manual_seed(7), output_type="latent",
    ).images
    assert ours.shape == theirs.shape == (2, 16, 16)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    imgs = adapter.sample(adapter.transformer, prompts, 32, 32, steps=4, cfg_scale=cfg, cfg_rescale=1.0, seed=7)
    pil = pipe(
        prompts, height=32, width=32, num_inference_steps=4, true_cfg_scale=cfg,
        negative_prompt="" if cfg > 1 else None, generator=torch.Generator().manual_seed(7),
    ).images
    diff = [np.abs(np.asarray(a, int) - np.asarray(b, int)).max() for a, b in zip(imgs, pil)]
    assert max(diff) <= 1


def test_student_schedule_is_the_shifted_grid(adapter):
    sig = adapter.sigmas(4, 32, 32)
    assert torch.allclose(sig, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]), atol=1e-6)
    assert torch.allclose(shift_sigmas(torch.tensor([1.0, 0.75, 0.5, 0.25]), 3.0), sig[:4], atol=1e-6)


def test_sample_is_seeded(adapter):
    prompts = ["a green square on a gray background"]
    a = adapter.sample(adapter.transformer, prompts, 32, 32, steps=2, seed=3, output_type="latent")
    b = adapter.sample(adapter.transformer, prompts, 32, 32, steps=2, seed=3, output_type="latent")
    c = adapter.sample(adapter.transformer, prompts, 32, 32, steps=2, seed=4, output_type="latent")
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_edit_pipeline_from_folder_matches_adapter(adapter, folder):
    from diffusers import QwenImageEditPipeline

    pipe = cap_edit_pipeline(QwenImageEditPipeline.from_pretrained(folder), EDIT_MAX_PIXELS)
    pipe.set_progress_bar_config(disable=True)
    src = shape_image(48, 32, random.Random(5))
    out = pipe(
        src, "make the circle red", num_inference_steps=3, true_cfg_scale=1.0,
        generator=torch.Generator().manual_seed(11), output_type="latent",
    ).images
    # reference kept at the source's own size -> 48x32 output -> (32/8)*(48/8) tokens
    assert out.shape == (1, 24, 16)
    ours = adapter.sample(adapter.transformer, ["make the circle red"], 32, 48, steps=3, seed=11, source_images=[src], output_type="latent")
    assert torch.allclose(ours, out, atol=1e-5), (ours - out).abs().max()
    img = pipe(src, "make the circle red", num_inference_steps=2, true_cfg_scale=1.0).images[0]
    assert img.size == (48, 32)


def test_reference_size_rules():
    assert reference_size(32, 32, 48 * 32, 8) == (32, 32)
    assert reference_size(48, 32, 48 * 32, 8) == (48, 32)
    assert reference_size(32, 48, 48 * 32, 8) == (32, 48)
    assert reference_size(64, 64, 64 * 64, 8) == (64, 64)
    assert reference_size(32, 32, None, 8) == (1024, 1024)  # the pipeline's own 1 MPix rule


@pytest.mark.parametrize("width,height", [(32, 32), (48, 32), (32, 48)])
def test_aspects_encode_velocity_decode(adapter, width, height):
    rng = random.Random(width * 100 + height)
    images = [shape_image(width, height, rng) for _ in range(2)]
    lat = adapter.encode_images(images)
    seq = (height // 8) * (width // 8)
    assert lat.shape == (2, seq, 16)
    assert torch.allclose(adapter.pack(adapter.unpack(lat, height, width)), lat)
    assert [im.size for im in adapter.decode_latents(lat, height, width)] == [(width, height)] * 2
    embeds, mask = adapter.encode_prompts(["a red circle on a white background", "a blue square"])
    x_t = flow.add_noise(lat, torch.randn_like(lat), torch.tensor([0.3, 0.8]))
    v = adapter.velocity(adapter.transformer, x_t, torch.tensor([0.3, 0.8]), embeds, mask, height, width)
    assert v.shape == lat.shape
    src, src_hw = adapter.encode_sources(images)
    assert src_hw == (height, width)
    e_embeds, e_mask = adapter.encode_prompts(["make the circle red"] * 2, images)
    v_edit = adapter.velocity(adapter.transformer, x_t, 0.5, e_embeds, e_mask, height, width, src, src_hw)
    v_other = adapter.velocity(adapter.transformer, x_t, 0.5, e_embeds, e_mask, height, width, src.flip(0), src_hw)
    assert v_edit.shape == lat.shape and not torch.allclose(v_edit, v_other)
    assert adapter.sample(adapter.transformer, ["a red circle"], height, width, steps=2)[0].size == (width, height)


def test_save_load_roundtrip_keeps_transformer_outputs(adapter, tmp_path):
    student = type(adapter.transformer).from_config(adapter.transformer.config)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = adapter.save_pipeline(tmp_path / "student", transformer=student)
    again = QwenImageAdapter.from_pretrained(out, edit_max_pixels=EDIT_MAX_PIXELS)
    lat = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds, mask = adapter.encode_prompts(["a red circle", "a blue square on a gray background"])
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        v1 = adapter.velocity(student, lat, sigma, embeds, mask, 32, 32)
        v2 = again.velocity(again.transformer, lat, sigma, embeds, mask, 32, 32)
    assert torch.equal(v1, v2)
    e2, _ = again.encode_prompts(["a red circle", "a blue square on a gray background"])
    assert torch.equal(embeds, e2)
    # saving over an existing folder replaces it
    adapter.save_pipeline(out)
    assert not torch.equal(QwenImageAdapter.from_pretrained(out).transformer.img_in.weight, student.img_in.weight)


def test_from_pretrained_rejects_non_pipeline(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        QwenImageAdapter.from_pretrained(tmp_path)


def test_flow_identities():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    x_t = flow.add_noise(x0, eps, sigma)
    v = flow.velocity_target(x0, eps)
    assert torch.allclose(flow.x0_from_velocity(x_t, sigma, v), x0, atol=1e-6)
    assert torch.allclose(flow.eps_from_velocity(x_t, sigma, v), eps, atol=1e-6)
    cond, uncond = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    assert torch.allclose(flow.cfg_combine(cond, uncond, 1.0), cond, atol=1e-6)
    full = flow.cfg_combine(cond, uncond, 4.0, rescale=1.0)
    assert torch.allclose(full.norm(dim=-1), cond.norm(dim=-1), atol=1e-5)


def test_vae_training_lowers_reconstruction_error_and_sets_stats():
    rng = random.Random(0)
    torch.manual_seed(0)
    vae = build_vae(TinyModelSpec())
    data = images_to_tensor([shape_image(16, 16, rng) for _ in range(4)])
    before = reconstruction_l1(vae, data)
    seen = []
    metrics = train_vae(vae, [data], steps=20, lr=3e-4, seed=0, warmup_steps=5, progress=lambda s, m: seen.append(s))
    after = reconstruction_l1(vae, data)
    assert after < 0.8 * before, (before, after)
    assert seen[0] == 0 and seen[-1] == 19 and metrics["steps"] == 20
    assert not any(p.requires_grad for p in vae.parameters())
    # iterable of PIL batches (landscape) also trains
    train_vae(vae, [[shape_image(48, 32, rng) for _ in range(2)]], steps=1, seed=0)
    mean, std = set_latent_stats(vae, data)
    assert vae.config.latents_mean == mean and vae.config.latents_std == std
    z = vae.encode(data).latent_dist.mode()
    zn = (z - torch.tensor(mean).view(1, -1, 1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1, 1)
    assert torch.allclose(zn.mean(dim=(0, 2, 3, 4)), torch.zeros(4), atol=1e-3)
    assert torch.allclose(zn.std(dim=(0, 2, 3, 4)), torch.ones(4), atol=1e-2)


# Qwen/Qwen-Image's scheduler config (dynamic shifting + shift_terminal): a teacher's schedule
# that is not the student's.
QWEN_IMAGE_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
    "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02, "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}


def test_exported_student_pipeline_samples_on_the_training_grid(adapter, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from flashctl.distill.schedules import student_scheduler
    from flashctl.flow import student_sigmas
    from flashctl.models.export import save_components

    teacher_sched = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER)
    student_sched = student_scheduler(teacher_sched, 3.0)
    out = save_components({**adapter.components(), "scheduler": student_sched}, tmp_path / "student")
    pipe = QwenImagePipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle on a white background"]
    theirs = pipe(prompts, height=32, width=32, num_inference_steps=4, true_cfg_scale=1.0,
                  generator=torch.Generator().manual_seed(7), output_type="latent").images
    # the pipeline's own timestep retrieval lands on the grid the student was trained on
    assert torch.allclose(pipe.scheduler.sigmas, student_sigmas(4, 3.0), atol=1e-6, rtol=0), pipe.scheduler.sigmas
    # samples during training / evaluation (adapter.sample with the student's scheduler) = the exported pipeline
    ours = adapter.sample(adapter.transformer, prompts, 32, 32, 4, seed=7, output_type="latent", scheduler=student_sched)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    # the teacher keeps its own schedule: another grid, other samples
    as_teacher = adapter.sample(adapter.transformer, prompts, 32, 32, 4, seed=7, output_type="latent", scheduler=teacher_sched)
    assert not torch.allclose(as_teacher, ours, atol=1e-3)
    assert teacher_sched.config.shift_terminal == 0.02 and teacher_sched.config.use_dynamic_shifting
