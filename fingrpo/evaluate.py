"""Scoring FinQA predictions (official and tolerant execution accuracy, program accuracy) and the
evaluation harness (greedy generation, base model vs adapter, bootstrap intervals).

    fingrpo score --predictions preds.json --data data/finqa/test.json   # official or JSONL predictions
    fingrpo evaluate [--adapter models/adapter]                          # params.yaml `evaluate:` section

Rules, as in the official script (``czyssrs/FinQA`` ``code/evaluate/evaluate.py``), bit for bit
(:mod:`fingrpo.official`):

- **execution accuracy**: the official ``eval_program`` on the predicted tokens (official-format
  ``predicted``, or a program text tokenized as the official ``program_tokenization`` does): valid,
  rounded to 5 decimals, and equal to ``qa.exe_ans`` (``"yes"``/``"no"`` as strings). So a row name
  with parentheses (``table_average(private investors ( a ), none)``) is invalid, as it is there. A
  prediction that carries only an answer (no program) is scored on that answer's value.
- **program accuracy**: the official ``equal_program``: the predicted program may only use the gold
  program's arguments; both become sympy expressions over those arguments as symbols, simplified,
  and compared.
- accuracies are divided by the number of *predictions* (as the official script does); a prediction
  whose id is not in the data counts as wrong and is reported in ``missing_ids``.

TAT-QA records (converted by :mod:`fingrpo.data.tatqa`, or a raw TAT-QA file given to ``score``) are
also scored by the official TAT-QA rules (:func:`score_tatqa_files`): exact match and F1 over every
gold question, by answer type.

And one rule of ours, **tolerant accuracy** (:func:`tolerant_match`): relative tolerance ``rel_tol``
(default 1e-3, absolute 1e-5 near zero), with a percentage accepted in either unit (×100 or ÷100),
counting a completion correct when either its executed program or its stated ``Answer:`` matches.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from fingrpo.answers import normalize_answer, parse_completion
from fingrpo.dsl import (
    ProgramError,
    RowName,
    Step,
    StepRef,
    TABLE_OPS,
    execute,
    format_program,
    parse,
    round_result,
    tokens_to_program,
)
from fingrpo.errors import DataError
from fingrpo.official import finqa_equal_program, finqa_eval_program, finqa_tokenize

log = logging.getLogger(__name__)

ABS_TOL = 1e-5  # exe_ans is rounded to 5 decimals: differences below that are rounding, not error

# ------------------------------------------------------------------------------------------ matching


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _yes_no(x: Any) -> str | None:
    return x.strip().lower() if isinstance(x, str) and x.strip().lower() in ("yes", "no") else None


def official_match(value: float | str | None, exe_ans: float | str) -> bool:
    """The official rule: ``round(value, 5) == exe_ans``; ``"yes"``/``"no"`` compared as strings.

    >>> official_match(0.347192, 0.34719), official_match(34.7192, 0.34719), official_match("yes", "yes")
    (True, False, True)
    """
    if isinstance(exe_ans, str) or isinstance(value, str):
        return isinstance(value, str) and isinstance(exe_ans, str) and value.strip().lower() == exe_ans.strip().lower()
    if not _is_number(value) or not _is_number(exe_ans):
        return False
    return round_result(float(value)) == float(exe_ans)


def tolerant_match(value: float | str | None, exe_ans: float | str, rel_tol: float = 1e-3) -> bool:
    """Numbers within ``rel_tol`` (relative) or 1e-5 (absolute), accepting either percent unit.

    ``value``, ``value * 100`` and ``value / 100`` are each compared with ``exe_ans`` (FinQA stores most
    percentages as fractions, some in percent units). ``"yes"``/``"no"`` must agree (case-insensitive).

    >>> tolerant_match(0.2469, 24.69136), tolerant_match(94.05, 94.0), tolerant_match(95, 94.0)
    (True, True, False)
    """
    gold_yn, pred_yn = _yes_no(exe_ans), _yes_no(value)
    if gold_yn is not None or pred_yn is not None:
        return gold_yn is not None and gold_yn == pred_yn
    if not _is_number(value) or not _is_number(exe_ans):
        return False
    v, g = float(value), float(exe_ans)
    if math.isclose(v, g, rel_tol=rel_tol, abs_tol=ABS_TOL):
        return True
    # the other percent unit: relative tolerance only (0.001 / 100 must not pass as 0 by the abs. tolerance)
    return any(math.isclose(c, g, rel_tol=rel_tol) for c in (v * 100.0, v / 100.0))


# ------------------------------------------------------------------------------ program equivalence


def _steps_of(program: str | list[Step] | list[str]) -> list[Step]:
    """Text, parsed steps, or the official token list -> steps (ProgramError on garbage)."""
    if isinstance(program, str):
        return parse(program)
    if isinstance(program, (list, tuple)) and program and all(isinstance(t, str) for t in program):
        return parse(tokens_to_program(list(program)))
    if isinstance(program, (list, tuple)) and all(isinstance(s, Step) for s in program) and program:
        return list(program)
    raise ProgramError(f"not a program: {type(program).__name__}")


def _symbolic(steps: list[Step], sym_map: dict[str, Any]):
    """sympy expression of the last step, arguments replaced by their symbols (the official
    ``symbol_recur``); a KeyError means an argument the gold program does not have."""
    import sympy

    def rec(i: int):
        step = steps[i]
        if step.op in TABLE_OPS:
            return sym_map[str(step)]  # a table step is one variable, keyed by its whole text
        a, b = (rec(x.index) if isinstance(x, StepRef) else sym_map[str(x)] for x in step.args)
        if step.op == "add":
            return a + b
        if step.op == "subtract":
            return a - b
        if step.op == "multiply":
            return a * b
        if step.op == "divide":
            return a / b
        if step.op == "exp":
            return a**b
        if step.op == "greater":
            return sympy.StrictGreaterThan(a, b)
        raise ProgramError(f"unknown operation {step.op!r}", step.position)

    return sympy.simplify(rec(len(steps) - 1))


@functools.lru_cache(maxsize=4096)
def _gold_symbols(gold_text: str) -> tuple[dict[str, Any], Any]:
    """Symbols of a gold program's arguments (in order of appearance, as officially) and its simplified
    expression; cached, since every prediction of a record is compared with the same gold program."""
    import sympy

    gold = parse(gold_text)
    sym_map: dict[str, Any] = {}

    def symbol_for(key: str) -> None:
        if key not in sym_map:
            sym_map[key] = sympy.Symbol(f"a{len(sym_map)}")

    for step in gold:
        if step.op in TABLE_OPS:
            symbol_for(str(step))
        else:
            for arg in step.args:
                if not isinstance(arg, StepRef):
                    symbol_for(str(arg))
    return sym_map, _symbolic(gold, sym_map)


def program_equivalent(pred_program: str | list[Step] | list[str], gold_program: str | list[Step] | list[str]) -> bool:
    """The official program accuracy (``equal_program``): symbolic equivalence over the gold arguments.

    Each distinct argument text of the gold program (``5829``, ``const_100``) and each whole table step
    becomes a symbol; the prediction may use only those, and ``#k`` only for an earlier step. Both
    programs become sympy expressions, are simplified, and must be equal. Order of commutative
    arguments does not matter; the same number written differently (``5`` vs ``5.0``) does.

    >>> program_equivalent("add(3, 2), divide(#0, 4)", "add(2, 3), divide(#0, 4)")
    True
    >>> program_equivalent("subtract(3, 2)", "subtract(2, 3)"), program_equivalent("add(2, 9)", "add(2, 3)")
    (False, False)
    """
    gold = _steps_of(gold_program)  # the gold program is trusted: its errors propagate
    try:
        pred = _steps_of(pred_program)
    except ProgramError:
        return False
    if format_program(pred) == format_program(gold):  # same text: same expression, skip sympy
        return True
    sym_map, gold_expr = _gold_symbols(format_program(gold))
    for i, step in enumerate(pred):
        if step.op in TABLE_OPS:
            if str(step) not in sym_map:
                return False
            continue
        for arg in step.args:
            if isinstance(arg, StepRef):
                if arg.index >= i:
                    return False
            elif isinstance(arg, RowName) or str(arg) not in sym_map:
                return False
    try:
        pred_expr = _symbolic(pred, sym_map)
    except (KeyError, TypeError, ValueError, ProgramError):  # e.g. arithmetic on a comparison
        return False
    return bool(gold_expr == pred_expr)


# ------------------------------------------------------------------------------------- predictions

PREDICTION_FIELDS = ("predicted", "program", "completion", "answer")


def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, dict) else getattr(record, name, None)


def _gold(record: Any) -> tuple[str, list[list[str]], float | str, str]:
    """(id, table, exe_ans, program) of a FinQARecord (or an official dict)."""
    qa = _field(record, "qa")
    return _field(record, "id"), _field(record, "table"), _field(qa, "exe_ans"), _field(qa, "program")


def score_prediction(prediction: dict, record: Any, rel_tol: float = 1e-3) -> dict:
    """Score one prediction against its record; never raises on a bad prediction.

    ``prediction`` holds ``predicted`` (official tokens), ``program``, ``completion`` and/or ``answer``.
    The program comes from ``predicted``, else ``program``, else the completion's ``Program:`` line; the
    stated answer from ``answer``, else the completion's ``Answer:`` line.

    >>> rec = {"id": "x", "table": [], "qa": {"exe_ans": 94.0, "program": "subtract(5829, 5735)"}}
    >>> r = score_prediction({"id": "x", "completion": "Program: subtract(5829, 5735)\\nAnswer: 94"}, rec)
    >>> r["correct_official"], r["correct_tolerant"], r["program_correct"], r["format_ok"]
    (True, True, True, True)
    """
    _, table, exe_ans, gold_program = _gold(record)
    program: str | None = None
    error: str | None = None
    format_ok: bool | None = None
    answer_value: float | str | None = None
    answer_text: str | None = None

    if prediction.get("predicted") is not None:
        try:
            program = tokens_to_program(prediction["predicted"])
        except ProgramError as e:
            error = f"predicted: {e}"
    elif isinstance(prediction.get("program"), str):
        program = prediction["program"]
    if isinstance(prediction.get("completion"), str):
        parsed = parse_completion(prediction["completion"])
        format_ok = parsed.format_ok
        if program is None and error is None:
            program = parsed.program
        answer_text, answer_value = parsed.answer_text, parsed.answer_value
    if prediction.get("answer") is not None:
        answer_text = str(prediction["answer"])
        answer_value = normalize_answer(prediction["answer"])

    value: float | str | None = None
    raw_value: float | str | None = None
    steps: list[Step] | None = None
    parse_failed = execute_failed = False
    if program is not None:
        try:
            steps = parse(program)
        except ProgramError as e:
            parse_failed, error = True, str(e)
        if steps is not None:
            try:
                value = raw_value = execute(steps, table)
            except ProgramError as e:
                execute_failed, error = True, str(e)
    elif error is not None:
        parse_failed = True
    has_program_source = any(prediction.get(k) is not None for k in ("predicted", "program", "completion"))
    # the official rules read tokens: the predicted ones, or the program text tokenized officially
    tokens: list[str] | None = None
    if prediction.get("predicted") is not None:
        tokens = list(prediction["predicted"])
    elif program is not None:
        tokens = finqa_tokenize(program)
    if tokens is not None:
        invalid, result = finqa_eval_program(tokens, table or [])
        correct_official = invalid == 0 and result == exe_ans
    else:  # only a bare answer (no program asked for) scores itself
        correct_official = official_match(None if has_program_source else answer_value, exe_ans)
    correct_tolerant = tolerant_match(value, exe_ans, rel_tol) or tolerant_match(answer_value, exe_ans, rel_tol)
    program_correct = False
    if tokens is not None and isinstance(gold_program, str):
        try:
            program_correct = finqa_equal_program(finqa_tokenize(gold_program), tokens)
        except (ValueError, IndexError, KeyError) as e:  # the official script would stop on such a gold program
            log.warning("gold program %r of record %s is not one the official rules can read: %s", gold_program,
                        _field(record, "id"), e)
    return {
        "program": format_program(steps) if steps is not None else program,
        "value": round_result(value) if value is not None else None,
        "answer": answer_text,
        "answer_value": answer_value,
        "exe_ans": exe_ans,
        "correct_official": bool(correct_official),
        "correct_tolerant": bool(correct_tolerant),
        "program_correct": bool(program_correct),
        "format_ok": format_ok,
        "parse_failed": parse_failed or (has_program_source and program is None),
        "execute_failed": execute_failed,
        "error": error,
        "raw_value": raw_value,
    }


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def score_predictions(predictions: list[dict], records: list[Any], rel_tol: float = 1e-3, details: bool = False) -> dict:
    """Score predictions (official token dicts and/or project dicts) against FinQA records.

    Accuracies are over the number of predictions, as the official script computes them (0.0 for no
    predictions). ``missing_ids``: predictions whose id is not among the records (scored wrong);
    ``duplicate_ids``: repeated prediction ids (each scored); ``records_without_prediction``;
    ``unparseable``: a program was expected but none parsed; ``execution_errors``: parsed, failed to run.
    With ``details=True`` the per-prediction results are under ``"predictions"``.

    >>> recs = [{"id": "a", "table": [], "qa": {"exe_ans": 5.0, "program": "add(2, 3)"}}]
    >>> s = score_predictions([{"id": "a", "predicted": ["add(", "3", "2", ")", "EOF"]}], recs)
    >>> s["execution_accuracy"], s["program_accuracy"], s["n"]
    (1.0, 1.0, 1)
    """
    by_id = {_gold(r)[0]: r for r in records}
    seen: set[str] = set()
    rows, missing, duplicates = [], 0, 0
    for pred in predictions:
        pid = pred.get("id")
        if pid in seen:
            duplicates += 1
        seen.add(pid)
        record = by_id.get(pid)
        if record is None:
            missing += 1
            row = {"id": pid, "missing_id": True, "correct_official": False, "correct_tolerant": False,
                   "program_correct": False, "format_ok": None, "parse_failed": False, "execute_failed": False}
        else:
            row = {"id": pid, **score_prediction(pred, record, rel_tol)}
        rows.append(row)
    n = len(rows)
    formatted = [r["format_ok"] for r in rows if r.get("format_ok") is not None]
    result = {
        "n": n,
        "execution_accuracy": _mean([float(r["correct_official"]) for r in rows]),
        "tolerant_accuracy": _mean([float(r["correct_tolerant"]) for r in rows]),
        "program_accuracy": _mean([float(r["program_correct"]) for r in rows]),
        "format_rate": _mean([float(f) for f in formatted]) if formatted else None,
        "correct": {
            "official": sum(r["correct_official"] for r in rows),
            "tolerant": sum(r["correct_tolerant"] for r in rows),
            "program": sum(r["program_correct"] for r in rows),
        },
        "missing_ids": missing,
        "duplicate_ids": duplicates,
        "records_without_prediction": sum(1 for rid in by_id if rid not in seen),
        "unparseable": sum(1 for r in rows if r.get("parse_failed")),
        "execution_errors": sum(1 for r in rows if r.get("execute_failed")),
        "rel_tol": rel_tol,
    }
    if details:
        result["predictions"] = rows
    return result


def _type_name(v: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(v), type(v).__name__)


def load_predictions(path: str | Path) -> tuple[list[dict], str]:
    """Read a predictions file: the official JSON list (``{"id", "predicted": [tokens]}``) or JSONL /
    a JSON list of ``{"id", "program" | "completion" | "answer"}``. Returns (entries, format name).

    Every problem is a one-line :class:`DataError` naming the file, the entry and the field.
    """
    from fingrpo.io import read_json, read_jsonl

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: predictions file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read predictions ({e})") from None
    if not text.strip():
        raise DataError(f"{path}: predictions file is empty")
    stripped = text.lstrip()
    if stripped.startswith("["):
        entries = read_json(path)  # a JSON list; malformed JSON -> DataError with line and column
    else:
        try:
            entries = json.loads(text)  # one object (a one-line JSONL file), or not predictions at all
            if isinstance(entries, dict):
                entries = [entries]
        except (ValueError, RecursionError):  # JSONDecodeError, a 5,000-digit integer, deep nesting
            entries = read_jsonl(path)  # DataError names the bad line
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of predictions or JSON lines, got {_type_name(entries)}")
    if not entries:
        raise DataError(f"{path}: no predictions")
    official = 0
    for i, e in enumerate(entries):
        where = f"{path}: prediction {i}"
        if not isinstance(e, dict):
            raise DataError(f"{where}: expected a JSON object, got {_type_name(e)}")
        pid = e.get("id")
        if not isinstance(pid, str) or not pid:
            raise DataError(f"{where}: id: missing or not a string (got {_type_name(pid)})")
        where += f" (id {pid})"
        if all(e.get(k) is None for k in PREDICTION_FIELDS):
            raise DataError(f"{where}: needs one of {', '.join(PREDICTION_FIELDS)}")
        if "predicted" in e:
            toks = e["predicted"]
            if not isinstance(toks, list) or not all(isinstance(t, str) for t in toks):
                raise DataError(f"{where}: predicted: expected a list of string tokens, got {_type_name(toks)}")
            official += 1
        for k in ("program", "completion"):
            if e.get(k) is not None and not isinstance(e[k], str):
                raise DataError(f"{where}: {k}: expected a string, got {_type_name(e[k])}")
        ans = e.get("answer")
        if ans is not None and (isinstance(ans, bool) or not isinstance(ans, (str, int, float))):
            raise DataError(f"{where}: answer: expected a string or number, got {_type_name(ans)}")
    kind = "official" if official == len(entries) else ("jsonl" if official == 0 else "mixed")
    return entries, kind


def _load_records(path: str | Path) -> list[Any]:
    from fingrpo.data.finqa import load_split

    return load_split(path)


def tatqa_gold(record: Any) -> dict | None:
    """The TAT-QA question a converted record came from (``answer``, ``answer_type``, ``scale``,
    ``answer_from``, ``uid``), or None for a FinQA record."""
    extra = record.get("tatqa") if isinstance(record, dict) else (getattr(record, "model_extra", None) or {}).get("tatqa")
    return extra if isinstance(extra, dict) else None


def tatqa_prediction_of(scored: dict, gold: dict, scale: str | None = None) -> tuple[Any, str]:
    """A project prediction, scored by :func:`score_prediction`, as a TAT-QA ``[answer, scale]``: the
    executed program's (unrounded) value, else the stated answer's, read with the percent convention of
    :mod:`fingrpo.data.tatqa` (a fraction); a text answer as written; ``scale``: the prediction's own,
    else the question's."""
    from fingrpo.data.tatqa import tatqa_prediction

    unit = gold["scale"] if scale is None else scale
    value = scored.get("raw_value")
    if value is None:
        value = scored.get("answer_value")
    if value is None or (isinstance(value, str) and value not in ("yes", "no")):
        return scored.get("answer") or None, unit  # a text answer (a span) as written
    return tatqa_prediction(value, unit)


