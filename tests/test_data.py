"""prepare-data (shapes + JSONL -> Arrow shards + manifest) and the shard loader."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from flashctl.data.manifest import read_manifest
from flashctl.data.prepare import prepare_data
from flashctl.data.schema import SCHEMA, row_from_arrow
from flashctl.errors import UserError
from flashctl.spec import DataSpec

REPO = Path(__file__).resolve().parents[1]


def _shard_tables(root: Path) -> list[pa.Table]:
    m = read_manifest(root)
    return [pa.ipc.open_stream(root / s.file).read_all() for s in m.shards]


def _ids(root: Path) -> list[str]:
    return [i for t in _shard_tables(root) for i in t.column("id").to_pylist()]


# ------------------------------------------------------------------------------------------
# shapes source


def test_shapes_10k_rows_two_workers_plain_pyarrow_reads_shards(tmp_path):
    out = tmp_path / "ds"
    res = prepare_data(DataSpec(n=10_000, seed=3), out, workers=2, progress=False)
    assert (res.rows, res.rejects, res.shards) == (10_000, 0, 5)
    manifest = json.loads((out / "manifest.json").read_text())
    files = sorted(p.name for p in out.glob("*.arrow"))
    assert files == [f"data-{i:05d}-of-00005.arrow" for i in range(5)]
    assert [s["file"] for s in manifest["shards"]] == files
    counts: dict[str, Counter] = {k: Counter() for k in ("task", "category", "aspect", "edit_type")}
    ids = []
    for entry in manifest["shards"]:
        with pa.ipc.open_stream(out / entry["file"]) as reader:  # plain pyarrow, stream format
            table = reader.read_all()
        assert table.schema.equals(SCHEMA, check_metadata=True)
        assert table.num_rows == entry["rows"] == 2000
        ids += table.column("id").to_pylist()
        for k, counter in counts.items():
            counter.update(v for v in table.column(k).to_pylist() if v is not None)
    assert len(set(ids)) == 10_000
    assert {k: dict(c) for k, c in counts.items()} == manifest["counts"]
    assert set(manifest["counts"]["category"]) == {"object", "scene", "text"}
    assert manifest["rows"] == 10_000 and manifest["rejects"] == 0
    assert manifest["data_spec"]["seed"] == 3
    assert [f["name"] for f in manifest["schema"]["fields"]] == SCHEMA.names
    assert (out / "rejects.jsonl").read_text() == ""
    assert not list(out.glob(".tmp-*"))
    assert read_manifest(out).digest == res.digest


def test_same_seed_same_bytes_any_worker_count_other_seed_other_digest(tmp_path):
    spec = DataSpec(n=450, seed=7, rows_per_shard=200)
    a = prepare_data(spec, tmp_path / "a", workers=1, progress=False)
    b = prepare_data(spec, tmp_path / "b", workers=2, progress=False)
    c = prepare_data(spec.model_copy(update={"seed": 8}), tmp_path / "c", progress=False)
    assert a.digest == b.digest != c.digest
    for name in ("data-00000-of-00003.arrow", "data-00002-of-00003.arrow"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_composition_weights_filter_categories_and_aspects(tmp_path):
    spec = DataSpec(n=300, categories={"object": 1, "scene": 0, "text": 2}, aspects={"landscape": 1, "portrait": 1})
    res = prepare_data(spec, tmp_path / "ds", progress=False)
    counts = read_manifest(tmp_path / "ds").counts
    assert res.rows == 300
    assert set(counts["category"]) == {"object", "text"}
    assert set(counts["aspect"]) == {"landscape", "portrait"}
    table = pa.concat_tables(_shard_tables(tmp_path / "ds"))
    sizes = {(r["aspect"], r["width"], r["height"]) for r in table.select(["aspect", "width", "height"]).to_pylist()}
    assert sizes == {("landscape", 48, 32), ("portrait", 32, 48)}


# ------------------------------------------------------------------------------------------
# JSONL source and rejects


def _png(path: Path, size: tuple[int, int], colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _jsonl_source(root: Path) -> tuple[Path, dict[int, tuple[str | None, str]]]:
    """A manifest with good rows and one bad row of every kind; returns (path, line -> (id, reason part))."""
    src = root / "src"
    _png(src / "img" / "wide.png", (60, 40))
    _png(src / "img" / "tall.png", (40, 64))
    _png(src / "img" / "sq.jpg", (50, 50))
    (src / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    _png(root / "outside.png", (32, 32))
    (src / "img" / "link.png").symlink_to(root / "outside.png")
    lines = [
        {"id": "t1", "prompt": "a red square", "image": "img/wide.png", "category": "object"},  # 1 ok
        {"id": "t2", "prompt": "a blue circle", "size": "portrait"},  # 2 ok, no image
        {"id": "e1", "instruction": "make it green", "source_image": "img/tall.png", "target_image": "img/tall.png",
         "edit_type": "recolour", "category": "scene"},  # 3 ok
        '{"id": "bad-json", "prompt": ',  # 4
        [1, 2],  # 5
        {"id": "k1", "prompt": "x", "colour": "red"},  # 6
        {"id": 17, "prompt": "an int id"},  # 7
        {"id": "empty", "prompt": "   "},  # 8
        {"id": "missing", "prompt": "p", "image": "img/nope.png"},  # 9
        {"id": "corrupt", "prompt": "p", "image": "img/broken.png"},  # 10
        {"id": "t1", "prompt": "again", "image": "img/sq.jpg"},  # 11 duplicate id
        {"id": "abs", "prompt": "p", "image": str(root / "outside.png")},  # 12
        {"id": "dotdot", "prompt": "p", "image": "../outside.png"},  # 13
        {"id": "symlink", "prompt": "p", "image": "img/link.png"},  # 14
        {"id": "cat", "prompt": "p", "category": "animals"},  # 15
        "",  # 16 blank: skipped
        {"id": "nosrc", "instruction": "remove it"},  # 17
        {"id": "sz", "prompt": "p", "image": "img/wide.png", "size": [32, 64]},  # 18
        {"id": "t3", "prompt": "a letter A", "image": "img/sq.jpg", "category": "text"},  # 19 ok
    ]
    text = "\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n"
    path = src / "manifest.jsonl"
    path.write_text(text)
    bad = {
        4: (None, "bad JSON"),
        5: (None, "bad JSON: a row must be an object"),
        6: ("k1", "unknown key(s) 'colour'"),
        7: (None, "wrong type: 'id' must be a string"),
        8: ("empty", "empty text: 'prompt'"),
        9: ("missing", "image not found"),
        10: ("corrupt", "cannot decode image"),
        11: ("t1", "duplicate id (first at"),
        12: ("abs", "path escapes the manifest directory"),
        13: ("dotdot", "path escapes the manifest directory"),
        14: ("symlink", "path escapes the manifest directory"),
        15: ("cat", "unknown category 'animals'"),
        17: ("nosrc", "missing key 'source_image'"),
        18: ("sz", "disagrees with the image aspect"),
    }
    return path, bad


def test_jsonl_rows_and_every_kind_of_reject(tmp_path):
    manifest, bad = _jsonl_source(tmp_path)
    spec = DataSpec(source="jsonl", manifests=[manifest], rows_per_shard=2)
    res = prepare_data(spec, tmp_path / "ds", progress=False)
    assert (res.rows, res.rejects, res.filtered) == (4, len(bad), 0)
    rejects = [json.loads(l) for l in (tmp_path / "ds" / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == sorted(bad)
    for r in rejects:
        want_id, reason = bad[r["line"]]
        assert r["file"] == str(manifest)
        assert r["id"] == want_id
        assert reason in r["reason"], (r, reason)
    m = read_manifest(tmp_path / "ds")
    assert m.rejects == len(bad) and m.source["type"] == "jsonl"
    rows = {r["id"]: row_from_arrow(r) for t in _shard_tables(tmp_path / "ds") for r in t.to_pylist()}
    assert list(rows) == ["t1", "t2", "e1", "t3"]  # input order
    assert (rows["t1"]["aspect"], rows["t1"]["width"], rows["t1"]["height"]) == ("landscape", 48, 32)
    assert Image.open(io.BytesIO(rows["t1"]["image"])).size == (48, 32)
    assert rows["t1"]["prompt"] == "a red square" and rows["t1"]["source"] == f"jsonl:{manifest}"
    assert (rows["t2"]["aspect"], rows["t2"]["image"], rows["t2"]["category"]) == ("portrait", None, "object")
    e1 = rows["e1"]
    assert (e1["task"], e1["edit_type"], e1["aspect"], e1["category"]) == ("edit", "recolour", "portrait", "scene")
    assert e1["prompt"] == "make it green" and e1["source_image"] and e1["image"]
    assert rows["t3"]["aspect"] == "square"
    assert m.counts["task"] == {"edit": 1, "t2i": 3}


def test_jsonl_weights_filter_rows_and_workers_give_same_bytes(tmp_path):
    manifest, bad = _jsonl_source(tmp_path)
    spec = DataSpec(source="jsonl", manifests=[manifest], categories={"object": 1, "scene": 0, "text": 1})
    a = prepare_data(spec, tmp_path / "a", progress=False)
    b = prepare_data(spec, tmp_path / "b", workers=2, progress=False)
    assert (a.rows, a.filtered, a.rejects) == (3, 1, len(bad))
    assert a.digest == b.digest
    assert (tmp_path / "a" / "rejects.jsonl").read_bytes() == (tmp_path / "b" / "rejects.jsonl").read_bytes()


def test_strict_fails_on_first_bad_row_with_one_line(tmp_path):
    manifest, _ = _jsonl_source(tmp_path)
    spec = DataSpec(source="jsonl", manifests=[manifest])
    with pytest.raises(UserError) as exc:
        prepare_data(spec, tmp_path / "ds", strict=True, progress=False)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{manifest}:4: bad JSON")
    assert not (tmp_path / "ds" / "manifest.json").exists()
    assert not list((tmp_path / "ds").glob(".tmp-*"))


def test_missing_manifest_file_is_a_user_error(tmp_path):
    spec = DataSpec(source="jsonl", manifests=[tmp_path / "nope.jsonl"])
    with pytest.raises(UserError, match="nope.jsonl: JSONL manifest not found"):
        prepare_data(spec, tmp_path / "ds", progress=False)
    with pytest.raises(UserError, match="data.manifests"):
        prepare_data(DataSpec(source="jsonl"), tmp_path / "ds", progress=False)
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text('{"id": "a", "prompt": ""}\n')
    with pytest.raises(UserError, match=r"no rows to write: 1 rejected \(first: .*bad.jsonl:1: empty text"):
        prepare_data(DataSpec(source="jsonl", manifests=[only_bad]), tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------
# existing output, interruption, verification


def test_existing_output_refused_unless_overwrite(tmp_path):
    out = tmp_path / "ds"
    first = prepare_data(DataSpec(n=250, rows_per_shard=100), out, progress=False)
    with pytest.raises(UserError, match="overwrite"):
        prepare_data(DataSpec(n=50), out, progress=False)
    assert read_manifest(out).digest == first.digest
    second = prepare_data(DataSpec(n=50, rows_per_shard=100), out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("*.arrow")) == ["data-00000-of-00001.arrow"]
    assert read_manifest(out).digest == second.digest != first.digest


def _start_prepare(out: Path, n: int) -> subprocess.Popen:
    code = (
        "import sys; from pathlib import Path; from flashctl.spec import DataSpec; "
        "from flashctl.data.prepare import prepare_data; "
        f"prepare_data(DataSpec(n={n}, rows_per_shard=100), Path(sys.argv[1]), overwrite=True, progress=False)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, str(out)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_shards(out: Path, proc: subprocess.Popen, k: int = 2) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if len(list(out.glob(f".tmp-{proc.pid}/part-*.arrow"))) >= k:
            return
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    raise AssertionError("no shard appeared in the staging directory")


def test_killed_run_never_leaves_a_manifest_to_a_partial_dataset(tmp_path):
    out = tmp_path / "ds"
    # 1. first run killed mid-way: no manifest at all
    proc = _start_prepare(out, 50_000)
    _wait_for_shards(out, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert list(out.glob(".tmp-*"))  # the dead run's staging dir is left behind
    # 2. a complete dataset, then an --overwrite run killed mid-way: the old one is intact
    old = prepare_data(DataSpec(n=150, rows_per_shard=100), out, progress=False)
    assert not list(out.glob(".tmp-*"))  # stale staging of the dead run removed
    proc = _start_prepare(out, 50_000)
    _wait_for_shards(out, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    m = read_manifest(out, verify=True)
    assert m.digest == old.digest and m.rows == 150
    assert len(_ids(out)) == 150
    # 3. SIGTERM: the run cleans its staging directory, the old dataset stays
    proc = _start_prepare(out, 50_000)
    _wait_for_shards(out, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait() != 0
    err = proc.stderr.read().decode()
    assert not list(out.glob(".tmp-*")), err
    assert read_manifest(out).digest == old.digest
    # 4. a re-run succeeds and replaces it
    new = prepare_data(DataSpec(n=120, rows_per_shard=100), out, overwrite=True, progress=False)
    assert read_manifest(out).digest == new.digest and len(_ids(out)) == 120
    assert sorted(p.name for p in out.glob("*.arrow")) == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]


def test_read_manifest_detects_a_changed_shard(tmp_path):
    out = tmp_path / "ds"
    prepare_data(DataSpec(n=120, rows_per_shard=100), out, progress=False)
    shard = out / "data-00001-of-00002.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="data-00001-of-00002.arrow: sha256"):
        read_manifest(out)
    read_manifest(out, verify=False)  # sizes still match: only the hash tells
    shard.unlink()
    with pytest.raises(UserError, match="data-00001-of-00002.arrow: shard listed .* is missing"):
        read_manifest(out, verify=False)
    with pytest.raises(UserError, match="no manifest"):
        read_manifest(tmp_path)


# ------------------------------------------------------------------------------------------
# loader


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loader") / "ds"
    prepare_data(DataSpec(n=260, seed=1, rows_per_shard=70), out, progress=False)
    return out


def _epoch(loader) -> list[dict]:
    return list(loader)


def test_loader_two_ranks_see_every_row_exactly_once_in_aspect_batches(small_ds):
    from flashctl.data.loader import ShardLoader

    all_ids = _ids(small_ds)
    sizes = DataSpec().sizes
    seen: list[str] = []
    for rank in range(2):
        loader = ShardLoader(small_ds, batch_size=8, rank=rank, world_size=2, seed=5)
        batches = _epoch(loader)
        assert len(batches) == len(loader)
        for b in batches:
            assert len(set(b["aspects"])) == 1
            w, h = sizes[b["aspects"][0]]
            assert b["images"].shape == (len(b["ids"]), 3, h, w) and (b["width"], b["height"]) == (w, h)
            assert b["images"].min() >= -1 and b["images"].max() <= 1 and b["has_image"].all()
            edits = [t == "edit" for t in b["tasks"]]
            if any(edits):
                assert b["has_source"].tolist() == edits
            seen += b["ids"]
    assert len(seen) == len(set(seen)) == len(all_ids)
    assert set(seen) == set(all_ids)


def test_loader_order_is_seeded_per_epoch_and_workers_do_not_change_it(small_ds):
    from flashctl.data.loader import ShardLoader

    a = ShardLoader(small_ds, batch_size=16, seed=2)
    e0 = [b["ids"] for b in a]
    e1 = [b["ids"] for b in a]
    assert a.state_dict()["epoch"] == 2
    assert e0 != e1 and sorted(i for b in e0 for i in b) == sorted(i for b in e1 for i in b)
    b = ShardLoader(small_ds, batch_size=16, seed=2, num_workers=2)
    assert [x["ids"] for x in b] == e0
    assert [x["ids"] for x in ShardLoader(small_ds, batch_size=16, seed=3)] != e0


def test_loader_resumes_mid_epoch_exactly(small_ds):
    from flashctl.data.loader import ShardLoader

    a = ShardLoader(small_ds, batch_size=8, rank=1, world_size=2, seed=9)
    stream = a.batches()
    for _ in range(len(a) + 3):  # one full epoch, then 3 batches into the next
        next(stream)
    state = a.state_dict()
    assert (state["epoch"], state["position"]) == (1, 3)
    rest = [next(stream)["ids"] for _ in range(len(a) - 3)]
    b = ShardLoader(small_ds, batch_size=8, rank=1, world_size=2, seed=9, num_workers=2)
    b.load_state_dict(state)
    assert [x["ids"] for x in b] == rest
    assert b.state_dict()["epoch"] == 2
    with pytest.raises(UserError, match="seed"):
        ShardLoader(small_ds, batch_size=8, rank=1, world_size=2, seed=0).load_state_dict(state)


def test_loader_filters_by_task_and_weights(small_ds):
    from flashctl.data.loader import ShardLoader

    table = pa.concat_tables(_shard_tables(small_ds)).select(["id", "task", "category", "aspect"]).to_pylist()
    want = {r["id"] for r in table if r["task"] == "edit" and r["category"] != "text" and r["aspect"] != "square"}
    loader = ShardLoader(small_ds, batch_size=4, task="edit", categories={"object": 1, "scene": 0.5, "text": 0},
                         aspects={"landscape": 1, "portrait": 1}, return_rows=True)
    got = []
    for b in loader:
        assert set(b["tasks"]) == {"edit"} and "text" not in b["categories"] and "square" not in b["aspects"]
        assert b["source_images"].shape == b["images"].shape
        assert all(r["source_scene"] for r in b["rows"])
        got += b["ids"]
    assert sorted(got) == sorted(want) and loader.rows == len(want)
    with pytest.raises(UserError, match="no rows match"):
        ShardLoader(small_ds, batch_size=4, categories={"object": 0}, aspects={"square": 1})


# ------------------------------------------------------------------------------------------
# Hugging Face `datasets` reads the shards


def test_hf_datasets_reads_prepared_shards_as_image_features(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from typer.testing import CliRunner

    from flashctl.cli import app

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "ds"
    res = CliRunner().invoke(app, ["prepare-data", "data.n=12", "data.rows_per_shard=8", "data.seed=5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = read_manifest(out)
    files = [str(p) for p in manifest.shard_paths()]
    assert len(files) == 2
    ours = {r["id"]: row_from_arrow(r) for t in _shard_tables(out) for r in t.to_pylist()}

    one = datasets.Dataset.from_file(files[0])
    loaded = datasets.load_dataset("arrow", data_files=files, split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert (one.num_rows, loaded.num_rows) == (8, 12)
    for ds in (one, loaded):
        for col in ("image", "source_image"):
            assert isinstance(ds.features[col], datasets.Image), ds.features
        for col in ("id", "task", "prompt", "aspect", "edit_type", "scene", "source"):
            assert ds.features[col] == datasets.Value("string"), (col, ds.features[col])
    seen_edit = False
    for row in loaded:
        want = ours[row["id"]]
        assert isinstance(row["prompt"], str) and row["prompt"] == want["prompt"]
        assert row["image"].size == (want["width"], want["height"])  # a decoded PIL image
        assert row["image"].tobytes() == Image.open(io.BytesIO(want["image"])).tobytes()
        if row["task"] == "edit":
            seen_edit = True
            assert row["source_image"].size == (want["width"], want["height"])
        else:
            assert row["source_image"] is None
    assert seen_edit
