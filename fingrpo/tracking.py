"""MLflow: one run per training that every later stage logs into, the model registry and its promotion
gate, and the pyfunc model that serves a registered adapter.

Where runs go (``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``)::

    fingrpo train      # MLflowCallback: params, per-step metrics, sample tables, tags, the adapter
                       # -> reports/mlflow_run.json {run_id, experiment_id, tracking_uri}
    fingrpo evaluate   # log_evaluation: dev.adapter.execution_accuracy, ... + eval.json, predictions
    fingrpo plot       # log_plots: the PNGs
    fingrpo promote    # promote_from_config: new version of 'fingrpo-finqa' (pyfunc), alias
                       # 'challenger'; 'champion' moves only if the challenger beats it
    mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1     # look at it

Serving the champion from the project's own environment (the pyfunc imports the installed ``fingrpo``;
activate the venv: the server execs ``uvicorn`` from PATH)::

    mlflow models serve -m models:/fingrpo-finqa@champion --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"question": "...", "pre_text": [...], "post_text": [...], "table": [[...]]}]}'

or in Python: ``mlflow.pyfunc.load_model("models:/fingrpo-finqa@champion").predict(df)``.

The trainer, the evaluation and the plots never import mlflow: they call only the functions here.
Every tracking call goes through :func:`call_with_retries` (exponential backoff on transient errors),
and URIs are shown and stored without credentials (:func:`redact_uri`).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

from fingrpo.errors import ConfigError, DataError, ModelError, TrackingError
from fingrpo.io import read_json, write_json_atomic

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from fingrpo.config import Config

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT_NAME = "model"  # the pyfunc's name inside the run (models:/<name>/<version> points to it)
SERVING_CONFIG = "fingrpo_serving.json"  # saved beside the adapter in every model version
# Version tags the gate reads back: the metric's name and its value when the version was registered.
TAG_METRIC_NAME = "fingrpo.gate_metric"
TAG_METRIC_VALUE = "fingrpo.gate_metric_value"

# MLflow error codes that mean "try again" (MlflowException's default code INTERNAL_ERROR is not here:
# it is also used for permanent failures; its transient cases are matched by message below).
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "ABORTED", "DEADLINE_EXCEEDED"}
_TRANSIENT_MESSAGES = re.compile(
    r"database is locked|temporarily unavailable|service unavailable|bad gateway|gateway timeout|timed out|"
    r"connection (reset|aborted|refused)|max retries exceeded|(status|error)[ _]code[: =]*50[234]\b",
    re.IGNORECASE,
)
_METRIC_NAME_BAD = re.compile(r"[^\w\-./ :]")  # MLflow accepts alphanumerics, _ - . / space :
_MAX_PARAM_LEN = 6000  # MLflow 3's limit on a param value
_MAX_TAG_LEN = 5000
PYFUNC_ENTRY_POINT = """\
# fingrpo's registered model (MLflow models-from-code): the class lives in the installed package.
import mlflow
from fingrpo.tracking import FinQAPyfuncModel