def tatqa_scores(rows: list[tuple[dict, Any, str | None]]) -> dict:
    """Official TAT-QA figures over ``(gold question, answer, scale)`` rows: exact match and F1 (x100,
    2 decimals, as ``tatqa_eval.py`` prints them), overall and by answer type."""
    from fingrpo.official import tatqa_em_f1

    by_type: dict[str, list[tuple[float, float]]] = {}
    scores = []
    for gold, answer, scale in rows:
        em, f1 = tatqa_em_f1(gold, answer, scale)
        scores.append((em, f1))
        by_type.setdefault(gold["answer_type"], []).append((em, f1))

    def figures(pairs: list[tuple[float, float]]) -> dict:
        n = len(pairs)
        return {"n": n, "exact_match": round(100 * sum(e for e, _ in pairs) / n, 2) if n else 0.0,
                "f1": round(100 * sum(f for _, f in pairs) / n, 2) if n else 0.0}

    return {**figures(scores), "by_answer_type": {k: figures(v) for k, v in sorted(by_type.items())}}


def _json_or_none(path: str | Path) -> Any:
    """The file's JSON value, or None when it is not one JSON document (JSONL, malformed, unreadable):
    :func:`load_predictions` then reads it and names the problem."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def _is_tatqa_official(raw: Any) -> bool:
    return isinstance(raw, dict) and "id" not in raw and bool(raw) and all(
        isinstance(v, list) and len(v) == 2 for v in raw.values()
    )


def load_tatqa_predictions(path: str | Path) -> dict[str, tuple[Any, str]]:
    """The official TAT-QA prediction format ``{"<question uid>": [answer, scale], ...}``."""
    from fingrpo.io import read_json

    raw = read_json(path)
    if not _is_tatqa_official(raw):
        raise DataError(f"{path}: expected the TAT-QA format {{question uid: [answer, scale]}}")
    out = {}
    for uid, (answer, scale) in raw.items():
        if not isinstance(scale, str):
            raise DataError(f"{path}: prediction {uid}: scale: expected a string, got {_type_name(scale)}")
        out[uid] = (answer, scale)
    return out


def score_tatqa_files(predictions_path: str | Path, data_path: str | Path, rel_tol: float = 1e-3,
                      raw: Any = None) -> dict:
    """Score predictions against TAT-QA data: a raw TAT-QA file (every question is a gold question) or
    a prepared file of converted records. Predictions: the official ``{uid: [answer, scale]}`` or the
    project's JSONL (scored in the question's unit unless an entry has a ``scale``). ``raw``: the data
    file's JSON when the caller has read it already.

    Returns ``{"tatqa": {exact_match, f1, n, by_answer_type, ...}, "finqa": {FinQA execution accuracy
    of the converted arithmetic questions that have a prediction}, ...}``.
    """
    from fingrpo.data.tatqa import is_tatqa_file, parse_contexts, to_finqa_records
    from fingrpo.io import read_json
    from fingrpo.official import tatqa_scale_to_num, tatqa_to_number

    raw = read_json(data_path) if raw is None else raw  # score_files hands on what it read
    if is_tatqa_file(raw):
        contexts = parse_contexts(raw, data_path)
        records, _ = to_finqa_records(contexts)
        golds = [q.model_dump() for c in contexts for q in c.questions]
    else:
        records = _load_records(data_path)
        golds = [g for g in (tatqa_gold(r) for r in records) if g is not None]
        if not golds:
            raise DataError(f"{data_path}: no TAT-QA questions (neither the TAT-QA format nor converted records)")
    by_id = {r["id"] if isinstance(r, dict) else r.id: r for r in records}
    finqa_entries: list[dict] = []
    if _is_tatqa_official(_json_or_none(predictions_path)):
        official = load_tatqa_predictions(predictions_path)
        kind, scale_source = "tatqa_official", "prediction"
        rows = [(g, *official.get(g["uid"], (None, None))) for g in golds]
        for g in golds:
            if g["uid"] in official and g["uid"] in by_id:
                answer, scale = official[g["uid"]]
                num = tatqa_to_number(str(answer)) if answer is not None else None
                if num is not None:  # the answer in the question's unit, a percent as a fraction
                    value = num / 100 if scale == "percent" and "%" not in str(answer) else num
                    if scale != "percent":
                        value = value * tatqa_scale_to_num(scale) / tatqa_scale_to_num(g["scale"])
                    finqa_entries.append({"id": g["uid"], "answer": value})
    else:
        entries, kind = load_predictions(predictions_path)
        by_pred = {e["id"]: e for e in entries}
        scale_source = "prediction" if any(isinstance(e.get("scale"), str) for e in entries) else "gold"
        rows = []
        for g in golds:
            entry = by_pred.get(g["uid"])
            if entry is None:
                rows.append((g, None, None))
                continue
            record = by_id.get(g["uid"]) or {"id": g["uid"], "table": [], "qa": {"exe_ans": 0.0, "program": None}}
            scored = score_prediction(entry, record, rel_tol)
            scale = entry.get("scale") if isinstance(entry.get("scale"), str) else None
            rows.append((g, *tatqa_prediction_of(scored, g, scale)))
        finqa_entries = [e for e in entries if e["id"] in by_id]
    finqa = score_predictions(finqa_entries, list(by_id.values()), rel_tol=rel_tol)
    return {
        "tatqa": {**tatqa_scores(rows), "predicted": sum(a is not None for _, a, _ in rows), "scale_source": scale_source},
        "finqa": {k: finqa[k] for k in ("n", "execution_accuracy", "tolerant_accuracy", "program_accuracy", "correct")},
        "converted_questions": len(by_id),
        "predictions_format": kind, "predictions_path": str(predictions_path), "data_path": str(data_path),
    }


def score_files(predictions_path: str | Path, data_path: str | Path, rel_tol: float = 1e-3) -> dict:
    """Score a predictions file against a FinQA split (what ``fingrpo score`` prints); TAT-QA data (a raw
    TAT-QA file, or prepared records) or TAT-QA official predictions go to :func:`score_tatqa_files`.

    >>> score_files("preds.json", "data/finqa/test.json")["execution_accuracy"]   # doctest: +SKIP
    1.0
    """
    from fingrpo.data.tatqa import is_tatqa_file
    from fingrpo.io import read_json

    raw = read_json(data_path)
    if is_tatqa_file(raw) or (isinstance(raw, list) and raw and isinstance(raw[0], dict) and "tatqa" in raw[0]):
        return score_tatqa_files(predictions_path, data_path, rel_tol, raw=raw)
    entries, kind = load_predictions(predictions_path)
    records = _load_records(data_path)
    result = score_predictions(entries, records, rel_tol=rel_tol)
    return {**result, "predictions_format": kind, "predictions_path": str(predictions_path), "data_path": str(data_path)}


# ----------------------------------------------------------------------------------------- harness


def generate_completions(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int, progress: bool = True
) -> list[str]:
    """Greedy completions, ``batch_size`` prompts of similar length at a time (left padding, pad = eos,
    stop at eos), returned in the order of ``prompts``.

    Prompts are tokenized as given; special tokens are added only when a prompt does not already start
    with the tokenizer's bos token (a chat-template prompt already holds its special tokens).

    >>> generate_completions(model, tok, ["<|im_start|>user\\nhi<|im_end|>\\n"], 8, 4)   # doctest: +SKIP
    ['...']
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if not prompts:
        return []
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id  # pad = eos (SmolLM2)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    old_side = tokenizer.padding_side
    old_pad = tokenizer.pad_token
    tokenizer.padding_side = "left"  # decoder-only: every row's next token follows its own prompt
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(prompts)
    # batches of similar length (longest first: a memory problem shows at once), so little is padding;
    # left padding makes a prompt's completion independent of its batch, and the order is restored
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch", disable=not progress):
            rows = order[start : start + batch_size]
            batch = [prompts[i] for i in rows]
            bos = tokenizer.bos_token
            add_special = not (bos and all(p.startswith(bos) for p in batch))
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=add_special)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.inference_mode():
                generated = model.generate(**enc, generation_config=gen_cfg)  # (B, T_prompt + T_new)
            new = generated[:, enc["input_ids"].shape[1] :]  # (B, T_new)
            for i, row in zip(rows, new.tolist()):
                if eos_id is not None and eos_id in row:
                    row = row[: row.index(eos_id)]  # stop at eos; the rest is padding
                out[i] = tokenizer.decode(row, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None
        if was_training:
            model.train()
    return out


def bootstrap_ci(values: Sequence[float], samples: int = 1000, seed: int = 0, level: float = 0.95) -> list[float | None]:
    """Percentile bootstrap interval of the mean (numpy, seeded): ``[lo, hi]``, ``[None, None]`` if empty.

    >>> bootstrap_ci([1.0] * 10)
    [1.0, 1.0]
    """
    import numpy as np

    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return [None, None]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(samples, arr.size))  # (samples, n) resampled indices
    means = arr[idx].mean(axis=1)  # (samples,)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]


