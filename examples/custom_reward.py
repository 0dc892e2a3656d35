"""Train with your own reward: subclass ``RewardFunction``, register it by name, weight it in the config.

    python examples/custom_reward.py                                # bundled SmolLM2, 4 GRPO steps
    python examples/custom_reward.py --model path/to/hf-model --steps 2 --out /tmp/ex

A reward is a small pure function of (prompt, completion, target) -> float that never raises on a
garbage completion. Registering the class in ``REWARD_REGISTRY`` makes the name usable anywhere a
``rewards.weights`` mapping is read (params.yaml, ``--set``, this script's overrides); the trainer then
logs its mean per step as ``reward/<name>_mean`` beside the built-in ones.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, data_overrides, output_overrides  # noqa: E402

from fingrpo.rewards import REWARD_REGISTRY, RewardFunction  # noqa: E402


class ConciseAnswerReward(RewardFunction):
    """1.0 for a completion with an ``Answer:`` line in at most ``max_words`` words; less when longer.

    >>> r = ConciseAnswerReward(max_words=8)
    >>> r("q", "Program: add(1, 2)\\nAnswer: 3")
    1.0
    >>> r("q", "I think the answer might be three, or maybe not")
    0.0
    """

    name = "concise_answer"

    def __init__(self, max_words: int = 40) -> None:
        self.max_words = max_words

    def __call__(self, prompt: str, completion: str, target=None) -> float:
        if not isinstance(completion, str):
            return 0.0
        if re.search(r"^\s*Answer:", completion, flags=re.MULTILINE) is None:
            return 0.0  # no answer line at all: brevity alone earns nothing
        words = len(completion.split())
        if words <= self.max_words:
            return 1.0
        return max(0.0, 1.0 - (words - self.max_words) / self.max_words)

    @classmethod
    def from_config(cls, rewards_cfg) -> "ConciseAnswerReward":
        return cls()


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="GRPO steps")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt")
    p.add_argument("--weight", type=float, default=0.2, help="weight of the custom reward in the total")
    args = p.parse_args(argv)

    from fingrpo.config import load_config
    from fingrpo.grpo.trainer import train_from_config

    # 1. make the name known (one explicit map, no plugin magic)
    REWARD_REGISTRY[ConciseAnswerReward.name] = ConciseAnswerReward

    # 2. weight it beside the built-in rewards
    data = Path(args.data_dir)
    overrides = output_overrides(args.out)
    overrides.update(
        data=data_overrides(data),
        model={"name_or_path": args.model},
        prompt={"few_shot": args.few_shot, "max_prompt_tokens": args.max_prompt_tokens},
        rewards={"weights": {"correctness": 1.0, "format": 0.2, ConciseAnswerReward.name: args.weight}},
    )
    overrides["train"].update(max_steps=args.steps, group_size=args.group_size, prompts_per_step=2,
                              max_new_tokens=args.max_new_tokens, warmup_steps=0, eval_interval=args.steps,
                              eval_subset_size=2, save_interval=args.steps)
    overrides["tracking"]["enabled"] = False  # an example: no MLflow run
    cfg = load_config(None, overrides)

    # 3. train; the custom reward is scored on every completion and logged per step
    summary = train_from_config(cfg)
    final = summary["final_metrics"]
    print(json.dumps({k: v for k, v in final.items() if k.startswith("reward")}, indent=2))
    print(f"adapter: {summary['output_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
