"""Streaming, byte-deterministic writing of Arrow IPC stream shards.

`ShardWriter` takes record batches of any size and writes shards of exactly `rows_per_shard`
rows (the last one shorter), each made of record batches of `batch_rows` rows. Batch and
shard boundaries depend only on the row index, and every written batch is a fresh copy
(`pa.concat_batches`), so the bytes of a shard depend only on its rows -- not on how the
rows arrived (worker count, chunk size). IPC streams carry no timestamps.

Memory is bounded by one incoming batch plus one output batch: shards are never held whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from flashctl.data.manifest import file_sha256
from flashctl.data.schema import SCHEMA

BATCH_ROWS = 100
"""Rows per record batch inside a shard (what `datasets` uses for image datasets)."""


@dataclass(frozen=True)
class WrittenShard:
    """A finished shard in the staging directory."""

    path: Path
    rows: int
    sha256: str
    bytes: int


class ShardWriter:
    """Write `SCHEMA` record batches into `directory/part-NNNNN.arrow` shards.

    Each shard is first written as `part-NNNNN.arrow.partial`, flushed to disk, hashed and
    then renamed (os.replace), so a `part-*.arrow` file is always complete (the final names, `data-0000i-of-0000N.arrow`,
    are given when the dataset is complete).
    """

    def __init__(self, directory: Path, rows_per_shard: int, batch_rows: int = BATCH_ROWS):
        self.directory = Path(directory)
        self.rows_per_shard = rows_per_shard
        self.batch_rows = max(1, min(batch_rows, rows_per_shard))
        self.shards: list[WrittenShard] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._sink: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._shard_rows = 0

    # ---------------------------------------------------------------------------------
    def write(self, batch: pa.RecordBatch) -> None:
        """Queue `batch` (schema `SCHEMA`) and write every complete output batch."""
        if batch.num_rows == 0:
            return
        if not batch.schema.equals(SCHEMA):
            raise ValueError(f"batch schema differs from the shard schema:\n{batch.schema}")
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        while self._pending_rows >= self._need():
            self._emit(self._need())

    def close(self) -> list[WrittenShard]:
        """Write what is left, finish the last shard and return all shards in order."""
        while self._pending_rows:
            self._emit(min(self._need(), self._pending_rows))
        self._finish_shard()
        return self.shards

    def abort(self) -> None:
        """Close any open file without finishing it (the caller removes the directory)."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._sink.close()
        self._writer = self._sink = None

    # ---------------------------------------------------------------------------------
    def _need(self) -> int:
        return min(self.batch_rows, self.rows_per_shard - self._shard_rows)

    def _take(self, n: int) -> pa.RecordBatch:
        pieces, got = [], 0
        while got < n:
            head = self._pending[0]
            k = min(n - got, head.num_rows)
            pieces.append(head.slice(0, k))
            if k == head.num_rows:
                self._pending.pop(0)
            else:
                self._pending[0] = head.slice(k)
            got += k
        self._pending_rows -= n
        # concat_batches copies into fresh buffers, even for one piece: a sliced batch would
        # otherwise be written with its parent's whole data buffers (different bytes).
        return pa.concat_batches(pieces)

    def _emit(self, n: int) -> None:
        if self._writer is None:
            index = len(self.shards)
            self._path = self.directory / f"part-{index:05d}.arrow"
            self._sink = pa.OSFile(str(self._path) + ".partial", "wb")
            self._writer = pa.ipc.new_stream(self._sink, SCHEMA)
            self._shard_rows = 0
        self._writer.write_batch(self._take(n))
        self._shard_rows += n
        if self._shard_rows == self.rows_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        self._writer = self._sink = None
        partial = Path(str(self._path) + ".partial")
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        digest = file_sha256(partial)
        size = partial.stat().st_size
        os.replace(partial, self._path)
        self.shards.append(WrittenShard(self._path, self._shard_rows, digest, size))
        self._shard_rows = 0
