"""One DMD2 round for flow matching: student backward simulation, critic update, generator loss.

Orchestration only: the tensor maths lives in `flashctl/flow.py` and `objectives.py` (pure functions), teacher choice
in `guidance.py`, the task draw in `mixture.py`. Models are called through
`Conditioning.velocity`, which knows how a Qwen-Image transformer wants its inputs (text
embeddings, masks, and for edits the source latents concatenated along the sequence).

Every random draw that changes the *number of forward passes* (the backward-simulation depth k,
the task) is seeded by the global step, so all ranks run the same collectives under ZeRO-3.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from flashctl import flow
from flashctl.distill import gan
from flashctl.distill import objectives as obj


@dataclass
class Conditioning:
    """Conditioning of one batch: prompt embeddings (+ negative ones for CFG) and edit source."""

    task: str
    embeds: torch.Tensor
    mask: torch.Tensor
    neg_embeds: torch.Tensor
    neg_mask: torch.Tensor
    height: int
    width: int
    source_latents: torch.Tensor | None = None
    latent_shape: tuple[int, int] = (0, 0)
    """(sequence length, channels) of the packed noisy latents."""
    target_latents: torch.Tensor | None = None
    """The batch's real images as packed latents (B, seq, C): only DMD2's GAN term reads them."""
    velocity_fn: Callable[..., torch.Tensor] | None = field(default=None, repr=False)

    def velocity(self, model: Any, x_t: torch.Tensor, sigma: torch.Tensor, uncond: bool = False) -> torch.Tensor:
        embeds, mask = (self.neg_embeds, self.neg_mask) if uncond else (self.embeds, self.mask)
        return self.velocity_fn(model, x_t, sigma, embeds, mask, self.height, self.width, self.source_latents)

    def velocity_pair(self, model: Any, x_t: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional velocity of `model` in ONE forward of batch 2B.

        CFG's two passes batched: a partitioned (ZeRO-3) teacher gathers its weights once per
        guided prediction instead of twice. Prompt and negative embeddings are padded to one
        length with masked (0) positions, which the transformer's joint attention ignores, so
        the result equals two separate passes up to float rounding (tested)."""
        b = x_t.shape[0]
        sigma = torch.as_tensor(sigma, device=x_t.device).reshape(-1).expand(b)
        from flashctl.models.adapter import cat_conditioning

        embeds, mask = cat_conditioning([(self.embeds, self.mask), (self.neg_embeds, self.neg_mask)])
        src = None if self.source_latents is None else torch.cat([self.source_latents, self.source_latents])
        v = self.velocity_fn(model, torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), embeds, mask,
                             self.height, self.width, src)
        return v[:b], v[b:]

    def doubled(self) -> "Conditioning":
        """This conditioning for a batch of 2B made of two halves of B (e.g. fake and real
        samples of the same prompts in one forward). Only `velocity` uses it."""
        src = None if self.source_latents is None else torch.cat([self.source_latents, self.source_latents])
        return replace(self, embeds=torch.cat([self.embeds, self.embeds]), mask=torch.cat([self.mask, self.mask]),
                       source_latents=src)

    @property
    def batch(self) -> int:
        return self.embeds.shape[0]


@dataclass
class Teacher:
    """A frozen teacher transformer and its guidance settings."""

    model: Any
    cfg_scale: float
    cfg_rescale: float = 0.0


def step_generator(seed: int, global_step: int, micro: int) -> torch.Generator:
    """A CPU generator seeded by (seed, step, micro): same on every rank."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + global_step * 1009 + micro) % (2**63 - 1))
    return g


def simulate_student(
    student: Any,
    cond: Conditioning,
    sigmas: torch.Tensor,
    k: int,
    noise: torch.Tensor,
    with_grad: bool,
) -> torch.Tensor:
    """Backward simulation: k Euler steps of the student without grad from pure noise, then one
    more step (with grad if `with_grad`) that predicts x0. Returns the student's x0 sample.

    The student samples with the same Euler flow-map as diffusers' pipelines (x_{i+1} = x_i +
    (sigma_{i+1} - sigma_i) v), so the exported student behaves identically under
    `QwenImagePipeline(num_inference_steps=S)`.
    """
    x = noise
    b = noise.shape[0]
    with torch.no_grad():
        for i in range(k):
            s = sigmas[i].expand(b)
            v = cond.velocity(student, x, s)
            x = flow.euler_step(x, v, sigmas[i], sigmas[i + 1])
    s = sigmas[k].expand(b)
    ctx = torch.enable_grad() if with_grad else torch.no_grad()
    with ctx:
        v = cond.velocity(student, x, s)
        return flow.x0_from_velocity(x, s, v)


def teacher_x0(teacher: Teacher, cond: Conditioning, x_tau: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Real score as an x0 prediction, with CFG (uncond + w (cond - uncond)) and optional rescale."""
    with torch.no_grad():
        if teacher.cfg_scale != 1.0:
            v_c, v_u = cond.velocity_pair(teacher.model, x_tau, tau)
            v = flow.cfg_combine(v_c, v_u, teacher.cfg_scale, teacher.cfg_rescale)
        else:
            v = cond.velocity(teacher.model, x_tau, tau)
        return flow.x0_from_velocity(x_tau, tau, v)


