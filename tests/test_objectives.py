"""DMD2 tensor maths, schedules, task mixture and guidance policies against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flashctl import flow
from flashctl.distill import guidance, mixture, schedules
from flashctl.distill import objectives as ob
from flashctl.spec import GuidanceSpec


def T(x):  # noqa: N802 - short tensor constructor for hand-written values
    return torch.tensor(x, dtype=torch.float64)


# x0, eps per sample (B=2, seq=1, C=2), t per sample; x_t and v worked out by hand:
#   s0: t=.25: .75*[2,-1] + .25*[0,1] = [1.5, -.5];  v = [0,1]-[2,-1] = [-2, 2]
#   s1: t=.5 : .5*[0,4] + .5*[2,0]    = [1, 2];      v = [2,0]-[0,4]  = [2, -4]
X0 = T([[[2.0, -1.0]], [[0.0, 4.0]]])
EPS = T([[[0.0, 1.0]], [[2.0, 0.0]]])
TS = T([0.25, 0.5])
XT = T([[[1.5, -0.5]], [[1.0, 2.0]]])
V = T([[[-2.0, 2.0]], [[2.0, -4.0]]])


def test_add_noise_broadcasts_per_sample_t():
    assert torch.equal(flow.add_noise(X0, EPS, TS), XT)
    assert torch.equal(flow.velocity_target(X0, EPS), V)
    # scalar t: the same level for the whole batch
    assert torch.equal(flow.add_noise(X0, EPS, 0.5), T([[[1.0, 0.0]], [[1.0, 2.0]]]))


def test_x0_and_eps_from_velocity_invert_the_noising():
    # s0: [1.5,-.5] - .25*[-2,2] = [2,-1];  eps: [1.5,-.5] + .75*[-2,2] = [0,1]
    assert torch.equal(flow.x0_from_velocity(XT, TS, V), X0)
    assert torch.equal(flow.eps_from_velocity(XT, TS, V), EPS)


def test_timestep_batch_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not match batch"):
        flow.add_noise(X0, EPS, T([0.1, 0.2, 0.3]))


def test_euler_step_hand_value_and_exact_on_straight_paths():
    # [1,2] + (.5 - .75) * [-2,4] = [1.5, 1]
    assert torch.equal(flow.euler_step(T([1.0, 2.0]), T([-2.0, 4.0]), 0.75, 0.5), T([1.5, 1.0]))
    # with the true velocity the flow is a straight line: one step lands on x_{sigma_next}
    out = flow.euler_step(XT, V, TS, T([0.0, 0.1]))
    assert torch.allclose(out, flow.add_noise(X0, EPS, T([0.0, 0.1])))


def test_shift_sigmas_and_student_grid():
    # 3*.5/(1+2*.5) = .75 ; 3*.25/(1+2*.25) = .5 ; 3*.75/(1+2*.75) = .9
    assert torch.allclose(flow.shift_sigmas(T([1.0, 0.75, 0.5, 0.25]), 3.0), T([1.0, 0.9, 0.75, 0.5]))
    assert torch.allclose(flow.student_sigmas(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    assert torch.allclose(flow.student_sigmas(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError):
        flow.student_sigmas(0, 3.0)


@pytest.mark.parametrize("steps,shift", [(4, 3.0), (8, 2.5), (1, 3.0), (50, 1.0)])
def test_student_grid_matches_diffusers_static_shift_scheduler(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))  # QwenImagePipeline's grid
    assert torch.allclose(flow.student_sigmas(steps, shift), sched.sigmas, atol=1e-6)


def test_euler_sampling_matches_diffusers_scheduler_step():
    steps, shift = 4, 3.0
    sched = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
    grid = flow.student_sigmas(steps, shift)
    x_ours = x_ref = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))

    def velocity(x, s):  # any deterministic field will do
        return torch.sin(x) * (1 + s)

    for i, t in enumerate(sched.timesteps):
        x_ref = sched.step(velocity(x_ref, float(grid[i])), t, x_ref).prev_sample
        x_ours = flow.euler_step(x_ours, velocity(x_ours, float(grid[i])), grid[i], grid[i + 1])
    assert torch.allclose(x_ours, x_ref, atol=1e-6)


def test_cfg_combine_plain_and_norm_rescaled():
    cond, uncond = T([[3.0, 4.0]]), T([[1.0, 0.0]])  # |cond| = 5
    comb = T([[5.0, 8.0]])  # [1,0] + 2*([3,4]-[1,0])
    assert torch.equal(flow.cfg_combine(cond, uncond, 2.0), comb)
    full = comb * 5.0 / math.sqrt(89.0)  # |comb| = sqrt(25+64)
    assert torch.allclose(flow.cfg_combine(cond, uncond, 2.0, rescale=1.0), full)
    assert torch.allclose(flow.cfg_combine(cond, uncond, 2.0, rescale=0.25), 0.25 * full + 0.75 * comb)
    # the norm is taken per token along the channel dim: each token keeps its own cond norm
    cond2 = T([[[3.0, 4.0], [0.0, 2.0]]])
    out = flow.cfg_combine(cond2, torch.zeros_like(cond2), 3.0, rescale=1.0)
    assert torch.allclose(out, cond2)
    with pytest.raises(ValueError):
        flow.cfg_combine(cond, uncond, 2.0, rescale=1.5)


def test_dmd_gradient_hand_values_and_eps_clamp():
    x = T([[[1.0, 3.0]], [[0.0, 0.0]]])
    real = T([[[0.0, 1.0]], [[1.0, -3.0]]])
    fake = T([[[2.0, 2.0]], [[1.0, 1.0]]])
    # s0: mean|x-real| = mean(1,2) = 1.5, (fake-real) = [2,1] -> [4/3, 2/3]
    # s1: mean|x-real| = mean(1,3) = 2,   (fake-real) = [0,4] -> [0, 2]
    g = ob.dmd_gradient(x, fake, real)
    assert torch.allclose(g, T([[[4 / 3, 2 / 3]], [[0.0, 2.0]]]))
    # x == real: the normaliser is clamped to eps instead of dividing by zero
    g0 = ob.dmd_gradient(T([[1.0, 1.0]]), T([[2.0, 1.0]]), T([[1.0, 1.0]]), eps=0.5)
    assert torch.equal(g0, T([[2.0, 0.0]]))


def test_dmd_loss_value_and_gradient():
    g = T([[[4 / 3, 2 / 3]], [[0.0, 2.0]]])
    x = T([[[1.0, 3.0]], [[0.0, 0.0]]]).requires_grad_(True)
    loss = ob.dmd_loss(x, g)
    # 0.5 * mean(g^2) = 0.5 * (16/9 + 4/9 + 0 + 4) / 4 = 7/9
    assert loss.item() == pytest.approx(7 / 9)
    loss.backward()
    assert torch.allclose(x.grad, g / 4)  # d loss / dx = grad / numel


def test_dmd_step_moves_student_towards_the_real_prediction():
    real = T([[1.0, -2.0]])
    x = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    fake = x.detach().clone()  # the critic sees the student where it is
    g = ob.dmd_gradient(x.detach(), fake, real)
    assert torch.allclose(g, T([[-1.0, 2.0]]) / 1.5)
    ob.dmd_loss(x, g).backward()
    x_new = x.detach() - 0.1 * x.grad
    assert (x_new - real).norm() < (x.detach() - real).norm()
    assert torch.allclose(x_new, -0.1 * g / 2)  # SGD step: lr * g / numel


def test_decoupled_dmd_hand_value():
    x = T([[1.0, 1.0]])
    fake_dm, cond_dm = T([[2.0, 0.0]]), T([[1.0, 0.0]])  # DM = [1, 0]
    cond_ca, uncond_ca = T([[1.0, 1.0]]), T([[0.0, 1.0]])  # CA = -(3-1)*[1,0] = [-2, 0]
    # real_cfg(ca) = [0,1] + 3*[1,0] = [3,1]; mean|x - [3,1]| = mean(2, 0) = 1
    g = ob.decoupled_dmd_gradient(x, fake_dm, cond_dm, cond_ca, uncond_ca, scale=3.0)
    assert torch.equal(g, T([[-1.0, 0.0]]))
    g_dm_only = ob.decoupled_dmd_gradient(x, fake_dm, cond_dm, cond_ca, uncond_ca, 3.0, ca_weight=0.0)
    assert torch.equal(g_dm_only, T([[1.0, 0.0]]))


def test_decoupled_dmd_at_one_level_equals_dmd2_with_cfg():
    gen = torch.Generator().manual_seed(3)
    x, fake, cond, uncond = (torch.randn(3, 5, 4, generator=gen, dtype=torch.float64) for _ in range(4))
    ref = ob.dmd_gradient(x, fake, flow.cfg_combine(cond, uncond, 4.0))
    assert torch.allclose(ob.decoupled_dmd_gradient(x, fake, cond, cond, uncond, 4.0), ref)


def test_flow_matching_loss_hand_values():
    # target eps - x0 = [-1, 2]; err^2 = [4, 1]; mean 2.5
    assert flow.flow_matching_loss(T([[1.0, 1.0]]), T([[1.0, 0.0]]), T([[0.0, 2.0]])).item() == 2.5
    v = T([[1.0, 1.0], [0.0, 0.0]])
    x0, eps = T([[1.0, 0.0], [0.0, 0.0]]), T([[0.0, 2.0], [0.0, 1.0]])
    # per-sample squared errors [4,1] and [0,1], weights [2, 0] -> (8 + 2 + 0 + 0) / 4
    assert flow.flow_matching_loss(v, x0, eps, weight=T([2.0, 0.0])).item() == 2.5


def test_gan_losses_hand_values():
    # generator: softplus(-0) = ln 2, softplus(-ln 3) = ln(4/3)
    assert ob.gan_generator_loss(T([0.0, math.log(3.0)])).item() == pytest.approx(math.log(8 / 3) / 2)
    # discriminator: softplus(-real) + softplus(fake); at 0/0 it is 2 ln 2
    assert ob.gan_discriminator_loss(T([0.0]), T([0.0])).item() == pytest.approx(2 * math.log(2))
    # D(real)=ln 3, D(fake)=-ln 3: ln(4/3) + ln(4/3)
    d = ob.gan_discriminator_loss(T([math.log(3.0)]), T([-math.log(3.0)]))
    assert d.item() == pytest.approx(2 * math.log(4 / 3))
    # non-saturating: a confidently rejected fake still gets a full-size gradient (-1)
    logit = T([-20.0]).requires_grad_(True)
    ob.gan_generator_loss(logit).backward()
    assert logit.grad.item() == pytest.approx(-1.0, abs=1e-6)


def test_with_gradient_carries_a_gradient_and_keeps_the_value():
    # the GAN term's gradient, taken w.r.t. the critic's input, reaches the student's graph
    x = T([1.0, 2.0]).requires_grad_(True)
    y = 3.0 * x  # some graph upstream
    s = ob.with_gradient(y, T([0.5, -1.0]), T(0.25))
    assert s.item() == 0.25  # the logged value is the loss itself, not the surrogate
    s.backward()
    assert x.grad.tolist() == [1.5, -3.0]  # chain rule: 3 * [0.5, -1]


def test_sample_tau_range_and_determinism():
    a = flow.sample_tau(torch.Generator().manual_seed(7), 1000, 0.02, 0.98)
    b = flow.sample_tau(torch.Generator().manual_seed(7), 1000, 0.02, 0.98)
    assert a.shape == (1000,) and torch.equal(a, b)
    assert a.min() >= 0.02 and a.max() < 0.98
    assert abs(a.mean().item() - 0.5) < 0.05
    with pytest.raises(ValueError):
        flow.sample_tau(torch.Generator(), 4, 0.5, 0.5)


def test_sample_student_step_covers_all_steps():
    gen = torch.Generator().manual_seed(0)
    ks = [schedules.sample_student_step(gen, 4) for _ in range(200)]
    assert set(ks) == {0, 1, 2, 3}


# --- task mixture --------------------------------------------------------------------------


@pytest.mark.parametrize("t2i,edit", [(9, 1), (7, 3), (5, 5)])
def test_task_mixture_ratio_is_honoured(t2i, edit):
    p = edit / (t2i + edit)
    n = 4000
    draws = [mixture.task_for_step(g, m, 0, p) for g in range(n // 2) for m in range(2)]
    k = draws.count("edit")
    sd = math.sqrt(n * p * (1 - p))
    assert abs(k - n * p) < 4 * sd, (k, n * p)


def test_task_mixture_is_deterministic_and_rank_independent():
    seq = [mixture.task_for_step(g, 0, 42, 0.3) for g in range(100)]
    # the same (seed, step, micro step) gives the same task whatever was drawn before
    again = [mixture.task_for_step(g, 0, 42, 0.3) for g in reversed(range(100))][::-1]
    assert seq == again
    assert seq != [mixture.task_for_step(g, 0, 43, 0.3) for g in range(100)]
    assert seq != [mixture.task_for_step(g, 1, 42, 0.3) for g in range(100)]
    assert {mixture.task_for_step(g, 0, 0, 0.0) for g in range(50)} == {"t2i"}
    assert {mixture.task_for_step(g, 0, 0, 1.0) for g in range(50)} == {"edit"}
    assert mixture.task_for_step(3, 0, -5, 0.5) in ("t2i", "edit")  # negative seeds are fine
    with pytest.raises(ValueError):
        mixture.task_for_step(0, 0, 0, 1.5)


# --- teacher guidance policies -------------------------------------------------------------

SPEC = {"edit": "edit-teacher"}


def pick(policy, task, step, sigma=0.5, steps=(2, 3), student_sigma_range=None):
    return guidance.real_score_teacher(policy, task, step, sigma, "base", SPEC, steps, student_sigma_range)


def test_single_policy_always_uses_the_base_teacher():
    assert {pick("single", task, k) for task in ("t2i", "edit") for k in range(4)} == {"base"}


def test_specialised_policy_uses_the_task_teacher_at_every_step():
    assert [pick("specialised", "edit", k) for k in range(4)] == ["edit-teacher"] * 4
    assert [pick("specialised", "t2i", k) for k in range(4)] == ["base"] * 4  # no t2i specialist


def test_stepwise_policy_uses_the_specialist_only_at_chosen_steps():
    assert [pick("stepwise", "edit", k) for k in range(4)] == ["base", "base", "edit-teacher", "edit-teacher"]
    assert [pick("stepwise", "t2i", k) for k in range(4)] == ["base"] * 4


def test_stepwise_policy_with_a_student_sigma_range_on_the_training_grid():
    grid = [float(x) for x in flow.student_sigmas(4, 3.0)[:4]]  # the levels training feeds: 1, .9, .75, .5
    kw = dict(steps=(0, 1, 2, 3), student_sigma_range=(0.5, 0.8))
    assert [pick("stepwise", "edit", k, sigma=grid[k], **kw) for k in range(4)] == ["base", "base", "edit-teacher", "edit-teacher"]
    # inclusive bounds: .75 is the upper bound
    assert pick("stepwise", "edit", 2, sigma=grid[2], steps=(2,), student_sigma_range=(0.6, 0.75)) == "edit-teacher"
    # both conditions must hold: level in range but the step is not chosen -> base
    assert pick("stepwise", "edit", 3, sigma=grid[3], steps=(2,), student_sigma_range=(0.4, 0.8)) == "base"
    with pytest.raises(ValueError, match="sigma"):
        pick("stepwise", "edit", 2, sigma=None, **kw)


def test_teacher_for_reads_a_guidance_spec():
    g = GuidanceSpec(policy="stepwise", base="base", specialised={"edit": "e"}, steps=[3])
    assert [guidance.teacher_for(g, "edit", k, 0.5) for k in range(4)] == ["base"] * 3 + ["e"]
    g = GuidanceSpec(policy="stepwise", specialised={"edit": "e"}, steps=[0, 1, 2, 3], student_sigma_range=(0.0, 0.8))
    grid = flow.student_sigmas(4, 3.0)
    assert [guidance.teacher_for(g, "edit", k, float(grid[k])) for k in range(4)] == ["base", "base", "e", "e"]


# --- the student's own scheduler -----------------------------------------------------------

# Qwen/Qwen-Image's scheduler/scheduler_config.json (the fields that move the grid).
QWEN_IMAGE_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}


def pipeline_sigmas(scheduler, steps: int, image_seq_len: int) -> torch.Tensor:
    """The sigmas QwenImagePipeline.__call__ sets: the same arguments to retrieve_timesteps."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

    c = scheduler.config
    mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas


