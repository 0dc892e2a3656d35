"""The evaluation harness on the tiny random llama: generation, base vs adapter, files, bootstrap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fingrpo.config import load_config
from fingrpo.dsl import program_to_tokens
from fingrpo.evaluate import bootstrap_ci, evaluate_from_config
from fingrpo.model import generate_completions, load_adapter
from fingrpo.scoring import score_files

ACCURACY_KEYS = ("execution_accuracy", "tolerant_accuracy", "program_accuracy", "format_rate")


def _make_adapter(model_path: Path, out: Path, *, perturb: bool) -> Path:
    """A LoRA adapter for the tiny model; ``perturb=False`` keeps peft's init (B = 0: the same function)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    if perturb:
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 2.0)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def _config(tmp_path: Path, model_path: Path, data_dir: Path, adapter: Path, **evaluate):
    return load_config(None, {
        "data": {"train_path": str(data_dir / "train.json"), "dev_path": str(data_dir / "dev.json"),
                 "test_path": str(data_dir / "test.json"), "provenance_path": str(data_dir / "provenance.json")},
        "model": {"name_or_path": str(model_path), "cache_dir": str(tmp_path / "cache")},
        "prompt": {"few_shot": 0, "context_mode": "gold", "max_prompt_tokens": 512},
        "train": {"output_dir": str(adapter)},
        "evaluate": {"splits": ["dev", "test"], "max_records": 3, "max_new_tokens": 6, "batch_size": 2,
                     "bootstrap_samples": 50, "output_path": str(tmp_path / "reports" / "eval.json"),
                     "predictions_path": str(tmp_path / "reports" / "predictions.jsonl"), **evaluate},
    })


@pytest.fixture(scope="module")
def zero_adapter(tiny_model_path, tmp_path_factory) -> Path:
    return _make_adapter(tiny_model_path, tmp_path_factory.mktemp("adapter-zero"), perturb=False)


def test_identical_models_give_identical_numbers_and_full_structure(tmp_path, tiny_model_path, data_dir, zero_adapter):
    cfg = _config(tmp_path, tiny_model_path, data_dir, zero_adapter)
    result = evaluate_from_config(cfg)

    written = json.loads(Path(cfg.evaluate.output_path).read_text())
    assert written == json.loads(json.dumps(result))
    assert set(written) == {"dev", "test", "summary"}
    for split in ("dev", "test"):
        # data.eval_sets null: one set "finqa" per split, and the pooled figure (here the same records)
        assert set(written[split]) == {"finqa", "pooled"}
        assert written[split]["pooled"] == written[split]["finqa"]
        assert set(written[split]["finqa"]) == {"adapter", "base", "retrieval"}
        adapter, base = written[split]["finqa"]["adapter"], written[split]["finqa"]["base"]
        for body in (adapter, base):
            assert body["n"] == 3
            for key in ACCURACY_KEYS:
                assert 0.0 <= body[key] <= 1.0
                lo, hi = body[f"{key}_ci"]
                assert lo <= body[key] <= hi
            assert set(body["rewards"]) == set(cfg.rewards.weights)
            assert set(body["random_subset"]) >= {"n", *ACCURACY_KEYS}
        # LoRA's B = 0 at init: the adapter is the base model, so every number must agree
        assert adapter == base
    assert written["summary"]["dev.finqa.adapter.execution_accuracy"] == written["dev"]["finqa"]["adapter"]["execution_accuracy"]
    assert written["summary"]["adapter_dir"] == str(zero_adapter)
    # the random subset of dev: the first records of dev.json come from the random sample or not
    from fingrpo.data.finqa import load_split, random_subset_ids

    subset = random_subset_ids(data_dir / "provenance.json", "dev")
    first = [r.id for r in load_split(data_dir / "dev.json")[:3]]
    assert written["dev"]["finqa"]["adapter"]["random_subset"]["n"] == sum(i in subset for i in first)

    rows = [json.loads(line) for line in Path(cfg.evaluate.predictions_path).read_text().splitlines()]
    assert len(rows) == 2 * 2 * 3  # splits x models x records
    needed = {"id", "split", "model", "completion", "program", "answer", "correct_official", "correct_tolerant",
              "program_correct", "rewards"}
    assert all(needed <= set(r) for r in rows)
    by_model = {m: [r["completion"] for r in rows if r["model"] == m] for m in ("adapter", "base")}
    assert by_model["adapter"] == by_model["base"]
    assert all(len(c) <= cfg.evaluate.max_new_tokens for c in by_model["base"])  # one char per token


