#!/usr/bin/env bash
# GPU smoke test of flashctl on ONE CUDA GPU (~6-8 min after set-up; BUDGET_S caps it).
#
#   bash bench/gpu_smoke.sh                 # on the GPU machine; runs in the repository root
#   bash bench/gpu_smoke.sh --fetch-wheels  # on a machine WITH internet, before: see "Python" below
#
# What it prints (every line of a part starts with "part N |"; at the end a summary block of all
# numbers, also written to $WORK/summary.txt). The tiny shipped teachers (builtin:base/edit, or a
# random tiny teacher of the same architecture if the assets are missing), 200 shapes rows, bf16,
# ZeRO-3, 1 rank (torchrun + NCCL), gradient checkpointing on (the CUDA default), tracking off:
#   part 1  `flashctl distill` twice, STEPS generator steps each: deepspeed.param_persistence_threshold=0
#           (every tensor partitioned: ZeRO-3's gathers for real, one per transformer block as
#           deepspeed.gather: block does by default, with activation checkpointing) and DeepSpeed's default (null), the
#           threshold each engine really got (ds_config.json), steady-state steps/s of each (from the
#           progress lines, after the first 20% of steps) and incl. warm-up, and the ratio side by side;
#   part 3  the end-of-run eval of the threshold-0 run (eval.n_t2i=eval.n_edit=EVAL_N, no diversity
#           seeds, no teacher cache): student@4 vs teacher@40+CFG timed interleaved, s/image end to
#           end and denoise-only, speed-ups beside the NFE ratio, accuracies;
#   part 2  a DistillJob driven in-process on the same spec (threshold 0), with the MFU of a round: parameters really
#           partitioned (persistent / released outside forward), s/round, torch.cuda
#           max_memory_allocated / max_memory_reserved of a round, and per component (params, grads,
#           fp32 master + Adam, teachers, text encoder + VAE, reduce buckets, held, round peak,
#           device total) `flashctl.plan.plan(spec)` vs measured, as plan/measured ratios;
#   part 5  device-mismatch sanity: the exported student folder of part 1 loads with plain diffusers
#           in bf16 on cuda and samples T2I (QwenImagePipeline) and an edit (its own pipeline class);
#   part 4  a short run with distill.gan_weight=0.1 (GAN_STEPS steps): finishes, GAN losses finite.
# Parts run in that order (1, 3, 2, 5, 4: the cheapest and most important first). A failing part
# prints "FAILED part N: <reason>" and the script goes on; once BUDGET_S seconds have passed since
# the start, the remaining parts are skipped with a line saying so. Exit status: 0 if no part failed.
#
# Python. The GPU machine lent to sessions has a python3 with CUDA torch but no internet and none of
# deepspeed, diffusers, pydantic (and an older transformers). On a machine WITH internet and the CPU
# venv (make setup), `bash bench/gpu_smoke.sh --fetch-wheels` puts those wheels, the versions of .venv,
# into .whl/ (25 MB, git-ignored via .git/info/exclude; deepspeed has no wheel on PyPI and is built
# here, pure Python). On the GPU machine the script installs .whl/*.whl into $SMOKE_SITE
# (--target, no index) and runs flashctl from the tree (PYTHONPATH, no pip install -e). With the
# device tool: run(command="bash bench/gpu_smoke.sh 2>&1 | tee $OUT/gpu_smoke.log; cp /tmp/flashctl-gpu-smoke/summary.txt $OUT/",
# carry=[".whl"], timeout_s=600). MLflow is not needed (tracking.enabled=false). The python used: PYTHON,
# else .venv/bin/python if its torch sees a GPU, else python3.
#
# Environment: BUDGET_S (480), STEPS (40), GAN_STEPS (10), EVAL_N (32), SMOKE_DIR (work folder,
# default /tmp/flashctl-gpu-smoke; its runs/ and driver/ are emptied first), PYTHON, WHEELS (.whl), SMOKE_SITE
# (/tmp/flashctl-gpu-site). Nothing is written into the repository (besides .whl with --fetch-wheels).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
WHEELS=${WHEELS:-$REPO/.whl}

die() {
    echo "gpu_smoke: $*" >&2
    exit 1
}

