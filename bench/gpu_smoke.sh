#!/usr/bin/env bash
# GPU smoke test of `flashctl distill` (one CUDA GPU, a few minutes).
#
#   bash bench/gpu_smoke.sh            # from anywhere; runs in the repository root
#
# 1. checks for an NVIDIA GPU (nvidia-smi) and a CUDA-enabled torch;
# 2. creates .venv if there is none:
#        python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e .
#    On Linux x86_64 the PyPI torch wheel IS the CUDA build (it pulls the nvidia-* runtime
#    wheels, ~3 GB), so plain pip gives a GPU torch there. A venv made for CPU work
#    (torch 2.13.0+cpu from the CPU index) sees no GPU: the script stops and says how to
#    reinstall (pip install --force-reinstall torch==2.13.0, or the cuXYZ index of
#    download.pytorch.org matching the driver). Venv creation is not part of the time budget.
# 3. prepares 200 shapes rows and uses the shipped teacher (builtin:base) when
#    flashctl/assets/teachers/base/model_index.json exists, else builds a random tiny teacher
#    with the architecture of experiments/teacher-base.yaml (model.tiny);
# 4. runs `flashctl distill experiments/tiny-cpu.yaml ... launch.device=cuda
#    launch.nproc_per_node=1 deepspeed.precision=bf16 distill.steps=30 eval.enabled=false`
#    (torchrun, NCCL, DeepSpeed ZeRO-3) and prints its mean step time;
# 5. drives `DistillJob` directly on the GPU (NCCL 1-rank group, bf16, same spec) for the
#    steady-state step time and the peak GPU memory (torch.cuda.max_memory_allocated), since
#    the worker does not log memory.
#
# Environment: SMOKE_DIR (work folder, default a new /tmp/flashctl-gpu-smoke.*), STEPS (30),
# PYTHON (default .venv/bin/python). Nothing is written into the repository besides .venv.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
STEPS=${STEPS:-30}
WORK=${SMOKE_DIR:-$(mktemp -d /tmp/flashctl-gpu-smoke.XXXXXX)}
mkdir -p "$WORK"
T0=$SECONDS

die() {
    echo "gpu_smoke: $*" >&2
    exit 1
}

# ------------------------------------------------------------------------------------ 1. a GPU
command -v nvidia-smi >/dev/null 2>&1 || die "no nvidia-smi on PATH: this smoke test needs a machine with an NVIDIA GPU (CPU runs: make test / bench/distill_step.py)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || die "nvidia-smi found but failed: no usable NVIDIA GPU/driver"

# ----------------------------------------------------------------------------------- 2. venv
if [ ! -x "$PY" ]; then
    echo "gpu_smoke: no $PY; creating .venv (torch 2.13.0 from PyPI = CUDA build on Linux x86_64)"
    python3 -m venv .venv
    .venv/bin/pip install torch==2.13.0
    .venv/bin/pip install -e .
    PY=$REPO/.venv/bin/python
fi
"$PY" - <<'EOF' || die "torch cannot use the GPU (see above)"
import sys
import torch
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device. A CPU-only "
          "torch (+cpu) needs replacing: .venv/bin/pip install --force-reinstall torch==2.13.0 "
          "(PyPI's Linux wheel is CUDA), or --index-url https://download.pytorch.org/whl/cuXYZ for your driver.")
    sys.exit(1)
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.1f} GiB, "
      f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'NO'}")
EOF

# A CPU-only shell setting (DS_ACCELERATOR=cpu from CPU runs/tests) would make DeepSpeed use
# its CPU accelerator; flashctl does not clear it for launch.device=cuda.
unset DS_ACCELERATOR RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT
export TOKENIZERS_PARALLELISM=false PYTHONWARNINGS="ignore::FutureWarning"

# ------------------------------------------------------------------------ 3. data + teacher
echo "gpu_smoke: work folder $WORK"
timeout 180 "$PY" - "$WORK" <<'EOF' || die "preparing data / teacher failed"
import sys
from pathlib import Path

from flashctl.data.prepare import prepare_data
from flashctl.pipelines import BUILTIN_DIR
from flashctl.spec import DataSpec, load_spec

work = Path(sys.argv[1])
data = DataSpec(root=work / "data", n=200, seed=0, rows_per_shard=200)
if not (data.root / "manifest.json").is_file():
    prepare_data(data, data.root, progress=False)
if (BUILTIN_DIR / "base" / "model_index.json").is_file():
    base = "builtin:base"
    edit = "builtin:edit" if (BUILTIN_DIR / "edit" / "model_index.json").is_file() else base
