"""The tracking store: which URI (``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///mlflow.db``), its health check, retries on transient errors, and :class:`Tracker`, a client
bound to one URI that every other tracking module logs through.

URIs are shown and stored without credentials (:func:`fingrpo.config.redact_uri`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from fingrpo.config import redact_text, redact_uri
from fingrpo.errors import TrackingError

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import Config

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow error codes that mean "try again" (MlflowException's default code INTERNAL_ERROR is not here:
# it is also used for permanent failures; its transient cases are matched by message below).
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "ABORTED", "DEADLINE_EXCEEDED"}
_TRANSIENT_MESSAGES = re.compile(
    r"database is locked|temporarily unavailable|service unavailable|bad gateway|gateway timeout|timed out|"
    r"connection (reset|aborted|refused)|max retries exceeded|(status|error)[ _]code[: =]*50[234]\b",
    re.IGNORECASE,
)
_METRIC_NAME_BAD = re.compile(r"[^\w\-./ :]")  # MLflow accepts alphanumerics, _ - . / space :
MAX_PARAM_LEN = 6000  # MLflow 3's limit on a param value
MAX_TAG_LEN = 5000


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
                if redact_text(str(e)) != str(e):  # the request URL with its credential: not into a log
                    raise _redacted(e) from None
                raise
            if attempt == attempts:
                where = f" against {redact_uri(uri)}" if uri else ""
                error = TrackingError(f"MLflow {name} failed after {attempts} attempts{where}: {one_line(e)}")
                # MLflow's message quotes the request URL: with a credential in it, the cause (and the
                # traceback that would print it) is dropped; the message above has it redacted
                raise error from (None if redact_text(str(e)) != str(e) else e)
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("MLflow %s failed (%s); retry %d/%d in %.1fs", name, one_line(e), attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _redacted(e: Exception) -> Exception:
    """The same error with the credentials of the URIs in its message removed (same MLflow error code)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ErrorCode

    if isinstance(e, MlflowException):
        return MlflowException(redact_text(e.message), error_code=ErrorCode.Value(e.error_code))
    return TrackingError(one_line(e))


def one_line(e: BaseException) -> str:
    """An exception as one line of at most 300 characters, URI credentials removed (for logs and error
    messages: MLflow's errors quote the request URL, user:password included)."""
    text = redact_text(" ".join(str(e).split()))
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
                f"MLflow tracking server {shown} is unreachable ({one_line(reason) if isinstance(reason, BaseException) else reason}): "
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
            f"MLflow tracking store {shown} is not usable ({one_line(e)}): fix tracking.tracking_uri / "
            "MLFLOW_TRACKING_URI (e.g. sqlite:///mlflow.db) or set tracking.enabled=false"
        ) from None
    return uri


def _metric_name(name: str) -> str:
    return _METRIC_NAME_BAD.sub("_", str(name))[:250]


@contextlib.contextmanager
def fluent_uri(uri: str):
    """Point MLflow's fluent API (mlflow.start_run, mlflow.pyfunc.log_model) at ``uri`` for a block.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` to the
    environment (child processes inherit them), so both the module state and the environment are put
    back exactly as they were afterwards; otherwise a later subprocess would silently use this store.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # MLflow prints "View run <name> at: <tracking URI>/#/..." when a fluent run ends: not with a credential in it
    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if redact_uri(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Tracker:
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
                raise TrackingError(f"cannot create MLflow experiment {name!r} in {redact_uri(self.uri)}: {one_line(e)}") from None
            return exp.experiment_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_name(k), float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):  # log_batch takes at most 1000 metrics
            self.call(self.client.log_batch, run_id, metrics=items[i : i + 1000])

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # ... and at most 100 params
            self.call(self.client.log_batch, run_id, params=items[i : i + 100])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.call(self.client.log_batch, run_id, tags=items[i : i + 100])

    def log_path(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.call(self.client.log_artifacts, run_id, str(path),
                      artifact_path=f"{artifact_path}/{path.name}" if artifact_path else path.name)
        else:
            self.call(self.client.log_artifact, run_id, str(path), artifact_path=artifact_path)