mlflow.models.set_model(FinQAPyfuncModel())
"""
from fingrpo.config import redact_uri  # noqa: E402  (re-exported: part of this module's API)

PREDICTION_COLUMNS = ("id", "completion", "program", "answer", "answer_value", "value", "context_mode")


# --------------------------------------------------------------------------------------------------
# URIs, health check, retries
# --------------------------------------------------------------------------------------------------


def resolve_tracking_uri(cfg: "Config") -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` (project root).

    >>> from fingrpo.config import load_config
    >>> resolve_tracking_uri(load_config(None, {"tracking": {"tracking_uri": "sqlite:///tmp/x.db"}}))
    'sqlite:///tmp/x.db'
    """
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory when relative)."""
    if not uri.startswith("sqlite:"):
        return None
    path = urllib.parse.urlsplit(uri).path  # sqlite:///rel.db -> "/rel.db"; sqlite:////abs.db -> "//abs.db"
    if path.startswith("//"):
        return Path(path[1:])
    return Path(path.lstrip("/")) if path not in ("", "/", "/:memory:") else None


def default_artifact_location(cfg: "Config", uri: str | None = None) -> str | None:
    """Artifact root for a NEW experiment: ``tracking.artifact_location``, else ``<db folder>/mlartifacts``
    for SQLite (inside the project for the default ``sqlite:///mlflow.db``, git-ignored), else None
    (an HTTP server decides: ``--artifacts-destination`` / ``--default-artifact-root``)."""
    if cfg.tracking.artifact_location:
        return str(Path(cfg.tracking.artifact_location).expanduser().resolve()) if "://" not in \
            cfg.tracking.artifact_location else cfg.tracking.artifact_location
    db = _sqlite_path(uri or resolve_tracking_uri(cfg))
    if db is None:
        return None
    return str((db.parent / "mlartifacts").resolve())


def is_transient_tracking_error(exc: BaseException) -> bool:
    """True for errors worth retrying: connection/timeout errors, a locked SQLite db, HTTP 5xx/429."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    with contextlib.suppress(ImportError):
        import requests

        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
    with contextlib.suppress(ImportError):
        from mlflow.exceptions import MlflowException

        if isinstance(exc, MlflowException):
            if exc.error_code in _TRANSIENT_CODES:
                return True
            return bool(_TRANSIENT_MESSAGES.search(str(exc)))
    return False


def call_with_retries(
    fn: Callable[..., T],
    *args: Any,
    attempts: int = 3,
    backoff_s: float = 0.5,
    what: str | None = None,
    uri: str | None = None,
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs)``, retried on transient tracking errors with exponential backoff.

    Transient: connection errors, timeouts, MLflow's TEMPORARILY_UNAVAILABLE-like codes, a locked
    SQLite database. Waits ``backoff_s``, ``2*backoff_s``, ... between attempts. When every attempt fails
    the last error becomes a :class:`TrackingError` naming the call and the (redacted) URI; a
    non-transient error propagates unchanged on the first attempt.

    >>> calls = []
    >>> def flaky():
    ...     calls.append(1)
    ...     if len(calls) == 1:
    ...         raise ConnectionError("reset")
    ...     return "ok"
    >>> call_with_retries(flaky, backoff_s=0), len(calls)
    ('ok', 2)
    """
    name = what or getattr(fn, "__name__", "tracking call")
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_transient_tracking_error(e):
                raise
            if attempt == attempts:
                where = f" against {redact_uri(uri)}" if uri else ""
                raise TrackingError(
                    f"MLflow {name} failed after {attempts} attempts{where}: {_one_line(e)}"
                ) from e
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("MLflow %s failed (%s); retry %d/%d in %.1fs", name, _one_line(e), attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(e).__name__


def check_tracking(cfg: "Config") -> str:
    """Make sure the tracking store answers, BEFORE anything expensive; returns the resolved URI.

    HTTP(S): ``GET <uri>/health`` with a ``tracking.timeout_s`` timeout first (a closed port fails in
    milliseconds). SQLite: the database folder is created. Then, for every store, one cheap client call
    (which also initialises a new SQLite schema). Failures raise :class:`TrackingError` naming the URI and what to do.

    >>> check_tracking(load_config(None, {"tracking": {"tracking_uri": "http://127.0.0.1:9"}}))  # doctest: +SKIP
    TrackingError: MLflow tracking server http://127.0.0.1:9 is unreachable (Connection refused): ...
    """
    uri = resolve_tracking_uri(cfg)
    shown = redact_uri(uri)
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        health = uri.rstrip("/") + "/health"
        # credentials stay out of the request line; /health needs no auth on an MLflow server
        parts = urllib.parse.urlsplit(health)
        health = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))
        try:
            with urllib.request.urlopen(health, timeout=cfg.tracking.timeout_s) as resp:  # noqa: S310 - http(s) only
                status = resp.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"MLflow tracking server {shown} is unreachable ({_one_line(reason) if isinstance(reason, BaseException) else reason}): "
                "start it (`mlflow server --host 127.0.0.1 --port 5000 --workers 1`), or point "
                "tracking.tracking_uri / MLFLOW_TRACKING_URI at a running server (or sqlite:///mlflow.db), "
                "or set tracking.enabled=false"
            ) from None
        if status != 200:
            raise TrackingError(
                f"MLflow tracking server {shown}: GET /health answered HTTP {status}; is this an MLflow server? "
                "fix tracking.tracking_uri / MLFLOW_TRACKING_URI"
            )
        # then one cheap API call below: a live server whose backend store is broken fails here too
    if scheme == "sqlite":
        db = _sqlite_path(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
    try:
        from mlflow import MlflowClient

        call_with_retries(
            MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments,
            max_results=1, attempts=cfg.tracking.retries, backoff_s=cfg.tracking.retry_backoff_s,
            what="search_experiments", uri=uri,
        )
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means the store is unusable
        raise TrackingError(
            f"MLflow tracking store {shown} is not usable ({_one_line(e)}): fix tracking.tracking_uri / "
            "MLFLOW_TRACKING_URI (e.g. sqlite:///mlflow.db) or set tracking.enabled=false"
        ) from None
    return uri


# --------------------------------------------------------------------------------------------------
# Provenance tags
# --------------------------------------------------------------------------------------------------


def _git(*args: str, cwd: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_info(cwd: str | os.PathLike | None = None) -> dict[str, str]:
    """``{"commit": <sha or "unknown">, "dirty": "true"/"false"/"unknown"}`` of the repository at ``cwd``.

    Read-only (``--no-optional-locks``: not even the index is refreshed). Untracked files don't count
    as dirty; modified tracked files do.
    """
    commit = _git("rev-parse", "HEAD", cwd=cwd)
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=cwd) if commit else None
    return {
        "commit": commit or "unknown",
        "dirty": "unknown" if status is None else ("true" if status else "false"),
    }


def data_hash(dvc_file: str | os.PathLike = "data.dvc") -> str | None:
    """The ``md5`` of the first ``outs`` entry of a ``.dvc`` pointer (``ec76a117...dir``), or None if absent."""
    import yaml

    path = Path(dvc_file)
    if not path.is_file():
        return None
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return str(doc["outs"][0]["md5"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        raise DataError(f"{path}: not a DVC pointer file (outs[0].md5 missing)") from None


def file_md5(path: str | os.PathLike) -> str | None:
    """md5 of a file's bytes (``dvc.lock``), or None if it does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    return hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - a content fingerprint, not security


def provenance_tags(root: str | os.PathLike = ".") -> dict[str, str]:
    """Tags every run and model version carries: git commit + dirty flag, data.dvc md5, dvc.lock md5,
    fingrpo version. ``root`` is the project root (where ``dvc repro`` runs)."""
    from fingrpo import __version__

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
# Flattening
# --------------------------------------------------------------------------------------------------


def flatten_config(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"section.key": "value"}`` (lists/None as JSON), what MLflow params hold.

    >>> flatten_config({"train": {"learning_rate": 0.0002, "adam_betas": [0.9, 0.99]}, "x": {"y": None}})
    {'train.learning_rate': '0.0002', 'train.adam_betas': '[0.9, 0.99]', 'x.y': 'null'}
    """
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not all(isinstance(v, (int, float)) for v in value.values()):
            out.update(flatten_config(value, name + "."))
        elif isinstance(value, (dict, list, tuple)) or value is None or isinstance(value, bool):
            out[name] = json.dumps(value)
        else:
            out[name] = str(value)
    return out


def flatten_metrics(tree: Any, prefix: str = "", max_list: int = 4) -> dict[str, float]:
    """Numeric, finite leaves of a nested result -> ``{"dev.adapter.execution_accuracy": 0.25, ...}``.

    Short numeric lists (a confidence interval) become ``name.0``, ``name.1``; strings, bools, None,
    NaN and long lists are skipped.

    >>> flatten_metrics({"dev": {"adapter": {"execution_accuracy": 0.25, "ci95": [0.1, 0.4], "n": 40,
    ...                  "note": "x", "bad": float("nan")}}})
    {'dev.adapter.execution_accuracy': 0.25, 'dev.adapter.ci95.0': 0.1, 'dev.adapter.ci95.1': 0.4, 'dev.adapter.n': 40.0}
    """
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten_metrics(value, f"{prefix}{key}.", max_list))
    elif isinstance(tree, (list, tuple)):
        if len(tree) <= max_list and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in tree):
            for i, value in enumerate(tree):
                out.update(flatten_metrics(value, f"{prefix}{i}.", max_list))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        value = float(tree)
        if math.isfinite(value):
            out[prefix.rstrip(".")] = value
    return out


def lookup_metric(tree: dict, dotted: str) -> Any:
    """``tree["dev"]["adapter"]["execution_accuracy"]`` for ``"dev.adapter.execution_accuracy"``
    (a key that itself contains dots is found too); KeyError if absent.

    >>> lookup_metric({"dev": {"adapter": {"execution_accuracy": 0.3}}}, "dev.adapter.execution_accuracy")
    0.3
    >>> lookup_metric({"dev.adapter": {"n": 4}}, "dev.adapter.n")
    4
    """
    if dotted in tree:
        return tree[dotted]
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):  # longest matching head first
        head, rest = ".".join(parts[:i]), ".".join(parts[i:])
        if head in tree and isinstance(tree[head], dict):
            with contextlib.suppress(KeyError):
                return lookup_metric(tree[head], rest)
    raise KeyError(dotted)


def _metric_name(name: str) -> str:
    return _METRIC_NAME_BAD.sub("_", str(name))[:250]


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


@contextlib.contextmanager
def _fluent_uri(uri: str):
    """Point MLflow's fluent API (mlflow.start_run, mlflow.pyfunc.log_model) at ``uri`` for a block.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` to the
    environment (child processes inherit them), so both the module state and the environment are put
    back exactly as they were afterwards; otherwise a later subprocess would silently use this store.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _Tracker:
    """A client bound to one URI with the config's retry policy: ``t.call(client.method, ...)``."""

    def __init__(self, cfg: "Config", uri: str | None = None):
        from mlflow import MlflowClient

        self.cfg = cfg
        self.uri = uri or resolve_tracking_uri(cfg)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return call_with_retries(
            fn, *args, attempts=self.cfg.tracking.retries, backoff_s=self.cfg.tracking.retry_backoff_s,
            uri=self.uri, **kwargs,
        )

    def experiment_id(self) -> str:
        """The configured experiment's id, created (with the project's artifact root) when missing."""
        name = self.cfg.tracking.experiment_name
        exp = self.call(self.client.get_experiment_by_name, name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"MLflow experiment {name!r} in {redact_uri(self.uri)} is deleted: restore it "
                    f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or change tracking.experiment_name"
                )
            return exp.experiment_id
        try:
            return self.call(self.client.create_experiment, name,
                             artifact_location=default_artifact_location(self.cfg, self.uri))
        except Exception as e:  # noqa: BLE001 - a concurrent stage may have created it first
            exp = self.call(self.client.get_experiment_by_name, name)
            if exp is None:
                raise TrackingError(f"cannot create MLflow experiment {name!r} in {redact_uri(self.uri)}: {_one_line(e)}") from None
            return exp.experiment_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_name(k), float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):  # log_batch takes at most 1000 metrics
            self.call(self.client.log_batch, run_id, metrics=items[i : i + 1000])

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # ... and at most 100 params
            self.call(self.client.log_batch, run_id, params=items[i : i + 100])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:_MAX_TAG_LEN]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.call(self.client.log_batch, run_id, tags=items[i : i + 100])

    def log_path(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.call(self.client.log_artifacts, run_id, str(path),
                      artifact_path=f"{artifact_path}/{path.name}" if artifact_path else path.name)
        else:
            self.call(self.client.log_artifact, run_id, str(path), artifact_path=artifact_path)


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


def current_run(cfg: "Config", stage: str) -> tuple[_Tracker, str]:
    """(tracker, run_id) of the pipeline's run: the one in ``tracking.run_file``.

    Without a run file (evaluate/promote run without a tracked training) a new run tagged with the
    stage is started and recorded, with a warning. A run file that names another store, or a run that
    no longer exists, is a :class:`TrackingError` (not a silent new run).
    """
    uri = check_tracking(cfg)
    tracker = _Tracker(cfg, uri)
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
            f"{cfg.tracking.run_file}: MLflow run {info['run_id']} not found in {redact_uri(uri)} ({_one_line(e)}); "
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
        self._tracker: _Tracker | None = None
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
        self._tracker = tracker = _Tracker(cfg, uri)
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
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != str(v)[:_MAX_PARAM_LEN])
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
            log.warning("MLflow logging failed (training continues): %s", _one_line(e))
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


