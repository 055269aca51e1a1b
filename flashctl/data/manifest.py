"""`manifest.json`: what a prepared dataset holds, and how to check it.

The manifest is the last file `prepare-data` writes. A directory with a manifest is a complete
dataset: every shard it names exists with the recorded row count and sha256. The dataset
digest (sha256 over the shard digests, in order) is what runs log as their data lineage.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from flashctl.data.schema import COND_SCHEMA, COND_VERSION, SCHEMA_VERSION
from flashctl.errors import UserError
from flashctl.io import atomic_write_text
from flashctl.yamlio import load_json_file

ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
"""The end-of-stream marker that closes every complete Arrow IPC stream."""

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
FORMAT = "flashctl-arrow-shards"


@dataclass(frozen=True)
class ShardEntry:
    """One shard file of a dataset."""

    file: str
    """File name relative to the dataset root (`data-00000-of-00004.arrow`)."""
    rows: int
    """Rows in the shard."""
    sha256: str
    """sha256 of the file's bytes (hex)."""
    bytes: int
    """File size in bytes."""


@dataclass(frozen=True)
class Manifest:
    """A validated `manifest.json` (see `read_manifest`)."""

    root: Path
    """Dataset directory."""
    rows: int
    """Total rows over all shards."""
    shards: list[ShardEntry]
    """Shards in order."""
    digest: str
    """sha256 over the shard digests: the dataset's identity."""
    counts: dict[str, dict[str, int]]
    """Row counts per `task`, `category`, `aspect` and `edit_type`."""
    rejects: int
    """Input rows rejected (listed in `rejects.jsonl`)."""
    filtered: int
    """Valid input rows left out by the composition weights."""
    data_spec: dict[str, Any]
    """The DataSpec used (JSON form)."""
    source: dict[str, Any]
    """Source description (shapes generator or JSONL manifests with their sha256)."""
    raw: dict[str, Any] = field(repr=False)
    """The whole JSON document."""
    conditioning: dict[str, Any] | None = None
    """The cached-conditioning section (`prepare-data --cache-embeddings`; see
    `flashctl.data.conditioning`), checked against its files; None when there is no cache."""

    def shard_paths(self) -> list[Path]:
        """Absolute-or-relative paths of the shards (under `root`)."""
        return [self.root / s.file for s in self.shards]


def dataset_digest(shard_sha256s: list[str]) -> str:
    """sha256 over the shard digests (hex, one per line, in shard order)."""
    return hashlib.sha256("".join(d + "\n" for d in shard_sha256s).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (renames) to disk where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON (sorted keys, stable bytes) to `path` atomically (`io.atomic_write_text`:
    temp file + fsync + os.replace, the temp file removed on failure)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_shard_file(path: Path) -> None:
    """Cheap structural check of a shard: an Arrow IPC stream with this flashctl's schema and
    its end-of-stream marker (a truncated or foreign file fails here, before any batch is
    read). Reads the schema message and the last 8 bytes only."""
    import pyarrow as pa

    from flashctl.data.schema import SCHEMA

    try:
        with pa.memory_map(str(path)) as src:
            schema = pa.ipc.open_stream(src).schema
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not an Arrow IPC stream ({str(exc).splitlines()[0][:120]})") from None
    if not schema.equals(SCHEMA):
        raise UserError(f"{path}: Arrow schema differs from this flashctl's shard schema; re-run `flashctl prepare-data`")
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - len(ARROW_EOS)))
        if fh.read() != ARROW_EOS:
            raise UserError(f"{path}: Arrow stream is truncated (no end-of-stream marker)")


def _field(doc: dict[str, Any], key: str, typ: type, where: Path) -> Any:
    if key not in doc or not isinstance(doc[key], typ):
        raise UserError(f"{where}: field {key!r} is missing or not a {typ.__name__}")
    return doc[key]


