"""The official FinQA and TAT-QA scoring rules, bit for bit.

The expected outcomes in ``tests/fixtures`` were produced by running the official scripts
(``czyssrs/FinQA`` ``code/evaluate/evaluate.py``: ``eval_program`` / ``equal_program``;
``NExTplusplus/TAT-QA`` ``tatqa_metric.py``: ``TaTQAEmAndF1``) on:

- ``finqa_official_outcomes.json``: the 472 entries of the official ``example_predictions.json`` whose
  id is in ``data/finqa/test.json``, 3,000 programs altered from the gold programs of our splits
  (operations, arguments, step references, row names with parentheses, table steps on ``#k``, swapped
  or dropped steps, ``nan``, ``1,234``, ``5%``), and 300 program texts tokenized by the official
  ``program_tokenization`` (spacing variants);
- ``tatqa_official_outcomes.json``: 4,252 (question, prediction, scale) cases drawn from the TAT-QA
  dev file (gold answers, wrong scales, fractions of percents, ``(12.6)`` and ``(1,234)``, ``0``,
  sign flips, reordered and partial spans).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fingrpo.cli import main
from fingrpo.official import (
    finqa_equal_program,
    finqa_eval_program,
    finqa_tokenize,
    tatqa_answer_strings,
    tatqa_em_f1,
    tatqa_is_number,
    tatqa_to_number,
)
from fingrpo.scoring import score_files, score_predictions

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
SHARED_EXAMPLES = ROOT.parent / "shared" / "data" / "finqa" / "verbatim" / "example_predictions__czyssrs-FinQA.json"
TATQA_DEV = ROOT / "data" / "tatqa" / "tatqa_dataset_dev.json"


@pytest.fixture(scope="module")
def finqa_cases() -> list[dict]:
    return json.loads((FIXTURES / "finqa_official_outcomes.json").read_text())


@pytest.fixture(scope="module")
def finqa_records(data_dir) -> dict[str, dict]:
    return {r["id"]: r for s in ("train", "dev", "test") for r in json.loads((data_dir / f"{s}.json").read_text())}


def test_fixture_covers_the_example_predictions_and_thousands_of_altered_programs(finqa_cases, data_dir):
    sources = [c["source"] for c in finqa_cases]
    test_ids = {r["id"] for r in json.loads((data_dir / "test.json").read_text())}
    examples = [c for c in finqa_cases if c["source"] == "example_predictions"]
    assert len(examples) == 472 and all(c["id"] in test_ids for c in examples)
    assert sources.count("altered") == 3000 and sources.count("text") == 300
    if SHARED_EXAMPLES.is_file():  # the same entries as the official file, where shared/ has it
        official = {e["id"]: e["predicted"] for e in json.loads(SHARED_EXAMPLES.read_text())}
        assert all(official[c["id"]] == c["predicted"] for c in examples)


def test_eval_and_equal_program_give_the_official_outcome_on_every_case(finqa_cases, finqa_records):
    wrong = []
    for c in finqa_cases:
        rec = finqa_records[c["id"]]
        tokens = c["predicted"] if "predicted" in c else finqa_tokenize(c["program"])
        invalid, result = finqa_eval_program(tokens, rec["table"])
        exe = invalid == 0 and result == rec["qa"]["exe_ans"]
        prog = finqa_equal_program(finqa_tokenize(rec["qa"]["program"]), tokens)
        if (exe, prog) != (c["official_exe_correct"], c["official_prog_correct"]):
            wrong.append((c, exe, prog))
    assert not wrong, wrong[:3]
    # the cases are not all alike: both outcomes of both rules occur often
    assert 300 < sum(c["official_exe_correct"] for c in finqa_cases) < 3000
    assert 300 < sum(c["official_prog_correct"] for c in finqa_cases) < 3000


def test_fingrpo_score_on_the_example_predictions_is_the_official_scripts(finqa_cases, data_dir, tmp_path, capsys):
    examples = [c for c in finqa_cases if c["source"] == "example_predictions"]
    path = tmp_path / "example_predictions.json"
    path.write_text(json.dumps([{"id": c["id"], "predicted": c["predicted"]} for c in examples]))
    assert main(["score", "--predictions", str(path), "--data", str(data_dir / "test.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    n = len(examples)
    assert out["n"] == n == 472
    # exactly the official figures (the official script divides by the number of predictions)
    assert out["execution_accuracy"] == sum(c["official_exe_correct"] for c in examples) / n == 188 / 472
    assert out["program_accuracy"] == sum(c["official_prog_correct"] for c in examples) / n == 181 / 472


def test_altered_and_text_programs_score_as_officially_through_score_predictions(finqa_cases, finqa_records):
    cases = [c for c in finqa_cases if c["source"] != "example_predictions"][:1500]
    preds = [{"id": c["id"], **({"predicted": c["predicted"]} if "predicted" in c else {"program": c["program"]})}
             for c in cases]
    result = score_predictions(preds, list(finqa_records.values()), details=True)
    got = [(r["correct_official"], r["program_correct"]) for r in result["predictions"]]
    assert got == [(c["official_exe_correct"], c["official_prog_correct"]) for c in cases]


def test_a_row_name_with_parentheses_is_invalid_as_officially_but_tolerated_by_the_lenient_rule():
    table = [["", "2019", "2018"], ["private investors ( a )", "$ 10", "$ 20"]]
    rec = {"id": "x", "table": table, "qa": {"exe_ans": 15.0, "program": "table_average(private investors ( a ), none)"}}
    pred = {"id": "x", "program": "table_average(private investors ( a ), none)"}
    scored = score_predictions([pred], [rec], details=True)["predictions"][0]
    assert scored["correct_official"] is False and scored["correct_tolerant"] is True
    assert finqa_eval_program(finqa_tokenize(pred["program"]), table) == (1, "n/a")


# -------------------------------------------------------------------------------------------- TAT-QA


def test_tatqa_rules_give_the_official_outcome_on_every_case():
    cases = json.loads((FIXTURES / "tatqa_official_outcomes.json").read_text())
    assert len(cases) > 4000
    wrong = [c for c in cases if tatqa_em_f1(c["question"], c["prediction"], c["scale"]) != (c["em"], c["f1"])]
    assert not wrong, wrong[:3]
    assert 0.2 < sum(c["em"] for c in cases) / len(cases) < 0.8


@pytest.mark.parametrize(
    "question, prediction, scale, em, f1",
    [
        # numbers are rounded to 2 decimals in the stated unit, then multiplied by the scale
        ({"answer_type": "arithmetic", "answer": 123.2, "scale": "million"}, 123200000, "", 1, 1),
        ({"answer_type": "arithmetic", "answer": 123.2, "scale": "million"}, 123.2, "thousand", 0, 0),
        ({"answer_type": "arithmetic", "answer": 123.2, "scale": ""}, 123.201, "", 1, 1),
        ({"answer_type": "arithmetic", "answer": 123.22, "scale": ""}, 123.2, "", 0, 0),
        # percent = x0.01; a bare 4-decimal fraction matches a percent answer
        ({"answer_type": "arithmetic", "answer": 22.12, "scale": "percent"}, 0.2212, "", 1, 1),
        ({"answer_type": "arithmetic", "answer": 22.12, "scale": "percent"}, 22.1231, "percent", 1, 1),
        ({"answer_type": "arithmetic", "answer": 22.12, "scale": "percent"}, 0.22121, "percent", 0, 0),
        # (12.6) is -12.6, (1,234) is not negated
        ({"answer_type": "span", "answer": ["-12.6"], "scale": ""}, "(12.6)", "", 1, 1),
        ({"answer_type": "span", "answer": ["-1234"], "scale": ""}, "(1,234)", "", 0, 0),
        ({"answer_type": "span", "answer": ["1234"], "scale": ""}, "(1,234)", "", 1, 1),
        # answers are sorted and joined; spans: bag-of-tokens F1 with the best alignment
        ({"answer_type": "multi-span", "answer": ["singapore", "china", "usa"], "scale": ""}, ["usa", "china", "singapore"], "", 1, 1),
        ({"answer_type": "multi-span", "answer": ["singapore", "china", "usa"], "scale": ""}, ["china", "singapore"], "", 0, 0.8),
        # arithmetic and count: F1 = EM
        ({"answer_type": "count", "answer": 5, "scale": ""}, "abcd 5", "", 0, 0),
        ({"answer_type": "arithmetic", "answer": 22.12, "scale": "million"}, ["1", "2"], "", 0, 0),
        # an answer of 0 is an empty prediction: 0, even when it is right
        ({"answer_type": "arithmetic", "answer": 0, "scale": ""}, 0, "", 0, 0),
        ({"answer_type": "arithmetic", "answer": 0, "scale": ""}, 0.0, "", 0, 0),
    ],
)
def test_each_official_tatqa_rule(question, prediction, scale, em, f1):
    assert tatqa_em_f1(question, prediction, scale) == (em, f1)


def test_number_reading_rules():
    assert (tatqa_to_number("(12.6)"), tatqa_to_number("(1,234)"), tatqa_to_number("12%")) == (-12.6, 1234, 0.12)
    assert tatqa_is_number("1.5 million") and not tatqa_is_number("2019 revenue") and not tatqa_is_number("nan")
    assert tatqa_answer_strings(["b", "a"], "") == ["a b"]
    assert tatqa_answer_strings([3.52], "percent") == ["0.0352"]


@pytest.fixture(scope="module")
def tatqa_raw() -> list[dict]:
    if not TATQA_DEV.is_file():
        pytest.fail(f"{TATQA_DEV} is missing: run `dvc pull` (data version 2; the README's test command does)")
    return json.loads(TATQA_DEV.read_text())


def test_gold_predictions_score_9970_as_the_official_evaluator_prints(tatqa_raw, tmp_path, capsys):
    """Every question's gold [answer, scale]: 99.70, not 100: the 5 answers of 0 score as empty."""
    gold = {q["uid"]: [q["answer"], q["scale"]] for c in tatqa_raw for q in c["questions"]}
    path = tmp_path / "gold.json"
    path.write_text(json.dumps(gold))
    assert main(["score", "--predictions", str(path), "--data", str(TATQA_DEV)]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "TAT-QA: Exact-match accuracy 99.70, F1 score 99.70 (1668 gold questions, 1668 predicted)" in captured.err
    assert out["predictions_format"] == "tatqa_official"
    assert (out["tatqa"]["n"], out["tatqa"]["exact_match"], out["tatqa"]["f1"]) == (1668, 99.70, 99.70)
    assert out["tatqa"]["by_answer_type"]["arithmetic"] == {"n": 718, "exact_match": 99.3, "f1": 99.3}
    zeros = [q for c in tatqa_raw for q in c["questions"] if q["answer_type"] == "arithmetic" and str(q["answer"]) == "0"]
    assert len(zeros) == 5


def test_executed_programs_score_as_their_gold_answers_on_the_converted_questions(tatqa_raw, tmp_path, capsys):
    from fingrpo.data.tatqa import load_tatqa, to_finqa_records

    records, _ = to_finqa_records(load_tatqa(TATQA_DEV))
    converted = {r["id"] for r in records}
    programs = tmp_path / "programs.jsonl"
    programs.write_text("".join(json.dumps({"id": r["id"], "program": r["qa"]["program"]}) + "\n" for r in records))
    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps({q["uid"]: [q["answer"], q["scale"]] for c in tatqa_raw for q in c["questions"]
                                if q["uid"] in converted}))
    by_program = score_files(programs, TATQA_DEV)
    by_gold = score_files(gold, TATQA_DEV)
    assert by_program["tatqa"]["exact_match"] == by_gold["tatqa"]["exact_match"]
    assert by_program["tatqa"]["by_answer_type"]["arithmetic"] == by_gold["tatqa"]["by_answer_type"]["arithmetic"]
    # and FinQA's execution accuracy of those programs is 1 (they define exe_ans)
    assert by_program["finqa"]["n"] == len(records) and by_program["finqa"]["execution_accuracy"] == 1.0
    assert by_program["tatqa"]["scale_source"] == "gold"  # a program predicts no scale: the question's unit
    # the same predictions against the prepared split: scored over its questions only
    main(["prepare", "--input", str(TATQA_DEV), "--output-dir", str(tmp_path / "prepared")])
    capsys.readouterr()
    dev = json.loads((tmp_path / "prepared" / "tatqa_dev.json").read_text())
    on_dev = score_files(programs, tmp_path / "prepared" / "tatqa_dev.json")
    zeros = sum(1 for r in dev if str(r["tatqa"]["answer"]) == "0")
    assert on_dev["tatqa"]["n"] == len(dev)
    assert on_dev["tatqa"]["exact_match"] == round(100 * (len(dev) - zeros) / len(dev), 2)


def test_jsonl_answers_score_on_tatqa_spans_and_numbers(tatqa_raw, tmp_path):
    """Our JSONL with answers only: a span as written, a number in the project's convention (a
    percent as a fraction), the scale the entry gives or else the question's; no entry scores 0."""
    questions = [q for c in tatqa_raw for q in c["questions"]]
    span = next(q for q in questions if q["answer_type"] == "span")
    pct = next(q for q in questions if q["answer_type"] == "arithmetic" and q["scale"] == "percent")
    money = next(q for q in questions if q["answer_type"] == "arithmetic" and q["scale"] == "million")
    lines = [{"id": span["uid"], "answer": span["answer"][0]},
             {"id": pct["uid"], "answer": pct["answer"] / 100},
             {"id": money["uid"], "answer": money["answer"], "scale": "thousand"}]  # the wrong scale
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = score_files(path, TATQA_DEV)["tatqa"]
    assert out["predicted"] == 3 and out["scale_source"] == "prediction"
    assert out["exact_match"] == round(100 * 2 / 1668, 2)
    assert out["by_answer_type"]["span"]["exact_match"] == round(100 / 701, 2)