_ROW_METRICS = (
    ("execution_accuracy", "correct_official"),
    ("tolerant_accuracy", "correct_tolerant"),
    ("program_accuracy", "program_correct"),
    ("format_rate", "format_ok"),
)


def _metrics(rows: list[dict], samples: int, seed: int) -> dict:
    out: dict[str, Any] = {"n": len(rows)}
    for name, key in _ROW_METRICS:
        vals = [float(bool(r[key])) for r in rows]
        out[name] = _mean(vals) if vals else None
        out[f"{name}_ci"] = bootstrap_ci(vals, samples, seed)
    return out


def _generate_rows(model, tokenizer, examples, records, prompts, rewards, cfg, model_name) -> tuple[list[dict], dict]:
    """Greedy completions of one model for ``records``, each scored (FinQA rules, TAT-QA's for converted
    records) and rewarded: one row per record (what predictions.jsonl holds)."""
    from fingrpo.data.sources import dataset_of
    from fingrpo.official import tatqa_em_f1
    from fingrpo.rewards import score_completions

    ecfg = cfg.evaluate
    completions = generate_completions(model, tokenizer, prompts, ecfg.max_new_tokens, ecfg.batch_size)
    reward = score_completions(rewards, prompts, completions, examples, cfg.rewards.nan_value)
    rows = []
    for i, (rec, completion) in enumerate(zip(records, completions)):
        s = score_prediction({"id": rec.id, "completion": completion}, rec, ecfg.rel_tolerance)
        row = {
            "id": rec.id, "dataset": dataset_of(rec), "model": model_name,
            "completion": completion, "program": s["program"], "answer": s["answer"], "value": s["value"],
            "exe_ans": s["exe_ans"], "correct_official": s["correct_official"],
            "correct_tolerant": s["correct_tolerant"], "program_correct": s["program_correct"],
            "format_ok": s["format_ok"], "error": s["error"],
            "rewards": {name: vals[i] for name, vals in reward.per_function.items()},
            "reward_total": reward.total[i],
        }
        gold = tatqa_gold(rec)
        if gold is not None:
            answer, scale = tatqa_prediction_of(s, gold)
            row["tatqa_exact_match"] = tatqa_em_f1(gold, answer, scale)[0]
            row["tatqa_prediction"] = [answer, scale]
        rows.append(row)
    return rows, dict(reward.failures)


