"""The seed's API: ``GRPOJSONTrainer(...).train(...)`` with custom parameters.

    python examples/json_trainer.py                                  # bundled SmolLM2, FinQA splits
    python examples/json_trainer.py --model path/to/hf-model --num-epochs 0.05 --out /tmp/ex

``num_epochs`` passes over the train split become GRPO steps of ``batch_size`` prompts each (the
trainer prints the arithmetic); every other setting comes from params.yaml's defaults or ``overrides``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, data_overrides, output_overrides  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--num-epochs", type=float, default=0.1, help="passes over the train split")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per GRPO step")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW peak learning rate")
    p.add_argument("--eval-interval", type=int, default=5, help="quick dev evaluation every N steps")
    p.add_argument("--save-interval", type=int, default=5, help="checkpoint every N steps")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt")
    p.add_argument("--tracking", action="store_true", help="log to MLflow ($MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    args = p.parse_args(argv)

    from fingrpo.seed import GRPOJSONTrainer

    data = Path(args.data_dir)
    overrides = output_overrides(args.out)
    overrides["train"].update(group_size=args.group_size, max_new_tokens=args.max_new_tokens, eval_subset_size=2)
    overrides["prompt"] = {"few_shot": args.few_shot, "max_prompt_tokens": args.max_prompt_tokens}
    overrides["data"] = {"provenance_path": data_overrides(data)["provenance_path"]}  # the splits: below
    overrides["tracking"]["enabled"] = args.tracking

    trainer = GRPOJSONTrainer(
        model_str=args.model,
        train_path=str(data / "train.json"),
        dev_path=str(data / "dev.json"),
        test_path=str(data / "test.json"),
        overrides=overrides,
    )
    summary = trainer.train(
        num_epochs=args.num_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        eval_interval=args.eval_interval,
        save_interval=args.save_interval,
    )
    print(json.dumps({"steps": summary["steps"], "first_reward_mean": summary["first_reward_mean"],
                      "final_reward_mean": summary["final_metrics"].get("reward_mean"),
                      "adapter": summary["output_dir"], "checkpoint": summary["checkpoint"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