def test_base_is_the_model_without_adapter(tmp_path, tiny_model_path, data_dir):
    """A trained (perturbed) adapter changes outputs; the "base" rows equal the bare model's outputs."""
    from fingrpo.data.finqa import load_split
    from fingrpo.data.prompts import make_examples, render_prompt
    from fingrpo.model import load_model_and_tokenizer

    adapter = _make_adapter(tiny_model_path, tmp_path / "adapter", perturb=True)
    cfg = _config(tmp_path, tiny_model_path, data_dir, adapter, splits=["dev"], max_new_tokens=12)
    evaluate_from_config(cfg, adapter_dir=str(adapter))
    rows = [json.loads(line) for line in Path(cfg.evaluate.predictions_path).read_text().splitlines()]
    base_rows = [r["completion"] for r in rows if r["model"] == "base"]
    adapter_rows = [r["completion"] for r in rows if r["model"] == "adapter"]

    model, tok = load_model_and_tokenizer(cfg.model)
    examples = make_examples(load_split(cfg.data.dev_path)[:3], cfg.prompt, tok)
    prompts = [render_prompt(e, tok, cfg.prompt.use_chat_template) for e in examples]
    plain = generate_completions(model, tok, prompts, max_new_tokens=12, batch_size=2, progress=False)
    assert base_rows == plain
    assert adapter_rows != base_rows
    # the adapter rows come from the LoRA merged into the weights (merge_lora): what the unmerged adapter gives
    unmerged = generate_completions(load_adapter(model, adapter), tok, prompts, max_new_tokens=12, batch_size=2,
                                    progress=False)
    assert adapter_rows == unmerged


def test_merge_lora_folds_the_adapter_into_the_weights_with_the_same_function(tmp_path, tiny_model_path):
    import torch

    from fingrpo.config import ModelConfig
    from fingrpo.model import load_model_and_tokenizer, merge_lora

    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_path)))
    assert merge_lora(model) is model  # no adapter: nothing to fold
    policy = load_adapter(model, _make_adapter(tiny_model_path, tmp_path / "adapter", perturb=True)).eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        before = policy(input_ids=ids).logits
        with policy.disable_adapter():
            bare = policy(input_ids=ids).logits
        q = policy.base_model.model.model.layers[0].self_attn.q_proj
        weight = q.base_layer.weight.detach().clone()
        assert merge_lora(policy) is policy and q.merged
        after = policy(input_ids=ids).logits
    assert not torch.allclose(before, bare, atol=1e-3)  # the adapter matters ...
    assert torch.allclose(after, before, atol=1e-5)      # ... and merged it computes the same function
    assert not torch.equal(q.base_layer.weight, weight)  # now inside the base weights
    merge_lora(policy)  # a second merge adds nothing
    with torch.no_grad():
        assert torch.allclose(policy(input_ids=ids).logits, before, atol=1e-5)


def test_generate_completions_is_greedy_and_batch_independent(tiny_model_path):
    from fingrpo.config import ModelConfig
    from fingrpo.model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_path)))
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ["What is 2 + 2?", "Revenue grew from 120 to 150; by what percent?", "hi"]]
    one = generate_completions(model, tok, prompts, max_new_tokens=10, batch_size=1, progress=False)
    batched = generate_completions(model, tok, prompts, max_new_tokens=10, batch_size=3, progress=False)
    again = generate_completions(model, tok, prompts, max_new_tokens=10, batch_size=3, progress=False)
    pairs = generate_completions(model, tok, prompts, max_new_tokens=10, batch_size=2, progress=False)
    assert one == batched == again == pairs  # left padding: a prompt's completion does not depend on its batch
    # batches are formed by length, the answers come back in the prompts' order
    assert generate_completions(model, tok, prompts[::-1], max_new_tokens=10, batch_size=2, progress=False) == one[::-1]
    assert all(isinstance(c, str) and len(c) <= 10 for c in one)
    assert "<|im_end|>" not in "".join(one)
    assert tok.padding_side == "left"
    assert generate_completions(model, tok, [], max_new_tokens=4, batch_size=2) == []


