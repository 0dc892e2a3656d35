"""The pipeline's stage functions: the one place where a stage's work is wired together.

Both orchestrators call these and nothing else: the ``fingrpo`` CLI (what ``dvc.yaml`` runs, one
sub-command per stage) and the Prefect flow ``flows/retrain.py`` (one task per stage). A stage reads
its config, calls one library function, hands the result to MLflow, and returns what it wrote::

    from fingrpo.config import load_config
    from fingrpo import pipeline

    cfg = load_config("params.yaml", ["train.max_steps=2"])
    assert pipeline.validate_stage(cfg) == 0      # reports/validation.json
    pipeline.train_stage(cfg)                     # models/adapter, reports/train_metrics.csv, reports/train.json
    pipeline.evaluate_stage(cfg)                  # reports/eval.json, reports/predictions.jsonl
    pipeline.plot_stage(cfg)                      # PNGs
    pipeline.register_stage(cfg)                  # registry version, maybe 'champion'; reports/promotion.json

Each stage also writes its few headline figures to ``<pipeline.metrics_dir>/<stage>.json``
(:func:`headline_metrics`): the files ``dvc.yaml`` declares as metrics, so that ``dvc exp show`` fits a
terminal; the full reports stay plain JSON outs beside them.

Order matters and is the orchestrators' job (dvc.yaml deps, the flow's task order): registration is
last, so a failure anywhere earlier never touches the champion. This module imports no orchestrator.

Each stage function imports its stage's modules when it runs (the one place in the library where the
project's own imports sit inside functions): so a stage's code is exactly what that function imports,
transitively, which is what its ``deps`` in ``dvc.yaml`` list (``tests/test_dvc_deps.py`` computes it),
and ``fingrpo --help`` or ``fingrpo validate`` do not load torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fingrpo.data.sources import data_files
from fingrpo.errors import ConfigError, DataError, TrainingError
from fingrpo.io import read_json, write_json_atomic

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import Config

log = logging.getLogger(__name__)


PREPARED_FILES = ("tatqa_train.json", "tatqa_dev.json")


def needs_prepare(cfg: "Config") -> bool:
    """Whether a file the config trains or evaluates on is an output of :func:`prepare_stage`."""
    out = Path(cfg.prepare.output_dir).resolve()
    return any(out in Path(p).resolve().parents for p in data_files(cfg))


def prepare_stage(cfg: "Config", input_path: str | None = None, output_dir: str | None = None,
                  report_path: str | None = None) -> dict:
    """Raw TAT-QA -> FinQA-shaped ``tatqa_train.json`` / ``tatqa_dev.json`` (split by table) + the report.

    Defaults come from the ``prepare`` section; ``--output-dir`` alone puts the report beside the files.
    Returns the report (counts per answer type and per drop reason, and per split).
    """
    from fingrpo.data.tatqa import load_tatqa, split_by_table, to_finqa_records

    pcfg = cfg.prepare
    input_path = input_path or pcfg.input_path
    if report_path is None:
        report_path = str(Path(output_dir) / "prepare.json") if output_dir else pcfg.report_path
    output_dir = output_dir or pcfg.output_dir
    contexts = load_tatqa(input_path)
    train, dev = split_by_table(contexts, pcfg.dev_fraction, pcfg.seed)
    records, report = to_finqa_records(contexts)
    by_uid = {r["id"]: r for r in records}
    out = {"input": str(input_path), "dev_fraction": pcfg.dev_fraction, "seed": pcfg.seed, **report.to_dict(),
           "splits": {}}
    for name, part, filename in (("train", train, PREPARED_FILES[0]), ("dev", dev, PREPARED_FILES[1])):
        recs = [by_uid[q.uid] for c in part for q in c.questions if q.uid in by_uid]
        if not recs:
            raise DataError(f"prepare: the {name} split of {input_path} has no converted question "
                            f"({len(part)} tables; prepare.dev_fraction={pcfg.dev_fraction})")
        write_json_atomic(Path(output_dir) / filename, recs)
        out["splits"][name] = {"path": str(Path(output_dir) / filename), "tables": len(part),
                               "questions": sum(len(c.questions) for c in part), "records": len(recs)}
    write_json_atomic(report_path, out)
    log.info("prepare: %d of %d questions converted -> %s", report.converted, report.questions, output_dir)
    return out


def validate_stage(cfg: "Config", files: list[str] | None = None) -> int:
    """Great Expectations + program re-execution checks; returns the exit code (0: every check passed).

    Writes ``<pipeline.reports_dir>/validation.json`` (and the data docs when ``pipeline.data_docs``).
    ``files`` defaults to the data section's three splits.
    """
    from fingrpo.data.validate import run_validation

    files = list(files) if files else data_files(cfg)
    return int(run_validation(files, report_dir=cfg.pipeline.reports_dir, data_docs=cfg.pipeline.data_docs))


def validation_failure_message(report_path: str | Path) -> str:
    """One line naming the first failing file, rule and record of a validation report.

    >>> import json, tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "validation.json"
    >>> _ = p.write_text(json.dumps({"files": {"d/train.json": {"success": False, "error": None, "rules": {
    ...     "program_parses": {"success": False, "failing_ids": ["ADI/1"], "reasons": ["unknown op"]}}}}}))
    >>> validation_failure_message(p)  # doctest: +ELLIPSIS
    'data validation failed: d/train.json: rule program_parses: 1 record(s), first ADI/1 (unknown op) (report: ...)'
    """
    report_path = Path(report_path)
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"data validation failed: see {report_path}"
    for path, f in report.get("files", {}).items():
        if f.get("success"):
            continue
        if f.get("error"):
            return f"data validation failed: {f['error']}"
        for rule, r in f.get("rules", {}).items():
            if r.get("success"):
                continue
            ids, reasons = r.get("failing_ids") or [], r.get("reasons") or []
            first = f"{ids[0]} ({reasons[0]})" if ids and reasons and reasons[0] else (ids[0] if ids else "?")
            return (f"data validation failed: {path}: rule {rule}: {len(ids)} record(s), first {first} "
                    f"(report: {report_path})")
    return f"data validation failed: see {report_path}"


def require_valid(cfg: "Config", files: list[str] | None = None) -> int:
    """:func:`validate_stage`, but a failed validation raises :class:`DataError` naming the first
    failing file, rule and record (for the flow)."""
    code = validate_stage(cfg, files)
    if code != 0:
        raise DataError(validation_failure_message(Path(cfg.pipeline.reports_dir) / "validation.json"))
    return code


def _train_summary_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The numeric, finite figures of the trainer's summary, nested dicts kept (what ``dvc metrics`` shows).

    >>> _train_summary_metrics({"steps": 2, "reward_mean": 0.5, "loss": float("nan"), "output_dir": "m"})
    {'steps': 2, 'reward_mean': 0.5}
    """
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = value
        elif isinstance(value, dict):
            nested = _train_summary_metrics(value)
            if nested:
                out[key] = nested
    return out


