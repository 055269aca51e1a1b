"""`flashctl evaluate --nproc N` and `flashctl prepare-data --cache-embeddings --nproc N` (issue 10
items 3 and 6): the commands run data-parallel on N torchrun ranks (gloo on CPU) and give what
one process gives -- the same per-row verifier results and images, the same cache files byte
for byte -- with rank 0 writing the outputs and printing the one-process line or table."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import run_cli

EVAL = ["eval.n_t2i=2", "eval.n_edit=2", "--nfe", "1"]
DATA = ["data.n=16", "data.rows_per_shard=8", "--cache-embeddings"]  # two shards: one per rank


@pytest.mark.slow
def test_evaluate_on_two_ranks_gives_the_one_process_results(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    res1 = run_cli(["evaluate", "builtin:base", *EVAL, "--out", str(one)], cwd=tmp_path)
    assert res1.returncode == 0, res1.stderr[-3000:]
    two.mkdir()
    (two / "stale.txt").write_text("an older evaluation's file")
    res2 = run_cli(["evaluate", "builtin:base", *EVAL, "--out", str(two), "--nproc", "2"], cwd=tmp_path)
    assert res2.returncode == 0, res2.stderr[-3000:]
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r2["world_size"] == 2 and all(r["rows"] > 0 for r in r2["ranks"])
    rows1, rows2 = r1["models"]["model"]["per_row"], r2["models"]["model"]["per_row"]
    assert len(rows1) == 4 and rows2 == rows1  # per-row correctness (every claim), in eval-set order
    assert r2["models"]["model"]["by_task"] == r1["models"]["model"]["by_task"]
    pngs = sorted(p.name for p in (one / "images" / "model").glob("*.png"))
    assert len(pngs) == 4 and pngs == sorted(p.name for p in (two / "images" / "model").glob("*.png"))
    for name in pngs:
        assert (one / "images" / "model" / name).read_bytes() == (two / "images" / "model" / name).read_bytes()
    # the output folder was replaced as a whole, and no staging folder is left beside it
    assert not (two / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    assert "t2i / " in res2.stdout and "ms per image" in res2.stdout
    assert res2.stdout.count("verifier accuracy") == 1  # one table, printed once


def _sha256s(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_cache_embeddings_on_two_ranks_writes_the_one_process_files(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    res1 = run_cli(["prepare-data", *DATA, "--out", str(one)], cwd=tmp_path)
    assert res1.returncode == 0, res1.stderr[-3000:]
    res2 = run_cli(["prepare-data", *DATA, "--out", str(two), "--nproc", "2"], cwd=tmp_path)
    assert res2.returncode == 0, res2.stderr[-3000:]
    cond = json.loads((two / "manifest.json").read_text())["conditioning"]
    assert [f["file"] for f in cond["files"]] == ["cond-00000-of-00002.arrow", "cond-00001-of-00002.arrow"]
    sums1, sums2 = _sha256s(one), _sha256s(two)
    assert {"negatives.safetensors", "cond-00000-of-00002.arrow", "cond-00001-of-00002.arrow"} <= set(sums2)
    assert sums2 == sums1  # every sidecar, the negatives, the shards and the manifest: byte-identical
    line = [ln for ln in res2.stderr.splitlines() if ln.startswith("ok ")]
    assert len(line) == 1 and "16 rows in 2 shards" in line[0], res2.stderr[-2000:]
    # the manifest and its sidecars check out (sha256 of every file)
    from flashctl.data.manifest import read_manifest

    assert read_manifest(two).conditioning is not None


def test_nproc_of_prepare_data_needs_cache_embeddings_one_line(runner, tmp_path):
    from flashctl.cli import app

    res = runner.invoke(app, ["prepare-data", "data.n=8", "--out", str(tmp_path / "d"), "--nproc", "2"])
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--cache-embeddings" in lines[0], res.output
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_a_rank_s_user_error_is_the_command_s_last_line(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"id": "p1", "prompt": "a red circle", "category": "object", '
                                         '"image": "missing.png"}\n')
    res = run_cli(["prepare-data", "--source", "jsonl", "--manifest", "rows.jsonl", "--strict", "--cache-embeddings",
                   "--nproc", "2", "--out", str(tmp_path / "d")], cwd=tmp_path)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error rows.jsonl:1: image not found") and "(--strict)" in last, res.stderr[-2000:]
    assert not (tmp_path / "d" / "manifest.json").exists()