def test_generate_completions_with_a_shared_system_prompt_equals_hf_greedy_generate(tiny_model_path):
    """Prompts with one long system prompt (prefilled once per batch, each prompt's own tokens against it)
    decode to exactly what transformers' greedy ``generate`` gives each prompt alone."""
    import torch

    from fingrpo.config import ModelConfig
    from fingrpo.model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_path)))
    system = "You answer questions about a company's report with a program. " * 4
    prompts = [tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                       tokenize=False, add_generation_prompt=True)
               for q in ["What is 2 + 2?", "Revenue grew from 120 to 150; by what percent?", "hi", "net income 2019?"]]
    got = generate_completions(model, tok, prompts, max_new_tokens=12, batch_size=4, progress=False)
    expected = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            new = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        expected.append(tok.decode(new, skip_special_tokens=True))
    assert got == expected
    assert got == generate_completions(model, tok, prompts, max_new_tokens=12, batch_size=1, progress=False)


def test_gold_predictions_file_scores_one(tmp_path, data_dir):
    """A predictions JSONL (the harness's own format) whose programs are gold scores 1.0."""
    records = json.loads((data_dir / "dev.json").read_text())
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(
        json.dumps({"id": r["id"], "split": "dev", "model": "gold",
                    "completion": f"Program: {r['qa']['program']}\nAnswer: {r['qa']['exe_ans']}",
                    "program": r["qa"]["program"]}) + "\n"
        for r in records
    ))
    result = score_files(path, data_dir / "dev.json")
    assert result["n"] == 457
    assert result["execution_accuracy"] == 1.0
    assert result["program_accuracy"] == 1.0
    assert result["tolerant_accuracy"] == 1.0
    assert result["format_rate"] == 1.0
    # and the official-token version of the same programs
    official = tmp_path / "official.json"
    official.write_text(json.dumps([{"id": r["id"], "predicted": program_to_tokens(r["qa"]["program"])} for r in records]))
    assert score_files(official, data_dir / "dev.json")["execution_accuracy"] == 1.0


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    values = [1.0] * 30 + [0.0] * 70
    lo, hi = bootstrap_ci(values, samples=500, seed=3)
    assert (lo, hi) == tuple(bootstrap_ci(values, samples=500, seed=3))
    assert lo < 0.3 < hi and 0.15 < lo and hi < 0.45
    assert bootstrap_ci([], samples=100) == [None, None]


def test_missing_adapter_is_a_model_error(tmp_path, tiny_model_path, data_dir):
    from fingrpo.errors import ModelError

    cfg = _config(tmp_path, tiny_model_path, data_dir, tmp_path / "no-adapter")
    with pytest.raises(ModelError, match="adapter folder not found"):
        evaluate_from_config(cfg)
    assert not Path(cfg.evaluate.output_path).exists()


def test_base_only_on_the_random_subset_needs_no_adapter(tmp_path, tiny_model_path, data_dir):
    """``base_only`` evaluates the bare model (no adapter folder exists) and ``subset: random`` keeps only
    the split's random-sample records, in file order."""
    from fingrpo.data.finqa import load_split, random_subset_ids

    cfg = _config(tmp_path, tiny_model_path, data_dir, tmp_path / "no-such-adapter", splits=["dev"],
                  subset="random", max_records=4)
    result = evaluate_from_config(cfg, base_only=True)
    assert set(result["dev"]["finqa"]) == {"base", "retrieval"}
    subset = random_subset_ids(data_dir / "provenance.json", "dev")
    expected = [r.id for r in load_split(data_dir / "dev.json") if r.id in subset][:4]
    rows = [json.loads(line) for line in Path(cfg.evaluate.predictions_path).read_text().splitlines()]
    assert [r["id"] for r in rows] == expected
    assert all(r["random_subset"] and r["model"] == "base" for r in rows)
    assert result["dev"]["finqa"]["base"]["n"] == result["dev"]["finqa"]["base"]["random_subset"]["n"] == 4
    assert result["summary"]["subset"] == "random" and result["summary"]["adapter_dir"] is None
    # the records are not the first four of dev.json (which mixes in the error-file records)
    assert expected != [r.id for r in load_split(data_dir / "dev.json")[:4]]


def _prepared_tatqa(tmp_path: Path, n: int) -> Path:
    """The n converted TAT-QA records with the shortest supporting facts (the char tokenizer: 1 token per char)."""
    from fingrpo.data.tatqa import load_tatqa, to_finqa_records

    records, _ = to_finqa_records(load_tatqa(Path(__file__).resolve().parents[1] / "data/tatqa/tatqa_dataset_dev.json"))
    records = sorted(records, key=lambda r: len(" ".join(r["qa"]["gold_inds"].values())) + len(r["qa"]["question"]))[:n]
    path = tmp_path / "tatqa_dev.json"
    path.write_text(json.dumps(records))
    return path


