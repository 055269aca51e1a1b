"""The grid in MLflow (through `MlflowClient` only; tag names in `flashctl.track`).

One parent run per grid (tags `flashctl.kind=grid`, `flashctl.grid_id`, factors and level
order), one child per cell (`mlflow.parentRunId`, factor, level, spec hash, grid id). Running a
grid again finds its parent by grid id: finished children with the same hash are skipped, failed
or unfinished ones run again under their old run id (the job resumes from the checkpoint in its
run dir).

A cell that no run of this grid holds yet may *reuse* a finished cell of another grid in the same
experiment: same spec hash, same `inputs_digest` (the teachers' files and the data, which the
hash cannot see). Its child run is created FINISHED with `flashctl.reused_from` naming that
run, and `report` reads the source's metrics and images. Why: every factor's grid holds the
base recipe (mixed-category = stepwise = 5:5 on the embedded default), and a second
data-composition grid should not retrain what the first trained.

The same digest guards `--resume`: a finished cell whose run (or reused source) trained on other
teachers' files or data than the current ones is not kept. It is reused from a current run if one
exists, else trained again under a new child, its old run dir renamed `*.stale-<run id>` so the
job does not resume the old checkpoint.
"""

from __future__ import annotations

import json
from typing import Any

from flashctl.ablate.grid import Cell, Grid
from flashctl.ablate.status import CellState
from flashctl.distill.job import INPUTS_SCHEME, inputs_digest
from flashctl.errors import UserError
from flashctl.spec import load_spec, to_yaml
from flashctl.track import (
    KIND_CELL,
    KIND_GRID,
    TAG_ATTEMPTS,
    TAG_CELL,
    TAG_CELLS,
    TAG_FACTOR,
    TAG_FACTORS,
    TAG_GRID,
    TAG_HASH,
    TAG_INPUTS,
    TAG_KIND,
    TAG_LEVEL,
    TAG_LEVEL_OF,
    TAG_LEVELS,
    TAG_OVERRIDES,
    TAG_PARENT,
    TAG_REUSED,
    TAG_SPEC,
    find_parent,
    list_children,
)


def grid_plan_json(grid: Grid) -> dict[str, Any]:
    """The grid as JSON (logged on the parent as `grid.json`)."""
    return {
        "grid_id": grid.grid_id,
        "spec": grid.spec_path,
        "overrides": list(grid.overrides),
        "factors": list(grid.factors),
        "levels": grid.levels,
        "cells": [
            {"index": c.index, "key": c.key, "levels": dict(c.levels), "overrides": c.overrides,
             "spec_hash": c.spec_hash, "name": c.name}
            for c in grid.cells
        ],
    }


def create_parent(client, experiment_id: str, grid: Grid) -> str:
    """Create the grid's parent run with its tags and `grid.json` / `spec.resolved.yaml`."""
    tags = {
        TAG_KIND: KIND_GRID,
        TAG_GRID: grid.grid_id,
        TAG_FACTORS: ",".join(grid.factors),
        TAG_LEVELS: json.dumps(grid.levels),
        TAG_SPEC: grid.spec_path or "<default>",
        TAG_OVERRIDES: " ".join(grid.overrides)[:5000],
        TAG_CELLS: str(len(grid.cells)),
    }
    name = "-".join([grid.base_name, "grid"] + list(grid.factors))
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    client.log_text(run_id, json.dumps(grid_plan_json(grid), indent=2), "grid.json")
    client.log_text(run_id, to_yaml(grid.base_spec), "spec.resolved.yaml")
    return run_id


def find_reusable(client, experiment_id: str, grid: Grid, cell: Cell, inputs: str | None):
    """The newest FINISHED cell run of another grid in the experiment that trained exactly this
    cell (same spec hash and inputs digest) and is not itself a reuse, or None."""
    if inputs is None:
        return None
    runs = client.search_runs(
        [experiment_id],
        filter_string=(f"tags.`{TAG_KIND}` = '{KIND_CELL}' and tags.`{TAG_HASH}` = '{cell.spec_hash}' "
                       f"and tags.`{TAG_INPUTS}` = '{inputs}' and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in runs:  # reused children carry no inputs tag; a cell of this grid is never its own source
        if run.data.tags.get(TAG_GRID) != grid.grid_id and run.info.lifecycle_stage != "deleted":
            return run
    return None


def _usable(client, run_id: str) -> bool:
    """Whether a reused cell's source run still exists, FINISHED and not deleted."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    return run.info.status == "FINISHED" and run.info.lifecycle_stage != "deleted"


def _stale(client, run, inputs: str | None) -> bool:
    """Whether a cell run trained on other teachers' files or data than `inputs` (the current
    `inputs_digest`). A reused run is judged by its source's tag. Unknown on either side (a run
    from before the tag or its current scheme, data not prepared) is not stale: a cell is
    retrained only on evidence, never on a guess."""
    tags = run.data.tags
    if tags.get(TAG_REUSED):
        from mlflow.exceptions import MlflowException

        try:
            tags = client.get_run(tags[TAG_REUSED]).data.tags
        except MlflowException:
            return False
    trained = tags.get(TAG_INPUTS)
    return (inputs is not None and trained is not None and trained.startswith(INPUTS_SCHEME)
            and trained != inputs)


def _move_aside(run_dir, run_id: str):
    """Rename a stale cell's run dir (its checkpoint would be resumed, not retrained) to
    `<name>.stale-<run id>` (`-2`, ... if taken): nothing of the old run is deleted. Returns the
    new path, or None when there was no run dir (a reused cell has none)."""
    if not run_dir.exists():
        return None
    target = run_dir.with_name(f"{run_dir.name}.stale-{run_id[:12]}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.stale-{run_id[:12]}-{n}")
    run_dir.rename(target)
    return target


def create_child(client, experiment_id: str, parent_id: str, grid: Grid, cell: Cell,
                 extra_tags: dict[str, str] | None = None) -> str:
    """Create a cell's child run (tags: parent, factor, level, spec hash, grid id)."""
    tags = {
        TAG_PARENT: parent_id,
        TAG_KIND: KIND_CELL,
        TAG_GRID: grid.grid_id,
        TAG_FACTOR: ",".join(f for f, _ in cell.levels),
        TAG_LEVEL: ",".join(lv for _, lv in cell.levels),
        TAG_CELL: cell.key,
        TAG_HASH: cell.spec_hash,
        TAG_ATTEMPTS: "0",
        **{TAG_LEVEL_OF + f: lv for f, lv in cell.levels},
        **(extra_tags or {}),
    }
    run = client.create_run(experiment_id, run_name=cell.name, tags=tags)
    return run.info.run_id


