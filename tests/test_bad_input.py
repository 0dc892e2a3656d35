"""The bad-input matrix: every kind of broken FinQA split x every entry point that reads data.

Each case writes a corrupted copy of three real train records and runs an entry point on it:

- ``fingrpo validate`` (exit 1, the summary names the file, the record id and the rule; the only file
  written is a complete ``reports/validation.json``),
- ``fingrpo score`` (the corrupted file is the gold split),
- ``fingrpo train`` on the tiny fixture model (the corrupted file is ``data.train_path``),
- ``fingrpo evaluate`` on the tiny fixture model + a LoRA adapter (the corrupted file is ``data.dev_path``).

For every pair: a non-zero exit, no ``Traceback``, a one-line ``error:`` naming the file, the record id
(when the file could be read that far) and the field or rule, and no output or temporary file left behind
(the working folder's listing is compared before and after). Semantic faults of the gold program
(syntax, unknown operation, ``#k`` out of range, division by zero, missing row, non-numeric cell,
overflow) are load errors for train/evaluate/score (``load_split`` executes each gold program) and
rule failures for validate.

The fast tests call ``fingrpo.cli.main`` in-process (an uncaught exception fails the test, which is
what a traceback would be); the same matrix through real ``python -m fingrpo`` subprocesses is marked
``slow``, plus a few fast subprocess cases. ``CASES_TRIED`` counts the (case, entry point) pairs.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from fingrpo import cli

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
PROVENANCE = ROOT / "data" / "finqa" / "provenance.json"

# ----------------------------------------------------------------------------------------------- data


def _base_records(data_dir: Path) -> list[dict]:
    """Three real train records with short gold contexts (1 char = 1 token for the tiny tokenizer)."""
    train = json.loads((data_dir / "train.json").read_text())
    picked = sorted(train, key=lambda r: len(" ".join(r["qa"]["gold_inds"].values())) + len(r["qa"]["question"]))
    return copy.deepcopy(picked[:3])


@dataclass
class Case:
    """One corruption. ``build(records) -> str | bytes | None`` (None: no file at all); ``needles``
    must all appear in the message (``{path}``/``{id}`` are filled in); ``rule`` is validate's rule."""

    name: str
    build: Callable[[list[dict]], str | bytes | None]
    needles: tuple[str, ...]
    rule: str = "file_readable"
    record: int | None = 1  # the broken record (its id must be named), None for file-level faults
    id_override: str | None = None


def _dump(records) -> str:
    return json.dumps(records, ensure_ascii=False, indent=1)


def _set(path: tuple, value):
    def build(records):
        node = records[1]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return _dump(records)

    return build


def _delete(path: tuple):
    def build(records):
        node = records[1]
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return _dump(records)

    return build


def _program(program: str, table_fix: Callable[[list], None] | None = None):
    def build(records):
        records[1]["qa"]["program"] = program
        if table_fix:
            table_fix(records[1]["table"])
        return _dump(records)

    return build


def _non_numeric_cell(table):
    table[1][0] = "total revenue"
    table[1][1] = "n/a"


def _raw_exe_ans(text: str):
    """exe_ans written as raw JSON text (json.dumps cannot write 1e999 or a 5,000-digit integer)."""

    def build(records):
        records[1]["qa"]["exe_ans"] = "__EXE_ANS__"
        return _dump(records).replace('"__EXE_ANS__"', text)

    return build


def _duplicate(records):
    records[2]["id"] = records[1]["id"]
    return _dump(records)


NON_ASCII_ID = "ÄÖÜ/2019/page_1.pdf-1 €"


def _non_ascii_bad_program(records):
    records[1]["id"] = NON_ASCII_ID
    records[1]["qa"]["question"] = "wie hoch war der umsatz 2019 in € — 中文?"
    records[1]["qa"]["program"] = "divide(5829, 0)"
    return _dump(records)


def _non_utf8(records):
    records[1]["qa"]["question"] = "what was the change in € and in ¥?"
    return _dump(records).encode("cp1252", errors="replace")