@pytest.mark.parametrize("steps,shift", [(4, 3.0), (8, 2.5), (1, 3.0), (2, 1.0)])
@pytest.mark.parametrize("image_seq_len", [256, 4096, 6480])  # 512^2, 1024^2, 1328x800 px
def test_student_scheduler_reproduces_the_training_grid_under_the_pipeline(steps, shift, image_seq_len):
    teacher = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER)
    student = schedules.student_scheduler(teacher, shift)
    got = pipeline_sigmas(student, steps, image_seq_len)
    assert torch.allclose(got, flow.student_sigmas(steps, shift), atol=1e-6, rtol=0), got
    # the teacher is untouched and keeps its own (dynamic, shift_terminal) schedule
    assert teacher.config.shift_terminal == 0.02 and teacher.config.use_dynamic_shifting
    if steps == 4 and shift == 3.0:
        t = pipeline_sigmas(teacher, steps, image_seq_len)
        assert abs(float(t[3]) - 0.02) < 1e-6  # stretched to the terminal: not the student's .5


def test_student_scheduler_survives_a_save_and_load(tmp_path):
    teacher = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER)
    schedules.student_scheduler(teacher, 3.0).save_pretrained(tmp_path)
    loaded = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    assert torch.allclose(pipeline_sigmas(loaded, 4, 4096), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]), atol=1e-6)
