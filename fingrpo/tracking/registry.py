"""The model registry: every pipeline run registers its adapter as a new version of
``register.model_name`` (alias ``challenger``); the alias ``champion`` moves to it only when it beats the
current champion on ``register.metric`` (:func:`decide_promotion`, a pure function of the two figures).

    fingrpo register   # register_from_config -> reports/promotion.json {decision, reason, versions, values}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fingrpo.config import get_dotted, redact_uri
from fingrpo.errors import ConfigError, DataError, ModelError
from fingrpo.io import read_json, write_json_atomic
from fingrpo.tracking.client import MAX_TAG_LEN, Tracker, fluent_uri
from fingrpo.tracking.runs import current_run, provenance_tags
from fingrpo.tracking.serving import (
    PYFUNC_ENTRY_POINT,
    SERVING_CONFIG,
    pip_requirements,
    pyfunc_signature,
    serving_config,
)

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import Config

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT_NAME = "model"  # the pyfunc's name inside the run (models:/<name>/<version> points to it)
# Version tags the gate reads back: the metric's name and its value when the version was registered.
TAG_METRIC_NAME = "fingrpo.gate_metric"
TAG_METRIC_VALUE = "fingrpo.gate_metric_value"


@dataclass(frozen=True)
class Decision:
    """What the gate decided: ``promote`` (move ``champion`` to the challenger) and why, in one line."""

    promote: bool
    reason: str


def decide_promotion(challenger: float, champion: float | None, *, metric: str, min_improvement: float,
                     name: str, version: str, champion_version: str | None) -> Decision:
    """The promotion gate, without MLflow: the challenger version ``version`` (its ``metric`` value
    ``challenger``) against the current champion (``champion_version`` with value ``champion``; both None
    when there is none yet). The first version becomes champion; a non-finite challenger never does; a
    champion without a recorded value of this metric is kept (promote by hand); otherwise the challenger
    must beat the champion by more than ``min_improvement``.

    >>> decide_promotion(0.30, 0.25, metric="m", min_improvement=0.0, name="n", version="2", champion_version="1").promote
    True
    >>> decide_promotion(0.25, 0.25, metric="m", min_improvement=0.0, name="n", version="2", champion_version="1").promote
    False
    """
    if champion_version is None:
        return Decision(True, f"first version of {name}: it becomes the champion")
    if champion_version == version:
        return Decision(False, f"version {version} is already the champion")
    if not math.isfinite(challenger):
        return Decision(False, f"challenger's {metric} is not finite ({challenger})")
    if champion is None:
        return Decision(False, (
            f"champion v{champion_version} has no recorded {metric} (metric changed?): kept; promote by hand "
            f"(`MlflowClient().set_registered_model_alias({name!r}, 'champion', {version!r})`) if intended"
        ))
    if challenger - champion > min_improvement:
        return Decision(True, f"challenger {metric}={challenger:.6g} beats champion "
                              f"v{champion_version} ({champion:.6g}) by more than {min_improvement:g}")
    return Decision(False, f"challenger {metric}={challenger:.6g} does not beat champion "
                           f"v{champion_version} ({champion:.6g}) by more than {min_improvement:g}")


def _version_metric(tracker: Tracker, version: Any, metric: str) -> float | None:
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


def register_from_config(cfg: "Config") -> dict:
    """The ``register`` stage: a new version of ``register.model_name`` from the pipeline's run, alias
    ``challenger`` on it, and ``champion`` moved to it only if it beats the current champion's
    ``register.metric`` by more than ``register.min_improvement`` (the first version becomes champion).

    Writes ``register.output_path`` (decision, reason, both figures, versions) atomically and returns it.

    >>> register_from_config(load_config("params.yaml"))["decision"]      # doctest: +SKIP
    'promoted'
    """
    if not cfg.tracking.enabled:
        raise ConfigError("register: promotion needs the MLflow registry, but tracking.enabled is false")
    metric = cfg.register.metric
    eval_path = Path(cfg.evaluate.output_path)
    eval_result = read_json(eval_path)
    try:
        challenger_value = float(get_dotted(eval_result, metric))
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
        with fluent_uri(tracker.uri), mlflow.start_run(run_id=run_id):
            # a retry after a late transient failure may leave an orphan version (no tags, no alias):
            # harmless, the gate below only ever looks at the version this call returns
            info = tracker.call(
                mlflow.pyfunc.log_model,
                name=MODEL_ARTIFACT_NAME,
                python_model=str(code_path),
                artifacts={"adapter": str(adapter_dir), "serving_config": str(serving_path)},
                pip_requirements=pip_requirements(),
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
        "fingrpo.params": params if len(params) <= MAX_TAG_LEN else params[: MAX_TAG_LEN - 3] + "...",
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
    gate = decide_promotion(challenger_value, champion_value, metric=metric, min_improvement=margin,
                            name=name, version=version, champion_version=champion_version)
    promote, reason = gate.promote, gate.reason
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
