"""fingrpo's GRPO step against Hugging Face TRL's ``GRPOTrainer`` on the same work, in one run (issue 5).

    pip install -e '.[bench]' -c constraints.txt          # TRL is an optional extra (trl==1.16.0)
    python bench/grpo_vs_trl.py                           # gold + full modes, 1 warm-up + 2 measured steps each
    python bench/grpo_vs_trl.py --quick                   # 2 prompts x G=4, 32 new tokens (< 10 min on 2 cores)
    python bench/grpo_vs_trl.py --modes gold --steps 3    # one mode, more measured steps
    python bench/grpo_vs_trl.py --worker fingrpo --mode gold --steps 1 --profile bench/results/profile-gold.txt

The same work on both sides: the bundled SmolLM2-135M-Instruct (fp32; CUDA when present, else CPU),
LoRA r=8 / alpha=16 on ``q_proj``,``v_proj`` (dropout 0), G=8 completions for each of 4 prompts per step,
64 new tokens at temperature 1.0, beta=0.04, one policy update per rollout (mu=1), and the SAME prompt
texts: ``fingrpo.data.prompts.make_examples`` + ``render_prompt`` (chat template applied) over the first
train records, rewarded by the same ``fingrpo.rewards.reward_completions``. Every step of a run uses the
same prompts (the prompt set is one batch), so both systems do the same prefill work every step.
TRL keeps its own defaults for everything not listed (gradient checkpointing on, its loss type,
learning rate ...); it gets ``use_vllm=False``, ``bf16=False``, ``report_to=[]``, ``save_strategy="no"``
and one generation batch of P*G completions per optimizer step (``per_device_train_batch_size=P*G``).

Each system runs in a fresh process (``--worker``) that loads the model, does 1 warm-up step and
``--steps`` measured ones, and prints one ``BENCH_RESULT {json}`` line; the parent alternates the two
systems (fingrpo first in one mode, TRL first in the next; with ``--rounds`` > 1 the order flips every
round). Before the workers the parent measures the machine's fp32 matmul rate and memory-copy bandwidth;
the **floor** of a step is the arithmetic it must do (each prompt once per group in sampling and in each
scoring pass, completion-only logits, policy forward + activation backward, reference forward) over that
matmul rate, with decoding bounded below by the bytes of weights + KV cache read per decode step over the
bandwidth. The table gives median s/step, rollout tokens/s, peak RSS, floor and measured/floor; the
ratios fingrpo/TRL; and ``bench/results/<date>-<host>[-quick].json`` holds everything with the machine's
description. See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
RESULT_MARKER = "BENCH_RESULT "
SYSTEMS = ("fingrpo", "trl")
MODES = ("gold", "full")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------------------------------------ the work


@dataclass
class BenchSpec:
    """What one step is: the same for both systems (issue 5's settings are the defaults)."""

    prompts: int = 4  # P distinct prompts per step
    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    beta: float = 0.04
    num_iterations: int = 1  # mu
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    few_shot: int = 0  # worked examples in each prompt (0: gold ~400 tokens, full ~1,100-1,500)
    warmup: int = 1
    steps: int = 2  # measured steps per worker
    seed: int = 0
    threads: int | None = None  # torch intra-op threads in the workers (None: torch's default)
    # fingrpo's memory knob (train.backward_chunk_size, params.yaml's value): completions per backward pass
    # against one prompt forward, the same gradients; 0: the whole group at once. TRL's counterpart is its
    # default gradient checkpointing.
    backward_chunk_size: int = 2
    model: str = "bundled:SmolLM2-135M-Instruct"
    params: str = str(ROOT / "params.yaml")
    data: str = str(ROOT / "data" / "finqa" / "train.json")

    @classmethod
    def quick(cls, **kw: Any) -> "BenchSpec":
        """``--quick``: 2 prompts x G=4, 32 new tokens."""
        return cls(**{"prompts": 2, "group_size": 4, "max_new_tokens": 32, **kw})

    def to_argv(self) -> list[str]:
        """The worker command-line flags that rebuild this spec."""
        argv = [
            "--prompts", str(self.prompts), "--group-size", str(self.group_size),
            "--max-new-tokens", str(self.max_new_tokens), "--temperature", str(self.temperature),
            "--beta", str(self.beta), "--few-shot", str(self.few_shot), "--steps", str(self.steps),
            "--warmup", str(self.warmup), "--seed", str(self.seed), "--model", self.model,
            "--params", self.params, "--data", self.data, "--backward-chunk-size", str(self.backward_chunk_size),
        ]
        if self.threads:
            argv += ["--threads", str(self.threads)]
        return argv


# fingrpo's train knobs set to what trl.GRPOConfig (1.16) defaults to, so that neither side inherits a
# setting the other lacks (params.yaml's recipe uses DAPO's clip-higher, a larger learning rate, ...).
# They change the numbers of an update, not its cost.
TRL_DEFAULTS: dict[str, Any] = {
    "loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.2, "learning_rate": 1e-6, "weight_decay": 0.0,
    "adam_betas": [0.9, 0.999], "max_grad_norm": 1.0, "lr_scheduler": "linear", "warmup_steps": 0,
    "advantage_scale": "group",
}


def bench_config(spec: BenchSpec, mode: str, workdir: str | Path) -> Any:
    """The fingrpo :class:`~fingrpo.config.Config` of a benchmark run: params.yaml's rewards and prompt
    format + the spec, with the loss and optimizer knobs pinned to TRL's defaults (``TRL_DEFAULTS``).

    Outputs (checkpoints, metrics) go under ``workdir``; tracking is off.
    """
    from fingrpo.config import load_config

    workdir = Path(workdir)
    params = spec.params if Path(spec.params).exists() else None
    return load_config(params, {
        "model": {"name_or_path": spec.model, "dtype": "float32"},
        "prompt": {"context_mode": mode, "few_shot": spec.few_shot, "use_chat_template": True},
        "lora": {"r": spec.lora_r, "alpha": spec.lora_alpha, "dropout": 0.0, "target_modules": list(spec.lora_targets)},
        "train": {
            "seed": spec.seed, "max_steps": spec.warmup + spec.steps,
            "prompts_per_step": spec.prompts, "group_size": spec.group_size, "max_new_tokens": spec.max_new_tokens,
            "temperature": spec.temperature, "top_p": 1.0, "beta": spec.beta, "num_iterations": spec.num_iterations,
            "gradient_accumulation_steps": 1, "threads": spec.threads, "max_train_records": spec.prompts,
            "backward_chunk_size": spec.backward_chunk_size or None, **TRL_DEFAULTS, "init_adapter": None,
            "output_dir": str(workdir / "adapter"), "checkpoint_dir": str(workdir / "checkpoints"),
            "metrics_path": str(workdir / "metrics.csv"), "rollout_rewards_path": str(workdir / "rollouts.jsonl"),
        },
        "tracking": {"enabled": False},
    })


def bench_examples(cfg: Any, tokenizer: Any, spec: BenchSpec) -> list[Any]:
    """The P prompt examples: the train records after the ``few_shot`` worked examples (deterministic)."""
    from fingrpo.data.finqa import load_split
    from fingrpo.data.prompts import make_examples
    from fingrpo.errors import DataError

    records = load_split(spec.data)
    few, rest = records[: spec.few_shot], records[spec.few_shot:]
    if len(rest) < spec.prompts:
        raise DataError(f"{spec.data}: {len(rest)} records after the worked examples, the benchmark needs {spec.prompts}")
    return make_examples(rest[: spec.prompts], cfg.prompt, tokenizer=tokenizer, few_shot_records=few)


def prompt_token_ids(examples: list[Any], tokenizer: Any) -> list[list[int]]:
    """Token ids of each rendered prompt (the chat template already starts with ``<|im_start|>``)."""
    from fingrpo.data.prompts import render_prompt

    return [tokenizer(render_prompt(e, tokenizer), add_special_tokens=False)["input_ids"] for e in examples]


# ------------------------------------------------------------------------------------------------ the machine


def peak_gpu_gib() -> float | None:
    """Peak CUDA memory allocated by torch in this process (GiB), None without a GPU."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def peak_rss_gib() -> float:
    """Peak resident memory of this process and of its waited-for children, GiB (ru_maxrss is KiB on Linux)."""
    scale = 1 if sys.platform == "darwin" else 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return max(own, kids) / 2**30


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    try:
        pairs = set()
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":", 1)[1].strip()
            elif line.startswith("core id"):
                core = line.split(":", 1)[1].strip()
                pairs.add((phys, core))
        return len(pairs) or None
    except OSError:
        return None


def machine_info() -> dict:
    """CPU model, cores, memory, torch version and threads, GPU (if any), load average."""
    import torch

    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page / 2**30, 1)
    except (ValueError, OSError):
        pass
    try:
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    for pkg in ("transformers", "peft", "trl", "accelerate"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - not installed: recorded as None
            info[pkg] = None
    return info


def measure_matmul_gflops(seconds: float = 2.0, n: int = 2048, device: str = "cpu") -> float:
    """Best fp32 ``(n, n) @ (n, n)`` rate over ~``seconds`` (GFLOP/s): the arithmetic ceiling of the floor."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    torch.mm(a, b, out=out)  # warm-up (allocations, kernel choice)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def measure_memory_gbps(seconds: float = 2.0, mib: int = 256, device: str = "cpu") -> float:
    """Best large-tensor copy rate over ~``seconds``, counting bytes read + written (GB/s).

    Decoding reads every weight once per token step; this is the ceiling that bounds it."""
    import torch

    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def measure_ceilings(seconds: float, device: str) -> dict:
    """``{"matmul_gflops", "memory_gbps", "device"}`` measured now."""
    return {"matmul_gflops": measure_matmul_gflops(seconds, device=device),
            "memory_gbps": measure_memory_gbps(seconds, device=device), "device": device}


# ------------------------------------------------------------------------------------------------ the floor


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs from a llama-style config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    bytes_per_param: int = 4  # fp32

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        """From a Hugging Face ``config.json`` dict.

        >>> s = ModelShape.from_config({"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
        ...     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True})
        >>> round(s.params / 1e6, 1)
        134.5
        """
        heads = int(cfg["num_attention_heads"])
        return cls(
            layers=int(cfg["num_hidden_layers"]), hidden=int(cfg["hidden_size"]),
            intermediate=int(cfg["intermediate_size"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            vocab=int(cfg["vocab_size"]), tied=bool(cfg.get("tie_word_embeddings", False)),
        )

    @property
    def body_params(self) -> int:
        """Matmul weights of the decoder layers (q, k, v, o, gate, up, down); norms are negligible."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * (d * q + 2 * d * kv + q * d + 3 * d * self.intermediate)

    @property
    def head_params(self) -> int:
        return self.hidden * self.vocab

    @property
    def params(self) -> int:
        """All weights (embedding counted once when tied to the LM head; norms included)."""
        norms = (2 * self.layers + 1) * self.hidden
        return self.body_params + self.head_params * (1 if self.tied else 2) + norms

    @property
    def kv_bytes_per_token(self) -> int:
        """Key + value bytes one token occupies in the cache, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_param


def forward_flops(shape: ModelShape, prompt_lengths: list[int], completion_lengths: list[int],
                  group_size: int) -> dict[str, float]:
    """FLOPs of ONE forward pass over a step's work with each prompt computed once per group.

    ``prompt``: the body over every prompt token + causal attention + the LM head at its last position;
    ``completions``: the body, the LM head (completion-only logits) and attention over prompt + earlier
    completion tokens for every generated token. Rows are grouped: ``completion_lengths[p*G:(p+1)*G]``
    belong to prompt p.

    >>> s = ModelShape(1, 4, 8, 1, 1, 4, 10, True)
    >>> forward_flops(s, [3], [2, 0], group_size=2)["completions"] > 0
    True
    """
    body = 2 * shape.body_params  # per token
    head = 2 * shape.head_params  # per token whose logits are needed
    attn = 4 * shape.layers * shape.heads * shape.head_dim  # per (query, key) pair: QK^T and AV
    prompt = sum(body * n + attn * n * (n + 1) / 2 + head for n in prompt_lengths)
    comp = 0.0
    for p, n_prompt in enumerate(prompt_lengths):
        for n in completion_lengths[p * group_size:(p + 1) * group_size]:
            comp += (body + head) * n + attn * (n * n_prompt + n * (n + 1) / 2)
    return {"prompt": prompt, "completions": comp}


def step_floor(shape: ModelShape, prompt_lengths: list[int], completion_lengths: list[int], group_size: int,
               beta: float, num_iterations: int, matmul_gflops: float, memory_gbps: float) -> dict[str, float]:
    """Seconds a GRPO step must take at the measured ceilings, by phase, and their sum (``total``).

    - ``prefill``: each prompt once (sampling), compute-bound;
    - ``decode``: max(completion FLOPs / rate, per decode step (all weights + the KV cache: each prompt's
      once per group, each row's own completion) read once / bandwidth);
    - ``policy``: forward + backward of prompt-once-per-group scoring, mu times; the base weights are
      frozen, so the backward is the activation gradients (~1x forward; LoRA's weight gradients ~r/d);
    - ``reference``: one forward (adapter off) when beta > 0; ``old``: one forward when mu > 1.

    >>> s = ModelShape(30, 576, 1536, 9, 3, 64, 49152, True)
    >>> f = step_floor(s, [400] * 4, [64] * 32, 8, 0.04, 1, 200.0, 40.0)
    >>> 15 < f["total"] < 25
    True
    """
    rate = matmul_gflops * 1e9
    fwd = forward_flops(shape, prompt_lengths, completion_lengths, group_size)
    one_pass = fwd["prompt"] + fwd["completions"]
    # decode memory traffic: step t reads the weights, each prompt's KV once, and each live row's t tokens
    steps = max(completion_lengths) if completion_lengths else 0
    weight_bytes = shape.params * shape.bytes_per_param
    prefix_kv = sum(prompt_lengths) * shape.kv_bytes_per_token
    rows = len(completion_lengths)
    decode_bytes = sum(weight_bytes + prefix_kv + rows * t * shape.kv_bytes_per_token for t in range(steps))
    decode_memory_s = decode_bytes / (memory_gbps * 1e9)
    out = {
        "prefill": fwd["prompt"] / rate,
        "decode_compute": fwd["completions"] / rate,
        "decode_memory": decode_memory_s,
        "policy": num_iterations * 2 * one_pass / rate,
        "reference": one_pass / rate if beta > 0 else 0.0,
        "old": one_pass / rate if num_iterations > 1 else 0.0,
        "flops": one_pass * (1 + 2 * num_iterations + (beta > 0) + (num_iterations > 1)),
    }
    out["decode"] = max(out["decode_compute"], out["decode_memory"])
    out["total"] = out["prefill"] + out["decode"] + out["policy"] + out["reference"] + out["old"]
    return out


def model_shape(spec: BenchSpec) -> ModelShape:
    """The shape of the benchmarked model, read from its config.json (no weights loaded)."""
    from fingrpo.config import ModelConfig
    from fingrpo.model import resolve_model_path

    path = Path(resolve_model_path(ModelConfig(name_or_path=spec.model)))
    return ModelShape.from_config(json.loads((path / "config.json").read_text(encoding="utf-8")))


# ------------------------------------------------------------------------------------------------ workers


class _PhaseTimer:
    """Wall seconds per named phase, reset every step: ``wrap(obj, "method", "phase")`` times each call."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.seconds: dict[str, float] = {}
        self.sync = sync

    def wrap(self, obj: Any, name: str, phase: str | Callable[[], str]) -> None:
        inner = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            key = phase() if callable(phase) else phase
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            self.sync()
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
            return out

        setattr(obj, name, timed)

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return {k: round(v, 4) for k, v in out.items()}


def _setup_torch(spec: BenchSpec):
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    return torch, sync


def run_fingrpo_worker(spec: BenchSpec, mode: str, profile_path: str | None = None) -> dict:
    """Load model + LoRA with fingrpo's own code, then 1 warm-up + ``spec.steps`` timed ``train_step``s."""
    torch, sync = _setup_torch(spec)
    from transformers import set_seed

    from fingrpo.grpo.trainer import GRPOTrainer
    from fingrpo.model import add_lora, load_model_and_tokenizer
    from fingrpo.rewards import build_rewards

    t_load = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fingrpo-bench-") as workdir:
        cfg = bench_config(spec, mode, workdir)
        model, tokenizer = load_model_and_tokenizer(cfg.model)
        examples = bench_examples(cfg, tokenizer, spec)
        set_seed(spec.seed)
        policy = add_lora(model, cfg.lora)
        trainer = GRPOTrainer(policy, tokenizer, build_rewards(cfg.rewards), examples, None, cfg)
        load_s = time.perf_counter() - t_load

        timer = _PhaseTimer(sync)
        lengths: list[list[int]] = []
        rollout = trainer._rollout  # the step's phases, timed from outside (the trainer is not modified)

        def rollout_and_keep_lengths(*args: Any, **kwargs: Any) -> Any:
            batch = rollout(*args, **kwargs)
            lengths.append([int(x) for x in batch.lengths])
            return batch

        trainer._rollout = rollout_and_keep_lengths
        timer.wrap(trainer, "_rollout", "rollout+rewards")
        timer.wrap(trainer, "_fixed_logprobs", "reference_forward")
        timer.wrap(trainer, "_update", "policy_fwd_bwd+optimizer")

        steps = []
        for i in range(spec.warmup + spec.steps):
            profiling = profile_path is not None and i == spec.warmup
            prof = _profiler(torch) if profiling else None
            t0 = time.perf_counter()
            if prof is not None:
                with prof:
                    metrics = trainer.train_step()
            else:
                metrics = trainer.train_step()
            sync()
            seconds = time.perf_counter() - t0
            if prof is not None:
                _write_profile(prof, profile_path, spec, mode, seconds)
            tokens = sum(lengths[-1])
            steps.append({
                "seconds": seconds, "warmup": i < spec.warmup, "generated_tokens": tokens,
                "rollout_tokens_per_s": float(metrics["rollout_tokens_per_s"]),
                "completion_lengths": lengths[-1], "phases": timer.take(), "loss": float(metrics["loss"]),
                "reward_mean": float(metrics["reward_mean"]),
            })
        return {
            "system": "fingrpo", "mode": mode, "load_seconds": load_s, "steps": steps,
            "prompt_lengths": [len(x) for x in prompt_token_ids(examples, tokenizer)],
            "torch_threads": torch.get_num_threads(), "device": str(trainer.device), "peak_rss_gib": peak_rss_gib(),
            "peak_gpu_gib": peak_gpu_gib(),
        }


def run_trl_worker(spec: BenchSpec, mode: str) -> dict:
    """The same model, LoRA, prompts and rewards through ``trl.GRPOTrainer`` with its defaults otherwise."""
    torch, sync = _setup_torch(spec)
    try:
        import trl
        from datasets import Dataset
    except ImportError as e:
        raise SystemExit(f"TRL is not installed ({e}): pip install -e '.[bench]' -c constraints.txt") from None
    from peft import LoraConfig as PeftLoraConfig
    from transformers import TrainerCallback

    from fingrpo.data.prompts import render_prompt
    from fingrpo.model import load_model_and_tokenizer
    from fingrpo.rewards import build_rewards, reward_completions

    t_load = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as workdir:
        cfg = bench_config(spec, mode, workdir)
        model, tokenizer = load_model_and_tokenizer(cfg.model)
        examples = bench_examples(cfg, tokenizer, spec)
        rewards = build_rewards(cfg.rewards)
        # plain-string prompts: TRL tokenizes them as they are (no second chat template, no extra BOS)
        dataset = Dataset.from_dict({
            "prompt": [render_prompt(e, tokenizer) for e in examples],
            "example_index": list(range(len(examples))),
        })

        def finqa_reward(prompts: list[str], completions: list[str], example_index: list[int], **_: Any) -> list[float]:
            targets = [examples[i] for i in example_index]
            return reward_completions(rewards, prompts, completions, targets, cfg.rewards.nan_value).total

        n = spec.prompts * spec.group_size
        args = trl.GRPOConfig(
            output_dir=str(Path(workdir) / "trl"), per_device_train_batch_size=n, gradient_accumulation_steps=1,
            num_generations=spec.group_size, max_completion_length=spec.max_new_tokens,
            temperature=spec.temperature, beta=spec.beta, num_iterations=spec.num_iterations,
            max_steps=spec.warmup + spec.steps, use_vllm=False, report_to=[], bf16=False, fp16=False,
            save_strategy="no", seed=spec.seed, disable_tqdm=True,
        )
        peft_config = PeftLoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                                     target_modules=list(spec.lora_targets), bias="none", task_type="CAUSAL_LM")
        timer = _PhaseTimer(sync)
        steps: list[dict] = []
        generated: list[int] = []

        class StepClock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001 - HF callback signature
                sync()
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
                sync()
                i = len(steps)
                lengths = list(generated)
                generated.clear()
                phases = timer.take()
                gen_s = phases.get("generate", 0.0)
                steps.append({
                    "seconds": time.perf_counter() - self.t0, "warmup": i < spec.warmup,
                    "generated_tokens": sum(lengths), "completion_lengths": lengths,
                    "rollout_tokens_per_s": sum(lengths) / gen_s if gen_s > 0 else float("nan"), "phases": phases,
                })

        trainer = trl.GRPOTrainer(model=model, reward_funcs=finqa_reward, args=args, train_dataset=dataset,
                                  processing_class=tokenizer, peft_config=peft_config, callbacks=[StepClock()])
        load_s = time.perf_counter() - t_load
        generate = trainer._generate_single_turn

        def generate_and_count(*a: Any, **kw: Any):
            completion_ids, logprobs = generate(*a, **kw)
            generated.extend(len(c) for c in completion_ids)  # tokens up to and including EOS
            return completion_ids, logprobs

        trainer._generate_single_turn = generate_and_count
        timer.wrap(trainer, "_generate_single_turn", "generate")
        timer.wrap(trainer, "_calculate_rewards", "rewards")
        # no-grad log-prob passes are the reference (and old, when mu > 1); with grad: the policy forward
        timer.wrap(trainer, "_get_per_token_logps_and_entropies",
                   lambda: "policy_forward" if torch.is_grad_enabled() else "reference_forward")
        trainer.train()
        prompt_lengths = [len(x) for x in tokenizer(list(dataset["prompt"]))["input_ids"]]
        return {
            "system": "trl", "mode": mode, "load_seconds": load_s, "steps": steps, "prompt_lengths": prompt_lengths,
            "torch_threads": torch.get_num_threads(), "device": str(trainer.accelerator.device),
            "gradient_checkpointing": bool(args.gradient_checkpointing), "loss_type": args.loss_type,
            "peak_rss_gib": peak_rss_gib(), "peak_gpu_gib": peak_gpu_gib(),
        }


def _profiler(torch: Any):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=acts, record_shapes=True)


def _write_profile(prof: Any, path: str, spec: BenchSpec, mode: str, seconds: float) -> None:
    """The torch.profiler tables of one step: by self time, and by input shapes (which matmuls)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    avg = prof.key_averages()
    head = (f"# torch.profiler: one fingrpo step, mode={mode}, P={spec.prompts} G={spec.group_size} "
            f"T={spec.max_new_tokens}, {seconds:.1f} s wall (profiler overhead included)\n\n")
    text = head + "## by self CPU time\n" + avg.table(sort_by="self_cpu_time_total", row_limit=25)
    text += "\n\n## by total CPU time (inclusive)\n" + avg.table(sort_by="cpu_time_total", row_limit=25)
    text += "\n\n## by input shape\n" + prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=20)
    path.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------------ the parent


def run_worker_process(system: str, mode: str, spec: BenchSpec, timeout_s: float | None) -> dict:
    """Run one worker in a fresh interpreter; its ``BENCH_RESULT`` line, or a failure record."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--mode", mode, *spec.to_argv()]
    t0 = time.perf_counter()
    print(f"  {system:8s} {mode:5s} ...", end="", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        print(f" timed out after {timeout_s:.0f} s")
        return {"system": system, "mode": mode, "failed": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            result["process_seconds"] = wall
            print(f" {wall:.0f} s")
            return result
    why = (f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0
           else f"exit code {proc.returncode}")
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    print(f" FAILED: {why}")
    return {"system": system, "mode": mode, "failed": why, "stderr_tail": tail, "process_seconds": wall}


def summarize(result: dict, shape: ModelShape, spec: BenchSpec, ceilings: dict) -> dict:
    """Median step seconds, rollout tokens/s, peak RSS and the floor of the measured steps of one worker."""
    if result.get("failed"):
        return {"failed": result["failed"]}
    measured = [s for s in result["steps"] if not s["warmup"]]
    floors = [step_floor(shape, result["prompt_lengths"], s["completion_lengths"], spec.group_size, spec.beta,
                         spec.num_iterations, ceilings["matmul_gflops"], ceilings["memory_gbps"]) for s in measured]
    secs = [s["seconds"] for s in measured]
    phase_names = sorted({k for s in measured for k in s["phases"]})
    return {
        "median_s": statistics.median(secs),
        "min_s": min(secs),
        "max_s": max(secs),
        "rollout_tokens_per_s": statistics.median(s["rollout_tokens_per_s"] for s in measured),
        "generated_tokens": statistics.median(s["generated_tokens"] for s in measured),
        "peak_rss_gib": result["peak_rss_gib"],
        "floor_s": statistics.median(f["total"] for f in floors),
        "measured_over_floor": statistics.median(s / f["total"] for s, f in zip(secs, floors)),
        "phases_median_s": {k: statistics.median(s["phases"].get(k, 0.0) for s in measured) for k in phase_names},
        "peak_gpu_gib": result.get("peak_gpu_gib"),
        "prompt_lengths": result["prompt_lengths"],
    }


def _fmt(x: float | None, nd: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def format_table(summary: dict, nominal_floor: dict) -> str:
    """The printed table: one row per (mode, system), then the fingrpo/TRL ratios per mode."""
    lines = [
        "| mode | system | median s/step (min–max) | rollout tok/s | peak RSS GiB | floor s | measured/floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, systems in summary.items():
        for system in SYSTEMS:
            s = systems.get(system)
            if s is None:
                continue
            if "failed" in s:
                lines.append(f"| {mode} | {system} | failed: {s['failed']} | | | {_fmt(nominal_floor[mode])} | |")
                continue
            lines.append(
                f"| {mode} | {system} | {_fmt(s['median_s'])} ({_fmt(s['min_s'])}–{_fmt(s['max_s'])}) | "
                f"{_fmt(s['rollout_tokens_per_s'])} | {_fmt(s['peak_rss_gib'], 2)} | {_fmt(s['floor_s'])} | "
                f"{_fmt(s['measured_over_floor'], 2)} |"
            )
    lines += ["", "| mode | fingrpo/TRL time | TRL speed-up | fingrpo/TRL peak RSS |", "|---|---|---|---|"]
    for mode, r in ratios(summary).items():
        speedup = f"{r['speedup']:.1f}×" if r else "—"
        lines.append(f"| {mode} | {_fmt(r.get('time'), 3)} | {speedup} | {_fmt(r.get('rss'), 2)} |")
    return "\n".join(lines)


def ratios(summary: dict) -> dict:
    out = {}
    for mode, systems in summary.items():
        f, t = systems.get("fingrpo"), systems.get("trl")
        if not f or not t or "failed" in f or "failed" in t:
            out[mode] = {}
            continue
        out[mode] = {"time": f["median_s"] / t["median_s"], "speedup": t["median_s"] / f["median_s"],
                     "rss": f["peak_rss_gib"] / t["peak_rss_gib"]}
    return out


def acceptance(summary: dict) -> list[str]:
    """Issue 5's targets, checked: full >= 5x, gold >= 3x, RSS <= 1/2 of TRL's, fingrpo within 3x of the floor."""
    need = {"full": 5.0, "gold": 3.0}
    out = []
    for mode, r in ratios(summary).items():
        f = summary[mode].get("fingrpo", {})
        if r:
            out.append(f"{mode}: speed-up {r['speedup']:.1f}x (target >= {need[mode]:.0f}x) "
                       f"{'PASS' if r['speedup'] >= need[mode] else 'MISS'}; "
                       f"RSS ratio {r['rss']:.2f} (target <= 0.5) {'PASS' if r['rss'] <= 0.5 else 'MISS'}")
        if f and "failed" not in f:
            ok = f["measured_over_floor"] <= 3.0
            out.append(f"{mode}: fingrpo measured/floor {f['measured_over_floor']:.2f} (target <= 3) "
                       f"{'PASS' if ok else 'MISS'}")
    return out


def main_parent(ns: argparse.Namespace, spec: BenchSpec) -> int:
    import torch

    modes = [m.strip() for m in ns.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad} (choose from {', '.join(MODES)})")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]' -c constraints.txt") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = machine_info()
    print(f"machine: {info['cpu_model']}, {info['logical_cores']} logical cores, torch {info['torch']} "
          f"({info['torch_threads']} threads), {info.get('memory_gib')} GiB, load {info.get('loadavg_at_start')}"
          + (f", GPU {info['cuda']}" if info["cuda"] else ""))
    ceilings = measure_ceilings(ns.ceiling_seconds, device)
    print(f"ceilings: fp32 matmul {ceilings['matmul_gflops']:.0f} GFLOP/s, memory copy {ceilings['memory_gbps']:.1f} GB/s")
    print(f"work: {spec.prompts} prompts x G={spec.group_size}, {spec.max_new_tokens} new tokens, beta={spec.beta}, "
          f"mu={spec.num_iterations}, {spec.warmup} warm-up + {spec.steps} measured steps per worker, "
          f"{ns.rounds} round(s)")
    shape = model_shape(spec)

    runs: dict[str, dict[str, list[dict]]] = {m: {s: [] for s in SYSTEMS} for m in modes}
    t_all = time.perf_counter()
    for r in range(ns.rounds):
        for mi, mode in enumerate(modes):
            order = SYSTEMS if (mi + r) % 2 == 0 else SYSTEMS[::-1]  # alternate who goes first
            for system in order:
                runs[mode][system].append(run_worker_process(system, mode, spec, ns.worker_timeout))

    # Measured again after the workers: on a shared machine the load changes during a run, and the floor
    # (a lower bound) uses the best rate seen.
    end = measure_ceilings(ns.ceiling_seconds, device)
    ceilings = {"matmul_gflops": max(ceilings["matmul_gflops"], end["matmul_gflops"]),
                "memory_gbps": max(ceilings["memory_gbps"], end["memory_gbps"]), "device": device,
                "at_start": ceilings, "at_end": end}
    print(f"ceilings at the end: fp32 matmul {end['matmul_gflops']:.0f} GFLOP/s, memory copy "
          f"{end['memory_gbps']:.1f} GB/s; the floor uses the best of start and end")

    summary: dict[str, dict] = {}
    nominal_floor: dict[str, float] = {}
    for mode in modes:
        summary[mode] = {}
        for system in SYSTEMS:
            ok = [x for x in runs[mode][system] if not x.get("failed")]
            if not ok:
                summary[mode][system] = {"failed": runs[mode][system][-1]["failed"]}
                continue
            merged = dict(ok[0])
            merged["steps"] = [s for x in ok for s in x["steps"]]
            merged["peak_rss_gib"] = max(x["peak_rss_gib"] for x in ok)
            summary[mode][system] = summarize(merged, shape, spec, ceilings)
        lengths = next((x["prompt_lengths"] for s in SYSTEMS for x in runs[mode][s] if not x.get("failed")), None)
        if lengths is None:
            nominal_floor[mode] = float("nan")
        else:
            nominal_floor[mode] = step_floor(shape, lengths, [spec.max_new_tokens] * spec.prompts * spec.group_size,
                                             spec.group_size, spec.beta, spec.num_iterations,
                                             ceilings["matmul_gflops"], ceilings["memory_gbps"])["total"]

    table = format_table(summary, nominal_floor)
    checks = acceptance(summary)
    print()
    print(("QUICK MODE (not the issue's shapes) — " if ns.quick else "") + f"total {time.perf_counter() - t_all:.0f} s")
    print(table)
    print("floor with every completion at max_new_tokens: "
          + ", ".join(f"{m} {_fmt(v)} s" for m, v in nominal_floor.items()))
    for mode in modes:
        for system in SYSTEMS:
            s = summary[mode][system]
            if "phases_median_s" in s:
                parts = ", ".join(f"{k} {v:.1f}" for k, v in s["phases_median_s"].items())
                print(f"phases (median s) {mode}/{system}: {parts}")
    for line in checks:
        print(line)

    stamp = time.strftime("%Y-%m-%d")
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in info["host"])
    out = Path(ns.output) if ns.output else RESULTS_DIR / f"{stamp}-{host}{'-quick' if ns.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": ns.quick, "machine": info, "ceilings": ceilings,
        "spec": asdict(spec), "model_shape": asdict(shape), "summary": summary, "ratios": ratios(summary),
        "nominal_floor_s": nominal_floor, "acceptance": checks, "table": table, "runs": runs,
        "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, BenchSpec]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="gold,full", help="comma-separated context modes (gold, full)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per worker after the warm-up (default 2)")
    p.add_argument("--quick", action="store_true", help="2 prompts x G=4, 32 new tokens")
    p.add_argument("--rounds", type=int, default=1, help="fresh-process runs of each system per mode (alternated)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every process (default: torch's)")
    p.add_argument("--worker-timeout", type=float, default=7200.0, help="seconds before a worker is stopped")
    p.add_argument("--ceiling-seconds", type=float, default=2.0, help="seconds for each ceiling measurement")
    p.add_argument("--output", default=None, help="result JSON (default bench/results/<date>-<host>[-quick].json)")
    # the work (defaults: issue 5's settings; --quick shrinks them)
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--few-shot", type=int, default=None, help="worked examples per prompt (default 0)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--model", default=None, help="model.name_or_path (default bundled:SmolLM2-135M-Instruct)")
    p.add_argument("--params", default=None, help="params.yaml whose rewards section is used")
    p.add_argument("--data", default=None, help="FinQA split the prompts come from (default data/finqa/train.json)")
    p.add_argument("--backward-chunk-size", type=int, default=None,
                   help="fingrpo: completions per backward pass (default 2; 0: the whole group)")
    # worker mode (internal: the parent starts these)
    p.add_argument("--worker", choices=SYSTEMS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, default="gold", help="the worker's context mode")
    p.add_argument("--profile", default=None, help="fingrpo worker: torch.profiler tables of the first measured step")
    ns = p.parse_args(argv)
    base = BenchSpec.quick() if ns.quick else BenchSpec()
    fields = {"prompts": ns.prompts, "group_size": ns.group_size, "max_new_tokens": ns.max_new_tokens,
              "temperature": ns.temperature, "beta": ns.beta, "few_shot": ns.few_shot, "warmup": ns.warmup,
              "seed": ns.seed, "model": ns.model, "params": ns.params, "data": ns.data, "steps": ns.steps,
              "threads": ns.threads, "backward_chunk_size": ns.backward_chunk_size}
    spec = BenchSpec(**{**asdict(base), **{k: v for k, v in fields.items() if v is not None}})
    spec.lora_targets = tuple(spec.lora_targets)
    if spec.steps < 1 or spec.warmup < 0 or spec.backward_chunk_size < 0:
        p.error("--steps must be >= 1, --warmup >= 0 and --backward-chunk-size >= 0")
    return ns, spec


def main(argv: list[str] | None = None) -> int:
    ns, spec = parse_args(argv)
    if ns.worker is None:
        return main_parent(ns, spec)
    if ns.worker == "fingrpo":
        result = run_fingrpo_worker(spec, ns.mode, ns.profile)
    else:
        result = run_trl_worker(spec, ns.mode)
    sys.stdout.write("\n" + RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
