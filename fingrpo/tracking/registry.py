"""The model registry: every pipeline run registers its adapter as a new version of
``register.model_name`` (alias ``challenger``); the alias ``champion`` moves to it only when it beats the
current champion on ``register.metric``, measured on the same records, data version and context mode,
by a paired rule (:func:`decide_promotion`, a pure function of the two :class:`GateFigure`).

    fingrpo register   # register_from_config -> reports/promotion.json {decision, reason, versions, values}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fingrpo.config import get_dotted, redact_uri
from fingrpo.errors import ConfigError, DataError, ModelError
from fingrpo.io import read_json, read_jsonl, write_json_atomic
from fingrpo.lineage import fingerprint
from fingrpo.scoring import ROW_METRICS, mcnemar_p
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

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT_NAME = "model"  # the pyfunc's name inside the run (models:/<name>/<version> points to it)
# Version tags the gate reads back: the metric's name and value when the version was registered, and
# the set it was measured on; its per-record outcomes are the run's artifact OUTCOMES_ARTIFACT.
TAG_METRIC_NAME = "fingrpo.gate_metric"
TAG_METRIC_VALUE = "fingrpo.gate_metric_value"
TAG_SET_MD5 = "fingrpo.gate_set_md5"
TAG_SET_N = "fingrpo.gate_set_n"
TAG_DATA_MD5 = "fingrpo.gate_data_md5"
TAG_CONTEXT = "fingrpo.gate_context_mode"
OUTCOMES_ARTIFACT = "gate/outcomes.json"
# (the champion's adapter folder, its serving config) -> its eval.json and predictions.jsonl on the challenger's sets
EvaluateChampion = Callable[[Path, dict], tuple[Path, Path]]


@dataclass(frozen=True)
class GateFigure:
    """One model's gate metric on one evaluation set: the value, and what it was measured on (the set's
    record keys' md5, the data version, the context mode) with the per-record outcomes behind it."""

    value: float
    n: int
    set_md5: str
    data_md5: str
    context_mode: str
    outcomes: dict[str, float] | None = None  # "<dataset>:<record id>" -> 1.0 right / 0.0 wrong

    def same_set(self, other: "GateFigure") -> bool:
        return (self.set_md5, self.data_md5, self.context_mode) == (other.set_md5, other.data_md5, other.context_mode)

    def describe(self) -> str:
        """``"457 records (set 1a2b3c4d, data ec76a117, context gold)"``."""
        return f"{self.n} records (set {self.set_md5[:8]}, data {self.data_md5[:8]}, context {self.context_mode})"

    def tags(self) -> dict[str, str]:
        return {TAG_SET_MD5: self.set_md5, TAG_SET_N: str(self.n), TAG_DATA_MD5: self.data_md5,
                TAG_CONTEXT: self.context_mode}

    def summary(self) -> dict[str, Any]:
        return {"value": self.value, "n": self.n, "set_md5": self.set_md5, "data_md5": self.data_md5,
                "context_mode": self.context_mode, "set": self.describe()}


@dataclass(frozen=True)
class Decision:
    """What the gate decided: ``promote`` (move ``champion`` to the challenger), why in one line, and
    the paired comparison behind it (records gained/lost, the p-value) when there was one."""

    promote: bool
    reason: str
    comparison: dict[str, Any] = field(default_factory=dict)


RULES = ("mcnemar", "gained_minus_lost")