def prepare_runs(client, experiment_id: str, grid: Grid, resume: bool,
                 reuse: bool = True) -> tuple[str, list[CellState]]:
    """Find or create the parent and a child per cell; decide which cells run. With `reuse`, a
    cell new to this grid that another grid already trained is recorded as `reused`."""
    parent = find_parent(client, experiment_id, grid.grid_id)
    children: dict[str, Any] = {}
    if parent is not None:
        for run in list_children(client, experiment_id, parent.info.run_id):
            if run.data.tags.get(TAG_HASH) is not None:
                children[run.data.tags.get(TAG_CELL, "")] = run  # newest wins
        if not resume:
            done = sum(1 for c in grid.cells if (r := children.get(c.key)) is not None
                       and r.info.status == "FINISHED" and r.data.tags.get(TAG_HASH) == c.spec_hash)
            raise UserError(
                f"grid {grid.grid_id} already has parent run {parent.info.run_id} in experiment "
                f"{grid.experiment!r} ({done}/{len(grid.cells)} cells finished): pass --resume to "
                f"continue it (finished cells are skipped)"
            )
        parent_id = parent.info.run_id
    else:
        parent_id = create_parent(client, experiment_id, grid)
    states = []
    digests: dict[tuple, str | None] = {}
    for cell in grid.cells:
        run = children.get(cell.key)
        state = CellState(cell, log=grid.cell_log(cell))
        if run is not None and run.data.tags.get(TAG_REUSED) and not (
                reuse and run.info.status == "FINISHED" and _usable(client, run.data.tags[TAG_REUSED])):
            if run.info.status != "FINISHED":  # left half-made by a crash: train it under its own run
                client.delete_tag(run.info.run_id, TAG_REUSED)
            else:  # --no-reuse, or its source is gone: a new child trains the cell (newest wins)
                run = None
        spec = cell.spec or load_spec(grid.spec_path, [*grid.overrides, *cell.override_args()])
        what = (spec.data.root, spec.model.init_from, tuple((n, t.path) for n, t in sorted(spec.teachers.items())))
        if what not in digests:  # the grid's cells mostly share teachers and data: read their files once
            digests[what] = inputs_digest(spec)
        inputs = digests[what]
        if run is not None and run.data.tags.get(TAG_HASH) == cell.spec_hash and _stale(client, run, inputs):
            # trained (or half-trained) on other teachers' files or data: not kept, not resumed
            state.stale_from = run.info.run_id
            state.stale_dir = _move_aside(grid.cell_run_dir(cell), run.info.run_id)
            run = None
        if run is not None and run.data.tags.get(TAG_HASH) == cell.spec_hash:
            state.run_id = run.info.run_id
            if run.info.status == "FINISHED":
                state.reused_from = run.data.tags.get(TAG_REUSED)
                state.status = "reused" if state.reused_from else "skipped"
            else:
                state.resumed = True
                if inputs and TAG_INPUTS not in run.data.tags:  # e.g. a reuse left half-made
                    client.set_tag(run.info.run_id, TAG_INPUTS, inputs)
        else:
            source = find_reusable(client, experiment_id, grid, cell, inputs) if reuse else None
            if source is not None:  # no inputs tag: only runs that trained are offered for reuse
                state.run_id = create_child(client, experiment_id, parent_id, grid, cell,
                                            {TAG_REUSED: source.info.run_id})
                client.set_terminated(state.run_id, status="FINISHED")
                state.status, state.reused_from = "reused", source.info.run_id
            else:
                tags = {TAG_INPUTS: inputs} if inputs else {}
                state.run_id = create_child(client, experiment_id, parent_id, grid, cell, tags)
        states.append(state)
    return parent_id, states

