"""What a model completion says: its FinQA program and its final answer, and numeric normalisation.

The asked-for format is two lines, in this order::

    Program: subtract(5829, 5735), divide(#0, 5735)
    Answer: 1.6%

    >>> pc = parse_completion("Program: subtract(5829, 5735)\\nAnswer: $94")
    >>> pc.program, pc.answer_text, pc.answer_value, pc.format_ok
    ('subtract(5829, 5735)', '$94', 94.0, True)
    >>> normalize_answer("(1,234.5)"), normalize_answer("-12.5%"), normalize_answer("Yes.")
    (-1234.5, -0.125, 'yes')

Decisions (documented because FinQA itself is not uniform):

- **Percent**: ``34.7%`` (or ``34.7 percent``) normalises to 0.347 — the value the official
  ``str_to_num`` gives and the unit most ``exe_ans`` use (34.7% is stored as 0.34719). A minority of
  records store percent units (24.69% as 24.69136); :func:`fingrpo.scoring.tolerant_match` accepts
  either (×100 / ÷100), the official rule does not.
- **Scale words** (``million``, ``billion``, ``thousand``, ``mn``, ``bn``) are *not* applied: FinQA values
  are in the table's own units (``$ 5.2 million`` in a table "in millions" is 5.2), so ``5.2 million``
  normalises to 5.2.
- **Signs**: ``(12)`` and ``( 12 % )`` are negative (accounting style); unicode minus and dashes before a
  digit count as ``-``.
- **Which number**: text after the last ``=`` if any (``150 - 120 = 30`` -> 30), then the first number in
  it (``25% (from 120 to 150)`` -> 0.25).
- **yes/no**: ``yes``/``true`` -> ``"yes"``, ``no``/``false`` -> ``"no"`` (what ``greater`` returns),
  when the text has no number.

Nothing here raises on garbage: :func:`normalize_answer` returns None, :func:`parse_completion` returns
fields set to None and ``format_ok=False``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

from fingrpo.dsl import OPERATIONS, ProgramError, Step, execute, parse
from fingrpo.errors import FingrpoError

#: Errors a parser or interpreter may raise on garbage text: a bad program, never a crash. Anything else
#: (a real bug) propagates.
GARBAGE_ERRORS = (FingrpoError, ValueError, ArithmeticError, RecursionError, TypeError, IndexError)

MAX_COMPLETION_CHARS = 20_000  # longer text is cut before the regular expressions see it
MAX_ANSWER_CHARS = 2_000

_DASHES = "\u2212\u2012\u2013\u2014\u2010\u2011\ufe63\uff0d"  # unicode minus and dashes
_NUMBER = re.compile(
    r"(?P<open>\(\s*)?"
    r"(?P<sign>[-+]\s*)?"
    r"(?:[$€£¥]\s*)?"
    r"(?P<open2>\(\s*)?"
    r"(?P<sign2>[-+]\s*)?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?P<exp>[eE][-+]?\d+)?"
    r"(?P<pct>\s*(?:%|percent\b|per\s+cent\b|pct\b))?"
    r"(?:\s*(?:million|billion|thousand|trillion|mn|bn|m|b|k)\b)?"
    r"(?P<close>\s*\))?",
    re.IGNORECASE,
)
_YES = re.compile(r"\b(yes|true)\b", re.IGNORECASE)
_NO = re.compile(r"\b(no|false)\b", re.IGNORECASE)


def normalize_answer(text) -> float | str | None:
    """A stated answer as a number (float), ``"yes"``/``"no"``, or None when there is no answer.

    >>> [normalize_answer(t) for t in ["$ 1,234", "3.8 million", "−5", "the answer is 25.3%.", "n/a"]]
    [1234.0, 3.8, -5.0, 0.253, None]
    """
    try:
        return _normalize(text)
    except Exception:  # a normaliser must never take a scoring run down; garbage is "no answer"
        return None


def _normalize(text) -> float | str | None:
    if isinstance(text, bool) or text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    if not isinstance(text, str):
        return None
    s = unicodedata.normalize("NFKC", text[:MAX_ANSWER_CHARS])
    for d in _DASHES:
        s = s.replace(d, "-")
    s = s.strip().strip("*_`\"'").strip()
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    m = _NUMBER.search(s)
    if m is None:
        if _YES.search(s) and not _NO.search(s):
            return "yes"
        if _NO.search(s) and not _YES.search(s):
            return "no"
        return None
    value = float(m.group("num").replace(",", "") + (m.group("exp") or ""))
    negative = (m.group("sign") or m.group("sign2") or "").strip() == "-"
    if (m.group("open") or m.group("open2")) and m.group("close"):
        negative = True  # accounting style: (12) is -12
    if negative:
        value = -value
    if m.group("pct"):
        value = value / 100.0
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class ParsedCompletion:
    """What :func:`parse_completion` found.

    ``program`` is the program text (None if none was found), ``program_ok`` whether it parses,
    ``answer_text``/``answer_value`` the stated answer raw and normalised, ``format_ok`` whether the
    completion followed the asked-for format (``Program:`` line, then ``Answer:`` line, program parses).
    """

    program: str | None
    answer_text: str | None
    answer_value: float | str | None
    format_ok: bool
    program_ok: bool = False
    program_error: str | None = None


_FENCE = re.compile(r"^\s*```[\w-]*\s*$", re.MULTILINE)
_PROGRAM_LINE = re.compile(r"^[ \t>#*_-]*program[ \t*_]*:[ \t*_]*(?P<body>.*)$", re.IGNORECASE | re.MULTILINE)
_ANSWER_LINE = re.compile(
    r"^[ \t>#*_-]*(?:final[ \t]+)?answer[ \t*_]*:[ \t*_]*(?P<body>.*)$", re.IGNORECASE | re.MULTILINE
)
_ANSWER_IS = re.compile(r"\banswer\s+is\s*:?\s*(?P<body>[^\n]+)", re.IGNORECASE)
_OP_START = re.compile(r"\b(?:" + "|".join(sorted(OPERATIONS, key=len, reverse=True)) + r")\s*\(")


def extract_program(text: str) -> str | None:
    """The first run of ``op(...)`` steps in ``text`` (trailing prose dropped), or None.

    >>> extract_program("I think subtract(5, 3), divide(#0, 3) is it. Then add(1, 2)")
    'subtract(5, 3), divide(#0, 3)'
    """
    m = _OP_START.search(text)
    if m is None:
        return None
    start, i = m.start(), m.end()
    while True:
        depth = 1
        while i < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        if depth:  # unbalanced: hand the rest to the parser, which names the problem
            return text[start:].strip()
        end = i
        j = end
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == ",":
            j += 1
            while j < len(text) and text[j] in " \t":
                j += 1
            nxt = _OP_START.match(text, j)
            if nxt:
                i = nxt.end()
                continue
        return text[start:end]


def _clean_answer(body: str) -> str | None:
    body = body.strip().strip("*_`").strip()
    return body or None


def parse_completion(completion) -> ParsedCompletion:
    """Pull the program and the final answer out of a model completion (never raises).

    Tolerated: code fences, extra whitespace or markdown around the labels, trailing prose after the
    program, a missing ``Program:`` label (then ``format_ok`` is False), ``Final answer:``.

    >>> parse_completion("```\\nProgram:  divide(1, 4)  because...\\nAnswer: 25%\\n```").format_ok
    True
    >>> parse_completion("Answer: 3\\nProgram: add(1, 2)").format_ok   # wrong order
    False
    """
    if not isinstance(completion, str):
        return ParsedCompletion(None, None, None, False)
    text = _FENCE.sub("", completion[:MAX_COMPLETION_CHARS])

    program_line = _PROGRAM_LINE.search(text)
    program: str | None = None
    if program_line is not None:
        body = program_line.group("body")
        if not body.strip():  # label alone on its line: the program is on the next non-empty line
            rest = text[program_line.end():].lstrip("\n")
            body = rest.split("\n", 1)[0] if rest else ""
        program = extract_program(body) or (body.strip() or None)

    answer_line = None
    search_from = program_line.end() if program_line is not None else 0
    answer_line = _ANSWER_LINE.search(text, search_from)
    answer_any = answer_line or _ANSWER_LINE.search(text)
    answer_text = _clean_answer(answer_any.group("body")) if answer_any else None
    if answer_text is None:
        said = _ANSWER_IS.search(text)
        answer_text = _clean_answer(said.group("body")) if said else None

    if program is None:  # no label: the first op(...) run before the answer line, anywhere else after
        head = text[: answer_any.start()] if answer_any else text
        program = extract_program(head) or extract_program(text)

    program_ok, program_error = False, None
    if program is not None:
        try:
            parse(program)
            program_ok = True
        except ProgramError as e:
            program_error = str(e)
    format_ok = program_line is not None and answer_line is not None and program_ok and answer_text is not None
    return ParsedCompletion(
        program=program,
        answer_text=answer_text,
        answer_value=normalize_answer(answer_text) if answer_text is not None else None,
        format_ok=format_ok,
        program_ok=program_ok,
        program_error=program_error,
    )


@dataclass(frozen=True)
class ProgramRun:
    """What running a program on a table gave: ``steps`` (None: no program, or it does not parse),
    ``value`` (the unrounded result; None when there is none), ``error`` (the parser's or interpreter's
    message) and which of the two failed."""

    steps: list[Step] | None
    value: float | str | None
    error: str | None = None
    parse_failed: bool = False
    execute_failed: bool = False


def run_program(program: str | None, table: list[list[str]] | None = None) -> ProgramRun:
    """Parse and execute ``program`` on ``table`` (never raises on a bad program).

    >>> run_program("divide(1, 4)").value
    0.25
    >>> run = run_program("divide(1, 0)"); run.value, run.execute_failed
    (None, True)
    >>> run_program("subtract(5").parse_failed
    True
    """
    if program is None:
        return ProgramRun(None, None)
    try:
        steps = parse(program)
    except GARBAGE_ERRORS as e:
        return ProgramRun(None, None, str(e), parse_failed=True)
    try:
        return ProgramRun(steps, execute(steps, table))
    except GARBAGE_ERRORS as e:
        return ProgramRun(steps, None, str(e), execute_failed=True)


def execute_completion(completion: str, table: list[list[str]] | None = None) -> tuple[ParsedCompletion, ProgramRun]:
    """The one way a completion is read and run: :func:`parse_completion`, then its program executed on
    ``table`` (:func:`run_program`). Rewards, scoring, the served model and the trainer's quick evaluation
    all go through here.

    >>> parsed, run = execute_completion("Program: subtract(5829, 5735)\\nAnswer: 94")
    >>> parsed.answer_value, run.value
    (94.0, 94.0)
    """
    parsed = parse_completion(completion)
    return parsed, run_program(parsed.program, table)


__all__ = [
    "GARBAGE_ERRORS",
    "ParsedCompletion",
    "ProgramRun",
    "execute_completion",
    "extract_program",
    "normalize_answer",
    "parse_completion",
    "run_program",
]