def decide_promotion(challenger: GateFigure, champion: GateFigure | None, *, metric: str, rule: str = "mcnemar",
                     alpha: float = 0.05, min_improvement: float = 0.0, name: str, version: str,
                     champion_version: str | None) -> Decision:
    """The promotion gate, without MLflow: the challenger version ``version`` against the current champion
    (``champion_version``, its figure ``champion``; both None when there is none yet).

    The first version becomes champion; a non-finite challenger never does; a champion without a
    figure of this metric is kept (promote by hand). Otherwise the two figures must come from the same
    evaluation set (same records, data version and context mode; else the champion is kept: re-evaluate
    it on the challenger's set) and the comparison is paired on those records: ``gained`` (right only for
    the challenger), ``lost`` (right only for the champion). The challenger must gain more than it loses
    by more than ``min_improvement`` of the records and, with ``rule="mcnemar"``, the one-sided exact
    McNemar test must give p <= ``alpha``; ``rule="gained_minus_lost"`` asks only the former.

    >>> ch = GateFigure(0.30, 100, "s", "d", "gold", {str(i): float(i < 30) for i in range(100)})
    >>> cp = GateFigure(0.20, 100, "s", "d", "gold", {str(i): float(i < 20) for i in range(100)})
    >>> d = decide_promotion(ch, cp, metric="m", name="n", version="2", champion_version="1")
    >>> d.promote, d.comparison["gained"], d.comparison["lost"]
    (True, 10, 0)
    """
    if rule not in RULES:
        raise ConfigError(f"register.rule {rule!r}: expected one of {', '.join(RULES)}")
    if champion_version is None:
        return Decision(True, f"first version of {name}: it becomes the champion")
    if champion_version == version:
        return Decision(False, f"version {version} is already the champion")
    if not math.isfinite(challenger.value):
        return Decision(False, f"challenger's {metric} is not finite ({challenger.value})")
    if champion is None:
        return Decision(False, (
            f"champion v{champion_version} has no recorded {metric} (metric changed?): kept; promote by hand "
            f"(`MlflowClient().set_registered_model_alias({name!r}, 'champion', {version!r})`) if intended"
        ))
    if not challenger.same_set(champion):
        return Decision(False, (
            f"not compared: challenger {metric}={challenger.value:.6g} on {challenger.describe()}, champion "
            f"v{champion_version} {champion.value:.6g} on {champion.describe()}: not the same evaluation set; "
            "champion kept (register.reevaluate_champion measures it on the challenger's set)"
        ))
    if challenger.outcomes is None or champion.outcomes is None or set(challenger.outcomes) != set(champion.outcomes):
        return Decision(False, f"not compared: no per-record outcomes of {metric} for both versions on the same records; champion kept")
    keys = sorted(challenger.outcomes)
    gained = sum(challenger.outcomes[k] > champion.outcomes[k] for k in keys)
    lost = sum(challenger.outcomes[k] < champion.outcomes[k] for k in keys)
    p = mcnemar_p(gained, lost)
    diff = (gained - lost) / len(keys) if keys else 0.0
    comparison = {"rule": rule, "records": len(keys), "gained": gained, "lost": lost, "difference": diff,
                  "p_value": p, "alpha": alpha, "min_improvement": min_improvement}
    what = (f"challenger {metric}={challenger.value:.6g} vs champion v{champion_version} {champion.value:.6g} "
            f"on the same {len(keys)} records: {gained} gained, {lost} lost (exact McNemar p={p:.3g})")
    if diff <= min_improvement:
        return Decision(False, f"{what}: does not beat it by more than {min_improvement:g}", comparison)
    if rule == "mcnemar" and p > alpha:
        return Decision(False, f"{what}: not significant at alpha={alpha:g}; champion kept", comparison)
    return Decision(True, f"{what}: promoted ({rule})", comparison)


def _parse_metric(metric: str) -> tuple[str, str, str, bool, str]:
    """``dev.pooled.adapter.execution_accuracy`` -> (split, set, model, random_subset_only, row field)."""
    parts = metric.split(".")
    subset = len(parts) == 5 and parts[3] == "random_subset"
    if len(parts) not in (4, 5) or (len(parts) == 5 and not subset) or parts[-1] not in ROW_METRICS:
        raise ConfigError(
            f"register.metric {metric!r}: expected <split>.<set>.<model>.<accuracy> (or "
            f"<split>.<set>.<model>.random_subset.<accuracy>) with accuracy one of {', '.join(ROW_METRICS)}, "
            "e.g. dev.pooled.adapter.execution_accuracy"
        )
    return parts[0], parts[1], parts[2], subset, ROW_METRICS[parts[-1]]


