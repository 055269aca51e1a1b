"""Edit conditioning per pipeline family (issue 10 item 2): QwenImageEditPlusPipeline
(Qwen-Image-Edit-2509) is encoded with its own template and condition-image size, exactly as
diffusers' pipeline does; a run uses one edit family, which validation enforces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from conftest import EXPERIMENTS
from flashctl.cli import app
from flashctl.models.adapter import EDIT_FAMILY, EDIT_PLUS_FAMILY, QwenImageAdapter, cap_edit_pipeline

TESTS = Path(__file__).resolve().parent
SPEC = str(EXPERIMENTS / "tiny-cpu.yaml")


def _source(width: int = 48, height: int = 32) -> Image.Image:
    im = Image.new("RGB", (width, height), (240, 240, 240))
    ImageDraw.Draw(im).ellipse((8, 6, 30, 26), fill=(200, 30, 30))
    return im


@pytest.fixture(scope="module")
def folders(tiny_world, tmp_path_factory) -> dict[str, Path]:
    """The tiny teacher's components saved as each family (same weights, tokenizer, processor)."""
    root = tmp_path_factory.mktemp("families")
    comps = QwenImageAdapter.from_pretrained(tiny_world["teacher"]).components()
    t2i = {k: v for k, v in comps.items() if k != "processor"}
    return {EDIT_FAMILY: Path(tiny_world["teacher"]),
            EDIT_PLUS_FAMILY: QwenImageAdapter(comps, family=EDIT_PLUS_FAMILY).save_pipeline(root / "plus"),
            "QwenImagePipeline": QwenImageAdapter(t2i).save_pipeline(root / "t2i")}


def test_family_comes_from_model_index_and_survives_save(folders):
    for family, folder in folders.items():
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == family
        assert QwenImageAdapter.from_pretrained(folder).family == family


def test_editplus_encodes_its_template_and_a_smaller_condition_image(folders):
    edit = QwenImageAdapter.from_pretrained(folders[EDIT_FAMILY], edit_max_pixels=64 * 64)
    plus = QwenImageAdapter.from_pretrained(folders[EDIT_PLUS_FAMILY], edit_max_pixels=64 * 64)
    src = _source(64, 64)
    # the VAE image is the same ~1 MPix (here: capped) reference; the text encoder's image is not
    assert edit.reference_size(64, 64) == plus.reference_size(64, 64) == (64, 64)
    assert edit.condition_size(64, 64) == (64, 64)
    assert plus.condition_size(64, 64) == (24, 24)  # 384^2 / 1024^2 of the capped area
    assert [im.size for im in plus.condition_images([src])] == [(24, 24)]
    # T2I conditioning is the same in both families
    e1, m1 = edit.encode_prompts(["a red circle"])
    e2, m2 = plus.encode_prompts(["a red circle"])
    assert torch.equal(e1, e2) and torch.equal(m1, m2)
    # edits: EditPlus's prompt carries "Picture 1: " before the vision tokens
    prompts = ["make the circle blue", "remove the circle"]
    ee, em = edit.encode_prompts(prompts, [src, src])
    pe, pm = plus.encode_prompts(prompts, [src, src])
    extra = len(plus.tokenizer("Picture 1: ").input_ids)
    assert (pm.sum(1) - em.sum(1)).tolist() == [extra, extra]
    # the source latents (and so img_shapes) are the same: only the text conditioning differs
    (la, sa), (lb, sb) = edit.encode_sources([src]), plus.encode_sources([src])
    assert sa == sb and torch.equal(la, lb)


def test_editplus_sampling_equals_diffusers_editplus_pipeline(folders):
    from diffusers import QwenImageEditPlusPipeline

    cap = 48 * 32
    adapter = QwenImageAdapter.from_pretrained(folders[EDIT_PLUS_FAMILY], edit_max_pixels=cap)
    pipe = cap_edit_pipeline(QwenImageEditPlusPipeline.from_pretrained(folders[EDIT_PLUS_FAMILY]), cap)
    pipe.set_progress_bar_config(disable=True)
    src = _source()
    theirs = pipe(src, "make the circle blue", num_inference_steps=3, true_cfg_scale=1.0,
                  generator=torch.Generator().manual_seed(11), output_type="latent").images
    ours = adapter.sample(adapter.transformer, ["make the circle blue"], 32, 48, steps=3, seed=11,
                          source_images=[src], output_type="latent")
    assert ours.shape == theirs.shape == (1, 24, 16)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def _errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error")]


@pytest.mark.parametrize("case", ["mixed-families", "t2i-base-draws-edits", "t2i-folder-lists-edit"])
def test_edit_family_problems_fail_validate_with_one_line(runner, folders, case):
    args = {
        # the edit specialist is an EditPlus, the base (which encodes the conditioning) an Edit
        "mixed-families": ([f"teachers.edit.path={folders[EDIT_PLUS_FAMILY]}"], "teachers.edit.path"),
        # every edit goes to the specialist, but the base's pipeline must encode the edits
        "t2i-base-draws-edits": ([f"teachers.base.path={folders['QwenImagePipeline']}", "teachers.base.tasks=[t2i]",
                                  "guidance.policy=specialised"], "teachers.base.path"),
        "t2i-folder-lists-edit": ([f"teachers.base.path={folders['QwenImagePipeline']}"], "teachers.base.tasks"),
    }[case]
    result = runner.invoke(app, ["validate", SPEC, *args[0]])
    assert result.exit_code == 2, result.output
    lines = _errors(result)
    assert len(lines) == 1 and args[1] in lines[0], result.output


def test_editplus_teachers_validate_as_edit_capable(runner, folders):
    plus = folders[EDIT_PLUS_FAMILY]
    ok = runner.invoke(app, ["validate", SPEC, f"teachers.base.path={plus}", f"teachers.edit.path={plus}"])
    assert ok.exit_code == 0, ok.output
    # a T2I-only teacher beside an EditPlus base is fine when it only serves T2I
    ok = runner.invoke(app, ["validate", SPEC, f"teachers.base.path={plus}", f"teachers.edit.path={folders['QwenImagePipeline']}",
                             "teachers.edit.tasks=[t2i]", "guidance.specialised={t2i: edit}"])
    assert ok.exit_code == 0, ok.output


def test_edit_only_student_trains_against_an_editplus_teacher(tiny_world, folders, tmp_path):
    """One DMD2 round (critic + generator update, edits only) with an EditPlus base teacher,
    its conditioning encoded the EditPlus way (1-rank gloo process, real DistillJob)."""
    plus = folders[EDIT_PLUS_FAMILY]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(TESTS / "family_job_worker.py"), "--out", str(tmp_path), "--rounds", "1", SPEC,
           *tiny_world["spec_args"], f"teachers.base.path={plus}", f"teachers.edit.path={plus}", "mixture.t2i=0",
           "guidance.policy=single", "distill.critic_updates=1", "eval.enabled=false", "tracking.enabled=false",
           "data.cached_conditioning=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["family"] == EDIT_PLUS_FAMILY and set(res["tasks"]) == {"edit"}
    m = res["rounds"][0]
    assert m["train/task_edit"] == 1.0
    assert all(torch.isfinite(torch.tensor(m[k])) for k in ("train/loss_generator", "train/loss_critic"))
