"""The shapes world with modes: underspecified prompts (open attributes drawn from a stored
distribution), referring edits, the verifier on them (ground truth accepted; blends of two
modes, other records' images and unchanged sources rejected) and the diversity metric."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageFilter

from flashctl.data.manifest import read_manifest
from flashctl.data.prepare import prepare_data
from flashctl.errors import UserError
from flashctl.shapes import (
    EDIT_TYPES,
    REF_EDIT_TYPES,
    Scene,
    diversity,
    eval_set,
    from_png,
    generate,
    instruction_for,
    open_distributions,
    prompt_for,
    record_at,
    render,
    resample_open,
    score,
    verify_edit,
    verify_record,
)
from flashctl.shapes.diversity import normalised_entropy, reference, total_variation
from flashctl.shapes.language import referents
from flashctl.shapes.scene import Edit, Item, Open
from flashctl.spec import DataSpec

SEED = 11


@pytest.fixture(scope="module")
def world() -> list[dict]:
    """Rows of a world where every T2I prompt and `add` edit leaves something open and every
    scene recolour/remove/move refers to its item by one property."""
    return list(generate(420, SEED, open_attributes=1.0, ref_edits=1.0))


@pytest.fixture(scope="module")
def open_rows(world) -> list[dict]:
    rows = [r for r in world if Scene.from_json(r["scene"]).open is not None]
    assert len(rows) >= 200
    return rows


def degrade(png: bytes, seed: int) -> Image.Image:
    """Gaussian blur radius 0.7 + Gaussian pixel noise of std 8 (as in test_shapes)."""
    img = from_png(png).filter(ImageFilter.GaussianBlur(0.7))
    noise = np.random.default_rng(seed).normal(0, 8, (img.height, img.width, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).round().astype(np.uint8))


# ------------------------------------------------------------------------------------------
# Rows


def test_shares_of_zero_give_the_fully_specified_world_bit_for_bit():
    plain = list(generate(150, 4))
    assert list(generate(150, 4, open_attributes=0.0, ref_edits=0.0)) == plain
    assert eval_set(4, 20, 20) == eval_set(4, 20, 20, open_attributes=0.0, ref_edits=0.0)
    assert not any('"open"' in r["scene"] for r in plain)
    # with shares > 0 the rows that stay fully specified are the same rows as before
    mixed = list(generate(150, 4, open_attributes=0.5, ref_edits=0.5))
    same = [a == b for a, b in zip(plain, mixed)]
    assert 30 <= sum(same) < 150
    for a, b in zip(plain, mixed):
        if a != b:  # only the prompt and the `open` / edit type differ: the images are the same scene
            assert a["image"] == b["image"] and a["source_image"] == b["source_image"]
    assert [record_at(i, 4, open_attributes=0.5, ref_edits=0.5) for i in (3, 77)] == [mixed[3], mixed[77]]


def test_open_prompts_state_only_what_is_not_open(world):
    t2i = [r for r in world if r["task"] == "t2i"]
    kinds = Counter(Scene.from_json(r["scene"]).open.kind for r in t2i)
    assert set(kinds) == {"position", "colour", "both", "background"}
    for r in t2i:
        scene = Scene.from_json(r["scene"])
        words = set(r["prompt"].replace(",", "").split())
        assert r["prompt"] == prompt_for(scene)
        if not scene.items[0].is_letter:  # a letter is always centred: no position words
            has_position = bool(words & {"top", "bottom", "middle"})
            assert has_position == (scene.open.kind in ("colour", "background")), r["prompt"]
        colour_words = words & {"red", "yellow", "green", "cyan", "blue", "purple"}
        assert bool(colour_words) == (scene.open.kind in ("position", "background")), r["prompt"]
        if scene.category == "scene":
            assert ("background" in words) == (scene.open.kind != "background"), r["prompt"]
    scene = Scene("scene", "square", 32, 32, "gray", (Item("circle", "red", (0, 0)), Item("square", "blue", (1, 1))))
    cells = ((0, 0), (1, 0), (0, 1), (1, 1))
    assert prompt_for(Scene(**{**scene.__dict__, "open": Open("position", None, (cells, cells))})) == (
        "a red circle and a blue square on a gray background"
    )
    colours = (("red", "blue"), None)
    assert prompt_for(Scene(**{**scene.__dict__, "open": Open("colour", None, (), colours)})) == (
        "a circle at the top left and a blue square at the bottom right on a gray background"
    )


def test_the_stored_distribution_is_a_function_of_the_prompt_and_round_trips(world, open_rows):
    """Same prompt (and source) -> same stored distribution: what the verifier and the
    diversity metric read is the data's conditional law given what the model sees."""
    seen: dict[tuple, dict] = {}
    for r in open_rows:
        dists = open_distributions(r)
        assert dists and all(abs(sum(d.values()) - 1) < 1e-9 for d in dists.values())
        key = (r["aspect"], r["prompt"], r["source_scene"])
        assert seen.setdefault(key, dists) == dists
        assert Scene.from_json(r["scene"]).to_json() == r["scene"]
        assert Scene.from_json(Scene.from_json(r["scene"]).to_json()) == Scene.from_json(r["scene"])
        realised = json.loads(r["scene"])
        for name, d in dists.items():  # the ground truth is one of the options
            i = name.split(".")[0]
            value = realised["background"] if name == "background" else realised["items"][int(i[3:])][name.split(".")[1]]
            assert (tuple(value) if isinstance(value, list) else value) in d
    repeated = Counter((r["aspect"], r["prompt"]) for r in open_rows if r["task"] == "t2i")
    assert max(repeated.values()) >= 2  # open prompts do repeat with different images
    bad = json.loads(open_rows[0]["scene"])
    bad["open"]["items"] = [{"cell": [[9, 9]]}]
    with pytest.raises(UserError, match=r"open.items\[0\].cell"):
        Scene.from_json(json.dumps(bad))


