"""Transformer weights streamed per tensor: partitioned construction and rank-0 sharded export.

Design §5: at 20B nothing is ever whole on one rank. `build_transformer` creates a diffusers
transformer in its training dtype inside `deepspeed.zero.Init` (every submodule is partitioned
as soon as it is constructed; random initialisation is skipped because every parameter is then
read from the files) and fills each rank's partition straight from the safetensors files. Each
rank reads only the rows that overlap its own partition slice, so there is no communication and
no rank ever holds a whole tensor; where DeepSpeed keeps the partition elsewhere (NVMe offload)
or keeps a second partition (ZeRO++ hpZ), the parameter is instead gathered, filled by rank 0
and re-partitioned (`GatheredParameters(modifier_rank=0)`), which DeepSpeed keeps consistent.

`write_transformer` is the way back: it gathers one submodule at a time and rank 0 streams each
tensor into diffusers' sharded layout (`diffusion_pytorch_model-0000i-of-0000N.safetensors` +
index), so the export holds at most one submodule on any rank.

The partition layout used here is DeepSpeed's (`partition_parameters._partition_param`): the
flattened parameter, padded to a multiple of the world size, split into equal contiguous chunks
in rank order of the parameter's process group.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Iterable, Literal

import torch

from flashctl.errors import UserError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = f"{WEIGHTS_NAME}.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3  # diffusers' own default is 10 GB; smaller shards load in parallel

LoadMode = Literal["auto", "slice", "gather"]


# --------------------------------------------------------------------------------------------
# Files


def transformer_folder(path: str | Path, subfolder: str = "transformer") -> Path:
    """The folder with the transformer's config.json and safetensors of a pipeline `path`.

    A local pipeline folder is used as is; anything else is a hub id whose `subfolder` is fetched
    (only that subfolder: the text encoder and VAE are loaded by the adapter)."""
    local = Path(path).expanduser()
    if local.is_dir():
        folder = local / subfolder
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(str(path), allow_patterns=[f"{subfolder}/*"])) / subfolder
        except Exception as exc:  # offline, unknown repo, no access
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: cannot fetch {subfolder}/ ({first})") from None
    if not (folder / "config.json").is_file():
        raise UserError(f"{path}: no {subfolder}/config.json (need a diffusers pipeline folder)")
    return folder


def weight_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or the single weights file."""
    index = folder / INDEX_NAME
    if index.is_file():
        entries = json.loads(index.read_text())["weight_map"]
        return {name: folder / fname for name, fname in entries.items()}
    single = folder / WEIGHTS_NAME
    if not single.is_file():
        raise UserError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {name: single for name in f.keys()}


def _model_class(config: dict[str, Any]):
    import diffusers

    name = config.get("_class_name", "QwenImageTransformer2DModel")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise UserError(f"transformer config names class {name!r}, which diffusers does not have")
    return cls


# --------------------------------------------------------------------------------------------
# Construction


def build_transformer(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    zero_config: dict[str, Any] | None = None,
    load: LoadMode = "auto",
    process_group: Any = None,
) -> torch.nn.Module:
    """The transformer of pipeline `path` in `dtype`, its weights read from the safetensors files.

    With `zero_config` (the DeepSpeed config of the engine it is for) it is built partitioned
    inside `deepspeed.zero.Init`, and each rank fills its own partition (`load`: "slice" reads
    only this rank's rows, "gather" lets rank 0 fill each gathered tensor, "auto" slices where
    the partition is a plain tensor); hand it to `deepspeed.initialize` as is. Without, it is a
    plain replica on `device` (diffusers' own low-memory loader). The global RNG is untouched.
    `process_group` (with `zero_config`): the ranks to partition over (default: all; a frozen
    teacher may be split within its node, `engine.node_group`).
    A collective with `zero_config`: call on every rank.
    """
    folder = transformer_folder(path)
    if zero_config is None:
        cls = _model_class(json.loads((folder / "config.json").read_text()))
        model = cls.from_pretrained(str(folder), torch_dtype=dtype)
        return model.to(device)

    import deepspeed
    import diffusers  # noqa: F401  (imports torch._dynamo first: zero.Init needs it, design §8)
    from diffusers.models.modeling_utils import no_init_weights

    config = json.loads((folder / "config.json").read_text())
    cls = _model_class(config)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), no_init_weights():
        # the dtype comes from the config's bf16/fp16 switches: DeepSpeed 0.19 ignores an explicit
        # `dtype` on accelerators without fp16 (the CPU one) and builds bf16 even for an fp32 run
        with deepspeed.zero.Init(config_dict_or_path=zero_config, data_parallel_group=process_group):
            model = cls.from_config(config)
    got = next(model.parameters()).dtype
    if got != dtype:
        raise ValueError(f"zero.Init built {got} parameters, expected {dtype}: the DeepSpeed config's "
                         "bf16/fp16 switches must match the training dtype")
    load_weights(model, weight_map(folder), mode=load)
    return model


