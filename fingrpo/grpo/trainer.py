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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Protocol, Sequence, runtime_checkable

import torch

from fingrpo.data.finqa import load_split
from fingrpo.data.prompts import make_examples, render_prompt
from fingrpo.data.sources import few_shot_records, training_pool
from fingrpo.errors import ConfigError, TrainingError
from fingrpo.grpo import checkpoint
from fingrpo.grpo.checkpoint import latest_checkpoint
from fingrpo.grpo.loss import GRPOLoss, group_advantages, zero_std_fraction
from fingrpo.grpo.rollout import GroupBatch, GroupLogprobs, StepRollout, completion_logprobs, sample_groups
from fingrpo.io import atomic_path, write_json_atomic, write_text_atomic
from fingrpo.model import add_lora, generate_completions, load_adapter, load_model_and_tokenizer, peak_rss_mb
from fingrpo.rewards import build_rewards, reward_completions
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
        self.loss_fn = GRPOLoss(train_cfg.epsilon, train_cfg.epsilon_high, train_cfg.beta, train_cfg.loss_type)

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

    def _step_indices(self, position: int) -> list[int]:
        """Example indices of the ``prompts_per_step`` examples starting at data ``position``."""
        n = len(self.train_examples)
        return [self._epoch_order(i // n)[i % n] for i in range(position, position + self.train_cfg.prompts_per_step)]

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

    def _gather_floats(self, values: Sequence[float]) -> list[float]:
        """Concatenate equal-length float lists of all processes in rank order."""
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        return [float(v) for v in self.accelerator.gather(t).cpu()]

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

    def _rollout(self, examples: list[tuple[int, Any]], step: int) -> StepRollout:
        """Sample the step's completions in micro-batches; score them; advantages over all processes."""
        import numpy as np

        train_cfg, G = self.train_cfg, self.train_cfg.group_size
        gen = self._sampling_generator(step)
        chunks = [list(c) for c in np.array_split(np.arange(len(examples)), train_cfg.gradient_accumulation_steps)]
        batches: list[GroupBatch] = []
        t0 = time.perf_counter()
        self.model.eval()
        for chunk in chunks:
            prompt_ids = [self._prompt_ids(examples[i][0], examples[i][1]).to(self.device) for i in chunk]
            rollout = sample_groups(
                self.model, prompt_ids, G,
                max_new_tokens=train_cfg.max_new_tokens, temperature=train_cfg.temperature, top_p=train_cfg.top_p,
                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                generator=gen,
            )
            batches.append(GroupBatch(examples=[examples[i][1] for i in chunk], rollout=rollout))
        rollout_seconds = time.perf_counter() - t0

        # Rewards on this process's completions ...
        prompts, completions, targets, lengths, truncated = [], [], [], [], []
        for batch in batches:
            r = batch.rollout
            batch.completions = self._decode(r.completion_ids, r.completion_mask)
            for ex in batch.examples:
                prompts += [self.render(ex)] * G
                targets += [self._target(ex)] * G
            completions += batch.completions
            lengths += [int(x) for x in r.completion_mask.sum(dim=1).tolist()]
            truncated += [float(x) for x in r.truncated.float().tolist()]
        result = reward_completions(self.reward_functions, prompts, completions, targets, self.config.rewards.nan_value)

        # ... then gathered: advantages, metrics and the "failed everywhere" check see the whole step.
        total_all = self._gather_floats(result.total)
        per_function_all = {k: self._gather_floats(v) for k, v in result.per_function.items()}
        failures_t = torch.tensor([float(result.failures.get(k, 0)) for k in result.per_function], dtype=torch.float64)
        failures_all = dict(zip(result.per_function, self._all_reduce_sum(failures_t.to(self.device)).cpu().tolist()))
        lengths_all = self._gather_floats(lengths)
        rewards_all = torch.tensor(total_all, dtype=torch.float32)
        adv_all = group_advantages(rewards_all, G, scale=train_cfg.advantage_scale)  # (N_all,)
        n_local = len(result.total)
        adv_local = adv_all[self.rank * n_local:(self.rank + 1) * n_local]
        offset = 0
        for batch in batches:
            n = batch.rollout.completion_ids.shape[0]
            batch.advantages = adv_local[offset:offset + n].to(self.device)
            offset += n

        return StepRollout(
            batches=batches,
            rewards=total_all,
            per_function=per_function_all,
            failures={k: int(v) for k, v in failures_all.items()},
            errors=dict(getattr(result, "errors", {}) or {}),
            lengths=lengths_all,
            truncated=self._gather_floats(truncated),
            zero_std_group_fraction=zero_std_fraction(rewards_all, G),
            rollout_tokens_per_s=float(sum(lengths_all)) / max(rollout_seconds, 1e-9),
            prompts=prompts,
            completions=completions,
            scores=result,
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

    def _update(self, batches: list[GroupBatch]) -> dict:
        """One optimizer update over the whole step's rollouts; returns its loss/stat/grad figures."""
        train_cfg, G = self.train_cfg, self.train_cfg.group_size
        chunk = min(train_cfg.backward_chunk_size or G, G)
        # Normalisers of the full (local) batch, so per-group losses add up to the full-batch loss.
        num_sequences = sum(b.rollout.completion_ids.shape[0] for b in batches)
        num_tokens = float(sum(b.rollout.completion_mask.sum() for b in batches))
        max_length = max(b.rollout.completion_ids.shape[1] for b in batches)
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
                        loss, stats = self.loss_fn(logprobs, old, ref, batch.advantages[part], mask, **norms)
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
        if train_cfg.beta <= 0 and batches[0].ref_logprobs is None:
            stats["kl"] = float("nan")  # no reference pass: the KL is not measured

        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, train_cfg.max_grad_norm))
        lr = float(self.scheduler.get_last_lr()[0])
        finite = _finite(loss_value) and _finite(grad_norm)
        if finite:
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
        indices = self._step_indices(self.data_position)
        local = indices[self.rank * self.local_prompts:(self.rank + 1) * self.local_prompts]
        rollout = self._rollout([(i, self.train_examples[i]) for i in local], step)
        if train_cfg.beta > 0:
            self._fixed_logprobs(rollout.batches, "ref", disable_adapter=True)
        if train_cfg.num_iterations > 1:
            self._fixed_logprobs(rollout.batches, "old", disable_adapter=False)
        updates = [self._update(rollout.batches) for _ in range(train_cfg.num_iterations)]

        self.step = step
        self.data_position += train_cfg.prompts_per_step
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
            zero_std_group_fraction=rollout.zero_std_group_fraction,
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
    _, train_records = training_pool(cfg)
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
