"""Cached conditioning (issue 10 item 3): `prepare-data --cache-embeddings` stores each row's
text embeddings and VAE latents; `distill` trains from them with no text encoder or VAE loaded,
and gets the losses it gets when encoding on the fly. A cache of another model is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import EXPERIMENTS

TESTS = Path(__file__).resolve().parent
SPEC = str(EXPERIMENTS / "tiny-cpu.yaml")


def _overrides(tiny_world) -> list[str]:
    # critic_updates=2 and seed 3: round 1's three micro-steps draw edit, t2i, edit
    return [*tiny_world["spec_args"], "distill.critic_updates=2", "distill.seed=3", "guidance.policy=single",
            "eval.enabled=false", "tracking.enabled=false", "data.n=16", "data.rows_per_shard=8"]


@pytest.fixture(scope="module")
def prepared(tiny_world, tmp_path_factory) -> dict:
    """One shapes dataset prepared twice: plain, and with the cache (same spec, base teacher)."""
    from flashctl.data.conditioning import ConditioningEncoder
    from flashctl.data.prepare import prepare_data
    from flashctl.spec import load_spec

    root = tmp_path_factory.mktemp("cached")
    spec = load_spec(SPEC, _overrides(tiny_world))
    prepare_data(spec.data, root / "plain", progress=False)
    prepare_data(spec.data, root / "cached", progress=False, conditioning=ConditioningEncoder.from_spec(spec, "cpu"))
    return {"root": root, "plain": root / "plain", "cached": root / "cached", "spec": spec}


def test_cache_sits_beside_unchanged_shards(prepared):
    from flashctl.data.loader import ShardLoader
    from flashctl.data.manifest import read_manifest

    plain, cached = read_manifest(prepared["plain"]), read_manifest(prepared["cached"])
    assert plain.conditioning is None
    assert cached.digest == plain.digest  # the shards (the run's data lineage) are the same bytes
    cond = cached.conditioning
    assert [f["file"] for f in cond["files"]] == ["cond-00000-of-00002.arrow", "cond-00001-of-00002.arrow"]
    assert cond["model"]["dtype"] == "float32"  # CPU: the cache must equal on-the-fly encoding
    assert cond["model"]["path"] == str(prepared["spec"].teachers["base"].path)
    assert (prepared["cached"] / cond["negatives"]["file"]).is_file()
    batch = next(iter(ShardLoader(prepared["cached"], batch_size=4, task="edit", conditioning=True)))
    assert "images" not in batch  # nothing decodes pixels when training from the cache
    c = batch["cond"]
    assert len(c["embeds"]) == len(batch["ids"]) and c["source_latents"].shape[0] == len(batch["ids"])
    assert c["embeds"][0].shape[1] == cond["hidden_size"]


def test_a_damaged_sidecar_is_caught_like_a_damaged_shard(prepared, tmp_path):
    import shutil

    from flashctl.data.manifest import read_manifest
    from flashctl.errors import UserError

    copy = tmp_path / "ds"
    shutil.copytree(prepared["cached"], copy)
    side = copy / "cond-00001-of-00002.arrow"
    data = bytearray(side.read_bytes())
    data[len(data) // 2] ^= 0xFF
    side.write_bytes(bytes(data))
    read_manifest(copy, verify=False)  # same size: only the hash can tell
    with pytest.raises(UserError, match="cond-00001-of-00002.arrow: sha256"):
        read_manifest(copy)


def test_cached_training_equals_on_the_fly_and_loads_no_encoders(prepared, tiny_world, tmp_path):
    """Same spec and seed, one job per dataset, in one 1-rank gloo process: round 1's generator
    and critic losses (micro-steps edit, t2i, edit) agree to float tolerance, and the cached job's
    adapter holds no text encoder and no VAE."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(TESTS / "cached_conditioning_worker.py"), "--out", str(tmp_path),
           "--plain", str(prepared["plain"]), "--cached", str(prepared["cached"]), "--rounds", "2",
           SPEC, *_overrides(tiny_world)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    plain, cached = res["plain"], res["cached"]
    assert plain["cached"] is False and (plain["text_encoder"], plain["vae"]) == (True, True)
    assert cached["cached"] is True and (cached["text_encoder"], cached["vae"]) == (False, False)
    assert cached["tasks"] == plain["tasks"] and {"t2i", "edit"} <= set(plain["tasks"])
    for p, c in zip(plain["rounds"], cached["rounds"]):
        for key in ("train/loss_generator", "train/loss_critic", "train/dm_grad_norm"):
            assert c[key] == pytest.approx(p[key], rel=1e-4, abs=1e-6), (key, p[key], c[key])
    print("losses plain vs cached:", [(p["train/loss_generator"], c["train/loss_generator"],
                                       p["train/loss_critic"], c["train/loss_critic"])
                                      for p, c in zip(plain["rounds"], cached["rounds"])])


