"""The DMD2 round's objectives do what their names say (decoupled-DMD's schedule, its spec rules)."""

from __future__ import annotations

import pytest
import torch

from conftest import EXPERIMENTS
from flashctl.distill import dmd2
from flashctl.distill import objectives as ob

SPEC = str(EXPERIMENTS / "tiny-cpu.yaml")


def _t2i_conditioning(adapter, prompts: list[str]) -> dmd2.Conditioning:
    """A 32x32 T2I Conditioning of `prompts` (CFG negatives "") through the adapter's own velocity."""
    embeds, mask = adapter.encode_prompts(prompts)
    neg, neg_mask = adapter.encode_prompts([""] * len(prompts))
    seq = (32 // (adapter.vae_scale_factor * 2)) ** 2

    def velocity(model, x, sigma, e, m, h, w, src):
        return adapter.velocity(model, x, sigma, e, m, h, w, src)

    return dmd2.Conditioning(task="t2i", embeds=embeds, mask=mask, neg_embeds=neg, neg_mask=neg_mask,
                             height=32, width=32, latent_shape=(seq, 4 * adapter.z_dim), velocity_fn=velocity)



def test_ca_range_lies_below_the_student_step():
    assert ob.ca_tau_range(0.02, 0.98, 0.75) == (0.02, 0.75)
    assert ob.ca_tau_range(0.02, 0.6, 1.0) == (0.02, 0.6)  # never above tau_max
    lo, hi = ob.ca_tau_range(0.02, 0.98, 0.01)  # no room below sigma_k: a sliver, not the full range
    assert lo == 0.02 and 0.02 < hi <= 0.021


class _Linear(torch.nn.Module):
    """A velocity model small enough to run the loss by hand: v = W x (+ 0.1 for the unconditional pass)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 4)


def _cond(batch: int = 64) -> dmd2.Conditioning:
    e = torch.zeros(batch, 1, 1)

    def velocity(model, x, sigma, embeds, mask, h, w, src):
        return model.w(x) + (0.1 if embeds is not e else 0.0)

    return dmd2.Conditioning(task="t2i", embeds=e, mask=e, neg_embeds=torch.ones(batch, 1, 1), neg_mask=e,
                             height=8, width=8, latent_shape=(3, 4), velocity_fn=velocity)


def test_decoupled_dmd_renoises_its_cfg_term_only_below_the_student_level():
    torch.manual_seed(0)
    cond, critic, teacher = _cond(), _Linear(), dmd2.Teacher(_Linear(), cfg_scale=4.0)
    x = torch.randn(64, 3, 4, requires_grad=True)
    for sigma in (0.9, 0.5):
        _, stats = dmd2.generator_loss(x, cond, critic, teacher, torch.Generator().manual_seed(1), 0.02, 0.98,
                                       objective="decoupled-dmd", student_sigma=sigma)
        assert stats["tau_ca_max"] < sigma
        # distribution matching still covers the full range (its mean is ~0.5 over 64 draws)
        assert 0.35 < stats["tau_mean"] < 0.65


def test_cfg_rescale_with_decoupled_dmd_is_a_spec_error(runner):
    from flashctl.cli import app

    res = runner.invoke(app, ["validate", SPEC, "distill.objective=decoupled-dmd", "teachers.base.cfg_rescale=0.7"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "teachers.base.cfg_rescale" in lines[0] and "decoupled-dmd" in lines[0]


def test_batched_cfg_equals_two_passes_on_a_real_qwen_transformer(tiny_world):
    """CFG's conditional and unconditional passes as one batch of 2B (one weight gather per guided
    prediction under ZeRO-3) give the two separate passes' velocities, prompts of different lengths
    padded with masked positions."""
    from flashctl.models.adapter import QwenImageAdapter

    adapter = QwenImageAdapter.from_pretrained(tiny_world["teacher"])
    prompts = ["a red circle", "a blue square at the top left and a green triangle at the bottom right"]
    cond = _t2i_conditioning(adapter, prompts)
    assert cond.neg_embeds.shape[1] != cond.embeds.shape[1]  # the padding path is exercised
    seq = cond.latent_shape[0]
    x = torch.randn(2, seq, 4 * adapter.z_dim, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v_c, v_u = cond.velocity_pair(adapter.transformer, x, sigma)
        ref_c = cond.velocity(adapter.transformer, x, sigma)
        ref_u = cond.velocity(adapter.transformer, x, sigma, uncond=True)
    assert torch.allclose(v_c, ref_c, atol=1e-5) and torch.allclose(v_u, ref_u, atol=1e-5)
    assert not torch.allclose(v_c, v_u, atol=1e-3)  # the prompt matters: the two halves are not one pass


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gan_generator_term_reaches_the_student_sample_but_not_the_critic(tiny_world, checkpointing):
    """The generator update's GAN term, carried through the critic's input only, gives the
    student sample the gradient of dmd_loss + w * softplus(-D(x_tau)) taken directly, and leaves
    no gradient on the critic (its head included); also under activation checkpointing, where
    the head's features come out of a recomputed block."""
    from diffusers import QwenImageTransformer2DModel

    from flashctl.distill.gan import attach_head
    from flashctl.models.adapter import QwenImageAdapter

    adapter = QwenImageAdapter.from_pretrained(tiny_world["teacher"])
    critic = QwenImageTransformer2DModel.from_pretrained(tiny_world["teacher"] / "transformer")
    attach_head(critic, seed=0)
    if checkpointing:
        critic.enable_gradient_checkpointing()
    teacher = dmd2.Teacher(QwenImageTransformer2DModel.from_pretrained(tiny_world["teacher"] / "transformer"), 2.5)
    cond = _t2i_conditioning(adapter, ["a red circle", "a blue square"])
    seq = cond.latent_shape[0]
    x0 = torch.randn(2, seq, 4 * adapter.z_dim, generator=torch.Generator().manual_seed(0))
    x = x0.clone().requires_grad_(True)
    loss, stats = dmd2.generator_loss(x, cond, critic, teacher, torch.Generator().manual_seed(1), 0.02, 0.98,
                                      gan_weight=0.5)
    loss.backward()
    assert all(p.grad is None for p in critic.parameters())
    assert "gan_g" in stats

    # the same loss with the GAN term differentiated straight through the critic
    from flashctl.distill.gan import take_logits
    from flashctl.flow import add_noise, sample_tau

    g = torch.Generator().manual_seed(1)
    tau = sample_tau(g, 2, 0.02, 0.98)
    eps = torch.randn(x0.shape, generator=g)
    y = x0.clone().requires_grad_(True)
    ref, _ = dmd2.generator_loss(y, cond, critic, teacher, torch.Generator().manual_seed(1), 0.02, 0.98)
    cond.velocity(critic, add_noise(y, eps, tau), tau)
    gan_term = ob.gan_generator_loss(take_logits(critic))
    (ref + 0.5 * gan_term).backward()
    assert loss.item() == pytest.approx((ref + 0.5 * gan_term).item(), rel=1e-5)
    assert torch.allclose(x.grad, y.grad, rtol=1e-4, atol=1e-8)
    assert 0.5 * gan_term.item() > 0 and x.grad.abs().sum() > 0

    # the critic's side: same draws as the plain critic loss, whose value its flow-matching term
    # keeps (student half of the 2B forward); the discriminator term is weighted on top
    real = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    plain = dmd2.critic_loss(critic, cond, x0, torch.Generator().manual_seed(5))
    both, st = dmd2.critic_gan_loss(critic, cond, x0, real, torch.Generator().manual_seed(5), 0.1)
    assert st["flow_matching"] == pytest.approx(plain.item(), rel=1e-5)
    assert both.item() == pytest.approx(plain.item() + 0.1 * st["gan_d"], rel=1e-5)
    both.backward()
    assert all(p.grad is not None for p in critic.gan_head.parameters())  # the head trains with the critic