HEADLINE_EVAL = ("execution_accuracy", "pass_at_")  # of every set and model
HEADLINE_EVAL_ADAPTER = ("tatqa_exact_match",)  # of every set, the adapter's
HEADLINE_EVAL_POOLED = ("format_rate", "reward_total")  # the adapter's, over the pooled records


def headline_metrics(stage: str, report: dict[str, Any]) -> dict[str, float]:
    """The few figures of a stage's report that ``dvc metrics`` / ``dvc exp show`` put in columns (flat,
    numeric); the full report stays a plain JSON out beside it.

    >>> headline_metrics("sft", {"steps": 40, "last_epoch_loss": 0.21, "seconds": 612.0, "peak_rss_mb": 3444.0,
    ...                          "examples": 110})
    {'sft.last_epoch_loss': 0.21, 'sft.seconds': 612.0, 'sft.peak_rss_mb': 3444.0}
    >>> headline_metrics("eval", {"summary": {"dev.tatqa.adapter.execution_accuracy": 0.22, "dev.tatqa.adapter.n": 152,
    ...                                       "dev.pooled.adapter.format_rate": 0.99, "model": "m"}})
    {'dev.tatqa.adapter.execution_accuracy': 0.22, 'dev.pooled.adapter.format_rate': 0.99}
    """
    out: dict[str, Any] = {}
    if stage == "retriever":
        kind = report.get("retriever")
        for name, body in report.get("sets", {}).items():
            out[f"{name}.recall_at_3"] = (body.get(kind) or {}).get("recall_at_3")
        out["retriever.seconds_per_question"] = (report.get("training") or {}).get("seconds_per_question")
    elif stage == "sft":
        out = {f"sft.{k}": report.get(k) for k in ("last_epoch_loss", "seconds", "peak_rss_mb")}
    elif stage == "train":
        final = report.get("final_metrics") or {}
        out = {"train.steps": report.get("steps"), "train.reward_mean": final.get("reward_mean"),
               "train.zero_std_group_fraction": final.get("zero_std_group_fraction"),
               "train.seconds_per_step": report.get("seconds_per_step"), "train.peak_rss_mb": report.get("peak_rss_mb"),
               "train.wall_seconds": report.get("wall_seconds")}
    elif stage == "eval":
        for key, value in report.get("summary", {}).items():
            parts = key.split(".")
            if len(parts) != 4:
                continue
            adapter = parts[2] == "adapter"
            if parts[3].startswith(HEADLINE_EVAL) or (adapter and parts[3] in HEADLINE_EVAL_ADAPTER) or (
                    adapter and parts[1] == "pooled" and parts[3] in HEADLINE_EVAL_POOLED):
                out[key] = value
    elif stage == "promotion":
        comparison = (report.get("gate") or {}).get("comparison") or {}
        out = {"promotion.promoted": int(report.get("decision") == "promoted"),
               "promotion.challenger": (report.get("challenger") or {}).get("value"),
               "promotion.champion_before": (report.get("previous_champion") or {}).get("value"),
               "promotion.p_value": comparison.get("p_value")}
    else:
        raise ValueError(f"headline_metrics: unknown stage {stage!r}")
    return {k: v for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def write_headline(cfg: "Config", stage: str, report: dict[str, Any]) -> Path:
    """:func:`headline_metrics` of ``report`` -> ``<pipeline.metrics_dir>/<stage>.json`` (a dvc metrics file)."""
    path = Path(cfg.pipeline.metrics_dir or Path(cfg.pipeline.reports_dir) / "metrics") / f"{stage}.json"
    write_json_atomic(path, headline_metrics(stage, report))
    return path


def clear_checkpoints(checkpoint_dir: str | Path, prefix: str = "step-") -> int:
    """Remove the ``<prefix><n>`` checkpoint folders of an earlier training; returns how many.

    A fresh (non-resume) training must not leave an older run's checkpoints beside its own: a later
    ``--resume`` picks the highest step, and pruning keeps the highest steps, so a stale ``step-20``
    would win over a new run's ``step-2``. Other files in the folder are left alone.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return 0
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix) and p.name[len(prefix):].isdigit()]
    for path in stale:
        shutil.rmtree(path)
    if stale:
        log.info("fresh training: removed %d checkpoint(s) of an earlier run from %s", len(stale), root)
    return len(stale)


def retriever_stage(cfg: "Config") -> dict:
    """Fine-tune the cross-encoder retriever on the gold facts of every record of the training sources'
    files (``retriever`` section; :func:`fingrpo.retrieval.train_cross_encoder`) -> ``prompt.retriever_dir``,
    rank every record the later stages show (``rankings.json`` beside the weights), and measure recall@k of
    the lexical and the trained retriever on every evaluation set -> ``retriever.summary_path`` (what
    ``prompt.retriever`` chooses between). With ``prompt.retriever: lexical`` nothing is trained: the folder
    only says so, and the summary holds the lexical figures."""
    from fingrpo.data.finqa import load_split
    from fingrpo.data.sources import eval_records, eval_sets, few_shot_records, train_sources
    from fingrpo.retrieval import LexicalRetriever, ranking_key, retrieval_recall, train_cross_encoder

    out_dir = Path(cfg.prompt.retriever_dir)
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    evaluated = {f"{es.split}.{es.name}": eval_records(cfg, es)[0] for es in eval_sets(cfg)}
    retriever, summary = None, None
    if cfg.prompt.retriever == "cross_encoder":
        sources = [r for s in train_sources(cfg) for r in load_split(s.path)]
        retriever, summary = train_cross_encoder(sources, cfg.retriever)
        retriever.save(out_dir)
        # rank what the later stages show once, now (every record of the training files, so GRPO's own pool,
        # train.train_sources, is ranked too); the time it takes is the retrieval cost per question
        to_rank = {ranking_key(r): r for r in [*few_shot_records(cfg), *sources,
                                                  *(r for recs in evaluated.values() for r in recs)]}
        started = time.perf_counter()
        n = retriever.save_rankings(out_dir, list(to_rank.values()))
        summary["ranked"] = n
        summary["seconds_per_question"] = (time.perf_counter() - started) / max(1, n)
    else:  # nothing to train; the folder (a dvc out) says so
        write_json_atomic(out_dir / "fingrpo_retriever.json", {"kind": "lexical"})
    sets = {}
    for name, recs in evaluated.items():
        sets[name] = {"lexical": retrieval_recall(recs, LexicalRetriever())}
        if retriever is not None:
            sets[name]["cross_encoder"] = retrieval_recall(recs, retriever)
    out = {"retriever": cfg.prompt.retriever, "training": summary, "output_dir": str(out_dir), "sets": sets}
    write_json_atomic(cfg.retriever.summary_path, out)
    write_headline(cfg, "retriever", out)
    for name, body in sets.items():
        log.info("retriever: %s recall@3 %s", name,
                 ", ".join(f"{kind} {(fig['recall_at_3'] or 0.0):.3f}" for kind, fig in body.items()))
    return out


def sft_stage(cfg: "Config") -> dict:
    """Supervised warm start on the train split's gold programs -> ``sft.output_dir`` (the LoRA GRPO
    starts from when ``train.init_adapter`` points there); the summary also goes to ``sft.summary_path``."""
    from fingrpo.sft import sft_from_config

    summary = sft_from_config(cfg)
    write_headline(cfg, "sft", summary)
    return summary


def train_stage(cfg: "Config", resume: bool = False, callbacks: Sequence[Any] = ()) -> dict:
    """GRPO + LoRA training, logged to MLflow when ``tracking.enabled``; returns the trainer's summary.

    The one place the MLflow callback is attached (the trainer never imports tracking). The tracking
    server is checked *before* the model loads, so an unreachable server fails in a second
    (:class:`fingrpo.errors.TrackingError`), not after an hour of training. The numeric part of the
    summary is also written to ``pipeline.train_summary_path`` (a ``dvc metrics`` file). Without
    ``resume`` the previous run's checkpoints are removed first (:func:`clear_checkpoints`). ``callbacks``:
    more trainer callbacks (:class:`fingrpo.grpo.trainer.TrainerCallback`), after the MLflow one.

    With ``train.launcher`` (``accelerate launch --num_processes 4``, ``torchrun --nproc_per_node 4``) and
    not already inside a launched process, the stage runs as ``<launcher> -m fingrpo train`` on this
    config instead (:func:`launch_train`): one process per device, and the summary is read back.
    """
    if cfg.train.launcher and "LOCAL_RANK" not in os.environ:
        return launch_train(cfg, resume=resume)
    from fingrpo.grpo import checkpoint, trainer

    callbacks = list(callbacks)
    if cfg.tracking.enabled:
        from fingrpo.tracking import runs

        runs.check_tracking(cfg)
        if not any(isinstance(cb, runs.MLflowCallback) for cb in callbacks):
            callbacks = runs.callbacks_from_config(cfg) + callbacks
    if not resume:
        clear_checkpoints(cfg.train.checkpoint_dir, checkpoint.CHECKPOINT_PREFIX)
    started = time.perf_counter()
    summary = dict(trainer.train_from_config(cfg, resume=resume, callbacks=callbacks) or {})
    metrics = _train_summary_metrics(summary)
    metrics.setdefault("wall_seconds", round(time.perf_counter() - started, 3))
    write_json_atomic(cfg.pipeline.train_summary_path, metrics)
    write_headline(cfg, "train", metrics)
    return summary


def launch_train(cfg: "Config", resume: bool = False) -> dict:
    """``<train.launcher> -m fingrpo train --params <this config>``: the resolved config goes to a private
    temp file (launched processes read exactly what this one resolved); returns the summary the main
    process wrote to ``pipeline.train_summary_path``. The processes' output (progress bars) goes to this
    process's terminal; a failed launch is a :class:`TrainingError`."""
    import yaml

    cmd = shlex.split(cfg.train.launcher or "") + ["-m", "fingrpo", "train"] + (["--resume"] if resume else [])
    with tempfile.TemporaryDirectory(prefix="fingrpo-launch-") as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        params.chmod(0o600)
        log.info("train: %s", " ".join(cmd))
        try:
            code = subprocess.run(cmd + ["--params", str(params)]).returncode
        except OSError as e:
            raise TrainingError(f"train.launcher {cfg.train.launcher!r}: cannot start it ({e})") from None
    if code != 0:
        raise TrainingError(f"train.launcher {cfg.train.launcher!r} exited {code} (its output is above)")
    return read_json(cfg.pipeline.train_summary_path)


