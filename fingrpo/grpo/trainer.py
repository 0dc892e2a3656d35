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
3. score them with every reward (``fingrpo.rewards.score_completions``: per-function values, failures
   counted), gather the rewards of all processes and compute group advantages;
4. reference log-probs (adapter disabled, the same weights: no second copy) only when ``beta > 0``;
   old log-probs only when ``num_iterations`` μ > 1 (with μ = 1, ρ ≡ 1 and the old pass is skipped);
5. μ optimizer updates: per group, one forward of the prompt (``GroupScorer``), its completions'
   log-probs and the GRPO loss with the normalisers of the whole step, back-propagated
   ``train.backward_chunk_size`` completions at a time and the prompt's share once (one chunk's
   activations alive at a time), so the accumulated gradient equals the full-batch gradient; gradients all-reduced across
   processes, clipped, AdamW on the LoRA parameters, warm-up + cosine/linear/constant schedule.

Checkpoints (``train.checkpoint_dir/step-<n>/``, atomic) hold the adapter (safetensors), optimizer,
scheduler, RNG states, step and data position, and the resolved config; ``resume=True`` continues from
the latest one so that 4 steps straight == 2 steps + resume + 2 steps. Metrics: one CSV row per step
(``train.metrics_path``), per-completion rewards in ``train.rollout_rewards_path`` (JSONL rows
``{"step": n, "reward/<name>": [...], "total": [...], "completion_lengths": [...]}``).

Why not DDP: the shared-prefix scorer runs the model body on the prompt once and the completions
against its KV cache — several forwards per backward, partly outside the module's ``forward``, which
DistributedDataParallel's reducer does not support. The LoRA gradients are tiny (≈0.5 M floats for
SmolLM2 with r=8), so one explicit all-reduce of the flattened gradients per update is cheap and exact.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

from fingrpo.errors import ConfigError, TrainingError
from fingrpo.io import atomic_path, write_json_atomic, write_text_atomic

#: K: consecutive non-finite updates, or consecutive steps where a reward failed on every completion,
#: after which training stops with a TrainingError.
MAX_CONSECUTIVE_FAILURES = 3
CHECKPOINT_PREFIX = "step-"


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


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


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


