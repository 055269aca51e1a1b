"""Inputs a careless or hostile user can hand the CLI, and what each must give.

One table, `CASES`: (name, how to make the input, command, expected substring). Every case
runs the real CLI (typer's CliRunner, in process) and must end with a non-zero exit through
`typer.Exit` (an uncaught exception would be a traceback for a user), exactly one `error`
line naming the file / field with the expected text, and no file written (nothing
half-written). Bombs (alias expansion, deep nesting, huge lines / images / files) are
refused by size before any expensive work, so each case takes well under a second or two.

The JSONL rows of the table are also checked together without `--strict`: each becomes a
counted reject in `rejects.jsonl`, the good row is written.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from flashctl.cli import app
from flashctl.data.manifest import dataset_digest, file_sha256
from flashctl.data.prepare import prepare_data
from flashctl.spec import DataSpec

# ------------------------------------------------------------------------------------------
# Input makers


def _write(name: str, data: str | bytes) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)

    return make


def _laughs(levels: int = 9, inline: bool = False) -> str:
    """The "billion laughs": 10 aliases per level, 10^levels leaves from a few hundred bytes."""
    names = "abcdefghijk"
    parts = [f"&a [{', '.join(['lol'] * 10)}]"]
    parts += [f"&{names[i]} [{', '.join([f'*{names[i - 1]}'] * 10)}]" for i in range(1, levels + 1)]
    if inline:
        return "[" + ", ".join(parts) + "]"
    return "".join(f"{names[i]}: {p}\n" for i, p in enumerate(parts))


def _png_bytes(size=(40, 40), colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming `width` x `height`, with almost no pixel data:
    what a decompression bomb looks like to a reader before it decodes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)  # a huge file that costs no disk


# JSONL lines: name -> (function writing any images into the directory and returning the
# line's bytes, expected reject reason). Used one per case with --strict, and all together.
def _img(name: str, data: bytes | Callable[[Path], None]) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / "img").mkdir(exist_ok=True)
        if callable(data):
            data(tmp / "img" / name)
        else:
            (tmp / "img" / name).write_bytes(data)

    return make


def _row(obj: dict, *makers: Callable[[Path], None]) -> Callable[[Path], bytes]:
    def make(tmp: Path) -> bytes:
        for m in makers:
            m(tmp)
        return json.dumps(obj).encode()

    return make


def _raw(line: bytes) -> Callable[[Path], bytes]:
    return lambda tmp: line


JSONL_LINES: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "jsonl-not-utf8": (_raw(b'{"id": "a", "prompt": "caf\xe9"}'), "bad JSON: line is not UTF-8"),
    "jsonl-huge-line": (_raw(b'{"id": "a", "prompt": "' + b"x" * (2 << 20) + b'"}'), "bad JSON: line longer than"),
    "jsonl-duplicate-key": (_raw(b'{"id": "a", "prompt": "x", "prompt": "y"}'), "bad JSON: duplicate key 'prompt'"),
    "jsonl-deep-nesting": (_raw(b"[" * 200_000), "bad JSON: nested too deeply"),
    "jsonl-huge-number": (_raw(b'{"id": "a", "prompt": "x", "size": [1' + b"0" * 5000 + b", 2]}"), "bad JSON: Exceeds the limit"),
    "jsonl-not-an-object": (_raw(b'["id", "prompt"]'), "bad JSON: a row must be an object"),
    "jsonl-missing-image": (_row({"id": "a", "prompt": "x", "image": "img/nope.png"}), "image not found"),
    "jsonl-image-is-dir": (_row({"id": "a", "prompt": "x", "image": "img"}, _img("x.png", _png_bytes())), "image not found"),
    "jsonl-corrupt-image": (_row({"id": "a", "prompt": "x", "image": "img/c.png"}, _img("c.png", os.urandom(2000))),
                            "cannot decode image"),
    "jsonl-truncated-png": (_row({"id": "a", "prompt": "x", "image": "img/t.png"},
                                 _img("t.png", _png_bytes((64, 64))[:-300])), "cannot decode image"),
    "jsonl-bomb-png-over-pillow-limit": (_row({"id": "a", "prompt": "x", "image": "img/b1.png"},
                                              _img("b1.png", _png_header_only(40_000, 40_000))),
                                         "cannot decode image 'img/b1.png': DecompressionBombError"),
    "jsonl-bomb-png-over-our-limit": (_row({"id": "a", "prompt": "x", "image": "img/b2.png"},
                                           _img("b2.png", _png_header_only(8_000, 8_000))), "image too large"),
    "jsonl-huge-image-file": (_row({"id": "a", "prompt": "x", "image": "img/h.png"},
                                   _img("h.png", lambda p: _sparse(p, 100 << 20))), "image too large"),
    "jsonl-nul-in-path": (_row({"id": "a", "prompt": "x", "image": "img/a\u0000b.png"}), "bad path: image"),
    "jsonl-path-escapes": (_row({"id": "a", "prompt": "x", "image": "../outside.png"}), "path escapes the manifest directory"),
    "jsonl-edit-without-source": (_row({"id": "a", "instruction": "make it red"}), "missing key 'source_image'"),
}


def _jsonl(name: str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / "m.jsonl").write_bytes(JSONL_LINES[name][0](tmp) + b"\n")

    return make


# Prepared datasets: a good one (module fixture) copied to tmp/ds and broken.
def _dataset(change: Callable[[Path, dict], None]) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        ds = tmp / "ds"
        shutil.copytree(GOOD_DS, ds)
        doc = json.loads((ds / "manifest.json").read_text())
        change(ds, doc)
        if doc:  # an emptied doc: the change wrote manifest.json itself
            (ds / "manifest.json").write_text(json.dumps(doc))

    return make


def _consistent(doc: dict, ds: Path) -> None:
    """Make the manifest agree with the shard files as they now are (a forged manifest)."""
    for s in doc["shards"]:
        p = ds / s["file"]
        s["bytes"], s["sha256"] = p.stat().st_size, file_sha256(p)
    doc["digest"] = dataset_digest([s["sha256"] for s in doc["shards"]])


def _manifest_text(text: bytes) -> Callable[[Path, dict], None]:
    def change(ds: Path, doc: dict) -> None:
        (ds / "manifest.json").write_bytes(text)
        doc.clear()

    return change


def _truncate_shard(consistent: bool) -> Callable[[Path, dict], None]:
    def change(ds: Path, doc: dict) -> None:
        p = ds / doc["shards"][0]["file"]
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        if consistent:
            _consistent(doc, ds)

    return change


def _garbage_shard(ds: Path, doc: dict) -> None:
    (ds / doc["shards"][0]["file"]).write_bytes(os.urandom(4096))
    _consistent(doc, ds)


def _old_schema_shard(ds: Path, doc: dict) -> None:
    """A shard in the schema-1 layout (images as plain binary), manifest forged to match."""
    schema = pa.schema([("id", pa.string()), ("image", pa.binary())])
    with pa.OSFile(str(ds / doc["shards"][0]["file"]), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
        w.write_batch(pa.RecordBatch.from_pylist([{"id": "x", "image": b"png"}], schema=schema))
    _consistent(doc, ds)


def _flip_byte(ds: Path, doc: dict) -> None:
    p = ds / doc["shards"][0]["file"]
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _shard_entry(**fields) -> Callable[[Path, dict], None]:
    def change(ds: Path, doc: dict) -> None:
        doc["shards"][0].update(fields)

    return change


def _rm_shard(ds: Path, doc: dict) -> None:
    (ds / doc["shards"][1]["file"]).unlink()


# ------------------------------------------------------------------------------------------
# The table

SPEC = "{tmp}/spec.yaml"
VALIDATE = ["validate", SPEC]
PREPARE = ["prepare-data", "--manifest", "{tmp}/m.jsonl", "--out", "{tmp}/out", "--strict"]
DRY = ["distill", "--dry-run", "data.root={tmp}/ds"]
HOSTS = ["distill", "--dry-run", "data.root={good}", "launch.backend=hostfile", "launch.hostfile={tmp}/hosts"]
NOTHING = _write("unused", "")

CASES: list[tuple[str, Callable[[Path], None], list[str], str]] = [
    # --- spec files
    ("spec-not-utf8", _write("spec.yaml", b"run:\n  name: caf\xe9\n"), VALIDATE, "line 2: not UTF-8"),
    ("spec-utf16", _write("spec.yaml", "run: {name: x}\n".encode("utf-16")), VALIDATE, "not UTF-8"),
    ("spec-control-bytes", _write("spec.yaml", b"run: {name: \x00\x01}\n"), VALIDATE, "invalid YAML"),
    ("spec-duplicate-key", _write("spec.yaml", "distill:\n  steps: 3\n  steps: 5\n"), VALIDATE,
     "line 3: invalid YAML: duplicate key 'steps' (first on line 2)"),
    ("spec-duplicate-section", _write("spec.yaml", "run: {name: a}\nrun: {name: b}\n"), VALIDATE, "duplicate key 'run'"),
    ("spec-billion-laughs", _write("spec.yaml", _laughs()), VALIDATE, "expands to more than"),
    ("spec-recursive-alias", _write("spec.yaml", "ablations: &x {task-mixture: *x}\n"), VALIDATE, "recursive alias"),
    ("spec-deep-nesting", _write("spec.yaml", "run: " + "[" * 200_000), VALIDATE, "nests deeper than"),
    ("spec-many-nodes", _write("spec.yaml", "run: [" + "1, " * 30_000 + "1]\n"), VALIDATE, "more than 20,000 nodes"),
    ("spec-too-big", _write("spec.yaml", "# padding\n" * 200_000), VALIDATE, "too big for a spec file"),
    ("spec-huge-integer", _write("spec.yaml", "distill: {steps: " + "1" * 5000 + "}\n"), VALIDATE, "line 1: invalid YAML: bad value"),
    ("spec-impossible-date", _write("spec.yaml", "run: {name: 2024-02-30}\n"), VALIDATE, "bad value: day is out of range"),
    ("spec-python-tag", _write("spec.yaml", "run: !!python/object/apply:os.system ['echo pwned']\n"), VALIDATE,
     "could not determine a constructor"),
    ("spec-tab-indent", _write("spec.yaml", "distill:\n\tsteps: 3\n"), VALIDATE, "line 2: invalid YAML"),
    ("spec-not-a-mapping", _write("spec.yaml", "- run\n- distill\n"), VALIDATE, "a spec must be a YAML mapping"),
    ("spec-is-a-directory", _write("spec.yaml", ""), ["validate", "{tmp}"], "not a regular file"),
    ("spec-missing", NOTHING, ["validate", "{tmp}/nope.yaml"], "no such spec file"),
    # --- dotted overrides (parsed as YAML)
    ("override-duplicate-key", NOTHING, ["validate", "data.categories={object: 1, object: 2}"], "duplicate key 'object'"),
    ("override-billion-laughs", NOTHING, ["validate", "run.name=" + _laughs(inline=True)], "expands to more than"),
    ("override-recursive-alias", NOTHING, ["validate", "distill.steps=&a [*a]"], "recursive alias"),
    ("override-deep-nesting", NOTHING, ["validate", "distill.steps=" + "[" * 100_000], "nests deeper than"),
    ("override-huge-integer", NOTHING, ["validate", "distill.steps=" + "9" * 5000], "bad value"),
    ("override-python-tag", NOTHING, ["validate", "run.name=!!python/name:os.system"], "could not determine a constructor"),
    ("override-empty-key-part", NOTHING, ["validate", "distill..steps=3"], "has an empty key"),
    # --- run names, Slurm fields, launch addresses, tracking URIs
    ("run-name-slash", NOTHING, ["validate", "run.name=a/b"], "run.name"),
    ("run-name-dotdot", NOTHING, ["validate", "run.name=.."], "run.name"),
    ("run-name-space", NOTHING, ["validate", "run.name=my run"], "run.name"),
    ("run-name-empty", NOTHING, ["validate", "run.name="], "run.name"),
    ("run-name-too-long", NOTHING, ["validate", "run.name=" + "a" * 300], "run.name"),
    ("slurm-partition-injection", NOTHING, ["validate", "launch.slurm.partition=gpu; rm -rf ~"], "launch.slurm.partition"),
    ("slurm-account-newline", NOTHING, ["validate", 'launch.slurm.account="acct\\n#SBATCH --wrap=id"'], "launch.slurm.account"),
    ("slurm-time-injection", NOTHING, ["validate", "launch.slurm.time=04:00:00 --wrap=id"], "launch.slurm.time"),
    ("master-addr-injection", NOTHING, ["validate", "launch.master_addr=$(reboot)"], "launch.master_addr"),
    ("launch-include-injection", NOTHING, ["validate", "launch.include=h1;id"], "launch.include"),
    ("path-nul-byte", NOTHING, ["validate", 'run.out_dir="runs\\0x"'], "run.out_dir"),
    ("path-newline-in-list", NOTHING, ["validate", 'data.manifests=["a.jsonl", "b\\nc.jsonl"]'], "data.manifests"),
    ("tracking-uri-bare-path", NOTHING, ["validate", "tracking.uri=mlflow.db"], "tracking.uri"),
    ("tracking-uri-in-memory", NOTHING, ["validate", "tracking.uri=sqlite://"], "tracking.uri"),
    ("tracking-uri-no-host", NOTHING, ["validate", "tracking.uri=http://"], "tracking.uri"),
    ("tracking-uri-newline", NOTHING, ["validate", 'tracking.uri="sqlite:///a\\nb.db"'], "tracking.uri"),
    # --- JSONL manifests (prepare-data --strict; without it they are counted rejects, below)
    *[(name, _jsonl(name), PREPARE, f"m.jsonl:1: {reason}") for name, (_, reason) in JSONL_LINES.items()],
    ("jsonl-manifest-is-a-fifo", lambda tmp: os.mkfifo(tmp / "m.jsonl"), PREPARE, "m.jsonl: JSONL manifest not found"),
    # --- prepared datasets: manifest.json and Arrow shards (read by distill before launching)
    ("manifest-truncated-json", _dataset(_manifest_text(b'{"format": "flashctl-arrow-sh')), DRY, "invalid JSON"),
    ("manifest-not-utf8", _dataset(_manifest_text(b'{"format": "\xff"}')), DRY, "manifest.json: line 1: not UTF-8"),
    ("manifest-duplicate-key", _dataset(_manifest_text(b'{"rows": 1, "rows": 2}')), DRY, "duplicate key 'rows'"),
    ("manifest-too-big", _dataset(lambda ds, doc: (_sparse(ds / "manifest.json", 40 << 20), doc.clear())), DRY,
     "too big for a dataset manifest"),
    ("manifest-shard-missing", _dataset(_rm_shard), DRY, "is missing"),
    ("manifest-shard-not-a-name", _dataset(_shard_entry(file={"x": 1})), DRY, "shards[0] needs file, rows, sha256, bytes"),
    ("manifest-shard-escapes", _dataset(_shard_entry(file="../manifest.json")), DRY, "must be a plain file name"),
    ("manifest-shard-rows-wrong", _dataset(_shard_entry(rows=10**6)), DRY, "sum of shard rows"),
    ("shard-truncated", _dataset(_truncate_shard(consistent=False)), DRY, "corrupt or partial shard"),
    ("shard-truncated-forged-manifest", _dataset(_truncate_shard(consistent=True)), DRY, "Arrow stream is truncated"),
    ("shard-garbage-forged-manifest", _dataset(_garbage_shard), DRY, "not an Arrow IPC stream"),
    ("shard-old-schema", _dataset(_old_schema_shard), DRY, "schema differs"),
    ("shard-sha-mismatch", _dataset(_flip_byte), ["train-teacher", "data.root={tmp}/ds"], "does not match the manifest"),
    # --- hostfiles
    ("hostfile-injection", _write("hosts", "node$(id) slots=2\n"), HOSTS, "hosts:1: host 'node$(id)'"),
    ("hostfile-not-utf8", _write("hosts", b"n\xf6de1 slots=2\n"), HOSTS, "hosts: line 1: not UTF-8"),
    ("hostfile-trailing-garbage", _write("hosts", "node1 slots=2 gpus=8\n"), HOSTS, "hosts:1: expected 'HOST slots=N'"),
    ("hostfile-unicode-digit", _write("hosts", "node1 slots=\u00b2\n"), HOSTS, "not a whole number"),
    ("hostfile-huge-slots", _write("hosts", "node1 slots=" + "9" * 5000 + "\n"), HOSTS, "not a whole number"),
    ("hostfile-zero-slots", _write("hosts", "node1 slots=0\n"), HOSTS, "must be >= 1"),
    ("hostfile-empty", _write("hosts", "# nobody\n"), HOSTS, "lists no hosts"),
    ("hostfile-too-big", _write("hosts", "#" * (2 << 20)), HOSTS, "too big for a hostfile"),
]

GOOD_DS: Path


@pytest.fixture(scope="module", autouse=True)
def good_dataset(tmp_path_factory) -> Path:
    """A small prepared dataset (2 shards) the dataset and hostfile cases start from."""
    global GOOD_DS
    GOOD_DS = tmp_path_factory.mktemp("good") / "ds"
    prepare_data(DataSpec(n=8, rows_per_shard=4, seed=1), GOOD_DS, progress=False)
    return GOOD_DS


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_the_table_covers_every_kind_of_input():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names))
    kinds = {n.split("-")[0] for n in names}
    assert {"spec", "override", "run", "slurm", "tracking", "jsonl", "manifest", "shard", "hostfile"} <= kinds


@pytest.mark.parametrize(("name", "make", "command", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_error(name, make, command, expected, runner, workdir):
    tmp = workdir / "in"
    tmp.mkdir()
    make(tmp)
    before = _files(workdir)
    args = [a.replace("{tmp}", str(tmp)).replace("{good}", str(GOOD_DS)) for a in command]
    result = runner.invoke(app, args)
    # typer.Exit is a SystemExit; anything else escaped the CLI (a user would see a traceback)
    assert isinstance(result.exception, SystemExit), (name, repr(result.exception))
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.output[-2000:]
    assert expected in errors[0], errors[0]
    assert len(errors[0]) < 600, errors[0]
    assert _files(workdir) == before, "the failed command left files behind"


def test_bad_jsonl_lines_are_counted_rejects_next_to_good_rows(runner, workdir):
    """Without --strict every bad line of the table is one reject and the good row is kept."""
    (workdir / "img").mkdir()
    (workdir / "img" / "ok.png").write_bytes(_png_bytes())
    lines = [json.dumps({"id": "good", "prompt": "a green square", "image": "img/ok.png"}).encode()]
    expected = {}
    for i, (name, (make, reason)) in enumerate(JSONL_LINES.items(), start=2):
        line = make(workdir)
        if line.startswith(b"{"):  # distinct ids, so no reject is a duplicate-id reject
            line = line.replace(b'"id": "a"', f'"id": "{name}"'.encode(), 1)
        lines.append(line)
        expected[i] = reason
    (workdir / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    result = runner.invoke(app, ["prepare-data", "--manifest", str(workdir / "m.jsonl"), "--out", str(workdir / "out")])
    assert result.exit_code == 0, result.output
    assert f"1 rows in 1 shards, {len(expected)} rejected" in result.output
    rejects = [json.loads(line) for line in (workdir / "out" / "rejects.jsonl").read_text().splitlines()]
    assert {r["line"]: r["reason"] for r in rejects}.keys() == expected.keys()
    for r in rejects:
        assert expected[r["line"]] in r["reason"], r
        assert len(r["reason"]) < 600