def evaluate_stage(cfg: "Config", adapter_dir: str | None = None, base_only: bool = False,
                   base_stage: bool = False) -> dict:
    """Greedy evaluation (base vs adapter) -> ``evaluate.output_path``; logged to the training's MLflow run
    (``base_only``: the base model alone, not logged: there is no training run to log into).

    ``base_stage`` (the ``evaluate_base`` DVC stage, which no ``train.*`` or ``sft.*`` knob reaches): the
    base model alone into :func:`fingrpo.evaluate.base_cache_paths`, which the adapter's evaluation reuses
    for its base rows when they were made for the same prompts, records and settings; with
    ``evaluate.compare_base: false`` it only writes that nothing was evaluated."""
    from fingrpo.evaluate import evaluate_from_config

    if base_stage:
        from fingrpo.evaluate import base_cache_paths

        eval_path, pred_path = base_cache_paths(cfg)
        if not cfg.evaluate.compare_base:
            out = {"summary": {"skipped": "evaluate.compare_base is false: the base model is not evaluated"}}
            write_json_atomic(eval_path, out)
            pred_path.write_text("", encoding="utf-8")
            return out
        paths = {"output_path": str(eval_path), "predictions_path": str(pred_path)}
        return evaluate_from_config(cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update=paths)}),
                                    base_only=True)
    result = evaluate_from_config(cfg, adapter_dir=adapter_dir, base_only=base_only)
    if not base_only:  # an ad-hoc base-only evaluation leaves the pipeline's metrics alone
        write_headline(cfg, "eval", result)
    if cfg.tracking.enabled and not base_only:
        from fingrpo.tracking import runs

        runs.log_evaluation(cfg, result)
    return result


