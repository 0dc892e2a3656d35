"""The evaluation harness: greedy completions of the adapter and of the base model (adapter off) on
every evaluation set, each scored by :mod:`fingrpo.scoring`, with bootstrap intervals.

    fingrpo evaluate [--adapter models/adapter]       # params.yaml `evaluate:` section -> reports/eval.json

The scoring rules themselves (official FinQA and TAT-QA, and the tolerant rule) live in
:mod:`fingrpo.scoring`; ``fingrpo score`` scores a predictions file with them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from fingrpo.config import Config
from fingrpo.data.finqa import FinQARecord
from fingrpo.data.prompts import make_examples, render_prompt
from fingrpo.data.sources import dataset_of, eval_records, eval_sets, few_shot_records
from fingrpo.io import read_json, write_json_atomic, write_jsonl_atomic
from fingrpo.lineage import DATA_POINTER, data_hash
from fingrpo.model import generate_completions, load_adapter, load_model_and_tokenizer, merge_lora, sample_completions
from fingrpo.official import tatqa_em_f1
from fingrpo.retrieval import get_retriever, retrieval_recall
from fingrpo.rewards import build_rewards, reward_completions
from fingrpo.scoring import (
    ROW_METRICS,
    mean_or_zero,
    score_prediction,
    tatqa_gold,
    tatqa_prediction_of,
)

log = logging.getLogger(__name__)

ORACLE = "adapter_gold_facts"  # the adapter with the gold facts as its context: the oracle-retriever figure


def bootstrap_ci(values: Sequence[float], samples: int = 1000, seed: int = 0, level: float = 0.95) -> list[float | None]:
    """Percentile bootstrap interval of the mean (numpy, seeded): ``[lo, hi]``, ``[None, None]`` if empty.

    >>> bootstrap_ci([1.0] * 10)
    [1.0, 1.0]
    """
    import numpy as np

    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return [None, None]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(samples, arr.size))  # (samples, n) resampled indices
    means = arr[idx].mean(axis=1)  # (samples,)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one record from ``n`` samples of which ``c`` are correct (Chen et al. 2021):
    1 − C(n − c, k) / C(n, k), the chance that k of the n samples drawn without replacement hold a correct one.

    >>> pass_at_k(16, 0, 4), pass_at_k(16, 16, 1), pass_at_k(4, 1, 1), round(pass_at_k(16, 2, 8), 4)
    (0.0, 1.0, 0.25, 0.7667)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
        miss *= 1.0 - k / i
    return 1.0 - miss


def _sample_correct(model: Any, tokenizer: Any, records: list, prompts: list[str], cfg: "Config") -> list[int]:
    """How many of n = max(evaluate.pass_at_k) completions sampled at the training temperature are correct
    (the official rule, as execution_accuracy), per record."""
    ecfg, n = cfg.evaluate, max(cfg.evaluate.pass_at_k)
    samples = sample_completions(model, tokenizer, prompts, n, ecfg.max_new_tokens, ecfg.batch_size,
                                 temperature=cfg.train.temperature, top_p=cfg.train.top_p, seed=cfg.train.seed)
    key = ROW_METRICS["execution_accuracy"]
    return [sum(bool(score_prediction({"id": rec.id, "completion": c}, rec, ecfg.rel_tolerance)[key])
                for c in completions) for rec, completions in zip(records, samples)]


def base_cache_paths(cfg: "Config") -> tuple[Path, Path]:
    """Where ``fingrpo evaluate --base-stage`` keeps the base model's evaluation (the ``evaluate_base`` DVC
    stage): beside ``evaluate.output_path`` and ``evaluate.predictions_path``, named ``*_base``."""
    out, pred = Path(cfg.evaluate.output_path), Path(cfg.evaluate.predictions_path)
    return out.with_name(f"{out.stem}_base{out.suffix}"), pred.with_name(f"{pred.stem}_base{pred.suffix}")


def _base_key(cfg: "Config", keys: list, records: list, prompts: list[str]) -> str:
    """What the base model's rows depend on: the model, the exact prompts, the records (their gold
    answers), generation, scoring and (pass@k) sampling. Equal keys: the cached rows are valid (their
    rewards are scored again with the current ``rewards``: cheap, and no rewards knob re-runs the base)."""
    ecfg = cfg.evaluate
    parts = {"model": cfg.model.model_dump(mode="json"),
             "keys": [list(k) for k in keys], "prompts": prompts,
             "records": [r.model_dump(mode="json") if hasattr(r, "model_dump") else repr(r) for r in records],
             "evaluate": [ecfg.max_new_tokens, ecfg.rel_tolerance, sorted(ecfg.pass_at_k)],
             "sampling": [cfg.train.temperature, cfg.train.top_p, cfg.train.seed] if ecfg.pass_at_k else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _cached_base_rows(cfg: "Config", paths: tuple[Path, Path], key: str, examples: list, prompts: list[str],
                      rewards: list) -> tuple[list[dict], dict] | None:
    """The base rows in ``paths`` (an evaluation JSON and its predictions) when they were made for exactly
    this ``key``, their rewards scored with ``rewards``; None when there are none or made for something else."""
    eval_path, pred_path = paths
    if not (eval_path.is_file() and pred_path.is_file()):
        return None
    try:
        summary = read_json(eval_path).get("summary", {})
        rows = [json.loads(line) for line in pred_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError, AttributeError) as e:
        log.warning("base model: cannot read the cached evaluation %s (%s); evaluating it again", eval_path, e)
        return None
    if summary.get("base_key") != key or len(rows) != len(prompts):
        log.info("base model: %s was made for other prompts, records or settings; evaluating it again", eval_path)
        return None
    reward = reward_completions(rewards, prompts, [r["completion"] for r in rows], examples, cfg.rewards.nan_value)
    for i, row in enumerate(rows):
        for extra in ("sets", "split", "random_subset"):
            row.pop(extra, None)
        row["rewards"] = {name: vals[i] for name, vals in reward.per_function.items()}
        row["reward_total"] = reward.total[i]
    return rows, dict(reward.failures)


_ACCURACIES = ("execution_accuracy", "tolerant_accuracy", "program_accuracy", "format_rate")  # every record has them


def _metrics(rows: list[dict], samples: int, seed: int) -> dict:
    out: dict[str, Any] = {"n": len(rows)}
    for name in _ACCURACIES:
        key = ROW_METRICS[name]
        vals = [float(bool(r[key])) for r in rows]
        out[name] = mean_or_zero(vals) if vals else None
        out[f"{name}_ci"] = bootstrap_ci(vals, samples, seed)
    return out


def _generate_rows(model: Any, tokenizer: Any, examples: list, records: list, prompts: list[str], rewards: list,
                   cfg: "Config", model_name: str) -> tuple[list[dict], dict]:
    """Greedy completions of one model for ``records``, each scored (FinQA rules, TAT-QA's for converted
    records) and rewarded: one row per record (what predictions.jsonl holds)."""

    ecfg = cfg.evaluate
    completions = generate_completions(model, tokenizer, prompts, ecfg.max_new_tokens, ecfg.batch_size)
    reward = reward_completions(rewards, prompts, completions, examples, cfg.rewards.nan_value)
    rows = []
    for i, (rec, completion) in enumerate(zip(records, completions)):
        s = score_prediction({"id": rec.id, "completion": completion}, rec, ecfg.rel_tolerance)
        row = {
            "id": rec.id, "dataset": dataset_of(rec), "model": model_name,
            "completion": completion, "program": s["program"], "answer": s["answer"], "value": s["value"],
            "exe_ans": s["exe_ans"], "correct_official": s["correct_official"],
            "correct_tolerant": s["correct_tolerant"], "program_correct": s["program_correct"],
            "format_ok": s["format_ok"], "error": s["error"],
            "rewards": {name: vals[i] for name, vals in reward.per_function.items()},
            "reward_total": reward.total[i],
        }
        gold = tatqa_gold(rec)
        if gold is not None:
            answer, scale = tatqa_prediction_of(s, gold)
            row["tatqa_exact_match"] = tatqa_em_f1(gold, answer, scale)[0]
            row["tatqa_prediction"] = [answer, scale]
        rows.append(row)
    return rows, dict(reward.failures)


def _set_metrics(rows: list[dict], cfg: "Config") -> dict:
    """Accuracies with intervals, reward means and (for TAT-QA records) the official exact match."""
    ecfg = cfg.evaluate
    metrics = _metrics(rows, ecfg.bootstrap_samples, ecfg.bootstrap_seed)
    names = sorted({n for r in rows for n in r["rewards"]})
    metrics["rewards"] = {n: mean_or_zero([r["rewards"][n] for r in rows if n in r["rewards"]]) for n in names}
    metrics["reward_total"] = mean_or_zero([r["reward_total"] for r in rows])
    if rows and all("samples_correct" in r for r in rows):
        n = rows[0]["samples"]
        metrics["pass_at_k"] = {}
        for k in sorted(set(ecfg.pass_at_k)):
            vals = [pass_at_k(n, r["samples_correct"], k) for r in rows]
            metrics["pass_at_k"][str(k)] = {"value": mean_or_zero(vals),
                                            "ci": bootstrap_ci(vals, ecfg.bootstrap_samples, ecfg.bootstrap_seed)}
    tatqa = [r["tatqa_exact_match"] for r in rows if "tatqa_exact_match" in r]
    if tatqa:
        metrics["tatqa_exact_match"] = mean_or_zero(tatqa)
        metrics["tatqa_exact_match_ci"] = bootstrap_ci(tatqa, ecfg.bootstrap_samples, ecfg.bootstrap_seed)
    metrics["datasets"] = {d: sum(r["dataset"] == d for r in rows) for d in sorted({r["dataset"] for r in rows})}
    return metrics


SUMMARY_KEYS = ("execution_accuracy", "tolerant_accuracy", "program_accuracy", "format_rate", "reward_total", "n")


def evaluate_from_config(cfg: "Config", adapter_dir: str | Path | None = None, base_only: bool = False,
                         few_shot: Sequence[Any] | None = None) -> dict:
    """Greedy evaluation of the adapter (default ``train.output_dir``) and, with
    ``evaluate.compare_base``, of the base model (adapter disabled) under the same harness, on every
    evaluation set (``data.eval_sets``, :func:`fingrpo.data.sources.eval_sets`), each reported apart.
    ``base_only``: the base model alone, no adapter needed (the baseline table of docs/results.md).
    ``few_shot``: the worked examples of the prompts (default: the config's, :func:`few_shot_records`).

    A record that is in several sets (the FinQA dev random subset is part of FinQA dev) is generated
    once per model. Writes ``evaluate.output_path``::

        {"dev": {"finqa_random": {"adapter": {"n", "execution_accuracy", "execution_accuracy_ci": [lo, hi],
                                              "tolerant_accuracy", "program_accuracy", "format_rate" (each + "_ci"),
                                              "rewards": {name: mean}, "reward_total",
                                              "tatqa_exact_match" (TAT-QA records), "datasets": {name: n},
                                              "random_subset": {accuracies on its FinQA random-sample records},
                                              "pass_at_k": {"8": {"value", "ci"}} (evaluate.pass_at_k)},
                                  "base": {...}},
                 "finqa_all": {...}, "tatqa": {...},     # each set also has "retrieval": {recall_at_k, all_gold_at_k}
                 "pooled": {...}},            # every record of the sets marked pooled, once
         "summary": {"dev.finqa_random.adapter.execution_accuracy": ..., ..., "adapter_dir": ..., "model": ...}}

    and ``evaluate.predictions_path`` (JSONL, one row per record and model, with the sets it is in).
    Returns the same dict.
    """

    ecfg = cfg.evaluate
    adapter_dir = None if base_only else str(adapter_dir or cfg.train.output_dir)
    # config -> data -> model -> generate + score (each distinct record once per model) -> per-set figures -> write
    rewards = build_rewards(cfg.rewards)
    few_shot = (list(few_shot) if few_shot is not None else few_shot_records(cfg)) or None
    base, tokenizer = load_model_and_tokenizer(cfg.model)
    model = base if base_only else load_adapter(base, adapter_dir)
    model.eval()

    sets = eval_sets(cfg)
    members: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (split, set name) -> [(path, record id)]
    random_ids: dict[str, set[str]] = {}
    distinct: dict[tuple[str, str], Any] = {}
    for es in sets:
        records, random_ids[es.path] = eval_records(cfg, es)
        members[es.split, es.name] = [(es.path, r.id) for r in records]
        for r in records:
            distinct.setdefault((es.path, r.id), r)
    keys = list(distinct)
    records = [distinct[k] for k in keys]
    def prompts_for(prompt_cfg: Any) -> tuple[list, list[str]]:
        examples = make_examples(records, prompt_cfg, tokenizer, few_shot_records=few_shot)
        return examples, [render_prompt(e, tokenizer, prompt_cfg.use_chat_template) for e in examples]

    served = prompts_for(cfg.prompt)  # the configured context: what a served question gets
    variants = [("base" if base_only else "adapter", contextlib.nullcontext, served)]
    if ecfg.compare_base and not base_only:
        variants.append(("base", model.disable_adapter, served))  # the same weights, LoRA switched off
    if ecfg.oracle_gold and not base_only and cfg.prompt.context_mode != "gold":
        gold_cfg = cfg.prompt.model_copy(update={"context_mode": "gold"})
        variants.append((ORACLE, contextlib.nullcontext, prompts_for(gold_cfg)))
    by_model: dict[str, dict[tuple[str, str], dict]] = {}
    failures: dict[str, dict] = {}
    # the base model's rows are reused when they were made for the same prompts, records and settings: the
    # evaluate_base stage's (base_cache_paths), or for a base-only evaluation what its own outputs hold
    base_key, base_from = _base_key(cfg, keys, records, served[1]), None
    base_cache = (Path(ecfg.output_path), Path(ecfg.predictions_path)) if base_only else base_cache_paths(cfg)
    # the base model first: the adapter's LoRA is then merged into the weights (merge_lora: faster greedy
    # decoding), which disable_adapter would undo only up to float rounding
    for name, ctx, (examples, prompts) in sorted(variants, key=lambda v: v[0] != "base"):
        cached = _cached_base_rows(cfg, base_cache, base_key, examples, prompts, rewards) if name == "base" else None
        if cached is not None:
            log.info("base model: the rows of %s (same prompts, records and settings)", base_cache[1])
            rows, failures[name] = cached
            by_model[name] = dict(zip(keys, rows))
            base_from = str(base_cache[1])
            continue
        if name == "base":
            base_from = "generated"
        else:
            merge_lora(model)
        log.info("evaluating %s on %d records of %d sets", name, len(records), len(sets))
        with ctx():
            rows, failures[name] = _generate_rows(model, tokenizer, examples, records, prompts, rewards, cfg, name)
            if ecfg.pass_at_k and name != ORACLE:  # the headroom GRPO can turn into pass@1 (served context)
                log.info("sampling %d completions per record of %s for pass@k", max(ecfg.pass_at_k), name)
                for row, c in zip(rows, _sample_correct(model, tokenizer, records, prompts, cfg)):
                    row["samples"], row["samples_correct"] = max(ecfg.pass_at_k), c
        by_model[name] = dict(zip(keys, rows))
    by_model = {name: by_model[name] for name, _, _ in variants}  # the reports' order: adapter, base, oracle
    retriever = get_retriever(cfg.prompt, required=cfg.prompt.context_mode == "retrieved")

    result: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    pooled_keys: dict[str, list[tuple[str, str]]] = {}
    for es in sets:
        if es.pooled:
            pooled_keys.setdefault(es.split, [])
            pooled_keys[es.split] += [k for k in members[es.split, es.name] if k not in pooled_keys[es.split]]
    groups = [(es.split, es.name, members[es.split, es.name]) for es in sets]
    groups += [(split, "pooled", ks) for split, ks in pooled_keys.items()]
    for split, set_name, set_keys in groups:
        body = result.setdefault(split, {}).setdefault(set_name, {})
        # the configured retriever against the gold facts (context_mode retrieved: what serving sees)
        body["retrieval"] = retrieval_recall([distinct[k] for k in set_keys], retriever)
        for name, _, _ in variants:
            metrics = _set_metrics([by_model[name][k] for k in set_keys], cfg)
            metrics["reward_failures"] = failures[name]  # over every record this model generated for
            sample = [k for k in set_keys if k[1] in random_ids.get(k[0], set())]
            if any(random_ids.get(p) for p, _ in set_keys):  # its FinQA random-sample records (the rest are harder)
                sub = [by_model[name][k] for k in sample]
                metrics["random_subset"] = _metrics(sub, ecfg.bootstrap_samples, ecfg.bootstrap_seed)
            body[name] = metrics
            for key in SUMMARY_KEYS + (("tatqa_exact_match",) if "tatqa_exact_match" in metrics else ()):
                summary[f"{split}.{set_name}.{name}.{key}"] = metrics[key]
            for k, v in metrics.get("pass_at_k", {}).items():
                summary[f"{split}.{set_name}.{name}.pass_at_{k}"] = v["value"]
    member_sets = {k: set(v) for k, v in members.items()}
    out_rows = []
    for name, _, _ in variants:
        for key in keys:
            path, rid = key
            row = dict(by_model[name][key])
            row["sets"] = [es.name for es in sets if key in member_sets[es.split, es.name]]
            row["split"] = next(es.split for es in sets if key in member_sets[es.split, es.name])
            row["random_subset"] = rid in random_ids.get(path, set())
            out_rows.append(row)
    summary.update({
        "adapter_dir": adapter_dir, "model": cfg.model.name_or_path, "subset": ecfg.subset,
        "sets": {f"{es.split}.{es.name}": {"path": es.path, "n": len(members[es.split, es.name]), "subset": es.subset,
                                           "pooled": es.pooled} for es in sets},
        "prompt": f"{cfg.prompt.context_mode}, {cfg.prompt.few_shot}-shot",
        "context_mode": cfg.prompt.context_mode,
        "retriever": retriever.name if cfg.prompt.context_mode == "retrieved" else None,
        "data_md5": data_hash(DATA_POINTER) or "none",  # the data version evaluated (the gate compares like with like)
        "max_records": ecfg.max_records,
        "base_key": base_key,  # what the base model's rows depend on (the evaluate_base stage's cache key)
        "base_from": base_from,  # the base rows: "generated" here, the evaluate_base stage's file, or None
    })
    result["summary"] = summary
    write_json_atomic(ecfg.output_path, result)
    write_jsonl_atomic(ecfg.predictions_path, out_rows)
    return result


def evaluate_registered(cfg: "Config", adapter_dir: str | Path, serving: dict, output_dir: str | Path) -> tuple[Path, Path]:
    """Evaluate a registered model version (its downloaded adapter and serving config) on ``cfg``'s
    evaluation sets, in ``cfg``'s context mode, with the base model, prompt format and worked examples
    it was trained with; adapter only. What the gate runs to measure the champion on the challenger's
    records. Returns the eval.json and predictions.jsonl written under ``output_dir``."""
    output_dir = Path(output_dir)
    tree = cfg.model_dump(mode="json")
    tree["model"].update(serving["model"])
    # its own prompt format, the challenger's context: the set is the challenger's (records, data, context)
    prompt = {k: v for k, v in serving["prompt"].items() if k in tree["prompt"]}
    # (its own retriever: the version carries it, and serving ranks with it)
    tree["prompt"].update(prompt, context_mode=cfg.prompt.context_mode, retrieved_top_k=cfg.prompt.retrieved_top_k)
    tree["evaluate"].update(compare_base=False, oracle_gold=False, output_path=str(output_dir / "eval.json"),
                            predictions_path=str(output_dir / "predictions.jsonl"))
    champion_cfg = Config.model_validate(tree)
    few_shot = [FinQARecord.model_validate(r) for r in serving.get("few_shot_records") or []]
    evaluate_from_config(champion_cfg, adapter_dir=adapter_dir, few_shot=few_shot)
    return output_dir / "eval.json", output_dir / "predictions.jsonl"


__all__ = ["bootstrap_ci", "evaluate_from_config", "evaluate_registered"]
