"""Supervised warm start: LoRA fine-tuning on the train split's gold programs, before GRPO.

    fingrpo sft [--set sft.epochs=4]          # -> sft.output_dir (models/sft), reports/sft.json

Why: the bundled 135M model almost never writes a correct FinQA program at temperature 1.0 (issue 7:
1 correct sample in 400), so a correctness reward gives GRPO no signal. A few epochs of next-token
training on ``Program: <gold>\\nAnswer: <exe_ans>`` — the exact reply format the rewards check — teach
the format and the operations; GRPO then sharpens what the model samples.

The loss is the mean cross-entropy over the reply tokens only (the rendered prompt is masked), with the
same prompts GRPO trains on (``prompt`` section: context mode, worked examples, chat template). With
``sft.epochs: 0`` the stage saves the freshly initialised LoRA (B = 0: the base model's function), so
``train.init_adapter`` can always point at ``sft.output_dir``.
"""

from __future__ import annotations

import csv
import io as _io
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fingrpo.data.prompts import make_examples, render_prompt
from fingrpo.data.sources import few_shot_records, train_sources, training_pool
from fingrpo.errors import TrainingError
from fingrpo.grpo.rollout import cache_of, expand_cache_
from fingrpo.io import atomic_path, write_json_atomic, write_text_atomic
from fingrpo.model import add_lora, load_model_and_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import Config

log = logging.getLogger(__name__)


def sft_sequences(examples: Sequence[Any], tokenizer: Any, use_chat_template: bool = True) -> list[tuple[list[int], int]]:
    """``(input_ids, n_prompt)`` per example: the rendered prompt, then the gold reply and the eos token.

    >>> ids, n_prompt = sft_sequences(train_examples, tok)[0]   # doctest: +SKIP
    >>> tok.decode(ids[n_prompt:])   # doctest: +SKIP
    'Program: divide(637, const_5)\\nAnswer: 127.4<|im_end|>'
    """
    out = []
    eos = tokenizer.eos_token_id
    for ex in examples:
        prompt = tokenizer(render_prompt(ex, tokenizer, use_chat_template), add_special_tokens=not use_chat_template)
        reply = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
        ids = list(prompt["input_ids"])
        if not reply:
            raise TrainingError(f"sft: example {ex.id} has an empty target")
        out.append((ids + reply + ([eos] if eos is not None else []), len(ids)))
    return out


def _common_prefix(seqs: list[tuple[list[int], int]]) -> int:
    """Tokens every sequence of the batch starts with (the system prompt), at most ``n_prompt - 1`` of each
    (the last prompt token must stay in the per-row part: its logit predicts the first reply token)."""
    limit = min(n_prompt for _, n_prompt in seqs) - 1
    first = seqs[0][0]
    n = 0
    while n < limit and all(ids[n] == first[n] for ids, _ in seqs):
        n += 1
    return n


def _batch(seqs: list[tuple[list[int], int]], pad_id: int) -> dict:
    """The batch as a shared ``prefix`` (1, P) — the tokens all rows start with, computed once — and
    left-padded per-row ``input_ids`` (B, T) after it, with the ``attention_mask`` (B, P+T) over both,
    ``position_ids`` (B, T) and ``labels`` (B, T; -100 on prompt and padding). Left padding puts every
    reply at the end of its row, so vocabulary logits are needed only for the last ``keep`` positions."""
    import torch

    n_prefix = _common_prefix(seqs)
    rows = [(ids[n_prefix:], n_prompt - n_prefix) for ids, n_prompt in seqs]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        start = width - len(ids)
        input_ids[i, start:] = torch.tensor(ids)
        attention[i, start:] = 1
        labels[i, start + n_prompt :] = torch.tensor(ids[n_prompt:])
    positions = n_prefix + (attention.cumsum(dim=1) - 1).clamp(min=0)  # (B, T): after the shared prefix
    full_mask = torch.cat([torch.ones((len(rows), n_prefix), dtype=torch.long), attention], dim=1)
    return {
        "prefix": torch.tensor(seqs[0][0][:n_prefix], dtype=torch.long)[None],
        "input_ids": input_ids, "attention_mask": full_mask, "position_ids": positions, "labels": labels,
        "keep": max(len(ids) - n_prompt for ids, n_prompt in rows) + 1,
    }