# --------------------------------------------------------------------------------------------------
# The pyfunc model
# --------------------------------------------------------------------------------------------------


def _pip_requirements() -> list[str]:
    """What the pyfunc needs, pinned to what is installed. Explicit, so MLflow infers nothing (its
    inference wanted torchvision for transformers models). ``fingrpo`` itself comes from the serving
    environment (``--env-manager local`` in the project venv)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "gguf",
                 "pandas", "numpy", "pydantic", "pyyaml", "sympy"):
        with contextlib.suppress(PackageNotFoundError):
            reqs.append(f"{dist}=={version(dist)}")
    return reqs


def _row_to_record(row: dict, index: int) -> dict:
    """One input row -> a FinQA record dict (official layout: question under ``qa``)."""
    rec = row.get("record")
    if rec is not None and not (isinstance(rec, float) and math.isnan(rec)):  # NaN: this row has no record
        if isinstance(rec, str):
            try:
                rec = json.loads(rec)
            except json.JSONDecodeError as e:
                raise DataError(f"input row {index}: column 'record' is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"input row {index}: column 'record' must be a FinQA record object")
        return rec
    if not row.get("question"):
        raise DataError(f"input row {index}: column 'question' is missing or empty (or pass a 'record' column)")

    def _as_list(name: str) -> list:
        value = row.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return []
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, str):  # JSON text from a CSV / form
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
        if not isinstance(value, list):
            raise DataError(f"input row {index}: column {name!r} must be a list")
        return [v.tolist() if hasattr(v, "tolist") else v for v in value]

    qa = {"question": str(row["question"])}
    gold_inds = row.get("gold_inds")
    if isinstance(gold_inds, str):
        with contextlib.suppress(json.JSONDecodeError):
            gold_inds = json.loads(gold_inds)
    if isinstance(gold_inds, dict) and gold_inds:
        qa["gold_inds"] = gold_inds
    return {
        "id": str(row.get("id") or f"input-{index}"),
        "pre_text": _as_list("pre_text"),
        "post_text": _as_list("post_text"),
        "table": _as_list("table"),
        "qa": qa,
    }


class _FinQAPyfunc:
    """The registered model: base LM (named, not stored) + the LoRA adapter + the prompt config.

    ``predict(df)``: each row a FinQA record (columns ``question``, ``pre_text``, ``post_text``,
    ``table``, optional ``gold_inds``/``id``; or one column ``record`` holding the record or its JSON)
    -> DataFrame ``id, completion, program, answer, answer_value, value, context_mode`` where ``value``
    is the completion's program executed on the row's table (None when it does not execute). The prompt is
    built by ``fingrpo.data.finqa`` from the prompt config saved with the version, exactly as in
    training and evaluation; generation is greedy.

    >>> m = mlflow.pyfunc.load_model("models:/fingrpo-finqa@champion")      # doctest: +SKIP
    >>> m.predict(pd.DataFrame(  # doctest: +SKIP
    ...     [{"question": "...", "pre_text": [...], "post_text": [...], "table": [...]}]))
    """

    def load_context(self, context: Any) -> None:
        from fingrpo.config import ModelConfig, PromptConfig
        from fingrpo.model import load_adapter, load_model_and_tokenizer

        serving = read_json(context.artifacts["serving_config"])
        self.serving = serving
        model_fields = {k: v for k, v in serving["model"].items() if k in ModelConfig.model_fields}
        self.model_cfg = ModelConfig(**model_fields)  # cache_dir: this machine's default ($FINGRPO_CACHE)
        self.prompt_cfg = PromptConfig(**serving["prompt"])
        self.generation = serving.get("generation", {})
        base, self.tokenizer = load_model_and_tokenizer(self.model_cfg)  # via resolve_model_path: bundled: works
        self.model = load_adapter(base, context.artifacts["adapter"])
        self.model.eval()
        few_shot = serving.get("few_shot_records") or []
        self.few_shot_records = self._records(few_shot, "few_shot_records") if few_shot else None

    @staticmethod
    def _records(rows: list[dict], what: str) -> list:
        from fingrpo.data.finqa import FinQARecord

        out = []
        for i, row in enumerate(rows):
            try:
                out.append(FinQARecord.model_validate(row))
            except Exception as e:  # noqa: BLE001 - pydantic's error, made one line
                raise DataError(f"{what} row {i} (id {row.get('id')}): not a FinQA record: {_one_line(e)}") from None
        return out

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate against them
        import pandas as pd

        from fingrpo.answers import parse_completion
        from fingrpo.data.finqa import make_examples, render_prompt
        from fingrpo.dsl import ProgramError, execute
        from fingrpo.evaluate import generate_completions

        if isinstance(model_input, dict):
            model_input = [model_input]
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(list(model_input))
        rows = [_row_to_record(row, i) for i, row in enumerate(df.to_dict(orient="records"))]
        records = self._records([_serving_defaults(r) for r in rows], "input")
        # context_mode=gold needs the supporting facts; a request without qa.gold_inds gets the closest
        # thing, the top-k retrieved facts, and the output column context_mode says so
        modes = [self.prompt_cfg.context_mode if (self.prompt_cfg.context_mode != "gold" or rec.qa.gold_inds)
                 else "retrieved" for rec in records]
        prompts: list[str] = [""] * len(records)
        for mode in sorted(set(modes)):
            idx = [i for i, m in enumerate(modes) if m == mode]
            prompt_cfg = self.prompt_cfg.model_copy(update={"context_mode": mode})
            examples = make_examples([records[i] for i in idx], prompt_cfg, tokenizer=self.tokenizer,
                                     few_shot_records=self.few_shot_records)
            for i, ex in zip(idx, examples):
                prompts[i] = render_prompt(ex, self.tokenizer, use_chat_template=prompt_cfg.use_chat_template)
        params = params or {}
        completions = generate_completions(
            self.model, self.tokenizer, prompts,
            max_new_tokens=int(params.get("max_new_tokens", self.generation.get("max_new_tokens", 64))),
            batch_size=int(params.get("batch_size", self.generation.get("batch_size", 8))),
            progress=False,
        )
        out = []
        for rec, mode, completion in zip(records, modes, completions):
            parsed = parse_completion(completion)
            value: Any = None
            if parsed.program:
                try:
                    value = execute(parsed.program, rec.table)
                except ProgramError:
                    value = None
                if isinstance(value, float) and not math.isfinite(value):
                    value = None
            answer_value = parsed.answer_value
            if isinstance(answer_value, float) and not math.isfinite(answer_value):
                answer_value = None
            out.append({"id": rec.id, "completion": completion, "program": parsed.program,
                        "answer": parsed.answer_text, "answer_value": answer_value, "value": value,
                        "context_mode": mode})
        # object dtype keeps None as None (not NaN) so the scoring server's JSON stays valid
        return pd.DataFrame(out, columns=list(PREDICTION_COLUMNS), dtype=object)


def __getattr__(name: str) -> Any:
    """``FinQAPyfuncModel`` = ``_FinQAPyfunc`` + ``mlflow.pyfunc.PythonModel``, built on first use so that
    ``import fingrpo.tracking`` does not import mlflow. Model versions load it through
    :data:`PYFUNC_ENTRY_POINT` (models-from-code: no pickle)."""
    if name == "FinQAPyfuncModel":
        from mlflow.pyfunc import PythonModel

        cls = type("FinQAPyfuncModel", (_FinQAPyfunc, PythonModel),
                   {"__module__": __name__, "__qualname__": "FinQAPyfuncModel", "__doc__": _FinQAPyfunc.__doc__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _serving_defaults(rec: dict) -> dict:
    """A served record has no gold answer: fill the gold-only fields FinQARecord requires with empty
    placeholders (they never reach the prompt) and make table cells strings."""
    rec = dict(rec)
    qa = dict(rec.get("qa") or {})
    for key, empty in (("answer", ""), ("explanation", ""), ("ann_table_rows", []), ("ann_text_rows", []),
                       ("steps", []), ("program", ""), ("program_re", ""), ("gold_inds", {}), ("exe_ans", 0.0)):
        qa.setdefault(key, empty)
    rec["qa"] = qa
    rec["table"] = [[str(c) for c in row] for row in rec.get("table") or []]
    rec.setdefault("table_ori", rec["table"])
    rec.setdefault("filename", "")
    rec.setdefault("pre_text", [])
    rec.setdefault("post_text", [])
    return rec


def pyfunc_signature(serving: dict) -> Any:
    """The model's input/output schema and its two params (what ``/invocations`` accepts).

    Every input column is optional: a request sends either the record's fields (``question``,
    ``pre_text``, ``post_text``, ``table``, ``gold_inds``, ``id``) or one ``record`` column. Table
    cells are strings, as in the official FinQA JSON.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import AnyType, Array, ColSpec, Map, ParamSchema, ParamSpec, Schema

    text = Array(DataType.string)
    inputs = Schema([
        ColSpec(DataType.string, "id", required=False),
        ColSpec(DataType.string, "question", required=False),
        ColSpec(text, "pre_text", required=False),
        ColSpec(text, "post_text", required=False),
        ColSpec(Array(text), "table", required=False),
        ColSpec(Map(DataType.string), "gold_inds", required=False),
        ColSpec(AnyType(), "record", required=False),
    ])
    outputs = Schema([
        ColSpec(DataType.string, "id"), ColSpec(DataType.string, "completion"),
        ColSpec(DataType.string, "program", required=False), ColSpec(DataType.string, "answer", required=False),
        ColSpec(AnyType(), "answer_value", required=False), ColSpec(AnyType(), "value", required=False),
        ColSpec(DataType.string, "context_mode"),
    ])
    gen = serving.get("generation", {})
    params = ParamSchema([
        ParamSpec("max_new_tokens", DataType.long, int(gen.get("max_new_tokens", 64))),
        ParamSpec("batch_size", DataType.long, int(gen.get("batch_size", 8))),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def serving_config(cfg: "Config", adapter_dir: str | os.PathLike | None = None) -> dict:
    """What the pyfunc needs besides the adapter: which base, dtype, prompt config, generation lengths
    and the few-shot records, so served prompts are built exactly as in training.

    The model/prompt/data sections come from the config the trainer saved beside the adapter
    (``fingrpo_config.json``) when it is there, else from ``cfg``.
    """
    trained: dict = {}
    saved = Path(adapter_dir or cfg.train.output_dir) / "fingrpo_config.json"
    if saved.is_file():
        trained = read_json(saved)
        if not isinstance(trained, dict):
            raise DataError(f"{saved}: expected the resolved config (a JSON object)")
    model = {**cfg.model.model_dump(mode="json"), **trained.get("model", {})}
    prompt = {**cfg.prompt.model_dump(mode="json"), **trained.get("prompt", {})}
    train_path = trained.get("data", {}).get("train_path", cfg.data.train_path)
    few_shot: list[dict] = []
    if int(prompt.get("few_shot", 0)) > 0:
        raw = read_json(train_path)
        if not isinstance(raw, list):
            raise DataError(f"{train_path}: top level must be a list of records")
        # make_examples takes the worked examples from the first few_shot + 1 records of the pool
        # (skipping the record asked about): keep exactly those
        few_shot = raw[: int(prompt["few_shot"]) + 1]
    return {
        "model": {"name_or_path": model["name_or_path"], "dtype": model["dtype"]},
        "prompt": prompt,
        "generation": {"max_new_tokens": cfg.evaluate.max_new_tokens, "batch_size": cfg.evaluate.batch_size},
        "few_shot_records": few_shot,
        "trained_config": str(saved) if trained else None,
    }


# --------------------------------------------------------------------------------------------------
# Registry + promotion gate
# --------------------------------------------------------------------------------------------------


def _version_metric(tracker: _Tracker, version: Any, metric: str) -> float | None:
    """The gate metric of a registered version: its tag (written at registration), else the metric of
    the same name in its run; None if neither exists."""
    tags = version.tags or {}
    if tags.get(TAG_METRIC_NAME) == metric and TAG_METRIC_VALUE in tags:
        with contextlib.suppress(ValueError):
            return float(tags[TAG_METRIC_VALUE])
    if version.run_id:
        with contextlib.suppress(Exception):
            run = tracker.call(tracker.client.get_run, version.run_id)
            if metric in run.data.metrics:
                return float(run.data.metrics[metric])
    return None


def promote_from_config(cfg: "Config") -> dict:
    """The ``register`` stage: a new version of ``register.model_name`` from the pipeline's run, alias
    ``challenger`` on it, and ``champion`` moved to it only if it beats the current champion's
    ``register.metric`` by more than ``register.min_improvement`` (the first version becomes champion).

    Writes ``register.output_path`` (decision, reason, both figures, versions) atomically and returns it.

    >>> promote_from_config(load_config("params.yaml"))["decision"]      # doctest: +SKIP
    'promoted'
    """
    if not cfg.tracking.enabled:
        raise ConfigError("register: promotion needs the MLflow registry, but tracking.enabled is false")
    metric = cfg.register.metric
    eval_path = Path(cfg.evaluate.output_path)
    eval_result = read_json(eval_path)
    try:
        challenger_value = float(lookup_metric(eval_result, metric))
    except KeyError:
        raise DataError(f"{eval_path}: register.metric {metric!r} not found; run `fingrpo evaluate` "
                        "or fix register.metric") from None
    except (TypeError, ValueError):
        raise DataError(f"{eval_path}: register.metric {metric!r} is not a number") from None
    adapter_dir = Path(cfg.train.output_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter_dir}: no LoRA adapter to register (adapter_config.json missing): "
                         "run `fingrpo train` first")

    import mlflow
    from mlflow.exceptions import MlflowException

    tracker, run_id = current_run(cfg, "register")
    client, name = tracker.client, cfg.register.model_name

    # 1. the challenger: a pyfunc version holding the adapter + serving config (not the base weights)
    serving = serving_config(cfg, adapter_dir)
    base_model = serving["model"]["name_or_path"]
    with tempfile.TemporaryDirectory(prefix="fingrpo-serving-") as tmp:
        serving_path = Path(tmp) / SERVING_CONFIG
        serving_path.write_text(json.dumps(serving, indent=2), encoding="utf-8")
        # models-from-code: the version stores this 3-line file, not a pickle; loading it imports the
        # installed fingrpo (serve from the project's environment: --env-manager local)
        code_path = Path(tmp) / "fingrpo_pyfunc.py"
        code_path.write_text(PYFUNC_ENTRY_POINT, encoding="utf-8")
        with _fluent_uri(tracker.uri), mlflow.start_run(run_id=run_id):
            # a retry after a late transient failure may leave an orphan version (no tags, no alias):
            # harmless, the gate below only ever looks at the version this call returns
            info = tracker.call(
                mlflow.pyfunc.log_model,
                name=MODEL_ARTIFACT_NAME,
                python_model=str(code_path),
                artifacts={"adapter": str(adapter_dir), "serving_config": str(serving_path)},
                pip_requirements=_pip_requirements(),
                signature=pyfunc_signature(serving),
                registered_model_name=name,
                metadata={"base_model": base_model, "fingrpo_metric": metric},
                what="pyfunc.log_model",
            )
    version = str(info.registered_model_version)
    prov = provenance_tags()
    params = json.dumps(cfg.public_dump(), sort_keys=True, separators=(",", ":"))
    version_tags = {
        "fingrpo.git_commit": prov["fingrpo.git_commit"],
        "fingrpo.git_dirty": prov["fingrpo.git_dirty"],
        "fingrpo.data_md5": prov["fingrpo.data_md5"],
        "fingrpo.dvc_lock_md5": prov["fingrpo.dvc_lock_md5"],
        "fingrpo.version": prov["fingrpo.version"],
        "fingrpo.base_model": base_model,
        "fingrpo.params_md5": hashlib.md5(params.encode()).hexdigest(),  # noqa: S324 - fingerprint
        "fingrpo.params": params if len(params) <= _MAX_TAG_LEN else params[: _MAX_TAG_LEN - 3] + "...",
        TAG_METRIC_NAME: metric,
        TAG_METRIC_VALUE: repr(challenger_value),
    }
    for key, value in version_tags.items():
        tracker.call(client.set_model_version_tag, name, version, key, value)

    # 2. the gate
    try:
        champion = tracker.call(client.get_model_version_by_alias, name, CHAMPION)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST" and "not found" not in str(e).lower():
            raise
        champion = None
    tracker.call(client.set_registered_model_alias, name, CHALLENGER, version)
    champion_version = str(champion.version) if champion is not None else None
    champion_value = _version_metric(tracker, champion, metric) if champion is not None else None
    margin = cfg.register.min_improvement
    if champion is None:
        promote, reason = True, f"first version of {name}: it becomes the champion"
    elif champion_version == version:  # pragma: no cover - a fresh version never equals the champion
        promote, reason = False, f"version {version} is already the champion"
    elif not math.isfinite(challenger_value):
        promote, reason = False, f"challenger's {metric} is not finite ({challenger_value})"
    elif champion_value is None:
        promote, reason = False, (
            f"champion v{champion_version} has no recorded {metric} (metric changed?): kept; promote by hand "
            f"(`MlflowClient().set_registered_model_alias({name!r}, 'champion', {version!r})`) if intended"
        )
    elif challenger_value - champion_value > margin:
        promote, reason = True, (f"challenger {metric}={challenger_value:.6g} beats champion "
                                 f"v{champion_version} ({champion_value:.6g}) by more than {margin:g}")
    else:
        promote, reason = False, (f"challenger {metric}={challenger_value:.6g} does not beat champion "
                                  f"v{champion_version} ({champion_value:.6g}) by more than {margin:g}")
    if promote:
        tracker.call(client.set_registered_model_alias, name, CHAMPION, version)

    decision = {
        "decision": "promoted" if promote else "kept",
        "reason": reason,
        "model_name": name,
        "metric": metric,
        "min_improvement": margin,
        "challenger": {"version": version, "value": challenger_value, "run_id": run_id},
        "previous_champion": {"version": champion_version, "value": champion_value},
        "champion": {"version": version if promote else champion_version},
        "model_uri": f"models:/{name}@{CHAMPION}",
        "challenger_uri": f"models:/{name}/{version}",
        "tracking_uri": redact_uri(tracker.uri),
    }
    write_json_atomic(cfg.register.output_path, decision)
    tracker.set_tags(run_id, {"fingrpo.promotion": decision["decision"], "fingrpo.model_version": version})
    tracker.log_path(run_id, Path(cfg.register.output_path), "registry")
    return decision
