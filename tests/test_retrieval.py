"""The retrievers: facts keyed as ``qa.gold_inds`` keys them, lexical ranking, recall@k, and the
cross-encoder (the real bundled MiniLM, a few steps): training moves the loss and the weights, a saved
retriever ranks exactly as before, a missing one is a clear error, and retrieved prompts use it."""

from __future__ import annotations

import random

import pytest

from fingrpo.config import PromptConfig, RetrieverConfig
from fingrpo.data.finqa import linearize_table, load_split
from fingrpo.data.prompts import make_examples
from fingrpo.errors import ConfigError, ModelError
from fingrpo.retrieval import (
    CrossEncoder,
    LexicalRetriever,
    facts,
    get_retriever,
    retrieval_recall,
    train_cross_encoder,
    training_list,
)


@pytest.fixture(scope="module")
def dev(data_dir):
    return load_split(data_dir / "dev.json")


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """The bundled MiniLM cross-encoder after 12 steps on 12 train records, saved."""
    records = load_split(data_dir / "train.json")[:12]
    rcfg = RetrieverConfig(epochs=1.0, warmup_steps=2, candidates=8, learning_rate=1e-4, threads=2)
    steps: list[tuple[int, float]] = []
    before = CrossEncoder.from_base(rcfg.base_model, seed=rcfg.seed)
    ce, summary = train_cross_encoder(records, rcfg, progress=False, on_step=lambda s, loss, lr: steps.append((s, loss)))
    out = tmp_path_factory.mktemp("retriever")
    ce.save(out)
    return {"ce": ce, "before": before, "summary": summary, "steps": steps, "dir": out, "records": records}


def test_facts_are_keyed_as_gold_inds_in_document_order(dev):
    for rec in dev[:40]:
        units = dict(facts(rec))
        for key, text in rec.qa.gold_inds.items():
            assert key in units
        keys = list(units)
        n_pre, rows = len(rec.pre_text), linearize_table(rec.table)
        assert keys[:n_pre] == [f"text_{i}" for i in range(n_pre)]
        assert [units[f"table_{i}"] for i in range(len(rows))] == rows
        assert len(keys) == n_pre + len(rows) + len(rec.post_text)


def test_retrieval_recall_counts_gold_facts_in_the_top_k(dev):
    records = dev[:30]
    lexical = LexicalRetriever()
    rec = records[0]
    ranked = lexical.rank(rec)
    assert sorted(ranked) == sorted(k for k, _ in facts(rec))
    got = retrieval_recall(records, lexical, ks=(1, 3, 1000))
    assert got["n"] == sum(bool(r.qa.gold_inds) for r in records) and got["retriever"] == "lexical"
    assert got["recall_at_1000"] == 1.0 and got["all_gold_at_1000"] == 1.0  # everything is in a top-1000
    assert 0.0 <= got["all_gold_at_1"] <= got["recall_at_1"] <= got["recall_at_3"] <= 1.0
    one = retrieval_recall([rec], lexical, ks=(3,))
    gold = set(rec.qa.gold_inds)
    assert one["recall_at_3"] == len(gold & set(ranked[:3])) / len(gold)
    empty = retrieval_recall([], ks=(3,))
    assert (empty["n"], empty["recall_at_3"], empty["all_gold_at_3"]) == (0, None, None)


def test_training_lists_put_the_gold_first_then_hard_and_random_negatives(dev):
    rec = next(r for r in dev if len(facts(r)) > 20 and r.qa.gold_inds)
    pairs = training_list(rec, 10, random.Random(0))
    units = dict(facts(rec))
    gold_texts = [units[k] for k in units if k in rec.qa.gold_inds]
    assert pairs.n_gold == len(gold_texts) and pairs.texts[: pairs.n_gold] == gold_texts
    assert len(pairs.texts) == 10 and set(pairs.texts) <= set(units.values())
    hard = [units[k] for k in LexicalRetriever().rank(rec) if k not in rec.qa.gold_inds]
    n_hard = (10 - pairs.n_gold) // 2
    assert pairs.texts[pairs.n_gold: pairs.n_gold + n_hard] == hard[:n_hard]
    no_gold = rec.model_copy(update={"qa": rec.qa.model_copy(update={"gold_inds": {}})})
    assert training_list(no_gold, 10, random.Random(0)) is None


