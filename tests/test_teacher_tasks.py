"""Which teachers a spec holds and picks, and what validation says when a picked teacher
cannot serve its task (issue 10 items 2 and 7)."""

from __future__ import annotations

import pytest
import yaml

from conftest import EXPERIMENTS
from flashctl.cli import app
from flashctl.spec import load_spec

TINY = EXPERIMENTS / "tiny-cpu.yaml"


def _write(tmp_path, overrides: dict) -> str:
    data = yaml.safe_load(TINY.read_text())
    for dotted, value in overrides.items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error")]


@pytest.mark.parametrize(
    "overrides,field",
    [
        # the edit specialist lists only t2i
        ({"teachers.edit.tasks": ["t2i"]}, "teachers.edit.tasks"),
        # single policy: the base teacher serves edits, but cannot
        ({"guidance.policy": "single", "teachers.base.tasks": ["t2i"]}, "teachers.base.tasks"),
        # a known T2I-only hub pipeline cannot claim edit
        ({"teachers.base.path": "Qwen/Qwen-Image"}, "teachers.base.tasks"),
    ],
    ids=["specialist-cannot-edit", "base-cannot-edit", "t2i-only-hub-id"],
)
def test_edit_picked_teacher_that_cannot_edit_fails_validate_with_one_line(runner, tmp_path, overrides, field):
    result = runner.invoke(app, ["validate", _write(tmp_path, overrides)])
    assert result.exit_code == 2, result.output
    lines = _errors(result)
    assert len(lines) == 1, result.output
    assert field in lines[0] and "edit" in lines[0]
    assert "Traceback" not in result.output


def test_base_that_cannot_edit_is_fine_when_it_is_never_picked_for_edits(runner, tmp_path):
    # specialised policy routes every edit to the edit teacher; no edits at all is fine too
    for overrides in ({"guidance.policy": "specialised", "teachers.base.tasks": ["t2i"]},
                      {"guidance.policy": "single", "teachers.base.tasks": ["t2i"], "mixture.edit": 0}):
        result = runner.invoke(app, ["validate", _write(tmp_path, overrides)])
        assert result.exit_code == 0, result.output
    # stepwise still anchors edits on the base at the steps the specialist does not cover
    result = runner.invoke(app, ["validate", _write(tmp_path, {"teachers.base.tasks": ["t2i"]})])
    assert result.exit_code == 2 and "teachers.base.tasks" in result.output
    result = runner.invoke(app, ["validate", _write(tmp_path, {"teachers.base.tasks": ["t2i"], "guidance.steps": [0, 1, 2, 3]})])
    assert result.exit_code == 0, result.output


def test_the_gpu_example_has_an_edit_capable_base():
    spec = load_spec(EXPERIMENTS / "qwen-image-flash.yaml")
    base = spec.teachers[spec.guidance.base]
    assert "edit" in base.tasks and base.path != "Qwen/Qwen-Image"


def test_student_sigma_range_must_hold_a_level_of_the_training_grid(runner, tmp_path):
    # 4 steps at shift 3: levels 1, .9, .75, .5; steps [2, 3] -> .75, .5
    ok = runner.invoke(app, ["validate", _write(tmp_path, {"guidance.student_sigma_range": [0.4, 0.8]})])
    assert ok.exit_code == 0, ok.output
    never = runner.invoke(app, ["validate", _write(tmp_path, {"guidance.student_sigma_range": [0.0, 0.4]})])
    assert never.exit_code == 2 and "guidance.student_sigma_range" in never.output and "0.75, 0.5" in never.output
    old = runner.invoke(app, ["validate", _write(tmp_path, {"guidance.sigma_range": [0.4, 0.8]})])
    assert old.exit_code == 2 and "renamed student_sigma_range" in old.output


def test_teachers_held_is_what_policy_and_mixture_can_pick():
    def held(*ov):
        return load_spec(TINY, list(ov)).teachers_held()

    assert held("guidance.policy=single") == ["base"]
    assert held("guidance.policy=stepwise") == ["base", "edit"]
    assert held("guidance.policy=specialised") == ["base", "edit"]
    assert held("guidance.policy=stepwise", "mixture.edit=0") == ["base"]  # the specialist is never picked
    # the base is held even when never picked (anchor, conditioning, final evaluation)
    spec = load_spec(TINY, ["guidance.policy=specialised", "mixture.t2i=0"])
    assert spec.teachers_picked("edit") == ["edit"] and spec.teachers_picked("t2i") == []
    assert spec.teachers_held() == ["base", "edit"]
