"""Multi-node launch with DeepSpeed's runner and a hostfile (`launch.backend: hostfile`).

Two ways to start the nodes, both built here:

* **ssh** (DeepSpeed's default, pdsh): one `deepspeed --hostfile H ...` on the first node starts
  every node over ssh. The remote ranks get only the variables DeepSpeed forwards: those whose
  names start with MLFLOW, PYTHON, MV2, UCX (+ NCCL on CUDA), and every KEY=VALUE line of
  `.deepspeed_env`. The runner looks for that file in `~` and in its working directory, under
  the name in `DS_ENV_FILE` (default `.deepspeed_env`); an absolute `DS_ENV_FILE` names one
  file, which is what `launcher_env` does: the file lives in the run directory.
* **no ssh** (`--no_ssh --node_rank N`): the same command is started by hand (or by another
  scheduler) on every node with its own node rank; each node launches only its local ranks
  with `deepspeed.launcher.launch` and the environment it was started with. `.deepspeed_env`
  is *not* read on this path (DeepSpeed reads it only when it builds the pdsh command), so the
  node's own environment must carry the same variables: `launcher_env` puts them there.

Slots: DeepSpeed starts one rank per slot. On the CPU accelerator `deepspeed.launcher.launch`
sets LOCAL_SIZE to the node's slot count and the accelerator reports that as its device count,
so slots mean "ranks on this node" on CPU and GPU alike (without a hostfile the CPU accelerator
would count NUMA nodes instead; a hostfile avoids that).
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import sys
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from flashctl.errors import UserError
from flashctl.io import atomic_write_text
from flashctl.launch import rank_env
from flashctl.launch.local import env_for
from flashctl.spec import ExperimentSpec
from flashctl.track import resolve_uri
from flashctl.yamlio import read_text

WORKER_MODULE = "flashctl.distill.worker"
ENV_FILE_NAME = ".deepspeed_env"

# DeepSpeed's runner forwards these name prefixes by itself (runner.EXPORT_ENVS, plus the
# accelerator's export_envs(): NCCL on CUDA). Anything else a remote rank needs goes in
# .deepspeed_env.
FORWARDED_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")

# Variables every node's ranks need, copied from the launching environment when set there.
NODE_ENV_KEYS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_RUN_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "PYTHONPATH",
    "PYTHONWARNINGS",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TORCH_EXTENSIONS_DIR",
    "OMP_NUM_THREADS",
    "DS_ACCELERATOR",
    "TOKENIZERS_PARALLELISM",
)
_NODE_ENV_PREFIXES = ("NCCL_", "GLOO_")

_HOST_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S+)$")
_HOST_NAME = re.compile(r"[A-Za-z0-9._:-]{1,253}")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# DeepSpeed's pdsh runner writes `export KEY="VALUE";` into a remote shell command, so these
# characters would be expanded or break the quoting there.
_UNSAFE_VALUE_CHARS = set('"$`\\\n\r')


# --------------------------------------------------------------------------------------------
# Hostfile


def parse_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """Read a DeepSpeed hostfile (`host slots=N` per line, `#` comments) as [(host, slots)].

    Hand-written rather than DeepSpeed's `runner._parse_hostfile` because that one accepts
    trailing garbage and `slots=0` and reports errors without a line number; the accepted
    format is the same. Errors are UserError naming `file:line`.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: hostfile not found")
    text = read_text(p, "hostfile", max_bytes=1 << 20)  # UTF-8, at most 1 MiB
    hosts: OrderedDict[str, int] = OrderedDict()
    first_line: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOST_LINE.match(line)
        if m is None:
            raise UserError(f"{p}:{n}: expected 'HOST slots=N', got {raw.strip()[:80]!r}")
        host, slots_text = m.group("host"), m.group("slots")
        if not _HOST_NAME.fullmatch(host):
            # host names reach pdsh/ssh command lines: `$(...)`, `;` or quotes must not
            raise UserError(f"{p}:{n}: host {host[:60]!r}: only letters, digits and . _ - : are allowed")
        if not slots_text.isascii() or not slots_text.isdigit() or len(slots_text) > 6:
            raise UserError(f"{p}:{n}: slots={slots_text[:20]!r} is not a whole number (1-999999)")
        slots = int(slots_text)
        if slots < 1:
            raise UserError(f"{p}:{n}: host {host!r} has slots={slots}; it must be >= 1")
        if host in hosts:
            raise UserError(f"{p}:{n}: host {host!r} is listed twice (first on line {first_line[host]})")
        hosts[host] = slots
        first_line[host] = n
    if not hosts:
        raise UserError(f"{p}: hostfile lists no hosts")
    return list(hosts.items())


