"""Prefect flow ``retrain``: pull -> prepare -> validate -> check-new -> retriever -> sft -> train -> (evaluate-base) -> evaluate -> plot -> register, for scheduled retraining.

Each task calls one stage function of :mod:`fingrpo.pipeline` (the same ones ``dvc repro`` runs
through the ``fingrpo`` CLI) and has no logic of its own. Run it once, in-process::

    python flows/retrain.py                                     # params.yaml as it is
    python flows/retrain.py --set train.max_steps=2 --set evaluate.max_records=8

    from flows.retrain import retrain                           # from Python
    retrain(overrides={"train.max_steps": 2}, resume=False)

or on a cron schedule against a Prefect server (``flows/deploy.py``, README "Scheduled retraining").

Why it is shaped like this:
- ``pull`` comes first (``dvc pull`` brings ``data/`` to the version ``data.dvc`` names), then the data
  is prepared and validated, then ``check-new`` looks the run's fingerprint (data hash, params hash,
  code hash: :mod:`fingrpo.lineage`) up among the registered versions: when it was trained already the
  run ends Completed as "nothing new" (an artifact says so; nothing is trained or registered).
  ``force=True`` retrains anyway. Validation comes before the lookup so bad data is reported (and
  nothing else written) whatever the registry holds.
- Bad data ends the run after ``validate`` as a Failed state whose message names the file, rule and
  record (calling the flow raises that ``DataError``); nothing is trained or registered.
- Promotion is the last task and the tasks are called (not submitted), so any failure raises and
  ends the flow before ``register``: a failed run never moves the ``champion`` alias.
- Tasks that talk to MLflow retry (``retries=2``) after a delay, but only on tracking/connection
  errors: a data error or a diverging training would fail the same way again.
- ``cache_policy=NONE`` everywhere: stages write files and registry entries (caching their results
  would skip real work), and their inputs (a config, result dicts) are not worth hashing.
- A markdown artifact summarises each run (metrics table, promotion decision) in the Prefect UI.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from fingrpo import pipeline
from fingrpo.errors import DataError, FingrpoError, TrackingError
from fingrpo.tracking.client import is_transient_tracking_error
from fingrpo.config import Config, dotted_items, load_config, parse_overrides, set_dotted

# Seconds between retries of tracking-touching tasks (a restarting MLflow server needs ~5-30 s).
RETRY_DELAY_S = float(os.environ.get("FINGRPO_RETRY_DELAY_S", "20"))
RETRIES = 2


def _is_transient(task, task_run, state) -> bool:
    """Retry only failures a second attempt can fix: tracking server / network trouble."""
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # pragma: no cover - unreadable result: do not retry blindly
            return False
    if isinstance(exc, (TrackingError, ConnectionError, TimeoutError)):
        return True
    # MLflow's own errors: the tracking module's classification (unavailable server, locked SQLite, ...)
    return isinstance(exc, Exception) and is_transient_tracking_error(exc)


_TRACKED = dict(
    cache_policy=NONE, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_is_transient
)


@task(name="pull", cache_policy=NONE)
def pull_task(cfg: Config) -> dict:
    return pipeline.pull_stage(cfg)


@task(name="check-new", **_TRACKED)
def check_new_task(cfg: Config, force: bool = False, pull: bool = True) -> dict:
    return pipeline.check_new_stage(cfg, force=force, pull=pull)


@task(name="prepare", cache_policy=NONE)
def prepare_task(cfg: Config) -> dict:
    return pipeline.prepare_stage(cfg)


@task(name="validate", cache_policy=NONE)
def validate_task(cfg: Config) -> int:
    """The exit code of the validation (0: valid). Bad data is not an exception here: the flow turns it
    into a Failed state naming the file, rule and record, without an engine traceback."""
    return pipeline.validate_stage(cfg)


@task(name="retriever", cache_policy=NONE)
def retriever_task(cfg: Config) -> dict:
    return pipeline.retriever_stage(cfg)


@task(name="sft", cache_policy=NONE)
def sft_task(cfg: Config) -> dict:
    return pipeline.sft_stage(cfg)


@task(name="train", **_TRACKED)
def train_task(cfg: Config, resume: bool = False) -> dict:
    return pipeline.train_stage(cfg, resume=resume)


@task(name="evaluate-base", **_TRACKED)
def evaluate_base_task(cfg: Config) -> dict:
    return pipeline.evaluate_stage(cfg, base_stage=True)


@task(name="evaluate", **_TRACKED)
def evaluate_task(cfg: Config) -> dict:
    return pipeline.evaluate_stage(cfg)


@task(name="plot", **_TRACKED)
def plot_task(cfg: Config) -> list[str]:
    return [str(p) for p in pipeline.plot_stage(cfg)]


@task(name="register", **_TRACKED)
def register_task(cfg: Config) -> dict:
    return pipeline.register_stage(cfg)


def normalize_overrides(overrides: dict | list | None) -> dict:
    """Flow parameter -> nested override dict. Accepts dotted keys, nested dicts, or ``k=v`` strings.

    >>> normalize_overrides({"train.max_steps": 2, "evaluate": {"max_records": 4}})
    {'train': {'max_steps': 2}, 'evaluate': {'max_records': 4}}
    >>> normalize_overrides(["train.max_steps=3"])
    {'train': {'max_steps': 3}}
    """
    if not overrides:
        return {}
    if isinstance(overrides, (list, tuple)):
        return parse_overrides(list(overrides))
    tree: dict = {}
    for key, value in overrides.items():
        set_dotted(tree, str(key), value)
    return tree


def _numeric_leaves(obj: Any) -> list[tuple[str, float]]:
    """``{"dev": {"adapter": {"execution_accuracy": 0.2}}}`` -> ``[("dev.adapter.execution_accuracy", 0.2)]``."""
    return [(k, float(v)) for k, v in dotted_items(obj) if isinstance(v, (int, float)) and not isinstance(v, bool)]


def summary_markdown(train: dict, evaluation: dict, plots: list[str], promotion: dict) -> str:
    """The run's markdown artifact: headline metrics, the promotion decision, the files written."""
    lines = ["# fingrpo retrain", "", "## Evaluation", "", "| metric | value |", "|---|---|"]
    def interesting(key: str) -> bool:  # accuracies, format rate, reward totals, record counts
        leaf = key.rsplit(".", 1)[-1]
        return leaf.endswith("accuracy") or leaf in ("n", "format_rate") or leaf.startswith("reward_total")

    rows = [(k, v) for k, v in _numeric_leaves(evaluation) if interesting(k) and not k.startswith("summary.")]
    for key, value in rows[:40]:
        lines.append(f"| `{key}` | {value:.4g} |")
    lines += ["", "## Training", "", "| metric | value |", "|---|---|"]
    for key, value in _numeric_leaves(train)[:20]:
        lines.append(f"| `{key}` | {value:.4g} |")
    lines += ["", "## Promotion", "", "| field | value |", "|---|---|"]
    for key, value in promotion.items():
        if isinstance(value, dict):  # challenger / previous_champion / champion: version and value
            lines += [f"| {key}.{k} | {v} |" for k, v in value.items() if not isinstance(v, (dict, list))]
        elif not isinstance(value, list):
            lines.append(f"| {key} | {value} |")
    for side in ("challenger", "champion"):  # the figures the gate compared, and the set each came from
        fig = promotion.get("gate", {}).get(side)
        if isinstance(fig, dict):
            lines.append(f"| gate: {side} | {fig.get('value'):.4g} on {fig.get('set')} |")
    lines += ["", "## Plots", ""] + [f"- `{p}`" for p in plots]
    return "\n".join(lines) + "\n"


