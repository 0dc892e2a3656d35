"""Which training prompts a GRPO step samples: difficulty-aware choice from a running per-prompt pass rate.

A group carries a learning signal only when its completions disagree. A prompt the policy always solves
(pass rate 1) or never solves (pass rate 0) gives G equal rewards and zero advantage, so the sampler
prefers prompts whose running pass rate is strictly between 0 and 1::

    sampler = DifficultySampler(num_prompts=675, seed=0, floor=0.1, ema=0.5)
    idx = sampler.choose(4, step=1)                 # 4 distinct prompt indices
    sampler.update(idx[0], correct=3, attempts=8)    # after the group is scored
    state = sampler.state_dict(); sampler.load_state_dict(state)   # in the checkpoint

Weight of a prompt (drawn without replacement, proportionally):

    unseen                w = 1                                  (exploration: as good as p = 1/2)
    seen, pass rate p     w = floor + (1 − floor) · 4 p (1 − p)  (1 at p = 1/2, ``floor`` at p ∈ {0, 1})

p is an exponential moving average over the prompt's visits (``p ← (1 − ema)·p + ema·c/G``; the first
visit sets it). The draw is seeded by (seed, step, round) and depends only on the state, so a resumed run
(state restored from the checkpoint) makes the same choices as an uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Iterable


class DifficultySampler:
    """Running pass rates per prompt index and a weighted draw that prefers prompts with 0 < p < 1."""

    def __init__(self, num_prompts: int, seed: int = 0, floor: float = 0.1, ema: float = 0.5) -> None:
        if num_prompts < 1:
            raise ValueError("DifficultySampler needs at least one prompt")
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"floor must be in (0, 1], got {floor}")
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        self.num_prompts, self.seed, self.floor, self.ema = num_prompts, seed, floor, ema
        self.pass_rate: dict[int, float] = {}
        self.visits: dict[int, int] = {}

    def weight(self, index: int) -> float:
        """The draw weight of prompt ``index`` (module docstring).

        >>> s = DifficultySampler(3, floor=0.1)
        >>> s.update(0, correct=8, attempts=8); s.update(1, correct=4, attempts=8)
        >>> s.weight(0), s.weight(1), s.weight(2)
        (0.1, 1.0, 1.0)
        """
        p = self.pass_rate.get(index)
        if p is None:
            return 1.0
        return self.floor + (1.0 - self.floor) * 4.0 * p * (1.0 - p)

    def choose(self, n: int, step: int, round_: int = 0, exclude: Iterable[int] = ()) -> list[int]:
        """``n`` distinct indices (fewer only if fewer than ``n`` remain outside ``exclude``), drawn
        without replacement with probability proportional to :meth:`weight` (Efraimidis–Spirakis keys)."""
        rng = random.Random(f"{self.seed}-difficulty-{step}-{round_}")
        excluded = set(exclude)
        keys = []
        for i in range(self.num_prompts):
            u = rng.random()  # drawn for every index, so the stream does not depend on the exclusions
            if i not in excluded:
                keys.append((u ** (1.0 / self.weight(i)), i))
        keys.sort(reverse=True)
        return [i for _, i in keys[:n]]

    def update(self, index: int, correct: int, attempts: int) -> None:
        """Fold one scored group (``correct`` of ``attempts`` completions right) into the pass rate."""
        if attempts <= 0:
            return
        rate = correct / attempts
        old = self.pass_rate.get(index)
        self.pass_rate[index] = rate if old is None else (1.0 - self.ema) * old + self.ema * rate
        self.visits[index] = self.visits.get(index, 0) + 1

    def summary(self) -> dict[str, float]:
        """Share of prompts seen, and of the seen ones the shares at p = 0, 0 < p < 1 and p = 1."""
        seen = list(self.pass_rate.values())
        n = len(seen)
        return {
            "sampler/seen_fraction": n / self.num_prompts,
            "sampler/unsolved_fraction": sum(p == 0.0 for p in seen) / n if n else float("nan"),
            "sampler/mixed_fraction": sum(0.0 < p < 1.0 for p in seen) / n if n else float("nan"),
            "sampler/solved_fraction": sum(p == 1.0 for p in seen) / n if n else float("nan"),
        }

    def state_dict(self) -> dict:
        """JSON-ready state (keys as strings); :meth:`load_state_dict` restores it."""
        return {"pass_rate": {str(k): v for k, v in self.pass_rate.items()},
                "visits": {str(k): v for k, v in self.visits.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.pass_rate = {int(k): float(v) for k, v in state.get("pass_rate", {}).items()}
        self.visits = {int(k): int(v) for k, v in state.get("visits", {}).items()}


__all__ = ["DifficultySampler"]