CASES: list[Case] = [
    Case("malformed_json", lambda r: _dump(r)[: len(_dump(r)) // 2], ("{path}", "malformed JSON at line"), record=None),
    Case("non_list_top_level", lambda r: json.dumps({"data": r}), ("{path}", "expected a JSON list"), record=None),
    Case("record_not_object", lambda r: _dump([r[0], "oops", r[2]]), ("{path}", "record 1", "expected a JSON object"),
         rule="record_is_object", record=None),
    Case("wrong_type_question", _set(("qa", "question"), 42), ("{path}", "id {id}", "qa.question", "expected a string"),
         rule="question_non_empty"),
    Case("wrong_type_table", _set(("table",), "revenue 10"), ("{path}", "id {id}", "table", "expected an array"),
         rule="table_is_string_grid"),
    Case("wrong_type_pre_text", _set(("pre_text",), [1, 2]), ("{path}", "id {id}", "pre_text[0]"),
         rule="text_fields_are_string_lists"),
    Case("missing_qa_program", _delete(("qa", "program")), ("{path}", "id {id}", "qa.program", "missing"),
         rule="required_fields_present"),
    Case("missing_qa_exe_ans", _delete(("qa", "exe_ans")), ("{path}", "id {id}", "qa.exe_ans", "missing"),
         rule="required_fields_present"),
    Case("missing_qa", _delete(("qa",)), ("{path}", "id {id}", "qa", "missing"), rule="required_fields_present"),
    Case("empty_split", lambda r: "[]", ("{path}", "no records"), record=None),
    Case("empty_file", lambda r: "", ("{path}", "empty"), record=None),
    Case("missing_file", lambda r: None, ("{path}", "not found"), record=None),
    Case("duplicate_ids", _duplicate, ("{path}", "record 2", "id {id}", "duplicate id"), rule="id_unique"),  # records 1 and 2 share record 1's id
    Case("program_syntax_error", _program("subtract(5829, 5735"), ("{path}", "id {id}", "qa.program", "expected"),
         rule="program_parses"),
    Case("unknown_operation", _program("modulo(5829, 5735)"), ("{path}", "id {id}", "qa.program", "unknown operation"),
         rule="program_parses"),
    Case("step_ref_out_of_range", _program("divide(#3, 2)"), ("{path}", "id {id}", "qa.program", "#3"),
         rule="program_parses"),
    Case("division_by_zero", _program("divide(5829, 0)"), ("{path}", "id {id}", "qa.program", "divides by zero"),
         rule="program_executes_to_exe_ans"),
    Case("missing_table_row", _program("table_sum(no such row, none)"), ("{path}", "id {id}", "qa.program", "no table row"),
         rule="program_executes_to_exe_ans"),
    Case("non_numeric_cell", _program("table_sum(total revenue, none)", _non_numeric_cell),
         ("{path}", "id {id}", "qa.program", "not a number"), rule="program_executes_to_exe_ans"),
    Case("huge_exe_ans_float", _raw_exe_ans("1e999"), ("{path}", "id {id}", "qa.exe_ans", "non-finite"),
         rule="exe_ans_number_or_yes_no"),
    Case("huge_exe_ans_int", _raw_exe_ans("1" + "0" * 400), ("{path}", "id {id}", "qa.exe_ans", "too large"),
         rule="exe_ans_number_or_yes_no"),
    Case("huge_exe_ans_digits", _raw_exe_ans("9" * 5000), ("{path}", "unreadable JSON value"), record=None),
    Case("huge_program_number", _program("multiply(1e308, 10)"), ("{path}", "id {id}", "qa.program", "overflows"),
         rule="program_executes_to_exe_ans"),
    Case("nested_too_deep", lambda r: "[" * 100_000 + "]" * 100_000, ("{path}", "nested too deeply"), record=None),
    Case("non_utf8_text", _non_utf8, ("{path}", "not UTF-8"), record=None),
    Case("non_ascii_id_bad_program", _non_ascii_bad_program, ("{path}", f"id {NON_ASCII_ID}", "qa.program", "divides by zero"),
         rule="program_executes_to_exe_ans", id_override=NON_ASCII_ID),
]
ENTRY_POINTS = ("validate", "score", "train", "evaluate")
CASES_TRIED = len(CASES) * len(ENTRY_POINTS)  # the matrix; the valid non-ASCII split adds 4 more runs


def _non_ascii_valid(records):
    """Valid data in other scripts: questions, text and table cells; the pipeline must just work."""
    records[1]["id"] = "ÄÖÜ/2019/page_1.pdf-1"
    records[1]["qa"]["question"] = records[1]["qa"]["question"] + " (en €, ¥, 中文, emoji 📈)"
    records[1]["pre_text"] = [s + " — « café »" for s in records[1]["pre_text"]]
    records[1]["table"][0][0] = "in millions of €"
    return _dump(records)


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base_records(data_dir) -> list[dict]:
    return _base_records(data_dir)


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_model_path) -> Path:
    """A LoRA adapter (safetensors) for the tiny model, as `fingrpo train` would leave it."""
    from fingrpo.config import load_config
    from fingrpo.model import add_lora, load_model_and_tokenizer

    cfg = load_config(PARAMS, {"model": {"name_or_path": str(tiny_model_path)}})
    model, tok = load_model_and_tokenizer(cfg.model)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    add_lora(model, cfg.lora).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@dataclass
class Workspace:
    root: Path  # the working folder of the run: reports/, models/, the data copies
    bad: Path
    good: Path
    predictions: Path
    record_id: str | None
    snapshot: set = field(default_factory=set)


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _workspace(tmp_path: Path, records: list[dict], case: Case) -> Workspace:
    data = tmp_path / "data"
    data.mkdir()
    good = data / "good.json"
    good.write_text(_dump(records), encoding="utf-8")
    bad = data / "bad.json"
    content = case.build(copy.deepcopy(records))
    if isinstance(content, bytes):
        bad.write_bytes(content)
    elif content is not None:
        bad.write_text(content, encoding="utf-8")
    predictions = data / "predictions.jsonl"
    scored = records
    if case.name == "non_ascii_valid":  # predictions for the records as written: that case renames an id
        scored = json.loads(content)
    predictions.write_text("".join(
        json.dumps({"id": r["id"], "program": r["qa"]["program"], "answer": str(r["qa"]["exe_ans"])}) + "\n"
        for r in scored
    ))
    rid = case.id_override or (records[case.record]["id"] if case.record is not None else None)
    ws = Workspace(tmp_path, bad, good, predictions, rid)
    ws.snapshot = _listing(tmp_path)
    return ws


def _argv(entry: str, ws: Workspace, model_path: Path, adapter: Path | None, data: Path | None = None) -> list[str]:
    data = data or ws.bad
    common = ["--params", str(PARAMS)]
    tiny = [
        f"model.name_or_path={model_path}", "tracking.enabled=false", "prompt.few_shot=0", "prompt.retriever=lexical",
        f"data.provenance_path={PROVENANCE}", f"data.test_path={ws.good}",
        "data.train_sources=null", "data.eval_sets=null", "train.train_sources=null",  # FinQA alone: the files under test
    ]
    sets = lambda items: [x for item in items for x in ("--set", item)]  # noqa: E731
    if entry == "validate":
        return ["validate", str(data), "--no-data-docs", "--report-dir", str(ws.root / "reports"), *common]
    if entry == "score":
        return ["score", "--predictions", str(ws.predictions), "--data", str(data), *common]
    if entry == "train":
        return ["train", *common, *sets(tiny + [
            f"data.train_path={data}", f"data.dev_path={ws.good}", "train.max_steps=1", "train.prompts_per_step=1",
            "train.group_size=2", "train.max_new_tokens=4", "train.eval_subset_size=1", "train.eval_interval=100",
            "train.save_interval=1", "train.threads=1", "train.init_adapter=null",
        ])]
    assert entry == "evaluate"
    return ["evaluate", "--adapter", str(adapter), *common, *sets(tiny + [
        f"data.train_path={ws.good}", f"data.dev_path={data}", "evaluate.max_records=2", "evaluate.max_new_tokens=4",
        "evaluate.compare_base=false", "evaluate.bootstrap_samples=10",
    ])]


def _check_failure(entry: str, case: Case, ws: Workspace, code: int, out: str, err: str) -> None:
    text = out + err
    where = f"{case.name} x {entry}: exit {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert code != 0, where
    assert "Traceback" not in text, where
    needles = [n.format(path=ws.bad, id=ws.record_id) for n in case.needles]
    if entry == "validate":
        # the summary names file, rule and the failing record (by id when it has one)
        lines = [ln for ln in out.splitlines() if ln.startswith(f"{ws.bad}: FAILED {case.rule}")]
        assert lines, where
        if case.record is not None and ws.record_id:
            assert any(ws.record_id in ln for ln in lines), where
        if case.rule == "file_readable":
            assert all(n in lines[0] for n in needles), where
        report = json.loads((ws.root / "reports" / "validation.json").read_text())
        assert report["success"] is False and report["files"][str(ws.bad)]["success"] is False
        allowed = {"reports", "reports/validation.json"}
    else:
        errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1, where  # one line
        missing = [n for n in needles if n not in errors[0]]
        assert not missing, f"{missing} not in the message; {where}"
        allowed = set()
    new = _listing(ws.root) - ws.snapshot
    assert new <= allowed, f"{case.name} x {entry} left files behind: {sorted(new - allowed)}"
    assert not [p for p in _listing(ws.root) if p.endswith(".tmp") or "/.tmp" in p], where


# --------------------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_in_process(case, entry, tmp_path, base_records, tiny_model_path, tiny_adapter, capsys, monkeypatch):
    ws = _workspace(tmp_path, base_records, case)
    monkeypatch.chdir(tmp_path)
    code = cli.main(_argv(entry, ws, tiny_model_path, tiny_adapter))
    captured = capsys.readouterr()
    _check_failure(entry, case, ws, code, captured.out, captured.err)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_non_ascii_text_is_data_not_an_error(entry, tmp_path, base_records, tiny_model_path, tiny_adapter, capsys, monkeypatch):
    """Valid UTF-8 text in other scripts passes every entry point, and what they write is complete."""
    case = Case("non_ascii_valid", _non_ascii_valid, ())
    ws = _workspace(tmp_path, base_records, case)
    monkeypatch.chdir(tmp_path)
    code = cli.main(_argv(entry, ws, tiny_model_path, tiny_adapter))
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    new = _listing(tmp_path) - ws.snapshot
    assert not [p for p in new if p.endswith(".tmp") or "/.tmp" in p or p.endswith(".old")], new
    if entry == "validate":
        report = json.loads((tmp_path / "reports" / "validation.json").read_text(encoding="utf-8"))
        assert report["success"] is True
    elif entry == "score":
        assert json.loads(captured.out)["execution_accuracy"] == 1.0
    elif entry == "train":
        assert (tmp_path / "models" / "adapter" / "adapter_model.safetensors").is_file()
    else:
        rows = [json.loads(line) for line in (tmp_path / "reports" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        assert "ÄÖÜ/2019/page_1.pdf-1" in {r["id"] for r in rows}


def test_failed_run_keeps_previous_outputs(tmp_path, base_records, tiny_model_path, tiny_adapter, capsys, monkeypatch):
    """A run that fails on bad data leaves an earlier run's reports byte-for-byte as they were."""
    case = next(c for c in CASES if c.name == "division_by_zero")
    ws = _workspace(tmp_path, base_records, case)
    monkeypatch.chdir(tmp_path)
    reports = tmp_path / "reports"
    reports.mkdir()
    before = {"eval.json": '{"old": true}\n', "predictions.jsonl": '{"id": "old"}\n'}
    for name, text in before.items():
        (reports / name).write_text(text)
    assert cli.main(_argv("evaluate", ws, tiny_model_path, tiny_adapter)) != 0
    capsys.readouterr()
    assert {p.name: p.read_text() for p in reports.iterdir()} == before


def test_matrix_size():
    """The closing note of the issue reports this number; keep it honest."""
    assert len({c.name for c in CASES}) == len(CASES) >= 25
    assert CASES_TRIED == len(CASES) * 4


# ------------------------------------------------------------------------------- bad predictions (score)

BAD_PREDICTIONS = {
    "malformed_jsonl": ('{{"id": "{id}", "program": "add(1, 2)"}}\n{{"id": oops}}\n', "malformed JSON on line 2"),
    "malformed_json_list": ('[{{"id": "{id}", "program": "add(1, 2)"}},', "malformed JSON"),
    "not_an_object": ('["just a string"]', "prediction 0: expected a JSON object"),
    "missing_id": ('{{"program": "add(1, 2)"}}\n', "prediction 0: id"),
    "program_not_string": ('{{"id": "{id}", "program": 12}}\n', "program: expected a string"),
    "tokens_not_list": ('[{{"id": "{id}", "predicted": "add( 1 2 ) EOF"}}]', "predicted"),
    "no_prediction_field": ('{{"id": "{id}"}}\n', "needs one of"),
    "empty": ("", "empty"),
    "huge_int": ('{{"id": "{id}", "answer": ' + "9" * 5000 + "}}\n", "unreadable JSON value"),
    "deeply_nested": ("{{" * 50_000 + "\n", "line 1"),
}
CASES_TRIED_PREDICTIONS = len(BAD_PREDICTIONS)


@pytest.mark.parametrize("name", sorted(BAD_PREDICTIONS))
def test_bad_predictions_file_is_a_one_line_error(name, tmp_path, base_records, capsys, monkeypatch):
    text, needle = BAD_PREDICTIONS[name]
    data = tmp_path / "gold.json"
    data.write_text(_dump(base_records))
    preds = tmp_path / "preds.jsonl"
    preds.write_text(text.format(id=base_records[0]["id"]))
    monkeypatch.chdir(tmp_path)
    before = _listing(tmp_path)
    code = cli.main(["score", "--predictions", str(preds), "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {preds}") and needle in lines[0], err
    assert _listing(tmp_path) == before


# ------------------------------------------------------------------------------------ atomic writes


@pytest.mark.parametrize("is_dir", [False, True], ids=["file", "folder"])
def test_writer_killed_mid_write_leaves_old_output_and_its_temp_is_cleaned(tmp_path, is_dir):
    """SIGKILL inside ``atomic_path`` (no ``except`` can run): the target keeps its old content, the
    half-written temp is invisible to readers (``.name.<pid>.*.tmp``) and the next atomic write into
    that folder removes it."""
    from fingrpo.io import write_json_atomic

    target = tmp_path / ("step-4" if is_dir else "eval.json")
    if is_dir:
        target.mkdir()
        (target / "trainer_state.json").write_text('{"step": 4}')
    else:
        target.write_text('{"old": true}')
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from fingrpo.io import atomic_path\n"
        f"with atomic_path(sys.argv[1], is_dir={is_dir}) as tmp:\n"
        "    (tmp / 'adapter.bin' if tmp.is_dir() else tmp).write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].name.startswith(f".{target.name}.")
    if is_dir:
        assert json.loads((target / "trainer_state.json").read_text()) == {"step": 4}
    else:
        assert json.loads(target.read_text()) == {"old": True}
    write_json_atomic(tmp_path / "other.json", {"x": 1})  # any later atomic write into the folder
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_does_not_touch_a_live_writers_temp(tmp_path):
    from fingrpo.io import write_json_atomic

    live = tmp_path / f".eval.json.{os.getpid()}.abc.tmp"  # this process is alive: its temp stays
    live.write_text("in progress")
    other = tmp_path / ".not-an-atomic-temp.tmp"
    other.write_text("someone else's")
    write_json_atomic(tmp_path / "eval.json", {"a": 1})
    assert live.exists() and other.exists()


# ---------------------------------------------------------------------------------------- subprocess


def _run_cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fingrpo", *argv], cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", timeout=300, env=env)


def _subprocess_case(case, entry, tmp_path, base_records, tiny_model_path, tiny_adapter):
    ws = _workspace(tmp_path, base_records, case)
    proc = _run_cli(_argv(entry, ws, tiny_model_path, tiny_adapter), tmp_path)
    _check_failure(entry, case, ws, proc.returncode, proc.stdout, proc.stderr)


FAST_SUBPROCESS = ["malformed_json", "division_by_zero", "non_ascii_id_bad_program"]


@pytest.mark.parametrize("name", FAST_SUBPROCESS)
def test_bad_input_subprocess_score(name, tmp_path, base_records, tiny_model_path, tiny_adapter):
    """A real `python -m fingrpo score` process: exit 2, one line, no traceback (non-ASCII survives stderr)."""
    _subprocess_case(next(c for c in CASES if c.name == name), "score", tmp_path, base_records, tiny_model_path, tiny_adapter)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_subprocess(case, entry, tmp_path, base_records, tiny_model_path, tiny_adapter):
    _subprocess_case(case, entry, tmp_path, base_records, tiny_model_path, tiny_adapter)


# ---------------------------------------------------------------------------------------------- the flow

FLOW_CASES = ["malformed_json", "division_by_zero"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FLOW_CASES)
def test_bad_input_stops_the_prefect_flow_before_training(name, tmp_path, base_records, tiny_model_path):
    """`python flows/retrain.py` on a bad train split: exit 2 after the validate task, the log names
    the file, the record and the rule, nothing is trained or registered (no models/, no mlflow.db)."""
    case = next(c for c in CASES if c.name == name)
    ws = _workspace(tmp_path, base_records, case)
    sets = [f"data.train_path={ws.bad}", f"data.dev_path={ws.good}", f"data.test_path={ws.good}",
            "data.train_sources=null", "data.eval_sets=null", "train.train_sources=null",  # FinQA alone
            f"model.name_or_path={tiny_model_path}", "pipeline.data_docs=false", "prompt.retriever=lexical",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "FINGRPO_RETRY_DELAY_S": "0", "PYTHONIOENCODING": "utf-8"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, str(ROOT / "flows" / "retrain.py"), "--params", str(PARAMS),
                           *[x for s in sets for x in ("--set", s)]],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") or "error: data validation failed" in proc.stderr
    summary = [ln for ln in text.splitlines() if f"{ws.bad}: FAILED {case.rule}" in ln]
    assert summary, text[-3000:]
    if case.record is not None:
        assert ws.record_id in summary[0]
    new = {p for p in _listing(tmp_path) - ws.snapshot if not p.startswith(".prefect")}
    assert new <= {"reports", "reports/validation.json"}, sorted(new)
    assert "Traceback" not in text, text[-3000:]
