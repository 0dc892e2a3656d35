"""GRPOTrainer on the tiny random llama: learning, resume == straight, checkpoints, metrics files,
non-finite skips, reward failures, evaluation, the seed API; the CLI on the bundled SmolLM2 (slow)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fingrpo.config import load_config
from fingrpo.errors import TrainingError
from fingrpo.rewards import RewardFunction

ROOT = Path(__file__).resolve().parents[1]


class CharFraction(RewardFunction):
    """Fraction of the completion's characters equal to ``char`` (the tiny model starts near 1%)."""

    name = "char_fraction"

    def __init__(self, char: str = "a", name: str = "char_fraction") -> None:
        self.char, self.name = char, name

    def __call__(self, prompt, completion, target=None):
        return completion.count(self.char) / max(1, len(completion))


class AlwaysFails(RewardFunction):
    name = "broken"

    def __call__(self, prompt, completion, target=None):
        raise RuntimeError("reward backend down")


PROMPTS = [f"question {i}: " for i in range(16)]  # synthetic prompts: fast, no chat template


def tiny_cfg(tmp_path: Path, tiny_model_path: Path, **train):
    """A tiny config: LoRA on q/v and the (tied) output head so the tiny model can move its outputs."""
    out = tmp_path / "run"
    base = {
        "max_steps": 4, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 6,
        "learning_rate": 2e-2, "warmup_steps": 1, "lr_scheduler": "cosine", "beta": 0.04,
        "save_interval": 2, "eval_interval": 1000, "seed": 0,
        "output_dir": str(out / "adapter"), "checkpoint_dir": str(out / "ckpt"),
        "metrics_path": str(out / "metrics.csv"), "rollout_rewards_path": str(out / "rollout_rewards.jsonl"),
    }
    base.update(train)
    return load_config(None, {
        "model": {"name_or_path": str(tiny_model_path)},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]},
        "prompt": {"use_chat_template": False, "few_shot": 0},
        "train": base,
        "tracking": {"enabled": False},
    })


def make_trainer(cfg, rewards=None, examples=None, eval_examples=None, callbacks=()):
    from transformers import set_seed

    from fingrpo.grpo.trainer import GRPOTrainer
    from fingrpo.model import add_lora, load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(cfg.model)
    set_seed(cfg.train.seed)
    policy = add_lora(model, cfg.lora)
    return GRPOTrainer(policy, tok, rewards or [CharFraction()], examples or PROMPTS, eval_examples or [],
                       cfg, callbacks=callbacks)


def lora_state(trainer) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_learning_reward_rises_and_adapter_changes(tmp_path, tiny_model_path):
    cfg = tiny_cfg(tmp_path, tiny_model_path, max_steps=24, group_size=8, max_new_tokens=8, warmup_steps=0,
                   lr_scheduler="constant", save_interval=100)
    trainer = make_trainer(cfg)
    before = lora_state(trainer)
    summary = trainer.train()
    rewards = [float(r["reward_mean"]) for r in read_csv(cfg.train.metrics_path)]
    assert len(rewards) == 24
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.1 and last > first + 0.4, rewards  # from ~1% 'a' to mostly 'a'
    after = lora_state(trainer)
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-2
    assert summary["steps"] == 24 and summary["nonfinite_skips"] == 0
    kl = float(read_csv(cfg.train.metrics_path)[-1]["kl"])
    assert kl > 0  # beta > 0: the policy moved away from the reference (adapter off)


def _stop_at(step_to_stop: int, crash: bool):
    class Stopper:
        def on_train_begin(self, trainer):
            self.trainer = trainer

        def on_step_end(self, step, metrics):
            if step == step_to_stop:
                if crash:
                    raise RuntimeError("simulated crash")
                self.trainer.should_stop = True

    return Stopper()