# ------------------------------------------------------------- --fetch-wheels (internet side)
if [ "${1:-}" = "--fetch-wheels" ]; then
    VPY=$REPO/.venv/bin/python
    [ -x "$VPY" ] || die "--fetch-wheels reads the versions from .venv: run make setup first"
    mkdir -p "$WHEELS"
    if [ "$WHEELS" = "$REPO/.whl" ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
        echo '/.whl/' >>.git/info/exclude
    fi
    # what the GPU image lacks (or has too old) of flashctl's distill/eval path, pinned to .venv
    PINS=$("$VPY" - <<'EOF'
import importlib.metadata as m
names = ["diffusers", "transformers", "pydantic", "pydantic_core", "annotated-types", "typing-inspection",
         "typing_extensions", "hjson", "importlib_metadata", "typer", "rich"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))
EOF
)
    DSV=$("$VPY" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')
    echo "gpu_smoke: wheels for python 3.12 manylinux x86_64: $PINS deepspeed==$DSV"
    # shellcheck disable=SC2086
    "$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" $PINS
    DS_BUILD_OPS=0 "$VPY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "deepspeed==$DSV"
    ls -1 "$WHEELS"
    du -sh "$WHEELS"
    echo "gpu_smoke: now on the GPU machine: bash bench/gpu_smoke.sh (device tool: carry=[\".whl\"])"
    exit 0
fi

BUDGET_S=${BUDGET_S:-480}
STEPS=${STEPS:-40}
GAN_STEPS=${GAN_STEPS:-10}
EVAL_N=${EVAL_N:-32}
WORK=${SMOKE_DIR:-/tmp/flashctl-gpu-smoke}
T0=$SECONDS
mkdir -p "$WORK"
rm -rf "$WORK/runs" "$WORK/driver" "$WORK/summary.txt"
export SMOKE_NUMBERS=$WORK/numbers.txt
: >"$SMOKE_NUMBERS"

# ------------------------------------------------------------------------ set-up: GPU + Python
command -v nvidia-smi >/dev/null 2>&1 || die "no nvidia-smi on PATH: this smoke test needs a machine with an NVIDIA GPU (CPU runs: make test / bench/distill_step.py)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || die "nvidia-smi found but failed: no usable NVIDIA GPU/driver"

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ] && "$REPO/.venv/bin/python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    PY=$REPO/.venv/bin/python
else
    PY=$(command -v python3) || die "no python3"
fi
PYPATH=$REPO
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=${SMOKE_SITE:-/tmp/flashctl-gpu-site}
    echo "gpu_smoke: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE (no index)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
        || die "installing the wheels of $WHEELS failed"
    PYPATH=$PYPATH:$SITE
fi
export PYTHONPATH=$PYPATH${PYTHONPATH:+:$PYTHONPATH}

# A CPU-only shell setting (DS_ACCELERATOR=cpu from CPU runs/tests) would make DeepSpeed use
# its CPU accelerator; flashctl does not clear it for launch.device=cuda.
unset DS_ACCELERATOR RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT
export TOKENIZERS_PARALLELISM=false PYTHONWARNINGS="ignore::FutureWarning" PYTHONUNBUFFERED=1
# no internet is needed (local teachers, tracking off); offline, hub look-ups fail at once instead of hanging
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_HUB_DISABLE_TELEMETRY=1

"$PY" - <<'EOF' || die "this python cannot run flashctl on the GPU (see above)"
import importlib
import importlib.metadata as md
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device: use a CUDA torch "
             "(PYTHON=...; PyPI's Linux torch wheel is the CUDA build)")
p = torch.cuda.get_device_properties(0)
print(f"gpu_smoke: {sys.executable}: torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, "
      f"{p.total_memory / 2**30:.1f} GiB, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'NO'}")