else:
    from flashctl.models.adapter import QwenImageAdapter
    from flashctl.models.tiny import build_tiny_pipeline
    from flashctl.shapes import corpus

    tiny = load_spec("experiments/teacher-base.yaml").model.tiny
    folder = work / "teacher"
    if not (folder / "model_index.json").is_file():
        QwenImageAdapter(build_tiny_pipeline(tiny, corpus(n=200, seed=0), seed=0)).save_pipeline(folder)
    base = edit = str(folder)
(work / "teachers.txt").write_text(f"{base}\n{edit}\n")
print(f"data: {data.root}; teachers: base={base} edit={edit}")
EOF
BASE=$(sed -n 1p "$WORK/teachers.txt")
EDIT=$(sed -n 2p "$WORK/teachers.txt")

ARGS=(
    experiments/tiny-cpu.yaml
    "data.root=$WORK/data" "teachers.base.path=$BASE" "teachers.edit.path=$EDIT"
    launch.device=cuda launch.nproc_per_node=1 deepspeed.precision=bf16 deepspeed.zero_stage=3
    "distill.steps=$STEPS" eval.enabled=false distill.sample_every=0
    "tracking.uri=sqlite:///$WORK/mlflow.db" "run.out_dir=$WORK/runs" run.name=gpu-smoke
)

# --------------------------------------------------------------------- 4. flashctl distill
echo "gpu_smoke: flashctl distill ${ARGS[*]}"
timeout 270 "$PY" -m flashctl.cli distill "${ARGS[@]}" --fresh \
    || die "flashctl distill failed; log: $WORK/runs/gpu-smoke/train.log"
"$PY" - "$WORK/runs/gpu-smoke" <<'EOF' || die "no usable summary.json"
import json
import math
import sys
from pathlib import Path

run = Path(sys.argv[1])
s = json.loads((run / "summary.json").read_text())
m = s["last_metrics"]
assert (run / "student" / "model_index.json").is_file(), "no exported student pipeline"
assert math.isfinite(m["train/loss_generator"]) and math.isfinite(m["train/loss_critic"]), m
print(f"flashctl distill: {s['steps']} steps in {s['train_time_s']:.1f}s -> {s['train_time_s'] / s['steps']:.3f} s/step "
      f"(incl. first-step warm-up), {m['train/samples_per_s']:.1f} generator samples/s; "
      f"last G {m['train/loss_generator']:.4f} C {m['train/loss_critic']:.4f}; student -> {s['student']}")
EOF

# ----------------------------------------------------- 5. steady-state step time + peak memory
timeout 150 "$PY" - "$WORK/driver" "${ARGS[@]}" <<'EOF' || die "DistillJob driver failed"
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from flashctl.distill.engine import full_param_bytes, init_distributed, local_param_bytes
from flashctl.distill.worker import DistillJob
from flashctl.spec import load_spec

warnings.filterwarnings("ignore")
run_dir, spec_path, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
spec = load_spec(spec_path, overrides)
info = init_distributed("cuda")  # bare process: a 1-rank NCCL group
torch.manual_seed(spec.distill.seed)
job = DistillJob(spec, run_dir, info)
assert next(job.student.module.parameters()).dtype == torch.bfloat16, "student engine is not bf16"
for step in range(3):  # warm-up (allocator, kernels)
    job.round(step)
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
times = []
for step in range(3, 13):
    t = time.perf_counter()
    m = job.round(step)
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
    assert math.isfinite(m["train/loss_generator"]), m
gib = 2**30
print(f"DistillJob on {torch.cuda.get_device_name(0)} ({spec.deepspeed.precision}, ZeRO-{spec.deepspeed.zero_stage}, "
      f"1 rank, batch {spec.distill.batch_size}, K={spec.distill.critic_updates}): median "
      f"{statistics.median(times):.3f} s/round (min {min(times):.3f}, max {max(times):.3f}; {len(times)} rounds after 3 warm-up)")
print(f"peak GPU memory: allocated {torch.cuda.max_memory_allocated() / gib:.3f} GiB, "
      f"reserved {torch.cuda.max_memory_reserved() / gib:.3f} GiB; student params: local "
      f"{local_param_bytes(job.student) / 2**20:.2f} MiB of {full_param_bytes(job.student) / 2**20:.2f} MiB")
torch.distributed.destroy_process_group()
EOF

echo "gpu_smoke: ok in $((SECONDS - T0))s (work folder $WORK)"
