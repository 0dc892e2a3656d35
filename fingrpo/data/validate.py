"""Data validation of FinQA-shaped files (FinQA splits, prepared TAT-QA splits): a Great Expectations suite plus the semantic program check.

    fingrpo validate data/finqa/train.json data/finqa/dev.json data/finqa/test.json
    # or: from fingrpo.data.validate import run_validation; code = run_validation([...])

Each file is read leniently (no schema model): every record becomes one row of a pandas DataFrame
(id, question length, whether the program parses, the kind of ``exe_ans``, text-field and table
shape checks, whether the gold program re-executes to ``exe_ans``), so that a file with problems
reports *every* failing record under *every* rule instead of stopping at the first. A Great
Expectations 1.x suite (ephemeral context, pandas data source, one ``ValidationDefinition`` and
``Checkpoint`` per file) then checks the rows:

=================================  ==============================================================
rule                               meaning
=================================  ==============================================================
record_is_object                   the record is a JSON object
required_fields_present            every official field (top level and ``qa``) is there
id_not_null                        ``id`` is a non-empty string
id_unique                          no two records share an ``id``
question_non_empty                 ``qa.question`` is a non-blank string
program_parses                     ``qa.program`` parses with :func:`fingrpo.dsl.parse`
exe_ans_number_or_yes_no           ``qa.exe_ans`` is a finite number or ``"yes"``/``"no"``
text_fields_are_string_lists       ``pre_text`` and ``post_text`` are lists of strings
table_is_string_grid               ``table`` is a list of rows, each a list of strings
table_rows_non_empty               the table has rows and each has a non-blank cell
gold_inds_refer_to_context         every ``qa.gold_inds`` key (``text_N``/``table_N``) is in range
program_executes_to_exe_ans        :func:`fingrpo.dsl.execute` of the gold program, rounded to 5
                                   decimals (official rule), equals ``exe_ans``
tatqa_program_reproduces_answer    a converted TAT-QA record (``tatqa`` field): the program gives the
                                   TAT-QA answer under the official TAT-QA rule (FinQA records pass)
=================================  ==============================================================

A file that cannot be read as a non-empty JSON list (missing, empty, malformed JSON, another top-level
type, no records) fails as a whole under the rule ``file_readable``.

Output: ``<report_dir>/validation.json`` (written atomically; per file and rule: success, unexpected
count, failing record ids and the reason per record), the GX Data Docs HTML under
``<report_dir>/data_docs/`` (``index.html``; offline they render unstyled: their CSS/JS come from a
CDN), and a short summary on stdout. Exit code 0 only when every rule passes in every file, else 1.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

from fingrpo import dsl
from fingrpo.data.tatqa import reproduces_answer, tatqa_prediction
from fingrpo.errors import DataError
from fingrpo.io import atomic_path, read_json, write_json_atomic

REQUIRED_TOP = ("pre_text", "post_text", "filename", "table_ori", "table", "qa", "id")
REQUIRED_QA = (
    "question", "answer", "explanation", "ann_table_rows", "ann_text_rows", "steps", "program",
    "program_re", "gold_inds", "exe_ans",
)
_GOLD_KEY = re.compile(r"^(text|table)_(\d{1,9})$")
SUITE_NAME = "finqa_records"


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _exe_ans_kind(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            return "number" if math.isfinite(v) else "invalid"
        except OverflowError:  # an integer beyond float range
            return "invalid"
    if v in ("yes", "no"):
        return "yes_no"
    return "missing" if v is None else "invalid"


def _flatten(raw: dict | Any, index: int) -> tuple[dict, dict[str, str]]:
    """One record -> (a row of scalar columns for GX, {rule: why it fails} for the report)."""
    why: dict[str, str] = {}
    is_obj = isinstance(raw, dict)
    rec = raw if is_obj else {}
    qa = rec.get("qa") if isinstance(rec.get("qa"), dict) else {}
    if not is_obj:
        why["record_is_object"] = f"a JSON {type(raw).__name__}, not an object"

    missing = [f for f in REQUIRED_TOP if f not in rec] if is_obj else []
    if is_obj and isinstance(rec.get("qa"), dict):
        missing += [f"qa.{f}" for f in REQUIRED_QA if f not in qa]
    if missing:
        why["required_fields_present"] = "missing " + ", ".join(missing)

    rid = rec.get("id")
    rid = rid if isinstance(rid, str) and rid.strip() else None
    if rid is None:
        why["id_not_null"] = f"id is {rec.get('id')!r}"

    question = qa.get("question")
    question_len = len(question.strip()) if isinstance(question, str) else 0
    if not question_len:
        why["question_non_empty"] = f"qa.question is {question!r}"

    program = qa.get("program")
    table = rec.get("table")
    grid_ok = isinstance(table, list) and all(_is_str_list(row) for row in table)
    parses = False
    if not isinstance(program, str):
        why["program_parses"] = f"qa.program is {program!r}"
    else:
        try:
            dsl.parse(program)
            parses = True
        except dsl.ProgramError as e:
            why["program_parses"] = f"{program!r}: {e}"

    exe_ans = qa.get("exe_ans")
    kind = _exe_ans_kind(exe_ans)
    if kind not in ("number", "yes_no"):
        why["exe_ans_number_or_yes_no"] = f"qa.exe_ans is {exe_ans!r}"

    # The semantic check: the gold program, executed on the table and rounded like the official
    # evaluation (round(x, 5)), must give exe_ans exactly.
    matches = False
    if parses and kind in ("number", "yes_no"):
        try:
            value = dsl.execute(program, table if grid_ok else None)
            value = value if isinstance(value, str) else round(value, 5)
            matches = value == exe_ans
            if not matches:
                why["program_executes_to_exe_ans"] = f"{program!r} gives {value!r}, exe_ans is {exe_ans!r}"
        except dsl.ProgramError as e:
            why["program_executes_to_exe_ans"] = f"{program!r}: {e}"
    else:
        why["program_executes_to_exe_ans"] = "not checked: the program does not parse or exe_ans is invalid"

    tatqa_ok = True  # converted TAT-QA records: the program must reproduce the TAT-QA answer (TAT-QA's rule)
    tatqa = rec.get("tatqa")
    if tatqa is not None:
        tatqa_ok, reason = _tatqa_reproduces(tatqa, program if parses else None, table if grid_ok else None)
        if not tatqa_ok:
            why["tatqa_program_reproduces_answer"] = reason

    text_ok = _is_str_list(rec.get("pre_text")) and _is_str_list(rec.get("post_text"))
    if not text_ok:
        bad = [f for f in ("pre_text", "post_text") if not _is_str_list(rec.get(f))]
        why["text_fields_are_string_lists"] = ", ".join(bad) + " not a list of strings"
    if not grid_ok:
        why["table_is_string_grid"] = "table is not a list of lists of strings"
    n_rows = len(table) if isinstance(table, list) else 0
    # a row counts as non-empty when it has a non-blank cell (every real FinQA row has one)
    rows = table if isinstance(table, list) else []
    row_sizes = [sum(isinstance(c, str) and bool(c.strip()) for c in row) if isinstance(row, list) else 0 for row in rows]
    min_row = min(row_sizes) if row_sizes else 0
    if not min_row:
        why["table_rows_non_empty"] = f"table row {row_sizes.index(0)} is empty" if row_sizes else "table has no rows"

    gold = qa.get("gold_inds")
    gold_ok = isinstance(gold, dict)
    if gold_ok and text_ok:
        n_text = len(rec["pre_text"]) + len(rec["post_text"])
        for key in gold:
            m = _GOLD_KEY.match(key)
            limit = (n_rows if m.group(1) == "table" else n_text) if m else 0
            if not m or int(m.group(2)) >= limit:
                gold_ok = False
                why["gold_inds_refer_to_context"] = f"qa.gold_inds key {key!r} is out of range"
                break
    elif not gold_ok:
        why["gold_inds_refer_to_context"] = f"qa.gold_inds is {gold!r}"[:80]

    row = {
        "index": index,
        "id": rid,
        "is_object": is_obj,
        "missing_fields": ", ".join(missing) if missing else None,
        "question_len": question_len,
        "program_parses": parses,
        "exe_ans_kind": kind,
        "text_fields_ok": text_ok,
        "table_ok": grid_ok,
        "table_n_rows": n_rows,
        "table_min_row_len": min_row,
        "gold_inds_ok": gold_ok,
        "program_matches_exe_ans": matches,
        "tatqa_answer_ok": tatqa_ok,
    }
    return row, why


def _tatqa_reproduces(tatqa: Any, program: str | None, table: Any) -> tuple[bool, str]:
    """Whether a converted record's program, executed (unrounded), gives its TAT-QA answer under the
    official TAT-QA rule, read with the percent convention of :mod:`fingrpo.data.tatqa`."""
    needed = ("answer", "answer_type", "scale")
    if not isinstance(tatqa, dict) or any(k not in tatqa for k in needed):
        return False, f"tatqa: expected an object with {', '.join(needed)}"
    if program is None:
        return False, "not checked: the program does not parse"
    try:
        value = dsl.execute(program, table)
        if reproduces_answer(value, tatqa):
            return True, ""
        answer, scale = tatqa_prediction(value, tatqa["scale"])
        return False, f"{program!r} gives {answer!r} {scale}, the TAT-QA answer is {tatqa['answer']!r} {tatqa['scale']}"
    except (dsl.ProgramError, ValueError, TypeError) as e:
        return False, f"{program!r}: {e}"


def _expectations(gxe) -> list:
    """The suite: one expectation per rule, the rule name in ``meta``."""

    def rule(exp, name: str):
        exp.meta = {"rule": name}
        return exp

    return [
        rule(gxe.ExpectColumnValuesToBeInSet(column="is_object", value_set=[True]), "record_is_object"),
        rule(gxe.ExpectColumnValuesToBeNull(column="missing_fields"), "required_fields_present"),
        rule(gxe.ExpectColumnValuesToNotBeNull(column="id"), "id_not_null"),
        rule(gxe.ExpectColumnValuesToBeUnique(column="id"), "id_unique"),
        rule(gxe.ExpectColumnValuesToBeBetween(column="question_len", min_value=1), "question_non_empty"),
        rule(gxe.ExpectColumnValuesToBeInSet(column="program_parses", value_set=[True]), "program_parses"),
        rule(
            gxe.ExpectColumnValuesToBeInSet(column="exe_ans_kind", value_set=["number", "yes_no"]),
            "exe_ans_number_or_yes_no",
        ),
        rule(
            gxe.ExpectColumnValuesToBeInSet(column="text_fields_ok", value_set=[True]), "text_fields_are_string_lists"
        ),
        rule(gxe.ExpectColumnValuesToBeInSet(column="table_ok", value_set=[True]), "table_is_string_grid"),
        rule(gxe.ExpectColumnValuesToBeBetween(column="table_min_row_len", min_value=1), "table_rows_non_empty"),
        rule(gxe.ExpectColumnValuesToBeInSet(column="gold_inds_ok", value_set=[True]), "gold_inds_refer_to_context"),
        rule(
            gxe.ExpectColumnValuesToBeInSet(column="program_matches_exe_ans", value_set=[True]),
            "program_executes_to_exe_ans",
        ),
        rule(
            gxe.ExpectColumnValuesToBeInSet(column="tatqa_answer_ok", value_set=[True]),
            "tatqa_program_reproduces_answer",
        ),
    ]


def _read_records(path: str) -> list:
    raw = read_json(path)  # DataError: missing file, empty file, malformed JSON (with line/column)
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of records at the top level, got {type(raw).__name__}")
    if not raw:
        raise DataError(f"{path}: the split has no records")
    return raw


def _label(row_id: str | None, index: int) -> str:
    return row_id if row_id is not None else f"record {index}"


def _gx_context(docs_dir: Path | None):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name="fingrpo",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    return context


def _validate_frames(frames: dict[str, Any], docs_dir: Path | None) -> dict[str, dict[str, dict]]:
    """Run the GX suite over each file's DataFrame -> {file: {rule: {success, unexpected_index_list, ...}}}."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import great_expectations.expectations as gxe

    context = _gx_context(docs_dir)
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
    for exp in _expectations(gxe):
        suite.add_expectation(exp)
    source = context.data_sources.add_pandas("finqa")
    out: dict[str, dict[str, dict]] = {}
    for n, (path, df) in enumerate(frames.items()):
        name = f"{n}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', path)}"
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all_records")
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["fingrpo"])] if docs_dir else []
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"checkpoint_{name}",
                validation_definitions=[definition],
                actions=actions,
                result_format={"result_format": "COMPLETE"},
            )
        )
        result = checkpoint.run(batch_parameters={"dataframe": df})
        rules: dict[str, dict] = {}
        for run in result.run_results.values():
            for r in run.results:
                info = r.exception_info or {}
                raised = bool(info.get("raised_exception"))
                rules[r.expectation_config.meta["rule"]] = {
                    "success": bool(r.success),
                    "expectation": r.expectation_config.type,
                    "column": r.expectation_config.kwargs.get("column"),
                    "unexpected_index_list": list(r.result.get("unexpected_index_list") or []),
                    "exception": info.get("exception_message") if raised else None,
                }
        out[path] = rules
    return out