def test_each_evaluation_set_is_reported_apart_and_the_pooled_figure_counts_each_record_once(
    tmp_path, tiny_model_path, data_dir, zero_adapter
):
    tatqa = _prepared_tatqa(tmp_path, 3)
    cfg = _config(tmp_path, tiny_model_path, data_dir, zero_adapter, max_records=None)
    cfg = load_config(None, {**cfg.model_dump(mode="json"), "data": {**cfg.data.model_dump(mode="json"), "eval_sets": [
        {"name": "finqa_random", "split": "dev", "subset": "random", "max_records": 2, "pooled": True},
        {"name": "finqa_all", "split": "dev", "max_records": 4},
        {"name": "tatqa", "path": str(tatqa), "pooled": True},
    ]}})
    result = evaluate_from_config(cfg)
    dev = result["dev"]
    assert set(dev) == {"finqa_random", "finqa_all", "tatqa", "pooled"}
    assert [dev[s]["adapter"]["n"] for s in ("finqa_random", "finqa_all", "tatqa", "pooled")] == [2, 4, 3, 5]
    assert dev["tatqa"]["adapter"]["datasets"] == {"tatqa": 3} and "tatqa_exact_match" in dev["tatqa"]["base"]
    assert dev["pooled"]["adapter"]["datasets"] == {"finqa": 2, "tatqa": 3}
    assert "tatqa_exact_match" not in dev["finqa_all"]["adapter"]
    # the retriever's recall of the gold facts, per set (model-independent)
    with_facts = sum(bool(r["qa"]["gold_inds"]) for r in json.loads(tatqa.read_text()))
    assert dev["tatqa"]["retrieval"]["n"] == with_facts >= 1 and 0.0 <= dev["tatqa"]["retrieval"]["recall_at_3"] <= 1.0
    assert set(dev["finqa_all"]["retrieval"]) >= {"recall_at_1", "all_gold_at_5", "recall_at_10"}
    summary = result["summary"]
    for key in ("dev.finqa_random.adapter.execution_accuracy", "dev.finqa_all.base.execution_accuracy",
                "dev.tatqa.adapter.tatqa_exact_match", "dev.pooled.adapter.execution_accuracy"):
        assert key in summary, key
    # a record in two sets (the random subset is part of dev) is generated once per model
    rows = [json.loads(line) for line in Path(cfg.evaluate.predictions_path).read_text().splitlines()]
    keys = [(r["model"], r["id"]) for r in rows]
    assert len(keys) == len(set(keys))
    random_ids = {r["id"] for r in rows if "finqa_random" in r["sets"]}
    assert len(random_ids) == 2 and all(r["random_subset"] for r in rows if r["id"] in random_ids)
    distinct = {r["id"] for r in rows if {"finqa_random", "finqa_all"} & set(r["sets"])}
    assert len(rows) == 2 * (len(distinct) + 3)  # models x distinct records (FinQA ones, then TAT-QA)
    assert {r["dataset"] for r in rows if "tatqa" in r["sets"]} == {"tatqa"}
    # the pooled figure is the mean over its distinct records
    pooled = [r for r in rows if r["model"] == "adapter" and ({"finqa_random", "tatqa"} & set(r["sets"]))]
    assert dev["pooled"]["adapter"]["execution_accuracy"] == pytest.approx(
        sum(r["correct_official"] for r in pooled) / len(pooled))


def test_a_random_subset_of_a_file_without_provenance_is_a_config_error(tmp_path, tiny_model_path, data_dir, zero_adapter):
    from fingrpo.errors import ConfigError

    tatqa = _prepared_tatqa(tmp_path, 2)
    cfg = _config(tmp_path, tiny_model_path, data_dir, zero_adapter)
    cfg = load_config(None, {**cfg.model_dump(mode="json"), "data": {**cfg.data.model_dump(mode="json"), "eval_sets": [
        {"name": "tatqa", "path": str(tatqa), "subset": "random"}]}})
    with pytest.raises(ConfigError, match="data.eval_sets.tatqa: subset 'random' needs a FinQA split"):
        evaluate_from_config(cfg)
    assert not Path(cfg.evaluate.output_path).exists()


