"""fingrpo: GRPO + LoRA fine-tuning of causal language models on FinQA.

Heavy dependencies (torch, transformers, peft, great_expectations, mlflow, prefect) are imported
inside the functions that need them, so ``import fingrpo`` and ``fingrpo --help`` stay fast.
The seed's public names are re-exported lazily::

    from fingrpo import FinancialJSONDataLoader, RewardFunction, GRPOJSONTrainer
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "FinancialJSONDataLoader": "fingrpo.seed",
    "FinQARecord": "fingrpo.data.finqa",
    "RewardFunction": "fingrpo.rewards",
    "FinancialQAReward": "fingrpo.rewards",
    "GRPOLoss": "fingrpo.grpo.loss",
    "GRPOTrainer": "fingrpo.grpo.trainer",
    "GRPOJSONTrainer": "fingrpo.seed",
    "load_config": "fingrpo.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fingrpo' has no attribute {name!r}")
