"""The ``fingrpo`` command: one sub-command per pipeline stage (what ``dvc.yaml`` runs).

    fingrpo validate data/finqa/train.json data/finqa/dev.json data/finqa/test.json
    fingrpo train [--set train.max_steps=2] [--resume]
    fingrpo evaluate
    fingrpo plot
    fingrpo promote
    fingrpo score --predictions preds.json --data data/finqa/test.json

Each handler reads its inputs, calls one library function and writes its outputs; errors a user can
act on (:class:`fingrpo.errors.FingrpoError`) are printed on one line and give a non-zero exit code.
Heavy libraries are imported inside the handlers so ``fingrpo --help`` answers fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fingrpo.errors import FingrpoError

# Offline and quiet by default (ENVIRONMENT.md); a user's own settings win.
_DEFAULT_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def _config(args):
    from fingrpo.config import load_config

    return load_config(args.params, args.overrides)


def cmd_validate(args) -> int:
    from fingrpo.data.validate import run_validation

    cfg = _config(args)
    files = args.files or [cfg.data.train_path, cfg.data.dev_path, cfg.data.test_path]
    return run_validation(files, report_dir=args.report_dir, data_docs=not args.no_data_docs)


def cmd_score(args) -> int:
    from fingrpo.evaluate import score_files

    result = score_files(args.predictions, args.data)
    print(json.dumps(result, indent=2))
    return 0


def cmd_train(args) -> int:
    from fingrpo.grpo.trainer import train_from_config

    summary = train_from_config(_config(args), resume=args.resume)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_evaluate(args) -> int:
    from fingrpo.evaluate import evaluate_from_config

    result = evaluate_from_config(_config(args), adapter_dir=args.adapter)
    print(json.dumps(result.get("summary", result), indent=2, default=str))
    return 0


def cmd_plot(args) -> int:
    from fingrpo.plots import plot_from_config

    for path in plot_from_config(_config(args)):
        print(path)
    return 0


def cmd_promote(args) -> int:
    from fingrpo.tracking import promote_from_config

    decision = promote_from_config(_config(args))
    print(json.dumps(decision, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a params.yaml value, e.g. --set train.learning_rate=1e-4 (repeatable)",
    )
    parser = argparse.ArgumentParser(prog="fingrpo", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"fingrpo {__import__('fingrpo').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", parents=[common], help="Great Expectations + program re-execution checks on FinQA splits")
    p.add_argument("files", nargs="*", help="FinQA JSON files (default: the data section's three splits)")
    p.add_argument("--report-dir", default="reports", help="where validation.json and the data docs go")
    p.add_argument("--no-data-docs", action="store_true", help="skip the Great Expectations HTML data docs")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("score", parents=[common], help="score a predictions file against FinQA records")
    p.add_argument("--predictions", required=True, help="official FinQA predictions JSON or fingrpo predictions JSONL")
    p.add_argument("--data", required=True, help="FinQA JSON split with the gold programs and exe_ans")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("train", parents=[common], help="GRPO + LoRA training (params: train, rewards, model, lora, prompt)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.checkpoint_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[common], help="greedy generation + execution/program accuracy, base vs adapter")
    p.add_argument("--adapter", default=None, help="adapter folder (default: train.output_dir)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plot", parents=[common], help="PNG plots from the training metrics and the evaluation")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("promote", parents=[common], help="register the adapter; move 'champion' if it beats the current one")
    p.set_defaults(func=cmd_promote)
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
