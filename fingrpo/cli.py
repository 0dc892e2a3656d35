"""The ``fingrpo`` command: one sub-command per pipeline stage (what ``dvc.yaml`` runs).

    fingrpo prepare [--input data/tatqa/tatqa_dataset_dev.json --output-dir prepared]
    fingrpo validate [FILE ...]
    fingrpo retriever [--set retriever.epochs=1]
    fingrpo sft [--set sft.epochs=4]
    fingrpo train [--set train.max_steps=2] [--resume]
    fingrpo evaluate
    fingrpo plot
    fingrpo register
    fingrpo check-new [--force] [--no-pull]   # exit 3: nothing new since the last registered version
    fingrpo score --predictions preds.json --data data/finqa/test.json
    fingrpo results results/recipe results/control-random --output docs/results

Each handler builds the config (params.yaml + ``--set`` overrides) and calls one stage function of
:mod:`fingrpo.pipeline` (the same functions the Prefect flow's tasks call); errors a user can act on
(:class:`fingrpo.errors.FingrpoError`) are printed on one line and exit with code 2. Heavy libraries
(torch, mlflow, ...) are imported by the stage functions when a stage runs, so ``fingrpo --help``
answers fast (``tests/test_cli.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fingrpo import __version__, pipeline
from fingrpo.config import load_config, parse_overrides
from fingrpo.errors import FingrpoError
from fingrpo.lineage import NOTHING_NEW_EXIT
from fingrpo.results import write_results
from fingrpo.scoring import score_files

# Offline and quiet by default (ENVIRONMENT.md); a user's own settings win.
_DEFAULT_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def _config(args, extra: dict | None = None):
    overrides = parse_overrides(args.overrides)
    for section, values in (extra or {}).items():
        overrides.setdefault(section, {}).update(values)
    return load_config(args.params, overrides)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_validate(args) -> int:
    extra: dict = {}
    if args.report_dir is not None:
        extra["reports_dir"] = args.report_dir
    if args.no_data_docs:
        extra["data_docs"] = False
    return pipeline.validate_stage(_config(args, {"pipeline": extra}), files=args.files or None)


def cmd_prepare(args) -> int:
    _print_json(pipeline.prepare_stage(_config(args), input_path=args.input, output_dir=args.output_dir,
                                       report_path=args.report))
    return 0


def cmd_score(args) -> int:
    result = score_files(args.predictions, args.data)
    _print_json(result)
    if "tatqa" in result:  # the official evaluator's figures, as it prints them (stdout stays JSON)
        t = result["tatqa"]
        print(f"TAT-QA: Exact-match accuracy {t['exact_match']:.2f}, F1 score {t['f1']:.2f} "
              f"({t['n']} gold questions, {t['predicted']} predicted)", file=sys.stderr)
    return 0


def cmd_retriever(args) -> int:
    _print_json(pipeline.retriever_stage(_config(args)))
    return 0


def cmd_sft(args) -> int:
    _print_json(pipeline.sft_stage(_config(args)))
    return 0


def cmd_train(args) -> int:
    _print_json(pipeline.train_stage(_config(args), resume=args.resume))
    return 0


def cmd_evaluate(args) -> int:
    result = pipeline.evaluate_stage(_config(args), adapter_dir=args.adapter, base_only=args.base_only,
                                     base_stage=args.base_stage)
    _print_json(result.get("summary", result) if isinstance(result, dict) else result)
    return 0


def cmd_plot(args) -> int:
    for path in pipeline.plot_stage(_config(args)):
        print(path)
    return 0


def cmd_register(args) -> int:
    _print_json(pipeline.register_stage(_config(args)))
    return 0


def cmd_check_new(args) -> int:
    result = pipeline.check_new_stage(_config(args), force=args.force, pull=not args.no_pull)
    print(result["reason"] + f" (fingerprint {result['fingerprint'][:12]})")
    return 0 if result["new"] else NOTHING_NEW_EXIT


def cmd_results(args) -> int:
    for path in write_results(args.runs, args.output):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a params.yaml value, e.g. --set train.learning_rate=1e-4 (repeatable)",
    )
    parser = argparse.ArgumentParser(prog="fingrpo", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"fingrpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", parents=[common], help="TAT-QA -> FinQA-shaped train/dev files split by table (params: prepare)")
    p.add_argument("--input", default=None, help="a file in the TAT-QA format (default: prepare.input_path)")
    p.add_argument("--output-dir", default=None, help="where tatqa_train.json / tatqa_dev.json go (default: prepare.output_dir)")
    p.add_argument("--report", default=None, help="the conversion report (default: prepare.report_path, or OUTPUT_DIR/prepare.json)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("validate", parents=[common], help="Great Expectations + program re-execution checks on FinQA splits")
    p.add_argument("files", nargs="*", help="FinQA JSON files (default: the data section's three splits)")
    p.add_argument("--report-dir", default=None, help="where validation.json and the data docs go (default: pipeline.reports_dir)")
    p.add_argument("--no-data-docs", action="store_true", help="skip the Great Expectations HTML data docs")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("score", parents=[common], help="score a predictions file (FinQA and TAT-QA official rules)")
    p.add_argument("--predictions", required=True, help="official FinQA or TAT-QA predictions JSON, or fingrpo predictions JSONL")
    p.add_argument("--data", required=True, help="FinQA JSON split, a TAT-QA file, or a prepared TAT-QA split")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("retriever", parents=[common],
                       help="fine-tune the cross-encoder retriever on the training pool's gold facts (params: retriever)")
    p.set_defaults(func=cmd_retriever)
    p = sub.add_parser("sft", parents=[common], help="supervised warm start on the gold programs (params: sft, prompt, lora)")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("train", parents=[common], help="GRPO + LoRA training (params: train, rewards, model, lora, prompt)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.checkpoint_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[common], help="greedy generation + execution/program accuracy, base vs adapter")
    p.add_argument("--adapter", default=None, help="adapter folder (default: train.output_dir)")
    p.add_argument("--base-only", action="store_true", help="evaluate the base model alone (no adapter needed)")
    p.add_argument("--base-stage", action="store_true",
                   help="the base model alone into reports/eval_base.json + predictions_base.jsonl (the evaluate_base "
                        "stage; `fingrpo evaluate` reuses them when prompts, records and settings match)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plot", parents=[common], help="PNG plots from the training metrics and the evaluation")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("results", help="compare runs: table, learning curves and samples (docs/results.md)")
    p.add_argument("runs", nargs="+", help="run folders, each with eval.json (+ train_metrics.csv, predictions.jsonl)")
    p.add_argument("--output", default="docs/results", help="where table.md, learning_curves.png, samples.md go")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("register", parents=[common], help="register the adapter as a new model version; move 'champion' if it beats the current one")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("check-new", parents=[common],
                       help=f"dvc pull data.dvc, then exit {NOTHING_NEW_EXIT} if a registered version was already trained "
                            "from this data, params and code (`fingrpo check-new && dvc repro`)")
    p.add_argument("--force", action="store_true", help="count the run as new even when its fingerprint was trained")
    p.add_argument("--no-pull", action="store_true", help="fingerprint data/ as it is (no `dvc pull`)")
    p.set_defaults(func=cmd_check_new)
    return parser


def main(argv: list[str] | None = None) -> int:
    for key, value in _DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FingrpoError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
