"""Great Expectations validation of FinQA splits (fingrpo.data.validate): the real splits pass; small
corrupted copies fail under the right rule, naming the right record."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from fingrpo.cli import main
from fingrpo.data.validate import run_validation

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def few_records(data_dir) -> list[dict]:
    """The first 3 real train records (raw JSON dicts)."""
    return json.loads((data_dir / "train.json").read_text(encoding="utf-8"))[:3]


def test_real_splits_pass_via_cli(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    files = [str(data_dir / f"{s}.json") for s in ("train", "dev", "test")]
    code = main(["validate", *files, "--report-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "validation.json").read_text())
    assert report["success"] is True
    counts = {Path(p).name: f["n_records"] for p, f in report["files"].items()}
    assert counts == {"train.json": 110, "dev.json": 457, "test.json": 509}
    for f in report["files"].values():
        assert set(f["rules"]) >= {"id_unique", "program_parses", "program_executes_to_exe_ans"}
        assert all(r["success"] and r["unexpected_count"] == 0 for r in f["rules"].values())
    # GX data docs: an index and one validation page per file
    assert (tmp_path / "data_docs" / "index.html").exists()
    pages = list((tmp_path / "data_docs" / "validations").rglob("*.html"))
    assert len(pages) == 3
    assert "train.json: OK (110 records" in out


def _corrupt(records: list[dict], how: str) -> tuple[list[dict], str, set[str]]:
    """Apply one corruption to record 1 -> (records, the label naming it, the rules that must fail)."""
    recs = copy.deepcopy(records)
    r = recs[1]
    rid = r["id"]
    if how == "duplicate_id":
        r["id"] = recs[0]["id"]
        return recs, recs[0]["id"], {"id_unique"}
    if how == "null_id":
        r["id"] = None
        return recs, "record 1", {"id_not_null"}
    if how == "empty_question":
        r["qa"]["question"] = "   "
        return recs, rid, {"question_non_empty"}
    if how == "unparseable_program":
        r["qa"]["program"] = "subtract(5829, "
        # a program that does not parse cannot re-execute either
        return recs, rid, {"program_parses", "program_executes_to_exe_ans"}
    if how == "missing_exe_ans":
        del r["qa"]["exe_ans"]
        return recs, rid, {"required_fields_present", "exe_ans_number_or_yes_no", "program_executes_to_exe_ans"}
    if how == "non_numeric_exe_ans":
        r["qa"]["exe_ans"] = "34.7%"
        return recs, rid, {"exe_ans_number_or_yes_no", "program_executes_to_exe_ans"}
    if how == "text_not_string_list":
        r["pre_text"] = ["a sentence", 42]
        return recs, rid, {"text_fields_are_string_lists"}
    if how == "empty_table_row":
        r["table"].append([])
        return recs, rid, {"table_rows_non_empty"}
    if how == "wrong_exe_ans":
        r["qa"]["exe_ans"] = r["qa"]["exe_ans"] + 1.0
        return recs, rid, {"program_executes_to_exe_ans"}
    if how == "missing_field":
        del r["filename"]
        return recs, rid, {"required_fields_present"}
    if how == "gold_index_out_of_range":
        r["qa"]["gold_inds"]["table_99"] = "the x of y is 1 ;"
        return recs, rid, {"gold_inds_refer_to_context"}
    raise AssertionError(how)


CORRUPTIONS = [
    "duplicate_id", "null_id", "empty_question", "unparseable_program", "missing_exe_ans", "non_numeric_exe_ans",
    "text_not_string_list", "empty_table_row", "wrong_exe_ans", "missing_field", "gold_index_out_of_range",
]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupted_record_fails_the_right_rule(few_records, tmp_path, capsys, how):
    recs, label, rules = _corrupt(few_records, how)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    code = run_validation([str(path)], report_dir=tmp_path / "reports", data_docs=False)
    out = capsys.readouterr().out
    assert code == 1
    report = json.loads((tmp_path / "reports" / "validation.json").read_text())
    assert report["success"] is False
    file_report = report["files"][str(path)]
    failed = {name for name, r in file_report["rules"].items() if not r["success"]}
    assert failed == rules, f"{how}: {failed}"
    for rule in rules:
        assert label in file_report["rules"][rule]["failing_ids"]
        assert f"FAILED {rule}" in out and label in out
    if how != "duplicate_id":  # only record 1 is broken (a duplicate flags both of its records)
        assert all(r["failing_records"] == [1] for name, r in file_report["rules"].items() if name in rules)
    else:
        assert file_report["rules"]["id_unique"]["failing_records"] == [0, 1]


def test_all_failures_reported_not_just_the_first(few_records, tmp_path, capsys):
    recs = copy.deepcopy(few_records)
    recs[0]["qa"]["program"] = "divide(1,"
    recs[2]["qa"]["program"] = "frobnicate(1, 2)"
    recs.append(7)  # a non-object record
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    assert run_validation([path], report_dir=tmp_path, data_docs=False) == 1
    rules = json.loads((tmp_path / "validation.json").read_text())["files"][str(path)]["rules"]
    assert rules["program_parses"]["failing_ids"] == [recs[0]["id"], recs[2]["id"], "record 3"]
    assert rules["record_is_object"]["failing_ids"] == ["record 3"]
    assert "frobnicate" in rules["program_parses"]["reasons"][1]


@pytest.mark.parametrize(
    "content, message",
    [("", "file is empty"), ('[{"id": ', "malformed JSON at line 1"), ("[]", "no records"), ('{"a": 1}', "JSON list")],
)
def test_unreadable_file_fails_and_others_still_checked(few_records, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content, encoding="utf-8")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(few_records), encoding="utf-8")
    code = run_validation([bad, good], report_dir=tmp_path / "r", data_docs=False)
    out = capsys.readouterr().out
    assert code == 1
    assert f"{bad}: FAILED file_readable" in out and message in out
    files = json.loads((tmp_path / "r" / "validation.json").read_text())["files"]
    assert files[str(bad)]["success"] is False and message in files[str(bad)]["error"]
    assert files[str(good)]["success"] is True


def test_cli_exit_code_on_corrupted_file(few_records, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    recs = copy.deepcopy(few_records)
    recs[2]["qa"]["exe_ans"] = "many"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    code = main(["validate", str(path), "--report-dir", str(tmp_path / "r"), "--no-data-docs"])
    out = capsys.readouterr().out
    assert code != 0
    assert f"FAILED exe_ans_number_or_yes_no: 1 record(s): {recs[2]['id']}" in out


def test_relative_report_dir_builds_data_docs(tmp_path, monkeypatch, data_dir):
    """`dvc repro` runs `fingrpo validate` with the default relative `reports/`: GX needs an absolute
    data-docs folder, which the validator must resolve itself."""
    from fingrpo.data.validate import run_validation

    monkeypatch.chdir(tmp_path)
    assert run_validation([str(data_dir / "train.json")], report_dir="reports", data_docs=True) == 0
    assert (tmp_path / "reports" / "data_docs" / "index.html").exists()
    assert (tmp_path / "reports" / "validation.json").exists()