def _set_metrics(rows: list[dict], cfg) -> dict:
    """Accuracies with intervals, reward means and (for TAT-QA records) the official exact match."""
    ecfg = cfg.evaluate
    metrics = _metrics(rows, ecfg.bootstrap_samples, ecfg.bootstrap_seed)
    names = sorted({n for r in rows for n in r["rewards"]})
    metrics["rewards"] = {n: _mean([r["rewards"][n] for r in rows if n in r["rewards"]]) for n in names}
    metrics["reward_total"] = _mean([r["reward_total"] for r in rows])
    tatqa = [r["tatqa_exact_match"] for r in rows if "tatqa_exact_match" in r]
    if tatqa:
        metrics["tatqa_exact_match"] = _mean(tatqa)
        metrics["tatqa_exact_match_ci"] = bootstrap_ci(tatqa, ecfg.bootstrap_samples, ecfg.bootstrap_seed)
    metrics["datasets"] = {d: sum(r["dataset"] == d for r in rows) for d in sorted({r["dataset"] for r in rows})}
    return metrics


SUMMARY_KEYS = ("execution_accuracy", "tolerant_accuracy", "program_accuracy", "format_rate", "reward_total", "n")


def evaluate_from_config(cfg: Any, adapter_dir: str | Path | None = None, base_only: bool = False) -> dict:
    """Greedy evaluation of the adapter (default ``train.output_dir``) and, with
    ``evaluate.compare_base``, of the base model (adapter disabled) under the same harness, on every
    evaluation set (``data.eval_sets``, :func:`fingrpo.data.sources.eval_sets`), each reported apart.
    ``base_only``: the base model alone, no adapter needed (the baseline table of docs/results.md).

    A record that is in several sets (the FinQA dev random subset is part of FinQA dev) is generated
    once per model. Writes ``evaluate.output_path``::

        {"dev": {"finqa_random": {"adapter": {"n", "execution_accuracy", "execution_accuracy_ci": [lo, hi],
                                              "tolerant_accuracy", "program_accuracy", "format_rate" (each + "_ci"),
                                              "rewards": {name: mean}, "reward_total",
                                              "tatqa_exact_match" (TAT-QA records), "datasets": {name: n},
                                              "random_subset": {accuracies on its FinQA random-sample records}},
                                  "base": {...}},
                 "finqa_all": {...}, "tatqa": {...},     # each set also has "retrieval": {recall_at_k, all_gold_at_k}
                 "pooled": {...}},            # every record of the sets marked pooled, once
         "summary": {"dev.finqa_random.adapter.execution_accuracy": ..., ..., "adapter_dir": ..., "model": ...}}

    and ``evaluate.predictions_path`` (JSONL, one row per record and model, with the sets it is in).
    Returns the same dict.
    """
    from fingrpo.data.finqa import make_examples, render_prompt, retrieval_recall
    from fingrpo.data.sources import eval_records, eval_sets, training_pool
    from fingrpo.io import write_json_atomic, write_jsonl_atomic
    from fingrpo.model import load_adapter, load_model_and_tokenizer
    from fingrpo.rewards import build_rewards

    ecfg = cfg.evaluate
    adapter_dir = None if base_only else str(adapter_dir or cfg.train.output_dir)
    # config -> data -> model -> generate + score (each distinct record once per model) -> per-set figures -> write
    rewards = build_rewards(cfg.rewards)
    few_shot = training_pool(cfg)[0] if cfg.prompt.few_shot else None
    base, tokenizer = load_model_and_tokenizer(cfg.model)
    model = base if base_only else load_adapter(base, adapter_dir)
    model.eval()

    sets = eval_sets(cfg)
    members: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (split, set name) -> [(path, record id)]
    random_ids: dict[str, set[str]] = {}
    distinct: dict[tuple[str, str], Any] = {}
    for es in sets:
        records, random_ids[es.path] = eval_records(cfg, es)
        members[es.split, es.name] = [(es.path, r.id) for r in records]
        for r in records:
            distinct.setdefault((es.path, r.id), r)
    keys = list(distinct)
    records = [distinct[k] for k in keys]
    examples = make_examples(records, cfg.prompt, tokenizer, few_shot_records=few_shot)
    prompts = [render_prompt(e, tokenizer, cfg.prompt.use_chat_template) for e in examples]
    variants = [("base" if base_only else "adapter", contextlib.nullcontext)]
    if ecfg.compare_base and not base_only:
        variants.append(("base", model.disable_adapter))  # the same weights, LoRA switched off
    by_model: dict[str, dict[tuple[str, str], dict]] = {}
    failures: dict[str, dict] = {}
    for name, ctx in variants:
        log.info("evaluating %s on %d records of %d sets", name, len(records), len(sets))
        with ctx():
            rows, failures[name] = _generate_rows(model, tokenizer, examples, records, prompts, rewards, cfg, name)
        by_model[name] = dict(zip(keys, rows))

    result: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    pooled_keys: dict[str, list[tuple[str, str]]] = {}
    for es in sets:
        if es.pooled:
            pooled_keys.setdefault(es.split, [])
            pooled_keys[es.split] += [k for k in members[es.split, es.name] if k not in pooled_keys[es.split]]
    groups = [(es.split, es.name, members[es.split, es.name]) for es in sets]
    groups += [(split, "pooled", ks) for split, ks in pooled_keys.items()]
    for split, set_name, set_keys in groups:
        body = result.setdefault(split, {}).setdefault(set_name, {})
        # the lexical retriever (context_mode: retrieved) against the gold facts: what serving would see
        body["retrieval"] = retrieval_recall([distinct[k] for k in set_keys])
        for name, _ in variants:
            metrics = _set_metrics([by_model[name][k] for k in set_keys], cfg)
            metrics["reward_failures"] = failures[name]  # over every record this model generated for
            sample = [k for k in set_keys if k[1] in random_ids.get(k[0], set())]
            if any(random_ids.get(p) for p, _ in set_keys):  # its FinQA random-sample records (the rest are harder)
                sub = [by_model[name][k] for k in sample]
                metrics["random_subset"] = _metrics(sub, ecfg.bootstrap_samples, ecfg.bootstrap_seed)
            body[name] = metrics
            for key in SUMMARY_KEYS + (("tatqa_exact_match",) if "tatqa_exact_match" in metrics else ()):
                summary[f"{split}.{set_name}.{name}.{key}"] = metrics[key]
    member_sets = {k: set(v) for k, v in members.items()}
    out_rows = []
    for name, _ in variants:
        for key in keys:
            path, rid = key
            row = dict(by_model[name][key])
            row["sets"] = [es.name for es in sets if key in member_sets[es.split, es.name]]
            row["split"] = next(es.split for es in sets if key in member_sets[es.split, es.name])
            row["random_subset"] = rid in random_ids.get(path, set())
            out_rows.append(row)
    summary.update({
        "adapter_dir": adapter_dir, "model": cfg.model.name_or_path, "subset": ecfg.subset,
        "sets": {f"{es.split}.{es.name}": {"path": es.path, "n": len(members[es.split, es.name]), "subset": es.subset,
                                           "pooled": es.pooled} for es in sets},
        "prompt": f"{cfg.prompt.context_mode}, {cfg.prompt.few_shot}-shot",
        "max_records": ecfg.max_records,
    })
    result["summary"] = summary
    write_json_atomic(ecfg.output_path, result)
    write_jsonl_atomic(ecfg.predictions_path, out_rows)
    return result


__all__ = [
    "official_match",
    "tolerant_match",
    "program_equivalent",
    "score_prediction",
    "score_predictions",
    "load_predictions",
    "score_files",
    "score_tatqa_files",
    "tatqa_scores",
    "generate_completions",
    "bootstrap_ci",
    "evaluate_from_config",
]