def read_manifest(root: str | Path, *, verify: bool = True) -> Manifest:
    """Read and check `root/manifest.json`.

    Always checks the format, schema version, that every shard exists with the recorded size
    and that the digest matches the shard digests. With `verify` (default) every shard's
    sha256 is recomputed; a mismatch raises UserError naming the shard.
    """
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{path}: no manifest (run `flashctl prepare-data` first)")
    doc = load_json_file(path, "dataset manifest")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{path}: not a flashctl dataset manifest (format != {FORMAT!r})")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"{path}: schema_version {doc.get('schema_version')!r}, this flashctl reads {SCHEMA_VERSION}; "
            "re-run `flashctl prepare-data`"
        )
    shards = []
    for i, s in enumerate(_field(doc, "shards", list, path)):
        try:
            if not isinstance(s["file"], str):
                raise TypeError
            shards.append(ShardEntry(file=s["file"], rows=int(s["rows"]), sha256=str(s["sha256"]), bytes=int(s["bytes"])))
        except (KeyError, TypeError, ValueError, OverflowError):
            raise UserError(f"{path}: shards[{i}] needs file, rows, sha256, bytes") from None
        name = shards[-1].file
        if Path(name).name != name or name in ("", ".", "..") or "\x00" in name:
            raise UserError(f"{path}: shards[{i}].file {name[:60]!r} must be a plain file name")
    rows = _field(doc, "rows", int, path)
    if rows != sum(s.rows for s in shards):
        raise UserError(f"{path}: rows {rows} != sum of shard rows {sum(s.rows for s in shards)}")
    digest = _field(doc, "digest", str, path)
    if digest != dataset_digest([s.sha256 for s in shards]):
        raise UserError(f"{path}: digest does not match the shard digests")
    for s in shards:
        shard_path = root / s.file
        if not shard_path.is_file():
            raise UserError(f"{shard_path}: shard listed in {path} is missing")
        size = shard_path.stat().st_size
        if size != s.bytes:
            raise UserError(f"{shard_path}: {size} bytes, manifest says {s.bytes} (corrupt or partial shard)")
        check_shard_file(shard_path)
        if verify:
            actual = file_sha256(shard_path)
            if actual != s.sha256:
                raise UserError(f"{shard_path}: sha256 {actual[:12]}... does not match the manifest ({s.sha256[:12]}...)")
    conditioning = None
    if doc.get("conditioning") is not None:

        conditioning = check_section(root, doc["conditioning"], [s.rows for s in shards], verify)
    return Manifest(
        root=root,
        rows=rows,
        shards=shards,
        digest=digest,
        counts=_field(doc, "counts", dict, path),
        rejects=_field(doc, "rejects", int, path),
        filtered=_field(doc, "filtered", int, path),
        data_spec=_field(doc, "data_spec", dict, path),
        source=_field(doc, "source", dict, path),
        raw=doc,
        conditioning=conditioning,
    )


def check_section(root: Path, cond: Any, shard_rows: list[int], verify: bool) -> dict[str, Any]:
    """Check a manifest's `conditioning` section against the files (called by `read_manifest`)."""
    where = root / "manifest.json"
    if not isinstance(cond, dict) or cond.get("version") != COND_VERSION:
        raise UserError(f"{where}: conditioning cache of another version; re-run `flashctl prepare-data --cache-embeddings`")
    try:
        files = [(str(f["file"]), int(f["rows"]), str(f["sha256"]), int(f["bytes"])) for f in cond["files"]]
        neg = (str(cond["negatives"]["file"]), str(cond["negatives"]["sha256"]))
        model = cond["model"]
        _ = (str(model["path"]), str(model["fingerprint"]), str(model["dtype"]))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where}: conditioning needs files, negatives, model") from None
    if [f[1] for f in files] != shard_rows:
        raise UserError(f"{where}: conditioning files do not match the shards (rows per file)")
    for name, _, digest, size in files + [(neg[0], 0, neg[1], None)]:
        if Path(name).name != name or name in ("", ".", ".."):
            raise UserError(f"{where}: conditioning file {name[:60]!r} must be a plain file name")
        path = root / name
        if not path.is_file():
            raise UserError(f"{path}: conditioning file listed in {where} is missing")
        if size is not None and path.stat().st_size != size:
            raise UserError(f"{path}: {path.stat().st_size} bytes, manifest says {size} (corrupt or partial)")
        if size is not None:  # a sidecar: an Arrow stream of this schema (cheap: the schema message)
            try:
                with pa.memory_map(str(path)) as src:
                    schema = pa.ipc.open_stream(src).schema
            except (pa.ArrowInvalid, OSError):
                raise UserError(f"{path}: not an Arrow IPC stream") from None
            if not schema.equals(COND_SCHEMA):
                raise UserError(f"{path}: conditioning schema differs from this flashctl's; "
                                "re-run `flashctl prepare-data --cache-embeddings`")
        if verify and file_sha256(path) != digest:
            raise UserError(f"{path}: sha256 does not match the manifest")
    return cond
