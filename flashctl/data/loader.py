"""Batches of decoded rows from a prepared dataset, sharded across ranks, resumable.

Order of one epoch (a pure function of seed, epoch, the dataset and the filters):

1. the rows passing the filters (task, category/aspect weight > 0) are grouped by aspect;
2. each aspect's rows are permuted with ``numpy.random.default_rng([seed, epoch])`` and cut
   into batches of `batch_size` (the last one of each aspect may be shorter; `drop_last`
   drops it), so a batch holds one aspect -- one image size;
3. the batches of all aspects are permuted with the same generator;
4. rank r of W takes batches r, r+W, r+2W, ... ; within a rank, DataLoader worker k of K takes
   every K-th of the remaining batches, and torch hands them back round-robin, i.e. in order.

So every row is in exactly one batch of one rank per epoch (ranks may differ by one batch).
The position (batches consumed by this rank in this epoch) and the epoch make the state;
`load_state_dict` resumes exactly where `state_dict` was taken, without decoding the skipped
batches. Composition weights are filters here (0 = excluded); the shares of categories and
aspects are those of the prepared data (`prepare-data` applies the weights when generating).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flashctl.data.manifest import Manifest, read_manifest
from flashctl.data.schema import ASPECTS, COLUMNS, IMAGE_COLUMNS, row_from_arrow
from flashctl.errors import UserError
from flashctl.images import decode_png, to_tensor
from flashctl.spec import DataSpec


def _open_table(path: Path) -> pa.Table:
    # memory_map: buffers point into the file; only touched pages are read.
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: corrupt Arrow shard ({str(exc).splitlines()[0][:120]})") from None


class _Shards:
    """Memory-mapped shard tables of a dataset, opened lazily (per process); with `cond_paths`
    each row also gets its cached conditioning (the sidecar's row) under `cond`."""

    def __init__(self, paths: list[Path], offsets: np.ndarray, cond_paths: list[Path] | None = None,
                 columns: list[str] | None = None):
        self.paths = paths
        self.offsets = offsets
        self.cond_paths = cond_paths
        self.columns = columns
        self._tables: dict[int, pa.Table] = {}
        self._cond: dict[int, pa.Table] = {}

    def table(self, i: int) -> pa.Table:
        if i not in self._tables:
            self._tables[i] = _open_table(self.paths[i])
        return self._tables[i]

    def rows(self, indices: np.ndarray) -> list[dict[str, Any]]:
        """Rows at global indices, in the given order."""
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        out: list[dict[str, Any] | None] = [None] * len(indices)
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            local = pa.array(indices[sel] - self.offsets[s])
            table = self.table(int(s))
            if self.columns is not None:
                table = table.select(self.columns)
            rows = table.take(local).to_pylist()
            if self.cond_paths is not None:
                if int(s) not in self._cond:
                    self._cond[int(s)] = _open_table(self.cond_paths[int(s)])
                for row, cond in zip(rows, self._cond[int(s)].take(local).to_pylist()):
                    if cond["id"] != row["id"]:
                        raise UserError(f"{self.cond_paths[int(s)]}: row {cond['id']!r} where the shard has "
                                        f"{row['id']!r} (cache out of step with the shards)")
                    row["cond"] = cond
            for j, row in zip(sel, rows):
                out[j] = row_from_arrow(row)
        return out  # type: ignore[return-value]

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "offsets": self.offsets, "cond_paths": self.cond_paths,
                "columns": self.columns, "_tables": {}, "_cond": {}}


