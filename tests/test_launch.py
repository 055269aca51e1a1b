"""Cluster launch: DeepSpeed hostfile (multi-node, checked over loopback) and Slurm (checked on a
real one-node Slurm started by .ci/slurm/setup.sh, or skipped with its reason)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXPERIMENTS, bash_n
from flashctl.errors import UserError
from flashctl.launch import hostfile as hf
from flashctl.launch import slurm
from flashctl.spec import ExperimentSpec, load_spec
from flashctl.system import free_port

TOY_WORKER = Path(__file__).with_name("multinode_zero3_probe.py")


def _spec(**launch) -> ExperimentSpec:
    return ExperimentSpec.model_validate({"run": {"name": "t"}, "launch": launch})


# --------------------------------------------------------------------------------------------
# Hostfile parsing and filters


def test_parse_hostfile_accepts_deepspeed_format(tmp_path):
    f = tmp_path / "hostfile"
    f.write_text("# cluster\nworker-0 slots=8\n\n  worker-1   slots=4  # half node\n")
    assert hf.parse_hostfile(f) == [("worker-0", 8), ("worker-1", 4)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a slots=2\nb slots=0\n", r"hostfile:2: host 'b' has slots=0"),
        ("a slots=2\nb slots=two\n", r"hostfile:2: slots='two' is not a whole number"),
        ("a slots=2\nb\n", r"hostfile:2: expected 'HOST slots=N'"),
        ("a slots=2\nb slots=2 gpus=1\n", r"hostfile:2: expected 'HOST slots=N'"),
        ("a slots=2\n# x\na slots=4\n", r"hostfile:3: host 'a' is listed twice \(first on line 1\)"),
        ("# nothing\n\n", r"hostfile: hostfile lists no hosts"),
    ],
)
def test_parse_hostfile_errors_name_file_and_line(tmp_path, text, message):
    f = tmp_path / "hostfile"
    f.write_text(text)
    with pytest.raises(UserError, match=message):
        hf.parse_hostfile(f)


def test_missing_hostfile_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="hostfile not found"):
        hf.parse_hostfile(tmp_path / "nope")


def test_include_exclude_follow_deepspeed_syntax():
    hosts = [("a", 4), ("b", 2), ("c", 2)]
    assert hf.select_resources(hosts) == {"a": [0, 1, 2, 3], "b": [0, 1], "c": [0, 1]}
    assert hf.select_resources(hosts, include="c@a:0,1") == {"a": [0, 1], "c": [0, 1]}
    assert list(hf.select_resources(hosts, include="c@a:0,1")) == ["a", "c"]  # hostfile order
    assert hf.select_resources(hosts, exclude="a:3@b") == {"a": [0, 1, 2], "c": [0, 1]}
    assert hf.world_size(hf.select_resources(hosts, exclude="a:3@b")) == 5
    for kwargs, message in [
        ({"include": "d"}, "'d' not found in hostfile"),
        ({"include": "b:5"}, "No slot '5'"),
        ({"include": "a", "exclude": "b"}, "mutually exclusive"),
        ({"exclude": "a@b@c"}, "no slots left"),
    ]:
        with pytest.raises(UserError, match=message):
            hf.select_resources(hosts, **kwargs)


def test_hostfile_must_match_spec_sizes(tmp_path):
    f = tmp_path / "hostfile"
    f.write_text("n0 slots=2\nn1 slots=1\n")
    spec = _spec(backend="hostfile", hostfile=str(f), nnodes=2, nproc_per_node=2, master_addr="10.0.0.1")
    with pytest.raises(UserError, match=r"launch.nproc_per_node: spec says 2 .* n1: 1 slot"):
        hf.deepspeed_command(spec, tmp_path / "run")
    with pytest.raises(UserError, match=r"launch.nnodes: spec says 2 but the hostfile selects 1"):
        hf.deepspeed_command(spec, tmp_path / "run", include="n0")


def test_deepspeed_command_lines(tmp_path, monkeypatch):
    f = tmp_path / "hostfile"
    f.write_text("n0 slots=2\nn1 slots=2\n")
    spec = _spec(backend="hostfile", hostfile=str(f), nnodes=2, nproc_per_node=2, master_port=29600)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(UserError, match="`pdsh` is not on PATH"):
        hf.deepspeed_command(spec, tmp_path / "run")
    (bin_dir / "pdsh").write_text("#!/bin/sh\n")  # the ssh launch path only needs pdsh to exist
    (bin_dir / "pdsh").chmod(0o755)
    with pytest.raises(UserError, match="launch.master_addr: 127.0.0.1 is a loopback address"):
        hf.deepspeed_command(spec, tmp_path / "run")
    spec.launch.master_addr = "10.1.2.3"
    cmd = hf.deepspeed_command(spec, tmp_path / "run")
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert f"--hostfile={f.resolve()}" in cmd and "--master_addr=10.1.2.3" in cmd and "--master_port=29600" in cmd
    assert cmd[-4:] == ["--module", "flashctl.distill.worker", "--run-dir", str((tmp_path / "run").resolve())]
    assert "--no_local_rank" in cmd and "--no_ssh" not in cmd
    one = hf.deepspeed_command(spec, tmp_path / "run", node_rank=1, no_ssh=True)
    assert one[one.index("--no_ssh") + 1] == "--node_rank=1"
    with pytest.raises(UserError, match="--node-rank: 2 must be in 0..1"):
        hf.deepspeed_command(spec, tmp_path / "run", node_rank=2, no_ssh=True)
    with pytest.raises(UserError, match="only meaningful with --no-ssh"):
        hf.deepspeed_command(spec, tmp_path / "run", node_rank=0)


def test_deepspeed_env_file(tmp_path):
    spec = _spec(backend="hostfile", device="cpu")
    base = {
        "MLFLOW_RUN_ID": "0123abcd",
        "HF_HOME": "/data/hf cache",
        "PYTHONPATH": "/src",
        "NCCL_DEBUG": "INFO",
        "HOME": "/root",
        "RANDOM_SETTING": "1",
    }
    env = hf.node_env(spec, base)
    assert env["MLFLOW_RUN_ID"] == "0123abcd" and env["HF_HOME"] == "/data/hf cache"
    assert env["NCCL_DEBUG"] == "INFO" and env["DS_ACCELERATOR"] == "cpu" and env["PYTHONPATH"] == "/src"
    assert "HOME" not in env and "RANDOM_SETTING" not in env
    # The spec's relative sqlite URI is made absolute: remote ranks start in another directory.
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{Path('mlflow.db').resolve()}"
    path = hf.write_deepspeed_env(tmp_path, env)
    assert path == tmp_path / ".deepspeed_env"
    lines = path.read_text().splitlines()
    # DeepSpeed's runner does `key, val = line.split('=', maxsplit=1)` on every line.
    assert dict(line.split("=", 1) for line in lines) == env
    with pytest.raises(ValueError, match="value of X contains"):
        hf.write_deepspeed_env(tmp_path, {"X": "a$b"})
    with pytest.raises(ValueError, match="not a valid environment variable name"):
        hf.write_deepspeed_env(tmp_path, {"A-B": "1"})


def test_deepspeed_runner_reads_the_env_file_named_by_launcher_env(tmp_path):
    spec = _spec(backend="hostfile", device="cpu")
    env = hf.launcher_env(spec, tmp_path / "run", base={"PATH": os.environ["PATH"], "MLFLOW_RUN_ID": "r1"})
    probe = (
        "import os\nfrom deepspeed.launcher import runner as r\n"
        "print(sorted({os.path.join(p, r.DEEPSPEED_ENVIRONMENT_NAME) for p in r.DEEPSPEED_ENVIRONMENT_PATHS}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str([env["DS_ENV_FILE"]])
    assert "MLFLOW_RUN_ID=r1" in Path(env["DS_ENV_FILE"]).read_text().splitlines()


# --------------------------------------------------------------------------------------------
# Two "nodes" on one machine: two launchers with --no_ssh and node ranks 0/1, ZeRO-3 over gloo.


def run_two_node_loopback(
    tmp_path: Path, worker: str, worker_args: list[str] | None, spec_data: dict | None = None, timeout: float = 420
) -> tuple[ExperimentSpec, Path, list[str]]:
    """Start node ranks 0 and 1 of a 2x1 hostfile job on this machine; returns (spec, run dir,
    logs). The lead can point `worker` at `flashctl.distill.worker` with a real run dir."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    data = {"run": {"name": "loopback", "out_dir": str(tmp_path / "runs")}, **(spec_data or {})}
    data["launch"] = {
        **data.get("launch", {}),
        "backend": "hostfile", "hostfile": str(hostfile), "nnodes": 2, "nproc_per_node": 1,
        "device": "cpu", "master_addr": "127.0.0.1", "master_port": free_port(),
    }  # fmt: skip
    spec = ExperimentSpec.model_validate(data)
    run_dir = spec.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    env = hf.launcher_env(spec, run_dir, base={**os.environ, "MLFLOW_RUN_ID": "loopback-run", "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    with contextlib.ExitStack() as stack:
        procs = []
        for rank in (0, 1):
            cmd = hf.deepspeed_command(spec, run_dir, node_rank=rank, no_ssh=True, worker=worker, worker_args=worker_args)
            log = stack.enter_context(open(tmp_path / f"node{rank}.log", "wb"))
            procs.append(
                subprocess.Popen(
                    cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True
                )
            )
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                for p in procs:  # each launcher leads its own process group (its ranks included)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                codes.append(None)
    logs = [(tmp_path / f"node{r}.log").read_text(errors="replace") for r in (0, 1)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    return spec, run_dir, logs


@pytest.mark.slow
def test_two_node_loopback_zero3_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "loopback"
    _, run_dir, _ = run_two_node_loopback(tmp_path, str(TOY_WORKER), ["--run-dir", str(run_dir), "--steps", "4"])
    results = [json.loads((run_dir / f"result-rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["node_rank"], r["local_rank"], r["world_size"]) for r in results] == [(0, 0, 0, 2), (1, 1, 0, 2)]
    # ZeRO-3: each rank holds about half of the parameters, and the gathered weights agree.
    for r in results:
        assert r["local_params"] < r["total_params"] and r["local_params"] >= r["total_params"] // 2
        assert r["losses"][-1] < r["losses"][0]
        assert r["env"] == {
            "MLFLOW_RUN_ID": "loopback-run",
            "MLFLOW_TRACKING_URI": f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}",
            "DS_ACCELERATOR": "cpu",
        }
    assert results[0]["checksum"] == pytest.approx(results[1]["checksum"], rel=0, abs=1e-9)
    assert (run_dir / ".deepspeed_env").is_file()


@pytest.mark.slow
def test_two_node_loopback_teacher_shard_node_keeps_a_whole_teacher_per_node(tiny_world, tmp_path, monkeypatch):
    """`deepspeed.teacher_shard`: on 2 nodes x 1 rank, a frozen ZeRO-3 teacher built within its node
    holds all its parameters on the node's one rank, over the world half of them; both give the
    same forward, bit for bit (the gathered weights are the same files' tensors)."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "loopback"
    args = ["--run-dir", str(run_dir), "--steps", "0", "--teacher", str(tiny_world["teacher"])]
    run_two_node_loopback(tmp_path, str(TOY_WORKER), args)
    results = [json.loads((run_dir / f"result-rank{r}.json").read_text())["teacher"] for r in (0, 1)]
    for r in results:
        node, world = r["node"], r["world"]
        assert (node["group_size"], world["group_size"]) == (1, 2)
        assert node["full_numel"] == world["full_numel"] > 10_000
        assert node["local_numel"] == node["full_numel"]  # the whole teacher on the node's rank
        # over the world: half, plus at most one element of padding per tensor
        assert world["full_numel"] / 2 <= world["local_numel"] <= world["full_numel"] / 2 + world["tensors"]
        assert node["output"] == world["output"] and any(v != 0 for v in node["output"])
        assert r["node_gather"]["output"] == node["output"]  # filled by each node's own rank 0
    assert results[0]["node"]["output"] == results[1]["node"]["output"]


# --------------------------------------------------------------------------------------------
# Slurm scripts


def test_sbatch_for_the_gpu_spec(tmp_path):
    spec = load_spec(EXPERIMENTS / "qwen-image-flash.yaml", [f"run.out_dir={tmp_path}"])
    argv = [sys.executable, "-m", "flashctl.distill.worker", "--run-dir", str(spec.run_dir())]
    # a DS_ACCELERATOR=cpu left in the login shell must not keep the GPU job off its GPUs
    script = slurm.render_sbatch(spec, spec.run_dir(), argv, {"MLFLOW_RUN_ID": "abc def", "DS_ACCELERATOR": "cpu"})
    bash_n(script, tmp_path)
    lines = script.splitlines()
    run_dir = spec.run_dir().resolve()
    for expected in (
        "#SBATCH --nodes=8", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --time=24:00:00",
        "#SBATCH --cpus-per-task=96", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@330",
        f"#SBATCH --output={run_dir}/slurm-%j.out", f"#SBATCH --error={run_dir}/slurm-%j.err",
        "export MLFLOW_RUN_ID='abc def'",
    ):  # fmt: skip
        assert expected in lines, expected
    srun = next(line for line in lines if line.startswith("srun --kill-on-bad-exit"))
    # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): it is passed explicitly
    assert srun.startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=96 ")
    assert '--nnodes "$SLURM_NNODES" --nproc_per_node 8 --rdzv_backend c10d' in srun
    assert '--rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"' in srun
    # Qwen-Image bf16: 2 engines x 14 B x 20.4B params over 8 nodes at 0.5 GiB/s -> 134 s of
    # writing + 120 s round + 60 s requeue = 314 -> 330 s lead; torchrun waits 330 - 60 = 270 s
    assert "--shutdown-timeout 270 " in srun
    assert srun.endswith(f"-m flashctl.distill.worker --run-dir {spec.run_dir()} &")
    assert "DS_ACCELERATOR" not in script and "--account" not in script
    # the hub weights are resolved once per node before the ranks start, which then read offline
    prefetch = lines.index(next(line for line in lines if "-m flashctl.launch.slurm prefetch" in line))
    assert lines[prefetch].startswith("srun --ntasks-per-node=1 --cpus-per-task=96 ")
    assert f"{run_dir}/spec.resolved.yaml" in lines[prefetch]
    assert lines.index("export HF_HUB_OFFLINE=1") == prefetch + 1 < lines.index(srun)


def test_stop_signal_lead_grows_with_the_checkpoint_and_must_fit_the_time_limit(tmp_path):
    qwen = load_spec(EXPERIMENTS / "qwen-image-flash.yaml")
    assert slurm.checkpoint_bytes(qwen) == pytest.approx(2 * 14 * 20.43e9, rel=0.01)
    assert slurm.signal_lead_s(qwen) == 330
    one_node = load_spec(EXPERIMENTS / "qwen-image-flash.yaml", ["launch.nnodes=1"])
    assert slurm.signal_lead_s(one_node) == 1260  # 533 GiB at 0.5 GiB/s = 1066 s + 180 s
    tiny = load_spec(EXPERIMENTS / "tiny-cpu.yaml", ["launch.backend=slurm"])
    assert 0 < slurm.checkpoint_bytes(tiny) < 1e9 and slurm.signal_lead_s(tiny) == 210  # 120 + 1 + 60 -> 210
    assert [slurm.time_limit_s(t) for t in ("30", "30:15", "04:00:00", "1-02", "1-02:03", "1-02:03:04", "UNLIMITED")] == [
        1800, 1815, 14400, 93600, 93780, 93784, None]
    short = load_spec(EXPERIMENTS / "qwen-image-flash.yaml", ["launch.nnodes=1", "launch.slurm.time=00:20:00"])
    with pytest.raises(UserError, match=r"launch.slurm.time: 00:20:00 .* 1260 s before the limit"):
        slurm.render_sbatch(short, tmp_path, ["true"])


def test_local_models_need_no_prefetch_step(tmp_path):
    spec = load_spec(EXPERIMENTS / "tiny-cpu.yaml", ["launch.backend=slurm", "launch.slurm.cpus_per_task=4"])
    assert slurm.hub_models(spec) == []
    script = slurm.render_sbatch(spec, tmp_path, ["true"])
    assert "prefetch" not in script and "HF_HUB_OFFLINE" not in script
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=4 " in script
    assert slurm.hub_models(load_spec(EXPERIMENTS / "qwen-image-flash.yaml")) == [
        "Qwen/Qwen-Image-Edit-2509", "Qwen/Qwen-Image"]


def test_sbatch_on_cpu_has_no_gpu_request_and_checks_gpu_counts(tmp_path):
    spec = _spec(backend="slurm", device="cpu", nproc_per_node=2)
    script = slurm.render_sbatch(spec, tmp_path, ["bash", "-c", "true"])
    bash_n(script, tmp_path)
    directives = [ln.split("=")[0] for ln in script.splitlines() if ln.startswith("#SBATCH")]
    assert not [d for d in directives if "gpu" in d or "gres" in d], directives
    assert "export DS_ACCELERATOR=cpu" in script and "--no-python bash -c true" in script
    written = slurm.write_sbatch(spec, tmp_path, ["bash", "-c", "true"])
    assert written == tmp_path / slurm.JOB_SCRIPT and os.access(written, os.X_OK) and written.read_text() == script
    bad = _spec(backend="slurm", device="cuda", nproc_per_node=8, slurm={"gpus_per_node": 4})
    with pytest.raises(UserError, match="launch.nproc_per_node: 8 ranks per node but launch.slurm.gpus_per_node is 4"):
        slurm.render_sbatch(bad, tmp_path, ["true"])


CELLS = [
    ("task-mixture=9:1", ["sh", "-c", 'echo "$0 $MLFLOW_RUN_ID" >> "$OUT/$FLASHCTL_CELL_ID.txt"', "it's"], {"MLFLOW_RUN_ID": "r0"}),
    ("task-mixture=7:3", ["sh", "-c", 'echo "$0 $MLFLOW_RUN_ID" >> "$OUT/$FLASHCTL_CELL_ID.txt"', "a b"], {"MLFLOW_RUN_ID": "r1"}),
    ("task-mixture=5:5", ["sh", "-c", 'echo "$0 $MLFLOW_RUN_ID" >> "$OUT/$FLASHCTL_CELL_ID.txt"', "$HOME"], {"MLFLOW_RUN_ID": "r2"}),
]  # fmt: skip


def test_array_script_and_cells_file(tmp_path):
    spec = _spec(backend="slurm", device="cpu", slurm={"array_parallel": 2, "cpus_per_task": 1})
    path = slurm.write_array(spec, CELLS, tmp_path / "grid", {"OUT": str(tmp_path)})
    script = path.read_text()
    bash_n(script, tmp_path)
    assert os.access(path, os.X_OK)
    assert "#SBATCH --array=0-2%2" in script.splitlines()
    assert f"#SBATCH --output={(tmp_path / 'grid').resolve()}/logs/%A_%a.out" in script
    assert len((tmp_path / "grid" / slurm.CELLS_FILE).read_text().splitlines()) == 3
    # The task body picks its cell by SLURM_ARRAY_TASK_ID; run it under plain bash (no Slurm).
    for task in (1, 2):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_JOB_ID": "1"}
        subprocess.run(["bash", str(path)], env=env, check=True, cwd=tmp_path, capture_output=True)
    assert (tmp_path / "task-mixture=7:3.txt").read_text() == "a b r1\n"
    assert (tmp_path / "task-mixture=5:5.txt").read_text() == "$HOME r2\n"  # quoted, not expanded
    assert not (tmp_path / "task-mixture=9:1.txt").exists()
    with pytest.raises(ValueError, match="without tabs"):
        slurm.cells_file_text([("a\tb", ["true"], {})])


def test_submit_without_sbatch_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="needs Slurm's `sbatch` command"):
        slurm.submit(tmp_path / "x.sbatch")


# --------------------------------------------------------------------------------------------
# Real Slurm (one node on this machine)


def _slurm_spec(**slurm_fields) -> ExperimentSpec:
    fields = {"cpus_per_task": 1, "time": "00:10:00", **slurm_fields}
    return _spec(backend="slurm", device="cpu", nproc_per_node=2, master_port=free_port(), slurm=fields)


@pytest.mark.slow
def test_sbatch_job_runs_to_completed(slurm_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ranks.txt"
    cmd = ["bash", "-c", f'echo "$RANK/$WORLD_SIZE $DS_ACCELERATOR $MLFLOW_RUN_ID $0" >> {out}', "$HOME"]
    script = slurm.write_sbatch(_slurm_spec(), tmp_path / "run", cmd, {"MLFLOW_RUN_ID": "m1"})
    job = slurm.submit(script)
    assert slurm.wait_for(job, timeout_s=120, poll_s=1) == "COMPLETED"
    assert sorted(out.read_text().splitlines()) == ["0/2 cpu m1 $HOME", "1/2 cpu m1 $HOME"]
    assert "flashctl: job" in (tmp_path / "run" / f"slurm-{job}.out").read_text()


@pytest.mark.slow
def test_array_runs_each_cell_once(slurm_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = _slurm_spec(array_parallel=2)
    job = slurm.submit(slurm.write_array(spec, CELLS, tmp_path / "grid", {"OUT": str(tmp_path)}))
    assert slurm.wait_for(job, timeout_s=120, poll_s=1) == "COMPLETED"
    assert len(slurm.job_states(job)) == 3
    assert (tmp_path / "task-mixture=9:1.txt").read_text() == "it's r0\n"
    assert (tmp_path / "task-mixture=7:3.txt").read_text() == "a b r1\n"
    assert (tmp_path / "task-mixture=5:5.txt").read_text() == "$HOME r2\n"


WORKER_SH = """\
#!/bin/bash
# Stands in for a rank: on SIGTERM it writes a "checkpoint" and exits 0.
trap 'touch "{d}/ckpt-$RANK"; exit 0' TERM
touch "{d}/started-$RANK"
for i in $(seq 1200); do sleep 0.1; done
"""


@pytest.mark.slow
def test_time_limit_signal_checkpoints_and_requeues(slurm_cluster, tmp_path, monkeypatch):
    """`--signal=B:USR1@...` is what Slurm sends before the limit; `scancel --batch --signal=USR1`
    sends the same now. The ranks must get SIGTERM (and checkpoint) and the job must be requeued."""
    monkeypatch.chdir(tmp_path)
    worker = tmp_path / "worker.sh"
    worker.write_text(WORKER_SH.format(d=tmp_path))
    worker.chmod(0o755)
    job = slurm.submit(slurm.write_sbatch(_slurm_spec(), tmp_path / "run", [str(worker)]))
    try:
        deadline = time.monotonic() + 90
        while len(list(tmp_path.glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(list(tmp_path.glob("started-*"))) == 2, slurm.job_states(job)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        deadline = time.monotonic() + 60
        restarts = "0"
        while time.monotonic() < deadline:
            info = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, check=False).stdout
            fields = dict(f.split("=", 1) for f in info.split() if "=" in f)
            restarts = fields.get("Restarts", "0")
            if restarts == "1":
                break
            time.sleep(1)
        log = "".join(p.read_text() for p in (tmp_path / "run").glob("slurm-*"))
        assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0", "ckpt-1"], log
        # Requeued: restarted once and not finished (PENDING until its begin time, then RUNNING).
        assert restarts == "1", (info, log)
        assert fields["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), (info, log)
    finally:
        subprocess.run(["scancel", job], capture_output=True, check=False)
