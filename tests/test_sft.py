"""The supervised warm start: the shared-prefix batch equals per-sequence training, the loss falls and
the adapter moves, epochs=0 saves the identity LoRA, GRPO starts from the warm start; the CLI on the
bundled SmolLM2 (slow)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fingrpo.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def sft_cfg(tmp_path: Path, tiny_model_path: Path, finqa: dict, **sft):
    out = tmp_path / "run"
    return load_config(None, {
        "data": {"train_path": str(finqa["train"]), "dev_path": str(finqa["dev"]), "test_path": str(finqa["test"])},
        "model": {"name_or_path": str(tiny_model_path), "cache_dir": str(tmp_path / "cache")},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]},
        "prompt": {"few_shot": 0, "context_mode": "gold", "max_prompt_tokens": 2048},
        "sft": {"epochs": 6, "learning_rate": 3e-2, "batch_size": 3, "warmup_steps": 0,
                "output_dir": str(out / "sft"), "metrics_path": str(out / "sft.csv"),
                "summary_path": str(out / "sft.json"), **sft},
        "train": {"max_steps": 1, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, "warmup_steps": 0,
                  "learning_rate": 1e-2, "beta": 0.1,
                  "eval_interval": 1000, "output_dir": str(out / "adapter"), "checkpoint_dir": str(out / "ckpt"),
                  "metrics_path": str(out / "metrics.csv"), "rollout_rewards_path": str(out / "rollout.jsonl")},
        "tracking": {"enabled": False},
    })


def _lora(model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_shared_prefix_batch_equals_per_sequence_loss_and_gradients(tmp_path, tiny_model_path, tiny_finqa):
    import torch
    import torch.nn.functional as F

    from fingrpo.data.finqa import load_split
    from fingrpo.data.prompts import make_examples
    from fingrpo.model import add_lora, load_model_and_tokenizer
    from fingrpo.sft import _batch, reply_loss, sft_sequences

    cfg = sft_cfg(tmp_path, tiny_model_path, tiny_finqa)
    model, tok = load_model_and_tokenizer(cfg.model)
    model = add_lora(model, cfg.lora)
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so the LoRA weights get gradients through every path
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.1)
    seqs = sft_sequences(make_examples(load_split(cfg.data.train_path)[:3], cfg.prompt, tok), tok)
    # the chat template's system turn is shared; the rows differ after it, and have different lengths
    batch = _batch(seqs, tok.pad_token_id)
    assert batch["prefix"].shape[1] > 100
    assert len({len(ids) for ids, _ in seqs}) > 1
    assert tok.decode(seqs[0][0][seqs[0][1]:]).startswith("Program: ")

    params = [p for p in model.parameters() if p.requires_grad]
    loss = reply_loss(model, batch)
    grads = torch.autograd.grad(loss, params)
    total, n = 0.0, 0
    for ids, n_prompt in seqs:  # the plain way: each full sequence alone, logits everywhere
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, n_prompt - 1 : -1]
        total = total + F.cross_entropy(logits, x[0, n_prompt:], reduction="sum")
        n += len(ids) - n_prompt
    ref = total / n
    ref_grads = torch.autograd.grad(ref, params)
    assert abs(loss.item() - ref.item()) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-3, atol=1e-6)


def test_micro_batches_against_one_prefix_give_the_whole_batch_gradients(tmp_path, tiny_model_path, tiny_finqa):
    """``sft.micro_batch_size``: rows back-propagated 1 or 2 at a time against one forward of the shared
    prefix give the loss and the gradients of the whole batch's backward; the prefix runs once."""
    import torch

    from fingrpo.data.finqa import load_split
    from fingrpo.data.prompts import make_examples
    from fingrpo.model import add_lora, load_model_and_tokenizer
    from fingrpo.sft import _batch, reply_loss_backward, sft_sequences

    cfg = sft_cfg(tmp_path, tiny_model_path, tiny_finqa)
    model, tok = load_model_and_tokenizer(cfg.model)
    model = add_lora(model, cfg.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.1)
    seqs = sft_sequences(make_examples(load_split(cfg.data.train_path)[:5], cfg.prompt, tok), tok)
    batch = _batch(seqs, tok.pad_token_id)
    assert batch["prefix"].shape[1] > 100 and len({len(ids) for ids, _ in seqs}) > 2
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(micro):
        model.zero_grad(set_to_none=True)
        calls = []
        hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
        try:
            loss = reply_loss_backward(model, batch, micro)
        finally:
            hook.remove()
        return loss.item(), [p.grad.clone() for p in params], calls

    whole, g_whole, calls_whole = grads(None)
    for micro in (1, 2):
        loss, g, calls = grads(micro)
        assert abs(loss - whole) < 1e-5
        assert sum(1 for shape in calls if shape[1] == batch["prefix"].shape[1]) == 1  # the prefix once
        assert len(calls) == 1 + -(-len(seqs) // micro)
        for a, b in zip(g, g_whole):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    assert len(calls_whole) == 2


def test_batches_of_similar_length_cover_each_sequence_once_per_epoch():
    import torch

    from fingrpo.sft import epoch_batches

    lengths = [10, 500, 12, 480, 11, 530, 9, 510, 13, 490, 14, 505]
    gen = torch.Generator().manual_seed(0)
    firsts = []
    for _ in range(3):
        batches = epoch_batches(lengths, 3, gen)
        assert sorted(i for b in batches for i in b) == list(range(12))
        assert all(len({lengths[i] > 100 for i in b}) == 1 for b in batches)  # long with long, short with short
        assert sum(max(lengths[i] for i in b) * len(b) for b in batches) <= 1.1 * sum(lengths)
        firsts.append(batches[0])
    assert len({tuple(b) for b in firsts}) > 1  # a new order every epoch
    plain = epoch_batches(lengths, 3, torch.Generator().manual_seed(0), group_by_length=False)
    assert sorted(i for b in plain for i in b) == list(range(12))


def test_sft_loss_falls_and_adapter_moves(tmp_path, tiny_model_path, tiny_finqa):
    import torch

    from fingrpo.model import load_adapter, load_model_and_tokenizer
    from fingrpo.sft import sft_from_config

    cfg = sft_cfg(tmp_path, tiny_model_path, tiny_finqa)
    summary = sft_from_config(cfg)
    assert summary["steps"] == 6 * 2 and summary["examples"] == 6  # 6 records, batches of 3
    assert summary["last_epoch_loss"] < 0.8 * summary["first_epoch_loss"]
    with open(cfg.sft.metrics_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {int(r["epoch"]) for r in rows} == set(range(1, 7))
    assert json.loads(Path(cfg.sft.summary_path).read_text())["steps"] == 12
    model, _ = load_model_and_tokenizer(cfg.model)
    adapter = _lora(load_adapter(model, cfg.sft.output_dir))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())  # B starts at 0
    assert all(torch.isfinite(v).all() for v in adapter.values())


def test_zero_epochs_saves_the_identity_lora(tmp_path, tiny_model_path, tiny_finqa):
    import torch

    from fingrpo.model import load_adapter, load_model_and_tokenizer
    from fingrpo.sft import sft_from_config

    cfg = sft_cfg(tmp_path, tiny_model_path, tiny_finqa, epochs=0)
    assert sft_from_config(cfg)["steps"] == 0
    model, _ = load_model_and_tokenizer(cfg.model)
    x = torch.arange(3, 40)[None]
    with torch.no_grad():
        plain = model(input_ids=x).logits
        warm = load_adapter(model, cfg.sft.output_dir)(input_ids=x).logits
    assert torch.equal(plain, warm)


def test_grpo_starts_from_the_warm_start(tmp_path, tiny_model_path, tiny_finqa):
    import torch

    from fingrpo.grpo.trainer import train_from_config
    from fingrpo.sft import sft_from_config

    cfg = sft_cfg(tmp_path, tiny_model_path, tiny_finqa, epochs=2)
    sft_from_config(cfg)
    cfg.train.init_adapter = cfg.sft.output_dir
    seen = {}

    class Capture:
        def on_train_begin(self, trainer):
            seen["lora"] = _lora(trainer.model)
            seen["trainable"] = sum(p.numel() for p in trainer.params)

    train_from_config(cfg, callbacks=[Capture()])
    from fingrpo.model import load_adapter, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(cfg.model)
    warm = _lora(load_adapter(model, cfg.sft.output_dir))
    assert seen["lora"].keys() == warm.keys() and seen["trainable"] > 0
    assert all(torch.equal(seen["lora"][k], warm[k]) for k in warm)
    trained = _lora(load_adapter(load_model_and_tokenizer(cfg.model)[0], cfg.train.output_dir))
    assert any(not torch.equal(trained[k], warm[k]) for k in warm)  # and GRPO trained it further


def test_missing_warm_start_is_a_model_error(tmp_path, tiny_model_path, tiny_finqa):
    from fingrpo.errors import ModelError
    from fingrpo.grpo.trainer import train_from_config

    cfg = sft_cfg(tmp_path, tiny_model_path, tiny_finqa)
    cfg.train.init_adapter = str(tmp_path / "never-trained")
    with pytest.raises(ModelError, match="adapter folder not found"):
        train_from_config(cfg)


@pytest.mark.slow
def test_cli_sft_bundled_smollm2(tmp_path, data_dir):
    """`fingrpo sft` on the bundled model and real train records: the loss is logged and the adapter loads."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "fingrpo", "sft", "--params", str(ROOT / "params.yaml"),
        "--set", f"data.train_path={data_dir / 'train.json'}", "--set", "train.max_train_records=4",
        "--set", "data.train_sources=null", "--set", "train.train_sources=null", "--set", "prompt.retriever=lexical",
        "--set", "sft.epochs=1", "--set", "sft.batch_size=2", "--set", "train.threads=2",
        "--set", f"sft.output_dir={out / 'sft'}", "--set", f"sft.metrics_path={out / 'sft.csv'}",
        "--set", f"sft.summary_path={out / 'sft.json'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "sft.json").read_text())
    assert summary["steps"] == 2 and summary["examples"] == 4
    assert 0.0 < summary["first_epoch_loss"] < 10.0
    assert (out / "sft" / "adapter_model.safetensors").is_file()
