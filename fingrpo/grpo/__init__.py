"""fingrpo's GRPO: the loss (:mod:`fingrpo.grpo.loss`), shared-prompt rollouts and scoring
(:mod:`fingrpo.grpo.rollout`) and the training loop (:mod:`fingrpo.grpo.trainer`).

    from fingrpo.grpo import GRPOLoss, group_advantages, sample_groups, completion_logprobs

Names are resolved lazily, so importing the package does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GRPOLoss": "fingrpo.grpo.loss",
    "group_advantages": "fingrpo.grpo.loss",
    "zero_std_fraction": "fingrpo.grpo.loss",
    "Rollout": "fingrpo.grpo.rollout",
    "sample_groups": "fingrpo.grpo.rollout",
    "completion_logprobs": "fingrpo.grpo.rollout",
    "naive_completion_logprobs": "fingrpo.grpo.rollout",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fingrpo.grpo' has no attribute {name!r}")
