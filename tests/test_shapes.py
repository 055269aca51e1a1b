"""The shapes world: deterministic rows, composition weights, prompts, and the verifier's
accuracy on ground truth (~1), on degraded ground truth (>= 0.9) and on wrong images (low)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from flashctl.errors import UserError
from flashctl.shapes import (
    ASPECTS,
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    DEFAULT_SIZES,
    EDIT_TYPES,
    LETTERS,
    SHAPES,
    Scene,
    corpus,
    eval_set,
    from_png,
    generate,
    prompt_for,
    record_at,
    render,
    score,
    verify_edit,
    verify_record,
    verify_t2i,
)
from flashctl.shapes.scene import Edit, Item

KEYS = {
    "id", "task", "category", "aspect", "width", "height", "prompt", "edit_type",
    "image", "source_image", "scene", "source_scene", "source",
}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """A few hundred rows over all categories, aspects, tasks and edit types."""
    return list(generate(360, seed=5))


def degrade(png: bytes, seed: int) -> Image.Image:
    """Gaussian blur radius 0.7 + Gaussian pixel noise of std 8."""
    img = from_png(png).filter(ImageFilter.GaussianBlur(0.7))
    noise = np.random.default_rng(seed).normal(0, 8, (img.height, img.width, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).round().astype(np.uint8))


# ------------------------------------------------------------------------------------------
# Rows


def test_rows_follow_the_schema(rows):
    for r in rows:
        assert set(r) == KEYS
        assert r["source"] == "shapes" and r["task"] in ("t2i", "edit")
        assert (r["width"], r["height"]) == DEFAULT_SIZES[r["aspect"]]
        assert from_png(r["image"]).size == (r["width"], r["height"])
        scene = Scene.from_json(r["scene"])
        assert (scene.category, scene.aspect) == (r["category"], r["aspect"])
        if r["task"] == "t2i":
            assert r["edit_type"] is r["source_image"] is r["source_scene"] is None
            assert r["prompt"] == prompt_for(scene)
        else:
            assert r["edit_type"] in EDIT_TYPES
            assert from_png(r["source_image"]).size == (r["width"], r["height"])
            assert r["source_scene"] != r["scene"] and r["source_image"] != r["image"]
    assert {r["category"] for r in rows} == set(CATEGORIES)
    assert {r["aspect"] for r in rows} == set(ASPECTS)
    assert {r["edit_type"] for r in rows} == set(EDIT_TYPES) | {None}


def test_rows_are_deterministic_per_seed_and_index(rows):
    again = [record_at(i, 5) for i in (0, 17, 123)]
    assert again == [rows[0], rows[17], rows[123]]
    assert list(generate(3, seed=5, start=40)) == rows[40:43]
    other = [record_at(i, 6) for i in range(20)]
    assert other[0]["id"] == "shapes-6-0" != rows[0]["id"]
    assert sum(a["scene"] != b["scene"] for a, b in zip(other, rows)) >= 15
    # weights are read in canonical order: dict order does not change the rows
    cats = {"text": 1.0, "object": 2.0, "scene": 0.5}
    assert record_at(9, 1, categories=cats) == record_at(9, 1, categories=dict(reversed(list(cats.items()))))


def test_zero_weights_exclude_categories_aspects_and_tasks():
    only = list(generate(60, 3, categories={"text": 1.0, "scene": 0.0}, aspects={"portrait": 1.0}, edit_fraction=0.0))
    assert {(r["category"], r["aspect"], r["task"]) for r in only} == {("text", "portrait", "t2i")}
    edits = list(generate(60, 3, categories={"object": 1, "scene": 1, "text": 0}, edit_fraction=1.0))
    assert {r["task"] for r in edits} == {"edit"} and "text" not in {r["category"] for r in edits}
    mixed = Counter(r["category"] for r in generate(300, 3, categories={"object": 3.0, "scene": 1.0, "text": 0.0}))
    assert set(mixed) == {"object", "scene"} and mixed["object"] > 1.8 * mixed["scene"]


def test_custom_sizes_are_used():
    r = record_at(0, 0, aspects={"landscape": 1}, sizes={"landscape": (64, 40)})
    assert (r["width"], r["height"]) == (64, 40) and from_png(r["image"]).size == (64, 40)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"categories": {"object": 0.0, "scene": 0.0}}, "data.categories"),
        ({"categories": {"objects": 1.0}}, "unknown key 'objects'"),
        ({"aspects": {"square": -1.0, "portrait": 1.0}}, "data.aspects"),
        ({"aspects": {"portrait": 1.0}, "sizes": {"square": (32, 32)}}, "no size for aspect 'portrait'"),
        ({"edit_fraction": 1.5}, "data.edit_fraction"),
    ],
)
def test_bad_composition_is_a_one_line_user_error(kwargs, needle):
    with pytest.raises(UserError) as exc:
        record_at(0, 0, **kwargs)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_scene_json_round_trips_and_rejects_bad_fields(rows):
    for r in rows[:50]:
        assert Scene.from_json(r["scene"]).to_json() == r["scene"]
    bad = rows[0]["scene"].replace('"aspect":"', '"aspect":"x')
    with pytest.raises(UserError, match="aspect"):
        Scene.from_json(bad)
    with pytest.raises(UserError, match="not valid JSON"):
        Scene.from_json("{")


# ------------------------------------------------------------------------------------------
# Language


def test_prompts_differ_when_scenes_differ(rows):
    seen: dict[tuple[str, str], bytes] = {}
    for r in rows:
        if r["task"] == "t2i":
            key = (r["aspect"], r["prompt"])
            assert seen.setdefault(key, r["image"]) == r["image"], f"same prompt, different image: {key}"
    scene = Scene("scene", "landscape", 48, 32, "gray", (Item("circle", "red", (0, 0)), Item("square", "blue", (2, 1))))
    variants = [
        Scene("scene", "landscape", 48, 32, "gray", (Item("circle", "green", (0, 0)), scene.items[1])),
        Scene("scene", "landscape", 48, 32, "gray", (Item("triangle", "red", (0, 0)), scene.items[1])),
        Scene("scene", "landscape", 48, 32, "gray", (Item("circle", "red", (1, 0)), scene.items[1])),
        Scene("scene", "landscape", 48, 32, "black", scene.items),
        Scene("scene", "landscape", 48, 32, "gray", scene.items[:1]),
    ]
    prompts = {prompt_for(s) for s in [scene, *variants]}
    assert len(prompts) == 6
    assert prompt_for(scene) == "a red circle at the top left and a blue square at the bottom right on a gray background"


def test_instructions_name_the_change():
    src = Scene("object", "square", 32, 32, "white", (Item("circle", "red", (0, 0)),))
    from flashctl.shapes import instruction_for

    assert instruction_for(Edit("recolour", src, item=0, colour="blue")) == "make the red circle blue"
    assert instruction_for(Edit("remove", src, item=0)) == "remove the red circle"
    assert instruction_for(Edit("move", src, item=0, cell=(1, 1))) == "move the red circle to the bottom right"
    add = Edit("add", src, new_item=Item("triangle", "green", (1, 0)))
    assert instruction_for(add) == "add a green triangle at the top right"
    assert instruction_for(Edit("background", src, background="black")) == "change the background to black"


def test_corpus_covers_every_word(rows):
    texts = corpus(n=300, seed=0)
    assert texts == corpus(n=300, seed=0)
    words = {w.strip(",") for t in texts for w in t.split()}
    used = {w.strip(",") for r in rows for w in r["prompt"].split()}
    assert used <= words
    assert set(COLOURS) | set(SHAPES) | set(LETTERS) | set(BACKGROUNDS) <= words
    assert {"left", "center", "right", "top", "middle", "bottom", "make", "remove", "add", "move", "change"} <= words


# ------------------------------------------------------------------------------------------
# Evaluation set


def test_eval_set_is_fixed_balanced_and_apart_from_training():
    ev = eval_set(1234, n_t2i=18, n_edit=26, sizes=DEFAULT_SIZES)
    assert ev == eval_set(1234, n_t2i=18, n_edit=26, sizes=DEFAULT_SIZES)
    t2i = [r for r in ev if r["task"] == "t2i"]
    edits = [r for r in ev if r["task"] == "edit"]
    assert len(t2i) == 18 and len(edits) == 26
    assert Counter((r["category"], r["aspect"]) for r in t2i) == Counter(
        {(c, a): 2 for c in CATEGORIES for a in ASPECTS}
    )
    types = Counter(r["edit_type"] for r in edits)
    assert set(types) == set(EDIT_TYPES) and max(types.values()) - min(types.values()) <= 1
    assert {r["category"] for r in edits} == set(CATEGORIES) and {r["aspect"] for r in edits} == set(ASPECTS)
    train = list(generate(44, 1234))
    assert not {r["id"] for r in ev} & {r["id"] for r in train}
    assert sum(a["scene"] == b["scene"] for a, b in zip(ev, train)) <= 2
    only_text = eval_set(1, 4, 4, DEFAULT_SIZES, categories={"text": 1.0, "object": 0.0})
    assert {r["category"] for r in only_text} == {"text"}
    assert {r["edit_type"] for r in only_text if r["task"] == "edit"} == {"recolour", "background"}


# ------------------------------------------------------------------------------------------
# Verifier


def test_verifier_accepts_rendered_ground_truth(rows):
    s = score([verify_record(r, r["image"]) for r in rows])
    assert s["n"] == len(rows) and s["accuracy"] >= 0.98, s
    for group in ("by_category", "by_aspect", "by_edit_type"):
        assert all(v["accuracy"] >= 0.95 for v in s[group].values()), s[group]
    assert set(s["claims"]) >= {"background", "count", "present", "position", "colour", "shape", "letter", "edited", "preserved"}


def test_verifier_survives_blur_and_noise(rows):
    s = score([verify_record(r, degrade(r["image"], i)) for i, r in enumerate(rows)])
    assert s["accuracy"] >= 0.9, s


def test_verifier_accepts_any_image_size(rows):
    for r in rows[:40]:
        big = from_png(r["image"]).resize((r["width"] * 2, r["height"] * 2), Image.Resampling.BICUBIC)
        assert verify_record(r, big)["correct"], r["prompt"]


def test_verifier_rejects_other_records_images(rows):
    shuffled = rows[1:] + rows[:1]
    s = score([verify_record(r, other["image"]) for r, other in zip(rows, shuffled)])
    assert s["accuracy"] <= 0.3, s


def test_verifier_rejects_blank_images(rows):
    for colour in [(250, 250, 250), (128, 128, 128), (200, 120, 120)]:
        s = score([verify_record(r, Image.new("RGB", (r["width"], r["height"]), colour)) for r in rows])
        # only "remove the <only object>" is truly satisfied by a blank white image
        assert s["accuracy"] <= 0.1, (colour, s)


def test_verifier_rejects_unedited_source_as_output(rows):
    edits = [r for r in rows if r["task"] == "edit"]
    s = score([verify_record(r, r["source_image"]) for r in edits])
    assert s["accuracy"] <= 0.3 and s["claims"]["edited"] <= 0.3, s


def test_edit_claims_catch_each_failure_mode():
    src = Scene("scene", "landscape", 48, 32, "gray", (Item("circle", "red", (0, 0)), Item("square", "blue", (2, 1))))
    edit = Edit("recolour", src, item=0, colour="yellow")
    tgt = edit.target()
    args = (src.to_json(), "recolour")
    good = verify_edit(render(tgt), render(src), tgt.to_json(), *args)
    assert all(good.values()), good
    # instruction done but an untouched object changed too
    spoiled = Edit("recolour", tgt, item=1, colour="green").target()
    claims = verify_edit(render(spoiled), render(src), tgt.to_json(), *args)
    assert claims["edited"] and not claims["obj1.colour"] and not claims["preserved"]
    # wrong new colour
    wrong = Edit("recolour", src, item=0, colour="cyan").target()
    claims = verify_edit(render(wrong), render(src), tgt.to_json(), *args)
    assert not claims["edited"] and claims["preserved"]
    with pytest.raises(UserError, match="does not turn"):
        verify_edit(render(tgt), render(src), tgt.to_json(), src.to_json(), "move")


def test_t2i_claims_name_what_is_wrong():
    scene = Scene("scene", "portrait", 32, 48, "black", (Item("triangle", "green", (0, 2)), Item("circle", "purple", (1, 0))))
    assert all(verify_t2i(render(scene), scene.to_json()).values())
    moved = Scene("scene", "portrait", 32, 48, "black", (Item("triangle", "green", (1, 2)), scene.items[1]))
    claims = verify_t2i(render(moved), scene.to_json())
    assert claims["obj0.present"] and not claims["obj0.position"] and claims["count"] and claims["obj1.shape"]
    square = Scene("scene", "portrait", 32, 48, "white", (Item("square", "green", (0, 2)), scene.items[1]))
    claims = verify_t2i(render(square), scene.to_json())
    assert not claims["background"] and not claims["obj0.shape"] and claims["obj0.colour"]
    extra = Scene("scene", "portrait", 32, 48, "black", scene.items + (Item("square", "red", (0, 0)),))
    assert not verify_t2i(render(extra), scene.to_json())["count"]
    text = Scene("text", "landscape", 48, 32, "white", (Item("letter", "red", None, "A"),))
    other = Scene("text", "landscape", 48, 32, "white", (Item("letter", "red", None, "X"),))
    claims = verify_t2i(render(other), text.to_json())
    assert claims["obj0.colour"] and not claims["obj0.letter"]


def test_score_aggregates_per_group_and_claim():
    results = [
        {"task": "t2i", "category": "object", "aspect": "square", "edit_type": None, "claims": {"obj0.colour": True, "count": True}},
        {"task": "edit", "category": "scene", "aspect": "square", "edit_type": "move", "claims": {"obj0.colour": False, "edited": True}},
    ]
    s = score(results)
    assert s["accuracy"] == 0.5 and s["by_category"]["object"] == {"n": 1, "accuracy": 1.0}
    assert s["by_edit_type"] == {"move": {"n": 1, "accuracy": 0.0}}
    assert s["claims"] == {"colour": 0.5, "count": 1.0, "edited": 1.0}