def gate_figure(metric: str, eval_path: str | Path, predictions_path: str | Path) -> GateFigure:
    """The gate figure of ``metric`` from an evaluation's eval.json and predictions.jsonl: its value, the
    records it is the mean over (one per record; a pooled set's records once) and their outcomes."""
    eval_path, predictions_path = Path(eval_path), Path(predictions_path)
    result = read_json(eval_path)
    try:
        value = float(get_dotted(result, metric))
    except KeyError:
        raise DataError(f"{eval_path}: register.metric {metric!r} not found; run `fingrpo evaluate` "
                        "or fix register.metric") from None
    except (TypeError, ValueError):
        raise DataError(f"{eval_path}: register.metric {metric!r} is not a number") from None
    split, set_name, model, subset, field_name = _parse_metric(metric)
    summary = result.get("summary", {})
    sets = summary.get("sets", {})
    if set_name == "pooled":
        members = {k.split(".", 1)[1] for k, v in sets.items() if k.startswith(f"{split}.") and v.get("pooled")}
    else:
        members = {set_name}
    if not predictions_path.is_file():
        raise DataError(f"{predictions_path}: the per-record predictions of {eval_path} are missing: run `fingrpo evaluate`")
    outcomes: dict[str, float] = {}
    for row in read_jsonl(predictions_path):
        if row.get("model") != model or row.get("split", split) != split or not members & set(row.get("sets", [])):
            continue
        if subset and not row.get("random_subset"):
            continue
        if field_name in row:
            outcomes.setdefault(f"{row.get('dataset', 'finqa')}:{row['id']}", float(bool(row[field_name])))
    if not outcomes:
        raise DataError(f"{predictions_path}: no {model} rows of {split}.{set_name} with {field_name}: "
                        f"it does not belong to {eval_path}; rerun `fingrpo evaluate`")
    keys = "\n".join(sorted(outcomes))
    return GateFigure(value=value, n=len(outcomes), set_md5=hashlib.md5(keys.encode()).hexdigest(),  # noqa: S324
                      data_md5=str(summary.get("data_md5", "unknown")), context_mode=str(summary.get("context_mode", "unknown")),
                      outcomes=outcomes)


def _champion_figure(tracker: Tracker, version: Any, metric: str) -> GateFigure | None:
    """The gate figure a registered version was registered with: the value and set from its tags, the
    outcomes from its run's ``gate/outcomes.json``; from its run's metric of that name (no set) when
    it was registered by hand; None if neither exists."""
    tags = version.tags or {}
    value = None
    if tags.get(TAG_METRIC_NAME) == metric and TAG_METRIC_VALUE in tags:
        with contextlib.suppress(ValueError):
            value = float(tags[TAG_METRIC_VALUE])
    if value is None and version.run_id:
        with contextlib.suppress(Exception):
            run = tracker.call(tracker.client.get_run, version.run_id)
            if metric in run.data.metrics:
                value = float(run.data.metrics[metric])
    if value is None:
        return None
    outcomes = None
    if TAG_SET_MD5 in tags and version.run_id:
        with tempfile.TemporaryDirectory(prefix="fingrpo-gate-") as tmp, contextlib.suppress(Exception):
            path = tracker.call(tracker.client.download_artifacts, version.run_id, OUTCOMES_ARTIFACT, tmp)
            doc = read_json(path)
            if doc.get("metric") == metric:
                outcomes = {str(k): float(v) for k, v in doc["outcomes"].items()}
    n = int(tags.get(TAG_SET_N, "0") or 0)
    return GateFigure(value=value, n=n, set_md5=tags.get(TAG_SET_MD5, "unknown"),
                      data_md5=tags.get(TAG_DATA_MD5, "unknown"), context_mode=tags.get(TAG_CONTEXT, "unknown"),
                      outcomes=outcomes)


