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
from fingrpo.grpo.rollout import expand_cache_, prompt_forward
from fingrpo.io import atomic_path, write_json_atomic, write_text_atomic
from fingrpo.model import add_lora, load_model_and_tokenizer, peak_rss_mb

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
    reply at the end of its row, so vocabulary logits are needed only for the last positions."""
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
    }


def _rows_loss_sum(model: Any, batch: dict, rows: slice, prefix: Any = None):
    """Summed next-token cross-entropy over the reply tokens of ``rows`` of the batch, and their count.
    ``prefix``: ``(cache, per-layer keys/values)`` of the shared prefix, or None (no prefix). The rows'
    all-padding leading columns are dropped first; vocabulary logits only for the last positions that
    hold a reply token (left padding puts every reply at the end of its row)."""
    import torch.nn.functional as F

    n_prefix = batch["prefix"].shape[1]
    own = batch["attention_mask"][rows, n_prefix:]  # (b, T): the rows' own tokens
    start = int(own.any(dim=0).nonzero()[0])  # the first column any of these rows uses
    labels = batch["labels"][rows, start:]
    keep = min(labels.shape[1], int((labels != -100).sum(dim=1).max()) + 1)
    kwargs: dict = {}
    if prefix is not None:
        cache, kv = prefix
        expand_cache_(cache, labels.shape[0], kv)  # the prefix as a view per row (autograd sums the rows back)
        kwargs = {"cache": cache, "use_cache": True}
    mask_2d = batch["attention_mask"][rows]
    logits = model(
        input_ids=batch["input_ids"][rows, start:],
        attention_mask=mask_2d[:, list(range(n_prefix)) + list(range(n_prefix + start, mask_2d.shape[1]))],
        position_ids=batch["position_ids"][rows, start:], logits_to_keep=keep, **kwargs,
    ).logits[:, :-1]  # (b, keep-1, V): position j predicts token j+1
    target = labels[:, -keep + 1 :]
    mask = target != -100
    return F.cross_entropy(logits[mask].float(), target[mask], reduction="sum"), int(mask.sum())


def _prefix_forward(model: Any, batch: dict, leaves: bool):
    """The shared prefix's forward (once per batch): ``((cache, kv), outputs)``, ``(None, [])`` without a
    prefix. With ``leaves``, ``kv`` are
    the keys/values cut from the prefix graph into leaves (their gradients accumulate over micro-batches;
    ``outputs`` pairs each leaf with the graph tensor to back-propagate it through)."""
    if not batch["prefix"].shape[1]:
        return None, []
    cache, kv, _ = prompt_forward(model, batch["prefix"][0])
    if not leaves:
        return (cache, kv), []
    cut = [tuple(t.detach().requires_grad_() if t.requires_grad else t for t in pair) for pair in kv]
    outputs = [(t, leaf) for pair, pair_cut in zip(kv, cut) for t, leaf in zip(pair, pair_cut) if t.requires_grad]
    return (cache, cut), outputs


def reply_loss(model: Any, batch: dict):
    """Mean next-token cross-entropy over the reply tokens (``labels != -100``), every reply token of the
    batch weighing the same. The shared prefix runs once (its KV cache expanded to the B rows as a view:
    autograd sums the rows' gradients back into it); vocabulary logits only for the last positions."""
    prefix, _ = _prefix_forward(model, batch, leaves=False)
    total, n = _rows_loss_sum(model, batch, slice(None), prefix)
    return total / n


def reply_loss_backward(model: Any, batch: dict, micro_batch_size: int | None = None):
    """``reply_loss(model, batch).backward()``, with the rows back-propagated ``micro_batch_size`` at a time
    against ONE forward of the shared prefix (as :class:`fingrpo.grpo.rollout.GroupLogprobs` does): each
    micro-batch's backward frees its activations while the prefix's cut keys/values accumulate their
    gradients, which then go through the prefix's forward once. Same loss and gradients (each micro-batch's
    summed loss is divided by the whole batch's reply tokens); the peak holds one micro-batch's
    activations. Returns the batch's (detached) mean loss."""
    import torch

    b = batch["input_ids"].shape[0]
    if not micro_batch_size or micro_batch_size >= b:
        loss = reply_loss(model, batch)
        loss.backward()
        return loss.detach()
    n_total = int((batch["labels"] != -100).sum())
    prefix, outputs = _prefix_forward(model, batch, leaves=True)
    loss = torch.zeros(())
    for start in range(0, b, micro_batch_size):
        part, _ = _rows_loss_sum(model, batch, slice(start, start + micro_batch_size), prefix)
        part = part / n_total
        part.backward()
        loss = loss + part.detach()
    pairs = [(t, leaf.grad) for t, leaf in outputs if leaf.grad is not None]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    return loss


def epoch_batches(lengths: Sequence[int], batch_size: int, generator: Any, group_by_length: bool = True) -> list[list[int]]:
    """One epoch's batches of sequence indices: a random order cut into batches; with ``group_by_length``
    (as transformers' ``group_by_length``), windows of 50 batches of that order are sorted by length before
    the cut and the batches shuffled, so a batch pads little. Every index once per epoch.

    >>> import torch
    >>> epoch_batches([5, 50, 6, 51], 2, torch.Generator().manual_seed(0))
    [[3, 1], [2, 0]]
    """
    import torch

    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    window = 50 * batch_size
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: -lengths[i])
        batches += [chunk[s : s + batch_size] for s in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


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
    lengths = [len(ids) for ids, _ in seqs]
    steps_per_epoch = math.ceil(len(seqs) / scfg.batch_size)  # epoch_batches' count too (windows of whole batches)
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
            for batch_ids in epoch_batches(lengths, scfg.batch_size, gen, scfg.group_by_length):
                tensors = _batch([seqs[i] for i in batch_ids], pad_id)
                optimizer.zero_grad(set_to_none=True)
                loss = reply_loss_backward(model, tensors, scfg.micro_batch_size)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"sft step {step + 1}: the loss is {loss.item()} (lower sft.learning_rate)"
                    )
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
        "peak_rss_mb": round(peak_rss_mb(), 1),
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


__all__ = ["epoch_batches", "reply_loss", "reply_loss_backward", "run_sft", "sft_from_config", "sft_sequences"]