def test_open_share_and_per_kind_mapping_control_the_composition():
    rows = list(generate(600, 2, edit_fraction=0.0, open_attributes=0.3))
    share = np.mean([Scene.from_json(r["scene"]).open is not None for r in rows])
    assert 0.24 <= share <= 0.36, share
    only = list(generate(300, 2, edit_fraction=0.0, open_attributes={"background": 1.0}))
    kinds = Counter((r["category"], (Scene.from_json(r["scene"]).open or Open("none")).kind) for r in only)
    assert set(kinds) == {("scene", "background"), ("object", "none"), ("text", "none")}
    adds = [r for r in generate(400, 2, edit_fraction=1.0, open_attributes={"colour": 1.0}) if r["edit_type"] == "add"]
    assert adds and all(Scene.from_json(r["scene"]).open.kind == "colour" for r in adds)
    for bad, needle in [(1.5, "data.open_attributes"), ({"size": 0.1}, "unknown kind 'size'"),
                        ({"position": 0.7, "colour": 0.6}, "sum to 1.3")]:
        with pytest.raises(UserError, match=needle):
            record_at(0, 0, open_attributes=bad)
    with pytest.raises(UserError, match="data.ref_edits"):
        record_at(0, 0, ref_edits=2.0)


def test_data_spec_fields_reach_prepared_shards(tmp_path):
    assert DataSpec().open_attributes == 0.0 and DataSpec().ref_edits == 0.0
    with pytest.raises(ValueError, match="open_attributes"):
        DataSpec(open_attributes={"position": 0.8, "both": 0.8})
    out = tmp_path / "ds"
    prepare_data(DataSpec(n=40, seed=1, open_attributes=1.0, ref_edits=1.0), out, progress=False)
    m = read_manifest(out)
    cols = ("id", "prompt", "edit_type", "scene", "source_scene")
    rows = [{k: r[k] for k in cols} for s in m.shards for r in pa.ipc.open_stream(out / s.file).read_all().to_pylist()]
    assert rows == [{k: r[k] for k in cols} for r in generate(40, 1, open_attributes=1.0, ref_edits=1.0)]
    assert any('"open"' in r["scene"] for r in rows) and any(r["edit_type"] in REF_EDIT_TYPES for r in rows)


# ------------------------------------------------------------------------------------------
# Referring edits