def test_cross_encoder_training_moves_the_loss_and_the_weights(trained):
    import torch

    summary, steps = trained["summary"], trained["steps"]
    assert summary["steps"] == len(trained["records"]) == len(steps) == 12
    assert [s for s, _ in steps] == list(range(1, 13))
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in steps)
    assert summary["loss_last"] < summary["loss_first"]
    before = dict(trained["before"].encoder.named_parameters())
    changed = [n for n, p in trained["ce"].encoder.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > 10
    assert not torch.equal(trained["ce"].head.weight, trained["before"].head.weight)


def test_a_saved_retriever_ranks_as_it_did(trained, dev):
    loaded = CrossEncoder.load(trained["dir"])
    for rec in dev[:5]:
        a = trained["ce"].scores(rec.question, [t for _, t in facts(rec)])
        b = loaded.scores(rec.question, [t for _, t in facts(rec)])
        assert a == pytest.approx(b, abs=1e-5)
        assert loaded.rank(rec) == trained["ce"].rank(rec)
    cfg = PromptConfig(retriever="cross_encoder", retriever_dir=str(trained["dir"]))
    assert get_retriever(cfg) is get_retriever(cfg)  # loaded once per folder
    assert get_retriever(cfg).rank(dev[0]) == loaded.rank(dev[0])


def test_a_missing_retriever_or_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="fingrpo retriever"):
        get_retriever(PromptConfig(retriever="cross_encoder", retriever_dir=str(tmp_path / "nothing")))
    with pytest.raises(ConfigError, match="unknown bundled encoder"):
        CrossEncoder.from_base("bundled:bert-huge")
    with pytest.raises(ConfigError, match="no training record"):
        train_cross_encoder([], RetrieverConfig(epochs=1.0))


def test_retrieved_prompts_show_the_configured_retrievers_top_k(trained, dev):
    cfg = PromptConfig(context_mode="retrieved", retrieved_top_k=3, retriever="cross_encoder",
                       retriever_dir=str(trained["dir"]), few_shot=0, use_chat_template=False, max_prompt_tokens=100_000)
    for rec in dev[:8]:
        (ex,) = make_examples([rec], cfg)
        top = trained["ce"].rank(rec)[:3]
        assert sorted(ex.context_keys) == sorted(top)
        order = [k for k, _ in facts(rec)]
        assert ex.context_keys == sorted(ex.context_keys, key=order.index)  # shown in document order


def test_training_prompts_with_gold_swap_a_missed_gold_fact_in(dev):
    """prompt.train_with_gold: the lowest-ranked non-gold pick makes room for a gold fact the retriever
    missed, in training prompts only; evaluation prompts show what the retriever picked."""
    cfg = PromptConfig(context_mode="retrieved", retrieved_top_k=3, train_with_gold=True, few_shot=0,
                       use_chat_template=False, max_prompt_tokens=100_000)
    lexical = LexicalRetriever()
    missed = [r for r in dev if set(r.qa.gold_inds) - set(lexical.rank(r)[:3])][:10]
    assert missed
    for rec in missed:
        top = lexical.rank(rec)[:3]
        (served,) = make_examples([rec], cfg)
        (train,) = make_examples([rec], cfg, training=True)
        assert sorted(served.context_keys) == sorted(top)
        assert len(train.context_keys) == 3
        gold = set(rec.qa.gold_inds) & {k for k, _ in facts(rec)}
        assert gold <= set(train.context_keys) or set(train.context_keys) <= gold  # room made for the gold facts
        kept = [k for k in top if k in gold] + [k for k in top if k not in gold][: max(0, 3 - len(gold))]
        assert set(kept) <= set(train.context_keys)
