"""The data-parallel evaluation (`evaluate_models` with rank/world), its stop, and diversity.

Ranks are played in one process with the shipped toy teacher (a plain model, no collectives):
each rank's share is sampled by its own call and the parts are handed over by `gather`, which
in a job is `all_gather_object`. The 2-rank job itself is run by tests/test_distill.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def toy_adapter():
    from flashctl.models.adapter import QwenImageAdapter
    from flashctl.pipelines import resolve_model_path

    return QwenImageAdapter.from_pretrained(resolve_model_path("builtin:base"))


def _models(a):
    from flashctl.evaluate import ModelUnderTest

    return {"student": (a.transformer, ModelUnderTest("student", 2, 1.0)),
            "teacher": (a.transformer, ModelUnderTest("teacher", 2, 2.0))}


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_rank_batches_cover_every_batch_once_balanced_with_equal_counts_per_rank():
    from flashctl.evaluate import rank_batches

    for sizes in ([], [4], [16, 16, 16, 3], [1, 1, 1, 3], [16] * 7 + [5, 2, 9]):
        for world in (1, 2, 3, 8):
            plans = [rank_batches(sizes, r, world) for r in range(world)]
            assert len({len(p) for p in plans}) == 1, "every rank runs the same number of batches"
            assert sorted(i for p in plans for i in p if i is not None) == list(range(len(sizes)))
            rows = [sum(sizes[i] for i in p if i is not None) for p in plans]
            assert max(rows) - min(rows) <= max(sizes, default=0), "rows balanced up to one batch"
    # three 1-row batches and one of 3 rows over 2 ranks: 3 rows each, the short rank pads
    assert rank_batches([1, 1, 1, 3], 0, 2) == [3, None, None]
    assert rank_batches([1, 1, 1, 3], 1, 2) == [0, 1, 2]


def test_two_ranks_give_the_single_process_results_and_diversity(toy_adapter, tmp_path):
    from flashctl.evaluate import evaluate_models, open_rows
    from flashctl.shapes import eval_set

    a = toy_adapter
    rows = eval_set(0, 4, 2, open_attributes=1.0)  # every T2I row leaves something open
    assert len(open_rows(rows)) >= 3
    models = _models(a)
    one = evaluate_models(a, models, rows, tmp_path / "one", seed=0, diversity_seeds=2)

    handed: dict[int, dict] = {}

    def gather_as(rank):
        def gather(part):
            handed[rank] = part
            return [handed.get(r) for r in range(2)]
        return gather

    # rank 1 first (its call returns None), then rank 0 gathers both parts
    assert evaluate_models(a, models, rows, tmp_path / "two", seed=0, rank=1, world=2, diversity_seeds=2,
                           gather=gather_as(1)) is None
    assert not (tmp_path / "two" / "results.json").exists(), "only rank 0 writes results.json"
    two = evaluate_models(a, models, rows, tmp_path / "two", seed=0, rank=0, world=2, diversity_seeds=2,
                          gather=gather_as(0))
    assert two["world_size"] == 2 and sum(r["rows"] for r in two["ranks"]) == len(rows)
    assert all(r["rows"] > 0 for r in two["ranks"])
    assert len({r["batches"] + r["padding"] for r in two["ranks"]}) == 1, "both ranks run as many batches"
    on_disk = json.loads((tmp_path / "two" / "results.json").read_text())
    assert on_disk["metrics"] == two["metrics"]
    for name in models:
        assert [r["id"] for r in two["models"][name]["per_row"]] == [r["id"] for r in rows]
        assert two["models"][name]["per_row"] == one["models"][name]["per_row"]
        assert two["models"][name]["diversity"] == one["models"][name]["diversity"]
        div = two["models"][name]["diversity"]
        assert div["images"] == 2 * len(open_rows(rows)) and div["seeds"] == 2
        for r in rows:  # the same images whatever the number of ranks (a batch's seed is global)
            png = f"{name}/{r['id']}.png"
            assert np.array_equal(_pixels(tmp_path / "one" / "images" / png), _pixels(tmp_path / "two" / "images" / png))
    for key in ("eval/student/t2i_acc", "eval/teacher/edit_acc", "eval/retention/t2i", "eval/speedup"):
        assert key in two["metrics"]
    kinds = [k for k in ("cell", "colour", "background") if k in two["models"]["teacher"]["diversity"]]
    for kind in kinds:
        for what in ("entropy", "tv", "entropy_ref", "tv_ref", "prompts"):
            assert f"eval/teacher/diversity/{kind}/{what}" in two["metrics"]


def test_diversity_is_off_with_zero_seeds_or_no_open_rows(toy_adapter, tmp_path):
    from flashctl.evaluate import evaluate_models
    from flashctl.shapes import eval_set

    a = toy_adapter
    res = evaluate_models(a, _models(a), eval_set(0, 2, 0, open_attributes=1.0), tmp_path / "a", seed=0,
                          diversity_seeds=0)
    assert "diversity" not in res["models"]["student"]
    res = evaluate_models(a, _models(a), eval_set(0, 2, 0), tmp_path / "b", seed=0, diversity_seeds=4)
    assert "diversity" not in res["models"]["student"]
    assert not any("/diversity/" in k for k in res["metrics"])


def test_a_stop_between_batches_writes_no_results(toy_adapter, tmp_path):
    from flashctl.evaluate import EvalStopped, evaluate_models
    from flashctl.shapes import eval_set

    a = toy_adapter
    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) >= 2  # a signal arrives during the second batch

    with pytest.raises(EvalStopped, match="after 2 of"):
        evaluate_models(a, _models(a), eval_set(0, 4, 0), tmp_path, seed=0, should_stop=should_stop)
    assert not (tmp_path / "results.json").exists()


def test_the_teacher_is_evaluated_once_per_key_and_reused(toy_adapter, tmp_path):
    from flashctl.evaluate import evaluate_models, store_cached, timing_rows
    from flashctl.shapes import eval_set

    a = toy_adapter
    rows = eval_set(0, 3, 1)
    folder = tmp_path / "eval-cache" / "teacher-key"
    models = _models(a)
    first = evaluate_models(a, models, rows, tmp_path / "a", seed=0, cached={"teacher": folder})
    assert first["timing"]["cached"] == [] and (folder / "results.json").is_file()
    # a second evaluation with the key takes the teacher's accuracy and images from the cache,
    # and times it again, interleaved with the student on the first batches of each task
    second = evaluate_models(a, _models(a), rows, tmp_path / "b", seed=0, cached={"teacher": folder})
    assert second["timing"]["cached"] == ["teacher"] and list(second["models"]) == ["student", "teacher"]
    timed = ("sec_per_image", "denoise_sec_per_image", "batch_seconds", "timed_on")
    assert ({k: v for k, v in second["models"]["teacher"].items() if k not in timed}
            == {k: v for k, v in first["models"]["teacher"].items() if k not in timed})
    accuracy = {k: v for k, v in first["metrics"].items() if "/teacher/" in k and not k.endswith(timed)}
    assert {k: v for k, v in second["metrics"].items() if "/teacher/" in k and not k.endswith(timed)} == accuracy
    assert second["metrics"]["eval/retention/t2i"] == first["metrics"]["eval/retention/t2i"]
    sub = second["timing"]["subset"]
    assert sub["rows"] == len(timing_rows(rows)) > 0
    assert set(sub["seconds_per_image"]) == {"student", "teacher"}  # only the cached model and the student
    assert "batch_seconds" not in second["models"]["teacher"]  # the stored run's batches are not this run's
    (s_sec, s_den), (t_sec, t_den) = sub["seconds_per_image"]["student"], sub["seconds_per_image"]["teacher"]
    assert 0 < t_den < t_sec and second["metrics"]["eval/teacher/sec_per_image"] == t_sec
    # the speed-ups compare the two timings of the same batches, not a full eval with a subset
    assert second["metrics"]["eval/speedup"] == pytest.approx(t_sec / s_sec)
    assert second["metrics"]["eval/speedup_denoise"] == pytest.approx(t_den / s_den)
    assert second["metrics"]["eval/nfe_ratio"] == first["metrics"]["eval/nfe_ratio"]
    from flashctl.distill.worker import _print_eval

    _print_eval(second["metrics"])
    for r in rows:
        png = f"images/teacher/{r['id']}.png"
        assert (tmp_path / "b" / png).read_bytes() == (tmp_path / "a" / png).read_bytes()
    # a concurrent evaluation that finishes second keeps the first one's entry
    assert not store_cached(folder, {"other": 1}, {}, tmp_path / "a" / "images" / "teacher")
    assert json.loads((folder / "results.json").read_text())["summary"] == first["models"]["teacher"]


def test_timing_rows_are_whole_batches_of_each_task_across_image_sizes():
    from flashctl.evaluate import EVAL_BATCH, TIMING_BATCHES, _groups, timing_rows
    from flashctl.shapes import eval_set

    rows = eval_set(0, 120, 120)
    sub = timing_rows(rows)
    for task in ("t2i", "edit"):
        mine = [r for r in sub if r["task"] == task]
        assert len(mine) == TIMING_BATCHES * EVAL_BATCH
        chunks = _groups(mine, EVAL_BATCH)
        assert len(chunks) == TIMING_BATCHES and all(len(c) == EVAL_BATCH for c in chunks)
        assert len({(c[0]["width"], c[0]["height"]) for c in chunks}) > 1  # not all one aspect


def test_teacher_cache_key_follows_the_teacher_and_eval_set_not_the_student():
    from conftest import EXPERIMENTS
    from flashctl.evaluate import eval_rows, teacher_cache_dir
    from flashctl.pipelines import resolve_model_path
    from flashctl.spec import load_spec

    teacher = resolve_model_path("builtin:base")

    def key(*overrides):
        spec = load_spec(EXPERIMENTS / "tiny-cpu.yaml", ["eval.n_t2i=4", "eval.n_edit=2", *overrides])
        return teacher_cache_dir(spec, teacher, eval_rows(spec))

    base = key()
    assert base.parent.name == "eval-cache"
    # ablation factors of the student share the teacher's evaluation
    assert key("distill.steps=7", "mixture.t2i=9", "mixture.edit=1", "eval.student_nfe=2") == base
    for change in ("eval.teacher_nfe=5", "eval.teacher_cfg=2", "eval.seed=9", "data.open_attributes=0.25",
                   "eval.n_t2i=5"):
        assert key(change) != base, change
