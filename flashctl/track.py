"""MLflow tracking: the contract (tag names, run kinds, metric names, parent/child look-ups),
runs with params written once, batched metrics, lineage.

The contract is what `ablate` writes, the jobs (distill, evaluate, teacher) log and `report`
reads: every tag and eval metric name is spelt here once, so the three cannot drift apart.

Only rank 0 talks to MLflow; other ranks get a `NullTracker`. A run's MLflow id is kept in its
run directory (`mlflow_run_id`), or handed in through `MLFLOW_RUN_ID` (ablation children), so
a resumed job keeps logging into the same run and never re-logs its params.

mlflow is imported inside functions: importing this module costs nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from flashctl.io import atomic_write_text
from flashctl.spec import TrackingSpec

RUN_ID_FILE = "mlflow_run_id"

# --------------------------------------------------------------------------------------------
# The contract: tags, kinds, metric and artifact names

TAG_KIND = "flashctl.kind"  # what made the run: one of the KIND_* values
KIND_GRID = "grid"  # the parent run of an ablation grid
KIND_CELL = "cell"  # a grid's child run (one cell; the distill job logs into it)
KIND_DISTILL = "distill"  # a `flashctl distill` run outside a grid
KIND_EVALUATE = "evaluate"
KIND_TEACHER = "teacher"

TAG_HASH = "flashctl.spec_hash"  # `spec.spec_hash` of the resolved spec (grid child, distill job)
LEGACY_TAG_HASH = "spec_hash"  # what distill jobs tagged before the contract had one name
TAG_GRID = "flashctl.grid_id"
TAG_FACTORS = "flashctl.factors"  # parent: factors joined by ","
TAG_LEVELS = "flashctl.levels"  # parent: JSON {factor: [level, ...]} in grid order
TAG_SPEC = "flashctl.spec"  # parent: the spec file (or "<default>")
TAG_OVERRIDES = "flashctl.overrides"  # parent: the CLI overrides
TAG_CELLS = "flashctl.cells"  # parent: number of cells
TAG_FACTOR = "flashctl.factor"  # child: factors joined by ","
TAG_LEVEL = "flashctl.level"  # child: levels joined by ","
TAG_LEVEL_OF = "flashctl.level."  # child: + factor -> that factor's level
TAG_CELL = "flashctl.cell"  # child: "factor=level,factor=level"
TAG_ATTEMPTS = "flashctl.attempts"
TAG_EXIT = "flashctl.exit_code"
TAG_PARENT = "mlflow.parentRunId"
TAG_ARRAY = "flashctl.slurm_array"  # parent: job id of the grid's latest Slurm array
TAG_TASK = "flashctl.slurm_task"  # child: "<array job id>_<task index>"
TAG_SLURM_STATE = "flashctl.slurm_state"  # child: the Slurm state its task ended in
TAG_INPUTS = "flashctl.inputs"  # child: digest of the teachers' files and the data (`ablate.store.inputs_digest`)
TAG_REUSED = "flashctl.reused_from"  # child: run id of another grid's finished cell whose results it shows

EVAL_IMAGES = "eval/images"  # artifact folder: eval/images/{model}/{row id}.png
EVAL_RESULTS = "eval/results.json"  # artifact: every model's per-row results


def eval_metric(model: str | None, *what: str) -> str:
    """`eval/{model}/{what...}`: the name of an eval metric (`eval_metric("student", "t2i_acc")`).

    `model` is a model under test (`student`, `teacher`, ...), `retention` (student / teacher),
    or None for a run-level metric (`eval/speedup`; a `flashctl evaluate` run's own metrics).
    One function so that the evaluation, the jobs and `report` name every metric alike."""
    return "/".join(["eval", *([model] if model else []), *what])


EVAL_SPEEDUP = eval_metric(None, "speedup")  # teacher / student seconds per image, end to end
EVAL_SPEEDUP_DENOISE = eval_metric(None, "speedup_denoise")  # the same, denoising loops alone
EVAL_NFE_RATIO = eval_metric(None, "nfe_ratio")  # teacher / student network evaluations per image

# Training-time accuracy of the periodic student samples (`distill.sample_every`, on the first
# `distill.sample_rows` eval rows per task): the report's training curves, where instability shows.
SAMPLE_ACC = {"t2i": "samples/t2i_acc", "edit": "samples/edit_acc"}
# How many rows each of those accuracies is over (the report's Wilson band around the curve).
SAMPLE_N = {"t2i": "samples/t2i_n", "edit": "samples/edit_n"}


def hash_tag(tags: dict[str, str]) -> str:
    """A run's spec hash: `flashctl.spec_hash`, or the bare `spec_hash` older jobs wrote."""
    return tags.get(TAG_HASH) or tags.get(LEGACY_TAG_HASH, "")


def grid_filter(grid_id: str | None = None) -> str:
    """MLflow filter string for grid parents (of `grid_id` only, when given)."""
    kind = f"tags.`{TAG_KIND}` = '{KIND_GRID}'"
    return kind if grid_id is None else f"tags.`{TAG_GRID}` = '{grid_id}' and {kind}"


def find_parent(client, experiment_id: str, grid_id: str):
    """The parent run of `grid_id` in the experiment (oldest if several), or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=grid_filter(grid_id),
        order_by=["attributes.start_time ASC"],
        max_results=10,
    )
    return runs[0] if runs else None


def list_children(client, experiment_id: str, parent_id: str) -> list:
    """Child runs of a parent, oldest first."""
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=5000,
    )


# --------------------------------------------------------------------------------------------
# Stores and runs


def resolve_uri(uri: str, base: Path | None = None) -> str:
    """Make relative `sqlite:///x.db` URIs absolute (against `base`, default cwd)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = (base or Path.cwd()) / uri[len(prefix):]
        return prefix + str(path.resolve())
    return uri


def tracking_uri(tracking: TrackingSpec) -> str:
    """`MLFLOW_TRACKING_URI` (set for ablation cells served by a grid's server) wins over the spec."""
    return resolve_uri(os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri)


def artifact_root(uri: str) -> str | None:
    """Artifact location for experiments on a local SQLite store: `mlartifacts/` next to the DB."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def client_for(tracking: TrackingSpec):
    """An `MlflowClient` on the spec's store (imports mlflow lazily)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(tracking)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(uri))
    except Exception:  # created concurrently by another cell
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class NullTracker:
    """Stand-in on non-zero ranks or when tracking is off: every call does nothing."""

    run_id: str | None = None

    def __getattr__(self, name: str):
        return lambda *a, **k: None


class Tracker:
    """One MLflow run for one job (rank 0)."""

    def __init__(self, tracking: TrackingSpec, run_dir: Path, run_name: str, tags: dict[str, str] | None = None):
        self.tracking = tracking
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.client = client_for(tracking)
        self.uri = tracking_uri(tracking)
        self.run_id: str | None = None
        self._metrics: list[Any] = []
        self._last_flush = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> str:
        """Attach to `MLFLOW_RUN_ID`, or the run id saved in the run dir, or create a run."""
        saved = self.run_dir / RUN_ID_FILE
        run_id = os.environ.get("MLFLOW_RUN_ID") or (saved.read_text().strip() if saved.exists() else None)
        if run_id:
            self.client.get_run(run_id)  # raises if the id is unknown to this store
            self.client.update_run(run_id, status="RUNNING")
        else:
            exp_id = ensure_experiment(self.client, self.tracking.experiment, self.uri)
            run = self.client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
            run_id = run.info.run_id
        self.run_id = run_id
        for k, v in self.tags.items():
            self.client.set_tag(run_id, k, v)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, run_id + "\n")
        return run_id

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)

    # -- logging --------------------------------------------------------------------------
    def log_params_once(self, params: dict[str, Any]) -> bool:
        """Log params unless the run already has some (a resumed run must not re-log them)."""
        from mlflow.entities import Param

        if self.client.get_run(self.run_id).data.params:
            return False
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        return True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer metrics; they are written in batches (SQLite costs ~5 ms per single call)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._metrics.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        if len(self._metrics) >= 500 or time.monotonic() - self._last_flush > 10:
            self.flush()

    def flush(self) -> None:
        if self._metrics and self.run_id:
            for i in range(0, len(self._metrics), 1000):
                self.client.log_batch(self.run_id, metrics=self._metrics[i:i + 1000])
        self._metrics = []
        self._last_flush = time.monotonic()

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_dataset(self, root: str | Path, name: str, digest: str, context: str = "training") -> None:
        """Record dataset lineage: the Arrow shards' manifest digest as the run's input."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(Path(root).resolve()))
        dataset = MetaDataset(source=source, name=name, digest=digest[:36])
        tag = InputTag(key="mlflow.data.context", value=context)
        inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=[tag])]
        from mlflow.exceptions import MlflowException

        for attempt in range(3):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except MlflowException as exc:
                # MLflow's SQL store gets-or-creates a dataset in two statements: parallel grid
                # cells logging the same shards race to insert it (UNIQUE constraint on datasets).
                # The loser's retry finds the winner's row and links to it.
                if "UNIQUE constraint" not in str(exc) or attempt == 2:
                    raise
                time.sleep(0.5 * (attempt + 1))


def make_tracker(tracking: TrackingSpec, run_dir: Path, run_name: str, rank: int = 0,
                 tags: dict[str, str] | None = None) -> Tracker | NullTracker:
    if rank != 0 or not tracking.enabled:
        return NullTracker()
    return Tracker(tracking, run_dir, run_name, tags)