def run_validation(
    files: Sequence[str | os.PathLike], report_dir: str | os.PathLike = "reports", data_docs: bool = True
) -> int:
    """Validate FinQA split files; write ``validation.json`` (+ Data Docs); return the exit code.

    >>> run_validation(["data/finqa/train.json"], report_dir="reports", data_docs=False)
    data/finqa/train.json: OK (110 records, 13 rules)
    0
    """
    import pandas as pd

    files = [str(f) for f in files]
    if not files:
        raise DataError("validate: no files given")
    report_dir = Path(report_dir)
    report: dict[str, Any] = {"success": True, "suite": SUITE_NAME, "files": {}}
    frames: dict[str, Any] = {}
    reasons: dict[str, list[dict[str, str]]] = {}
    record_ids: dict[str, list[str | None]] = {}  # from the rows, not the frame (pandas turns None into NaN)
    for path in files:
        try:
            raw = _read_records(path)
        except DataError as e:
            report["files"][path] = {
                "success": False,
                "n_records": 0,
                "error": str(e),
                "rules": {
                    "file_readable": {"success": False, "unexpected_count": 1, "failing_ids": [], "reason": str(e)}
                },
            }
            continue
        rows, whys = zip(*(_flatten(item, i) for i, item in enumerate(raw)))
        frames[path] = pd.DataFrame(list(rows))
        reasons[path] = list(whys)
        record_ids[path] = [r["id"] for r in rows]

    gx_results: dict[str, dict[str, dict]] = {}
    if frames:
        if data_docs:
            with atomic_path(report_dir / "data_docs", is_dir=True) as docs_tmp:
                gx_results = _validate_frames(frames, docs_tmp)
            report["data_docs"] = str(report_dir / "data_docs" / "index.html")
        else:
            gx_results = _validate_frames(frames, None)

    for path, df in frames.items():
        ids = record_ids[path]
        rules_out: dict[str, dict] = {}
        for rule_name, res in gx_results[path].items():
            idx = sorted(int(i) for i in res["unexpected_index_list"])
            entry = {
                "success": res["success"],
                "expectation": res["expectation"],
                "column": res["column"],
                "unexpected_count": len(idx),
                "failing_ids": [_label(ids[i], i) for i in idx],
                "failing_records": idx,
                # aligned with failing_ids (a dict would merge the two records of a duplicate id)
                "reasons": [
                    reasons[path][i].get(rule_name, f"duplicate id, record {i}" if rule_name == "id_unique" else "")
                    for i in idx
                ],
            }
            if res["exception"]:
                entry["exception"] = res["exception"]
            rules_out[rule_name] = entry
        report["files"][path] = {
            "success": all(r["success"] for r in rules_out.values()),
            "n_records": len(df),
            "error": None,
            "rules": rules_out,
        }
    report["files"] = {path: report["files"][path] for path in dict.fromkeys(files)}  # input order
    report["success"] = all(f["success"] for f in report["files"].values())
    write_json_atomic(report_dir / "validation.json", report)
    _print_summary(report)
    return 0 if report["success"] else 1


def _print_summary(report: dict, max_ids: int = 5) -> None:
    for path, f in report["files"].items():
        if f["success"]:
            print(f"{path}: OK ({f['n_records']} records, {len(f['rules'])} rules)")
            continue
        if f["error"]:
            print(f"{path}: FAILED file_readable: {f['error']}")
            continue
        for rule_name, r in f["rules"].items():
            if r["success"]:
                continue
            pairs = list(zip(r["failing_ids"], r["reasons"]))[:max_ids]
            shown = [f"{rid} ({why})" if why else rid for rid, why in pairs]
            more = len(r["failing_ids"]) - max_ids
            extra = r.get("exception") or ""
            print(
                f"{path}: FAILED {rule_name}: {r['unexpected_count']} record(s): "
                + "; ".join(shown)
                + (f"; ... and {more} more" if more > 0 else "")
                + (f" [expectation raised: {extra}]" if extra else "")
            )
    n_bad = sum(not f["success"] for f in report["files"].values())
    if n_bad:
        print(f"validation failed in {n_bad} of {len(report['files'])} file(s); details in validation.json")