def _load_tensors(path: Path, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary pickled code.
    A file that needs more (or is corrupt) is a :class:`TrainingError` naming it."""
    import torch

    if not path.is_file():
        raise TrainingError(f"{path}: missing from the checkpoint")
    try:
        return torch.load(path, weights_only=True, map_location=map_location)
    except Exception as e:  # UnpicklingError for a poisoned/foreign pickle, RuntimeError for a corrupt zip
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TrainingError(
            f"{path}: refused to load (weights_only): {type(e).__name__}: {first[:200]}; "
            "delete this checkpoint folder or resume from another"
        ) from None


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The complete ``step-<n>`` folder with the largest n (temp folders start with '.', so never match).

    >>> latest_checkpoint("models/checkpoints")   # doctest: +SKIP
    PosixPath('models/checkpoints/step-20')
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "trainer_state.json").is_file():
            suffix = p.name[len(CHECKPOINT_PREFIX):]
            if suffix.isdigit():
                found.append((int(suffix), p))
    return max(found)[1] if found else None


class GRPOTrainer:
    """GRPO with LoRA on a causal LM; see the module docstring for one step.

    ``model``: a peft ``PeftModel`` (a plain model is wrapped with ``config.lora``); ``reward_functions``:
    ``fingrpo.rewards.WeightedReward``s (``build_rewards``) or ``RewardFunction``s; ``train_examples`` /
    ``eval_examples``: ``fingrpo.data.finqa.PromptExample``s (a plain ``str`` is taken as a ready prompt
    with no target); ``config``: the whole :class:`fingrpo.config.Config`.

    >>> trainer = GRPOTrainer(policy, tok, build_rewards(cfg.rewards), train_ex, dev_ex, cfg)   # doctest: +SKIP
    >>> summary = trainer.train()
    >>> summary["steps"], summary["final_metrics"]["reward_mean"]
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        reward_functions: Sequence[Any],
        train_examples: Sequence[Any],
        eval_examples: Sequence[Any] | None,
        config: Any,
        callbacks: Iterable[Any] = (),
        accelerator: Any = None,
    ) -> None:
        import torch
        from peft import PeftModel

        from fingrpo.grpo.loss import GRPOLoss

        self.config = config
        self.tcfg = tcfg = config.train
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
        if tcfg.prompts_per_step % self.world:
            raise ConfigError(
                f"train.prompts_per_step={tcfg.prompts_per_step} must be divisible by the number of processes ({self.world})"
            )
        self.local_prompts = tcfg.prompts_per_step // self.world
        if tcfg.gradient_accumulation_steps > self.local_prompts:
            raise ConfigError(
                f"train.gradient_accumulation_steps={tcfg.gradient_accumulation_steps} exceeds the prompts per "
                f"process and step ({self.local_prompts}): each rollout micro-batch needs at least one prompt"
            )

        if not isinstance(model, PeftModel):
            from fingrpo.model import add_lora

            model = add_lora(model, config.lora)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.reward_functions = list(reward_functions)
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples or [])
        self.callbacks = list(callbacks)
        self.loss_fn = GRPOLoss(tcfg.epsilon, tcfg.epsilon_high, tcfg.beta, tcfg.loss_type)

        # Only the LoRA weights train; the order is deterministic (named_parameters), which the
        # optimizer's checkpointed state relies on.
        self.params = [p for _, p in self.model.named_parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("the model has no trainable parameters (is the LoRA adapter active?)")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=tcfg.learning_rate, betas=tuple(tcfg.adam_betas), weight_decay=tcfg.weight_decay
        )
        from transformers import get_scheduler

        # μ optimizer updates per step: the schedule counts updates, not steps.
        mu = tcfg.num_iterations
        self.scheduler = get_scheduler(
            "constant_with_warmup" if tcfg.lr_scheduler == "constant" else tcfg.lr_scheduler,
            self.optimizer,
            num_warmup_steps=tcfg.warmup_steps * mu,
            num_training_steps=tcfg.max_steps * mu,
        )

        # State that checkpoints carry.
        self.step = 0
        self.data_position = 0  # examples consumed so far (all processes together)
        self.nonfinite_skips = 0
        self._nonfinite_streak = 0
        self._reward_fail_streak: dict[str, int] = {}
        self.should_stop = False
        self.last_samples: list[dict] = []
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
            random.Random(f"{self.tcfg.seed}-{epoch}").shuffle(order)
            self._perm_cache = {epoch: order}  # keep one epoch: positions only move forward
        return self._perm_cache[epoch]

    def _step_indices(self, position: int) -> list[int]:
        """Example indices of the ``prompts_per_step`` examples starting at data ``position``."""
        n = len(self.train_examples)
        return [self._epoch_order(i // n)[i % n] for i in range(position, position + self.tcfg.prompts_per_step)]

    def render(self, example: Any) -> str:
        """The exact prompt text of an example (chat template as configured)."""
        if isinstance(example, str):
            return example
        from fingrpo.data.finqa import render_prompt

        return render_prompt(example, self.tokenizer, use_chat_template=self.config.prompt.use_chat_template)

    def _prompt_ids(self, index: int, example: Any):
        import torch

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
        import torch

        seed = int(np.random.SeedSequence([self.tcfg.seed, step, self.rank]).generate_state(1)[0])
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
        import torch

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

    def _rollout(self, examples: list[tuple[int, Any]], step: int) -> dict:
        """Sample the step's completions in micro-batches; score them; advantages over all processes."""
        import numpy as np
        import torch

        from fingrpo.grpo.loss import group_advantages, zero_std_fraction
        from fingrpo.grpo.rollout import sample_groups
        from fingrpo.rewards import score_completions

        tcfg, G = self.tcfg, self.tcfg.group_size
        gen = self._sampling_generator(step)
        chunks = [list(c) for c in np.array_split(np.arange(len(examples)), tcfg.gradient_accumulation_steps)]
        micro = []
        t0 = time.perf_counter()
        self.model.eval()
        for chunk in chunks:
            prompt_ids = [self._prompt_ids(examples[i][0], examples[i][1]).to(self.device) for i in chunk]
            rollout = sample_groups(
                self.model, prompt_ids, G,
                max_new_tokens=tcfg.max_new_tokens, temperature=tcfg.temperature, top_p=tcfg.top_p,
                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                generator=gen,
            )
            micro.append({"examples": [examples[i][1] for i in chunk], "rollout": rollout})
        rollout_seconds = time.perf_counter() - t0

        # Rewards on this process's completions ...
        prompts, completions, targets, lengths, truncated = [], [], [], [], []
        for mb in micro:
            r = mb["rollout"]
            texts = self._decode(r.completion_ids, r.completion_mask)
            mb["completions"] = texts
            for j, ex in enumerate(mb["examples"]):
                prompts += [self.render(ex)] * G
                targets += [self._target(ex)] * G
            completions += texts
            lengths += [int(x) for x in r.completion_mask.sum(dim=1).tolist()]
            truncated += [float(x) for x in r.truncated.float().tolist()]
        result = score_completions(self.reward_functions, prompts, completions, targets, self.config.rewards.nan_value)

        # ... then gathered: advantages, metrics and the "failed everywhere" check see the whole step.
        total_all = self._gather_floats(result.total)
        per_function_all = {k: self._gather_floats(v) for k, v in result.per_function.items()}
        failures_t = torch.tensor([float(result.failures.get(k, 0)) for k in result.per_function], dtype=torch.float64)
        failures_all = dict(zip(result.per_function, self._all_reduce_sum(failures_t.to(self.device)).cpu().tolist()))
        lengths_all = self._gather_floats(lengths)
        truncated_all = self._gather_floats(truncated)
        rewards_all = torch.tensor(total_all, dtype=torch.float32)
        adv_all = group_advantages(rewards_all, G, scale=tcfg.advantage_scale)  # (N_all,)
        n_local = len(result.total)
        adv_local = adv_all[self.rank * n_local:(self.rank + 1) * n_local]
        offset = 0
        for mb in micro:
            n = mb["rollout"].completion_ids.shape[0]
            mb["advantages"] = adv_local[offset:offset + n].to(self.device)
            offset += n

        tokens_generated = float(sum(lengths_all))
        return {
            "micro": micro,
            "rewards": total_all,
            "per_function": per_function_all,
            "failures": {k: int(v) for k, v in failures_all.items()},
            "errors": dict(getattr(result, "errors", {}) or {}),
            "lengths": lengths_all,
            "truncated": truncated_all,
            "zero_std_group_fraction": zero_std_fraction(rewards_all, G),
            "rollout_tokens_per_s": tokens_generated / max(rollout_seconds, 1e-9),
            "local": {"prompts": prompts, "completions": completions, "result": result},
        }

    def _groups(self, mb: dict):
        """Yield (prompt_ids [1 tensor], row slice) per group of a micro-batch."""
        r, G = mb["rollout"], self.tcfg.group_size
        for g, p in enumerate(r.prompt_ids):
            yield [p], slice(g * G, (g + 1) * G)

    def _fixed_logprobs(self, micro: list[dict], key: str, disable_adapter: bool) -> None:
        """Store per-group log-probs without gradients: ``old`` (sampling policy) or ``ref`` (adapter off)."""
        import contextlib

        import torch

        from fingrpo.grpo.rollout import completion_logprobs

        G = self.tcfg.group_size
        ctx = self.model.disable_adapter() if disable_adapter else contextlib.nullcontext()
        self.model.eval()
        with torch.no_grad(), ctx:
            for mb in micro:
                r = mb["rollout"]
                mb[key] = [
                    completion_logprobs(
                        self.model, p, r.completion_ids[rows], r.completion_mask[rows], G,
                        temperature=self.tcfg.temperature,
                    ).detach()
                    for p, rows in self._groups(mb)
                ]

    def _update(self, micro: list[dict]) -> dict:
        """One optimizer update over the whole step's rollouts; returns its loss/stat/grad figures."""
        import torch

        from fingrpo.grpo.rollout import GroupScorer

        G = self.tcfg.group_size
        chunk = min(self.tcfg.backward_chunk_size or G, G)
        # Normalisers of the full (local) batch, so per-group losses add up to the full-batch loss.
        num_sequences = sum(mb["rollout"].completion_ids.shape[0] for mb in micro)
        num_tokens = float(sum(mb["rollout"].completion_mask.sum() for mb in micro))
        max_length = max(mb["rollout"].completion_ids.shape[1] for mb in micro)
        norms = {"num_sequences": num_sequences, "num_tokens": max(num_tokens, 1.0), "max_length": max_length}

        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        loss_sum = 0.0
        stat_keys = ("kl", "clip_fraction_low", "clip_fraction_high", "ratio_mean")
        stat_sums = dict.fromkeys(stat_keys, 0.0)
        stat_tokens = 0.0
        for mb in micro:
            r = mb["rollout"]
            for gi, (p, rows) in enumerate(self._groups(mb)):
                # One forward of the prompt; its G completions back-propagated `chunk` rows at a time (each
                # backward frees that chunk's activations), then the prompt's share once: the gradients of
                # one backward over the group, the peak memory of one chunk. Scored at the sampling
                # temperature, so ρ compares the sampling distributions.
                with GroupScorer(self.model, p[0], temperature=self.tcfg.temperature) as scorer:
                    for start in range(0, G, chunk):
                        end = min(start + chunk, G)
                        local, part = slice(start, end), slice(rows.start + start, rows.start + end)
                        ids, mask = r.completion_ids[part], r.completion_mask[part]
                        logprobs = scorer.logprobs(ids, mask)  # (chunk, T) with grad
                        old = mb["old"][gi][local] if "old" in mb else None
                        ref = mb["ref"][gi][local] if "ref" in mb else None
                        loss, stats = self.loss_fn(logprobs, old, ref, mb["advantages"][part], mask, **norms)
                        loss.backward()
                        loss_sum += float(loss.detach())
                        w = float(stats.get("num_tokens", float(mask.sum())))
                        for k in stat_keys:
                            v = stats.get(k, float("nan"))
                            if _finite(v) and w > 0:
                                stat_sums[k] += v * w
                        stat_tokens += w
                    scorer.backward_prompt()

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
        if self.tcfg.beta <= 0 and "ref" not in micro[0]:
            stats["kl"] = float("nan")  # no reference pass: the KL is not measured

        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.tcfg.max_grad_norm))
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
        step = self.step + 1
        indices = self._step_indices(self.data_position)
        local = indices[self.rank * self.local_prompts:(self.rank + 1) * self.local_prompts]
        batch = self._rollout([(i, self.train_examples[i]) for i in local], step)
        micro = batch["micro"]
        if self.tcfg.beta > 0:
            self._fixed_logprobs(micro, "ref", disable_adapter=True)
        if self.tcfg.num_iterations > 1:
            self._fixed_logprobs(micro, "old", disable_adapter=False)
        updates = [self._update(micro) for _ in range(self.tcfg.num_iterations)]

        self.step = step
        self.data_position += self.tcfg.prompts_per_step
        rewards = batch["rewards"]
        metrics: dict[str, float] = {
            "step": step,
            "epoch": self.data_position / len(self.train_examples),
            "loss": _mean([u["loss"] for u in updates]),
            "reward_mean": _mean(rewards),
            "reward_std": _std(rewards),
        }
        for name, values in batch["per_function"].items():
            metrics[f"reward/{name}_mean"] = _mean(values)
            metrics[f"reward/{name}_std"] = _std(values)
            metrics[f"reward/{name}_failures"] = batch["failures"].get(name, 0)
        for k in ("kl", "clip_fraction_low", "clip_fraction_high", "ratio_mean"):
            metrics[k] = _mean([u[k] for u in updates])
        finite_norms = [u["grad_norm"] for u in updates if u["finite"]]
        metrics.update(
            completion_length_mean=_mean(batch["lengths"]),
            completion_length_max=max(batch["lengths"]) if batch["lengths"] else 0,
            truncated_fraction=_mean(batch["truncated"]),
            zero_std_group_fraction=batch["zero_std_group_fraction"],
            grad_norm=_mean(finite_norms) if finite_norms else float("nan"),
            lr=updates[0]["lr"],
            rollout_tokens_per_s=batch["rollout_tokens_per_s"],
            nonfinite_skips=self.nonfinite_skips,
            step_seconds=time.perf_counter() - t0,
        )
        self._last_batch = batch
        self.last_samples = self._samples(batch, step)
        return metrics

    def _samples(self, batch: dict, step: int) -> list[dict]:
        """The first ``num_samples_to_log`` completions of this process, with their rewards."""
        local = batch["local"]
        result = local["result"]
        out = []
        for i in range(min(self.tcfg.num_samples_to_log, len(local["completions"]))):
            row = {"step": step, "prompt_tail": local["prompts"][i][-200:], "completion": local["completions"][i],
                   "reward": result.total[i]}
            row.update({f"reward/{k}": v[i] for k, v in result.per_function.items()})
            out.append(row)
        return out

    def _check_failures(self, batch: dict, step: int) -> None:
        n = len(batch["rewards"])
        for name, failed in batch["failures"].items():
            streak = self._reward_fail_streak.get(name, 0) + 1 if failed >= n > 0 else 0
            self._reward_fail_streak[name] = streak
            if streak >= MAX_CONSECUTIVE_FAILURES:
                err = batch["errors"].get(name, "")
                raise TrainingError(
                    f"step {step}: reward {name!r} failed on every completion for {streak} steps in a row"
                    + (f" (first error: {err})" if err else "")
                )

    # ---------------------------------------------------------------------------------------- evaluation

    def evaluate(self, step: int | None = None) -> tuple[dict, list[dict]]:
        """Greedy completions on the first ``eval_subset_size`` dev examples: mean reward, execution
        accuracy (official rule), tolerant accuracy, format rate, and a few sample predictions."""
        from fingrpo.evaluate import generate_completions, score_prediction
        from fingrpo.rewards import score_completions

        examples = self.eval_examples[: self.tcfg.eval_subset_size]
        if not examples:
            return {}, []
        prompts = [self.render(ex) for ex in examples]
        self.model.eval()
        completions = generate_completions(
            self.model, self.tokenizer, prompts, max_new_tokens=self.tcfg.max_new_tokens,
            batch_size=max(1, min(len(prompts), self.config.evaluate.batch_size)),
        )
        result = score_completions(
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

    def _rng_state(self) -> dict:
        import numpy as np
        import torch

        np_state = np.random.get_state()
        state = {
            "python": random.getstate(),
            # numpy's state holds an ndarray, which weights_only loading refuses: store it as a list
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "torch": torch.get_rng_state(),
            # the sampling generator is re-derived from (seed, step, rank) each step; kept for the record
            "sampling": self._sampling_generator(self.step + 1).get_state().cpu(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _set_rng_state(self, state: dict) -> None:
        import numpy as np
        import torch

        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = state["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint_dir/step-<n>/`` atomically (main process); every process must call it."""
        import torch

        rng_states = self._gather_objects(self._rng_state())  # one entry per rank
        path = Path(self.tcfg.checkpoint_dir) / f"{CHECKPOINT_PREFIX}{self.step}"
        if self.is_main:
            with atomic_path(path, is_dir=True) as tmp:
                self.model.save_pretrained(tmp / "adapter", safe_serialization=True)
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save({"ranks": rng_states}, tmp / "rng_state.pt")
                write_json_atomic(tmp / "config.json", self.config.public_dump())
                write_json_atomic(tmp / "trainer_state.json", {
                    "step": self.step,
                    "data_position": self.data_position,
                    "num_processes": self.world,
                    "nonfinite_skips": self.nonfinite_skips,
                    "nonfinite_streak": self._nonfinite_streak,
                    "reward_fail_streak": self._reward_fail_streak,
                })
            self._prune_checkpoints()
        self.accelerator.wait_for_everyone()
        self._callback("on_save", self.step, path)
        return path

    def _prune_checkpoints(self) -> None:
        import shutil

        keep = self.tcfg.keep_checkpoints
        if keep is None:
            return
        root = Path(self.tcfg.checkpoint_dir)
        steps = sorted(
            (int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in root.iterdir()
            if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()
        )
        for _, p in steps[:-keep]:
            shutil.rmtree(p, ignore_errors=True)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore adapter, optimizer, scheduler, RNG, step and data position from a checkpoint folder."""
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(path)
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        saved_cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        current = self.config.model_dump(mode="json")
        for section in ("model", "lora"):
            if saved_cfg.get(section) != current.get(section):
                raise TrainingError(
                    f"{path}: checkpoint was trained with a different {section} config "
                    f"({saved_cfg.get(section)} vs now {current.get(section)}); resume with the same params"
                )
        weights = path / "adapter" / "adapter_model.safetensors"
        if not weights.is_file():
            raise TrainingError(f"{path}: adapter/adapter_model.safetensors missing")
        result = set_peft_model_state_dict(self.model, load_file(str(weights), device=str(self.device)))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise TrainingError(f"{weights}: unexpected adapter weights {unexpected[:3]}")
        self.optimizer.load_state_dict(_load_tensors(path / "optimizer.pt", map_location=self.device))
        self.scheduler.load_state_dict(_load_tensors(path / "scheduler.pt"))
        rng = _load_tensors(path / "rng_state.pt")["ranks"]
        self._set_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0])
        self.step = int(state["step"])
        self.data_position = int(state["data_position"])
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
        self._nonfinite_streak = int(state.get("nonfinite_streak", 0))
        self._reward_fail_streak = {k: int(v) for k, v in state.get("reward_fail_streak", {}).items()}

    def _init_metric_files(self, resume: bool) -> None:
        """Fresh run: empty files. Resume: keep the rows up to the checkpoint's step (drops rows written
        after the checkpoint by an interrupted run, so no step appears twice)."""
        if not self.is_main:
            return
        metrics_path, rollout_path = Path(self.tcfg.metrics_path), Path(self.tcfg.rollout_rewards_path)
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
        write_text_atomic(self.tcfg.metrics_path, buf.getvalue() if fields else "")

    def _log_rollout(self, step: int, batch: dict) -> None:
        row = {"step": step, **{f"reward/{k}": v for k, v in batch["per_function"].items()},
               "total": batch["rewards"], "completion_lengths": [int(x) for x in batch["lengths"]]}
        path = Path(self.tcfg.rollout_rewards_path)
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
        import torch
        from tqdm.auto import tqdm

        from transformers import set_seed

        tcfg = self.tcfg
        if tcfg.threads:
            torch.set_num_threads(tcfg.threads)
        set_seed(tcfg.seed)
        if resume:
            ckpt = latest_checkpoint(tcfg.checkpoint_dir)
            if ckpt is None:
                raise TrainingError(
                    f"{tcfg.checkpoint_dir}: no checkpoint to resume from (run without --resume to start fresh)"
                )
            self.load_checkpoint(ckpt)
        self._init_metric_files(resume)
        self._callback("on_train_begin", self)
        start_step, t_start = self.step, time.perf_counter()
        first_reward = None
        last_saved = self.step if resume else -1
        metrics: dict = {}
        bar = tqdm(total=tcfg.max_steps, initial=self.step, desc="grpo", disable=not self.is_main, dynamic_ncols=True)
        try:
            while self.step < tcfg.max_steps and not self.should_stop:
                metrics = self.train_step()
                step = self.step
                first_reward = metrics["reward_mean"] if first_reward is None else first_reward
                if step % tcfg.eval_interval == 0 and self.eval_examples:
                    eval_metrics, samples = self.evaluate(step) if self.is_main else ({}, [])
                    self.accelerator.wait_for_everyone()
                    metrics.update(eval_metrics)
                    self.last_eval = eval_metrics
                    self._callback("on_evaluate", step, eval_metrics, samples)
                if self.is_main:
                    self._rows.append(metrics)
                    self._write_csv()
                    self._log_rollout(step, self._last_batch)
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
                self._check_failures(self._last_batch, step)
                if step % tcfg.save_interval == 0 or step == tcfg.max_steps or self.should_stop:
                    self.save_checkpoint()
                    last_saved = step
        finally:
            bar.close()
        if last_saved != self.step:
            self.save_checkpoint()
        output_dir = None
        if self.step >= tcfg.max_steps and save_final:
            output_dir = str(self.save_adapter(tcfg.output_dir))
        summary = {
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "stopped_early": self.step < tcfg.max_steps,
            "seconds": time.perf_counter() - t_start,
            "seconds_per_step": (time.perf_counter() - t_start) / max(1, self.step - start_step),
            "first_reward_mean": first_reward,
            "final_metrics": metrics,
            "last_eval": self.last_eval,
            "nonfinite_skips": self.nonfinite_skips,
            "checkpoint": str(latest_checkpoint(tcfg.checkpoint_dir)),
            "peak_rss_mb": _peak_rss_mb(),
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


def _tracking_callbacks(cfg: Any, callbacks: Sequence[Any]) -> list[Any]:
    """The MLflow callback when tracking is enabled and none was passed (fingrpo.tracking imports mlflow
    lazily; the trainer never does)."""
    out = list(callbacks)
    if not cfg.tracking.enabled or any(type(cb).__name__ == "MLflowCallback" for cb in out):
        return out
    try:
        from fingrpo.tracking import MLflowCallback
    except ImportError as e:
        raise TrainingError(
            f"tracking.enabled is true but fingrpo.tracking cannot be imported ({e}); set tracking.enabled=false"
        ) from None
    return out + [MLflowCallback(cfg)]


def train_from_config(cfg: Any, resume: bool = False, callbacks: Sequence[Any] = ()) -> dict:
    """config → data → model → LoRA → rewards → trainer → train → save ``train.output_dir`` → summary.

    >>> summary = train_from_config(load_config("params.yaml", ["train.max_steps=2"]))   # doctest: +SKIP
    """
    import torch
    from transformers import set_seed

    from fingrpo.data.finqa import load_split, make_examples
    from fingrpo.data.sources import training_pool
    from fingrpo.model import add_lora, load_adapter, load_model_and_tokenizer
    from fingrpo.rewards import build_rewards

    tcfg = cfg.train
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)

    # model (before the data: prompts are cut to a token budget with the tokenizer)
    model, tokenizer = load_model_and_tokenizer(cfg.model)

    # data: the first `few_shot` records of the first source are the worked examples, the mixed rest is trained on
    few, train_records = training_pool(cfg)
    train_examples = make_examples(train_records, cfg.prompt, tokenizer=tokenizer, few_shot_records=few)
    dev_records = load_split(cfg.data.dev_path)[: tcfg.eval_subset_size]
    eval_examples = make_examples(dev_records, cfg.prompt, tokenizer=tokenizer, few_shot_records=few)

    # LoRA (seeded: the adapter's initial weights are part of the run)
    set_seed(tcfg.seed)
    if tcfg.init_adapter:  # the warm start (fingrpo sft): its LoRA weights train on
        policy = load_adapter(model, tcfg.init_adapter, is_trainable=True)
    else:
        policy = add_lora(model, cfg.lora)
    rewards = build_rewards(cfg.rewards)
    trainer = GRPOTrainer(
        policy, tokenizer, rewards, train_examples, eval_examples, cfg,
        callbacks=_tracking_callbacks(cfg, callbacks),
    )
    return trainer.train(resume=resume)


class GRPOJSONTrainer:
    """The seed's entry point, mapped onto the typed config and :func:`train_from_config`.

    >>> t = GRPOJSONTrainer(model_str="bundled:SmolLM2-135M-Instruct", train_path="data/finqa/train.json",
    ...                     dev_path="data/finqa/dev.json", test_path="data/finqa/test.json")   # doctest: +SKIP
    >>> summary = t.train(num_epochs=1, batch_size=4, learning_rate=1e-4, eval_interval=10, save_interval=5)

    ``num_epochs`` becomes ``train.max_steps = ceil(num_epochs * train records / batch_size)``;
    ``batch_size`` is ``train.prompts_per_step``. Other settings come from ``params`` (a params.yaml,
    default none: built-in defaults) and ``overrides`` (``["train.group_size=4", ...]`` or a nested dict).
    """

    def __init__(
        self,
        model_str: str | None = None,
        train_path: str = "data/finqa/train.json",
        dev_path: str = "data/finqa/dev.json",
        test_path: str | None = "data/finqa/test.json",
        params: str | None = None,
        overrides: list[str] | dict | None = None,
        callbacks: Sequence[Any] = (),
    ) -> None:
        from fingrpo.config import load_config

        self.cfg = load_config(params, overrides)
        tree = self.cfg.model_dump(mode="json")
        if model_str is not None:
            tree["model"]["name_or_path"] = model_str
        tree["data"].update(train_path=str(train_path), dev_path=str(dev_path))
        if test_path is not None:
            tree["data"]["test_path"] = str(test_path)
        self._tree = tree
        self.callbacks = list(callbacks)
        self.summary: dict | None = None

    def train(
        self,
        num_epochs: float = 1,
        batch_size: int = 4,
        learning_rate: float = 2e-4,
        eval_interval: int = 10,
        save_interval: int = 5,
        resume: bool = False,
    ) -> dict:
        from fingrpo.config import config_from_dict
        from fingrpo.data.finqa import load_split

        tree = json.loads(json.dumps(self._tree))
        n_records = len(load_split(tree["data"]["train_path"])) - tree["prompt"]["few_shot"]
        if tree["train"].get("max_train_records"):
            n_records = min(n_records, tree["train"]["max_train_records"])
        if n_records < 1:
            raise TrainingError(f"{tree['data']['train_path']}: no records left after the few-shot examples")
        max_steps = max(1, math.ceil(num_epochs * n_records / batch_size))
        tree["train"].update(
            max_steps=max_steps, prompts_per_step=batch_size, learning_rate=learning_rate,
            eval_interval=eval_interval, save_interval=save_interval,
            warmup_steps=min(tree["train"]["warmup_steps"], max(0, max_steps - 1)),
        )
        self.cfg = config_from_dict(tree, "GRPOJSONTrainer")
        self.summary = train_from_config(self.cfg, resume=resume, callbacks=self.callbacks)
        return self.summary
