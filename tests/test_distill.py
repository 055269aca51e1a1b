"""`flashctl distill`: 2-rank DeepSpeed ZeRO-3 DMD2 runs on CPU, export, resume, guidance policies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import EXPERIMENTS, REPO, run_cli

SPEC = str(EXPERIMENTS / "tiny-cpu.yaml")


def test_dry_run_prints_launch_and_config_without_writing(tiny_world, tmp_path):
    res = run_cli(["distill", SPEC, *tiny_world["spec_args"], f"run.out_dir={tmp_path}/runs", "--dry-run"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "torch.distributed.run" in res.stdout and "--nproc_per_node=2" in res.stdout
    assert "flashctl.distill.worker" in res.stdout
    assert '"stage": 3' in res.stdout and '"train_batch_size": 4' in res.stdout  # 2 micro x 1 accum x 2 ranks
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "override, field",
    [("data.root=/nonexistent/shards", "data.root"), ("teachers.base.path=/nonexistent/teacher", "teachers.base.path")],
)
def test_bad_inputs_fail_before_launching(tiny_world, tmp_path, override, field):
    res = run_cli(["distill", SPEC, *tiny_world["spec_args"], f"run.out_dir={tmp_path}/runs", override], cwd=tmp_path)
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and field in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


def test_a_checkpoint_of_other_teachers_is_not_resumed(tiny_world, tmp_path):
    """A run dir records `inputs_digest`; once its teacher is retrained in place (same path, same
    spec hash), resuming its checkpoint is refused in one line; a copy of the same weights is not
    a change, and --fresh starts over."""
    import shutil

    from flashctl.distill.job import INPUTS_FILE, inputs_digest, prepare_run
    from flashctl.spec import load_spec

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_world["teacher"], teacher)
    args = [*tiny_world["spec_args"], f"run.out_dir={tmp_path}/runs", f"teachers.base.path={teacher}",
            f"teachers.edit.path={teacher}"]
    prep = prepare_run(load_spec(SPEC, args))  # writes the run dir, launches nothing
    digest = json.loads((prep.run_dir / INPUTS_FILE).read_text())["digest"]
    assert digest == inputs_digest(load_spec(SPEC, args))
    (prep.run_dir / "checkpoints" / "latest").mkdir(parents=True)  # as if it had trained

    shutil.rmtree(teacher)
    shutil.copytree(tiny_world["teacher"], teacher)  # the same weights, new files and mtimes
    ok = run_cli(["distill", SPEC, *args, "--dry-run"], cwd=tmp_path)
    assert ok.returncode == 0 and "(resumes its checkpoint)" in ok.stdout, ok.stderr

    weights = next(teacher.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # retrained in place
    weights.write_bytes(bytes(data))
    res = run_cli(["distill", SPEC, *args, "--dry-run"], cwd=tmp_path)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert str(prep.run_dir.name) in lines[0] and "other teachers' files or data" in lines[0]
    assert "--fresh" in lines[0] and (prep.run_dir / "checkpoints" / "latest").is_dir()  # nothing lost


@pytest.mark.slow
def test_two_rank_zero3_run_exports_a_diffusers_student(tiny_world, tmp_path):
    from diffusers import QwenImagePipeline

    # every eval T2I prompt leaves attributes open: diversity over 2 seeds per model
    args = ["distill", SPEC, *tiny_world["spec_args"], f"run.out_dir={tmp_path}/runs", "run.name=e2e",
            "data.open_attributes=1.0", "eval.diversity_seeds=2", "distill.sample_every=2", "distill.sample_rows=2"]
    res = run_cli(args, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "runs" / "e2e"
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 4
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert sorted(p.name for p in (run / "checkpoints" / "step-00000004").iterdir()) >= ["critic", "student"]

    # the exported student is a diffusers pipeline folder that diffusers itself samples in 4 steps
    pipe = QwenImagePipeline.from_pretrained(run / "student")
    assert pipe.scheduler.config.use_dynamic_shifting is False and pipe.scheduler.config.shift == 3.0
    image = pipe("a red circle at the top left", height=32, width=32, num_inference_steps=4,
                 true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    # the export (gathered layer by layer, written by rank 0) equals zero_to_fp32 of the last checkpoint
    from flashctl.distill.checkpoint import export_fp32, load_fp32

    consolidated = load_fp32(export_fp32(run / "checkpoints", "student", tmp_path / "consolidated", max_shard_size="200KB"))
    assert len(list((tmp_path / "consolidated").glob("model-*.safetensors"))) > 1  # sharded, with its index
    exported = pipe.transformer.state_dict()
    assert consolidated.keys() == exported.keys()
    assert all(torch.equal(consolidated[k], exported[k]) for k in consolidated)
    # the student moved away from its teacher initialisation
    teacher = QwenImagePipeline.from_pretrained(tiny_world["teacher"]).transformer.state_dict()
    assert any(not torch.equal(teacher[k], exported[k]) for k in exported)

    summary = json.loads((run / "summary.json").read_text())
    for key in ("eval/student/t2i_acc", "eval/teacher/edit_acc", "eval/teacher_fast/nfe", "eval/speedup"):
        assert key in summary["eval"]
    # teacher: 3 steps with CFG = 6 network evaluations; student: 4 steps, no CFG
    assert summary["eval"]["eval/teacher/nfe"] == 6 and summary["eval"]["eval/student/nfe"] == 4
    # the evaluation ran data-parallel: each rank sampled about half of the 6 eval rows
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["world_size"] == 2 and [r["rank"] for r in results["ranks"]] == [0, 1]
    assert sum(r["rows"] for r in results["ranks"]) == 6 and all(2 <= r["rows"] <= 4 for r in results["ranks"])
    assert len(list((run / "eval" / "images" / "student").glob("*.png"))) == 6
    assert "eval rows per rank: 3, 3" in (run / "train.log").read_text()
    for name in ("teacher", "teacher_fast", "student"):
        div = results["models"][name]["diversity"]
        assert div["seeds"] == 2 and div["images"] == 2 * div["open_rows"] > 0
        assert f"eval/{name}/diversity/valid" in summary["eval"]
    # the teacher's evaluation is kept for the other runs (ablation cells) of this out_dir
    assert [p.name.startswith("teacher-") for p in (tmp_path / "runs" / "eval-cache").iterdir()] == [True]

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tiny_world['root']}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["flashctl-tiny"], filter_string="attributes.run_name = 'e2e'")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    row = runs.iloc[0]
    assert row["params.distill.student_steps"] == "4" and row["params.guidance.policy"] == "stepwise"
    assert row["metrics.train/loss_critic"] > 0 and row["metrics.eval/student/nfe"] == 4
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(row["run_id"], "train/loss_generator")
    assert [m.step for m in history] == [1, 2, 3, 4]
    run_info = client.get_run(row["run_id"])
    assert run_info.inputs.dataset_inputs, "the dataset manifest digest is the run's input"
    assert len(client.get_metric_history(row["run_id"], "eval/student/t2i_acc")) == 1
    # the periodic samples' curve starts at the student as initialised, each point with its row count
    from flashctl.track import SAMPLE_ACC, SAMPLE_N

    for task in ("t2i", "edit"):
        assert sorted(m.step for m in client.get_metric_history(row["run_id"], SAMPLE_ACC[task])) == [0, 2, 4]
        assert {m.value for m in client.get_metric_history(row["run_id"], SAMPLE_N[task])} == {2.0}

    # a finished run is not redone: no export, no evaluation, nothing logged again
    written = {p: p.stat().st_mtime_ns for p in (run / "eval" / "results.json", run / "summary.json", run / "student")}
    logged = len((run / "train.log").read_text())
    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (run / "train.log").read_text()[logged:]  # what the workers printed this time
    assert "nothing to do" in log and "evaluating" not in log and "exporting" not in log
    assert {p: p.stat().st_mtime_ns for p in written} == written
    # killed after the evaluation wrote its results but before the run was finished: the restart
    # keeps the export and the results, logs them and finishes
    (run / "summary.json").unlink()
    logged = len((run / "train.log").read_text())
    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (run / "train.log").read_text()[logged:]
    assert "evaluation not repeated" in log and "keeping" in log and "exporting" not in log
    assert (run / "eval" / "results.json").stat().st_mtime_ns == written[run / "eval" / "results.json"]
    assert (run / "student").stat().st_mtime_ns == written[run / "student"]
    assert json.loads((run / "summary.json").read_text())["eval"] == summary["eval"]


def _student_weights(run: Path) -> dict[str, torch.Tensor]:
    """The exported student's transformer tensors (every shard of run/student/transformer)."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted((run / "student" / "transformer").glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, "the job ended before writing its first checkpoint"
        assert time.time() - t0 < timeout, f"no {path} after {timeout}s"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkill_and_resume_ends_with_the_uninterrupted_weights(tiny_world, tmp_path):
    args = [*tiny_world["spec_args"], f"run.out_dir={tmp_path}/runs", "eval.enabled=false", "tracking.enabled=false"]
    ref = run_cli(["distill", SPEC, *args, "run.name=straight"], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]

    cmd = [sys.executable, "-m", "flashctl.cli", "distill", SPEC, *args, "run.name=killed"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run = tmp_path / "runs" / "killed"
    _wait_for(run / "checkpoints" / "latest", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: launcher and both ranks, no clean-up
    proc.wait()
    assert not (run / "student").exists()

    resumed = run_cli(["distill", SPEC, *args, "run.name=killed"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] >= 2
    a = _student_weights(tmp_path / "runs" / "straight")
    b = _student_weights(run)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff == 0.0, f"resumed student differs from the uninterrupted one by {diff}"


PROBE = r"""
import json, sys
from pathlib import Path
from flashctl.distill.engine import init_distributed
from flashctl.distill.worker import DistillJob
from flashctl.spec import load_spec
spec = load_spec(sys.argv[1], sys.argv[3:])
info = init_distributed("cpu")
job = DistillJob(spec, Path(sys.argv[2]), info)
out = []
for step in range(int(spec.distill.steps)):
    m = job.round(step)
    out.append({k: m[k] for k in ("train/task_edit", "train/student_step", "train/teacher_specialised",
                                  "train/loss_generator", "train/loss_critic")})
print("PROBE" + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["single", "specialised", "stepwise"])
def test_guidance_policy_chooses_the_real_score_teacher(tiny_world, tmp_path, policy):
    """One rank, real engines: each policy trains, and the teacher behind the real score is
    the one the policy names for the step's task and student step."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    args = [*tiny_world["spec_args"], f"guidance.policy={policy}", "distill.steps=8", "mixture.t2i=1",
            "mixture.edit=1", "distill.batch_size=1"]
    res = subprocess.run([sys.executable, str(probe), SPEC, str(tmp_path / "run"), *args], env=env,
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rounds = json.loads(res.stdout.split("PROBE", 1)[1])
    assert {r["train/task_edit"] for r in rounds} == {0.0, 1.0}, "both tasks drawn in 8 steps at 5:5"
    for r in rounds:
        edit, k, used = r["train/task_edit"] == 1.0, int(r["train/student_step"]), r["train/teacher_specialised"] == 1.0
        expected = {"single": False, "specialised": edit, "stepwise": edit and k in (2, 3)}[policy]
        assert used == expected, (policy, r)
        assert r["train/loss_critic"] > 0 and torch.isfinite(torch.tensor(r["train/loss_generator"]))