missing = []
for mod, dist in (("deepspeed", "deepspeed"), ("diffusers", "diffusers"), ("transformers", "transformers"),
                  ("pydantic", "pydantic"), ("typer", "typer"), ("rich", "rich"), ("pyarrow", "pyarrow"),
                  ("yaml", "pyyaml"), ("flashctl", None)):
    try:
        importlib.import_module(mod)
        print(f"  {mod} {md.version(dist) if dist else '(tree)'}")
    except Exception as exc:  # noqa: BLE001
        missing.append(f"{mod} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("missing: " + "; ".join(missing) + ". Without internet: `bash bench/gpu_smoke.sh --fetch-wheels` on a "
             "machine with internet, then carry .whl here")
EOF

# ------------------------------------------------------------------------ set-up: data + teacher
echo "gpu_smoke: work folder $WORK"
timeout 300 "$PY" - "$WORK" <<'EOF' || die "preparing data / teacher failed"
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
print(f"gpu_smoke: data {data.root}; teachers base={base} edit={edit}")
EOF
BASE=$(sed -n 1p "$WORK/teachers.txt")
EDIT=$(sed -n 2p "$WORK/teachers.txt")

SPEC=experiments/tiny-cpu.yaml
ARGS=(
    "data.root=$WORK/data" "teachers.base.path=$BASE" "teachers.edit.path=$EDIT"
    launch.device=cuda launch.nproc_per_node=1 deepspeed.precision=bf16 deepspeed.zero_stage=3
    distill.sample_every=0 tracking.enabled=false "run.out_dir=$WORK/runs"
)
THR0=deepspeed.param_persistence_threshold=0
THR_DEFAULT=deepspeed.param_persistence_threshold=null # None: DeepSpeed's own default
EVAL_ON=(eval.enabled=true "eval.n_t2i=$EVAL_N" "eval.n_edit=$EVAL_N" eval.diversity_seeds=0 eval.reuse_teacher=false)

# ------------------------------------------------------------------------ part machinery
STATUS=()
FAILED=0

# timeout for one command: `want` seconds, but not past BUDGET_S + 60 s (at least 30 s)
tmo() {
    local left=$((BUDGET_S + 60 - (SECONDS - T0)))
    [ "$left" -lt 30 ] && left=30
    echo $(($1 < left ? $1 : left))
}

# inside a part: stop it with a reason
fail() {
    echo "$*" >"$WORK/.reason"
    exit 1
}

# part N TITLE FUNCTION: run FUNCTION in a subshell with errexit; report, never abort the script
part() {
    local n=$1 title=$2 fn=$3 el=$((SECONDS - T0)) t rc
    if [ "$el" -ge "$BUDGET_S" ]; then
        echo "gpu_smoke: SKIPPED part $n ($title): ${el}s elapsed >= BUDGET_S=${BUDGET_S}s"
        STATUS+=("part $n $title: SKIPPED (budget: ${el}s elapsed)")
        return 0
    fi
    echo "===== part $n: $title (${el}s elapsed)"
    rm -f "$WORK/.reason"
    t=$SECONDS
    set +e
    (
        set -euo pipefail
        "$fn"
    )
    rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then
        STATUS+=("part $n $title: ok ($((SECONDS - t))s)")
    else
        local reason="exit status $rc (see the output above)"
        [ -s "$WORK/.reason" ] && reason=$(cat "$WORK/.reason")
        echo "FAILED part $n: $reason"
        STATUS+=("part $n $title: FAILED ($((SECONDS - t))s): $reason")
        FAILED=1
    fi
}

# distill NAME WANT_TIMEOUT OVERRIDES...: one `flashctl distill` run; output in $WORK/NAME.out
distill() {
    local name=$1 want=$2 rc=0
    shift 2
    echo "part | flashctl distill $SPEC ${ARGS[*]} run.name=$name $*"
    timeout --kill-after=30 "$(tmo "$want")" "$PY" -m flashctl.cli distill "$SPEC" "${ARGS[@]}" "run.name=$name" "$@" --fresh \
        >"$WORK/$name.out" 2>&1 || rc=$?
    grep -E "^distill [0-9]+/[0-9]+ " "$WORK/$name.out" | tail -n 1 || true
    if [ "$rc" -ne 0 ]; then
        tail -n 40 "$WORK/$name.out"
        local why=""
        [ "$rc" -eq 124 ] && why=" (timeout)"
        fail "flashctl distill ($name) exited $rc$why; log $WORK/runs/$name/train.log"
    fi
}

