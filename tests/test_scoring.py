"""Scoring: official / tolerant execution accuracy, program accuracy, prediction files and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fingrpo.cli import main
from fingrpo.dsl import program_to_tokens
from fingrpo.errors import DataError
from fingrpo.scoring import (
    load_predictions,
    official_match,
    program_equivalent,
    score_files,
    score_prediction,
    score_predictions,
    tolerant_match,
)

ROOT = Path(__file__).resolve().parents[1]

RECORDS = [
    {"id": "r0", "table": [["", "2019", "2018"], ["net sales", "$ 1,200", "$ 1,000"]],
     "qa": {"exe_ans": 0.2, "program": "subtract(1200, 1000), divide(#0, 1000)"}},
    {"id": "r1", "table": [], "qa": {"exe_ans": "yes", "program": "greater(5, 3)"}},
    {"id": "r2", "table": [["", "2019", "2018"], ["net sales", "$ 1,200", "$ 1,000"]],
     "qa": {"exe_ans": 1100.0, "program": "table_average(net sales, none)"}},
    {"id": "r3", "table": [], "qa": {"exe_ans": 24.69136, "program": "subtract(101, 81), divide(#0, 81), multiply(#1, const_100)"}},
]


# ---------------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    "value, exe_ans, expected",
    [
        (0.347192, 0.34719, True),  # rounds to 5 decimals
        (0.347196, 0.34719, False),  # rounds to 0.3472
        (0.34719, 0.34719, True),
        (34.719, 0.34719, False),  # units matter officially
        (94, 94.0, True),
        (-0.524849, -0.52485, True),
        ("yes", "yes", True),
        ("no", "yes", False),
        ("YES", "yes", True),
        (1.0, "yes", False),
        ("yes", 1.0, False),
        (None, 94.0, False),
        (float("nan"), 94.0, False),
        (float("inf"), 94.0, False),
        (True, 1.0, False),
    ],
)
def test_official_match(value, exe_ans, expected):
    assert official_match(value, exe_ans) is expected


@pytest.mark.parametrize(
    "value, exe_ans, rel_tol, expected",
    [
        (94.05, 94.0, 1e-3, True),
        (94.2, 94.0, 1e-3, False),
        (94.2, 94.0, 1e-2, True),
        (0.2469, 24.69136, 1e-3, True),  # fraction vs percent units
        (24.69, 0.2469136, 1e-3, True),  # percent vs fraction
        (0.2469, 0.2469136, 1e-3, True),
        (0.25, 24.69136, 1e-3, False),
        (0.000004, 0.0, 1e-3, True),  # absolute tolerance near zero
        (0.001, 0.0, 1e-3, False),
        (-94.0, 94.0, 1e-3, False),  # sign matters
        ("yes", "yes", 1e-3, True),
        (" No ", "no", 1e-3, True),
        ("no", "yes", 1e-3, False),
        (1.0, "yes", 1e-3, False),
        (None, 1.0, 1e-3, False),
    ],
)
def test_tolerant_match(value, exe_ans, rel_tol, expected):
    assert tolerant_match(value, exe_ans, rel_tol) is expected


# ---------------------------------------------------------------------------------- program accuracy


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("subtract(5829, 5735)", "subtract(5829, 5735)", True),
        ("subtract(5735, 5829)", "subtract(5829, 5735)", False),
        ("add(5735, 5829)", "add(5829, 5735)", True),  # commutative
        ("multiply(3, 2), divide(#0, 4)", "multiply(2, 3), divide(#0, 4)", True),
        ("divide(2, 4), multiply(#0, 3)", "multiply(2, 3), divide(#0, 4)", True),  # (2/4)*3 == (2*3)/4
        ("add(5829, 1)", "add(5829, 5735)", False),  # an argument the gold program lacks
        ("add(5829.0, 5735)", "add(5829, 5735)", False),  # same number written differently
        ("subtract(a, b)", "subtract(5829, 5735)", False),  # does not parse
        ("greater(5, 3)", "greater(5, 3)", True),
        ("greater(3, 5)", "greater(5, 3)", False),
        ("table_max(net sales, none)", "table_max(net sales, none)", True),
        ("table_min(net sales, none)", "table_max(net sales, none)", False),
        ("table_max(net sales, none), divide(#0, const_100)", "table_max(net sales, none), divide(#0, const_100)", True),
        (["subtract(", "5829", "5735", ")", "EOF"], "subtract(5829, 5735)", True),  # official tokens
        (["subtract(", "5829", "5735", "EOF"], "subtract(5829, 5735)", False),
        ("subtract(5829, 5735), add(#0, 0)", "subtract(5829, 5735)", False),  # 0 is not a gold argument
        ("add(5829, 5735), subtract(#0, 5735)", "add(5829, 0)", False),
    ],
)
def test_program_equivalent(pred, gold, expected):
    assert program_equivalent(pred, gold) is expected


def test_program_equivalent_extra_steps_that_cancel():
    # x - y + y simplifies to x: the official symbolic rule accepts it
    assert program_equivalent("subtract(5829, 5735), add(#0, 5735)", "add(5829, 5735), subtract(#0, 5735)")


# ---------------------------------------------------------------------------------- predictions


def test_score_prediction_sources():
    gold = RECORDS[0]
    r = score_prediction({"id": "r0", "program": "subtract(1200, 1000), divide(#0, 1000)"}, gold)
    assert r["correct_official"] and r["program_correct"] and r["value"] == 0.2 and r["format_ok"] is None
    r = score_prediction({"id": "r0", "answer": "20%"}, gold)  # bare answer: scored on its value
    assert r["correct_official"] and r["correct_tolerant"] and not r["program_correct"]
    r = score_prediction({"id": "r0", "completion": "Program: divide(1200, 1000)\nAnswer: 20%"}, gold)
    assert not r["correct_official"]  # the program executes to 1.2
    assert r["correct_tolerant"]  # the stated answer is right
    assert r["format_ok"] and not r["program_correct"]
    r = score_prediction({"id": "r0", "completion": "Program: divide(1200, 0)\nAnswer: 7"}, gold)
    assert r["execute_failed"] and "divides by zero" in r["error"] and not r["correct_tolerant"]
    r = score_prediction({"id": "r0", "predicted": ["divide(", "1", ")", "EOF"]}, gold)
    assert r["parse_failed"] and not r["correct_official"]


def test_score_predictions_counts_and_official_denominator():
    preds = [
        {"id": "r0", "predicted": program_to_tokens("subtract(1200, 1000), divide(#0, 1000)")},
        {"id": "r1", "program": "greater(3, 5)"},  # wrong: "no"
        {"id": "r2", "completion": "Program: table_average(net sales, none)\nAnswer: 1,100"},
        {"id": "r3", "completion": "Program: subtract(101, 81), divide(#0, 81)\nAnswer: 24.7%"},  # tolerant only
        {"id": "unknown", "program": "add(1, 2)"},
        {"id": "r0", "program": "add(1, "},
    ]
    s = score_predictions(preds, RECORDS)
    assert s["n"] == 6
    assert s["correct"] == {"official": 2, "tolerant": 3, "program": 2}
    assert s["execution_accuracy"] == pytest.approx(2 / 6)
    assert s["tolerant_accuracy"] == pytest.approx(3 / 6)
    assert s["program_accuracy"] == pytest.approx(2 / 6)
    assert s["missing_ids"] == 1 and s["duplicate_ids"] == 1 and s["records_without_prediction"] == 0
    assert s["unparseable"] == 1 and s["execution_errors"] == 0
    assert s["format_rate"] == 1.0  # both completions followed the format


def test_score_predictions_empty():
    s = score_predictions([], RECORDS)
    assert s["n"] == 0 and s["execution_accuracy"] == 0.0 and s["records_without_prediction"] == 4


# ---------------------------------------------------------------------------------- files and CLI


def test_cli_scores_gold_official_predictions_of_test_split(data_dir: Path, tmp_path: Path, capsys):
    records = json.loads((data_dir / "test.json").read_text())
    preds = [{"id": r["id"], "predicted": program_to_tokens(r["qa"]["program"])} for r in records]
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(preds))
    assert main(["score", "--predictions", str(path), "--data", str(data_dir / "test.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 509
    assert out["execution_accuracy"] == 1.0
    assert out["program_accuracy"] == 1.0
    assert out["predictions_format"] == "official"


def test_cli_scores_jsonl_and_wrong_predictions(data_dir: Path, tmp_path: Path, capsys):
    records = json.loads((data_dir / "dev.json").read_text())[:20]
    lines = []
    for i, r in enumerate(records):
        program = r["qa"]["program"] if i % 2 == 0 else "add(1, 2)"
        lines.append(json.dumps({"id": r["id"], "program": program}))
    path = tmp_path / "preds.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["score", "--predictions", str(path), "--data", str(data_dir / "dev.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 20 and out["predictions_format"] == "jsonl"
    assert out["execution_accuracy"] == pytest.approx(0.5)
    assert out["program_accuracy"] == pytest.approx(0.5)
    assert out["records_without_prediction"] == 457 - 20


# Entries of the official czyssrs/FinQA code/evaluate/example_predictions.json (ids in our test split),
# with what the official evaluate.py (eval_program / equal_program) says about each: (exe ok, prog ok).
OFFICIAL_EXAMPLE = [
    ("ETR/2016/page_23.pdf-2", ["subtract(", "5829", "5735", ")", "EOF"], True, True),
    ("FIS/2010/page_70.pdf-2", ["divide(", "121.4", "4187.8", ")", "EOF"], True, True),
    ("SYY/2006/page_71.pdf-1", ["subtract(", "100690000", "92710000", ")", "divide(", "#0", "92710000", ")", "EOF"], False, False),
    ("ETR/2017/page_372.pdf-1", ["add(", "703.1", "705.4", ")", "add(", "#0", "const_2", ")", "divide(", "#1", "const_2", ")", "EOF"], True, True),
    ("AON/2015/page_96.pdf-1", ["add(", "411636", "439000", ")", "add(", "556000", "#0", ")", "add(", "#1", "const_3", ")",
                                "divide(", "#2", "const_2", ")", "EOF"], False, False),
    ("ETR/2013/page_21.pdf-2", ["subtract(", "2045", "1854", ")", "divide(", "194", "#0", ")", "EOF"], True, True),
    ("AON/2007/page_175.pdf-2", ["add(", "155", "-141", ")", "EOF"], False, False),
    ("RCL/2012/page_75.pdf-1", ["divide(", "455", "455", ")", "EOF"], False, False),
    ("DG/2005/page_44.pdf-2", ["add(", "0.6", "0.2", ")", "add(", "#0", "0.2", ")", "EOF"], False, False),
]


def test_official_example_predictions_score_as_the_official_script_does(tmp_path: Path, data_dir: Path):
    path = tmp_path / "example_predictions.json"
    path.write_text(json.dumps([{"id": i, "predicted": t} for i, t, _, _ in OFFICIAL_EXAMPLE], indent=4))
    result = score_files(path, data_dir / "test.json")
    n = len(OFFICIAL_EXAMPLE)
    assert result["predictions_format"] == "official" and result["n"] == n
    assert result["execution_accuracy"] == pytest.approx(sum(e for *_, e, _ in OFFICIAL_EXAMPLE) / n)
    assert result["program_accuracy"] == pytest.approx(sum(p for *_, p in OFFICIAL_EXAMPLE) / n)
    details = score_predictions(load_predictions(path)[0], json.loads((data_dir / "test.json").read_text()), details=True)
    for (pid, _, exe_ok, prog_ok), row in zip(OFFICIAL_EXAMPLE, details["predictions"]):
        assert (row["id"], row["correct_official"], row["program_correct"]) == (pid, exe_ok, prog_ok)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "predictions file is empty"),
        ("[{\"id\": 1, \"predicted\": []}]", "prediction 0: id: missing or not a string"),
        ("[{\"id\": \"a\"}]", "prediction 0 (id a): needs one of predicted, program, completion, answer"),
        ("[{\"id\": \"a\", \"predicted\": \"add(1, 2)\"}]", "predicted: expected a list of string tokens"),
        ("[{\"id\": \"a\", \"predicted\": [1, 2]}]", "predicted: expected a list of string tokens"),
        ("[{\"id\": \"a\", \"program\": 3}]", "program: expected a string, got number"),
        ("[{\"id\": \"a\", \"answer\": [3]}]", "answer: expected a string or number"),
        ("[1, 2]", "prediction 0: expected a JSON object, got number"),
        ("[{\"id\": \"a\", \"program\": ", "malformed JSON"),
        ("{\"id\": \"a\", \"program\": \"add(1, 2)\"}\n{\"id\": \"b\", ", "malformed JSON on line 2"),
        ("[]", "no predictions"),
        ("\"just a string\"", "expected a JSON list of predictions"),
    ],
)
def test_malformed_predictions_give_one_line_data_error(tmp_path: Path, data_dir: Path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        score_files(path, data_dir / "test.json")
    assert message in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)
    # and through the CLI: one line on stderr, exit code 2, no traceback
    assert main(["score", "--predictions", str(path), "--data", str(data_dir / "test.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_missing_files_are_data_errors(tmp_path: Path, data_dir: Path):
    with pytest.raises(DataError, match="predictions file not found"):
        score_files(tmp_path / "nope.json", data_dir / "test.json")
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"id": "a", "program": "add(1, 2)"}) + "\n")
    with pytest.raises(DataError, match="not found"):
        score_files(good, tmp_path / "no-data.json")


def test_cli_subprocess_entry_point(data_dir: Path, tmp_path: Path):
    """`python -m fingrpo score` as DVC runs it."""
    import subprocess
    import sys

    records = json.loads((data_dir / "train.json").read_text())
    path = tmp_path / "train_preds.json"
    path.write_text(json.dumps([{"id": r["id"], "predicted": program_to_tokens(r["qa"]["program"])} for r in records]))
    proc = subprocess.run(
        [sys.executable, "-m", "fingrpo", "score", "--predictions", str(path), "--data", str(data_dir / "train.json")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["execution_accuracy"] == 1.0 and out["program_accuracy"] == 1.0 and out["n"] == 110