def critic_loss(critic: Any, cond: Conditioning, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flow-matching loss of the critic (fake score) on detached student samples."""
    b = x0.shape[0]
    t = torch.rand(b, generator=gen).to(x0)
    eps = torch.randn(x0.shape, generator=gen).to(x0)
    x_t = flow.add_noise(x0.detach(), eps, t)
    v = cond.velocity(critic, x_t, t)
    return flow.flow_matching_loss(v, x0.detach(), eps)


def critic_gan_loss(
    critic: Any, cond: Conditioning, x0: torch.Tensor, real: torch.Tensor, gen: torch.Generator, gan_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """`critic_loss` plus `gan_weight` x DMD2's discriminator loss, in one critic forward of 2B.

    The detached student samples `x0` and the batch's real target latents `real` are noised to
    the same levels t with the same noise (the same draws as `critic_loss`), so the classifier
    head can tell them apart only by their clean content. The flow-matching term is on the
    student half only, as without the GAN term; the head (and, through it, the critic's trunk)
    learns real -> positive logit, student -> negative. Returns (loss, diagnostics)."""
    b = x0.shape[0]
    t = torch.rand(b, generator=gen).to(x0)
    eps = torch.randn(x0.shape, generator=gen).to(x0)
    x_t = flow.add_noise(x0.detach(), eps, t)
    r_t = flow.add_noise(real.to(x0), eps, t)
    v = cond.doubled().velocity(critic, torch.cat([x_t, r_t]), torch.cat([t, t]))
    logits = gan.take_logits(critic)
    fake_logits, real_logits = logits[:b], logits[b:]
    fm = flow.flow_matching_loss(v[:b], x0.detach(), eps)
    d_loss = obj.gan_discriminator_loss(real_logits, fake_logits)
    stats = {"flow_matching": float(fm.detach()), "gan_d": float(d_loss.detach()),
             "d_real_acc": float((real_logits.detach() > 0).float().mean()),
             "d_fake_acc": float((fake_logits.detach() < 0).float().mean())}
    return fm + gan_weight * d_loss, stats


def generator_loss(
    x: torch.Tensor,
    cond: Conditioning,
    critic: Any,
    teacher: Teacher,
    gen: torch.Generator,
    tau_min: float,
    tau_max: float,
    objective: str = "dmd2",
    tau_generator: torch.Generator | None = None,
    student_sigma: float = 1.0,
    gan_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Distribution-matching loss of a student sample `x` (with grad) and its diagnostics.

    `gen` draws the re-noising noise (may differ per rank); `tau_generator` (default `gen`)
    draws the re-noise levels. `student_sigma` is the input level of the student step that made
    `x`; decoupled-DMD re-noises its CFG-augmentation term only below it (see below).

    `gan_weight` > 0 adds DMD2's GAN term, `gan_weight` x softplus(-D(x_tau)), D the critic's
    classifier head on the same re-noised sample: the one critic forward gives the fake score
    and the logits. Its gradient reaches `x` through the critic's input only (`torch.autograd.grad`
    w.r.t. that input): the critic's parameters get no gradient from the generator update."""
    b = x.shape[0]
    tgen = tau_generator or gen
    tau = flow.sample_tau(tgen, b, tau_min, tau_max).to(x)
    eps = torch.randn(x.shape, generator=gen).to(x)
    x_tau = flow.add_noise(x.detach(), eps, tau)
    gan_extra: dict[str, float] = {}
    if gan_weight > 0:
        x_in = x_tau.clone().requires_grad_(True)
        with torch.enable_grad():
            v_fake = cond.velocity(critic, x_in, tau)
            g_loss = obj.gan_generator_loss(gan.take_logits(critic))
            (g_in,) = torch.autograd.grad(g_loss, x_in)
        fake = flow.x0_from_velocity(x_tau, tau, v_fake.detach())
        gan_extra = {"gan_g": float(g_loss.detach())}
    else:
        with torch.no_grad():
            fake = flow.x0_from_velocity(x_tau, tau, cond.velocity(critic, x_tau, tau))
    if objective == "decoupled-dmd":
        # Liu et al. (arXiv 2511.22677) recommend: distribution matching over the full range
        # (tau above), the CFG-augmentation term re-noised only at levels below the student's
        # current step, tau_ca ~ U[tau_min, min(tau_max, sigma_k)) -- the spear sharpens what
        # this step still has to decide, not what earlier steps fixed.
        tau2 = flow.sample_tau(tgen, b, *obj.ca_tau_range(tau_min, tau_max, student_sigma)).to(x)
        eps2 = torch.randn(x.shape, generator=gen).to(x)
        x_tau2 = flow.add_noise(x.detach(), eps2, tau2)
        with torch.no_grad():
            real_c = flow.x0_from_velocity(x_tau, tau, cond.velocity(teacher.model, x_tau, tau))
            v_c2, v_u2 = cond.velocity_pair(teacher.model, x_tau2, tau2)
            real_c2, real_u2 = flow.x0_from_velocity(x_tau2, tau2, v_c2), flow.x0_from_velocity(x_tau2, tau2, v_u2)
        grad = obj.decoupled_dmd_gradient(x.detach(), fake, real_c, real_c2, real_u2, teacher.cfg_scale)
        real = real_c
        extra = {"tau_ca_max": float(tau2.max())}
    else:
        real = teacher_x0(teacher, cond, x_tau, tau)
        grad = obj.dmd_gradient(x.detach(), fake, real)
        extra = {}
    loss = obj.dmd_loss(x, grad)
    if gan_weight > 0:  # x_tau's gradient g_in, carried back to x through the noising (d x_tau / d x = 1 - tau)
        loss = loss + gan_weight * obj.with_gradient(flow.add_noise(x, eps, tau), g_in, g_loss.detach())
    stats = {
        "dm_grad_norm": float(grad.flatten(1).norm(dim=1).mean()),
        "fake_real_gap": float((fake - real).abs().mean()),
        "tau_mean": float(tau.mean()),
        **extra,
        **gan_extra,
    }
    return loss, stats

