"""One MLflow run per training, that every later stage logs into: provenance tags, the run file
(``tracking.run_file``), params and metrics flattened to dotted names, and :class:`MLflowCallback`, the
trainer callback that opens the run (attached by :func:`fingrpo.pipeline.train_stage`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from fingrpo import __version__
from fingrpo.config import dotted_items, redact_uri
from fingrpo.errors import DataError, TrackingError
from fingrpo.io import read_json, write_json_atomic
from fingrpo.lineage import data_hash, file_md5, git_info
from fingrpo.tracking.client import MAX_PARAM_LEN, Tracker, check_tracking, one_line

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import Config

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Provenance tags
# --------------------------------------------------------------------------------------------------


def provenance_tags(root: str | os.PathLike = ".") -> dict[str, str]:
    """Tags every run and model version carries: git commit + dirty flag, data.dvc md5, dvc.lock md5,
    fingrpo version. ``root`` is the project root (where ``dvc repro`` runs)."""
    root = Path(root)
    git = git_info(root)
    tags = {
        "fingrpo.git_commit": git["commit"],
        "fingrpo.git_dirty": git["dirty"],
        "mlflow.source.git.commit": git["commit"],
        "fingrpo.version": __version__,
        "fingrpo.data_md5": data_hash(root / "data.dvc") or "none",
        "fingrpo.dvc_lock_md5": file_md5(root / "dvc.lock") or "none",
    }
    if git["commit"] == "unknown":
        del tags["mlflow.source.git.commit"]
    return tags


# --------------------------------------------------------------------------------------------------
# Flattening (dotted names: fingrpo.config.dotted_items)
# --------------------------------------------------------------------------------------------------


def _is_section(value: Any) -> bool:
    """A config section to flatten into: a non-empty dict that is not a plain {name: number} map
    (``rewards.weights`` stays one JSON param)."""
    return isinstance(value, dict) and bool(value) and not all(isinstance(v, (int, float)) for v in value.values())


def flatten_config(tree: dict) -> dict[str, str]:
    """Nested config -> ``{"section.key": "value"}`` (lists/None as JSON), what MLflow params hold.

    >>> flatten_config({"train": {"learning_rate": 0.0002, "adam_betas": [0.9, 0.99]}, "x": {"y": None}})
    {'train.learning_rate': '0.0002', 'train.adam_betas': '[0.9, 0.99]', 'x.y': 'null'}
    """
    return {name: json.dumps(value) if isinstance(value, (dict, list, tuple)) or value is None or isinstance(value, bool)
            else str(value) for name, value in dotted_items(tree, _is_section)}


def flatten_metrics(tree: Any, max_list: int = 4) -> dict[str, float]:
    """Numeric, finite leaves of a nested result -> ``{"dev.adapter.execution_accuracy": 0.25, ...}``.

    Short numeric lists (a confidence interval) become ``name.0``, ``name.1``; strings, bools, None,
    NaN and long lists are skipped.

    >>> flatten_metrics({"dev": {"adapter": {"execution_accuracy": 0.25, "ci95": [0.1, 0.4], "n": 40,
    ...                  "note": "x", "bad": float("nan")}}})
    {'dev.adapter.execution_accuracy': 0.25, 'dev.adapter.ci95.0': 0.1, 'dev.adapter.ci95.1': 0.4, 'dev.adapter.n': 40.0}
    """
    def descend(value: Any) -> bool:
        return isinstance(value, dict) or (isinstance(value, (list, tuple)) and len(value) <= max_list and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))

    return {name: float(value) for name, value in dotted_items(tree, descend)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))}


def _jsonable(value: Any) -> Any:
    """Table cells: scalars stay, containers become JSON text, tensors/numpy become Python numbers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, default=str)


# --------------------------------------------------------------------------------------------------
# Run bookkeeping across stages
# --------------------------------------------------------------------------------------------------


def write_run_file(cfg: "Config", run_id: str, experiment_id: str, uri: str, **extra: Any) -> Path:
    """``tracking.run_file`` = ``{run_id, experiment_id, experiment_name, tracking_uri (redacted), ...}``."""
    payload = {
        "run_id": run_id,
        "experiment_id": experiment_id,
        "experiment_name": cfg.tracking.experiment_name,
        "tracking_uri": redact_uri(uri),
        **extra,
    }
    return write_json_atomic(cfg.tracking.run_file, payload)


def read_run_file(cfg: "Config") -> dict | None:
    """The run bookkeeping written by training, or None if there is none."""
    path = Path(cfg.tracking.run_file)
    if not path.exists():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or not data.get("run_id"):
        raise DataError(f"{path}: no run_id in it; delete the file and rerun `fingrpo train`")
    return data


