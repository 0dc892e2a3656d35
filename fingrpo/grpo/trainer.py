"""The GRPO training loop: rollouts → rewards → group advantages → clipped policy updates on LoRA weights.

    fingrpo train --set train.max_steps=2                  # params.yaml + overrides, one process
    fingrpo train --resume                                 # continue from the latest checkpoint
    accelerate launch --num_processes 2 -m fingrpo train   # data parallel (torchrun works too)

    from fingrpo.grpo.trainer import train_from_config
    summary = train_from_config(load_config("params.yaml", ["train.max_steps=2"]))

One training **step** (``train.max_steps`` of them):

1. take ``train.prompts_per_step`` examples (a seeded order, reshuffled every epoch; the data position is
   checkpointed); with P processes each takes a contiguous ``prompts_per_step / P`` share;
2. sample G = ``train.group_size`` completions per prompt with the policy (adapter on), in
   ``train.gradient_accumulation_steps`` rollout micro-batches (the memory knob: the step's prompts are
   sampled and back-propagated in that many chunks, the update is the same);
3. score them with every reward (``fingrpo.rewards.reward_completions``: per-function values, failures
   counted), gather the rewards of all processes and compute group advantages;
4. reference log-probs (adapter disabled, the same weights: no second copy) only when ``beta > 0``;
   old log-probs only when ``num_iterations`` μ > 1 (with μ = 1, ρ ≡ 1 and the old pass is skipped);
5. μ optimizer updates: per group, one forward of the prompt (``GroupLogprobs``), its completions'
   log-probs and the GRPO loss with the normalisers of the whole step, back-propagated
   ``train.backward_chunk_size`` completions at a time and the prompt's share once (one chunk's
   activations alive at a time), so the accumulated gradient equals the full-batch gradient; gradients all-reduced across
   processes, clipped, AdamW on the LoRA parameters, warm-up + cosine/linear/constant schedule.

Checkpoints (``train.checkpoint_dir/step-<n>/``, atomic) hold the adapter (safetensors), optimizer,
scheduler, RNG states, step and data position, and the resolved config; ``resume=True`` continues from
the latest one so that 4 steps straight == 2 steps + resume + 2 steps. Metrics: one CSV row per step
(``train.metrics_path``), per-completion rewards in ``train.rollout_rewards_path`` (JSONL rows
``{"step": n, "reward/<name>": [...], "total": [...], "completion_lengths": [...]}``).

Why not DDP: the shared-prefix log-prob pass runs the model body on the prompt once and the completions
against its KV cache — several forwards per backward, partly outside the module's ``forward``, which
DistributedDataParallel's reducer does not support. The LoRA gradients are tiny (≈0.5 M floats for
SmolLM2 with r=8), so one explicit all-reduce of the flattened gradients per update is cheap and exact.
"""

from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Protocol, Sequence, runtime_checkable

import torch

from fingrpo.data.finqa import load_split
from fingrpo.data.prompts import make_examples, render_prompt
from fingrpo.data.sources import few_shot_records, training_pool
from fingrpo.errors import ConfigError, TrainingError
from fingrpo.grpo import checkpoint
from fingrpo.grpo.checkpoint import latest_checkpoint
from fingrpo.grpo.loss import GRPOLoss, group_advantages
from fingrpo.grpo.rollout import GroupBatch, GroupLogprobs, Rollout, StepRollout, completion_logprobs, sample_groups
from fingrpo.grpo.sampler import DifficultySampler
from fingrpo.io import atomic_path, write_json_atomic, write_text_atomic
from fingrpo.model import add_lora, generate_completions, load_adapter, load_model_and_tokenizer, peak_rss_mb
from fingrpo.rewards import RewardResult, build_rewards, reward_completions
from fingrpo.scoring import score_prediction

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import Config

#: K: consecutive non-finite updates, or consecutive steps where a reward failed on every completion,
#: after which training stops with a TrainingError.
MAX_CONSECUTIVE_FAILURES = 3


@runtime_checkable
class TrainerCallback(Protocol):
    """What a callback may implement; every method is optional (the trainer calls only what exists).

    >>> class PrintReward:
    ...     def on_step_end(self, step, metrics):
    ...         print(step, metrics["reward_mean"])
    >>> GRPOTrainer(..., callbacks=[PrintReward()])   # doctest: +SKIP

    A callback may set ``trainer.should_stop = True`` (e.g. in ``on_step_end``): the trainer then saves a
    checkpoint and returns after the current step.
    """

    def on_train_begin(self, trainer: "GRPOTrainer") -> None: ...
    def on_step_end(self, step: int, metrics: dict) -> None: ...
    def on_evaluate(self, step: int, metrics: dict, samples: list[dict]) -> None: ...
    def on_save(self, step: int, path: Path) -> None: ...
    def on_train_end(self, summary: dict) -> None: ...


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _std(xs: Sequence[float]) -> float:
    # population std: the spread of this step's rewards (not an estimator of anything)
    if not xs:
        return float("nan")
    m = _mean(xs)
    return float(math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)))


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


#: The reward whose full credit (1.0) marks a completion as right: the pass rates of the difficulty
#: sampler, gold guidance and the all-right / all-wrong split of equal-reward groups.
CORRECT_REWARD = "program_execution"


@dataclass
class _Group:
    """One prompt's G completions during a step's rollout (before they are packed into a GroupBatch)."""

    index: int  # the example's index in train_examples
    example: Any
    prompt_ids: torch.Tensor  # (L,)
    completion_ids: torch.Tensor  # (G, T)
    completion_mask: torch.Tensor  # (G, T)
    truncated: torch.Tensor  # (G,) bool
    completions: list[str]
    total: list[float] = field(default_factory=list)  # (G,) the policy's own samples' rewards
    train_total: list[float] = field(default_factory=list)  # (G,) what the update uses (a gold row replaced)
    correct: int | None = None  # own completions with full CORRECT_REWARD credit (None: reward not configured)
    off_policy: torch.Tensor | None = None  # (G,) bool: the gold row of a gold-guided group


