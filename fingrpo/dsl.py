"""The FinQA program language: a parser and interpreter (never ``eval``), following the official
FinQA evaluation script (``czyssrs/FinQA`` ``code/evaluate/evaluate.py``: ``eval_program``,
``str_to_num``, ``process_row``) exactly where a program is valid there.

    >>> execute("subtract(5829, 5735), divide(#0, 5735)")          # unrounded
    0.016390584132519617
    >>> execute("table_sum(total, none)", [["", "2019", "2018"], ["total", "$ 1,200", "$ -200 ( 200 )"]])
    1000.0
    >>> execute("greater(5%, const_1)")
    'no'
    >>> format_program(parse("divide( 5.2 % ,const_100 )"))
    'divide(5.2%, const_100)'

Grammar (whitespace allowed between any two tokens)::

    program  := step ("," step)*
    step     := arith_op "(" value "," value ")" | table_op "(" row_name "," word ")"
    arith_op := add | subtract | multiply | divide | exp | greater
    table_op := table_max | table_min | table_sum | table_average
    value    := "#" k                  # the result of step k (0-based, k < this step's index)
              | "const_" (m1 | number) # const_100 = 100, const_m1 = -1
              | number ["%"]           # 5829, -2, .45, 3.8, 1e3, 5% = 0.05
    row_name := text up to the last top-level comma (may hold spaces, commas and balanced parentheses)

Semantics (as in the official ``eval_program``):

- every operation takes exactly two arguments; ``greater(a, b)`` gives ``"yes"`` if a > b else ``"no"``;
  ``exp(a, b)`` is ``a ** b``; ``const_<n>`` is the number n and ``const_m1`` is -1;
- ``n%`` is n / 100 (a percentage written in a program, as ``str_to_num`` does);
- a table operation's second argument is ignored when executing (FinQA always writes ``none``) but kept
  in the program's text (the program-accuracy rule compares table steps as whole strings);
- a table operation looks its row up by exact name in column 0 (a later row of the same name wins) and
  parses *every* other cell of that row with ``process_row``: drop ``$``, keep what precedes the first
  ``(`` (so ``$ -6129 ( 6129 )`` is -6129), drop commas, ``12%`` is 0.12. A cell that is still not a
  number (``-``, ``n/a``, an empty cell, ``( 12 )``) makes the step fail, as it does officially;
- the result is unrounded here; the official metric rounds it to 5 decimals (:func:`round_result`).

Deviations, all on programs the official script scores as invalid anyway: errors are raised (with the
character ``position`` and the reason) instead of returning ``"n/a"``; a non-finite result (overflow,
``inf``) or a complex power is an error instead of a silently wrong number.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Union

from fingrpo.errors import FingrpoError

ARITHMETIC_OPS = ("add", "subtract", "multiply", "divide", "exp", "greater")
TABLE_OPS = ("table_max", "table_min", "table_sum", "table_average")
OPERATIONS = ARITHMETIC_OPS + TABLE_OPS

MAX_PROGRAM_CHARS = 20_000  # a FinQA program is < 200 chars; far longer text is not a program

# ---------------------------------------------------------------------------------------------- errors


class ProgramError(FingrpoError, ValueError):
    """A FinQA program that cannot be parsed or executed.

    ``.reason`` is the message without the location, ``.position`` the 0-based character offset in the
    program text where the problem is (None when it has no single place, e.g. an empty table).
    """

    def __init__(self, reason: str, position: int | None = None):
        self.reason = reason
        self.position = position
        super().__init__(reason if position is None else f"{reason} (at position {position})")


class ProgramSyntaxError(ProgramError):
    """Not FinQA program syntax: a missing parenthesis or comma, an empty argument, trailing text."""


class UnknownOperationError(ProgramError):
    """An operation name that is not one of :data:`OPERATIONS`."""


class StepReferenceError(ProgramError):
    """``#k`` that does not name an earlier step."""


class MissingRowError(ProgramError):
    """A table operation names a row the table does not have (or there is no table)."""


class DivisionByZeroError(ProgramError):
    """``divide(a, 0)`` (or a zero power of a negative exponent)."""