def current_run(cfg: "Config", stage: str) -> tuple[Tracker, str]:
    """(tracker, run_id) of the pipeline's run: the one in ``tracking.run_file``.

    Without a run file (evaluate/promote run without a tracked training) a new run tagged with the
    stage is started and recorded, with a warning. A run file that names another store, or a run that
    no longer exists, is a :class:`TrackingError` (not a silent new run).
    """
    uri = check_tracking(cfg)
    tracker = Tracker(cfg, uri)
    info = read_run_file(cfg)
    if info is None:
        exp_id = tracker.experiment_id()
        run = tracker.call(tracker.client.create_run, exp_id, run_name=f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}",
                           tags={**provenance_tags(), "fingrpo.stage": stage})
        write_run_file(cfg, run.info.run_id, exp_id, uri, created_by=stage)
        log.warning("%s: no training run recorded in %s; logging into a new MLflow run %s",
                    stage, cfg.tracking.run_file, run.info.run_id)
        return tracker, run.info.run_id
    if info.get("tracking_uri") not in (None, redact_uri(uri)):
        raise TrackingError(
            f"{cfg.tracking.run_file}: run {info['run_id']} lives in {info['tracking_uri']}, but the tracking URI "
            f"is now {redact_uri(uri)}: use the same tracking.tracking_uri / MLFLOW_TRACKING_URI as training, "
            f"or delete {cfg.tracking.run_file} to start a new run"
        )
    from mlflow.exceptions import MlflowException

    try:
        run = tracker.call(tracker.client.get_run, info["run_id"])
    except MlflowException as e:
        raise TrackingError(
            f"{cfg.tracking.run_file}: MLflow run {info['run_id']} not found in {redact_uri(uri)} ({one_line(e)}); "
            f"rerun `fingrpo train` or delete {cfg.tracking.run_file}"
        ) from None
    if run.info.lifecycle_stage == "deleted":
        raise TrackingError(f"{cfg.tracking.run_file}: MLflow run {info['run_id']} is deleted; rerun `fingrpo train`")
    return tracker, info["run_id"]


def log_evaluation(cfg: "Config", eval_result: dict) -> str | None:
    """Log an evaluation into the pipeline's run: flattened metrics (``dev.adapter.execution_accuracy``,
    ``dev.base.execution_accuracy``, ...), and ``evaluate.output_path`` + ``evaluate.predictions_path``
    as artifacts under ``evaluation/``. Returns the run id (None when tracking is disabled)."""
    if not cfg.tracking.enabled:
        return None
    tracker, run_id = current_run(cfg, "evaluate")
    # evaluate_from_config's "summary" repeats the same figures under dotted keys: log them once
    metrics = flatten_metrics({k: v for k, v in eval_result.items() if k != "summary"})
    if metrics:
        tracker.log_metrics(run_id, metrics)
    logged = False
    for path in (cfg.evaluate.output_path, cfg.evaluate.predictions_path):
        if Path(path).is_file():
            tracker.log_path(run_id, Path(path), "evaluation")
            logged = True
    if not logged:  # the result was not written to disk (a caller's own dict): keep it anyway
        tracker.call(tracker.client.log_dict, run_id, json.loads(json.dumps(eval_result, default=str)),
                     "evaluation/eval_result.json")
    return run_id


def log_artifacts(cfg: "Config", paths: Iterable[str | os.PathLike], artifact_path: str | None = None) -> str | None:
    """Log files or folders (validation report, config, ...) into the pipeline's run. Missing paths
    are a :class:`DataError` naming them. Returns the run id (None when tracking is disabled)."""
    if not cfg.tracking.enabled:
        return None
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"cannot log to MLflow: {', '.join(missing)} not found")
    tracker, run_id = current_run(cfg, "artifacts")
    for path in paths:
        tracker.log_path(run_id, path, artifact_path)
    return run_id


def log_plots(cfg: "Config", paths: Iterable[str | os.PathLike]) -> str | None:
    """Log the PNG plots under ``plots/`` in the pipeline's run."""
    return log_artifacts(cfg, paths, artifact_path="plots")


# --------------------------------------------------------------------------------------------------
# The trainer callback
# --------------------------------------------------------------------------------------------------