def _all_equal(values: Sequence[float]) -> bool:
    return max(values) == min(values)


def _pad_right(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if x.shape[1] >= width:
        return x.clone()
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def _new_acc() -> dict:
    return {"prompts": [], "completions": [], "total": [], "per_function": {}, "names": [], "lengths": [],
            "truncated": [], "failures": {}, "errors": {}, "sample_seconds": 0.0, "gold_unavailable": 0}


def _accumulate(acc: dict, prompts, completions, result, masks, truncated) -> None:
    """Add one round's sampled completions and their rewards to the step's figures."""
    acc["prompts"] += prompts
    acc["completions"] += completions
    acc["total"] += [float(v) for v in result.total]
    for name, values in result.per_function.items():
        if name not in acc["per_function"]:
            acc["names"].append(name)
            acc["per_function"][name] = []
        acc["per_function"][name] += [float(v) for v in values]
    for name, n in result.failures.items():
        acc["failures"][name] = acc["failures"].get(name, 0) + int(n)
    for name, err in (getattr(result, "errors", {}) or {}).items():
        acc["errors"].setdefault(name, err)
    for m in masks:
        acc["lengths"] += [float(x) for x in m.sum(dim=1).tolist()]
    for t in truncated:
        acc["truncated"] += [float(x) for x in t.float().tolist()]


def _group_metrics(groups: Sequence[tuple], group_size: int, refill: int) -> dict[str, float]:
    """Per-step group figures over every sampled group ``(index, equal, correct, gold, kept)``.

    >>> m = _group_metrics([(0, True, 8, False, False), (1, True, 0, True, True), (2, False, 3, False, True)], 8, 1)
    >>> m["zero_std_all_right_fraction"], m["zero_std_all_wrong_fraction"], m["dynamic/kept_groups"]
    (0.3333333333333333, 0.3333333333333333, 2.0)
    """
    n = len(groups)
    frac = (lambda k: k / n) if n else (lambda k: float("nan"))
    kept = [g for g in groups if g[4]]
    return {
        "zero_std_group_fraction": frac(sum(g[1] for g in groups)),
        "zero_std_all_right_fraction": frac(sum(g[1] and g[2] == group_size for g in groups)),
        "zero_std_all_wrong_fraction": frac(sum(g[1] and g[2] == 0 for g in groups)),
        "solved_group_fraction": frac(sum((g[2] or 0) > 0 for g in groups)),
        "dynamic/sampled_groups": float(n),
        "dynamic/kept_groups": float(len(kept)),
        "dynamic/dropped_groups": float(n - len(kept)),
        "dynamic/refill_prompts": float(refill),
        "gold_guided_fraction": (sum(g[3] for g in kept) / len(kept)) if kept else 0.0,
    }


class GRPOTrainer:
    """GRPO with LoRA on a causal LM; see the module docstring for one step.

    ``model``: a peft ``PeftModel`` (a plain model is wrapped with ``config.lora``); ``reward_functions``:
    ``fingrpo.rewards.WeightedReward``s (``build_rewards``) or ``RewardFunction``s; ``train_examples`` /
    ``eval_examples``: ``fingrpo.data.prompts.PromptExample``s (a plain ``str`` is taken as a ready prompt
    with no target); ``config``: the whole :class:`fingrpo.config.Config`.

    >>> trainer = GRPOTrainer(policy, tok, build_rewards(cfg.rewards), train_ex, dev_ex, cfg)   # doctest: +SKIP
    >>> summary = trainer.train()   # doctest: +SKIP
    >>> summary["steps"], summary["final_metrics"]["reward_mean"]   # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        reward_functions: Sequence[Any],
        train_examples: Sequence[Any],
        eval_examples: Sequence[Any] | None,
        config: "Config",
        callbacks: Iterable[Any] = (),
        accelerator: Any = None,
    ) -> None:
        from peft import PeftModel

        self.config = config
        self.train_cfg = train_cfg = config.train
        if not train_examples:
            raise TrainingError("no training examples (check data.train_path / data.train_sources and train.max_train_records)")
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.accelerator = accelerator
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device
        if train_cfg.prompts_per_step % self.world:
            raise ConfigError(
                f"train.prompts_per_step={train_cfg.prompts_per_step} must be divisible by the number of processes ({self.world})"
            )
        self.local_prompts = train_cfg.prompts_per_step // self.world
        if train_cfg.gradient_accumulation_steps > self.local_prompts:
            raise ConfigError(
                f"train.gradient_accumulation_steps={train_cfg.gradient_accumulation_steps} exceeds the prompts per "
                f"process and step ({self.local_prompts}): each rollout micro-batch needs at least one prompt"
            )

        if not isinstance(model, PeftModel):
            model = add_lora(model, config.lora)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.reward_functions = list(reward_functions)
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples or [])
        self.callbacks = list(callbacks)
        self.loss_fn = GRPOLoss(train_cfg.epsilon, train_cfg.epsilon_high, train_cfg.beta, train_cfg.loss_type,
                                off_policy_gamma=train_cfg.gold_guidance_gamma)
        needs_correct = [k for k, on in (("train.prompt_sampler: difficulty", train_cfg.prompt_sampler == "difficulty"),
                                         ("train.gold_guidance", train_cfg.gold_guidance)) if on]
        names = {getattr(r, "name", None) for r in self.reward_functions}
        if needs_correct and CORRECT_REWARD not in names:
            raise ConfigError(f"{' and '.join(needs_correct)} need the {CORRECT_REWARD!r} reward in rewards.weights "
                              "(weight 0 keeps it out of the total): it says which completions are right")
        self.sampler = (DifficultySampler(len(self.train_examples), seed=train_cfg.seed, floor=train_cfg.difficulty_floor,
                                          ema=train_cfg.difficulty_ema)
                        if train_cfg.prompt_sampler == "difficulty" else None)

        # Only the LoRA weights train; the order is deterministic (named_parameters), which the
        # optimizer's checkpointed state relies on.
        self.params = [p for _, p in self.model.named_parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("the model has no trainable parameters (is the LoRA adapter active?)")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=train_cfg.learning_rate, betas=tuple(train_cfg.adam_betas), weight_decay=train_cfg.weight_decay
        )
        from transformers import get_scheduler

        # μ optimizer updates per step: the schedule counts updates, not steps.
        mu = train_cfg.num_iterations
        self.scheduler = get_scheduler(
            "constant_with_warmup" if train_cfg.lr_scheduler == "constant" else train_cfg.lr_scheduler,
            self.optimizer,
            num_warmup_steps=train_cfg.warmup_steps * mu,
            num_training_steps=train_cfg.max_steps * mu,
        )

        # State that checkpoints carry.
        self.step = 0
        self.data_position = 0  # examples consumed so far (all processes together)
        self.nonfinite_skips = 0
        self._nonfinite_streak = 0
        self._reward_fail_streak: dict[str, int] = {}
        self.should_stop = False
        self.last_samples: list[dict] = []
        self.last_rollout: StepRollout | None = None  # the latest step's rollouts (metrics files, failure check)
        self.last_eval: dict = {}
        self._rows: list[dict] = []
        self._token_cache: dict[int, Any] = {}
        self._perm_cache: dict[int, list[int]] = {}
        self._gold_cache: dict[int, list[int]] = {}
        self.consumed_this_step = 0

    # ------------------------------------------------------------------------------------------ helpers

    def _callback(self, name: str, *args: Any) -> None:
        if not self.is_main:
            return  # callbacks log and write: one process does
        for cb in self.callbacks:
            fn = getattr(cb, name, None)
            if callable(fn):
                fn(*args)

    def _epoch_order(self, epoch: int) -> list[int]:
        """The example order of ``epoch``: a permutation seeded by (seed, epoch), the same on every process."""
        if epoch not in self._perm_cache:
            order = list(range(len(self.train_examples)))
            random.Random(f"{self.train_cfg.seed}-{epoch}").shuffle(order)
            self._perm_cache = {epoch: order}  # keep one epoch: positions only move forward
        return self._perm_cache[epoch]

    def _step_indices(self, position: int, count: int | None = None) -> list[int]:
        """Example indices of the ``count`` (default ``prompts_per_step``) examples starting at data
        ``position`` (epoch order)."""
        n = len(self.train_examples)
        count = self.train_cfg.prompts_per_step if count is None else count
        return [self._epoch_order(i // n)[i % n] for i in range(position, position + count)]

    def render(self, example: Any) -> str:
        """The exact prompt text of an example (chat template as configured)."""
        if isinstance(example, str):
            return example
        return render_prompt(example, self.tokenizer, use_chat_template=self.config.prompt.use_chat_template)

    def _prompt_ids(self, index: int, example: Any):
        if index not in self._token_cache:
            text = self.render(example)
            # the chat template already starts with <|im_start|>: no extra special tokens
            ids = self.tokenizer(text, add_special_tokens=not self._uses_template(example))["input_ids"]
            if not ids:
                raise TrainingError(f"example {getattr(example, 'id', index)}: empty prompt")
            self._token_cache[index] = torch.tensor(ids, dtype=torch.long)
        return self._token_cache[index]

    def _uses_template(self, example: Any) -> bool:
        return not isinstance(example, str) and bool(self.config.prompt.use_chat_template)

    @staticmethod
    def _target(example: Any) -> Any:
        return None if isinstance(example, str) else example

    def _sampling_generator(self, step: int):
        """A sampling generator derived from (seed, step, rank): resume needs no generator state and every
        process samples differently."""
        import numpy as np
        seed = int(np.random.SeedSequence([self.train_cfg.seed, step, self.rank]).generate_state(1)[0])
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        return gen

    def _all_reduce_sum(self, tensor):
        """Sum a tensor over processes (identity with one process)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def _gather_objects(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _decode(self, completion_ids, completion_mask) -> list[str]:
        # (N, T) ids; only masked-in tokens (the EOS, if any, is a special token and dropped)
        return [
            self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
            for row, m in zip(completion_ids.cpu(), completion_mask.cpu())
        ]

    # ---------------------------------------------------------------------------------------- one step

    def _choose(self, n: int, step: int, round_: int, chosen: list[int]) -> list[int]:
        """The next ``n`` prompt indices of this step (all processes: the same list): the epoch order from
        the data position on, or the difficulty sampler's draw (never a prompt already in ``chosen``)."""
        if self.sampler is not None:
            return self.sampler.choose(n, step, round_, exclude=chosen)
        return self._step_indices(self.data_position + len(chosen), n)

    def _gold_reply(self, index: int, example: Any) -> list[int] | None:
        """The gold reply's tokens + EOS (what ``fingrpo sft`` trains on), or None when the example has no
        target or the reply is longer than a rollout may be (the policy could not have sampled it)."""
        target = getattr(example, "target", None)
        if not target:
            return None
        if index not in self._gold_cache:
            ids = self.tokenizer(target, add_special_tokens=False)["input_ids"]
            eos = self.tokenizer.eos_token_id
            self._gold_cache[index] = list(ids) + ([eos] if eos is not None else [])
        ids = self._gold_cache[index]
        return ids if len(ids) <= self.train_cfg.max_new_tokens else None

    def _sample_round(self, indices: list[int], gen, acc: dict) -> list[_Group]:
        """Sample G completions for each of ``indices`` (in train.gradient_accumulation_steps chunks),
        decode and score them; gold-guided groups get their gold row. Sampled figures go to ``acc``."""
        import numpy as np

        train_cfg, G = self.train_cfg, self.train_cfg.group_size
        groups: list[_Group] = []
        if not indices:
            return groups
        chunks = [list(c) for c in np.array_split(np.arange(len(indices)), min(train_cfg.gradient_accumulation_steps, len(indices)))]
        self.model.eval()
        t0 = time.perf_counter()
        for chunk in chunks:
            idx = [indices[i] for i in chunk]
            prompt_ids = [self._prompt_ids(i, self.train_examples[i]).to(self.device) for i in idx]
            r = sample_groups(
                self.model, prompt_ids, G,
                max_new_tokens=train_cfg.max_new_tokens, temperature=train_cfg.temperature, top_p=train_cfg.top_p,
                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                generator=gen,
            )
            texts = self._decode(r.completion_ids, r.completion_mask)
            for p, i in enumerate(idx):
                rows = r.group(p)
                groups.append(_Group(index=i, example=self.train_examples[i], prompt_ids=prompt_ids[p],
                                     completion_ids=r.completion_ids[rows], completion_mask=r.completion_mask[rows],
                                     truncated=r.truncated[rows], completions=texts[rows]))
        acc["sample_seconds"] += time.perf_counter() - t0

        prompts, completions, targets = [], [], []
        for g in groups:
            prompts += [self.render(g.example)] * G
            targets += [self._target(g.example)] * G
            completions += g.completions
        result = reward_completions(self.reward_functions, prompts, completions, targets, self.config.rewards.nan_value)
        correct = result.per_function.get(CORRECT_REWARD)
        for p, g in enumerate(groups):
            rows = slice(p * G, (p + 1) * G)
            g.total = list(result.total[rows])
            g.train_total = list(g.total)
            g.correct = None if correct is None else sum(v >= 1.0 for v in correct[rows])
        _accumulate(acc, prompts, completions, result, [g.completion_mask for g in groups], [g.truncated for g in groups])

        if train_cfg.gold_guidance:
            self._add_gold_rows([g for g in groups if g.correct == 0], acc)
        return groups

    def _add_gold_rows(self, groups: list[_Group], acc: dict) -> None:
        """Put the gold reply in place of each group's last completion (off-policy row), scored like any."""
        G = self.train_cfg.group_size
        chosen = [(g, ids) for g in groups if (ids := self._gold_reply(g.index, g.example)) is not None]
        acc["gold_unavailable"] += len(groups) - len(chosen)
        if not chosen:
            return
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for _, ids in chosen]
        result = reward_completions(self.reward_functions, [self.render(g.example) for g, _ in chosen], texts,
                                    [self._target(g.example) for g, _ in chosen], self.config.rewards.nan_value)
        for name, n in result.failures.items():
            acc["failures"][name] = acc["failures"].get(name, 0) + n
        pad = self.tokenizer.pad_token_id
        for (g, ids), text, total in zip(chosen, texts, result.total):
            width = max(g.completion_ids.shape[1], len(ids))
            g.completion_ids = _pad_right(g.completion_ids, width, pad)
            g.completion_mask = _pad_right(g.completion_mask, width, 0)
            row = torch.full((width,), pad, dtype=g.completion_ids.dtype, device=g.completion_ids.device)
            row[: len(ids)] = torch.tensor(ids, dtype=row.dtype)
            g.completion_ids[G - 1] = row
            g.completion_mask[G - 1] = 0
            g.completion_mask[G - 1, : len(ids)] = 1
            g.completions = g.completions[: G - 1] + [text]
            g.train_total[G - 1] = float(total)
            g.off_policy = torch.zeros(G, dtype=torch.bool, device=g.completion_ids.device)
            g.off_policy[G - 1] = True

    def _pack(self, groups: list[_Group]) -> list[GroupBatch]:
        """The kept groups as train.gradient_accumulation_steps micro-batches (rows padded to one width)."""
        import numpy as np

        if not groups:
            return []
        pad = self.tokenizer.pad_token_id
        batches = []
        for chunk in np.array_split(np.arange(len(groups)), min(self.train_cfg.gradient_accumulation_steps, len(groups))):
            part = [groups[i] for i in chunk]
            width = max(g.completion_ids.shape[1] for g in part)
            rollout = Rollout(
                prompt_ids=[g.prompt_ids for g in part],
                completion_ids=torch.cat([_pad_right(g.completion_ids, width, pad) for g in part]),
                completion_mask=torch.cat([_pad_right(g.completion_mask, width, 0) for g in part]),
                group_size=self.train_cfg.group_size,
                truncated=torch.cat([g.truncated for g in part]),
            )
            off = [g.off_policy if g.off_policy is not None else torch.zeros_like(g.truncated) for g in part]
            batches.append(GroupBatch(examples=[g.example for g in part], rollout=rollout,
                                      completions=[c for g in part for c in g.completions],
                                      off_policy=torch.cat(off) if any(g.off_policy is not None for g in part) else None))
        return batches

    def _rollout(self, step: int) -> StepRollout:
        """The step's groups: sampled, scored, gold-guided and (dynamic sampling) filtered and refilled;
        advantages over the kept groups of all processes."""
        train_cfg, G = self.train_cfg, self.train_cfg.group_size
        gen = self._sampling_generator(step)
        acc = _new_acc()
        chosen: list[int] = []
        sampled: list[_Group] = []
        kept: list[_Group] = []
        n_round, round_, refill = self.local_prompts, 0, 0
        while True:
            global_idx = self._choose(n_round * self.world, step, round_, chosen)
            chosen += global_idx
            local_idx = global_idx[self.rank * n_round:(self.rank + 1) * n_round]
            groups = self._sample_round(local_idx, gen, acc)
            sampled += groups
            if not train_cfg.dynamic_sampling:
                kept = groups
                break
            kept += [g for g in groups if not _all_equal(g.train_total)]
            short = torch.tensor([float(max(0, self.local_prompts - len(kept)))], dtype=torch.float64, device=self.device)
            if self.world > 1:
                import torch.distributed as dist

                dist.all_reduce(short, op=dist.ReduceOp.MAX)
            n_round = min(int(short.item()), (train_cfg.dynamic_sampling_max_refill - refill) // self.world)
            if n_round <= 0 or len(global_idx) == 0:
                break
            refill += n_round * self.world
            round_ += 1
        kept = kept[: self.local_prompts]
        self.consumed_this_step = len(chosen)

        # gathered: advantages over the kept groups of every process; metrics over every sampled group
        kept_rewards = self._gather_objects([r for g in kept for r in g.train_total])  # one list per rank
        counts = [len(x) for x in kept_rewards]
        rewards_kept = torch.tensor([r for x in kept_rewards for r in x], dtype=torch.float32)
        batches = self._pack(kept)
        if rewards_kept.numel():
            adv_all = group_advantages(rewards_kept, G, scale=train_cfg.advantage_scale)
            start = sum(counts[: self.rank])
            adv_local = adv_all[start:start + counts[self.rank]]
            offset = 0
            for batch in batches:
                n = batch.rollout.completion_ids.shape[0]
                batch.advantages = adv_local[offset:offset + n].to(self.device)
                offset += n

        group_rows = [(g.index, _all_equal(g.total), g.correct, g.off_policy is not None, g in kept) for g in sampled]
        gathered = self._gather_objects([acc["total"], acc["lengths"], acc["truncated"], group_rows,
                                       [acc["failures"]], [acc["gold_unavailable"]]]
                                      + [acc["per_function"][k] for k in acc["names"]])
        total_all, lengths_all, truncated_all, groups_all, failures_all, gold_unavailable = (
            [v for part in gathered for v in part[i]] for i in range(6))
        per_function_all = {k: [v for part in gathered for v in part[6 + j]] for j, k in enumerate(acc["names"])}
        failures = {k: 0 for k in acc["names"]}
        for f in failures_all:
            for k, v in f.items():
                failures[k] = failures.get(k, 0) + int(v)
        if self.sampler is not None:
            for index, _, correct, _, _ in groups_all:
                if correct is not None:
                    self.sampler.update(index, correct, G)
        group_metrics = _group_metrics(groups_all, G, refill)
        if train_cfg.gold_guidance:  # all-wrong groups whose gold reply is longer than max_new_tokens
            group_metrics["gold_unavailable_groups"] = float(sum(gold_unavailable))
        if self.sampler is not None:
            group_metrics.update(self.sampler.summary())

        scores = RewardResult(total=acc["total"], per_function={k: acc["per_function"][k] for k in acc["names"]},
                              failures=dict(acc["failures"]), errors=dict(acc["errors"]))
        return StepRollout(
            batches=batches,
            rewards=total_all,
            per_function=per_function_all,
            failures=failures,
            errors=dict(acc["errors"]),
            lengths=lengths_all,
            truncated=truncated_all,
            zero_std_group_fraction=group_metrics["zero_std_group_fraction"],
            rollout_tokens_per_s=float(sum(lengths_all)) / max(acc["sample_seconds"], 1e-9),
            prompts=acc["prompts"],
            completions=acc["completions"],
            scores=scores,
            group_metrics=group_metrics,
        )

    def _fixed_logprobs(self, batches: list[GroupBatch], which: str, disable_adapter: bool) -> None:
        """Store per-group log-probs without gradients: ``which`` = ``"old"`` (the sampling policy, in
        ``old_logprobs``) or ``"ref"`` (adapter off, in ``ref_logprobs``)."""
        G = self.train_cfg.group_size
        ctx = self.model.disable_adapter() if disable_adapter else contextlib.nullcontext()
        self.model.eval()
        with torch.no_grad(), ctx:
            for batch in batches:
                r = batch.rollout
                logprobs = [
                    completion_logprobs(
                        self.model, [prompt], r.completion_ids[rows], r.completion_mask[rows], G,
                        temperature=self.train_cfg.temperature,
                    ).detach()
                    for prompt, rows in batch.groups()
                ]
                setattr(batch, f"{which}_logprobs", logprobs)

    def _update(self, batches: list[GroupBatch], empty: bool = False) -> dict:
        """One optimizer update over the whole step's rollouts; returns its loss/stat/grad figures.
        ``empty``: no process kept a group (dynamic sampling at its bound): no optimizer step, the
        schedule still advances."""
        train_cfg, G = self.train_cfg, self.train_cfg.group_size
        chunk = min(train_cfg.backward_chunk_size or G, G)
        # Normalisers of the full (local) batch, so per-group losses add up to the full-batch loss.
        num_sequences = max(1, sum(b.rollout.completion_ids.shape[0] for b in batches))
        num_tokens = float(sum(b.rollout.completion_mask.sum() for b in batches))
        max_length = max([b.rollout.completion_ids.shape[1] for b in batches], default=1)
        norms = {"num_sequences": num_sequences, "num_tokens": max(num_tokens, 1.0), "max_length": max_length}

        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        loss_sum = 0.0
        stat_keys = ("kl", "clip_fraction_low", "clip_fraction_high", "ratio_mean")
        stat_sums = dict.fromkeys(stat_keys, 0.0)
        stat_tokens = 0.0
        for batch in batches:
            r = batch.rollout
            for gi, (prompt, rows) in enumerate(batch.groups()):
                # One forward of the prompt; its G completions back-propagated `chunk` rows at a time (each
                # backward frees that chunk's activations), then the prompt's share once: the gradients of
                # one backward over the group, the peak memory of one chunk. Scored at the sampling
                # temperature, so ρ compares the sampling distributions.
                with GroupLogprobs(self.model, prompt, temperature=train_cfg.temperature) as group_logprobs:
                    for start in range(0, G, chunk):
                        end = min(start + chunk, G)
                        local, part = slice(start, end), slice(rows.start + start, rows.start + end)
                        ids, mask = r.completion_ids[part], r.completion_mask[part]
                        logprobs = group_logprobs.logprobs(ids, mask)  # (chunk, T) with grad
                        old = batch.old_logprobs[gi][local] if batch.old_logprobs is not None else None
                        ref = batch.ref_logprobs[gi][local] if batch.ref_logprobs is not None else None
                        off = batch.off_policy[part] if batch.off_policy is not None else None
                        loss, stats = self.loss_fn(logprobs, old, ref, batch.advantages[part], mask, **norms,
                                                   off_policy=off)
                        loss.backward()
                        loss_sum += float(loss.detach())
                        w = float(stats.get("num_tokens", float(mask.sum())))
                        for k in stat_keys:
                            v = stats.get(k, float("nan"))
                            if _finite(v) and w > 0:
                                stat_sums[k] += v * w
                        stat_tokens += w
                    group_logprobs.backward_prompt()

        # One all-reduce for everything: flattened gradients, loss and stat sums. Averaged over
        # processes, so every process applies the identical update and the weights stay identical.
        for p in self.params:  # a weight no group reached (e.g. an unused adapter) still takes part
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).to(torch.float64) for p in self.params])
        extra = torch.tensor([loss_sum, stat_tokens] + [stat_sums[k] for k in stat_keys], dtype=torch.float64)
        packed = self._all_reduce_sum(torch.cat([flat.to(self.device), extra.to(self.device)]))
        grads, extra = packed[: flat.numel()], packed[flat.numel():].cpu().tolist()
        grads /= self.world
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad.copy_(grads[offset:offset + n].view_as(p.grad).to(p.grad.dtype))
            offset += n
        loss_value = extra[0] / self.world
        total_tokens = extra[1]
        stats = {k: (extra[2 + i] / total_tokens if total_tokens > 0 else float("nan")) for i, k in enumerate(stat_keys)}
        if train_cfg.beta <= 0 and (not batches or batches[0].ref_logprobs is None):
            stats["kl"] = float("nan")  # no reference pass: the KL is not measured

        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, train_cfg.max_grad_norm))
        lr = float(self.scheduler.get_last_lr()[0])
        finite = _finite(loss_value) and _finite(grad_norm)
        if empty:
            pass  # nothing to learn from this step
        elif finite:
            self.optimizer.step()
            self._nonfinite_streak = 0
        else:
            # skip the update, keep the schedule aligned with the step count
            self.nonfinite_skips += 1
            self._nonfinite_streak += 1
        self.optimizer.zero_grad(set_to_none=False)
        self.scheduler.step()
        return {"loss": loss_value, "grad_norm": grad_norm, "lr": lr, "finite": finite, **stats}

    def train_step(self) -> dict:
        """Run one step (rollouts, rewards, μ updates); return its metrics (numbers only)."""
        t0 = time.perf_counter()
        train_cfg = self.train_cfg
        step = self.step + 1
        rollout = self._rollout(step)
        if train_cfg.beta > 0:
            self._fixed_logprobs(rollout.batches, "ref", disable_adapter=True)
        if train_cfg.num_iterations > 1:
            self._fixed_logprobs(rollout.batches, "old", disable_adapter=False)
        updates = [self._update(rollout.batches, empty=not rollout.group_metrics["dynamic/kept_groups"])
                   for _ in range(train_cfg.num_iterations)]

        self.step = step
        self.data_position += self.consumed_this_step
        rewards = rollout.rewards
        metrics: dict[str, float] = {
            "step": step,
            "epoch": self.data_position / len(self.train_examples),
            "loss": _mean([u["loss"] for u in updates]),
            "reward_mean": _mean(rewards),
            "reward_std": _std(rewards),
        }
        for name, values in rollout.per_function.items():
            metrics[f"reward/{name}_mean"] = _mean(values)
            metrics[f"reward/{name}_std"] = _std(values)
            metrics[f"reward/{name}_failures"] = rollout.failures.get(name, 0)
        for k in ("kl", "clip_fraction_low", "clip_fraction_high", "ratio_mean"):
            metrics[k] = _mean([u[k] for u in updates])
        finite_norms = [u["grad_norm"] for u in updates if u["finite"]]
        metrics.update(
            completion_length_mean=_mean(rollout.lengths),
            completion_length_max=max(rollout.lengths) if rollout.lengths else 0,
            truncated_fraction=_mean(rollout.truncated),
            **rollout.group_metrics,
            grad_norm=_mean(finite_norms) if finite_norms else float("nan"),
            lr=updates[0]["lr"],
            rollout_tokens_per_s=rollout.rollout_tokens_per_s,
            nonfinite_skips=self.nonfinite_skips,
            step_seconds=time.perf_counter() - t0,
        )
        self.last_rollout = rollout
        self.last_samples = self._samples(rollout, step)
        return metrics

    def _samples(self, rollout: StepRollout, step: int) -> list[dict]:
        """The first ``num_samples_to_log`` completions of this process, with their rewards."""
        result = rollout.scores
        out = []
        for i in range(min(self.train_cfg.num_samples_to_log, len(rollout.completions))):
            row = {"step": step, "prompt_tail": rollout.prompts[i][-200:], "completion": rollout.completions[i],
                   "reward": result.total[i]}
            row.update({f"reward/{k}": v[i] for k, v in result.per_function.items()})
            out.append(row)
        return out

    def _check_failures(self, rollout: StepRollout, step: int) -> None:
        n = len(rollout.rewards)
        for name, failed in rollout.failures.items():
            streak = self._reward_fail_streak.get(name, 0) + 1 if failed >= n > 0 else 0
            self._reward_fail_streak[name] = streak
            if streak >= MAX_CONSECUTIVE_FAILURES:
                err = rollout.errors.get(name, "")
                raise TrainingError(
                    f"step {step}: reward {name!r} failed on every completion for {streak} steps in a row"
                    + (f" (first error: {err})" if err else "")
                )

    # ---------------------------------------------------------------------------------------- evaluation

    def evaluate(self, step: int | None = None) -> tuple[dict, list[dict]]:
        """Greedy completions on the first ``eval_subset_size`` dev examples: mean reward, execution
        accuracy (official rule), tolerant accuracy, format rate, and a few sample predictions."""
        examples = self.eval_examples[: self.train_cfg.eval_subset_size]
        if not examples:
            return {}, []
        prompts = [self.render(ex) for ex in examples]
        self.model.eval()
        completions = generate_completions(
            self.model, self.tokenizer, prompts, max_new_tokens=self.train_cfg.max_new_tokens,
            batch_size=max(1, min(len(prompts), self.config.evaluate.batch_size)),
        )
        result = reward_completions(
            self.reward_functions, prompts, completions, [self._target(e) for e in examples],
            self.config.rewards.nan_value,
        )
        # the same per-prediction scoring as `fingrpo evaluate` (official rule: execute the program)
        official, tolerant, formatted, samples = [], [], [], []
        for ex, completion, reward in zip(examples, completions, result.total):
            record = {"id": getattr(ex, "id", None), "table": getattr(ex, "table", None) or [],
                      "qa": {"exe_ans": getattr(ex, "exe_ans", None), "program": getattr(ex, "program", None)}}
            scored = score_prediction({"id": record["id"], "completion": completion}, record,
                                      rel_tol=self.config.rewards.rel_tolerance)
            official.append(float(bool(scored["correct_official"])))
            tolerant.append(float(bool(scored["correct_tolerant"])))
            formatted.append(float(bool(scored["format_ok"])))
            if len(samples) < 3:
                samples.append({"step": step, "id": record["id"], "completion": completion,
                                "program": scored.get("program"), "answer": scored.get("answer"),
                                "exe_ans": record["qa"]["exe_ans"], "correct": bool(scored["correct_official"]),
                                "reward": reward})
        metrics = {
            "eval/reward_mean": _mean(result.total),
            "eval/execution_accuracy": _mean(official),
            "eval/tolerant_accuracy": _mean(tolerant),
            "eval/format_rate": _mean(formatted),
            "eval/n": float(len(examples)),
        }
        return metrics, samples

    # ---------------------------------------------------------------------------------------- files

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint_dir/step-<n>/`` (:func:`fingrpo.grpo.checkpoint.save_checkpoint`); every
        process must call it."""
        path = checkpoint.save_checkpoint(self)
        self._callback("on_save", self.step, path)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore adapter, optimizer, scheduler, RNG, step and data position from a checkpoint folder."""
        checkpoint.load_checkpoint(self, path)

    def _init_metric_files(self, resume: bool) -> None:
        """Fresh run: empty files. Resume: keep the rows up to the checkpoint's step (drops rows written
        after the checkpoint by an interrupted run, so no step appears twice)."""
        if not self.is_main:
            return
        metrics_path, rollout_path = Path(self.train_cfg.metrics_path), Path(self.train_cfg.rollout_rewards_path)
        self._rows = []
        if resume and metrics_path.exists():
            with metrics_path.open(newline="", encoding="utf-8") as f:
                self._rows = [r for r in csv.DictReader(f) if r.get("step") and int(float(r["step"])) <= self.step]
        self._write_csv()
        kept = ""
        if resume and rollout_path.exists():
            for line in rollout_path.read_text(encoding="utf-8").splitlines():
                if line.strip() and int(json.loads(line)["step"]) <= self.step:
                    kept += line + "\n"
        write_text_atomic(rollout_path, kept)

    def _write_csv(self) -> None:
        fields: list[str] = []
        for row in self._rows:
            fields += [k for k in row if k not in fields]
        buf = _io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(self._rows)
        write_text_atomic(self.train_cfg.metrics_path, buf.getvalue() if fields else "")

    def _log_rollout(self, step: int, rollout: StepRollout) -> None:
        row = {"step": step, **{f"reward/{k}": v for k, v in rollout.per_function.items()},
               "total": rollout.rewards, "completion_lengths": [int(x) for x in rollout.lengths]}
        path = Path(self.train_cfg.rollout_rewards_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ---------------------------------------------------------------------------------------- the loop

    def train(self, resume: bool = False, save_final: bool = True) -> dict:
        """Train to ``train.max_steps``; return a summary dict (steps, final metrics, last checkpoint, ...).

        When all steps are done (and ``save_final``), the adapter + tokenizer + resolved config go to
        ``train.output_dir`` before ``on_train_end`` (so a tracking callback can log them).
        """
        from tqdm.auto import tqdm

        from transformers import set_seed

        train_cfg = self.train_cfg
        if train_cfg.threads:
            torch.set_num_threads(train_cfg.threads)
        set_seed(train_cfg.seed)
        if resume:
            ckpt = latest_checkpoint(train_cfg.checkpoint_dir)
            if ckpt is None:
                raise TrainingError(
                    f"{train_cfg.checkpoint_dir}: no checkpoint to resume from (run without --resume to start fresh)"
                )
            self.load_checkpoint(ckpt)
        self._init_metric_files(resume)
        self._callback("on_train_begin", self)
        start_step, t_start = self.step, time.perf_counter()
        first_reward = None
        last_saved = self.step if resume else -1
        metrics: dict = {}
        bar = tqdm(total=train_cfg.max_steps, initial=self.step, desc="grpo", disable=not self.is_main, dynamic_ncols=True)
        try:
            while self.step < train_cfg.max_steps and not self.should_stop:
                metrics = self.train_step()
                step = self.step
                first_reward = metrics["reward_mean"] if first_reward is None else first_reward
                if step % train_cfg.eval_interval == 0 and self.eval_examples:
                    eval_metrics, samples = self.evaluate(step) if self.is_main else ({}, [])
                    self.accelerator.wait_for_everyone()
                    metrics.update(eval_metrics)
                    self.last_eval = eval_metrics
                    self._callback("on_evaluate", step, eval_metrics, samples)
                if self.is_main:
                    self._rows.append(metrics)
                    self._write_csv()
                    self._log_rollout(step, self.last_rollout)
                self._callback("on_step_end", step, metrics)
                if self.world > 1:  # callbacks run on the main process only: every process must stop together
                    flag = torch.tensor([float(self.should_stop)], device=self.device)
                    self.should_stop = bool(self._all_reduce_sum(flag).item() > 0)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.4f}")
                if self._nonfinite_streak >= MAX_CONSECUTIVE_FAILURES:
                    path = self.save_checkpoint()
                    raise TrainingError(
                        f"step {step}: {self._nonfinite_streak} non-finite losses/gradients in a row "
                        f"({self.nonfinite_skips} skipped updates in all); checkpoint saved to {path}; "
                        "lower train.learning_rate or check the rewards"
                    )
                self._check_failures(self.last_rollout, step)
                if step % train_cfg.save_interval == 0 or step == train_cfg.max_steps or self.should_stop:
                    self.save_checkpoint()
                    last_saved = step
        finally:
            bar.close()
        if last_saved != self.step:
            self.save_checkpoint()
        output_dir = None
        if self.step >= train_cfg.max_steps and save_final:
            output_dir = str(self.save_adapter(train_cfg.output_dir))
        summary = {
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "stopped_early": self.step < train_cfg.max_steps,
            "seconds": time.perf_counter() - t_start,
            "seconds_per_step": (time.perf_counter() - t_start) / max(1, self.step - start_step),
            "first_reward_mean": first_reward,
            "final_metrics": metrics,
            "last_eval": self.last_eval,
            "nonfinite_skips": self.nonfinite_skips,
            "checkpoint": str(latest_checkpoint(train_cfg.checkpoint_dir)),
            "peak_rss_mb": peak_rss_mb(),
            "num_processes": self.world,
            "output_dir": output_dir,
        }
        self._callback("on_train_end", summary)
        return summary

    def save_adapter(self, output_dir: str | os.PathLike) -> Path:
        """Write the final adapter + tokenizer + ``fingrpo_config.json`` atomically (main process)."""
        output_dir = Path(output_dir)
        if self.is_main:
            with atomic_path(output_dir, is_dir=True) as tmp:
                self.model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                write_json_atomic(tmp / "fingrpo_config.json", self.config.public_dump())
        self.accelerator.wait_for_everyone()
        return output_dir