def collate(rows: list[dict[str, Any]], return_rows: bool = False, cond: dict[str, Any] | None = None) -> dict[str, Any]:
    """Decode rows of one aspect into a batch dict.

    Keys: ids, prompts, tasks, categories, aspects, edit_types (lists); width, height (ints);
    images (B,3,H,W float in [-1,1], zeros where a row has none) + has_image (bool B);
    source_images + has_source likewise when any row has a source image; rows (raw dicts)
    when `return_rows`. Rows read without their image columns (a loader over cached
    conditioning) give no images. With `cond` (the manifest's conditioning section) and rows
    that carry it: `cond` = `decode_conditioning(rows, cond)`.
    """
    width, height = rows[0]["width"], rows[0]["height"]
    if any((r["width"], r["height"]) != (width, height) for r in rows):
        raise ValueError("a batch mixes image sizes; rows of one aspect must share one size")
    blank = np.zeros((height, width, 3), dtype=np.uint8)

    def images(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        has = torch.tensor([r[key] is not None for r in rows])
        arrays = [decode_png(r[key]) if h else blank for r, h in zip(rows, has.tolist())]
        for a in arrays:
            if a.shape != (height, width, 3):
                raise ValueError(f"{key} is {a.shape[1]}x{a.shape[0]}, row says {width}x{height}")
        tensor = to_tensor(arrays)
        tensor[~has] = 0.0
        return tensor, has

    batch: dict[str, Any] = {
        "ids": [r["id"] for r in rows],
        "prompts": [r["prompt"] for r in rows],
        "tasks": [r["task"] for r in rows],
        "categories": [r["category"] for r in rows],
        "aspects": [r["aspect"] for r in rows],
        "edit_types": [r["edit_type"] for r in rows],
        "width": width,
        "height": height,
    }
    if "image" in rows[0]:
        batch["images"], batch["has_image"] = images("image")
        if any(r["source_image"] is not None for r in rows):
            batch["source_images"], batch["has_source"] = images("source_image")
    if cond is not None:
        batch["cond"] = decode_conditioning(rows, cond)
    if return_rows:
        batch["rows"] = rows
    return batch


def decode_conditioning(rows: list[dict[str, Any]], cond: dict[str, Any]) -> dict[str, Any]:
    """The cached tensors of a batch's rows (see `flashctl.data.conditioning`), unpadded.

    Keys: embeds (list of (L_i, D)); neg_embeds (list, edit rows; None for T2I); latents (list
    of (seq, C) or None per row without an image); source_latents ((B, seq_src, C), edits, else
    None); source_size ((height, width), edits, else None). Dtype: the cache's."""
    from flashctl.data.conditioning import tensor_from

    dtype, channels = cond["model"]["dtype"], int(cond["latent_channels"])
    c = [r["cond"] for r in rows]
    out: dict[str, Any] = {
        "embeds": [tensor_from(x["embeds"], x["embeds_len"], dtype) for x in c],
        "latents": [None if x["latents"] is None else tensor_from(x["latents"], -1, dtype, channels) for x in c],
        "neg_embeds": None, "source_latents": None, "source_size": None,
    }
    if all(x["neg_embeds"] is not None for x in c):
        import torch

        out["neg_embeds"] = [tensor_from(x["neg_embeds"], x["neg_len"], dtype) for x in c]
        out["source_latents"] = torch.stack([tensor_from(x["source_latents"], -1, dtype, channels) for x in c])
        sizes = {(x["source_height"], x["source_width"]) for x in c}
        if len(sizes) != 1:
            raise ValueError(f"edit sources of one batch have different cached sizes {sorted(sizes)}")
        out["source_size"] = sizes.pop()
    return out


class _EpochBatches(IterableDataset):
    """The batches (lists of global row indices) left in one rank's epoch, decoded."""

    def __init__(self, shards: _Shards, batches: list[np.ndarray], return_rows: bool, cond: dict[str, Any] | None = None):
        self.shards = shards
        self.batches = batches
        self.return_rows = return_rows
        self.cond = cond

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.batches if info is None else self.batches[info.id :: info.num_workers]
        for indices in mine:
            yield collate(self.shards.rows(indices), self.return_rows, self.cond)


class ShardLoader:
    """Iterate a prepared dataset in aspect-bucketed batches; see the module docstring.

    `task` ('t2i' / 'edit' / None = both) and the `categories` / `aspects` weights (None =
    all; 0 or absent = excluded) filter rows; `rank` / `world_size` shard batches across
    data-parallel ranks; `num_workers` decodes in DataLoader worker processes (same order);
    `return_rows` adds the raw rows (PNG bytes, scene JSON) to each batch; `verify` checks
    the shard sha256s on open. `conditioning` reads the dataset's cached conditioning
    (`prepare-data --cache-embeddings`) into each batch's `cond` and skips decoding the
    images (nothing then needs the pixels).

    `for batch in loader` yields the rest of the current epoch, then moves to the next epoch;
    `loader.batches()` runs forever. `state_dict()` / `load_state_dict()` save and restore
    (epoch, position).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        batch_size: int,
        task: str | None = None,
        categories: dict[str, float] | None = None,
        aspects: dict[str, float] | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
        return_rows: bool = False,
        verify: bool = True,
        multiprocessing_context: str | None = None,
        conditioning: bool = False,
    ):
        if batch_size < 1:
            raise UserError(f"batch_size {batch_size}: must be >= 1")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} outside 0..{world_size - 1}")
        if task not in (None, "t2i", "edit"):
            raise UserError(f"task {task!r}: expected 't2i', 'edit' or None")
        self.manifest: Manifest = read_manifest(root, verify=verify)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.num_workers, self.drop_last, self.return_rows = seed, num_workers, drop_last, return_rows
        self.multiprocessing_context = multiprocessing_context
        self.epoch = 0
        self.position = 0
        paths = self.manifest.shard_paths()
        offsets = np.cumsum([0] + [s.rows for s in self.manifest.shards])
        self.conditioning = self.manifest.conditioning if conditioning else None
        if conditioning and self.conditioning is None:
            raise UserError(f"{self.manifest.root}: no cached conditioning (run `flashctl prepare-data SPEC --cache-embeddings`)")
        cond_paths = columns = None
        if self.conditioning is not None:
            cond_paths = [self.manifest.root / f["file"] for f in self.conditioning["files"]]
            columns = [c for c in COLUMNS if c not in IMAGE_COLUMNS] if not return_rows else None
        self._shards = _Shards(paths, offsets, cond_paths, columns)
        self._by_aspect = self._index(task, categories, aspects)
        if not any(len(v) for v in self._by_aspect.values()):
            raise UserError(
                f"{self.manifest.root}: no rows match task={task}, categories={categories}, aspects={aspects}"
            )

    @classmethod
    def from_spec(cls, data: DataSpec, **kwargs: Any) -> ShardLoader:
        """A loader over `data.root` filtered by the spec's category/aspect weights."""
        kwargs.setdefault("categories", dict(data.categories))
        kwargs.setdefault("aspects", dict(data.aspects))
        return cls(data.root, **kwargs)

    def _index(self, task: str | None, categories: dict[str, float] | None, aspects: dict[str, float] | None) -> dict[str, np.ndarray]:
        """Global row indices passing the filters, per aspect (ascending)."""
        parts: dict[str, list[np.ndarray]] = {a: [] for a in ASPECTS}
        for i in range(len(self.manifest.shards)):
            t = self._shards.table(i).select(["task", "category", "aspect"]).to_pydict()
            ok = np.ones(len(t["task"]), dtype=bool)
            if task is not None:
                ok &= np.array([v == task for v in t["task"]], dtype=bool)
            if categories is not None:
                ok &= np.array([categories.get(v, 0) > 0 for v in t["category"]], dtype=bool)
            if aspects is not None:
                ok &= np.array([aspects.get(v, 0) > 0 for v in t["aspect"]], dtype=bool)
            aspect_arr = np.array(t["aspect"], dtype=object)
            for a in ASPECTS:
                parts[a].append(np.flatnonzero(ok & (aspect_arr == a)) + self._shards.offsets[i])
        self._shards._tables.clear()  # do not keep maps of every shard in the parent
        return {a: np.concatenate(v).astype(np.int64) if v else np.zeros(0, np.int64) for a, v in parts.items()}

    # ------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches (arrays of global row indices) of `epoch`, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[np.ndarray] = []
        for a in ASPECTS:
            perm = rng.permutation(self._by_aspect[a])
            for s in range(0, len(perm), self.batch_size):
                b = perm[s : s + self.batch_size]
                if len(b) == self.batch_size or not self.drop_last:
                    batches.append(b)
        order = rng.permutation(len(batches))
        return [batches[i] for i in order][self.rank :: self.world_size]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.epoch_batches(0))

    @property
    def rows(self) -> int:
        """Rows passing the filters (all ranks)."""
        return sum(len(v) for v in self._by_aspect.values())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self.epoch_batches(self.epoch)[self.position :]
        if plan:
            dataset = _EpochBatches(self._shards, plan, self.return_rows, self.conditioning)
            if self.num_workers > 0:
                it: Any = DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.num_workers,
                    multiprocessing_context=self.multiprocessing_context,
                )
            else:
                it = iter(dataset)
            for batch in it:
                self.position += 1
                yield batch
        self.epoch += 1
        self.position = 0

    def batches(self) -> Iterator[dict[str, Any]]:
        """Batches forever, epoch after epoch."""
        if len(self) == 0:
            raise UserError(
                f"{self.manifest.root}: rank {self.rank} of {self.world_size} gets no batch "
                f"({self.rows} rows, batch_size {self.batch_size})"
            )
        while True:
            yield from self

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position (batches consumed this epoch) and what they refer to."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "digest": self.manifest.digest,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state` (from `state_dict`); refuses a state of another dataset/layout."""
        ours = {"seed": self.seed, "digest": self.manifest.digest, "world_size": self.world_size}
        for key, value in ours.items():
            if key in state and state[key] != value:
                raise UserError(f"loader state: {key} {state[key]!r} differs from this loader's {value!r}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