class MLflowCallback:
    """Logs one training into one MLflow run (a ``fingrpo.grpo.trainer.TrainerCallback``).

    - ``on_train_begin``: run in ``tracking.experiment_name``; params = the resolved config flattened
      (``train.learning_rate``); tags = git commit/dirty, data.dvc md5, dvc.lock md5, fingrpo version;
      writes ``tracking.run_file`` so evaluate/plot/promote log into the same run; logs the validate
      stage's ``<pipeline.reports_dir>/validation.json`` when present. A resumed training
      (``trainer.step > 0``) continues the run named in the run file.
    - ``on_step_end``: the step's numeric metrics (``reward/correctness_mean`` etc.) at that step.
    - ``on_evaluate``: metrics + the sample completions appended to the table ``samples/eval_samples.json``.
    - ``on_save``: the last checkpoint's step and path as tags.
    - ``on_train_end``: summary metrics, ``train_summary.json``, the resolved config and the adapter
      folder (``adapter/``) as artifacts; the run ends FINISHED. A process that dies mid-training marks
      the run FAILED on exit.

    Construction checks the tracking store (an unreachable server fails here, before training).
    Mid-training logging failures (after retries) are logged as warnings and counted in
    ``failed_calls``, so a tracking hiccup never kills a long training (after
    ``MAX_CONSECUTIVE_FAILURES`` in a row, step logging pauses); begin/end failures raise.

    >>> cb = MLflowCallback(cfg)                                          # doctest: +SKIP
    >>> train_from_config(cfg, callbacks=[cb]); cb.run_id                 # doctest: +SKIP
    """

    def __init__(self, cfg: "Config | None" = None, *, run_name: str | None = None, log_adapter: bool = True):
        self.cfg = cfg
        self.run_name = run_name
        self.log_adapter = log_adapter
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.failed_calls = 0
        self._consecutive_failures = 0
        self._tracker: Tracker | None = None
        self._ended = False
        self._checked_uri = check_tracking(cfg) if cfg is not None and cfg.tracking.enabled else None

    @property
    def active(self) -> bool:
        return self.run_id is not None and not self._ended

    def on_train_begin(self, trainer: Any) -> None:
        cfg = getattr(trainer, "config", None) or self.cfg
        if cfg is None:
            raise TrackingError("MLflowCallback: no config (pass MLflowCallback(cfg) or a trainer with .config)")
        self.cfg = cfg
        if not cfg.tracking.enabled:
            return
        uri = self._checked_uri or check_tracking(cfg)
        self._tracker = tracker = Tracker(cfg, uri)
        self.experiment_id = tracker.experiment_id()
        tags = {**provenance_tags(), "fingrpo.stage": "train"}
        params = flatten_config(cfg.public_dump())
        resumed_step = int(getattr(trainer, "step", 0) or 0)  # > 0: the trainer resumed from a checkpoint
        previous = self._resumable_run(resumed_step, uri)
        if previous is not None:
            # a resumed training continues its run: metrics of the later steps join the earlier ones
            self.run_id = previous.info.run_id
            tracker.call(tracker.client.update_run, self.run_id, status="RUNNING")
            logged = previous.data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != str(v)[:MAX_PARAM_LEN])
            tracker.log_params(self.run_id, {k: v for k, v in params.items() if k not in logged})
            tracker.set_tags(self.run_id, {**tags, "fingrpo.resumed_at_step": str(resumed_step),
                                           **({"fingrpo.params_changed_on_resume": json.dumps(changed)} if changed else {})})
        else:
            run = tracker.call(tracker.client.create_run, self.experiment_id,
                               run_name=self.run_name or f"train-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
            self.run_id = run.info.run_id
            tracker.log_params(self.run_id, params)
        write_run_file(cfg, self.run_id, self.experiment_id, uri, created_by="train")
        atexit.register(self._fail_if_open)
        # the data validation report of this pipeline run (the validate stage precedes train)
        pipeline_cfg = getattr(cfg, "pipeline", None)
        report = Path(pipeline_cfg.reports_dir) / "validation.json" if pipeline_cfg is not None else None
        if report is not None and report.is_file():
            tracker.log_path(self.run_id, report, "validation")

    def _resumable_run(self, resumed_step: int, uri: str) -> Any | None:
        """The training run in ``tracking.run_file`` when the trainer resumed and that run is still there."""
        if resumed_step <= 0:
            return None
        info = read_run_file(self.cfg)
        if not info or info.get("created_by") != "train" or info.get("tracking_uri") != redact_uri(uri):
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self._tracker.call(self._tracker.client.get_run, info["run_id"])
        except MlflowException:
            return None
        if run.info.lifecycle_stage != "active" or run.info.experiment_id != self.experiment_id:
            return None
        return run

    # consecutive mid-training failures after which step logging stops: each failed call may have
    # waited through MLflow's own HTTP retries plus ours, and a dead server must not stall training
    MAX_CONSECUTIVE_FAILURES = 3

    def _safe(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._consecutive_failures >= self.MAX_CONSECUTIVE_FAILURES:
            self.failed_calls += 1
            return
        try:
            fn(*args, **kwargs)
            self._consecutive_failures = 0
        except Exception as e:  # noqa: BLE001 - logging must not kill training; see class docstring
            self.failed_calls += 1
            self._consecutive_failures += 1
            log.warning("MLflow logging failed (training continues): %s", one_line(e))
            if self._consecutive_failures >= self.MAX_CONSECUTIVE_FAILURES:
                log.warning("MLflow: %d failures in a row; step logging paused for the rest of this training "
                            "(the metrics CSV still has every step)", self._consecutive_failures)

    def on_step_end(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        numeric = flatten_metrics({k: v for k, v in metrics.items() if k != "samples"})
        self._safe(self._tracker.log_metrics, self.run_id, numeric, step)
        samples = metrics.get("samples")
        if isinstance(samples, list) and samples:
            self._safe(self._log_samples, step, samples, "samples/train_samples.json")

    def on_evaluate(self, step: int, metrics: dict, samples: list[dict] | None = None) -> None:
        if not self.active:
            return
        self._safe(self._tracker.log_metrics, self.run_id, flatten_metrics(metrics), step)
        if samples:
            self._safe(self._log_samples, step, samples, "samples/eval_samples.json")

    def _log_samples(self, step: int, samples: list[dict], artifact_file: str) -> None:
        import pandas as pd

        rows = [{"step": int(step), **{str(k): _jsonable(v) for k, v in dict(s).items()}} for s in samples]
        # log_table appends to an existing table artifact: one table across all steps
        self._tracker.call(self._tracker.client.log_table, self.run_id, pd.DataFrame(rows), artifact_file)

    def on_save(self, step: int, path: str | os.PathLike) -> None:
        if not self.active:
            return
        self._safe(self._tracker.set_tags, self.run_id,
                   {"fingrpo.last_checkpoint_step": str(step), "fingrpo.last_checkpoint": str(path)})

    def on_train_end(self, summary: dict | None = None) -> None:
        if not self.active:
            return
        tracker, run_id, cfg = self._tracker, self.run_id, self.cfg
        summary = dict(summary or {})
        # top-level figures only: nested ones (final_metrics, last_eval) were logged per step already
        scalars = {k: v for k, v in summary.items() if not isinstance(v, (dict, list, tuple))}
        metrics = {f"summary.{k}": v for k, v in flatten_metrics(scalars).items()}
        if metrics:
            tracker.log_metrics(run_id, metrics, int(summary.get("steps", summary.get("step", 0)) or 0))
        tracker.call(tracker.client.log_dict, run_id, json.loads(json.dumps(summary, default=str)), "train_summary.json")
        tracker.call(tracker.client.log_dict, run_id, cfg.public_dump(), "config/params.resolved.json")
        # the trainer reports output_dir=None when it stopped early and saved no final adapter: then an
        # older adapter folder on disk is not this run's and is not logged
        adapter_key = next((k for k in ("adapter_dir", "output_dir") if k in summary), None)
        adapter = Path(summary[adapter_key]) if adapter_key and summary[adapter_key] else None
        if adapter_key is None:
            adapter = Path(cfg.train.output_dir)
        if summary.get("stopped_early") is not None:
            tracker.set_tags(run_id, {"fingrpo.stopped_early": str(bool(summary["stopped_early"])).lower()})
        if self.log_adapter and adapter is not None and adapter.is_dir():
            # small: LoRA weights + tokenizer + config; the base model is NOT logged (ENVIRONMENT.md #2)
            tracker.call(tracker.client.log_artifacts, run_id, str(adapter), artifact_path="adapter")
        elif self.log_adapter:
            log.warning("MLflowCallback: %s; no adapter logged",
                        f"adapter folder {adapter} not found" if adapter else "the trainer saved no final adapter")
        tracker.call(tracker.client.set_terminated, run_id, "FINISHED")
        self._ended = True

    def close(self, status: str = "FAILED") -> None:
        """End the run now (e.g. ``FAILED`` or ``KILLED`` after an exception in the training loop)."""
        if self.active:
            self._tracker.call(self._tracker.client.set_terminated, self.run_id, status)
            self._ended = True

    def _fail_if_open(self) -> None:
        with contextlib.suppress(Exception):
            self.close("FAILED")


def callbacks_from_config(cfg: "Config") -> list:
    """The tracking callbacks a training should get: ``[MLflowCallback(cfg)]`` when tracking is enabled."""
    return [MLflowCallback(cfg)] if cfg.tracking.enabled else []