# train_numbers PART NAME...: steps/s of finished runs (summary.json + progress lines of train.log)
train_numbers() {
    "$PY" - "$WORK" "$@" <<'EOF'
import json
import math
import os
import re
import sys
from pathlib import Path

from flashctl.spec import load_spec

work, part, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
RATE = re.compile(r"^distill (\d+)/(\d+) .*\(([\d.]+) it/s, eta")


def say(line: str) -> None:
    print(line, flush=True)
    with open(os.environ["SMOKE_NUMBERS"], "a") as fh:
        fh.write(line + "\n")


rates = {}
for name in names:
    run = work / "runs" / name
    s = json.loads((run / "summary.json").read_text())
    spec = load_spec(run / "spec.resolved.yaml")
    m = s["last_metrics"]
    bad = {k: v for k, v in m.items() if isinstance(v, float) and not math.isfinite(v) and "grad_norm" not in k}
    assert not bad, f"{name}: non-finite metrics {bad}"
    assert (run / "student" / "model_index.json").is_file(), f"{name}: no exported student"
    zero = json.loads((run / "ds_config.json").read_text())["zero_optimization"]
    thr = zero.get("stage3_param_persistence_threshold", "DeepSpeed default (key absent)")
    # cumulative rates c/T on the progress lines -> steady state between the line at >= 20% and the last
    pts = [(int(c), int(t), float(r)) for c, t, r in
           (RATE.match(x).groups() for x in (run / "train.log").read_text().splitlines() if RATE.match(x))]
    a = next((p for p in pts if p[0] >= max(3, p[1] // 5) and p[2] > 0), None)
    b = pts[-1] if pts else None
    den = (b[0] / b[2] - a[0] / a[2]) if a and b and b[0] > a[0] else 0.0
    steady = (b[0] - a[0]) / den if den > 0 else float("nan")
    incl = m["train/samples_per_s"] / (spec.distill.batch_size * spec.launch.nproc_per_node)
    rates[name] = steady
    say(f"part {part} | {name}: threshold {thr}, gather {spec.deepspeed.gather}, grad checkpointing {spec.gradient_checkpointing()}, "
        f"{s['steps']} steps: {steady:.3f} steps/s steady (steps {a[0] if a else '?'}-{b[0] if b else '?'}), "
        f"{incl:.3f} steps/s incl. warm-up; last G {m['train/loss_generator']:.4f} C {m['train/loss_critic']:.4f}")
    gan = {k: m[k] for k in ("train/loss_gan_d", "train/loss_gan_g", "train/d_acc_real", "train/d_acc_fake") if k in m}
    if spec.distill.gan_weight > 0:
        assert len(gan) == 4 and all(math.isfinite(v) for v in gan.values()), f"{name}: GAN metrics {gan}"
        say(f"part {part} | {name}: gan_weight {spec.distill.gan_weight}: "
            + ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in gan.items()))
if len(rates) == 2:
    (n0, r0), (n1, r1) = rates.items()
    say(f"part {part} | steps/s side by side: {n0} {r0:.3f}, {n1} {r1:.3f} -> {n1}/{n0} = {r1 / r0:.2f}x")
EOF
}

# ------------------------------------------------------------------------ the parts
part1() {
    distill gpu-thr0 420 "$THR0" "distill.steps=$STEPS" "${EVAL_ON[@]}"
    distill gpu-default 300 "$THR_DEFAULT" "distill.steps=$STEPS" eval.enabled=false
    train_numbers 1 gpu-thr0 gpu-default || fail "could not read the two runs' results"
}

part3() {
    [ -f "$WORK/runs/gpu-thr0/summary.json" ] || fail "no run gpu-thr0 (part 1 failed before it finished)"
    grep -A12 "evaluation (verifier accuracy)" "$WORK/gpu-thr0.out" || true
    "$PY" - "$WORK/runs/gpu-thr0" <<'EOF' || fail "reading the eval results of gpu-thr0 failed (see above)"
import json
import os
import sys
from pathlib import Path

run = Path(sys.argv[1])


def say(line: str) -> None:
    print(line, flush=True)
    with open(os.environ["SMOKE_NUMBERS"], "a") as fh:
        fh.write(line + "\n")


s = json.loads((run / "summary.json").read_text())
assert "eval" in s, "summary.json has no eval (was eval disabled?)"
m = s["eval"]
res = json.loads((run / "eval" / "results.json").read_text())
t = res.get("timing", {})
say(f"part 3 | eval rows {res.get('rows')}, timing interleaved {t.get('interleaved')}, repeats {t.get('repeats')}, "
    f"order {t.get('order')}, cached {t.get('cached')}")
for name in ("student", "teacher", "teacher_fast"):
    g = lambda k, n=name: m.get(f"eval/{n}/{k}", float("nan"))  # noqa: E731
    say(f"part 3 | {name}: NFE {g('nfe'):.0f}, {g('sec_per_image') * 1e3:.2f} ms/image end to end, "
        f"{g('denoise_sec_per_image') * 1e3:.2f} ms/image denoising; T2I acc {g('t2i_acc'):.3f}, edit acc {g('edit_acc'):.3f}")
sp, den, nfe = (m.get(f"eval/{k}", float("nan")) for k in ("speedup", "speedup_denoise", "nfe_ratio"))
say(f"part 3 | speed-up student@4 vs teacher@40+CFG: end to end {sp:.2f}x, denoising {den:.2f}x, NFE ratio {nfe:.1f} "
    f"(denoising = {den / nfe:.2f} of the NFE ratio)")
EOF
}

part2() {
    timeout --kill-after=30 "$(tmo 240)" "$PY" - "$WORK/driver" "$SPEC" "${ARGS[@]}" "$THR0" "distill.steps=$STEPS" \
        eval.enabled=false <<'EOF' || fail "DistillJob driver exited $? (timeout: 124)"
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from bench.plan_vs_measured import engine_bytes
from flashctl.distill.engine import init_distributed, local_param_bytes
from flashctl.distill.worker import DistillJob
from flashctl.plan import GB, plan
from flashctl.spec import load_spec

warnings.filterwarnings("ignore")
MIB = 2**20


def say(line: str) -> None:
    print(line, flush=True)
    with open(os.environ["SMOKE_NUMBERS"], "a") as fh:
        fh.write(line + "\n")


run_dir, spec_path, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
run_dir.mkdir(parents=True, exist_ok=True)
spec = load_spec(spec_path, overrides)
info = init_distributed("cuda")  # bare process: a 1-rank NCCL group
torch.manual_seed(spec.distill.seed)
torch.cuda.synchronize()
base = torch.cuda.memory_allocated()
job = DistillJob(spec, run_dir, info)
torch.cuda.synchronize()
build_peak = torch.cuda.max_memory_allocated() - base
params = list(job.student.module.parameters())
assert params[0].dtype == torch.bfloat16, f"student engine is {params[0].dtype}, not bf16"
persist = sum(bool(getattr(p, "ds_persist", False)) for p in params)
released = sum(hasattr(p, "ds_tensor") and p.data.numel() == 0 for p in params)
say(f"part 2 | ZeRO-{spec.deepspeed.zero_stage}, threshold {spec.deepspeed.param_persistence_threshold}, "
    f"grad checkpointing {spec.gradient_checkpointing()}, teachers partitioned {job.partition_teachers}: student "
    f"parameters {len(params)}, persistent (kept whole) {persist}, released outside forward {released}")
WARM, TIMED = 2, 5  # warm-up rounds create the Adam moments, kernels, allocator blocks
for step in range(WARM):
    job.round(step)
torch.cuda.synchronize()
held = torch.cuda.memory_allocated() - base
torch.cuda.reset_peak_memory_stats()
times = []
for step in range(WARM, WARM + TIMED):
    t = time.perf_counter()
    m = job.round(step)
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
    assert math.isfinite(m["train/loss_generator"]), m
peak = torch.cuda.max_memory_allocated() - base
peak_reserved = torch.cuda.max_memory_reserved()
free, total = torch.cuda.mem_get_info()
context = (total - free) - torch.cuda.memory_reserved()  # CUDA context + NCCL + libraries, outside torch's allocator
say(f"part 2 | DistillJob on {torch.cuda.get_device_name(0)}: median {statistics.median(times):.3f} s/round "
    f"(min {min(times):.3f}, max {max(times):.3f}; {TIMED} rounds after {WARM} warm-up; batch {spec.distill.batch_size}, "
    f"K={spec.distill.critic_updates})")
# MFU of the round's transformer maths: FLOPs of one more round counted by torch's FlopCounterMode
# (aten matmuls/attention of student, critic and teacher forwards and backwards), over the median
# round time and the GPU's dense bf16 peak (PEAK_TFLOPS, default 989 for an H100/H200 SXM)
from torch.utils.flop_counter import FlopCounterMode

with FlopCounterMode(display=False) as fc:
    job.round(WARM + TIMED)
flops = fc.get_total_flops()
peak_tf = float(os.environ.get("PEAK_TFLOPS", "989"))
mfu = flops / statistics.median(times) / (peak_tf * 1e12)
say(f"part 2 | MFU of a round: {flops / 1e9:.2f} GFLOP per round / {statistics.median(times):.3f} s = "
    f"{flops / statistics.median(times) / 1e12:.3f} TFLOP/s = {100 * mfu:.4f}% of {peak_tf:g} TFLOP/s "
    "(a tiny model: launch- and hook-bound, not compute-bound)")
say(f"part 2 | peak GPU memory of a round: max_memory_allocated {peak / MIB:.1f} MiB, max_memory_reserved "
    f"{peak_reserved / MIB:.1f} MiB; held between rounds {held / MIB:.1f} MiB; construction peak {build_peak / MIB:.1f} MiB; "
    f"outside the allocator (context, NCCL) {context / MIB:.1f} MiB")

meas, st, cr = {}, engine_bytes(job.student), engine_bytes(job.critic)
for name, e in (("student", st), ("critic", cr)):
    meas[f"{name} params"], meas[f"{name} grads"] = e["params"], e["grads"]
    meas[f"{name} optim (fp32 master + Adam)"] = e["master"] + e["adam"]
meas["teachers"] = sum(local_param_bytes(t.model) for t in job.teachers.values())
a = job.adapter
meas["text encoder + vae"] = sum(local_param_bytes(x) for x in (a.text_encoder, a.vae) if x is not None)
meas["working (plan: gathered + buckets; measured: reduce buckets)"] = st["bucket"] + cr["bucket"]
meas["held between rounds (memory_allocated)"] = held
meas["round peak (max_memory_allocated)"] = peak
meas["device total (max_reserved + outside)"] = peak_reserved + context

r = plan(spec)
by = {c.name: c for c in r.components}
acts = r.activations.checkpointed_gb if r.gradient_checkpointing else r.activations.full_gb
pl = {}
for name in ("student", "critic"):
    c = by[name]
    pl[f"{name} params"], pl[f"{name} grads"], pl[f"{name} optim (fp32 master + Adam)"] = (
        c.params_gb * GB, c.grads_gb * GB, c.optim_gb * GB)
pl["teachers"] = sum(c.params_gb for c in r.components if c.role == "teacher") * GB
pl["text encoder + vae"] = sum(c.params_gb for c in r.components if c.role in ("text_encoder", "vae")) * GB
pl["working (plan: gathered + buckets; measured: reduce buckets)"] = sum(c.working_gb for c in r.components) * GB
pl["held between rounds (memory_allocated)"] = sum(c.total_gb for c in r.components) * GB
pl["round peak (max_memory_allocated)"] = (r.model_states_gb + acts) * GB
pl["device total (max_reserved + outside)"] = (r.total_ckpt_gb if r.gradient_checkpointing else r.total_gb) * GB
say(f"part 2 | plan vs measured (MiB; plan: teachers {r.teacher_placement}, activations "
    f"{'checkpointed' if r.gradient_checkpointing else 'full'} {acts * 1024:.1f}, overhead {r.overhead_gb:.1f} GiB)")
for k in meas:
    ratio = f"{pl[k] / meas[k]:.2f}" if meas[k] else "-"
    say(f"part 2 |   {k:<62} plan {pl[k] / MIB:10.1f}  measured {meas[k] / MIB:10.1f}  plan/measured {ratio}")
torch.distributed.destroy_process_group()
EOF
}

part5() {
    local student=$WORK/runs/gpu-thr0/student
    [ -f "$student/model_index.json" ] || fail "no exported student in $student (part 1 failed before the export)"
    timeout --kill-after=30 "$(tmo 180)" "$PY" - "$student" <<'EOF' || fail "loading/sampling the exported student on cuda exited $?"
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, QwenImagePipeline
from PIL import Image, ImageDraw

import flashctl.models.processor  # noqa: F401  (the folder's processor class lives in flashctl)
from flashctl.models.adapter import cap_edit_pipeline

folder = Path(sys.argv[1])


def say(line: str) -> None:
    print(line, flush=True)
    with open(os.environ["SMOKE_NUMBERS"], "a") as fh:
        fh.write(line + "\n")


cls = json.loads((folder / "model_index.json").read_text())["_class_name"]
t = time.perf_counter()
pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16).to("cuda")
pipe.set_progress_bar_config(disable=True)
load_s = time.perf_counter() - t
where = {n: str(next(getattr(pipe, n).parameters()).device) for n in ("transformer", "text_encoder", "vae")}
sch = pipe.scheduler.config
say(f"part 5 | {folder} loads as {type(pipe).__name__} (model_index {cls}) in {load_s:.1f}s, bf16 on {where}; "
    f"scheduler shift {sch.get('shift')}, dynamic shifting {sch.get('use_dynamic_shifting')}")


def check(img, what: str, seconds: float) -> None:
    a = np.asarray(img, dtype=np.float32)
    assert np.isfinite(a).all() and a.std() > 0, f"{what}: constant or non-finite image"
    say(f"part 5 | {what}: {img.size[0]}x{img.size[1]} in {seconds * 1e3:.0f} ms (4 steps, cuda generator), pixel std {a.std():.1f}")


t2i = QwenImagePipeline(**{k: getattr(pipe, k) for k in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")})
t2i.set_progress_bar_config(disable=True)
for _ in range(2):  # the second call is timed warm
    t = time.perf_counter()
    img = t2i("a red circle at the top left", height=64, width=64, num_inference_steps=4, true_cfg_scale=1.0,
              generator=torch.Generator("cuda").manual_seed(0)).images[0]
    torch.cuda.synchronize()
check(img, "T2I (QwenImagePipeline over the exported components)", time.perf_counter() - t)
if hasattr(pipe, "processor"):  # edit-capable export (the base's family)
    src = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(src).ellipse((16, 16, 48, 48), fill="blue")
    cap_edit_pipeline(pipe, 64 * 64)  # the reference image at the trained size, not diffusers' 1024x1024
    t = time.perf_counter()
    img = pipe(src, "make the circle red", num_inference_steps=4, true_cfg_scale=1.0,
               generator=torch.Generator("cuda").manual_seed(0)).images[0]
    torch.cuda.synchronize()
    check(img, f"edit ({type(pipe).__name__})", time.perf_counter() - t)
EOF
}

part4() {
    distill gpu-gan 240 "$THR0" "distill.steps=$GAN_STEPS" distill.gan_weight=0.1 eval.enabled=false
    train_numbers 4 gpu-gan || fail "the GAN run's results are missing or not finite"
}

part 1 "flashctl distill, threshold 0 vs DeepSpeed default" part1
part 3 "end-of-run eval on the GPU" part3
part 2 "peak GPU memory vs flashctl plan" part2
part 5 "exported student loads with diffusers, samples on cuda" part5
part 4 "distill.gan_weight=0.1" part4

# ------------------------------------------------------------------------ summary
{
    echo "===== gpu_smoke summary ($((SECONDS - T0))s, BUDGET_S=$BUDGET_S, STEPS=$STEPS, GAN_STEPS=$GAN_STEPS, EVAL_N=$EVAL_N)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    for s in "${STATUS[@]}"; do echo "$s"; done
    cat "$SMOKE_NUMBERS"
} | tee "$WORK/summary.txt"
echo "gpu_smoke: summary in $WORK/summary.txt; runs and logs in $WORK/runs"
exit "$FAILED"