class ArgumentError(ProgramError):
    """Wrong argument kind or count, a non-numeric table cell, ``yes``/``no`` used as a number, overflow."""


# ---------------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Number:
    """A literal number as written (``text``, whitespace removed) and its value (``5%`` -> 0.05)."""

    text: str
    value: float = field(compare=False)
    position: int | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Const:
    """``const_<name>``: ``const_100`` (name ``"100"``) is 100.0, ``const_m1`` is -1.0."""

    name: str
    position: int | None = field(default=None, compare=False, repr=False)

    @property
    def value(self) -> float:
        return -1.0 if self.name == "m1" else float(self.name)

    def __str__(self) -> str:
        return f"const_{self.name}"


@dataclass(frozen=True)
class StepRef:
    """``#k``: the result of step k (0-based)."""

    index: int
    position: int | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"#{self.index}"


@dataclass(frozen=True)
class RowName:
    """A table row name (first argument of a table operation) or its second word (``none``)."""

    name: str
    position: int | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return self.name


Arg = Union[Number, Const, StepRef, RowName]


@dataclass(frozen=True)
class Step:
    """One operation: ``Step("subtract", (Number("5829", 5829.0), Number("5735", 5735.0)))``."""

    op: str
    args: tuple[Arg, ...]
    position: int | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.op}({', '.join(str(a) for a in self.args)})"


# --------------------------------------------------------------------------------------------- parsing

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STEP_REF = re.compile(r"#(\d+)")
_CONST = re.compile(r"const_(m1|\d+(?:\.\d+)?)")
# what Python's float() accepts from FinQA programs, plus an optional percent sign
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?%?")