@pytest.mark.slow
def test_gan_option_trains_the_critic_head_and_leaves_the_student_export_alone(tiny_world, tmp_path):
    """`distill.gan_weight=0.1` on 2 ranks under ZeRO-3: the critic's classifier head is
    partitioned and trained with the critic (its checkpointed weights left their seeded
    initialisation), the GAN losses and discriminator accuracies are logged, and the exported
    student is a plain Qwen-Image transformer (no head)."""
    import json

    from safetensors.torch import load_file

    from conftest import run_cli
    from flashctl.distill.checkpoint import export_fp32, load_fp32
    from flashctl.distill.gan import CriticHead

    args = ["distill", SPEC, *tiny_world["spec_args"], f"run.out_dir={tmp_path}/runs", "run.name=gan",
            "distill.gan_weight=0.1", "distill.steps=2", "eval.enabled=false", "tracking.enabled=false"]
    res = run_cli(args, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "runs" / "gan"
    last = json.loads((run / "summary.json").read_text())["last_metrics"]
    for key in ("train/loss_gan_d", "train/loss_gan_g", "train/d_acc_real", "train/d_acc_fake"):
        assert key in last and last[key] == last[key], key  # logged and not NaN
    assert 0 < last["train/loss_gan_d"] < 10 and 0 <= last["train/d_acc_real"] <= 1

    critic = load_fp32(export_fp32(run / "checkpoints", "critic", tmp_path / "critic"))
    trained = {k.removeprefix("gan_head."): v for k, v in critic.items() if k.startswith("gan_head.")}
    cfg = json.loads((tiny_world["teacher"] / "transformer" / "config.json").read_text())
    initial = CriticHead(cfg["num_attention_heads"] * cfg["attention_head_dim"], seed=0).state_dict()  # distill.seed
    assert trained.keys() == initial.keys()
    assert all(trained[k].shape == initial[k].shape for k in initial)
    assert any(not torch.equal(trained[k], initial[k]) for k in initial), "the head did not train"

    student = {}
    for f in (run / "student" / "transformer").glob("*.safetensors"):
        student.update(load_file(f))
    assert student and not any("gan_head" in k for k in student)