def reply_loss(model: Any, batch: dict):
    """Mean next-token cross-entropy over the reply tokens (``labels != -100``), every reply token of the
    batch weighing the same. The shared prefix runs once (its KV cache expanded to the B rows as a view:
    autograd sums the rows' gradients back into it); vocabulary logits only for the last ``keep`` positions."""
    import torch.nn.functional as F

    b = batch["input_ids"].shape[0]
    kwargs: dict = {}
    if batch["prefix"].shape[1]:
        pre = model(input_ids=batch["prefix"], use_cache=True, logits_to_keep=1)
        cache = cache_of(pre)
        expand_cache_(cache, b)
        kwargs = {"cache": cache, "use_cache": True}
    keep = batch["keep"]
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
        logits_to_keep=keep, **kwargs,
    ).logits[:, :-1]  # (B, keep-1, V): position j predicts token j+1
    target = batch["labels"][:, -keep + 1 :]  # (B, keep-1)
    mask = target != -100
    return F.cross_entropy(logits[mask].float(), target[mask])


def run_sft(model: Any, tokenizer: Any, examples: Sequence[Any], cfg: "Config", progress: bool = True) -> dict:
    """Train the LoRA weights of ``model`` (a peft model) on ``examples``' gold replies; returns a summary
    and writes one CSV row of loss per optimizer step to ``sft.metrics_path``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    scfg = cfg.sft
    seqs = sft_sequences(examples, tokenizer, cfg.prompt.use_chat_template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("sft: the model has no trainable parameters (is the LoRA adapter active?)")
    steps_per_epoch = math.ceil(len(seqs) / scfg.batch_size)
    total = steps_per_epoch * scfg.epochs
    optimizer = torch.optim.AdamW(params, lr=scfg.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=min(scfg.warmup_steps, total), num_training_steps=max(1, total))
    gen = torch.Generator().manual_seed(scfg.seed)
    rows: list[dict] = []
    model.train()
    started = time.perf_counter()
    bar = tqdm(total=total, desc="sft", disable=not progress, dynamic_ncols=True)
    step = 0
    try:
        for epoch in range(scfg.epochs):
            order = torch.randperm(len(seqs), generator=gen).tolist()
            for start in range(0, len(order), scfg.batch_size):
                batch = [seqs[i] for i in order[start : start + scfg.batch_size]]
                tensors = _batch(batch, pad_id)
                loss = reply_loss(model, tensors)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"sft step {step + 1}: the loss is {loss.item()} (lower sft.learning_rate)"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, scfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                rows.append({
                    "step": step, "epoch": epoch + 1, "loss": float(loss.item()),
                    "grad_norm": float(grad_norm), "learning_rate": scheduler.get_last_lr()[0],
                    "reply_tokens": int((tensors["labels"] != -100).sum()),
                })
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    finally:
        bar.close()
    _write_rows(scfg.metrics_path, rows)
    first = rows[:steps_per_epoch]
    last = rows[-steps_per_epoch:]
    return {
        "epochs": scfg.epochs,
        "steps": step,
        "examples": len(seqs),
        "first_epoch_loss": sum(r["loss"] for r in first) / len(first) if first else None,
        "last_epoch_loss": sum(r["loss"] for r in last) / len(last) if last else None,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _write_rows(path: str | Path, rows: list[dict]) -> None:
    buf = _io.StringIO()
    fields = ["step", "epoch", "loss", "grad_norm", "learning_rate", "reply_tokens"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def sft_from_config(cfg: "Config") -> dict:
    """config → model → fresh LoRA (seeded) → ``sft.epochs`` passes → ``sft.output_dir`` + summary.

    The train records are the same ones GRPO trains on (:func:`fingrpo.data.sources.training_pool`: the
    worked examples are left out, the sources are mixed, ``train.max_train_records`` applies).
    """
    import torch
    from transformers import set_seed

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    _, records = training_pool(cfg)
    if not records:
        raise TrainingError(f"sft: no train records left in {[s.path for s in train_sources(cfg)]} after the worked examples")
    examples = make_examples(records, cfg.prompt, tokenizer=tokenizer, few_shot_records=few_shot_records(cfg),
                             training=True)
    set_seed(cfg.sft.seed)
    policy = add_lora(model, cfg.lora)
    if cfg.sft.epochs:
        summary = run_sft(policy, tokenizer, examples, cfg)
    else:
        _write_rows(cfg.sft.metrics_path, [])
        summary = {"epochs": 0, "steps": 0, "examples": len(examples), "first_epoch_loss": None,
                   "last_epoch_loss": None, "seconds": 0.0}
    with atomic_path(cfg.sft.output_dir, is_dir=True) as tmp:
        policy.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "fingrpo_config.json", cfg.public_dump())
    summary["output_dir"] = cfg.sft.output_dir
    write_json_atomic(cfg.sft.summary_path, summary)
    log.info("sft: %s", summary)
    return summary


__all__ = ["sft_sequences", "reply_loss", "run_sft", "sft_from_config"]