class _Parser:
    """Recursive descent over the characters of one program; every error carries its offset."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0

    # -- helpers
    def _ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def _peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def _found(self) -> str:
        return repr(self.s[self.i]) if self.i < len(self.s) else "the end of the program"

    def _expect(self, ch: str, what: str) -> None:
        self._ws()
        if self._peek() != ch:
            raise ProgramSyntaxError(f"expected {ch!r} {what}, found {self._found()}", self.i)
        self.i += 1

    # -- grammar
    def program(self) -> list[Step]:
        if len(self.s) > MAX_PROGRAM_CHARS:
            raise ProgramSyntaxError(f"program is {len(self.s)} characters long (limit {MAX_PROGRAM_CHARS})", 0)
        self._ws()
        if self.i >= len(self.s):
            raise ProgramSyntaxError("empty program", 0)
        steps: list[Step] = []
        while True:
            steps.append(self.step(len(steps)))
            self._ws()
            if self.i >= len(self.s):
                return steps
            if self._peek() != ",":
                raise ProgramSyntaxError(f"expected ',' between steps or the end of the program, found {self._found()}", self.i)
            self.i += 1
            self._ws()

    def step(self, index: int) -> Step:
        start = self.i
        m = _NAME.match(self.s, self.i)
        if not m:
            raise ProgramSyntaxError(f"expected an operation name, found {self._found()}", self.i)
        op = m.group()
        self.i = m.end()
        self._ws()
        if self._peek() != "(":
            raise ProgramSyntaxError(f"expected '(' after {op!r}, found {self._found()}", self.i)
        if op not in OPERATIONS:
            raise UnknownOperationError(f"unknown operation {op!r} (known: {', '.join(OPERATIONS)})", start)
        self.i += 1
        if op in TABLE_OPS:
            args = self.table_args(op)
        else:
            args = self.value_args(op, index)
        return Step(op, args, start)

    def value_args(self, op: str, index: int) -> tuple[Arg, ...]:
        args = [self.value(op, index)]
        self._ws()
        if self._peek() == ")":
            raise ArgumentError(f"{op} takes 2 arguments, got 1", self.i)
        self._expect(",", f"between the arguments of {op}")
        args.append(self.value(op, index))
        self._ws()
        if self._peek() == ",":
            raise ArgumentError(f"{op} takes 2 arguments, got more", self.i)
        self._expect(")", f"to close {op}(")
        return tuple(args)

    def value(self, op: str, index: int) -> Arg:
        self._ws()
        start = self.i
        while self.i < len(self.s) and self.s[self.i] not in ",()":
            self.i += 1
        text = self.s[start : self.i].strip()
        if self._peek() == "(":
            raise ProgramSyntaxError(
                f"unexpected '(' in an argument of {op}: operations do not nest, refer to an earlier step with #k",
                self.i,
            )
        if not text:
            raise ProgramSyntaxError(f"missing argument of {op}", start)
        if m := _STEP_REF.fullmatch(text):
            digits = m.group(1).lstrip("0") or "0"
            if len(digits) > 9:  # no program has 10**9 steps; int() of > 4300 digits would raise ValueError
                raise StepReferenceError(f"#{digits[:12]}... refers to step {digits[:12]}... but only {index} steps precede it", start)
            k = int(digits)
            if k >= index:
                raise StepReferenceError(
                    f"#{k} refers to step {k} but only {index} step{'s' if index != 1 else ''} precede{'s' if index == 1 else ''} it",
                    start,
                )
            return StepRef(k, start)
        if text.startswith("const_"):
            if not _CONST.fullmatch(text):
                raise ArgumentError(f"unknown constant {text!r} (const_<number> or const_m1)", start)
            return Const(text[len("const_"):], start)
        compact = re.sub(r"\s+", "", text)  # "5 %" -> "5%", as float() tolerates the space
        if _NUMBER.fullmatch(compact):
            return Number(compact, _number_value(compact, start), start)
        if text.startswith("#"):
            raise StepReferenceError(f"bad step reference {text!r} (expected #<step index>)", start)
        raise ArgumentError(
            f"{op} takes numbers, const_<n> or #k, got {text!r}" + (" (a row name goes in a table_* operation)" if text[0].isalpha() else ""),
            start,
        )

    def table_args(self, op: str) -> tuple[Arg, ...]:
        # The row name may hold commas and balanced parentheses: find the closing ')' of this step,
        # then split at the last comma outside any parentheses ("total (in millions), none").
        start = self.i
        depth, last_comma, j = 0, None, self.i
        while j < len(self.s):
            c = self.s[j]
            if c == "(":
                depth += 1
            elif c == ")":
                if depth == 0:
                    break
                depth -= 1
            elif c == "," and depth == 0:
                last_comma = j
            j += 1
        else:
            raise ProgramSyntaxError(f"missing ')' to close {op}(", start - 1)
        if last_comma is None:
            raise ArgumentError(f"{op} takes 2 arguments (row name, none), got 1", start)
        row_text = self.s[start:last_comma]
        row = row_text.strip()
        row_pos = start + len(row_text) - len(row_text.lstrip())
        word_text = self.s[last_comma + 1 : j]
        word = word_text.strip()
        word_pos = last_comma + 1 + len(word_text) - len(word_text.lstrip())
        if not row:
            raise ProgramSyntaxError(f"missing row name in {op}", start)
        if not word:
            raise ProgramSyntaxError(f"missing second argument of {op} (FinQA writes 'none')", last_comma + 1)
        if _STEP_REF.fullmatch(row):
            raise ArgumentError(f"{op} takes a table row name, not a step reference {row!r}", row_pos)
        self.i = j + 1
        return (RowName(row, row_pos), RowName(word, word_pos))


def _number_value(text: str, position: int | None) -> float:
    """Official ``str_to_num`` on a literal that matched ``_NUMBER``: ``5%`` -> 5 / 100."""
    value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    if not math.isfinite(value):
        raise ArgumentError(f"number {text!r} is too large", position)
    return value


def parse(program: str) -> list[Step]:
    """Parse a FinQA program into steps; raises a :class:`ProgramError` subclass naming the position.

    >>> parse("subtract(5829, 5735), divide(#0, const_100)")[1]
    Step(op='divide', args=(StepRef(index=0), Const(name='100')))
    """
    if not isinstance(program, str):
        raise ProgramSyntaxError(f"a program is text, got {type(program).__name__}")
    return _Parser(program).program()


def format_program(steps: list[Step]) -> str:
    """Canonical text ``op(a, b), op(#0, c)``; ``parse(format_program(s)) == s``.

    >>> format_program(parse("add( 1 ,2 ),divide(#0,3)"))
    'add(1, 2), divide(#0, 3)'
    """
    return ", ".join(str(s) for s in steps)


def _as_steps(program: str | list[Step]) -> tuple[list[Step], str | None]:
    if isinstance(program, str):
        return parse(program), program
    return list(program), None


# ------------------------------------------------------------------------------------------- execution


def str_to_num(text: str) -> float | None:
    """The official ``str_to_num`` (None for its ``"n/a"``): ``"1,234"`` -> 1234.0, ``"5%"`` -> 0.05.

    Used on table cells, as the official script does; it relies on Python's ``float()`` (never ``eval``).
    """
    text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        pass
    if "%" in text:
        try:
            return float(text.replace("%", "")) / 100.0
        except ValueError:
            return None
    if "const" in text:
        text = text.replace("const_", "")
        try:
            return -1.0 if text == "m1" else float(text)
        except ValueError:
            return None
    return None


def parse_cell(cell: str) -> float | None:
    """One table cell as the official ``process_row`` reads it (None: not a number).

    >>> parse_cell("$ -6129 ( 6129 )"), parse_cell("12.5% ( 12.5 % )"), parse_cell("-")
    (-6129.0, 0.125, None)
    """
    text = cell.replace("$", "").strip()
    text = text.split("(")[0].strip()
    value = str_to_num(text)
    if value is None or not math.isfinite(value):
        return None
    return value


def _table_row(table, step: Step) -> list[float]:
    row_name = step.args[0]
    assert isinstance(row_name, RowName)
    if table is None:
        raise MissingRowError(f"{step.op} needs a table and none was given", row_name.position)
    rows: dict[str, list] = {}
    for row in table:
        if isinstance(row, (list, tuple)) and row and isinstance(row[0], str):
            rows[row[0]] = list(row[1:])  # a later row of the same name wins, as in the official dict
    if row_name.name not in rows:
        close = difflib.get_close_matches(row_name.name, list(rows), n=1, cutoff=0.6)
        hint = f"; closest row is {close[0]!r}" if close else ""
        raise MissingRowError(f"{step.op}: no table row named {row_name.name!r}{hint}", row_name.position)
    cells = rows[row_name.name]
    if not cells:
        raise ArgumentError(f"{step.op}: table row {row_name.name!r} has no cells", row_name.position)
    values = []
    for col, cell in enumerate(cells, 1):
        value = parse_cell(cell) if isinstance(cell, str) else None
        if value is None:
            raise ArgumentError(
                f"{step.op}: table row {row_name.name!r} column {col} cell {cell!r} is not a number", row_name.position
            )
        values.append(value)
    return values


def _operand(arg: Arg, results: list, step: Step) -> float:
    if isinstance(arg, StepRef):
        if arg.index >= len(results):
            raise StepReferenceError(f"#{arg.index} refers to a step that has not run yet", arg.position)
        value = results[arg.index]
        if isinstance(value, str):
            raise ArgumentError(f"{step.op} got #{arg.index} = {value!r}, a comparison result, not a number", arg.position)
        return value
    if isinstance(arg, (Number, Const)):
        return arg.value
    raise ArgumentError(f"{step.op} takes numbers, const_<n> or #k, got row name {arg.name!r}", arg.position)


def _run_step(step: Step, results: list, table) -> float | str:
    if step.op in TABLE_OPS:
        values = _table_row(table, step)
        if step.op == "table_max":
            return max(values)
        if step.op == "table_min":
            return min(values)
        if step.op == "table_sum":
            return sum(values)
        return sum(values) / len(values)
    if len(step.args) != 2:
        raise ArgumentError(f"{step.op} takes 2 arguments, got {len(step.args)}", step.position)
    a, b = (_operand(x, results, step) for x in step.args)
    try:
        if step.op == "add":
            value = a + b
        elif step.op == "subtract":
            value = a - b
        elif step.op == "multiply":
            value = a * b
        elif step.op == "divide":
            value = a / b
        elif step.op == "exp":
            value = a**b
        elif step.op == "greater":
            return "yes" if a > b else "no"
        else:
            raise UnknownOperationError(f"unknown operation {step.op!r}", step.position)
    except ZeroDivisionError:
        raise DivisionByZeroError(f"{step} divides by zero", step.position) from None
    except OverflowError:
        raise ArgumentError(f"{step} overflows", step.position) from None
    if isinstance(value, complex):
        raise ArgumentError(f"{step} has no real result", step.position)
    if not math.isfinite(value):
        raise ArgumentError(f"{step} overflows (result {value})", step.position)
    return value


def execute(program: str | list[Step], table: list[list[str]] | None = None) -> float | str:
    """Run a program (text or parsed steps) on a FinQA ``table``; the last step's unrounded result.

    >>> execute("divide(const_1000, 8), greater(#0, 100)")
    'yes'
    """
    steps, _ = _as_steps(program)
    if not steps:
        raise ProgramSyntaxError("empty program", 0)
    results: list[float | str] = []
    for index, step in enumerate(steps):
        if step.op not in OPERATIONS:
            raise UnknownOperationError(f"unknown operation {step.op!r}", step.position)
        for arg in step.args:
            if isinstance(arg, StepRef) and arg.index >= index:
                raise StepReferenceError(f"step {index} refers to #{arg.index}, which does not precede it", arg.position)
        results.append(_run_step(step, results, table))
    return results[-1]


def round_result(value: float | str) -> float | str:
    """The official rounding of a final result: 5 decimals; ``"yes"``/``"no"`` unchanged."""
    return value if isinstance(value, str) else round(value, 5)


# ------------------------------------------------------------------------------- official token format


def program_to_tokens(program: str | list[Step]) -> list[str]:
    """The official prediction format: four tokens per step, then ``EOF``.

    >>> program_to_tokens("subtract(5829, 5735), divide(#0, 5735)")
    ['subtract(', '5829', '5735', ')', 'divide(', '#0', '5735', ')', 'EOF']
    """
    steps, _ = _as_steps(program)
    tokens: list[str] = []
    for step in steps:
        tokens += [f"{step.op}(", *(str(a) for a in step.args), ")"]
    return tokens + ["EOF"]


_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?%?")


def tokens_to_program(tokens: list[str]) -> str:
    """Official token list -> program text (tokens after the first ``EOF`` are ignored).

    The structure check is the official one (an operation token ``op(`` every 4 tokens, ``)`` closing
    each group); ``1,234`` as one token is read as 1234, as ``str_to_num`` does.

    >>> tokens_to_program(["table_max(", "net sales", "none", ")", "divide(", "#0", "const_100", ")", "EOF"])
    'table_max(net sales, none), divide(#0, const_100)'
    """
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) for t in tokens):
        raise ProgramSyntaxError("a predicted program is a list of string tokens")
    toks = [t.strip() for t in tokens]
    if "EOF" in toks:
        toks = toks[: toks.index("EOF")]
    if not toks:
        raise ProgramSyntaxError("empty program (no tokens before EOF)")
    if len(toks) % 4:
        raise ProgramSyntaxError(f"{len(toks)} tokens before EOF: expected groups of 4 (op(, arg, arg, ))")
    parts = []
    for g in range(0, len(toks), 4):
        op_tok, a1, a2, close = toks[g : g + 4]
        if not op_tok.endswith("(") or op_tok[:-1].strip() not in OPERATIONS:
            raise UnknownOperationError(f"token {g}: {op_tok!r} is not an operation token like 'add('")
        if close != ")":
            raise ProgramSyntaxError(f"token {g + 3}: expected ')', found {close!r}")
        a1, a2 = (t.replace(",", "") if _THOUSANDS.fullmatch(t) else t for t in (a1, a2))
        parts.append(f"{op_tok[:-1].strip()}({a1}, {a2})")
    return ", ".join(parts)


__all__ = [
    "ARITHMETIC_OPS",
    "TABLE_OPS",
    "OPERATIONS",
    "ProgramError",
    "ProgramSyntaxError",
    "UnknownOperationError",
    "StepReferenceError",
    "MissingRowError",
    "DivisionByZeroError",
    "ArgumentError",
    "Number",
    "Const",
    "StepRef",
    "RowName",
    "Arg",
    "Step",
    "parse",
    "format_program",
    "execute",
    "round_result",
    "str_to_num",
    "parse_cell",
    "program_to_tokens",
    "tokens_to_program",
]
