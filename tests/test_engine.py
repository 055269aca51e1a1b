"""DeepSpeed plumbing: config numbers, launch commands, checkpoint pointer, and a real 2-rank
ZeRO-3 run on CPU (gloo) that is interrupted by SIGTERM, resumed, and compared bit-for-bit
with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flashctl.distill import checkpoint as ck
from flashctl.distill import engine as eng
from flashctl.errors import UserError
from flashctl.launch import COLLECTIVE_WARNING_FILTER, local
from flashctl.spec import ExperimentSpec
from flashctl.system import free_port

TESTS = Path(__file__).resolve().parent


def spec_with(**sections) -> ExperimentSpec:
    return ExperimentSpec(**sections)


def _walk(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


# --- ds_config ----------------------------------------------------------------------------


def test_ds_config_computes_every_number():
    spec = spec_with(distill={"batch_size": 3, "grad_accum": 5}, deepspeed={"gradient_clipping": 0.5})
    cfg = eng.ds_config(spec, lr=4e-5, world_size=8, export=False)
    assert cfg["train_batch_size"] == 3 * 5 * 8
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 5
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"]["type"] == "AdamW"
    assert cfg["optimizer"]["params"]["lr"] == 4e-5
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert "auto" not in [v for v in _walk(cfg) if isinstance(v, str)]
    json.dumps(cfg)  # plain JSON, as DeepSpeed's config file would be


def test_ds_config_export_precision_offload_and_copies():
    spec = spec_with(
        deepspeed={"precision": "bf16", "offload_optimizer": "cpu", "offload_param": "cpu"},
        launch={"device": "cuda"},
    )
    cfg = eng.ds_config(spec, lr=1e-5, world_size=2, export=True)
    zero = cfg["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] is True
    assert cfg["optimizer"]["params"]["torch_adam"] is False  # offload -> DeepSpeed CPUAdam
    # ZeRO knobs the spec leaves unset are left to DeepSpeed on every device; set ones pass through
    knobs = ("stage3_param_persistence_threshold", "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
             "reduce_bucket_size", "memory_efficient_linear")
    cpu = eng.ds_config(spec_with(), lr=1e-5, world_size=2)
    assert not any(k in zero or k in cpu["zero_optimization"] for k in knobs)
    tuned = eng.ds_config(spec_with(deepspeed={"param_persistence_threshold": 0, "prefetch_bucket_size": 7,
                                               "max_live_parameters": 8, "reduce_bucket_size": 9,
                                               "memory_efficient_linear": False}), 1e-5, 2)
    assert [tuned["zero_optimization"][k] for k in knobs] == [0, 7, 8, 9, False]
    # two engines never share a dict; a frozen copy has no optimizer
    a, b = eng.ds_config(spec_with(), 1e-5, 2), eng.ds_config(spec_with(), 2e-5, 2)
    assert a["optimizer"] is not b["optimizer"]
    frozen = eng.frozen_config(cfg)
    assert "optimizer" not in frozen and "offload_optimizer" not in frozen["zero_optimization"]
    assert "optimizer" in cfg


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision,offload", [("fp32", "none"), ("bf16", "cpu")])
def test_deepspeed_parses_our_config(monkeypatch, stage, precision, offload):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    offload = offload if stage else "none"
    spec = spec_with(
        distill={"batch_size": 2, "grad_accum": 3},
        deepspeed={"zero_stage": stage, "precision": precision, "offload_optimizer": offload},
    )
    parsed = DeepSpeedConfig(eng.ds_config(spec, 1e-4, world_size=1, export=True))  # no process group: 1 rank
    assert (parsed.train_batch_size, parsed.gradient_accumulation_steps) == (6, 3)
    assert parsed.zero_optimization_stage == stage
    assert parsed.gradient_clipping == 1.0
    # unset knobs: DeepSpeed's own defaults (the values DeepSpeedSpec's docstrings quote)
    assert parsed.zero_config.param_persistence_threshold == eng.DEEPSPEED_PERSISTENCE_THRESHOLD


def test_warmup_spans_the_same_generator_steps_for_student_and_critic():
    spec = spec_with(distill={"warmup_steps": 20, "critic_updates": 5, "lr_generator": 5e-4})
    assert (eng.warmup_updates_for(spec, "student"), eng.warmup_updates_for(spec, "critic")) == (20, 100)
    dmd = spec_with(distill={"warmup_steps": 20, "objective": "dmd"})
    assert eng.warmup_updates_for(dmd, "critic") == 20  # DMD: one critic update per generator step
    accum = spec_with(distill={"warmup_steps": 20, "critic_updates": 5, "grad_accum": 3})
    # an engine updates once per 3 micro-steps: 20 generator steps are 7 student and 34 critic updates
    assert (eng.warmup_updates_for(accum, "student"), eng.warmup_updates_for(accum, "critic")) == (7, 34)
    cfg = eng.ds_config(spec, lr=5e-4, world_size=2, warmup_updates=20)
    assert cfg["scheduler"] == {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 5e-4,
                                                               "warmup_num_steps": 20, "warmup_type": "linear"}}
    assert "scheduler" not in eng.ds_config(spec_with(), lr=5e-4, world_size=2)  # 0: no scheduler at all
    assert "scheduler" not in eng.frozen_config(cfg)


def test_ds_config_rejects_impossible_settings():
    with pytest.raises(UserError, match="deepspeed.offload_param"):
        eng.ds_config(spec_with(deepspeed={"zero_stage": 2, "offload_param": "cpu"}), 1e-5, 1)
    with pytest.raises(UserError, match="deepspeed.precision"):
        eng.ds_config(spec_with(deepspeed={"precision": "fp16"}), 1e-5, 1)
    with pytest.raises(ValueError):
        eng.ds_config(spec_with(), 1e-5, 0)


# --- launch commands ------------------------------------------------------------------------


def test_torchrun_and_deepspeed_commands():
    spec = spec_with(launch={"nproc_per_node": 2, "master_port": 29999})
    cmd = local.torchrun_command(spec, "flashctl.distill.worker", ["--spec", "s.yaml"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in cmd and "--master_port=29999" in cmd
    assert cmd[-4:] == ["-m", "flashctl.distill.worker", "--spec", "s.yaml"]
    ds = local.deepspeed_command(spec, "flashctl.distill.worker", ["--x"])
    assert ds[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert "--num_gpus=2" in ds and "--no_local_rank" in ds
    assert ds[-3:] == ["--module", "flashctl.distill.worker", "--x"]
    assert not any(a.startswith("--include") for a in ds)
    with pytest.raises(UserError, match="launch.hostfile"):
        local.deepspeed_command(spec_with(launch={"backend": "hostfile"}), "m", [])


def test_env_for_cpu_job():
    spec = spec_with(launch={"nproc_per_node": 2, "master_port": 29123})
    env = local.env_for(spec, base={"PATH": "/bin", "PYTHONWARNINGS": "default"})
    assert env["DS_ACCELERATOR"] == "cpu"
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "29123"
    assert env["PYTHONWARNINGS"] == "default," + COLLECTIVE_WARNING_FILTER
    assert env["TOKENIZERS_PARALLELISM"] == "false" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"] == "/bin"
    assert local.env_for(spec, base={"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"
    assert "DS_ACCELERATOR" not in local.env_for(spec_with(launch={"device": "cuda"}), base={})
    # A `cpu` left over from a CPU session would keep DeepSpeed off the GPU.
    assert "DS_ACCELERATOR" not in local.env_for(spec_with(launch={"device": "cuda"}), base={"DS_ACCELERATOR": "cpu"})


def test_run_local_streams_and_logs(tmp_path, capfd):
    code = "import sys; print('hello'); print('world', file=sys.stderr); sys.exit(3)"
    rc = local.run_local([sys.executable, "-c", code], os.environ, log_path=tmp_path / "log.txt")
    assert rc == 3
    assert sorted((tmp_path / "log.txt").read_text().split()) == ["hello", "world"]
    assert "hello" in capfd.readouterr().out


# --- checkpoint pointer, trainer state, stop flag (single process) -----------------------


def test_latest_tag_ignores_unpointed_dirs(tmp_path):
    assert ck.latest_tag(tmp_path) is None
    (tmp_path / "step-00000010").mkdir()  # a save that never completed
    assert ck.latest_tag(tmp_path) is None
    (tmp_path / "step-00000005").mkdir()
    (tmp_path / "latest").write_text("step-00000005")
    assert ck.latest_tag(tmp_path) == "step-00000005"
    (tmp_path / "latest").write_text("step-00000099")
    with pytest.raises(UserError, match="does not exist"):
        ck.latest_tag(tmp_path)


def test_prune_keeps_newest_and_latest(tmp_path):
    for s in (1, 2, 3, 4):
        (tmp_path / ck.tag_for_step(s)).mkdir()
    (tmp_path / "latest").write_text(ck.tag_for_step(3))
    assert ck.prune_checkpoints(tmp_path, keep=2) == [ck.tag_for_step(1), ck.tag_for_step(2)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003", "step-00000004"]


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = ck.capture_rng_state()
    torch.save(state, tmp_path / "s.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ck.restore_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == expected


def test_trainer_state_must_be_plain_data(tmp_path):
    with pytest.raises(TypeError, match="ndarray"):
        ck.save_checkpoint(tmp_path, "step-00000001", {}, {"bad": np.zeros(2)})


def test_stop_request_catches_sigterm():
    before = signal.getsignal(signal.SIGTERM)
    stop = ck.install_stop_handler()
    try:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop() and stop.signum == signal.SIGTERM
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before


# --- real 2-rank ZeRO-3 runs (torchrun + deepspeed launcher, CPU, gloo) ------------------


def _launch(out: Path, args: list[str], launcher: str = "torchrun", nproc: int = 2) -> None:
    spec = spec_with(launch={"launcher": launcher, "nproc_per_node": nproc, "master_port": free_port()})
    cmd = local.launch_command(spec, "sigterm_resume_worker", ["--out", str(out), *args])
    env = local.env_for(spec)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    out.mkdir(parents=True, exist_ok=True)
    rc = local.run_local(cmd, env, log_path=out / f"log-{launcher}.txt")
    assert rc == 0, (out / f"log-{launcher}.txt").read_text()[-3000:]


def _stats(out: Path, rank: int) -> dict:
    return json.loads((out / f"stats_rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    _launch(out, ["--steps", "6"])
    return out


def _assert_complete(ckpt: Path, world: int) -> str:
    tag = (ckpt / "latest").read_text()
    for r in range(world):
        assert list((ckpt / tag / "student").glob(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        assert list((ckpt / tag / "student").glob(f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))
        assert (ckpt / tag / "trainer_state" / f"rank_{r:05d}.pt").is_file()
    assert not list(ckpt.glob(".latest.*"))  # no temp file left behind
    return tag


@pytest.mark.slow
def test_zero3_partitions_and_consolidates(uninterrupted):
    ckpt = uninterrupted / "ckpt"
    assert _assert_complete(ckpt, 2) == "step-00000006"
    s0, s1 = _stats(uninterrupted, 0), _stats(uninterrupted, 1)
    # ZeRO-3 with 2 ranks: each rank holds half of the parameters (student and frozen teacher)
    assert s0["local_param_bytes"] == s1["local_param_bytes"] == s0["full_param_bytes"] // 2
    assert s0["teacher_local_param_bytes"] == s0["full_param_bytes"] // 2
    assert s0["losses"][-1] < s0["losses"][0]  # it trained
    # distill.warmup_steps: DeepSpeed's WarmupLR, linear to the rate in 4 increments, then constant;
    # its count starts at 0 on the first update, so the first two run at rate 0 (Adam's moments
    # gather while nothing moves)
    assert s0["lrs"] == pytest.approx([0.0, 0.0, 0.25e-2, 0.5e-2, 0.75e-2, 1e-2])
    live = load_file(str(uninterrupted / "final_params.safetensors"))
    consolidated = ck.load_fp32(uninterrupted / "consolidated")
    assert live.keys() == consolidated.keys()
    for k in live:
        assert torch.equal(live[k], consolidated[k]), k


@pytest.mark.slow
def test_sigterm_checkpoint_and_resume_match_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "interrupted"
    _launch(out, ["--steps", "6", "--sigterm-at", "3"])  # only rank 0 gets the signal
    ckpt = out / "ckpt"
    assert _assert_complete(ckpt, 2) == "step-00000003"
    assert [_stats(out, r)["end_step"] for r in (0, 1)] == [3, 3]  # both ranks stopped together
    assert not (out / "final_params.safetensors").exists()
    # debris of a save that never completed: ignored on resume, replaced when step 6 is saved
    (ckpt / "step-00000006" / "student").mkdir(parents=True)
    (ckpt / "step-00000006" / "student" / "junk").write_text("partial")

    _launch(out, ["--steps", "6"], launcher="deepspeed")
    assert [_stats(out, r)["start_step"] for r in (0, 1)] == [3, 3]
    assert _assert_complete(ckpt, 2) == "step-00000006"
    assert not (ckpt / "step-00000006" / "student" / "junk").exists()
    # same losses for steps 4-6 and identical final weights as the uninterrupted run
    assert _stats(out, 0)["losses"] == _stats(uninterrupted, 0)["losses"][3:]
    assert _stats(out, 0)["lrs"] == _stats(uninterrupted, 0)["lrs"][3:]  # the warm-up resumed where it stopped
    resumed = load_file(str(out / "final_params.safetensors"))
    straight = load_file(str(uninterrupted / "final_params.safetensors"))
    for k in straight:
        assert torch.allclose(resumed[k], straight[k], rtol=0, atol=1e-6), k


def test_a_run_never_compiles_the_comm_op_itself(tmp_path):
    """Without a prebuilt shm op (an empty extension cache) the process group starts on gloo at
    once and says so: no compile at run time, so no build that fails on a path with spaces and no
    lock file a killed build leaves for every later run to wait on."""
    import subprocess

    cache = tmp_path / "no ops here"
    code = ("from flashctl.distill.engine import init_distributed; import torch; info = init_distributed('cpu'); "
            "t = torch.ones(3); torch.distributed.all_reduce(t); print('sum', t.tolist(), info.world_size)")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sum [1.0, 1.0, 1.0] 1" in proc.stdout
    assert "CPU comm op is not built" in proc.stderr and "allreduce goes through gloo" in proc.stderr
    assert not [p for p in cache.rglob("*") if p.is_file()]  # nothing was built, nothing locked


def test_deepspeed_imported_before_the_cpu_accelerator_is_refused():
    """DeepSpeed picks its accelerator once, at import: `select_accelerator` (what the engine and
    the op builder call) says so plainly instead of a CUDA error deep inside DeepSpeed later."""
    import subprocess

    code = ("import deepspeed; from flashctl.distill.engine import init_distributed\n"
            "try:\n    init_distributed('cpu')\nexcept RuntimeError as exc:\n    print(exc)")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("deepspeed was imported before DS_ACCELERATOR=cpu was set")