@pytest.mark.parametrize("crash", [False, True], ids=["graceful-stop", "crash-after-unsaved-step"])
def test_resume_equals_straight_run(tmp_path, tiny_model_path, crash):
    """4 steps straight == 2 steps + resume + 2 steps: adapter weights max abs diff <= 1e-6.

    μ = 2 (old log-probs), beta > 0 (reference pass), 2 rollout micro-batches, a cosine schedule: all the
    state a resume must carry. The crash variant dies after step 3 was logged but before it was
    checkpointed (checkpoints every 2 steps): the resumed run must drop that row and redo step 3.
    """
    common = dict(num_iterations=2, gradient_accumulation_steps=2, max_steps=4, save_interval=2)
    straight = make_trainer(tiny_cfg(tmp_path / "a", tiny_model_path, **common))
    straight.train()
    want = lora_state(straight)

    cfg_b = tiny_cfg(tmp_path / "b", tiny_model_path, **common)
    first = make_trainer(cfg_b, callbacks=[_stop_at(3 if crash else 2, crash)])
    if crash:
        with pytest.raises(RuntimeError, match="simulated crash"):
            first.train()
        assert [r["step"] for r in read_csv(cfg_b.train.metrics_path)] == ["1", "2", "3"]
    else:
        assert first.train()["steps"] == 2
    assert sorted(p.name for p in Path(cfg_b.train.checkpoint_dir).iterdir()) == ["step-2"]

    resumed = make_trainer(cfg_b)  # a fresh process: new model, new LoRA init, new optimizer
    summary = resumed.train(resume=True)
    assert summary["steps"] == 4 and summary["steps_this_run"] == 2
    got = lora_state(resumed)
    assert got.keys() == want.keys()
    diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert diff <= 1e-6, diff

    rows_a, rows_b = read_csv(straight.train_cfg.metrics_path), read_csv(cfg_b.train.metrics_path)
    assert [r["step"] for r in rows_b] == ["1", "2", "3", "4"]  # no duplicate rows after resume
    for ra, rb in zip(rows_a, rows_b):
        assert ra["reward_mean"] == rb["reward_mean"] and ra["lr"] == rb["lr"]
        assert abs(float(ra["loss"]) - float(rb["loss"])) <= 1e-6
    steps = [json.loads(line)["step"] for line in Path(cfg_b.train.rollout_rewards_path).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("chunk", [1, 3])
def test_backward_chunks_give_the_same_training(tmp_path, tiny_model_path, chunk):
    """``backward_chunk_size`` only changes memory: 2 steps with a group back-propagated 1 or 3 completions
    at a time (G=4: uneven chunks too), μ = 2 and beta > 0, end at the adapter of whole-group backwards."""
    common = dict(max_steps=2, num_iterations=2, save_interval=100)
    whole = make_trainer(tiny_cfg(tmp_path / "whole", tiny_model_path, **common))
    whole.train()
    chunked = make_trainer(tiny_cfg(tmp_path / "chunked", tiny_model_path, backward_chunk_size=chunk, **common))
    chunked.train()
    want, got = lora_state(whole), lora_state(chunked)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= 1e-5
    assert max(float((want[k] - lora_state(make_trainer(tiny_cfg(tmp_path / "fresh", tiny_model_path)))[k]).abs().max())
               for k in want) > 1e-3  # the runs did move the adapter
    for a, b in zip(read_csv(whole.train_cfg.metrics_path), read_csv(chunked.train_cfg.metrics_path)):
        assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-5
        assert abs(float(a["kl"]) - float(b["kl"])) <= 1e-5


def test_resume_without_checkpoint_is_an_error(tmp_path, tiny_model_path):
    trainer = make_trainer(tiny_cfg(tmp_path, tiny_model_path))
    with pytest.raises(TrainingError, match="no checkpoint to resume from"):
        trainer.train(resume=True)


def test_checkpoint_contents(tmp_path, tiny_model_path):
    import torch

    from fingrpo.grpo.trainer import latest_checkpoint
    from fingrpo.model import load_adapter, load_model_and_tokenizer

    cfg = tiny_cfg(tmp_path, tiny_model_path, max_steps=5, save_interval=2, keep_checkpoints=2)
    saved = []

    class OnSave:
        def on_save(self, step, path):
            saved.append((step, Path(path).name))

    trainer = make_trainer(cfg, callbacks=[OnSave()])
    trainer.train()
    assert saved == [(2, "step-2"), (4, "step-4"), (5, "step-5")]
    root = Path(cfg.train.checkpoint_dir)
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-5"]  # keep_checkpoints=2
    ckpt = latest_checkpoint(root)
    assert ckpt.name == "step-5"
    names = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "optimizer.pt", "scheduler.pt",
            "rng_state.pt", "trainer_state.json", "config.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["data_position"] == 5 * 4 and state["num_processes"] == 1
    assert json.loads((ckpt / "config.json").read_text()) == cfg.model_dump(mode="json")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt"):
        torch.load(ckpt / name, weights_only=True)  # loads without unpickling arbitrary objects
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == len(trainer.params)
    assert {"python", "numpy", "torch", "sampling"} <= set(torch.load(ckpt / "rng_state.pt", weights_only=True)["ranks"][0])

    # the final adapter folder: adapter + tokenizer + resolved config; it loads back with peft
    out = Path(cfg.train.output_dir)
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "fingrpo_config.json").read_text())["train"]["max_steps"] == 5
    base, _ = load_model_and_tokenizer(cfg.model)
    loaded = load_adapter(base, out)
    want = lora_state(trainer)
    got = {k: v for k, v in __import__("peft").get_peft_model_state_dict(loaded).items()}
    assert max(float((got[k] - want[k]).abs().max()) for k in want) == 0.0