def register_from_config(cfg: "Config", evaluate_champion: EvaluateChampion | None = None) -> dict:
    """The ``register`` stage: a new version of ``register.model_name`` from the pipeline's run, alias
    ``challenger`` on it, and ``champion`` moved to it only if :func:`decide_promotion` says so (the first
    version becomes champion).

    The gate compares like with like: the challenger's figure (``register.metric`` from eval.json and
    its records from predictions.jsonl) against the champion's on the same records, data version and
    context mode. When the champion was measured on another set and ``register.reevaluate_champion`` is
    on, ``evaluate_champion(adapter_dir, serving)`` (the champion's downloaded adapter and serving config
    -> its eval.json and predictions.jsonl on the challenger's sets) measures it again first; without it
    the champion is kept.

    Writes ``register.output_path`` (decision, reason, both figures and the sets they came from, the
    rule and the paired counts) atomically, tags the version with the same, and returns it.

    >>> register_from_config(load_config("params.yaml"))["decision"]      # doctest: +SKIP
    'promoted'
    """
    if not cfg.tracking.enabled:
        raise ConfigError("register: promotion needs the MLflow registry, but tracking.enabled is false")
    reg = cfg.register
    metric = reg.metric
    _parse_metric(metric)
    challenger_fig = gate_figure(metric, cfg.evaluate.output_path, cfg.evaluate.predictions_path)
    adapter_dir = Path(cfg.train.output_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter_dir}: no LoRA adapter to register (adapter_config.json missing): "
                         "run `fingrpo train` first")

    import mlflow
    from mlflow.exceptions import MlflowException

    tracker, run_id = current_run(cfg, "register")
    client, name = tracker.client, reg.model_name

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
        artifacts = {"adapter": str(adapter_dir), "serving_config": str(serving_path)}
        if serving["prompt"].get("retriever", "lexical") != "lexical":  # the model's retriever travels with it
            retriever_dir = Path(serving["prompt"]["retriever_dir"])
            if not (retriever_dir / "head.safetensors").is_file():
                raise ModelError(f"{retriever_dir}: no trained retriever to register with the adapter "
                                 "(prompt.retriever: cross_encoder): run `fingrpo retriever` first")
            artifacts["retriever"] = str(retriever_dir)
        with fluent_uri(tracker.uri), mlflow.start_run(run_id=run_id):
            # a retry after a late transient failure may leave an orphan version (no tags, no alias):
            # harmless, the gate below only ever looks at the version this call returns
            info = tracker.call(
                mlflow.pyfunc.log_model,
                name=MODEL_ARTIFACT_NAME,
                python_model=str(code_path),
                artifacts=artifacts,
                pip_requirements=pip_requirements(),
                signature=pyfunc_signature(serving),
                registered_model_name=name,
                metadata={"base_model": base_model, "fingrpo_metric": metric},
                what="pyfunc.log_model",
            )
        # the challenger's per-record outcomes: a later gate pairs its own records with them
        outcomes_path = Path(tmp) / Path(OUTCOMES_ARTIFACT).name
        write_json_atomic(outcomes_path, {"metric": metric, **challenger_fig.summary(),
                                          "outcomes": challenger_fig.outcomes})
        tracker.log_path(run_id, outcomes_path, str(Path(OUTCOMES_ARTIFACT).parent))
    version = str(info.registered_model_version)
    prov = provenance_tags()
    params = json.dumps(cfg.public_dump(), sort_keys=True, separators=(",", ":"))
    fp = fingerprint(cfg)
    version_tags = {
        "fingrpo.git_commit": prov["fingrpo.git_commit"],
        "fingrpo.git_dirty": prov["fingrpo.git_dirty"],
        "fingrpo.data_md5": prov["fingrpo.data_md5"],
        "fingrpo.dvc_lock_md5": prov["fingrpo.dvc_lock_md5"],
        "fingrpo.version": prov["fingrpo.version"],
        "fingrpo.base_model": base_model,
        "fingrpo.params_md5": fp.params,
        "fingrpo.params": params if len(params) <= MAX_TAG_LEN else params[: MAX_TAG_LEN - 3] + "...",
        **fp.tags(),
        TAG_METRIC_NAME: metric,
        TAG_METRIC_VALUE: repr(challenger_fig.value),
        **challenger_fig.tags(),
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
    champion_fig = _champion_figure(tracker, champion, metric) if champion is not None else None
    registered_fig, reevaluated = champion_fig, False
    unpaired = champion_fig is not None and (not challenger_fig.same_set(champion_fig) or champion_fig.outcomes is None)
    if unpaired and champion_version != version and reg.reevaluate_champion and evaluate_champion is not None:
        log.info("gate: champion v%s was measured on %s; re-evaluating it on the challenger's %s",
                 champion_version, champion_fig.describe(), challenger_fig.describe())
        with tempfile.TemporaryDirectory(prefix="fingrpo-champion-") as tmp, fluent_uri(tracker.uri):
            model_dir = tracker.call(mlflow.artifacts.download_artifacts, artifact_uri=f"models:/{name}/{champion_version}",
                                     dst_path=tmp, what="download champion")
            artifacts = Path(model_dir) / "artifacts"
            champion_serving = read_json(artifacts / SERVING_CONFIG)
            if (artifacts / "retriever").is_dir():  # the champion ranks facts with its own retriever
                champion_serving["prompt"]["retriever_dir"] = str(artifacts / "retriever")
            eval_path, predictions_path = evaluate_champion(artifacts / "adapter", champion_serving)
        champion_fig, reevaluated = gate_figure(metric, eval_path, predictions_path), True
    gate = decide_promotion(challenger_fig, champion_fig, metric=metric, rule=reg.rule, alpha=reg.alpha,
                            min_improvement=reg.min_improvement, name=name, version=version,
                            champion_version=champion_version)
    reason = (f"champion v{champion_version} re-evaluated on the challenger's set; " if reevaluated else "") + gate.reason
    if gate.promote:
        tracker.call(client.set_registered_model_alias, name, CHAMPION, version)

    decision = {
        "decision": "promoted" if gate.promote else "kept",
        "reason": reason,
        "model_name": name,
        "metric": metric,
        "rule": reg.rule,
        "alpha": reg.alpha,
        "min_improvement": reg.min_improvement,
        "challenger": {"version": version, "value": challenger_fig.value, "run_id": run_id},
        "previous_champion": {"version": champion_version, "value": champion_fig.value if champion_fig else None},
        "champion": {"version": version if gate.promote else champion_version},
        "gate": {
            "challenger": challenger_fig.summary(),
            "champion": champion_fig.summary() if champion_fig else None,
            "champion_as_registered": registered_fig.summary() if reevaluated and registered_fig else None,
            "champion_reevaluated": reevaluated,
            "comparison": gate.comparison,
        },
        "fingerprint": fp.value,
        "model_uri": f"models:/{name}@{CHAMPION}",
        "challenger_uri": f"models:/{name}/{version}",
        "tracking_uri": redact_uri(tracker.uri),
    }
    write_json_atomic(reg.output_path, decision)
    gate_tags = {"fingrpo.gate_rule": reg.rule, "fingrpo.gate_decision": decision["decision"],
                 "fingrpo.gate_reason": reason[:MAX_TAG_LEN],
                 "fingrpo.gate_compared_with": f"v{champion_version}" if champion_version else "none"}
    gate_tags.update({f"fingrpo.gate_{k}": repr(v) for k, v in gate.comparison.items() if k in ("gained", "lost", "p_value", "records")})
    for key, value in gate_tags.items():
        tracker.call(client.set_model_version_tag, name, version, key, value)
    tracker.set_tags(run_id, {"fingrpo.promotion": decision["decision"], "fingrpo.model_version": version, **fp.tags()})
    tracker.log_path(run_id, Path(reg.output_path), "registry")
    return decision