def plot_stage(cfg: "Config") -> list[Path]:
    """PNG plots (``pipeline.plots_dir``) from the training metrics and the evaluation; logged to MLflow."""
    from fingrpo.plots import plot_from_config

    paths = [Path(p) for p in plot_from_config(cfg, output_dir=cfg.pipeline.plots_dir)]
    if cfg.tracking.enabled:
        from fingrpo.tracking import runs

        runs.log_plots(cfg, paths)
    return paths


def pull_stage(cfg: "Config", root: str | Path = ".") -> dict:
    """``dvc pull data.dvc`` in ``root``: ``data/`` becomes the version the committed pointer names. A
    folder without a pointer (data given by path, no DVC) is left as it is. Returns what happened."""
    from fingrpo import lineage

    pointer = Path(root) / lineage.DATA_POINTER
    if not pointer.is_file():
        log.warning("no %s here: data is used as it is (no dvc pull)", pointer)
        return {"pulled": False, "pointer": None}
    lineage.pull_data(root)
    return {"pulled": True, "pointer": str(pointer), "data_md5": lineage.data_hash(pointer)}


def check_new_stage(cfg: "Config", force: bool = False, pull: bool = True) -> dict:
    """Retraining's first step: ``dvc pull`` the data version ``data.dvc`` names (``pull``), fingerprint
    the run (data hash, params hash, code hash) and look it up among the registered versions.
    ``result["new"]`` is False when that fingerprint was already trained (and not ``force``): the caller
    stops there. Writes ``<pipeline.reports_dir>/lineage.json``.
    """
    from fingrpo import lineage
    from fingrpo.tracking.client import Tracker

    return lineage.check_new(cfg, Tracker(cfg) if cfg.tracking.enabled else None, force=force, pull=pull)


def register_stage(cfg: "Config") -> dict:
    """Register the adapter as a new model version; move ``champion`` only if it beats the current one.

    Returns the decision (also written to ``register.output_path``). Needs tracking: registration is a
    registry operation, so ``tracking.enabled: false`` is a :class:`fingrpo.errors.ConfigError`.
    """
    if not cfg.tracking.enabled:
        raise ConfigError("register: promotion needs the MLflow registry, but tracking.enabled is false")
    from fingrpo.evaluate import evaluate_registered
    from fingrpo.tracking import registry

    # the gate measures the champion on this run's sets when it was measured on others
    champion_dir = Path(cfg.pipeline.reports_dir) / "champion_eval"
    decision = registry.register_from_config(cfg, evaluate_champion=lambda adapter, serving: evaluate_registered(
        cfg, adapter, serving, champion_dir))
    write_headline(cfg, "promotion", decision)
    return decision