def test_metrics_csv_and_rollout_rewards(tmp_path, tiny_model_path):
    cfg = tiny_cfg(tmp_path, tiny_model_path, max_steps=3, num_samples_to_log=2)
    seen = []

    class Recorder:
        def on_step_end(self, step, metrics):
            seen.append((step, dict(metrics)))

    trainer = make_trainer(cfg, rewards=[CharFraction("a"), CharFraction("b", "b_fraction")], callbacks=[Recorder()])
    trainer.train()
    rows = read_csv(cfg.train.metrics_path)
    assert [r["step"] for r in rows] == ["1", "2", "3"] and [s for s, _ in seen] == [1, 2, 3]
    required = ["loss", "reward_mean", "reward_std", "kl", "clip_fraction_low", "clip_fraction_high", "ratio_mean",
                "completion_length_mean", "completion_length_max", "truncated_fraction", "zero_std_group_fraction",
                "grad_norm", "lr", "rollout_tokens_per_s", "step_seconds"]
    for name in ("char_fraction", "b_fraction"):
        required += [f"reward/{name}_mean", f"reward/{name}_std", f"reward/{name}_failures"]
    for key in required:
        assert key in rows[0], key
        assert all(isinstance(m[key], (int, float)) for _, m in seen), key
    assert float(rows[0]["lr"]) == 0.0 and float(rows[1]["lr"]) == pytest.approx(2e-2)  # warm-up, then peak
    assert 1 <= float(rows[0]["completion_length_max"]) <= cfg.train.max_new_tokens
    lines = [json.loads(x) for x in Path(cfg.train.rollout_rewards_path).read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    n = cfg.train.prompts_per_step * cfg.train.group_size
    for x in lines:
        assert len(x["total"]) == len(x["reward/char_fraction"]) == len(x["reward/b_fraction"]) == n
        assert len(x["completion_lengths"]) == n
    mean = sum(lines[-1]["total"]) / n
    assert mean == pytest.approx(float(rows[-1]["reward_mean"]))
    assert len(trainer.last_samples) == 2 and {"completion", "reward", "reward/b_fraction"} <= set(trainer.last_samples[0])


def _nan_gradient_hook(trainer, bad_updates: set[int]):
    """Make the gradient of one LoRA weight NaN on the given (1-based) optimizer updates."""
    import torch

    counter = {"update": 0}
    param = trainer.params[0]
    update = trainer._update

    def counting_update(micro, **kwargs):
        counter["update"] += 1
        return update(micro, **kwargs)

    def hook(grad):  # every backward of the update (per chunk of completions, per prompt)
        return torch.full_like(grad, float("nan")) if counter["update"] in bad_updates else grad

    trainer._update = counting_update
    param.register_hook(hook)
    return param


def test_nonfinite_update_is_skipped(tmp_path, tiny_model_path):
    cfg = tiny_cfg(tmp_path, tiny_model_path, max_steps=3, beta=0.0)
    trainer = make_trainer(cfg)
    snapshots = []

    class Snap:
        def on_step_end(self, step, metrics):
            snapshots.append(lora_state(trainer))

    trainer.callbacks.append(Snap())
    _nan_gradient_hook(trainer, {2})
    summary = trainer.train()
    assert summary["nonfinite_skips"] == 1
    rows = read_csv(cfg.train.metrics_path)
    assert [int(float(r["nonfinite_skips"])) for r in rows] == [0, 1, 1]
    assert rows[1]["grad_norm"] == "nan"
    # the skipped update left the weights untouched; the others moved them; no NaN reached them
    assert all(bool((snapshots[1][k] == snapshots[0][k]).all()) for k in snapshots[0])
    assert any(bool((snapshots[2][k] != snapshots[1][k]).any()) for k in snapshots[0])
    assert all(bool(v.isfinite().all()) for v in snapshots[2].values())


def test_three_nonfinite_updates_in_a_row_stop_training(tmp_path, tiny_model_path):
    cfg = tiny_cfg(tmp_path, tiny_model_path, max_steps=6, save_interval=100, beta=0.0)
    trainer = make_trainer(cfg)
    _nan_gradient_hook(trainer, {2, 3, 4})
    with pytest.raises(TrainingError, match=r"step 4: 3 non-finite losses/gradients in a row.*step-4"):
        trainer.train()
    assert (Path(cfg.train.checkpoint_dir) / "step-4" / "trainer_state.json").is_file()


def test_reward_failing_everywhere_stops_training(tmp_path, tiny_model_path):
    cfg = tiny_cfg(tmp_path, tiny_model_path, max_steps=6, save_interval=100)
    trainer = make_trainer(cfg, rewards=[CharFraction(), AlwaysFails()])
    with pytest.raises(TrainingError, match=r"step 3: reward 'broken' failed on every completion for 3 steps.*reward backend down"):
        trainer.train()
    rows = read_csv(cfg.train.metrics_path)
    assert [int(float(r["reward/broken_failures"])) for r in rows] == [16, 16, 16]


def test_prompts_per_step_must_split_over_micro_batches(tmp_path, tiny_model_path):
    from fingrpo.errors import ConfigError

    with pytest.raises(ConfigError, match="gradient_accumulation_steps=8 exceeds"):
        make_trainer(tiny_cfg(tmp_path, tiny_model_path, gradient_accumulation_steps=8))


def test_data_order_is_seeded_and_reshuffled_per_epoch(tmp_path, tiny_model_path):
    trainer = make_trainer(tiny_cfg(tmp_path, tiny_model_path))
    n = len(PROMPTS)
    epoch0 = [i for pos in range(0, n, 4) for i in trainer._step_indices(pos)]
    epoch1 = [i for pos in range(n, 2 * n, 4) for i in trainer._step_indices(pos)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))  # each epoch sees every example once
    assert epoch0 != epoch1 and epoch0 != list(range(n))
    again = make_trainer(tiny_cfg(tmp_path / "again", tiny_model_path))
    assert [i for pos in range(0, n, 4) for i in again._step_indices(pos)] == epoch0