def nothing_new_markdown(lineage: dict) -> str:
    """The artifact of a run that found nothing new to train."""
    parts = lineage["parts"]
    lines = ["# fingrpo retrain: nothing new", "", lineage["reason"], "", "| part | value |", "|---|---|",
             f"| fingerprint | `{lineage['fingerprint']}` |"]
    lines += [f"| {k} | `{v}` |" for k, v in parts.items()]
    lines += [f"| trained as | {lineage['model_name']} v{v['version']} {' '.join(v['aliases'])} |" for v in lineage["trained_as"]]
    return "\n".join(lines) + "\n\nRun with `force=True` (`--force`) to retrain anyway.\n"


@flow(name="retrain", log_prints=True)
def retrain(params_path: str = "params.yaml", overrides: dict | None = None, resume: bool = False,
            force: bool = False, pull: bool = True) -> dict:
    """Bring ``data/`` to the version ``data.dvc`` names, prepare the TAT-QA splits (when the config uses
    them) and validate the data; stop as "nothing new" when this data, params and code were already
    trained (unless ``force``); else train the retriever (``prompt.retriever: cross_encoder``), warm-start
    (sft, when ``train.init_adapter`` is set), train with
    GRPO, evaluate, plot, and register the adapter (champion only if the gate says so).

    ``overrides`` replace params.yaml values for this run: ``{"train.max_steps": 2}`` or nested.
    ``pull=False`` fingerprints ``data/`` as it is (no ``dvc pull``).
    """
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    cfg = load_config(params_path, normalize_overrides(overrides))
    logger.info("config: %s", cfg.public_dump())

    if pull:
        pull_task(cfg)
    if pipeline.needs_prepare(cfg):  # a training source or evaluation set is a prepared TAT-QA file
        prepare_task(cfg)
    if validate_task(cfg) != 0:
        from prefect.states import Failed

        message = pipeline.validation_failure_message(Path(cfg.pipeline.reports_dir) / "validation.json")
        logger.error(message)
        return Failed(message=message, data=DataError(message))  # calling the flow raises this DataError

    lineage = check_new_task(cfg, force=force, pull=False)
    logger.info("%s", lineage["reason"])
    if not lineage["new"]:
        create_markdown_artifact(markdown=nothing_new_markdown(lineage), key="fingrpo-retrain-summary",
                                 description="fingrpo retrain: nothing new")
        return {"status": "nothing new", "lineage": lineage}

    # the cross-encoder retriever (prompt.retriever: cross_encoder) ranks the facts every later stage shows
    if cfg.prompt.retriever != "lexical" and not (resume and Path(cfg.prompt.retriever_dir, "head.safetensors").is_file()):
        retriever_task(cfg)
    warm_start = cfg.train.init_adapter
    # the warm start runs unless a resumed run already has it (the checkpoints hold the adapter)
    if warm_start and not (resume and Path(warm_start, "adapter_model.safetensors").is_file()):
        sft_task(cfg)
    train = train_task(cfg, resume=resume)
    if cfg.evaluate.compare_base:  # the base model's rows: reused from an earlier run when they still match
        evaluate_base_task(cfg)
    evaluation = evaluate_task(cfg)
    plots = plot_task(cfg)
    promotion = register_task(cfg)  # last: reached only if every stage above succeeded

    create_markdown_artifact(
        markdown=summary_markdown(train, evaluation, plots, promotion),
        key="fingrpo-retrain-summary",
        description="fingrpo retrain: metrics and promotion decision",
    )
    return {"status": "trained", "lineage": lineage, "train": train, "evaluation": evaluation, "plots": plots,
            "promotion": promotion}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the retrain flow once, in-process.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="continue training from the last checkpoint")
    parser.add_argument("--force", action="store_true", help="retrain even if this data, params and code were trained")
    parser.add_argument("--no-pull", action="store_true", help="use data/ as it is (no `dvc pull data.dvc`)")
    args = parser.parse_args(argv)
    try:
        retrain(params_path=args.params, overrides=parse_overrides(args.overrides), resume=args.resume,
                force=args.force, pull=not args.no_pull)
    except FingrpoError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