def test_referring_edits_name_one_property_that_singles_the_item_out(world):
    refs = [r for r in world if r["edit_type"] in REF_EDIT_TYPES]
    assert {r["edit_type"] for r in refs} == set(REF_EDIT_TYPES) and all(r["category"] == "scene" for r in refs)
    assert not any(r["edit_type"] in REF_EDIT_TYPES for r in generate(200, SEED))  # not in the default world
    phrases = Counter()
    for r in refs:
        src = Scene.from_json(r["source_scene"])
        assert len(src.items) >= 2
        phrase = next(p for p in ("one", "on the", "at the", "the circle", "the square", "the triangle") if p in r["prompt"])
        phrases[phrase] += 1
    assert len(phrases) >= 4, phrases
    src = Scene("scene", "landscape", 48, 32, "white",
                (Item("circle", "red", (0, 0)), Item("circle", "blue", (2, 0)), Item("square", "red", (1, 1))))
    assert referents(src, 0) == ["left", "cell"]
    assert referents(src, 2) == ["shape", "bottom", "cell"]
    assert instruction_for(Edit("remove-ref", src, item=0, refer="left")) == "remove the shape on the left"
    assert instruction_for(Edit("recolour-ref", src, item=2, refer="shape", colour="green")) == "make the square green"
    assert instruction_for(Edit("move-ref", src, item=1, refer="cell", cell=(1, 0))) == (
        "move the shape at the top right to the top center"
    )
    assert instruction_for(Edit("remove-ref", src, item=1, refer="colour")) == "remove the blue one"
    # editing the wrong one of the two circles fails the edit
    edit = Edit("remove-ref", src, item=0, refer="left")
    wrong = Edit("remove-ref", src, item=1, refer="right").target()
    claims = verify_edit(render(wrong), render(src), edit.target().to_json(), src.to_json(), "remove-ref")
    assert not claims["edited"] and not claims["preserved"]


# ------------------------------------------------------------------------------------------
# Verifier validation on the world with modes (the numbers the lead reports)


def test_verifier_accepts_ground_truth_of_open_and_referring_rows(world, open_rows):
    s = score([verify_record(r, r["image"]) for r in open_rows])
    assert s["n"] >= 200 and s["accuracy"] >= 0.99, s
    assert {"clean", "no_ghost", "count"} <= set(s["claims"])
    refs = [r for r in world if r["edit_type"] in REF_EDIT_TYPES]
    assert score([verify_record(r, r["image"]) for r in refs])["accuracy"] == 1.0
    noisy = score([verify_record(r, degrade(r["image"], i)) for i, r in enumerate(open_rows)])
    assert noisy["accuracy"] >= 0.95, noisy


def test_any_option_of_an_open_attribute_is_accepted(open_rows):
    rng = np.random.default_rng(0)
    for r in open_rows[:80]:
        other = resample_open(Scene.from_json(r["scene"]), rng)
        res = verify_record(r, render(other))
        assert res["correct"], (r["prompt"], res["claims"])


def _other_mode(scene: Scene, rng: np.random.Generator) -> Scene:
    """A different realisation of the same prompt whose average with `scene` is not itself a
    valid image. Gray is ~ the mean of white and black, so that blend of backgrounds is a
    valid third mode (a property of the palette, not of the verifier) and is skipped."""
    for _ in range(100):
        other = resample_open(scene, rng)
        if other != scene and {scene.background, other.background} != {"white", "black"}:
            return other
    return scene


def test_verifier_rejects_a_blend_of_two_modes(open_rows):
    rng = np.random.default_rng(1)
    results = []
    for r in open_rows:
        scene = Scene.from_json(r["scene"])
        other = _other_mode(scene, rng)
        if other == scene:
            continue
        blend = Image.blend(from_png(r["image"]), render(other), 0.5)
        results.append(verify_record(r, blend))
    s = score(results)
    assert s["n"] >= 180 and s["accuracy"] <= 0.02, s
    assert s["claims"]["clean"] <= 0.5 and s["claims"]["count"] <= 0.6, s["claims"]


def test_verifier_rejects_other_records_images_and_unchanged_sources(world, open_rows):
    shuffled = open_rows[1:] + open_rows[:1]
    s = score([verify_record(r, o["image"]) for r, o in zip(open_rows, shuffled)])
    assert s["accuracy"] <= 0.1, s
    edits = [r for r in world if r["edit_type"] in REF_EDIT_TYPES or (r["edit_type"] == "add" and '"open"' in r["scene"])]
    by_type = score([verify_record(r, r["source_image"]) for r in edits])["by_edit_type"]
    assert set(by_type) == {"add", *REF_EDIT_TYPES}
    assert all(v["accuracy"] == 0.0 for v in by_type.values()), by_type


def test_open_add_checks_the_new_item_anywhere_free_and_keeps_the_rest():
    src = Scene("object", "square", 32, 32, "white", (Item("circle", "red", (0, 0)),))
    free = tuple(src.free_cells())
    op = Open("position", None, (None, free))
    edit = Edit("add", src, new_item=Item("square", "blue", (1, 1)), open=op)
    tgt = edit.target()
    assert instruction_for(edit) == "add a blue square"
    args = (render(src), tgt.to_json(), src.to_json(), "add")
    for cell in free:
        elsewhere = Scene("object", "square", 32, 32, "white", (src.items[0], Item("square", "blue", cell)))
        assert all(verify_edit(render(elsewhere), *args).values()), cell
    spoiled = Scene("object", "square", 32, 32, "white", (Item("circle", "green", (0, 0)), Item("square", "blue", (1, 0))))
    claims = verify_edit(render(spoiled), *args)
    assert claims["edited"] and not claims["preserved"]
    two = Scene("object", "square", 32, 32, "white", (src.items[0], Item("square", "blue", (1, 0)), Item("square", "blue", (1, 1))))
    assert not verify_edit(render(two), *args)["count"]


