"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: a few GRPO steps of the tiny
model on CPU (gloo), data split across the processes; each rank saves its final LoRA weights and the
prompts it saw, so the test can check identical weights and disjoint data.

    torchrun --nproc_per_node 2 tests/dist_train_helper.py <tiny model dir> <out dir>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(model_dir: str, out_dir: str) -> None:
    import torch
    from accelerate import Accelerator
    from peft import get_peft_model_state_dict
    from transformers import set_seed

    from fingrpo.config import load_config
    from fingrpo.grpo.trainer import GRPOTrainer
    from fingrpo.model import add_lora, load_model_and_tokenizer
    from fingrpo.rewards import RewardFunction

    torch.set_num_threads(1)
    out = Path(out_dir)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    seen: list[str] = []

    class CharFraction(RewardFunction):
        name = "char_fraction"

        def __call__(self, prompt, completion, target=None):
            seen.append(prompt)
            return completion.count("a") / max(1, len(completion))

    cfg = load_config(None, {
        "model": {"name_or_path": model_dir},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]},
        "prompt": {"use_chat_template": False, "few_shot": 0},
        "train": {"max_steps": 3, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 6,
                  "learning_rate": 2e-2, "warmup_steps": 0, "beta": 0.04, "save_interval": 2, "seed": 0,
                  "output_dir": str(out / "adapter"), "checkpoint_dir": str(out / "ckpt"),
                  "metrics_path": str(out / "metrics.csv"), "rollout_rewards_path": str(out / "rollout.jsonl")},
        "tracking": {"enabled": False},
    })
    model, tok = load_model_and_tokenizer(cfg.model)
    set_seed(cfg.train.seed)
    policy = add_lora(model, cfg.lora)
    initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(policy).items()}
    prompts = [f"question {i}: " for i in range(12)]
    trainer = GRPOTrainer(policy, tok, [CharFraction()], prompts, [], cfg, accelerator=accelerator)
    summary = trainer.train()
    final = {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    torch.save({"initial": initial, "final": final}, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "prompts": sorted(set(seen)), "num_processes": summary["num_processes"], "steps": summary["steps"],
        "reward_mean": summary["final_metrics"]["reward_mean"],
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