def select_resources(
    hosts: list[tuple[str, int]], include: str = "", exclude: str = ""
) -> OrderedDict[str, list[int]]:
    """Apply DeepSpeed's `--include`/`--exclude` filter (`host1:0,1@host2`) to a parsed hostfile.

    Returns {host: [slot ids]} in hostfile order, the `world_info` DeepSpeed's runner will build.
    DeepSpeed's own parser does the filtering so the result is exactly what the runner does;
    its ValueErrors become one-line UserErrors.
    """
    if include and exclude:
        raise UserError("launch: --include and --exclude are mutually exclusive")
    # Imported here: deepspeed takes seconds to import and the CLI must stay fast otherwise.
    from deepspeed.launcher.runner import parse_inclusion_exclusion

    pool = OrderedDict(hosts)
    try:
        active = parse_inclusion_exclusion(pool, include, exclude)
    except ValueError as exc:
        which = "include" if include else "exclude"
        raise UserError(f"launch {which} {include or exclude!r}: {exc}") from None
    if not active:
        raise UserError(f"launch exclude {exclude!r}: no slots left on any host")
    return OrderedDict((h, list(s)) for h, s in active.items())


def world_size(resources: Mapping[str, list[int]]) -> int:
    """Total ranks of a resolved resource map."""
    return sum(len(s) for s in resources.values())


def check_resources(spec: ExperimentSpec, resources: Mapping[str, list[int]]) -> None:
    """The hostfile (after filtering) must give `launch.nnodes` hosts of `launch.nproc_per_node`
    slots each: flashctl computes batch sizes from the spec, so a silent mismatch would change
    the recipe."""
    launch = spec.launch
    if len(resources) != launch.nnodes:
        raise UserError(
            f"launch.nnodes: spec says {launch.nnodes} but the hostfile selects {len(resources)} "
            f"host(s) ({', '.join(resources)})"
        )
    odd = {h: len(s) for h, s in resources.items() if len(s) != launch.nproc_per_node}
    if odd:
        raise UserError(
            f"launch.nproc_per_node: spec says {launch.nproc_per_node} but the hostfile selects "
            + ", ".join(f"{h}: {n} slot(s)" for h, n in odd.items())
        )


def _is_loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Command line and environment