# ------------------------------------------------------------------------------------------
# Diversity


def test_diversity_formulas_by_hand():
    uniform4 = {c: 0.25 for c in "abcd"}
    assert normalised_entropy({"a": 4}, 4) == 0.0
    assert total_variation({"a": 4}, uniform4) == pytest.approx(0.75)
    assert normalised_entropy({"a": 1, "b": 1, "c": 1, "d": 1}, 4) == pytest.approx(1.0)
    assert total_variation({"a": 1, "b": 1, "c": 1, "d": 1}, uniform4) == pytest.approx(0.0)
    assert normalised_entropy({"a": 2, "b": 2}, 4) == pytest.approx(0.5)  # log 2 / log 4
    assert total_variation({"a": 2, "b": 2}, uniform4) == pytest.approx(0.5)
    assert total_variation({"z": 3}, uniform4) == pytest.approx(1.0)  # all outside the support
    # 2 draws from a fair coin: same face w.p. 1/2 (H = 0, TV = 1/2), else H = 1, TV = 0
    assert reference({"h": 0.5, "t": 0.5}, 2) == pytest.approx((0.5, 0.25))
    # 1 draw from 4 options: H = 0, TV = 3/4 always
    assert reference(uniform4, 1) == pytest.approx((0.0, 0.75))


def test_diversity_sees_collapse_and_coverage_on_verified_images():
    rows = [r for r in generate(200, 3, edit_fraction=0.0, open_attributes={"position": 1.0})
            if r["category"] == "object" and r["aspect"] == "square"][:6]
    assert len(rows) == 6
    collapsed, spread = defaultdict(list), defaultdict(list)
    for r in rows:
        scene = Scene.from_json(r["scene"])
        for k in range(4):  # 4 seeds: one cell every time, or each of the 4 cells once
            collapsed[r["id"]].append(verify_record(r, r["image"]))
            cell = ((0, 0), (1, 0), (0, 1), (1, 1))[k]
            moved = Scene(**{**scene.__dict__, "items": (Item(scene.items[0].shape, scene.items[0].colour, cell),)})
            spread[r["id"]].append(verify_record(r, render(moved)))
    d = diversity(rows, collapsed)
    assert d["cell"] == pytest.approx({"prompts": 6, "entropy": 0.0, "tv": 0.75,
                                       "entropy_ref": reference({c: 0.25 for c in range(4)}, 4)[0],
                                       "tv_ref": reference({c: 0.25 for c in range(4)}, 4)[1]})
    assert d["valid"] == 1.0 and d["images"] == 24 and "colour" not in d
    d = diversity(rows, spread)
    assert d["cell"]["entropy"] == pytest.approx(1.0) and d["cell"]["tv"] == pytest.approx(0.0)
    # rejected images do not count: with one accepted image per row nothing is measured
    blank = {r["id"]: [verify_record(r, r["image"])] + [verify_record(r, Image.new("RGB", (32, 32), "white"))] * 3
             for r in rows}
    d = diversity(rows, blank)
    assert "cell" not in d and d["skipped"] == 6 and d["valid"] == pytest.approx(0.25)
    assert math.isnan(diversity([], {})["valid"])


def test_eval_set_with_modes_is_fixed_and_cycles_referring_edits():
    ev = eval_set(7, n_t2i=27, n_edit=32, open_attributes=0.5, ref_edits=1.0)
    assert ev == eval_set(7, n_t2i=27, n_edit=32, open_attributes=0.5, ref_edits=1.0)
    types = Counter(r["edit_type"] for r in ev if r["task"] == "edit")
    assert set(types) == set(EDIT_TYPES) | set(REF_EDIT_TYPES) and max(types.values()) - min(types.values()) <= 1
    n_open = sum(Scene.from_json(r["scene"]).open is not None for r in ev if r["task"] == "t2i")
    assert 6 <= n_open <= 21
    plain = eval_set(7, n_t2i=27, n_edit=32)
    assert [r["image"] for r in ev[:27]] == [r["image"] for r in plain[:27]]  # same scenes, other prompts
