"""`plan`: parameter counts from configs, ZeRO memory per GPU, activations, NFE, offload options."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from conftest import EXPERIMENTS
from flashctl.errors import UserError
from flashctl.plan import (
    QWEN_IMAGE_TEXT_ENCODER,
    QWEN_IMAGE_TRANSFORMER,
    model_size,
    nfe_estimate,
    plan,
    render_plan,
    teachers_used,
    tiny_configs,
    trainable_memory,
)
from flashctl.spec import load_spec

QWEN = EXPERIMENTS / "qwen-image-flash.yaml"
TINY = EXPERIMENTS / "tiny-cpu.yaml"


def _row(result, name):
    return next(c for c in result.components if c.name == name)


def test_qwen_image_transformer_is_20b_from_its_config():
    size = model_size(QWEN_IMAGE_TRANSFORMER, "transformer", "test")
    assert abs(size.total - 20.4e9) / 20.4e9 < 0.05
    # The largest single layer is a block's 6x modulation Linear: 3072 -> 6*3072 (+ bias).
    assert size.largest_layer == 3072 * 6 * 3072 + 6 * 3072
    # deepspeed.gather: block gathers a whole transformer block: ~1/60 of the model (60 blocks)
    assert abs(size.largest_block - size.total / 60) / (size.total / 60) < 0.05
    assert size.gathered("block") == size.largest_block and size.gathered("submodule") == size.largest_layer
    te = model_size(QWEN_IMAGE_TEXT_ENCODER, "text_encoder", "test")
    assert abs(te.total - 8.29e9) / 8.29e9 < 0.01  # Qwen2.5-VL-7B


def test_tiny_config_counts_match_the_built_tiny_transformer():
    from flashctl.models.tiny import build_transformer, build_vae

    spec = load_spec(TINY)
    cfgs = tiny_configs(spec.model.tiny)
    built = build_transformer(spec.model.tiny)
    assert model_size(cfgs["transformer"], "transformer", "t").total == sum(p.numel() for p in built.parameters())
    vae = build_vae(spec.model.tiny)
    assert model_size(cfgs["vae"], "vae", "t").total == sum(p.numel() for p in vae.parameters())


def test_bf16_zero3_rows_count_what_the_engine_holds_and_fit_only_with_checkpointing():
    result = plan(load_spec(QWEN))
    student = _row(result, "student")
    # held (bench/plan_vs_measured.py): 16 bytes per parameter over 64 GPUs (2 bf16 params + 2 bf16
    # gradient partition + 4 fp32 master + 8 Adam) + a gathered 16-bit transformer block (the gather
    # unit) and its gradient + DeepSpeed's 5e8-element bf16 gradient reduce bucket; DeepSpeed's
    # estimator (18 B/param, no bucket) is shown beside it
    n, largest = student.size.total, student.size.largest_block
    assert student.total_gb * 1024**3 == pytest.approx(16 * n / 64 + 4 * largest + 2 * 5e8, rel=1e-6)
    assert student.deepspeed_gb * 1024**3 == pytest.approx(18 * n / 64 + 4 * largest, rel=1e-6)
    # while one engine steps: its fp32 gradient copy + AdamW's (foreach) sqrt, 8 B per partitioned param
    assert student.step_gb * 1024**3 == pytest.approx(8 * n / 64)
    held = sum(c.total_gb for c in result.components)
    assert result.model_states_gb == pytest.approx(held + student.step_gb)
    assert [c.name for c in result.components] == [
        "student", "critic", "teacher base", "teacher t2i", "text encoder", "vae"
    ]  # fmt: skip
    # the worker's adapter holds the text encoder and VAE in fp32 on every rank: 4 bytes/param
    te = _row(result, "text encoder")
    assert te.placement == "replicated" and te.total_gb * 1024**3 == pytest.approx(4 * te.size.total)
    # the example spec shards its frozen teachers within a node (deepspeed.teacher_shard: node)
    assert _row(result, "teacher base").placement == "ZeRO-3 /8 per node"
    assert not result.fits and result.fits_ckpt
    assert result.activations.checkpointed_gb < result.activations.full_gb / 5
    # CPU optimizer offload is listed; it removes gradients + optimizer states from the GPU.
    offload = next(o for o in result.offload_options if o.offload_optimizer == "cpu" and o.offload_param == "none")
    assert offload.fits_ckpt and offload.model_states_gb < result.model_states_gb
    assert offload.cpu_per_node_gb > 0


def test_zero3_param_memory_shrinks_with_gpus_and_replicated_parts_do_not():
    one = plan(load_spec(QWEN, ["launch.nnodes=1"]))
    eight = plan(load_spec(QWEN, ["launch.nnodes=8"]))
    assert _row(one, "student").params_gb / _row(eight, "student").params_gb == pytest.approx(8.0)
    # teachers sharded within a node (the example spec) do not shrink with nodes; over the world they do
    assert _row(one, "teacher base").params_gb == _row(eight, "teacher base").params_gb
    world = ["deepspeed.teacher_shard=world"]
    assert _row(plan(load_spec(QWEN, ["launch.nnodes=1", *world])), "teacher base").params_gb / _row(
        plan(load_spec(QWEN, ["launch.nnodes=8", *world])), "teacher base").params_gb == pytest.approx(8.0)
    assert _row(one, "text encoder").params_gb == _row(eight, "text encoder").params_gb
    # ZeRO-2: 16-bit parameters replicated, only gradients and optimizer states partitioned.
    z2 = plan(load_spec(QWEN, ["deepspeed.zero_stage=2"]))
    assert _row(z2, "student").params_gb == pytest.approx(_row(one, "student").params_gb * 8)
    assert _row(z2, "student").total_gb == pytest.approx(_row(z2, "student").deepspeed_gb, rel=1e-6)
    assert _row(z2, "teacher base").placement == "replicated" and _row(z2, "student").step_gb == 0


def test_offload_moves_states_off_the_gpu():
    size = model_size(QWEN_IMAGE_TRANSFORMER, "transformer", "t")
    base = trainable_memory("student", size, 3, "bf16", 8, 8)
    opt = trainable_memory("student", size, 3, "bf16", 8, 8, offload_optimizer=True)
    both = trainable_memory("student", size, 3, "bf16", 8, 8, offload_optimizer=True, offload_param=True)
    assert opt.grads_gb == opt.optim_gb == 0 and opt.params_gb == base.params_gb
    bucket = 2 * 5e8  # the gradient reduce bucket stays on the GPU
    assert both.params_gb == 0 and both.total_gb == pytest.approx((4 * size.largest_block + bucket) / 1024**3)
    for row in (opt, both):
        assert row.total_gb == pytest.approx(row.deepspeed_gb + bucket / 1024**3, rel=1e-6)
        assert row.step_gb == 0  # CPU Adam steps in host memory


def test_tiny_spec_fits_and_renders():
    result = plan(load_spec(TINY))
    assert result.fits and result.total_gb < 0.1
    assert result.precision == "fp32" and _row(result, "student").deepspeed_gb is None
    console = Console(width=160, record=True)
    for table in render_plan(result):
        console.print(table)
    text = console.export_text()
    assert "Memory per GPU (MiB)" in text and "fits" in text and "teacher base" in text
    assert " GB" not in text and " MB" not in text  # the numbers are GiB / MiB and say so
    # on CPU the worker keeps teachers as plain replicas, and so does the plan
    assert _row(result, "teacher base").placement == "replicated"


def test_nfe_per_step():
    spec = load_spec(TINY)
    nfe = nfe_estimate(spec)
    # S=4: backward simulation runs k ~ U{0..3} steps + 1 -> 2.5 on average; CFG teacher = 2.
    assert (nfe.gen_student_mean, nfe.gen_critic, nfe.gen_teacher) == (2.5, 1, 2)
    assert nfe.generator_step == 5.5 and nfe.critic_step == 3.5
    assert nfe.per_cycle == 5.5 + 5 * 3.5 and nfe.backward_per_cycle == 6
    no_cfg = load_spec(TINY, ["teachers.base.cfg_scale=1.0", "teachers.edit.cfg_scale=1.0"])
    assert nfe_estimate(no_cfg).gen_teacher == 1
    assert nfe_estimate(load_spec(TINY, ["distill.objective=decoupled-dmd"])).gen_teacher == 3


def test_teachers_used_follow_policy_and_mixture():
    assert teachers_used(load_spec(TINY, ["guidance.policy=single"])) == ["base"]
    assert teachers_used(load_spec(TINY, ["guidance.policy=stepwise"])) == ["base", "edit"]
    # the base teacher is held even when never picked (the worker loads it: anchor, evaluation)
    assert teachers_used(load_spec(TINY, ["guidance.policy=specialised", "mixture.t2i=0"])) == ["base", "edit"]
    assert nfe_estimate(load_spec(TINY, ["guidance.policy=specialised", "mixture.t2i=0"])).teachers_used == ["edit"]
    assert teachers_used(load_spec(TINY, ["guidance.policy=stepwise", "mixture.edit=0"])) == ["base"]
    single = plan(load_spec(TINY, ["guidance.policy=single"]))
    assert [c.name for c in single.components if c.role == "teacher"] == ["teacher base"]


@pytest.mark.parametrize("path", [TINY, QWEN], ids=["tiny", "qwen"])
def test_plan_counts_the_teachers_the_worker_holds_in_every_ablation_cell(path):
    base = load_spec(path)
    for factor, levels in base.ablations.items():
        for level, overrides in levels.items():
            spec = load_spec(path, overrides)
            rows = [c.name.removeprefix("teacher ") for c in plan(spec).components if c.role == "teacher"]
            assert rows == spec.teachers_held(), (factor, level)


def test_evaluation_adds_no_whole_copies():
    # the end-of-run evaluation is data-parallel on the engines: the plan is the same with or without it
    on, off = plan(load_spec(QWEN)), plan(load_spec(QWEN, ["eval.enabled=false"]))
    assert on.total_gb == off.total_gb and on.model_states_gb == off.model_states_gb


def test_local_pipeline_folder_is_read_and_unknown_paths_are_user_errors(tmp_path):
    spec = load_spec(TINY)
    cfg = dict(tiny_configs(spec.model.tiny)["transformer"], num_layers=spec.model.tiny.num_layers + 1)
    folder = tmp_path / "teacher"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps(cfg))
    result = plan(load_spec(TINY, [f"teachers.base.path={folder}", "guidance.policy=single"]))
    assert _row(result, "teacher base").size.total > _row(plan(spec), "teacher base").size.total
    assert "text encoder" not in [c.name for c in result.components]  # the folder has none
    with pytest.raises(UserError, match=r"teachers\.base\.path: '/nonexistent/x'"):
        plan(load_spec(TINY, ["teachers.base.path=/nonexistent/x"]))


def test_plan_counts_the_activation_memory_the_spec_trains_with():
    from flashctl.plan import plan

    gpu, cpu = plan(load_spec(QWEN)), plan(load_spec(TINY))
    assert gpu.gradient_checkpointing and not cpu.gradient_checkpointing  # default: on for CUDA only
    assert plan(load_spec(TINY, ["distill.gradient_checkpointing=true"])).gradient_checkpointing
    assert not plan(load_spec(QWEN, ["distill.gradient_checkpointing=false"])).gradient_checkpointing
    assert gpu.total_ckpt_gb < gpu.total_gb


def test_zero3_bf16_formula_by_hand_for_a_small_config():
    """The per-rank bytes bench/plan_vs_measured.py measured after a DMD2 round (medium model, CPU,
    1 and 2 ranks), written out for a 1000-parameter model at 2 ranks."""
    from flashctl.plan import ModelSize

    size = ModelSize(total=1000, largest_layer=100, source="hand")
    cpu = trainable_memory("critic", size, 3, "bf16", 2, 1, device="cpu")
    assert cpu.params_gb * 1024**3 == 2 * 1000 / 2  # its bf16 partition
    assert cpu.grads_gb * 1024**3 == 2 * 1000 / 2  # bf16 gradient partition (not fp32)
    assert cpu.optim_gb * 1024**3 == (4 + 8) * 1000 / 2  # fp32 master + Adam moments
    # a gathered layer + its gradient, and the reduce bucket's touched part: the whole model's grads
    assert cpu.working_gb * 1024**3 == 2 * 2 * 100 + 2 * 1000
    assert cpu.step_gb * 1024**3 == 12 * 1000 / 2  # fp32 grad copy + sqrt + quotient (CPU AdamW)
    gpu = trainable_memory("critic", size, 3, "bf16", 2, 1, reduce_bucket_size=300, device="cuda")
    assert gpu.working_gb * 1024**3 == 2 * 2 * 100 + 2 * 300  # the whole bucket is allocated on a GPU
    assert gpu.step_gb * 1024**3 == 8 * 1000 / 2
    fp32 = trainable_memory("critic", size, 3, "fp32", 2, 1, device="cpu")
    assert (fp32.params_gb, fp32.grads_gb, fp32.optim_gb) == pytest.approx(
        (4 * 500 / 1024**3, 4 * 500 / 1024**3, 8 * 500 / 1024**3))  # no master copy in fp32


def test_teacher_shard_divides_teachers_by_the_node_or_the_world_by_hand():
    """`deepspeed.teacher_shard`: a partitioned teacher holds 1/(GPUs per node) per GPU under `node`,
    1/(all GPUs) under `world`; student and critic are over the world either way."""
    from flashctl.plan import ModelSize, frozen_memory

    size = ModelSize(total=1000, largest_layer=100, source="hand")
    row = frozen_memory("teacher base", "teacher", size, "bf16", 4, True, within=" per node")
    assert row.params_gb * 1024**3 == 2 * 1000 / 4  # bf16 partition over the node's 4 GPUs
    assert row.working_gb * 1024**3 == 2 * 100  # one gathered layer
    assert row.placement == "ZeRO-3 /4 per node"

    n = model_size(QWEN_IMAGE_TRANSFORMER, "transformer", "t").total
    launch = ["launch.nnodes=4", "launch.nproc_per_node=4", "launch.slurm.gpus_per_node=4"]
    node = plan(load_spec(QWEN, [*launch, "deepspeed.teacher_shard=node"]))
    world = plan(load_spec(QWEN, [*launch, "deepspeed.teacher_shard=world"]))
    for result, shard, label in ((node, 4, "ZeRO-3 /4 per node"), (world, 16, "ZeRO-3 /16")):
        for name in ("teacher base", "teacher t2i"):
            assert _row(result, name).params_gb * 1024**3 == pytest.approx(2 * n / shard)
            assert _row(result, name).placement == label
        assert _row(result, "student").params_gb * 1024**3 == pytest.approx(2 * n / 16)
    # node minus world = the two teachers' extra partitions: 2 teachers x 2 B x n x (1/4 - 1/16)
    extra = (node.model_states_gb - world.model_states_gb) * 1024**3
    assert extra == pytest.approx(2 * 2 * n * (1 / 4 - 1 / 16))
    assert any("deepspeed.teacher_shard=world" in note and "GiB" in note for note in node.notes)
    assert any("deepspeed.teacher_shard=node" in note for note in world.notes)
    one_node = load_spec(QWEN, ["launch.nnodes=1", "deepspeed.teacher_shard=node"])
    one_world = load_spec(QWEN, ["launch.nnodes=1", "deepspeed.teacher_shard=world"])
    assert one_node.teacher_shard_ranks() == 8 == one_world.teacher_shard_ranks()  # one node: the same