def deepspeed_command(
    spec: ExperimentSpec,
    run_dir: str | Path,
    node_rank: int | None = None,
    no_ssh: bool = False,
    include: str = "",
    exclude: str = "",
    worker: str = WORKER_MODULE,
    worker_args: list[str] | None = None,
) -> list[str]:
    """`deepspeed --hostfile ... -m flashctl.distill.worker --run-dir RUN_DIR` for this spec.

    `no_ssh` (with `node_rank`) starts only this node's ranks; otherwise the runner starts every
    node over ssh/pdsh. `worker` is a module name, or a `.py` script path (tests); `worker_args`
    replaces the default `--run-dir RUN_DIR`. The local rank reaches the worker through
    LOCAL_RANK (`--no_local_rank`), not as an argument. The hostfile is validated here.
    """
    launch = spec.launch
    if launch.hostfile is None:
        raise UserError("launch.hostfile: required when launch.backend is 'hostfile'")
    resources = select_resources(parse_hostfile(launch.hostfile), include, exclude)
    check_resources(spec, resources)
    if no_ssh:
        if node_rank is None or not 0 <= node_rank < len(resources):
            raise UserError(f"--node-rank: {node_rank} must be in 0..{len(resources) - 1} with --no-ssh")
    elif node_rank is not None:
        raise UserError("--node-rank: only meaningful with --no-ssh (the ssh launcher numbers nodes itself)")
    if not no_ssh and len(resources) > 1 and shutil.which("pdsh") is None:
        raise UserError(
            "launch.backend: 'hostfile' starts remote nodes with pdsh over ssh, and `pdsh` is not on "
            "PATH; install it, or start every node yourself with --no-ssh --node-rank N"
        )
    if not no_ssh and len(resources) > 1 and _is_loopback(launch.master_addr):
        first = next(iter(resources))
        raise UserError(
            f"launch.master_addr: {launch.master_addr} is a loopback address but the hostfile "
            f"selects {len(resources)} hosts; set it to the address of {first}"
        )
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        f"--hostfile={Path(launch.hostfile).resolve()}",
        f"--master_addr={launch.master_addr}",
        f"--master_port={launch.master_port}",
    ]
    if include:
        cmd.append(f"--include={include}")
    if exclude:
        cmd.append(f"--exclude={exclude}")
    if no_ssh:
        cmd += ["--no_ssh", f"--node_rank={node_rank}"]
    cmd.append("--no_local_rank")
    if not worker.endswith(".py"):
        cmd.append("--module")
    args = ["--run-dir", str(Path(run_dir).resolve())] if worker_args is None else list(worker_args)
    return cmd + [worker, *args]


def node_env(spec: ExperimentSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables the ranks on *other* nodes need, taken from `base` (default os.environ).

    MLflow (tracking URI, run id), Python path, Hugging Face cache / offline switches, torch
    extension cache, threads, NCCL_* / GLOO_* and `flashctl.launch.rank_env`'s accelerator and
    switches. A relative `sqlite:` tracking URI from the spec is made absolute (remote ranks
    start elsewhere).
    """
    env = rank_env(spec.launch.device, None, base)
    out: dict[str, str] = {}
    for key in NODE_ENV_KEYS:
        if key in env:
            out[key] = env[key]
    for key, value in env.items():
        if key.startswith(_NODE_ENV_PREFIXES):
            out[key] = value
    if spec.tracking.enabled and "MLFLOW_TRACKING_URI" not in out:
        out["MLFLOW_TRACKING_URI"] = resolve_uri(spec.tracking.uri)
    return out


def write_deepspeed_env(directory: str | Path, env: Mapping[str, str]) -> Path:
    """Write `directory/.deepspeed_env` (KEY=VALUE lines, the format DeepSpeed's runner reads).

    The runner splits every line at its first `=` (no comments, no blank lines allowed) and
    re-exports the value inside double quotes in a remote shell, so keys must be shell names
    and values must not contain `"`, `$`, backquote, backslash or newlines: such input is a
    ValueError naming the key rather than a silently mangled variable on another node.
    """
    lines = []
    for key, value in env.items():
        if not _ENV_KEY.match(key):
            raise ValueError(f"{ENV_FILE_NAME}: {key!r} is not a valid environment variable name")
        value = str(value)
        bad = sorted(set(value) & _UNSAFE_VALUE_CHARS)
        if bad:
            raise ValueError(f"{ENV_FILE_NAME}: value of {key} contains {bad!r}, which a remote shell would alter")
        lines.append(f"{key}={value}\n")
    path = Path(directory) / ENV_FILE_NAME
    atomic_write_text(path, "".join(lines))
    return path


def launcher_env(spec: ExperimentSpec, run_dir: str | Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the `deepspeed` launcher process; writes `run_dir/.deepspeed_env`.

    It is `local.env_for` (accelerator, threads, warnings filter) plus `node_env` (so a
    `--no_ssh` node, which does not read `.deepspeed_env`, has the same variables) and
    `DS_ENV_FILE` pointing at the run directory's `.deepspeed_env` (read on the ssh path).
    """
    env = env_for(spec, base)
    nodes = node_env(spec, env)
    env.update(nodes)
    env["DS_ENV_FILE"] = str(write_deepspeed_env(run_dir, nodes).resolve())
    return env
