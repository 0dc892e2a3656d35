"""FinQA records, loading errors, table linearisation, context modes, token budget, few-shot and prompt
rendering (fingrpo.data.finqa)."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest

from fingrpo.config import PromptConfig
from fingrpo.data.finqa import (
    FinQARecord,
    linearize_table,
    load_provenance,
    load_split,
    random_subset_ids,
    table_to_markdown,
)
from fingrpo.data.prompts import (
    SYSTEM_PROMPT,
    format_exe_ans,
    make_examples,
    make_target,
    render_prompt,
)
from fingrpo.errors import ConfigError, DataError
from fingrpo.seed import FinancialJSONDataLoader


def _raw(**over) -> dict:
    """A small, valid synthetic record (official key order)."""
    rec = {
        "pre_text": [
            "the company sells widgets in many regions .",
            "net revenue grew strongly because of widget demand in europe .",
        ],
        "post_text": ["the board approved a dividend .", "employees numbered 1200 at year end ."],
        "filename": "ACME/2020/page_1.pdf",
        "table_ori": [["", "2020", "2019"], ["Net revenue", "$5,829", "$5,735"]],
        "table": [["", "2020", "2019"], ["net revenue", "$ 5829", "$ 5735"], ["operating costs", "1200", "1100"]],
        "qa": {
            "question": "what was the change in net revenue from 2019 to 2020?",
            "answer": "94",
            "explanation": "",
            "ann_table_rows": [1],
            "ann_text_rows": [],
            "steps": [{"op": "minus1-1", "arg1": "5829", "arg2": "5735", "res": "94"}],
            "program": "subtract(5829, 5735)",
            "gold_inds": {"table_1": "the net revenue of 2020 is $ 5829 ; the net revenue of 2019 is $ 5735 ;"},
            "exe_ans": 94.0,
            "program_re": "subtract(5829, 5735)",
        },
        "id": "ACME/2020/page_1.pdf-1",
    }
    for key, value in over.items():
        rec[key] = value
    return rec


def _records(*raws) -> list[FinQARecord]:
    return [FinQARecord.model_validate(r) for r in raws]


@pytest.fixture(scope="module")
def splits(data_dir):
    return {s: load_split(data_dir / f"{s}.json") for s in ("train", "dev", "test")}


@pytest.fixture(scope="module")
def tiny_tok(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def _user_context(example) -> list[str]:
    """The context lines of the final user message."""
    body = example.messages[-1]["content"]
    context = body.split("Context:\n", 1)[1].rsplit("\n\nQuestion: ", 1)[0]
    return context.split("\n")


# ------------------------------------------------------------------------------------------- loading


def test_load_real_splits(splits):
    assert {s: len(r) for s, r in splits.items()} == {"train": 110, "dev": 457, "test": 509}
    values = [r.qa.exe_ans for recs in splits.values() for r in recs]
    assert all(isinstance(v, float) or v in ("yes", "no") for v in values)
    assert sum(v in ("yes", "no") for v in values) == 19  # 4 train + 10 dev + 5 test greater() questions
    rec = splits["train"][0]
    assert rec.sentences == rec.pre_text + rec.post_text and rec.question == rec.qa.question


def test_extra_fields_are_kept():
    raw = _raw(table_retrieved=[{"score": 1.0}])
    raw["qa"]["tfidftopn"] = {"text_0": "x"}
    rec = FinQARecord.model_validate(raw)
    assert rec.model_extra == {"table_retrieved": [{"score": 1.0}]}
    assert rec.qa.model_extra == {"tfidftopn": {"text_0": "x"}}
    assert rec.model_dump()["table_retrieved"] == [{"score": 1.0}]


def _write(tmp_path, content) -> str:
    path = tmp_path / "split.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


def _without(path: str):
    raw = _raw()
    node = raw
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    del node[last]
    return raw


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "split.json: file is empty"),
        ('[{"id": 1,', "split.json: malformed JSON at line 1"),
        ({"records": []}, "split.json: expected a JSON list of records at the top level, got object"),
        ([], "split.json: the split has no records"),
        ([_raw(), 7], "split.json: record 1: expected a JSON object, got number"),
        ([_raw(), _without("qa.exe_ans")], "split.json: record 1 (id ACME/2020/page_1.pdf-1): qa.exe_ans: missing"),
        ([_without("filename")], "split.json: record 0 (id ACME/2020/page_1.pdf-1): filename: missing"),
        ([_without("id")], "split.json: record 0: id: missing"),
        (
            [_raw(pre_text=["ok", 3])],
            "record 0 (id ACME/2020/page_1.pdf-1): pre_text[1]: expected a string, got number 3",
        ),
        ([_raw(table=[["a", None]])], "table[0][1]: expected a string, got null None"),
        ([_raw(post_text="one sentence")], "post_text: expected an array, got string 'one sentence'"),
        ([_raw(qa=None)], "qa: expected an object, got null"),
        ([_raw(), _raw()], "split.json: record 1 (id ACME/2020/page_1.pdf-1): id: duplicate id (first at record 0)"),
    ],
)
def test_load_split_errors_are_one_line_and_name_the_place(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(DataError) as info:
        load_split(path)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert text.startswith(path)


@pytest.mark.parametrize(
    "exe_ans, ok",
    [(94, True), (94.5, True), ("yes", True), ("no", True)]
    + [("34.7%", False), (True, False), (None, False), ([1], False), (float("nan"), False)],
)
def test_exe_ans_types(tmp_path, exe_ans, ok):
    raw = _raw()
    raw["qa"]["exe_ans"] = exe_ans
    path = _write(tmp_path, [raw])
    if ok:
        assert load_split(path)[0].qa.exe_ans == (float(exe_ans) if not isinstance(exe_ans, str) else exe_ans)
    else:
        with pytest.raises(DataError, match=r"qa\.exe_ans: expected a number or 'yes'/'no'"):
            load_split(path)


def test_gold_inds_keys_are_checked(tmp_path):
    raw = _raw()
    raw["qa"]["gold_inds"] = {"row_1": "x"}
    with pytest.raises(DataError, match=r"qa\.gold_inds: key 'row_1' is not of the form text_N or table_N"):
        load_split(_write(tmp_path, [raw]))


def test_random_subset_ids(data_dir, splits):
    prov = data_dir / "provenance.json"
    assert set(load_provenance(prov)["records"]) == {r.id for recs in splits.values() for r in recs}
    for split, n in {"train": 100, "dev": 200, "test": 100}.items():
        ids = random_subset_ids(prov, split)
        assert len(ids) == n
        assert ids <= {r.id for r in splits[split]}
    assert random_subset_ids(prov, str(data_dir / "dev.json")) == random_subset_ids(prov, "dev")
    with pytest.raises(DataError, match="unknown split 'valid'"):
        random_subset_ids(prov, "valid")


# ------------------------------------------------------------------------------------------- tables


def test_linearize_table_style():
    table = [["in millions", "2009", "2008"], ["balance end of the year", "$ 482", "$ 75"]]
    assert linearize_table(table)[1] == (
        "in millions the balance end of the year of 2009 is $ 482 ; the balance end of the year of 2008 is $ 75 ;"
    )
    # the tokenised gold_inds style: a trailing ',' or ':' stands apart
    assert linearize_table([["december 31,", "a"], ["total:", "5"]])[1] == "december 31 , the total : of a is 5 ;"
    assert linearize_table([]) == []


def test_linearize_table_reproduces_every_real_gold_table_fact(splits):
    n = 0
    for recs in splits.values():
        for rec in recs:
            rows = linearize_table(rec.table)
            for key, fact in rec.qa.gold_inds.items():
                if key.startswith("table_"):
                    assert rows[int(key[6:])] == fact, rec.id
                    n += 1
    assert n == 1241


def test_table_to_markdown():
    assert table_to_markdown([["", "2020"], ["a|b", "1", "2"]]) == [
        "|  | 2020 |  |",
        "| --- | --- | --- |",
        "| a\\|b | 1 | 2 |",
    ]


# ------------------------------------------------------------------------------------------- prompts


def _cfg(**kw) -> PromptConfig:
    base = {"few_shot": 0, "max_prompt_tokens": 100_000, "use_chat_template": False}
    return PromptConfig(**{**base, **kw})


def test_gold_mode_shows_only_the_supporting_facts_in_document_order(splits):
    rec = next(
        r for r in splits["dev"] if len(r.qa.gold_inds) >= 2 and any(k.startswith("text") for k in r.qa.gold_inds)
    )
    (ex,) = make_examples([rec], _cfg(context_mode="gold"))
    lines = _user_context(ex)
    assert sorted(lines) == sorted(rec.qa.gold_inds.values())
    # document order: pre_text, then table rows, then post_text
    rec2 = _records(_raw())[0]
    rec2.qa.gold_inds = {"text_3": "employees numbered 1200 at year end .", "text_1": rec2.pre_text[1],
                         "table_1": linearize_table(rec2.table)[1]}
    (ex2,) = make_examples([rec2], _cfg(context_mode="gold"))
    assert _user_context(ex2) == [rec2.pre_text[1], linearize_table(rec2.table)[1], rec2.post_text[1]]
    assert ex2.messages[-1]["content"].endswith("Question: " + rec2.question)


def test_full_mode_shows_everything_in_document_order():
    rec = _records(_raw())[0]
    (ex,) = make_examples([rec], _cfg(context_mode="full"))
    assert _user_context(ex) == [*rec.pre_text, *linearize_table(rec.table), *rec.post_text]
    assert not ex.truncated and not ex.over_budget
    (md,) = make_examples([rec], _cfg(context_mode="full", table_format="markdown"))
    assert _user_context(md) == [*rec.pre_text, *table_to_markdown(rec.table), *rec.post_text]


def test_retrieved_mode_ranks_by_overlap_and_keeps_document_order():
    rec = _records(_raw())[0]
    (ex,) = make_examples([rec], _cfg(context_mode="retrieved", retrieved_top_k=2))
    lines = _user_context(ex)
    # "net revenue" (+ years) overlap: the revenue table row and the revenue sentence win
    assert lines == [rec.pre_text[1], linearize_table(rec.table)[1]]
    (ex5,) = make_examples([rec], _cfg(context_mode="retrieved", retrieved_top_k=5))
    assert len(_user_context(ex5)) == 5
    order = [*rec.pre_text, *linearize_table(rec.table), *rec.post_text]
    assert [order.index(s) for s in _user_context(ex5)] == sorted(order.index(s) for s in _user_context(ex5))


def test_retrieved_mode_finds_most_real_gold_facts(splits):
    """The lexical retriever is crude but not useless: top-5 recalls a good share of the gold facts."""
    recs = splits["dev"][:100]
    exs = make_examples(recs, _cfg(context_mode="retrieved", retrieved_top_k=5))
    hit = sum(len(set(r.qa.gold_inds) & set(e.context_keys)) for r, e in zip(recs, exs))
    total = sum(len(r.qa.gold_inds) for r in recs)
    assert hit / total > 0.5


def test_instructions_state_the_answer_format():
    (ex,) = make_examples(_records(_raw()), _cfg())
    system = ex.messages[0]
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert "Program: <program>\nAnswer: <value>" in SYSTEM_PROMPT
    for op in ("add", "subtract", "multiply", "divide", "exp", "greater", "table_max", "table_average"):
        assert f"{op}(" in SYSTEM_PROMPT
    assert ex.target == "Program: subtract(5829, 5735)\nAnswer: 94"


@pytest.mark.parametrize(
    "value, text", [(94.0, "94"), (0.34719, "0.34719"), (-12.5, "-12.5"), (1e6, "1000000"), (-0.0, "0"), ("yes", "yes")]
)
def test_format_exe_ans(value, text):
    assert format_exe_ans(value) == text


def test_targets_of_real_records(splits):
    for rec in splits["train"]:
        program_line, answer_line = make_target(rec).split("\n")
        assert program_line == f"Program: {rec.qa.program}"
        value = answer_line.removeprefix("Answer: ")
        if isinstance(rec.qa.exe_ans, str):
            assert value == rec.qa.exe_ans
        else:
            assert math.isclose(float(value), rec.qa.exe_ans)


# ------------------------------------------------------------------------------------------- budget


def test_budget_never_cuts_gold_facts_and_counts_exactly(splits, tiny_tok):
    recs = splits["dev"][:25]
    # char-level tokenizer: 1 token per character; 2500 forces cuts on every full-context record
    cfg = _cfg(context_mode="full", max_prompt_tokens=2500, use_chat_template=True)
    exs = make_examples(recs, cfg, tiny_tok)
    assert all(e.truncated for e in exs)
    for rec, ex in zip(recs, exs):
        assert set(rec.qa.gold_inds) <= set(ex.context_keys), rec.id
        for fact in rec.qa.gold_inds.values():
            assert fact in _user_context(ex)
        n_tokens = len(tiny_tok(render_prompt(ex, tiny_tok), add_special_tokens=False)["input_ids"])
        assert n_tokens == ex.prompt_tokens
        assert n_tokens <= 2500 or ex.over_budget
    # a larger budget keeps more context
    wide = make_examples(recs, cfg.model_copy(update={"max_prompt_tokens": 5000}), tiny_tok)
    assert sum(len(e.context_keys) for e in wide) > sum(len(e.context_keys) for e in exs)


def test_budget_cuts_least_relevant_first():
    rec = _records(_raw())[0]
    (full,) = make_examples([rec], _cfg(context_mode="full"))
    cfg = _cfg(context_mode="full", max_prompt_tokens=full.prompt_tokens - 5)  # one short line must go
    (ex,) = make_examples([rec], cfg)
    assert ex.truncated and not ex.over_budget and ex.prompt_tokens <= cfg.max_prompt_tokens
    kept = _user_context(ex)
    # the relevant revenue sentence stays; a zero-overlap line went first
    assert rec.pre_text[1] in kept and linearize_table(rec.table)[1] in kept
    assert len(kept) == len(_user_context(full)) - 1


def test_gold_facts_survive_even_an_impossible_budget(splits):
    rec = max(splits["dev"], key=lambda r: sum(len(v) for v in r.qa.gold_inds.values()))
    (ex,) = make_examples([rec], _cfg(context_mode="full", max_prompt_tokens=64))
    assert ex.over_budget and ex.truncated
    assert set(ex.context_keys) == set(rec.qa.gold_inds)


def test_char_estimate_without_tokenizer():
    rec = _records(_raw())[0]
    (ex,) = make_examples([rec], _cfg(context_mode="full"))
    assert ex.prompt_tokens == math.ceil(len(render_prompt(ex, None, use_chat_template=False)) / 4)


# ------------------------------------------------------------------------------------------- few-shot


def test_few_shot_turns(splits):
    train, dev = splits["train"], splits["dev"]
    cfg = _cfg(context_mode="gold", few_shot=2)
    ex = make_examples(dev[:3], cfg, few_shot_records=train)
    for e in ex:
        assert [m["role"] for m in e.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert e.messages[2]["content"] == make_target(train[0])
        assert e.messages[4]["content"] == make_target(train[1])
        # same context mode for the worked examples: their gold facts
        for fact in train[0].qa.gold_inds.values():
            assert fact in e.messages[1]["content"]
        assert train[0].question in e.messages[1]["content"]
    # a record is never its own worked example
    (own,) = make_examples(train[:1], cfg, few_shot_records=train)
    assert own.messages[2]["content"] == make_target(train[1]) and own.messages[4]["content"] == make_target(train[2])
    # deterministic
    assert make_examples(dev[:3], cfg, few_shot_records=train) == ex


def test_few_shot_needs_records():
    with pytest.raises(ConfigError, match="prompt.few_shot=2 needs few_shot_records"):
        make_examples(_records(_raw()), _cfg(few_shot=2))
    with pytest.raises(ConfigError, match="prompt.few_shot=2 but only 1 few_shot_records"):
        make_examples(_records(_raw()), _cfg(few_shot=2), few_shot_records=_records(_raw()))


def test_budget_drops_worked_examples_before_gold_facts(splits):
    train, dev = splits["train"], splits["dev"]
    rec = dev[0]
    (alone,) = make_examples([rec], _cfg(context_mode="gold"))
    cfg = _cfg(context_mode="gold", few_shot=2, max_prompt_tokens=alone.prompt_tokens + 10)
    (ex,) = make_examples([rec], cfg, few_shot_records=train)
    assert [m["role"] for m in ex.messages] == ["system", "user"]
    assert ex.messages == alone.messages and not ex.over_budget


# ------------------------------------------------------------------------------------------- rendering


def test_render_prompt_chat_template(tiny_tok, splits):
    (ex,) = make_examples(splits["dev"][:1], _cfg(few_shot=1, use_chat_template=True), tiny_tok, splits["train"])
    text = render_prompt(ex, tiny_tok)
    assert text.startswith("<|im_start|>system\nYou answer questions")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")  # add_generation_prompt
    assert text.count("<|im_start|>user\n") == 2 and text.count("<|im_start|>assistant\n") == 2
    assert f"<|im_start|>assistant\n{make_target(splits['train'][0])}<|im_end|>" in text


def test_render_prompt_plain_text(splits):
    (ex,) = make_examples(splits["dev"][:1], _cfg(few_shot=1), None, splits["train"])
    text = render_prompt(ex, None, use_chat_template=False)
    assert "<|im_start|>" not in text
    assert text.startswith(SYSTEM_PROMPT) and text.endswith(f"Question: {splits['dev'][0].question}\n\n")
    assert make_target(splits["train"][0]) in text


def test_render_prompt_needs_a_chat_tokenizer(splits):
    (ex,) = make_examples(splits["dev"][:1], _cfg())
    with pytest.raises(ConfigError, match="no tokenizer was given"):
        render_prompt(ex, None, use_chat_template=True)


# ------------------------------------------------------------------------------------------- loader


def test_financial_json_data_loader(data_dir, tiny_tok):
    train = load_split(data_dir / "train.json")
    loader = FinancialJSONDataLoader(
        data_dir / "dev.json", PromptConfig(few_shot=1, max_prompt_tokens=4000), tiny_tok,
        few_shot_records=train, max_records=5, context_mode="retrieved",
    )
    assert len(loader) == 5 and loader.prompt_cfg.context_mode == "retrieved"
    assert [e.id for e in loader] == [r.id for r in loader.records]
    assert loader.prompts[0] == render_prompt(loader[0], tiny_tok)
    assert loader.targets == [make_target(r) for r in loader.records]
    with pytest.raises(ConfigError, match="context_mode"):
        FinancialJSONDataLoader(data_dir / "dev.json", context_mode="everything")
    plain = FinancialJSONDataLoader(data_dir / "train.json", max_records=3)  # worked examples from its own split
    with pytest.raises(ConfigError, match="no tokenizer"):
        plain.prompts
    assert re.match(r"Program: .+\nAnswer: .+", plain.targets[0])
