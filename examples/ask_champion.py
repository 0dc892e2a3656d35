"""Load the promoted model from the MLflow registry and ask it a FinQA question.

    python examples/ask_champion.py                      # models:/fingrpo-finqa@champion on a dev record
    python examples/ask_champion.py --question "what was the percentage change in revenue?" \\
        --table '[["", "2019", "2018"], ["revenue", "150", "120"]]'
    python examples/ask_champion.py --train-if-missing --model path/to/hf-model --out /tmp/ex
                                                         # no champion yet: a short train -> evaluate -> promote

The registry is MLflow's (``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` as in the pipeline);
``dvc repro`` or the Prefect flow put the ``champion`` alias on the best version. The registered model
is a pyfunc holding the LoRA adapter and the prompt settings; it loads its base model by name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, data_overrides, output_overrides  # noqa: E402


def champion_version(cfg) -> str | None:
    """The version number under alias ``champion``, or None when the model/alias does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from fingrpo.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        return str(client.get_model_version_by_alias(cfg.register.model_name, "champion").version)
    except MlflowException:
        return None


def quick_promote(cfg) -> dict:
    """train -> evaluate -> promote with the pipeline's own stage functions (what dvc/Prefect run)."""
    from fingrpo import pipeline

    pipeline.train_stage(cfg)
    pipeline.evaluate_stage(cfg)
    return pipeline.register_stage(cfg)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--model-name", default="fingrpo-finqa", help="registered model name")
    p.add_argument("--question", default=None, help="your question (default: the first dev record's)")
    p.add_argument("--table", default=None, help="the table as JSON rows (with --question)")
    p.add_argument("--text", default=None, help="report text before the table (with --question)")
    p.add_argument("--train-if-missing", action="store_true",
                   help="no champion yet: run a short train/evaluate/promote on --model first")
    p.add_argument("--steps", type=int, default=2, help="GRPO steps of --train-if-missing")
    args = p.parse_args(argv)

    import mlflow
    import pandas as pd

    from fingrpo.config import load_config
    from fingrpo.errors import FingrpoError

    data = Path(args.data_dir)
    overrides = output_overrides(args.out)
    overrides.update(
        data=data_overrides(data),
        model={"name_or_path": args.model},
        prompt={"few_shot": args.few_shot, "max_prompt_tokens": args.max_prompt_tokens},
        register={**overrides["register"], "model_name": args.model_name},
        evaluate={**overrides["evaluate"], "max_records": 2, "batch_size": 2, "compare_base": False,
                  "max_new_tokens": args.max_new_tokens, "bootstrap_samples": 10},
    )
    overrides["train"].update(max_steps=args.steps, group_size=2, prompts_per_step=1, warmup_steps=0,
                              max_new_tokens=args.max_new_tokens, eval_interval=args.steps, eval_subset_size=2,
                              save_interval=args.steps)
    try:
        cfg = load_config(None, overrides)
        version = champion_version(cfg)
        if version is None:
            if not args.train_if_missing:
                print(f"error: no 'champion' version of {args.model_name!r} in the registry: run `dvc repro` "
                      "(or `fingrpo register`), or pass --train-if-missing", file=sys.stderr)
                return 2
            decision = quick_promote(cfg)
            print(f"registered version {decision['challenger']['version']}: {decision['decision']}")
            version = champion_version(cfg)
    except FingrpoError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code

    # the served model: exactly what a deployment would load
    from fingrpo.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(cfg))
    model = mlflow.pyfunc.load_model(f"models:/{args.model_name}@champion")

    if args.question:
        row = {"id": "question", "question": args.question, "pre_text": [args.text] if args.text else [],
               "post_text": [], "table": json.loads(args.table) if args.table else []}
        gold = None
    else:
        record = json.loads((data / "dev.json").read_text(encoding="utf-8"))[0]
        row = {"id": record["id"], "question": record["qa"]["question"], "pre_text": record["pre_text"],
               "post_text": record["post_text"], "table": record["table"], "gold_inds": record["qa"].get("gold_inds")}
        gold = record["qa"]["exe_ans"]
    answer = model.predict(pd.DataFrame([row])).iloc[0].to_dict()
    print(f"champion: models:/{args.model_name}@champion (version {version})")
    print(f"question: {row['question']}")
    print(f"completion: {answer['completion']!r}")
    print(f"program: {answer.get('program')}  answer: {answer.get('answer')}  executed: {answer.get('value')}")
    if gold is not None:
        print(f"gold exe_ans: {gold}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
