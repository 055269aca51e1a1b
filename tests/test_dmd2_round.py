"""The DMD2 round's objectives do what their names say (decoupled-DMD's schedule, its spec rules)."""

from __future__ import annotations

import torch

from conftest import EXPERIMENTS
from flashctl.distill import dmd2
from flashctl.distill import objectives as ob

SPEC = str(EXPERIMENTS / "tiny-cpu.yaml")


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
    embeds, mask = adapter.encode_prompts(prompts)
    neg, neg_mask = adapter.encode_prompts(["", ""])
    assert neg.shape[1] != embeds.shape[1]  # the padding path is exercised
    seq = (32 // (adapter.vae_scale_factor * 2)) ** 2

    def velocity(model, x, sigma, e, m, h, w, src):
        return adapter.velocity(model, x, sigma, e, m, h, w, src)

    cond = dmd2.Conditioning(task="t2i", embeds=embeds, mask=mask, neg_embeds=neg, neg_mask=neg_mask,
                             height=32, width=32, latent_shape=(seq, 4 * adapter.z_dim), velocity_fn=velocity)
    x = torch.randn(2, seq, 4 * adapter.z_dim, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v_c, v_u = cond.velocity_pair(adapter.transformer, x, sigma)
        ref_c = cond.velocity(adapter.transformer, x, sigma)
        ref_u = cond.velocity(adapter.transformer, x, sigma, uncond=True)
    assert torch.allclose(v_c, ref_c, atol=1e-5) and torch.allclose(v_u, ref_u, atol=1e-5)
    assert not torch.allclose(v_c, v_u, atol=1e-3)  # the prompt matters: the two halves are not one pass