def _is_partitioned(p: torch.Tensor) -> bool:
    return getattr(p, "ds_tensor", None) is not None


def _can_slice(p: torch.Tensor) -> bool:
    part = p.ds_tensor
    return (getattr(part, "final_location", None) is None  # not swapped to NVMe
            and getattr(p, "ds_secondary_tensor", None) is None  # no hpZ second copy to keep in sync
            and part.numel() == part.ds_numel)


def _fill_slice(p: torch.Tensor, tensor_slice: Any) -> None:
    """Copy this rank's partition of the file tensor behind `tensor_slice` into `p.ds_tensor`."""
    import deepspeed.comm as dist

    part = p.ds_tensor
    size = part.ds_numel
    start = dist.get_rank(group=p.ds_process_group) * size
    end = min(start + size, p.ds_numel)
    if start >= end:  # this rank's chunk is all padding
        return
    shape = tuple(p.ds_shape)
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    r0, r1 = start // row, -(-end // row)
    rows = tensor_slice[r0:r1] if shape else tensor_slice[:]
    flat = rows.reshape(-1)[start - r0 * row: end - r0 * row]
    with torch.no_grad():
        part.narrow(0, 0, end - start).copy_(flat.to(part.dtype))


def load_weights(model: torch.nn.Module, files: dict[str, Path], mode: LoadMode = "auto") -> None:
    """Fill every parameter and persistent buffer of `model` from `files` (name -> safetensors).

    Names must match exactly both ways (a missing or extra tensor is a UserError naming the
    folder): a silently half-loaded student would train from noise. Values are cast to each
    parameter's dtype. Partitioned parameters are filled as described in the module docstring;
    a collective when any is filled by gathering."""
    import deepspeed
    from safetensors import safe_open

    params = dict(model.named_parameters())
    buffers = {n: b for n, b in _persistent_buffers(model)}
    wanted = set(params) | set(buffers)
    missing, extra = wanted - files.keys(), files.keys() - wanted
    if missing or extra:
        folder = next(iter(files.values())).parent if files else "?"
        raise UserError(f"{folder}: weights do not match the model config (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(extra)[:3]})")
    by_file: dict[Path, list[str]] = {}
    for name in sorted(wanted):  # sorted: every rank visits the tensors in one order (gathers are collective)
        by_file.setdefault(files[name], []).append(name)
    for fname in sorted(by_file):
        with safe_open(str(fname), "pt") as f:
            for name in by_file[fname]:
                if name in buffers:
                    buffers[name].data.copy_(f.get_tensor(name).to(buffers[name].dtype))
                    continue
                p = params[name]
                if not _is_partitioned(p):
                    with torch.no_grad():
                        p.data.copy_(f.get_tensor(name).to(p.dtype))
                elif mode == "slice" or (mode == "auto" and _can_slice(p)):
                    _fill_slice(p, f.get_slice(name))
                else:
                    # modifier_rank is a rank of the parameter's group (a node group has its own 0)
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                        if deepspeed.comm.get_rank(group=p.ds_process_group) == 0:
                            p.data.copy_(f.get_tensor(name).to(p.dtype))