# -------------------------------------------------------------------------------------------- entry points


def train_from_config(cfg: "Config", resume: bool = False, callbacks: Sequence[Any] = ()) -> dict:
    """config -> data -> model -> LoRA -> rewards -> trainer -> train -> save ``train.output_dir`` -> summary.

    ``callbacks`` are the trainer's only listeners: :func:`fingrpo.pipeline.train_stage` passes the MLflow
    callback when tracking is enabled (this module never imports tracking).

    >>> summary = train_from_config(load_config("params.yaml", ["train.max_steps=2"]))   # doctest: +SKIP
    """
    from transformers import set_seed

    train_cfg = cfg.train
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)

    # model (before the data: prompts are cut to a token budget with the tokenizer)
    model, tokenizer = load_model_and_tokenizer(cfg.model)

    # data: the worked examples (few_shot_records) and the mixed training pool
    few = few_shot_records(cfg)
    _, train_records = training_pool(cfg, "grpo")
    train_examples = make_examples(train_records, cfg.prompt, tokenizer=tokenizer, few_shot_records=few, training=True)
    dev_records = load_split(cfg.data.dev_path)[: train_cfg.eval_subset_size]
    eval_examples = make_examples(dev_records, cfg.prompt, tokenizer=tokenizer, few_shot_records=few)

    # LoRA (seeded: the adapter's initial weights are part of the run)
    set_seed(train_cfg.seed)
    if train_cfg.init_adapter:  # the warm start (fingrpo sft): its LoRA weights train on
        policy = load_adapter(model, train_cfg.init_adapter, is_trainable=True)
    else:
        policy = add_lora(model, cfg.lora)
    rewards = build_rewards(cfg.rewards)
    trainer = GRPOTrainer(policy, tokenizer, rewards, train_examples, eval_examples, cfg, callbacks=callbacks)
    return trainer.train(resume=resume)