def test_served_context_is_the_headline_and_gold_facts_the_oracle_beside_it(tmp_path, tiny_model_path, data_dir, zero_adapter):
    """context_mode retrieved: the adapter and the base model see the retriever's facts; the adapter is
    also evaluated with the gold facts (adapter_gold_facts), and each set reports the retriever's recall."""
    cfg = _config(tmp_path, tiny_model_path, data_dir, zero_adapter, splits=["dev"])
    cfg = cfg.model_copy(update={"prompt": cfg.prompt.model_copy(update={"context_mode": "retrieved", "retrieved_top_k": 2})})
    result = evaluate_from_config(cfg, adapter_dir=str(zero_adapter))
    body = result["dev"]["finqa"]
    assert {"adapter", "base", "adapter_gold_facts"} <= set(body)
    assert body["retrieval"]["retriever"] == "lexical" and body["retrieval"]["n"] == 3
    summary = result["summary"]
    assert summary["context_mode"] == "retrieved" and summary["retriever"] == "lexical"
    assert "dev.finqa.adapter_gold_facts.execution_accuracy" in summary
    rows = [json.loads(line) for line in Path(cfg.evaluate.predictions_path).read_text().splitlines()]
    assert sorted(r["model"] for r in rows) == ["adapter"] * 3 + ["adapter_gold_facts"] * 3 + ["base"] * 3
    # the zero adapter is the base model: on the same (retrieved) prompts the same completions
    by = {(r["model"], r["id"]): r["completion"] for r in rows}
    assert all(by["adapter", r["id"]] == by["base", r["id"]] for r in rows)
    off = evaluate_from_config(cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"oracle_gold": False})}),
                               adapter_dir=str(zero_adapter))
    assert "adapter_gold_facts" not in off["dev"]["finqa"]


def test_pass_at_k_is_the_unbiased_estimator():
    from math import comb

    from fingrpo.evaluate import pass_at_k

    for n in (1, 4, 8, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    assert pass_at_k(16, 3, 1) == pytest.approx(3 / 16)  # pass@1 is the share of correct samples
    for bad in ((4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)):
        with pytest.raises(ValueError, match="pass@k"):
            pass_at_k(*bad)


def test_sample_completions_is_seeded_per_prompt_and_greedy_at_temperature_zero(tiny_model_path):
    from fingrpo.config import ModelConfig
    from fingrpo.model import load_model_and_tokenizer, sample_completions

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_path)))
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ["What is 2 + 2?", "Revenue grew from 120 to 150; by what percent?", "hi"]]
    a = sample_completions(model, tok, prompts, 4, 8, batch_size=8, temperature=1.0, seed=3, progress=False)
    b = sample_completions(model, tok, prompts, 4, 8, batch_size=8, temperature=1.0, seed=3, progress=False)
    other = sample_completions(model, tok, prompts, 4, 8, batch_size=8, temperature=1.0, seed=4, progress=False)
    assert a == b and a != other and [len(x) for x in a] == [4, 4, 4]
    assert any(len(set(x)) > 1 for x in a)  # samples, not one greedy answer four times
    greedy = sample_completions(model, tok, prompts, 2, 8, batch_size=4, temperature=0.0, progress=False)
    plain = generate_completions(model, tok, prompts, max_new_tokens=8, batch_size=2, progress=False)
    assert greedy == [[g, g] for g in plain]


def test_pass_at_k_per_set_counts_the_correct_samples_of_each_record(tmp_path, tiny_model_path, data_dir, zero_adapter,
                                                                      monkeypatch):
    """Real sampling end to end (the tiny model is never right), then the same with the samples of known
    correctness: each record's samples i < its index are the gold program, so c = 0, 1, 2 of n = 4."""
    import fingrpo.evaluate as ev

    cfg = _config(tmp_path, tiny_model_path, data_dir, zero_adapter, splits=["dev"], pass_at_k=[1, 2, 4])
    result = evaluate_from_config(cfg)
    body = next(v for k, v in result["dev"].items() if k != "pooled")  # the one set of the config
    for model in ("adapter", "base"):
        assert set(body[model]["pass_at_k"]) == {"1", "2", "4"}
        assert all(v["value"] == 0.0 for v in body[model]["pass_at_k"].values())
    assert ev.ORACLE not in body or "pass_at_k" not in body[ev.ORACLE]
    rows = [json.loads(line) for line in Path(cfg.evaluate.predictions_path).read_text().splitlines()]
    assert {(r["model"], r["samples"], r["samples_correct"]) for r in rows} == {("adapter", 4, 0), ("base", 4, 0)}

    records = {r["id"]: r for r in json.loads((data_dir / "dev.json").read_text())}
    real = ev.sample_completions

    def gold_in_some(model, tokenizer, prompts, n, *args, **kwargs):
        out = real(model, tokenizer, prompts, n, *args, **kwargs)
        order = [r.id for r in ev.eval_records(cfg, ev.eval_sets(cfg)[0])[0]]
        for i, rid in enumerate(order):
            qa = records[rid]["qa"]
            out[i][:i] = [f"Program: {qa['program']}\nAnswer: {qa['exe_ans']}"] * i
        return out

    monkeypatch.setattr(ev, "sample_completions", gold_in_some)
    body = next(v for k, v in evaluate_from_config(cfg)["dev"].items() if k != "pooled")["adapter"]
    for k in (1, 2, 4):
        expected = sum(ev.pass_at_k(4, c, k) for c in (0, 1, 2)) / 3
        assert body["pass_at_k"][str(k)]["value"] == pytest.approx(expected)
    assert body["pass_at_k"]["1"]["value"] < body["pass_at_k"]["2"]["value"] < body["pass_at_k"]["4"]["value"]
    summary_keys = {k for k in result["summary"] if ".pass_at_" in k}
    assert summary_keys and all(k.rsplit(".", 1)[1] in ("pass_at_1", "pass_at_2", "pass_at_4") for k in summary_keys)