# ------------------------------------------------------------------------------------- real FinQA records


def test_eval_interval_reports_quick_evaluation(tmp_path, tiny_model_path, tiny_finqa):
    from fingrpo.data.finqa import load_split
    from fingrpo.data.prompts import make_examples

    cfg = tiny_cfg(tmp_path, tiny_model_path, max_steps=2, eval_interval=2, eval_subset_size=2, prompts_per_step=2)
    from fingrpo.model import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer(cfg.model)
    train_ex = make_examples(load_split(tiny_finqa["train"]), cfg.prompt, tokenizer=tok)
    dev_ex = make_examples(load_split(tiny_finqa["dev"]), cfg.prompt, tokenizer=tok)
    seen = []

    class OnEval:
        def on_evaluate(self, step, metrics, samples):
            seen.append((step, metrics, samples))

    from fingrpo.rewards import build_rewards

    trainer = make_trainer(cfg, rewards=build_rewards({"weights": {"correctness": 1.0, "format": 0.2}}),
                           examples=train_ex, eval_examples=dev_ex, callbacks=[OnEval()])
    trainer.train()
    assert [s for s, _, _ in seen] == [2]
    _, metrics, samples = seen[0]
    assert metrics["eval/n"] == 2 and 0.0 <= metrics["eval/execution_accuracy"] <= 1.0
    assert {"eval/reward_mean", "eval/tolerant_accuracy", "eval/format_rate"} <= set(metrics)
    assert len(samples) == 2 and samples[0]["id"] == dev_ex[0].id and "completion" in samples[0]
    rows = read_csv(cfg.train.metrics_path)
    assert rows[0]["eval/execution_accuracy"] == "" and rows[1]["eval/execution_accuracy"] != ""