def test_cache_of_another_model_is_refused_in_one_line(prepared, tiny_world, tmp_path, runner):
    from flashctl.cli import app
    from flashctl.models.adapter import QwenImageAdapter
    from flashctl.models.tiny import build_tiny_pipeline
    from flashctl.shapes import corpus
    from flashctl.spec import TinyModelSpec

    other = QwenImageAdapter(build_tiny_pipeline(TinyModelSpec(), corpus(n=200, seed=0), seed=1)).save_pipeline(
        tmp_path / "other")
    args = ["distill", SPEC, *_overrides(tiny_world), f"data.root={prepared['cached']}",
            f"teachers.base.path={other}", f"run.out_dir={tmp_path / 'runs'}", "--dry-run"]
    res = runner.invoke(app, args)
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert str(tiny_world["teacher"]) in lines[0] and str(other) in lines[0]
    # ... and is not refused when the spec says to encode on the fly
    ok = runner.invoke(app, [*args[:-1], "data.cached_conditioning=false", "--dry-run"])
    assert ok.exit_code == 0, ok.output


def test_adapter_without_encoders_loads_them_on_first_use(tiny_world):
    from flashctl.models.adapter import QwenImageAdapter

    lazy = QwenImageAdapter.from_pretrained(tiny_world["teacher"], transformer=False, encoders=False)
    full = QwenImageAdapter.from_pretrained(tiny_world["teacher"], transformer=False)
    assert lazy.text_encoder is None and lazy.vae is None
    assert (lazy.vae_scale_factor, lazy.z_dim) == (full.vae_scale_factor, full.z_dim)
    e, m = lazy.encode_prompts(["a red circle"])  # loads them now
    assert lazy.has_encoders
    e2, m2 = full.encode_prompts(["a red circle"])
    assert torch.equal(e, e2) and torch.equal(m, m2)


def test_a_cache_in_another_dtype_is_refused(prepared, tiny_world):
    from flashctl.data.conditioning import cache_for_run
    from flashctl.errors import UserError
    from flashctl.spec import load_spec

    spec = load_spec(SPEC, [*_overrides(tiny_world), f"data.root={prepared['cached']}"])
    assert cache_for_run(spec) is not None  # made on CPU in float32, used on CPU
    gpu = load_spec(SPEC, [*_overrides(tiny_world), f"data.root={prepared['cached']}", "launch.device=cuda"])
    with pytest.raises(UserError, match="cached in float32, a launch.device=cuda run encodes in bfloat16"):
        cache_for_run(gpu)


def test_cached_run_end_builds_no_text_encoder_on_the_device(prepared, tiny_world, tmp_path):
    """The end of a run trained from the cache (issue 10 item 3 + 6): the export copies the text
    encoder and VAE files without building them, and the evaluation loads them once, the text
    encoder on the CPU (never on the rank's device at scale), the VAE on the rank's device."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    overrides = [*_overrides(tiny_world), f"data.root={prepared['cached']}", "data.cached_conditioning=true",
                 "eval.enabled=true", "eval.n_t2i=1", "eval.n_edit=1", "eval.teacher_nfe=1", "eval.student_nfe=1",
                 "eval.diversity_seeds=0", "eval.reuse_teacher=false", "distill.critic_updates=1"]
    cmd = [sys.executable, str(TESTS / "family_job_worker.py"), "--out", str(tmp_path), "--rounds", "1", "--end",
           SPEC, *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["cached"] and (res["has_encoders"], res["encoder_loads"]) == (False, 0)
    # export: nothing built, yet the folder is a whole pipeline with the teacher's encoder files
    assert (res["export"]["has_encoders"], res["export"]["encoder_loads"]) == (False, 0)
    assert res["export"]["model_index"]["_class_name"] == res["family"] == "QwenImageEditPipeline"
    teacher = Path(tiny_world["teacher"])
    for sub in ("text_encoder", "vae"):
        for f in (teacher / sub).glob("*.safetensors"):
            assert (tmp_path / "student" / sub / f.name).read_bytes() == f.read_bytes()
    from diffusers import QwenImageEditPipeline

    QwenImageEditPipeline.from_pretrained(tmp_path / "student")  # loads: model_index names every part
    # evaluation: loaded once per rank, the text encoder on the CPU
    ev = res["eval"]
    assert ev["encoder_loads"] == 1 and ev["text_encoder_device"] == "cpu" and ev["vae_device"] == ev["device"]
    assert "eval/student/t2i_acc" in ev["metrics"] and (tmp_path / "eval" / "results.json").is_file()
