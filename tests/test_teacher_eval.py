"""`flashctl train-teacher` (flow-matching SFT, checkpoints, resume) and `flashctl evaluate`."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import EXPERIMENTS, run_cli

TEACHER_SPEC = str(EXPERIMENTS / "teacher-base.yaml")


@pytest.mark.slow
def test_train_teacher_lowers_the_loss_resumes_and_exports_a_pipeline(tiny_world, tmp_path):
    from diffusers import QwenImagePipeline

    out = tmp_path / "teacher"
    args = [
        TEACHER_SPEC, f"data.root={tiny_world['data']}", f"train_teacher.output={out}", "train_teacher.steps=100",
        "train_teacher.vae_steps=10", "train_teacher.decay_steps=0", "train_teacher.batch_size=8",
        "train_teacher.checkpoint_every=50",
        "model.tiny.num_layers=2", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    res = run_cli(["train-teacher", *args], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "teacher.ckpt" / "summary.json").read_text())
    assert summary["resumed_from"] == 0
    assert summary["loss_last50"] < 0.9 * summary["loss_first50"], summary
    pipe = QwenImagePipeline.from_pretrained(out)
    image = pipe("a red circle", height=32, width=48, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (48, 32)
    # the checkpoint holds the state at step 100; asking for more steps continues from there
    more = run_cli(["train-teacher", *args, "train_teacher.steps=120"], cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumed from step-0000100.pt" in more.stderr
    assert json.loads((tmp_path / "teacher.ckpt" / "summary.json").read_text())["resumed_from"] == 100
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["flashctl-teachers"])
    assert len(runs) == 1, "the resumed run logs into the same MLflow run"
    assert runs.iloc[0]["params.train_teacher.steps"] == "100", "params are logged once, never re-logged"


def test_teacher_lr_warms_up_holds_then_decays_linearly_to_zero():
    from flashctl.teacher import teacher_lr

    lr = lambda step, decay: teacher_lr(step, 1e-3, steps=1000, warmup=100, decay_steps=decay)  # noqa: E731
    assert lr(0, 0) == pytest.approx(1e-5) and lr(99, 0) == pytest.approx(1e-3)
    assert lr(999, 0) == pytest.approx(1e-3)  # no decay: constant to the end
    assert lr(799, 200) == pytest.approx(1e-3)  # stable until the decay starts
    assert lr(800, 200) == pytest.approx(1e-3)  # (1000 - 800) / 200
    assert lr(900, 200) == pytest.approx(5e-4)
    assert lr(999, 200) == pytest.approx(5e-6)  # last step: 1/200 of the peak
    # the stable phase does not depend on `steps`: a longer run's schedule matches up to its decay
    assert [teacher_lr(s, 1e-3, 12000, 100, 0) for s in range(0, 12000, 7)] == \
        [teacher_lr(s, 1e-3, 20000, 100, 8000) for s in range(0, 12000, 7)]


def test_fine_tuned_teacher_links_unchanged_components_only_to_a_base_beside_it(tmp_path):
    from flashctl.teacher import link_unchanged_components

    def pipeline(folder, weights):
        for sub, data in (("vae", b"vae"), ("transformer", weights)):
            (folder / sub).mkdir(parents=True)
            (folder / sub / "w.bin").write_bytes(data)
        return folder

    shipped = tmp_path / "assets"
    base = pipeline(shipped / "base", b"base")
    edit = pipeline(shipped / "edit", b"tuned")
    assert link_unchanged_components(edit, base) == ["vae"]  # the transformer differs: kept
    assert (edit / "vae").is_symlink() and (edit / "vae" / "w.bin").read_bytes() == b"vae"
    assert not (edit / "transformer").is_symlink()
    # a base elsewhere (a stage-1 teacher under runs/) is not linked to: the shipped folder
    # would point out of its own tree
    stage1 = pipeline(tmp_path / "runs" / "stage1", b"stage1")
    refined = pipeline(shipped / "refined", b"refined")
    assert link_unchanged_components(refined, stage1) == []
    assert not (refined / "vae").is_symlink() and (refined / "vae" / "w.bin").read_bytes() == b"vae"


def test_fine_tuned_teacher_keeps_its_sources_frozen_components_byte_for_byte(tmp_path):
    from flashctl.teacher import copy_frozen_components

    source, out = tmp_path / "source", tmp_path / "out"
    for folder, config in ((source, '{"a": 1}'), (out, '{"a": 1, "dtype": "float32"}')):  # a re-save adds keys
        for sub in ("tokenizer", "vae", "transformer"):
            (folder / sub).mkdir(parents=True)
            (folder / sub / "config.json").write_text(config)
    (out / "transformer" / "w.bin").write_bytes(b"trained")
    assert copy_frozen_components(out, source) == ["tokenizer", "vae"]
    assert (out / "tokenizer" / "config.json").read_text() == '{"a": 1}'
    assert (out / "vae" / "config.json").read_text() == '{"a": 1}'
    assert (out / "transformer" / "w.bin").read_bytes() == b"trained"  # the trained part is kept


def test_decay_longer_than_training_is_a_one_line_error(tmp_path):
    res = run_cli(["validate", TEACHER_SPEC, "train_teacher.steps=100", "train_teacher.decay_steps=200"], cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr  # validate: 2 = invalid spec
    assert "train_teacher" in res.stderr and "decay_steps 200 must be <= steps 100" in res.stderr


def test_train_teacher_without_data_is_one_line_error(tmp_path):
    res = run_cli(["train-teacher", TEACHER_SPEC, f"data.root={tmp_path}/none", f"train_teacher.output={tmp_path}/t"],
                  cwd=tmp_path)
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "manifest" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_evaluate_writes_images_results_and_a_table(tiny_world, tmp_path):
    out = tmp_path / "eval"
    res = run_cli(["evaluate", str(tiny_world["teacher"]), "eval.n_t2i=4", "eval.n_edit=4", "--nfe", "2",
                   "--cfg", "2", "--out", str(out)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    model = results["models"]["model"]
    assert results["rows"] == 8 and model["steps"] == 2 and model["nfe"] == 4 and model["cfg"] == 2.0
    assert set(model["by_task"]) == {"t2i", "edit"}
    assert 0.0 <= model["by_task"]["t2i"]["accuracy"] <= 1.0
    assert len(list((out / "images" / "model").glob("*.png"))) == 8
    assert "t2i / " in res.stdout and "edit / " in res.stdout and "ms per image" in res.stdout
    # same seed, same images
    again = run_cli(["evaluate", str(tiny_world["teacher"]), "eval.n_t2i=4", "eval.n_edit=4", "--nfe", "2",
                     "--cfg", "2", "--out", str(tmp_path / "eval2")], cwd=tmp_path)
    assert again.returncode == 0
    for png in (out / "images" / "model").glob("*.png"):
        assert png.read_bytes() == (tmp_path / "eval2" / "images" / "model" / png.name).read_bytes()


# --- timed sampling and the interleaved speed-up (in process, the shipped toy teacher) ----------


@pytest.fixture(scope="module")
def toy_adapter():
    from flashctl.models.adapter import QwenImageAdapter
    from flashctl.pipelines import resolve_model_path

    return QwenImageAdapter.from_pretrained(resolve_model_path("builtin:base"))


def _pixels(images):
    import numpy as np

    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_timed_sampler_matches_the_adapter_with_duplicates_and_cached_negatives(toy_adapter):
    from flashctl.evaluate import PromptCache, sample_batch
    from flashctl.shapes import eval_set
    from flashctl.shapes.render import from_png

    a = toy_adapter
    prompts = ["a red circle at the top left", "a blue square", "a red circle at the top left"]
    cache = PromptCache()
    for _ in range(2):  # the second call reuses the cached "" negative
        images, timing = sample_batch(a, a.transformer, prompts, 32, 32, 3, cfg_scale=2.0, seed=5, cache=cache)
        reference = a.sample(a.transformer, prompts, 32, 32, 3, cfg_scale=2.0, seed=5)
        assert abs(_pixels(images) - _pixels(reference)).max() <= 1
        assert 0 < timing.denoise_seconds < timing.seconds
    # edits: the negative carries the source image; rows sharing prompt and source encode once
    row = next(r for r in eval_set(0, 0, 4) if r["task"] == "edit")
    src = [from_png(row["source_image"])] * 2
    images, _ = sample_batch(a, a.transformer, [row["prompt"]] * 2, row["height"], row["width"], 2, cfg_scale=2.0,
                             seed=1, source_images=src, source_keys=[row["source_image"]] * 2, cache=cache)
    reference = a.sample(a.transformer, [row["prompt"]] * 2, row["height"], row["width"], 2, cfg_scale=2.0, seed=1,
                         source_images=src)
    assert abs(_pixels(images) - _pixels(reference)).max() <= 1


def test_student_and_teacher_are_timed_interleaved_with_the_nfe_ratio(toy_adapter, tmp_path):
    from flashctl.evaluate import ModelUnderTest, evaluate_models, sample_rows
    from flashctl.shapes import eval_set

    a = toy_adapter
    rows = eval_set(0, 3, 0)  # T2I only: edits go through the same loop (covered above) at a higher cost
    models = {"student": (a.transformer, ModelUnderTest("student", 2, 1.0)),
              "teacher": (a.transformer, ModelUnderTest("teacher", 3, 2.0))}
    res = evaluate_models(a, models, rows, tmp_path, seed=0, repeats=2)
    m = res["metrics"]
    assert res["timing"]["interleaved"] and res["timing"]["repeats"] == 2
    assert m["eval/nfe_ratio"] == 3.0  # 3 steps x 2 (CFG) over 2 steps
    for name in ("student", "teacher"):
        assert 0 < m[f"eval/{name}/denoise_sec_per_image"] < m[f"eval/{name}/sec_per_image"]
    assert m["eval/speedup"] == m["eval/teacher/sec_per_image"] / m["eval/student/sec_per_image"]
    assert m["eval/speedup_denoise"] > 0
    # interleaving changes the timing, never the images
    alone, _ = sample_rows(a, a.transformer, rows, 3, 2.0, 0)
    saved = {p.stem: p for p in (tmp_path / "images" / "teacher").glob("*.png")}
    assert saved.keys() == alone.keys()
    from PIL import Image

    for rid, im in alone.items():
        assert abs(_pixels([Image.open(saved[rid]).convert("RGB")]) - _pixels([im])).max() == 0