def _persistent_buffers(model: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    for mod_name, mod in model.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf


# --------------------------------------------------------------------------------------------
# Export


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def _full_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.ds_shape) if _is_partitioned(t) else tuple(t.shape)


def plan_shards(tensors: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int) -> list[list[int]]:
    """Split tensors (in order) into shards of at most `max_shard_bytes` (a bigger tensor gets its
    own shard). Known before any gather, so file names can carry the shard count."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(tensors):
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


class _ShardWriter:
    """Writes one safetensors file tensor by tensor: the header (names, dtypes, shapes, offsets)
    is known up front, so no tensor waits in memory for the others."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self.sizes = {}
        for name, shape, dtype in entries:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.sizes[name] = n
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.order = [e[0] for e in entries]
        self.next = 0
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.order[self.next] != name:
            raise RuntimeError(f"shard writer expected {self.order[self.next]}, got {name}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if len(data) != self.sizes[name]:
            raise RuntimeError(f"{name}: {len(data)} bytes, header says {self.sizes[name]}")
        self.file.write(data)
        self.next += 1

    def close(self) -> None:
        self.file.close()


def write_transformer(
    module: torch.nn.Module,
    folder: Path | None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    on_gathered: Any = None,
) -> None:
    """Write `module` (partitioned or not) as a diffusers model folder: config.json + sharded
    safetensors (+ index when more than one shard), loadable with `from_pretrained`.

    A collective: call on every rank in the same order; rank 0 passes the `folder` to write,
    the others None. Parameters are gathered one submodule at a time (read-only
    `GatheredParameters`), so no rank ever holds more than one submodule's full weights; rank 0
    writes each tensor (cast to `dtype`, default its own) as soon as it has it. `on_gathered`
    (optional) is called with the bytes held while each submodule is gathered (for measurements).
    """
    import deepspeed

    entries: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    groups: list[tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]] = []
    buffers = {n for n, _ in _persistent_buffers(module)}
    for mod_name, mod in module.named_modules():
        own_p = [(f"{mod_name}.{n}" if mod_name else n, p) for n, p in mod._parameters.items() if p is not None]
        own_b = [(f"{mod_name}.{n}" if mod_name else n, b) for n, b in mod._buffers.items()
                 if b is not None and (f"{mod_name}.{n}" if mod_name else n) in buffers]
        if own_p or own_b:
            groups.append((own_p, own_b))
            for name, t in own_p + own_b:
                entries.append((name, _full_shape(t), dtype or t.dtype if t.is_floating_point() else t.dtype))
    shards = plan_shards(entries, max_shard_bytes)
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
                                            for i in range(n)]
    shard_of = {entries[i][0]: s for s, idx in enumerate(shards) for i in idx}
    writers: dict[int, _ShardWriter] = {}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        module.save_config(folder)
    for own_p, own_b in groups:
        partitioned = [p for _, p in own_p if _is_partitioned(p)]
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None, enabled=bool(partitioned)):
            if on_gathered is not None:
                on_gathered(sum(p.numel() * p.element_size() for p in partitioned))
            if folder is None:
                continue
            for name, t in own_p + own_b:
                s = shard_of[name]
                if s not in writers:
                    writers[s] = _ShardWriter(folder / names[s], [entries[i] for i in shards[s]])
                target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
                writers[s].write(name, t.detach().to(target))
                if writers[s].next == len(writers[s].order):
                    writers.pop(s).close()
    if folder is None:
        return
    for w in writers.values():  # pragma: no cover - every shard is complete once all groups ran
        w.close()
    if n > 1:
        total = sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for _, shape, dt in entries)
        index = {"metadata": {"total_size": total}, "weight_map": {name: names[shard_of[name]] for name, _, _ in entries}}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
