"""Greedy evaluation speed: fingrpo's evaluation decoding (``generate_completions``, with ``--adapter`` the LoRA
merged into the weights first; finished prompts leave the decode batch) against the previous implementation
(transformers' ``generate`` on left-padded batches of similar length, the system prompt recomputed for
every row, the LoRA unmerged), side by side on the same records, in one process.

    python bench/greedy_eval.py                        # 48 FinQA dev random-sample records, batch 16, 2 rounds
    python bench/greedy_eval.py --records 32 --rounds 1 --adapter models/adapter

The prompts are the evaluation's own (``params.yaml``'s prompt section, the lexical retriever so that
no trained retriever is needed: the same prompt shape and length as the cross-encoder's top 3). The
two implementations alternate (previous first in odd rounds); the table gives seconds per record for
each, the ratio, and how many completions are identical (greedy decoding: differences come only from
float rounding of padded vs unpadded batches). Results go to ``bench/results/<date>-greedy-eval.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def previous_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """The implementation before shared-prefix greedy decoding (fingrpo 85a12ef ``generate_completions``)."""
    import torch
    from transformers import GenerationConfig

    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                               eos_token_id=eos_id, bos_token_id=tokenizer.bos_token_id)
    tokenizer.padding_side = "left"
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    out = [""] * len(prompts)
    model.eval()
    for start in range(0, len(prompts), batch_size):
        rows = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            generated = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                       generation_config=gen_cfg)
        for i, row in zip(rows, generated[:, enc["input_ids"].shape[1]:].tolist()):
            if eos_id in row:
                row = row[:row.index(eos_id)]
            out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return out


def fingrpo_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """What ``fingrpo evaluate`` runs: the adapter (if any) merged into the weights, then
    ``generate_completions``; unmerged again afterwards for the other implementation."""
    from fingrpo.model import generate_completions, merge_lora

    merge_lora(model)
    try:
        return generate_completions(model, tokenizer, prompts, max_new_tokens, batch_size, progress=False)
    finally:
        if getattr(model, "peft_config", None):
            model.unmerge_adapter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--adapter", default=None, help="a LoRA folder (models/adapter); default: the base model")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = ap.parse_args()

    import torch

    from fingrpo.config import load_config
    from fingrpo.data.prompts import make_examples, render_prompt
    from fingrpo.data.sources import eval_records, eval_sets
    from fingrpo.model import load_adapter, load_model_and_tokenizer

    cfg = load_config(args.params)
    cfg.prompt.retriever = "lexical"
    model, tok = load_model_and_tokenizer(cfg.model)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    records = eval_records(cfg, eval_sets(cfg)[0])[0][: args.records]
    prompts = [render_prompt(e, tok, cfg.prompt.use_chat_template) for e in make_examples(records, cfg.prompt, tok)]
    n_tokens = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    systems = {
        "previous (generate, padded batches)": lambda: previous_generate(model, tok, prompts, args.max_new_tokens,
                                                                         args.batch_size),
        "fingrpo (shared prefix, LoRA merged, done rows dropped)": lambda: fingrpo_generate(
            model, tok, prompts, args.max_new_tokens, args.batch_size),
    }
    names = list(systems)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, list[str]] = {}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            outputs[name] = systems[name]()
            seconds[name].append(time.perf_counter() - t0)
    same = sum(a == b for a, b in zip(*(outputs[n] for n in names)))
    per = {n: statistics.median(s) / len(prompts) for n, s in seconds.items()}
    print(f"{len(prompts)} records, prompt tokens median {statistics.median(n_tokens):.0f} (max {max(n_tokens)}), "
          f"batch {args.batch_size}, {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"{args.rounds} round(s), model {'+adapter' if args.adapter else 'base'}")
    print(f"{'implementation':45s} {'s/record':>9s} {'runs (s)':>20s}")
    for n in names:
        print(f"{n:45s} {per[n]:9.3f} {', '.join(f'{x:.1f}' for x in seconds[n]):>20s}")
    ratio = per[names[0]] / per[names[1]]
    print(f"speed-up {ratio:.2f}x; identical completions {same}/{len(prompts)}")
    out = ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-greedy-eval.json"
    out.write_text(json.dumps({"records": len(prompts), "batch_size": args.batch_size,
                               "max_new_tokens": args.max_new_tokens, "adapter": args.adapter,
                               "prompt_tokens_median": statistics.median(n_tokens), "seconds": seconds,
                               "seconds_per_record": per, "speedup": ratio, "identical": same,
                               "threads": torch.get_num_threads(), "machine": platform.platform(),
                               "cpus": os.cpu_count()}, indent=1))
    print(f"-> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
