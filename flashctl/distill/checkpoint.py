"""Checkpoints of DeepSpeed engines + trainer state, with an atomic `latest` pointer.

Layout (one directory per tag; each engine in DeepSpeed's own layout inside it)::

    <ckpt_dir>/
      latest                         tag of the newest COMPLETE checkpoint (rank 0, atomic)
      step-00000050/
        student/                     engine.save_checkpoint(<ckpt_dir>/step-00000050, tag="student")
          mp_rank_00_model_states.pt
          zero_pp_rank_<r>_mp_rank_00_optim_states.pt   (one per rank)
        critic/ ...
        trainer_state/rank_00000.pt  global step, RNG states, ... (one per rank, tensors + plain data)

`latest` is replaced (temp file + os.replace) by rank 0 only after a barrier that follows
every rank's writes, so a crash mid-save leaves the previous pointer; a tag directory the
pointer does not name is ignored on resume and removed before it is written again.
Trainer state is read back with ``torch.load(weights_only=True)``: no arbitrary pickle.
The directory must be on a filesystem every rank sees (every rank writes its shard).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashctl.errors import UserError

LATEST = "latest"
STATE_DIR = "trainer_state"
_TAG_RE = re.compile(r"^step-(\d+)$")


def tag_for_step(step: int) -> str:
    """Checkpoint tag of a global step; zero-padded so tags sort like steps."""
    return f"step-{step:08d}"


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """Tag of the newest complete checkpoint in `ckpt_dir`, or None when there is none."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not tag or not (Path(ckpt_dir) / tag).is_dir():
        raise UserError(f"{pointer}: names checkpoint {tag!r} but {Path(ckpt_dir) / tag} does not exist")
    return tag


# --------------------------------------------------------------------------------------------
# Trainer state (RNGs, step counters): plain data and tensors only


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python `random`, numpy's global RNG, torch CPU (and CUDA) as tensors/ints."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(
        (nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(obj: Any, where: str) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"trainer state {where}: key {k!r} is not a str/int")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"trainer state {where}: {type(obj).__name__} is not loadable with weights_only")


def _state_path(tag_dir: Path, rank: int) -> Path:
    return tag_dir / STATE_DIR / f"rank_{rank:05d}.pt"


# --------------------------------------------------------------------------------------------
# Save / resume


def save_checkpoint(
    ckpt_dir: str | Path, tag: str, engines: Mapping[str, Any], trainer_state: Mapping[str, Any]
) -> Path:
    """Save every engine and this rank's trainer state under `tag`, then move `latest` to it.

    Call on ALL ranks with the same tag and engine names (engine saves are collectives).
    `trainer_state` is this rank's plain data (ints, floats, str, tensors, lists, dicts);
    the world size is recorded with it. Returns the tag directory.
    """
    _check_plain(dict(trainer_state), "<root>")
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / tag
    rank, world = _rank(), _world()
    if latest_tag(ckpt_dir) == tag:  # checked on every rank so all raise together
        raise ValueError(f"{tag_dir}: refusing to overwrite the latest complete checkpoint in place")
    if rank == 0:
        if tag_dir.exists():  # left over from an interrupted save: never pointed to
            shutil.rmtree(tag_dir)
        tag_dir.mkdir(parents=True)
    _barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(tag_dir), tag=name, save_latest=False)
    state = {**trainer_state, "world_size": world, "rank": rank, "tag": tag}
    path = _state_path(tag_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, path)
    _barrier()  # every rank's shards and state are on disk
    if rank == 0:
        _atomic_write_bytes(ckpt_dir / LATEST, tag.encode())
    _barrier()  # nobody reads `latest` (or exits) before it moved
    return tag_dir


def load_checkpoint(ckpt_dir: str | Path, engines: Mapping[str, Any]) -> dict[str, Any] | None:
    """Load the latest complete checkpoint into `engines`; returns this rank's trainer state.

    Returns None when `ckpt_dir` holds no complete checkpoint (fresh start). Call on ALL
    ranks. The world size must match the one that saved (ZeRO shards are per rank).
    """
    ckpt_dir = Path(ckpt_dir)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    tag_dir = ckpt_dir / tag
    rank, world = _rank(), _world()
    path = _state_path(tag_dir, rank)
    if not path.is_file():
        raise UserError(f"{path}: missing; checkpoint {tag!r} was not written by {world} ranks")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("world_size") != world:
        raise UserError(
            f"{tag_dir}: saved by {state.get('world_size')} ranks, cannot resume on {world} "
            "(ZeRO-3 shards are per rank)"
        )
    for name, engine in engines.items():
        loaded, _ = engine.load_checkpoint(
            str(tag_dir), tag=name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise UserError(f"{tag_dir / name}: DeepSpeed could not load engine {name!r}")
    return state


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> list[str]:
    """Rank 0, after a save: delete all but the newest `keep` step tags (never `latest`'s)."""
    if keep < 1:
        raise ValueError(f"keep {keep} must be >= 1")
    ckpt_dir = Path(ckpt_dir)
    current = latest_tag(ckpt_dir)
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG_RE.match(p.name))
    doomed = [t for t in tags[:-keep] if t != current]
    for t in doomed:
        shutil.rmtree(ckpt_dir / t)
    return doomed


def export_fp32(ckpt_dir: str | Path, engine_name: str, out_dir: str | Path, tag: str | None = None,
                max_shard_size: str = "5GB") -> Path:
    """Consolidate one engine's ZeRO shards into fp32 weights: a folder of sharded safetensors
    (`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json` when over
    `max_shard_size`, else one `model.safetensors`).

    DeepSpeed's `convert_zero_checkpoint_to_fp32_state_dict` in its lazy mode does the work: it
    reads every rank's shard files (no process group needed) and materialises one output shard
    at a time, so a 20B engine never sits whole in host memory. Run it on one rank. The folder
    is written beside `out_dir` and moved into place complete. `tag` defaults to the latest
    complete checkpoint."""
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise UserError(f"{ckpt_dir}: no complete checkpoint to export")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        # our layout: <ckpt_dir>/<tag>/<engine>/..., i.e. DeepSpeed's checkpoint dir + tag
        convert_zero_checkpoint_to_fp32_state_dict(str(ckpt_dir / tag), str(staging), max_shard_size=max_shard_size,
                                                   safe_serialization=True, tag=engine_name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def load_fp32(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an `export_fp32` folder (all its shards), by name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --------------------------------------------------------------------------------------------
# Graceful stop


class StopRequest:
    """Set by a signal handler; the training loop asks `should_stop()` once per step.

    `should_stop` all-reduces the flag (MAX) so every rank agrees even when only one got the
    signal: they then all write the checkpoint (a collective) and exit cleanly together.
    """

    def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def should_stop(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank if any rank received a stop signal (a collective)."""
        flag = torch.tensor([1 if self.signum is not None else 0], dtype=torch.int32, device=device)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        """Put the previous signal handlers back."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


def install_stop_handler(signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGUSR1)) -> StopRequest:
    """Catch `signals` (default SIGTERM and Slurm's pre-timeout SIGUSR1) into a StopRequest."""
    return StopRequest(signals)
