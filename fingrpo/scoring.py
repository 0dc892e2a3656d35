"""Scoring predictions against gold records: the official FinQA rules (execution and program
accuracy), our tolerant rule, and the official TAT-QA exact match and F1; reading prediction files.

    fingrpo score --predictions preds.json --data data/finqa/test.json   # official or JSONL predictions

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
(default 1e-3, absolute 1e-5 near zero), with a percentage accepted in either unit (x100 or /100),
counting a completion correct when either its executed program or its stated ``Answer:`` matches.

The evaluation harness (:mod:`fingrpo.evaluate`), the trainer's quick evaluation and ``fingrpo score``
all score through :func:`score_prediction`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from fingrpo.answers import normalize_answer, parse_completion, run_program
from fingrpo.data.finqa import load_split
from fingrpo.data.tatqa import (
    is_tatqa_file,
    parse_contexts,
    tatqa_prediction,
    to_finqa_records,
)
from fingrpo.dsl import (
    TABLE_OPS,
    ProgramError,
    RowName,
    Step,
    StepRef,
    format_program,
    parse,
    round_result,
    tokens_to_program,
)
from fingrpo.errors import DataError
from fingrpo.io import read_json, read_jsonl
from fingrpo.official import (
    finqa_equal_program,
    finqa_eval_program,
    finqa_tokenize,
    tatqa_em_f1,
    tatqa_scale_to_num,
    tatqa_to_number,
)

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

    run = run_program(program, table)  # the program's unrounded value (None: absent, does not parse or run)
    steps, raw_value = run.steps, run.value
    value = raw_value
    parse_failed, execute_failed = run.parse_failed, run.execute_failed
    error = run.error or error
    if program is None and error is not None:
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


# eval.json's per-set accuracies -> the predictions.jsonl row field each is the mean of
def mcnemar_p(gained: int, lost: int) -> float:
    """One-sided exact McNemar p-value that the challenger is better: P(X >= gained) for
    X ~ Binomial(gained + lost, 1/2) (the discordant records); 1.0 with no discordant record.

    >>> mcnemar_p(5, 0), mcnemar_p(1, 3) == 15 / 16, mcnemar_p(0, 0)
    (0.03125, True, 1.0)
    """
    n = gained + lost
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(gained, n + 1)) / 2.0 ** n


ROW_METRICS = {
    "execution_accuracy": "correct_official",
    "tolerant_accuracy": "correct_tolerant",
    "program_accuracy": "program_correct",
    "format_rate": "format_ok",
    "tatqa_exact_match": "tatqa_exact_match",
}


def mean_or_zero(values: Sequence[float]) -> float:
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
        "execution_accuracy": mean_or_zero([float(r["correct_official"]) for r in rows]),
        "tolerant_accuracy": mean_or_zero([float(r["correct_tolerant"]) for r in rows]),
        "program_accuracy": mean_or_zero([float(r["program_correct"]) for r in rows]),
        "format_rate": mean_or_zero([float(f) for f in formatted]) if formatted else None,
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

    raw = read_json(data_path) if raw is None else raw  # score_files hands on what it read
    if is_tatqa_file(raw):
        contexts = parse_contexts(raw, data_path)
        records, _ = to_finqa_records(contexts)
        golds = [q.model_dump() for c in contexts for q in c.questions]
    else:
        records = load_split(data_path)
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

    raw = read_json(data_path)
    if is_tatqa_file(raw) or (isinstance(raw, list) and raw and isinstance(raw[0], dict) and "tatqa" in raw[0]):
        return score_tatqa_files(predictions_path, data_path, rel_tol, raw=raw)
    entries, kind = load_predictions(predictions_path)
    records = load_split(data_path)
    result = score_predictions(entries, records, rel_tol=rel_tol)
    return {**result, "predictions_format": kind, "predictions_path": str(predictions_path), "data_path": str(data_path)}


__all__ = [
    "official_match",
    "tolerant_match",
    "program_equivalent",
    "score_prediction",
    "score_predictions",
    "load_predictions",
    "load_tatqa_predictions",
    "score_files",
    "score_tatqa_files",
    "tatqa_scores",
    "mcnemar_p",
]
