"""Several datasets in one config: the training pool and the evaluation sets (fingrpo.data.sources)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fingrpo.config import load_config
from fingrpo.data.sources import data_files, eval_sets, train_sources, training_pool
from fingrpo.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _files(tmp_path: Path, data_dir: Path) -> tuple[Path, Path]:
    finqa = tmp_path / "finqa.json"
    finqa.write_text(json.dumps(json.loads((data_dir / "train.json").read_text())[:5]))
    other = json.loads((data_dir / "dev.json").read_text())[:4]
    for r in other:
        r["dataset"] = "tatqa"
    tatqa = tmp_path / "tatqa.json"
    tatqa.write_text(json.dumps(other))
    return finqa, tatqa


def test_the_pool_mixes_sources_in_turn_after_the_worked_examples(tmp_path, data_dir):
    finqa, tatqa = _files(tmp_path, data_dir)
    cfg = load_config(None, {"prompt": {"few_shot": 1}, "data": {"train_path": str(finqa), "train_sources": [
        {"name": "finqa"}, {"name": "tatqa", "path": str(tatqa), "max_records": 3}]}})
    few, pool = training_pool(cfg)
    finqa_ids = [r["id"] for r in json.loads(finqa.read_text())]
    tatqa_ids = [r["id"] for r in json.loads(tatqa.read_text())]
    assert [r.id for r in few] == finqa_ids[:1]  # worked examples: the first source's first records
    assert [r.id for r in pool] == [finqa_ids[1], tatqa_ids[0], finqa_ids[2], tatqa_ids[1], finqa_ids[3], tatqa_ids[2],
                                    finqa_ids[4]]
    assert [s.path for s in train_sources(cfg)] == [str(finqa), str(tatqa)]  # a null path is data.train_path
    capped = load_config(None, {**cfg.model_dump(mode="json"), "train": {"max_train_records": 4}})
    assert [r.id for r in training_pool(capped)[1]] == [r.id for r in pool][:4]  # the cap keeps the mix


def test_grpo_can_train_on_its_own_pool_of_the_same_files(tmp_path, data_dir):
    finqa, tatqa = _files(tmp_path, data_dir)
    warm = [{"name": "finqa"}, {"name": "tatqa", "path": str(tatqa), "max_records": 1}]
    tree = {"prompt": {"few_shot": 1}, "data": {"train_path": str(finqa), "train_sources": warm}}
    cfg = load_config(None, tree)
    assert [r.id for r in training_pool(cfg, "grpo")[1]] == [r.id for r in training_pool(cfg)[1]]  # null: the same
    own = load_config(None, {**tree, "train": {"train_sources": [{"name": "tatqa", "path": str(tatqa)}, {"name": "finqa"}]}})
    finqa_ids = [r["id"] for r in json.loads(finqa.read_text())]
    tatqa_ids = [r["id"] for r in json.loads(tatqa.read_text())]
    few, pool = training_pool(own, "grpo")
    assert [r.id for r in few] == finqa_ids[:1]  # the worked examples stay out of GRPO's pool too
    assert [r.id for r in pool] == [tatqa_ids[0], finqa_ids[1], tatqa_ids[1], finqa_ids[2], tatqa_ids[2], finqa_ids[3],
                                    tatqa_ids[3], finqa_ids[4]]
    assert [r.id for r in training_pool(own)[1]] == [r.id for r in training_pool(cfg)[1]]  # the warm start's is unchanged
    stray = load_config(None, {**tree, "train": {"train_sources": [{"name": "x", "path": str(tmp_path / "x.json")}]}})
    with pytest.raises(ConfigError, match="x.json.*is not a file of data.train_sources"):
        training_pool(stray, "grpo")


def test_null_lists_are_the_one_dataset_defaults():
    cfg = load_config(None, {"evaluate": {"splits": ["dev", "test"], "subset": "random"}})
    assert [(s.name, s.split, s.path, s.subset, s.pooled) for s in eval_sets(cfg)] == [
        ("finqa", "dev", "data/finqa/dev.json", "random", True), ("finqa", "test", "data/finqa/test.json", "random", True)]
    assert [(s.name, s.path) for s in train_sources(cfg)] == [("finqa", "data/finqa/train.json")]


def test_params_yaml_trains_and_evaluates_on_both_datasets():
    cfg = load_config(ROOT / "params.yaml")
    assert [s.name for s in train_sources(cfg)] == ["finqa", "tatqa"]
    assert [s.name for s in eval_sets(cfg)] == ["finqa_random", "tatqa"]  # FinQA dev's other 257: one line to uncomment
    # the served context is the headline: the configured retriever's facts, gold facts only as the oracle beside
    # it, which the full recipe (the Makefile's FULL_RECIPE, a `dvc exp run` of these defaults) reports
    assert (cfg.prompt.context_mode, cfg.prompt.retriever, cfg.evaluate.oracle_gold) == ("retrieved", "cross_encoder", False)
    full = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("FULL_RECIPE"))
    assert "-S evaluate.oracle_gold=true" in full and "-S train.max_steps=60" in full
    # the pool split: GRPO's own pool, from the same files, takes more of each (a source's first max_records:
    # the warm start's records and ones it has not seen; prepared/ need not exist in a clean checkout)
    warm, own = train_sources(cfg, "sft"), train_sources(cfg, "grpo")
    assert [(s.name, s.path, s.max_records) for s in warm] == [
        ("finqa", "data/finqa/train.json", 55), ("tatqa", "prepared/tatqa_train.json", 110)]
    assert [(s.name, s.path, s.max_records) for s in own] == [
        ("finqa", "data/finqa/train.json", None), ("tatqa", "prepared/tatqa_train.json", 330)]
    assert [s.name for s in eval_sets(cfg) if s.pooled] == ["finqa_random", "tatqa"]
    assert cfg.register.metric == "dev.pooled.adapter.execution_accuracy"
    assert data_files(cfg) == ["data/finqa/train.json", "data/finqa/dev.json", "data/finqa/test.json",
                               "prepared/tatqa_train.json", "prepared/tatqa_dev.json"]


def test_the_compute_matched_warm_start_supervises_on_grpos_own_pool():
    # experiments/results.sh's control: the warm start trained on the prompts GRPO trains on (no other records)
    script = (ROOT / "experiments" / "results.sh").read_text()
    pool = next(line for line in script.splitlines() if line.startswith("MATCHED_POOL="))
    matched = load_config(ROOT / "params.yaml", [pool.split("=", 1)[1].strip("'")])
    grpo = train_sources(load_config(ROOT / "params.yaml"), "grpo")
    assert [(s.name, s.path, s.max_records) for s in train_sources(matched, "sft")] == [
        (s.name, s.path, s.max_records) for s in grpo]


@pytest.mark.parametrize("tree, message", [
    ({"eval_sets": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "names must be unique"),
    ({"eval_sets": [{"name": "pooled", "path": "x"}]}, "'pooled' is the name of the pooled figure"),
    ({"train_sources": []}, "give at least one entry"),
    ({"train_sources": [{"name": "Bad Name", "path": "x"}]}, "train_sources.0.name"),
    ({"eval_sets": [{"name": "a", "subset": "some"}]}, "eval_sets.0.subset"),
])
def test_bad_dataset_lists_are_config_errors(tree, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"data": tree})
