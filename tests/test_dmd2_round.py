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