def test_seed_api_grpojsontrainer(tmp_path, tiny_model_path, tiny_finqa, monkeypatch):
    from fingrpo.seed import GRPOJSONTrainer

    monkeypatch.chdir(tmp_path)
    trainer = GRPOJSONTrainer(
        model_str=str(tiny_model_path), train_path=str(tiny_finqa["train"]), dev_path=str(tiny_finqa["dev"]),
        test_path=str(tiny_finqa["test"]),
        overrides=["prompt.use_chat_template=true", "prompt.few_shot=0", "train.group_size=2",
                   "train.max_new_tokens=4", "tracking.enabled=false", "train.eval_subset_size=1"],
    )
    summary = trainer.train(num_epochs=1, batch_size=2, learning_rate=1e-3, eval_interval=100, save_interval=2)
    assert summary["steps"] == 3  # ceil(1 epoch * 6 records / 2 per step)
    assert trainer.cfg.train.prompts_per_step == 2 and trainer.cfg.train.learning_rate == 1e-3
    assert trainer.cfg.model.name_or_path == str(tiny_model_path)
    assert (tmp_path / "models" / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "models" / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert len(read_csv(tmp_path / "reports" / "train_metrics.csv")) == 3


@pytest.mark.slow
def test_cli_train_bundled_smollm2_two_steps(tmp_path, data_dir):
    """`fingrpo train` with the bundled SmolLM2 on real FinQA prompts; the adapter loads back and generates."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fingrpo", "train", "--params", str(ROOT / "params.yaml")]
    for item in [
        "train.max_steps=2", "train.prompts_per_step=2", "train.group_size=4", "train.max_new_tokens=16",
        "train.warmup_steps=0", "train.threads=2", "prompt.context_mode=gold", "prompt.few_shot=1",
        "tracking.enabled=false", "train.init_adapter=null",
        f"data.train_path={data_dir / 'train.json'}", f"data.dev_path={data_dir / 'dev.json'}",
        "data.train_sources=null", "data.eval_sets=null", "train.train_sources=null",
        f"data.test_path={data_dir / 'test.json'}", f"data.provenance_path={data_dir / 'provenance.json'}",
    ]:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["steps"] == 2
    rows = read_csv(tmp_path / "reports" / "train_metrics.csv")
    assert len(rows) == 2 and all(float(r["completion_length_mean"]) > 0 for r in rows)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fingrpo.config import ModelConfig
    from fingrpo.model import resolve_model_path

    adapter = tmp_path / "models" / "adapter"
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(ModelConfig()), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    tok = AutoTokenizer.from_pretrained(adapter)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_resume_refuses_a_pickled_optimizer_file(tmp_path, tiny_model_path):
    """A checkpoint file that needs arbitrary unpickling is refused with a one-line TrainingError."""
    import pickle

    cfg = tiny_cfg(tmp_path, tiny_model_path, max_steps=2, save_interval=1)
    make_trainer(cfg).train()
    ckpt = Path(cfg.train.checkpoint_dir) / "step-2"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (ckpt / "optimizer.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(TrainingError, match=r"step-2/optimizer.pt: refused to load \(weights_only\)"):
        make_trainer(cfg).train(resume=True)


# --------------------------------------------------------------- keeping the signal: dynamic sampling, sampler, gold


class Scripted(RewardFunction):
    """'program_execution' by prompt: 'question i' with i < solved is always right (1.0), i < solved + unsolved
    always wrong (0.0); the others are right on every second call, so each of their groups (scored in order,
    G even) is half right: a mixed group whatever the tiny model writes."""

    name = "program_execution"

    def __init__(self, solved: int = 4, unsolved: int = 4) -> None:
        self.solved, self.unsolved, self.calls = solved, unsolved, 0

    def __call__(self, prompt, completion, target=None):
        i = int(prompt.split()[1].rstrip(":"))
        if i < self.solved:
            return 1.0
        if i < self.solved + self.unsolved:
            return 0.0
        self.calls += 1
        return float(self.calls % 2)


def _capture_updates(trainer) -> list[list]:
    """Record, per optimizer update, each group's (advantages, off_policy, completion ids, prompt text)."""
    seen: list[list] = []
    update = trainer._update

    def capturing(batches, **kwargs):
        groups = []
        for b in batches:
            for p, (_, rows) in enumerate(b.groups()):
                groups.append({"advantages": b.advantages[rows].clone(),
                               "off_policy": None if b.off_policy is None else b.off_policy[rows].clone(),
                               "ids": b.rollout.completion_ids[rows].clone(), "mask": b.rollout.completion_mask[rows].clone(),
                               "prompt": trainer.render(b.examples[p])})
        seen.append(groups)
        return update(batches, **kwargs)

    trainer._update = capturing
    return seen


def test_dynamic_sampling_updates_on_mixed_groups_only_and_refills_the_step(tmp_path, tiny_model_path):
    cfg = tiny_cfg(tmp_path, tiny_model_path, max_steps=3, beta=0.0, dynamic_sampling=True,
                   dynamic_sampling_max_refill=12)
    trainer = make_trainer(cfg, rewards=[Scripted(solved=4, unsolved=4)])
    seen = _capture_updates(trainer)
    trainer.train()
    rows = read_csv(cfg.train.metrics_path)
    for groups, row in zip(seen, rows):
        # the update sees only groups with a spread of rewards, and the configured number of them
        assert len(groups) == cfg.train.prompts_per_step
        assert all(bool((g["advantages"] != 0).any()) for g in groups)
        assert all(int(g["prompt"].split()[1].rstrip(":")) >= 8 for g in groups)
        dropped, refill = float(row["dynamic/dropped_groups"]), float(row["dynamic/refill_prompts"])
        assert float(row["dynamic/sampled_groups"]) == 4 + refill and float(row["dynamic/kept_groups"]) == 4
        assert dropped == refill  # every dropped group was replaced (the bound was not reached here)
        assert 0.0 <= float(row["zero_std_all_right_fraction"]) <= float(row["zero_std_group_fraction"])
    assert sum(float(r["dynamic/dropped_groups"]) for r in rows) > 0  # 8 of the 16 prompts give equal rewards
    # the data position counts every prompt sampled (the refills too)
    assert trainer.data_position == sum(4 + float(r["dynamic/refill_prompts"]) for r in rows)


def test_dynamic_sampling_stops_at_its_bound_and_then_does_not_update(tmp_path, tiny_model_path):
    cfg = tiny_cfg(tmp_path, tiny_model_path, max_steps=1, beta=0.0, dynamic_sampling=True,
                   dynamic_sampling_max_refill=6)
    trainer = make_trainer(cfg, rewards=[Scripted(solved=16, unsolved=0)])  # every prompt always right
    before = lora_state(trainer)
    seen = _capture_updates(trainer)
    trainer.train()
    row = read_csv(cfg.train.metrics_path)[0]
    assert float(row["dynamic/sampled_groups"]) == 4 + 6 and float(row["dynamic/refill_prompts"]) == 6
    assert float(row["dynamic/kept_groups"]) == 0 and float(row["zero_std_all_right_fraction"]) == 1.0
    assert seen == [[]]
    after = lora_state(trainer)
    assert all(bool((after[k] == before[k]).all()) for k in before)  # no optimizer step on nothing


def test_without_dynamic_sampling_equal_groups_stay_in_the_update(tmp_path, tiny_model_path):
    cfg = tiny_cfg(tmp_path, tiny_model_path, max_steps=2, beta=0.0)
    trainer = make_trainer(cfg, rewards=[Scripted(solved=4, unsolved=4)])
    seen = _capture_updates(trainer)
    trainer.train()
    assert [len(g) for g in seen] == [4, 4]
    prompts = [int(g["prompt"].split()[1].rstrip(":")) for groups in seen for g in groups]
    assert prompts == trainer._step_indices(0) + trainer._step_indices(4)


def test_difficulty_sampler_prefers_mixed_prompts():
    from fingrpo.grpo.sampler import DifficultySampler

    s = DifficultySampler(30, seed=0, floor=0.1)
    for i in range(10):
        s.update(i, correct=8, attempts=8)       # always right
        s.update(10 + i, correct=4, attempts=8)  # mixed
    # 20..29 unseen: weight 1, as the mixed ones
    picks = [i for step in range(200) for i in s.choose(5, step)]
    assert all(len(set(s.choose(5, step))) == 5 for step in range(20))
    solved = sum(i < 10 for i in picks) / len(picks)
    assert solved < 0.1 and sum(10 <= i < 20 for i in picks) / len(picks) > 0.4
    assert s.choose(5, 7) == s.choose(5, 7)
    assert set(s.choose(30, 3, exclude=[1, 2])) == set(range(30)) - {1, 2}


@pytest.mark.parametrize("crash", [False], ids=["graceful-stop"])
def test_difficulty_sampler_resume_makes_the_same_choices(tmp_path, tiny_model_path, crash):
    def run(folder, stop_at=None, resume=False):
        cfg = tiny_cfg(folder, tiny_model_path, max_steps=4, beta=0.0, prompt_sampler="difficulty", save_interval=1)
        trainer = make_trainer(cfg, rewards=[Scripted(solved=4, unsolved=4)],
                               callbacks=[_stop_at(stop_at, crash)] if stop_at else ())
        choices = []
        choose = trainer._choose
        trainer._choose = lambda *a, **k: choices.append(choose(*a, **k)) or choices[-1]
        trainer.train(resume=resume)
        return trainer, choices

    straight, straight_choices = run(tmp_path / "a")
    _, first = run(tmp_path / "b", stop_at=2)
    resumed, second = run(tmp_path / "b", resume=True)
    assert first + second == straight_choices
    assert resumed.sampler.state_dict() == straight.sampler.state_dict()
    assert straight.sampler.summary()["sampler/seen_fraction"] > 0
    a, b = lora_state(straight), lora_state(resumed)
    assert all(torch_allclose(a[k], b[k]) for k in a)


def torch_allclose(x, y) -> bool:
    import torch

    return bool(torch.allclose(x, y, rtol=1e-5, atol=1e-7))


def _gold_examples(n: int = 8):
    from fingrpo.data.prompts import PromptExample

    return [PromptExample(id=f"q{i}", messages=[{"role": "user", "content": f"question {i}: add one and two"}],
                          target="Program: add(1, 2)", exe_ans=3.0, program="add(1, 2)", table=[]) for i in range(n)]


class GoldOnly(RewardFunction):
    """'program_execution': 1.0 only for the gold program's text (the tiny model never writes it)."""

    name = "program_execution"

    def __call__(self, prompt, completion, target=None):
        return 1.0 if "add(1, 2)" in completion else 0.01 * len(completion)


def test_gold_guided_groups_carry_the_gold_reply_and_the_formula_loss(tmp_path, tiny_model_path):
    import torch

    from fingrpo.grpo.rollout import completion_logprobs

    cfg = tiny_cfg(tmp_path, tiny_model_path, max_steps=1, beta=0.0, max_new_tokens=24, gold_guidance=True,
                   loss_type="dapo", prompts_per_step=2)
    trainer = make_trainer(cfg, rewards=[GoldOnly()], examples=_gold_examples())
    G, gamma = cfg.train.group_size, cfg.train.gold_guidance_gamma
    gold = trainer.tokenizer("Program: add(1, 2)", add_special_tokens=False)["input_ids"] + [trainer.tokenizer.eos_token_id]
    expected = {}
    update = trainer._update

    def checking(batches, **kwargs):
        # the loss the formula gives, from log-probs computed apart (before the update moves anything)
        num, tokens = 0.0, 0.0
        with torch.no_grad():
            for b in batches:
                for p, (prompt, rows) in enumerate(b.groups()):
                    ids, mask = b.rollout.completion_ids[rows], b.rollout.completion_mask[rows]
                    lp = completion_logprobs(trainer.model, [prompt], ids, mask, G, temperature=cfg.train.temperature)
                    adv, off = b.advantages[rows].double(), b.off_policy[rows]
                    prob = lp.double().exp()
                    term = torch.where(off[:, None], -(prob / (prob + gamma)) * adv[:, None], -adv[:, None].expand_as(prob))
                    num += float((term * mask).sum())
                    tokens += float(mask.sum())
                    expected.setdefault("rows", []).append((ids[G - 1, : len(gold)].tolist(), off.tolist(), adv.tolist()))
        expected["loss"] = num / tokens
        out = update(batches, **kwargs)
        expected["got"] = out["loss"]
        return out

    trainer._update = checking
    trainer.train()
    assert len(expected["rows"]) == 2
    for ids, off, adv in expected["rows"]:
        assert ids == gold and off == [False] * (G - 1) + [True]
        assert adv[-1] > 0 and all(a < 0 for a in adv[:-1])  # the gold row is the group's best
    assert expected["got"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-6)
    row = read_csv(cfg.train.metrics_path)[0]
    assert float(row["gold_guided_fraction"]) == 1.0 and float(row["zero_std_all_wrong_fraction"]) >= 0.0
    assert float(row["gold_unavailable_groups"]) == 0.0  # the gold reply fits max_new_tokens here
    assert float(row["reward/program_execution_mean"]) < 1.0  # metrics: the policy's own samples, not the gold row


def test_gold_guidance_and_difficulty_need_the_correctness_reward(tmp_path, tiny_model_path):
    from fingrpo.errors import ConfigError

    for knob in ({"gold_guidance": True}, {"prompt_sampler": "difficulty"}):
        cfg = tiny_cfg(tmp_path, tiny_model_path, beta=0.0, **knob)
        with pytest.raises(ConfigError, match="program_execution"):
            make_trainer(cfg)


def test_a_gold_reply_longer_than_a_rollout_is_not_put_in_and_is_counted(tmp_path, tiny_model_path):
    cfg = tiny_cfg(tmp_path, tiny_model_path, max_steps=1, beta=0.0, max_new_tokens=3, gold_guidance=True,
                   prompts_per_step=2)
    trainer = make_trainer(cfg, rewards=[GoldOnly()], examples=_gold_examples())
    seen = _capture_updates(trainer)
    trainer.train()
    row = read_csv(cfg.train.metrics_path)[0]
    assert float(row["gold_unavailable_groups"]) == 2.0 and float(row["gold_guided_fraction"]) == 0.0
    assert all(g["off_policy"] is None or not bool(g["off_policy"].any()) for groups in seen for g in groups)