def test_the_base_stage_rows_are_reused_only_when_made_for_the_same_prompts_records_and_settings(
        tmp_path, tiny_model_path, data_dir, zero_adapter, monkeypatch):
    import fingrpo.evaluate as ev
    from fingrpo import pipeline

    cfg = _config(tmp_path, tiny_model_path, data_dir, zero_adapter, splits=["dev"], compare_base=True)
    fresh = evaluate_from_config(cfg)  # no cache yet: the base is generated here
    fresh_rows = [json.loads(line) for line in Path(cfg.evaluate.predictions_path).read_text().splitlines()]
    base_eval, base_pred = ev.base_cache_paths(cfg)
    assert base_eval.name == "eval_base.json" and base_pred.name == "predictions_base.jsonl"
    assert not base_eval.exists()
    pipeline.evaluate_stage(cfg, base_stage=True)
    assert json.loads(base_eval.read_text())["summary"]["base_key"] == fresh["summary"]["base_key"]

    generated = []
    real = ev._generate_rows

    def counting(model, tokenizer, examples, records, prompts, rewards, c, model_name):
        generated.append(model_name)
        return real(model, tokenizer, examples, records, prompts, rewards, c, model_name)

    monkeypatch.setattr(ev, "_generate_rows", counting)
    # the base stage again (a flow's next run): its own outputs still hold these rows, nothing is generated
    assert pipeline.evaluate_stage(cfg, base_stage=True)["summary"]["base_from"] == str(base_pred)
    assert generated == []
    cached = evaluate_from_config(cfg)
    assert generated == ["adapter"]  # the base rows came from the base stage
    assert cached["summary"]["base_from"] == str(base_pred) and fresh["summary"]["base_from"] == "generated"
    cached_rows = [json.loads(line) for line in Path(cfg.evaluate.predictions_path).read_text().splitlines()]
    assert cached_rows == fresh_rows  # and are what generating them gives
    assert cached["dev"] == fresh["dev"]
    assert {k: v for k, v in cached["summary"].items() if k != "base_from"} == {
        k: v for k, v in fresh["summary"].items() if k != "base_from"}

    # another reward weighting: still reused, the rewards scored again
    generated.clear()
    reweighted = cfg.model_copy(update={"rewards": cfg.rewards.model_copy(update={"weights": {"format": 1.0}})})
    again = evaluate_from_config(reweighted)
    assert generated == ["adapter"]
    assert all(set(v["base"]["rewards"]) == {"format"} for v in again["dev"].values())
    # another generation length: the cache is stale, the base is generated again
    generated.clear()
    longer = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"max_new_tokens": 9})})
    evaluate_from_config(longer)
    assert generated == ["base", "adapter"]  # the base first: then the adapter is merged into the weights


def test_the_base_stage_with_compare_base_off_evaluates_nothing(tmp_path, tiny_model_path, data_dir, zero_adapter):
    import fingrpo.evaluate as ev
    from fingrpo import pipeline

    cfg = _config(tmp_path, tiny_model_path, data_dir, zero_adapter, splits=["dev"], compare_base=False)
    out = pipeline.evaluate_stage(cfg, base_stage=True)
    base_eval, base_pred = ev.base_cache_paths(cfg)
    written = json.loads(base_eval.read_text())
    assert written == out and "compare_base is false" in written["summary"]["skipped"]
    assert base_pred.read_text() == ""
