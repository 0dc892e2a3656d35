"""The TAT-QA adapter: typed loading with one-line errors, conversion to FinQA-shaped records (tables,
derivations -> programs, the percent convention, facts), the report of what was not converted, the
split by table, and `fingrpo prepare`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from fingrpo.cli import main
from fingrpo.data.finqa import load_split, parse_record
from fingrpo.data.tatqa import (
    DROP_REASONS,
    convert_table,
    finqa_cell,
    load_tatqa,
    parse_derivation,
    split_by_table,
    tatqa_prediction,
    to_finqa_records,
)
from fingrpo.dsl import execute, parse_cell
from fingrpo.errors import DataError
from fingrpo.official import finqa_eval_program, finqa_tokenize, tatqa_match

ROOT = Path(__file__).resolve().parents[1]
TATQA_DEV = ROOT / "data" / "tatqa" / "tatqa_dataset_dev.json"


@pytest.fixture(scope="module")
def raw() -> list[dict]:
    if not TATQA_DEV.is_file():
        pytest.fail(f"{TATQA_DEV} is missing: run `dvc pull` (data version 2; the README's test command does)")
    return json.loads(TATQA_DEV.read_text())


@pytest.fixture(scope="module")
def converted():
    contexts = load_tatqa(TATQA_DEV)
    records, report = to_finqa_records(contexts)
    return contexts, records, report


def _context(question: dict | None = None, table=None) -> dict:
    q = {"uid": "q-1", "order": 1, "question": "What is the change?", "answer": 94, "derivation": "5,829 - 5,735",
         "answer_type": "arithmetic", "answer_from": "table", "rel_paragraphs": [], "req_comparison": False,
         "scale": "thousand"}
    q.update(question or {})
    return {"table": {"uid": "t-1", "table": table or [["", "2019", "2018"], ["Revenue", "5,829", "5,735"]]},
            "paragraphs": [{"uid": "p-1", "order": 1, "text": "Revenue rose."}], "questions": [q]}


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "tatqa.json"
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------ loading


def test_the_dev_file_loads_typed(converted):
    contexts, _, _ = converted
    assert len(contexts) == 278 and sum(len(c.questions) for c in contexts) == 1668
    q = contexts[0].questions[0]
    assert q.answer_type in ("span", "multi-span", "arithmetic", "count") and isinstance(q.rel_paragraphs, list)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["questions"][0].pop("derivation"), "question q-1: derivation: missing"),
        (lambda c: c["questions"][0].update(answer_type="date"), "question q-1: answer_type:"),
        (lambda c: c["questions"][0].update(scale="lakh"), "question q-1: scale:"),
        (lambda c: c["questions"][0].update(order="1"), "question q-1: order: expected an integer"),
        (lambda c: c["table"].update(table="not a grid"), "context 0 (table t-1): table.table: expected an array"),
        (lambda c: c.pop("paragraphs"), "context 0 (table t-1): paragraphs: missing"),
        (lambda c: c["questions"].append(copy.deepcopy(c["questions"][0])), "question q-1: uid: duplicate uid"),
    ],
)
def test_bad_records_give_one_line_errors_naming_file_question_and_field(tmp_path, mutate, message):
    ctx = _context()
    mutate(ctx)
    path = _write(tmp_path, [ctx])
    with pytest.raises(DataError) as info:
        load_tatqa(path)
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content, message", [("", "is empty"), ("[", "malformed JSON"), ("[]", "has no contexts"),
                                              ("{}", "expected a JSON list of TAT-QA contexts")])
def test_unreadable_files_are_data_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_tatqa(path)


# ------------------------------------------------------------------------------------------- tables


def test_tables_get_one_header_row_and_accounting_negatives_the_table_ops_read():
    table = [["", "", "Years Ended December 31,", ""], ["", "2019", "2018", "2017"], ["", "$'000", "$'000", "$'000"],
             ["Net loss", "(3.1)", "$(1,200)", "4"], ["", "", "", ""], ["Margin", "(12.5%)", "10%", "9%"]]
    out = convert_table(table)
    assert out[0] == ["", "Years Ended December 31, 2019 $'000", "Years Ended December 31, 2018 $'000",
                      "Years Ended December 31, 2017 $'000"]
    assert out[1] == ["Net loss", "-3.1 ( 3.1 )", "$ -1,200 ( 1,200 )", "4"] and len(out) == 3  # empty row dropped
    assert [parse_cell(c) for c in out[1][1:]] == [-3.1, -1200.0, 4.0]
    assert execute("table_sum(Net loss, none)", out) == pytest.approx(-1199.1)
    assert finqa_eval_program(finqa_tokenize("table_min(Margin, none)"), out) == (0, -0.125)
    assert finqa_cell("4,250") == "4,250"


# ----------------------------------------------------------------------------------------- programs


def test_derivations_become_post_order_programs(tmp_path):
    cases = [
        ("(44.1-42.6)/42.6", 3.52, "percent", "subtract(44.1, 42.6), divide(#0, 42.6)"),
        ("(44.1-42.6)/42.6*100", 3.52, "percent", "subtract(44.1, 42.6), divide(#0, 42.6), multiply(#1, const_100), divide(#2, const_100)"),
        ("(1,496 + 1,476)/2", 1486, "", "add(1496, 1476), divide(#0, const_2)"),
        ("34% + 11%", 45, "percent", "add(34%, 11%)"),
        ("-1.9-(-2.2)", 0.3, "million", "subtract(-1.9, -2.2)"),
        ("[(166+178)/2] - [(57+44)/2]", 121.5, "million", "add(166, 178), divide(#0, const_2), add(57, 44), divide(#2, const_2), subtract(#1, #3)"),
    ]
    for derivation, answer, scale, program in cases:
        numbers = [n for n in ("44.1", "42.6", "1,496", "1,476", "34%", "11%", "1.9", "2.2", "166", "178", "57", "44")]
        table = [["", "2019"]] + [[f"row {chr(97 + i)}", n] for i, n in enumerate(numbers)]
        ctx = _context({"derivation": derivation, "answer": answer, "scale": scale}, table=table)
        records, report = to_finqa_records(load_tatqa(_write(tmp_path, [ctx])))
        assert report.converted == 1, (derivation, report.to_dict())
        rec = records[0]
        assert rec["qa"]["program"] == program, derivation
        value = execute(program, rec["table"])
        assert rec["qa"]["exe_ans"] == round(value, 5)
        if scale == "percent":  # the convention: the program computes the fraction
            assert abs(value - answer / 100) < 1e-3
        assert tatqa_match(rec["tatqa"], *tatqa_prediction(value, scale))[0] == 1.0
        parse_record(rec)  # the FinQA schema accepts it


def test_an_accounting_negative_in_a_derivation_is_read_so_when_that_reproduces_the_answer(tmp_path):
    ctx = _context({"derivation": "(71) + 10", "answer": -61, "scale": ""},
                   table=[["", "2019"], ["Loss", "(71)"], ["Gain", "10"]])
    records, report = to_finqa_records(load_tatqa(_write(tmp_path, [ctx])))
    assert records[0]["qa"]["program"] == "add(-71, 10)" and report.paren_negative == 1
    assert set(records[0]["qa"]["gold_inds"]) == {"table_1", "table_2"}


def test_every_question_not_converted_is_counted_by_reason(tmp_path):
    base = _context()["questions"][0]
    questions = [
        {**base, "uid": "span", "answer_type": "span", "answer": ["Revenue"]},
        {**base, "uid": "multi", "answer_type": "multi-span", "answer": ["a", "b"]},
        {**base, "uid": "count", "answer_type": "count", "answer": 2},
        {**base, "uid": "unparseable", "derivation": "60.3 million + 32,137 thousand"},
        {**base, "uid": "bare", "derivation": "5,829"},
        {**base, "uid": "wrong", "answer": 95},
        {**base, "uid": "divzero", "derivation": "5,829 / 0"},
        {**base, "uid": "ok"},
    ]
    ctx = _context()
    ctx["questions"] = questions
    records, report = to_finqa_records(load_tatqa(_write(tmp_path, [ctx])))
    assert [r["id"] for r in records] == ["ok"]
    assert report.dropped == {"span": 1, "multi-span": 1, "count": 1, "derivation_unparseable": 1, "no_operation": 1,
                              "not_reproduced": 1, "execution_error": 1}
    assert set(report.dropped) == set(DROP_REASONS)
    assert report.questions == 8 == report.converted + sum(report.dropped.values())


def test_the_dev_file_converts_at_least_700_of_718_arithmetic_questions(converted):
    contexts, records, report = converted
    assert report.by_answer_type["arithmetic"] == {"questions": 718, "converted": report.converted}
    assert report.converted >= 700 and report.converted + sum(report.dropped.values()) == 1668
    tables = {c.table.uid: c for c in contexts}
    questions = {q.uid: q for c in contexts for q in c.questions}
    for rec in records:
        parse_record(rec, source="converted")
        q = questions[rec["id"]]
        value = execute(rec["qa"]["program"], rec["table"])
        gold = {"answer": q.answer, "answer_type": q.answer_type, "scale": q.scale}
        assert tatqa_match(gold, *tatqa_prediction(value, q.scale))[0] == 1.0, rec["id"]  # reproduces, TAT-QA rule
        # and executes to exe_ans under the official FinQA rule
        assert finqa_eval_program(finqa_tokenize(rec["qa"]["program"]), rec["table"]) == (0, rec["qa"]["exe_ans"])
        assert rec["table_ori"] == tables[rec["tatqa"]["table_uid"]].table.table
    with_facts = sum(bool(r["qa"]["gold_inds"]) for r in records)
    assert with_facts >= len(records) - 5


def test_parse_derivation_refuses_what_is_not_arithmetic():
    for bad in ("", "5 +", "(1 + 2", "revenue - cost", "1 2"):
        with pytest.raises(ValueError):
            parse_derivation(bad)


# -------------------------------------------------------------------------------------------- split


def test_split_by_table_keeps_tables_and_paragraphs_on_one_side_and_is_stable(converted):
    contexts, _, _ = converted
    train, dev = split_by_table(contexts, 0.2, seed=0)
    assert len(train) + len(dev) == len(contexts) and 0.12 < len(dev) / len(contexts) < 0.28
    train_tables = {c.table.uid for c in train} | {json.dumps(c.table.table) for c in train}
    train_text = {p.text.strip() for c in train for p in c.paragraphs}
    for c in dev:
        assert c.table.uid not in train_tables and json.dumps(c.table.table) not in train_tables
        assert not ({p.text.strip() for p in c.paragraphs} & train_text)
    again = split_by_table(list(reversed(contexts)), 0.2, seed=0)[1]
    assert {c.table.uid for c in again} == {c.table.uid for c in dev}  # stable: order does not matter
    # a table keeps its side when the file has fewer tables (new data does not reshuffle old), except
    # where its group (tables sharing paragraph text) changed
    half_dev = {c.table.uid for c in split_by_table(contexts[::2], 0.2, seed=0)[1]}
    assert len(half_dev & {c.table.uid for c in dev}) >= 0.9 * len(half_dev)
    assert {c.table.uid for c in split_by_table(contexts, 0.2, seed=1)[1]} != {c.table.uid for c in dev}


def test_contexts_that_share_a_paragraph_go_to_the_same_side(tmp_path):
    contexts = []
    for i in range(40):
        ctx = _context({"uid": f"q-{i}"})
        ctx["table"]["uid"] = f"t-{i}"
        ctx["table"]["table"] = [["", "2019"], [f"row {i}", "5,829"]]
        ctx["paragraphs"][0]["text"] = "Shared text." if i < 20 else f"Own text {i}."
        contexts.append(ctx)
    train, dev = split_by_table(load_tatqa(_write(tmp_path, contexts)), 0.5, seed=3)
    sides = {("dev" if c in dev else "train") for c in (train + dev) if c.paragraphs[0].text == "Shared text."}
    assert len(sides) == 1


# ------------------------------------------------------------------------------------------ prepare


def test_prepare_writes_both_splits_and_the_report(tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["prepare", "--input", str(TATQA_DEV), "--output-dir", str(out)]) == 0
    capsys.readouterr()
    report = json.loads((out / "prepare.json").read_text())
    train, dev = load_split(out / "tatqa_train.json"), load_split(out / "tatqa_dev.json")
    assert report["splits"]["train"]["records"] == len(train) and report["splits"]["dev"]["records"] == len(dev)
    assert len(train) + len(dev) == report["converted"] >= 700
    assert set(report["dropped"]) == set(DROP_REASONS)
    train_tables = {r.model_extra["tatqa"]["table_uid"] for r in train}
    assert not train_tables & {r.model_extra["tatqa"]["table_uid"] for r in dev}  # no table on both sides
    assert len({r.id for r in train} | {r.id for r in dev}) == len(train) + len(dev)
    # the same again: byte-identical files (seeded, stable)
    first = (out / "tatqa_dev.json").read_bytes()
    assert main(["prepare", "--input", str(TATQA_DEV), "--output-dir", str(out)]) == 0
    assert (out / "tatqa_dev.json").read_bytes() == first


def test_prepare_of_a_bad_file_is_one_line_and_writes_nothing(tmp_path, capsys):
    ctx = _context()
    ctx["questions"][0]["scale"] = 7
    bad = _write(tmp_path, [ctx])
    assert main(["prepare", "--input", str(bad), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "question q-1: scale" in err
    assert not (tmp_path / "out").exists()


def test_validate_checks_prepared_files_with_the_tatqa_rule(tmp_path, capsys):
    out = tmp_path / "prepared"
    main(["prepare", "--input", str(TATQA_DEV), "--output-dir", str(out)])
    records = json.loads((out / "tatqa_dev.json").read_text())
    records[3]["tatqa"]["answer"] = 12345.6  # the program no longer reproduces the TAT-QA answer
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    capsys.readouterr()
    code = main(["validate", str(out / "tatqa_train.json"), str(bad), "--no-data-docs", "--report-dir", str(tmp_path / "r")])
    text = capsys.readouterr().out
    assert code == 1
    assert f"{out / 'tatqa_train.json'}: OK" in text
    assert f"{bad}: FAILED tatqa_program_reproduces_answer: 1 record(s): {records[3]['id']}" in text
