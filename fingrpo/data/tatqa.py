"""TAT-QA (Zhu et al., ACL 2021): typed records, loading, and conversion to FinQA-shaped records.

    from fingrpo.data.tatqa import load_tatqa, to_finqa_records, split_by_table

    contexts = load_tatqa("data/tatqa/tatqa_dataset_dev.json")      # 278 contexts, 1,668 questions
    records, report = to_finqa_records(contexts)                    # FinQA-shaped dicts + what was dropped
    train, dev = split_by_table(contexts, dev_fraction=0.2, seed=0)

A TAT-QA context is one table and its paragraphs with several questions; each ``arithmetic`` question
whose ``derivation`` (an infix expression such as ``(44.1-42.6)/42.6``) converts to a FinQA program
that reproduces its answer becomes one FinQA-shaped record, so that prompts, rewards, the trainer and
evaluation serve it unchanged (:func:`fingrpo.data.finqa.parse_record` accepts it):

- ``pre_text``: the paragraphs in their ``order``; ``post_text``: empty;
- ``table``: one header row (multi-row headers merged column by column), empty rows dropped, and
  accounting negatives ``(3.1)`` written the FinQA way, ``-3.1 ( 3.1 )``, so the table operations
  read them as -3.1; ``table_ori``: the TAT-QA table as it was;
- ``qa.program``: the derivation in post-order steps (``#k`` for step k); a number not in the context
  that is a whole number becomes ``const_N`` (FinQA's convention, e.g. ``divide(#0, const_2)``);
  ``qa.exe_ans``: that program executed and rounded to 5 decimals;
- ``qa.gold_inds``: the paragraphs named in ``rel_paragraphs`` and the table rows that hold a number of
  the derivation (TAT-QA does not annotate rows);
- ``tatqa``: the question's ``uid``, ``answer``, ``scale``, ``answer_type``, ``answer_from``,
  ``derivation``, the table's ``uid`` (TAT-QA scoring reads them); ``dataset``: ``"tatqa"``.

**Percent convention.** A TAT-QA ``percent`` answer 3.52 means 3.52 %. The converted program computes
the *fraction* (0.0352: FinQA's own convention, and what the prompt asks for); a derivation that
stops at the fraction is kept, one that multiplies by 100 gets a final ``divide(#k, const_100)``. A
program's value ``v`` is read as the TAT-QA prediction ``[v * 100, "percent"]`` for a percent question
and ``[v, scale]`` otherwise (the report's unit: a FinQA-style program does not predict the scale),
:func:`tatqa_prediction`. FinQA's execution accuracy compares ``v`` with ``exe_ans`` (the fraction);
TAT-QA's EM compares ``[v * 100, "percent"]`` with the answer under its rules: the two agree on every
converted question by construction (a program that does not reproduce its answer is not converted).

Every question that is not converted is counted by reason in the report (:class:`ConversionReport`):
``span``, ``multi-span``, ``count`` (not arithmetic), ``derivation_unparseable``, ``no_operation``
(the derivation is one number), ``not_reproduced`` (the program runs but does not give the answer
under the TAT-QA rule), ``execution_error``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError

from fingrpo.data.finqa import _describe, _json_type, table_row_to_text
from fingrpo.dsl import ProgramError, execute, round_result
from fingrpo.errors import DataError
from fingrpo.io import read_json
from fingrpo.official import finqa_eval_program, finqa_tokenize, tatqa_match

ANSWER_TYPES = ("span", "multi-span", "arithmetic", "count")
SCALES = ("", "thousand", "million", "billion", "percent")
DROP_REASONS = ("span", "multi-span", "count", "derivation_unparseable", "no_operation", "not_reproduced",
                "execution_error")

# ---------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------


class TatQATable(BaseModel):
    model_config = ConfigDict(extra="allow")

    uid: StrictStr
    table: list[list[StrictStr]]


class TatQAParagraph(BaseModel):
    model_config = ConfigDict(extra="allow")

    uid: StrictStr
    order: StrictInt
    text: StrictStr


class TatQAQuestion(BaseModel):
    """One question. ``answer``: a list of strings (span, multi-span) or a number (arithmetic, count)."""

    model_config = ConfigDict(extra="allow")

    uid: StrictStr
    order: StrictInt
    question: StrictStr
    answer: list[StrictStr] | StrictInt | float | StrictStr
    derivation: StrictStr
    answer_type: Literal["span", "multi-span", "arithmetic", "count"]
    answer_from: Literal["table", "text", "table-text"]
    rel_paragraphs: list[StrictStr]
    req_comparison: StrictBool
    scale: Literal["", "thousand", "million", "billion", "percent"]


class TatQAContext(BaseModel):
    """One table, its paragraphs and the questions asked about them."""

    model_config = ConfigDict(extra="allow")

    table: TatQATable
    paragraphs: list[TatQAParagraph]
    questions: list[TatQAQuestion]


def parse_context(raw: Any, *, source: str = "<tatqa>", index: int = 0) -> TatQAContext:
    """Validate one context; a problem raises a one-line :class:`DataError` naming the file, the
    question uid (or the context and its table uid) and the field."""
    if not isinstance(raw, dict):
        raise DataError(f"{source}: context {index}: expected a JSON object, got {_json_type(raw)}")
    table = raw.get("table")
    tuid = table.get("uid") if isinstance(table, dict) else None
    where = f"{source}: context {index}" + (f" (table {tuid})" if isinstance(tuid, str) else "")
    questions = raw.get("questions")
    if isinstance(questions, list):  # question problems first: they name the question uid
        for qi, q in enumerate(questions):
            if not isinstance(q, dict):
                raise DataError(f"{where}: questions[{qi}]: expected a JSON object, got {_json_type(q)}")
            try:
                TatQAQuestion.model_validate(q)
            except ValidationError as e:
                loc, msg = _describe(e.errors()[0])
                uid = q.get("uid")
                who = f"question {uid}" if isinstance(uid, str) else f"questions[{qi}]"
                raise DataError(f"{source}: {who}: {loc}: {msg}") from None
    try:
        return TatQAContext.model_validate(raw)
    except ValidationError as e:
        loc, msg = _describe(e.errors()[0])
        raise DataError(f"{where}: {loc}: {msg}") from None


def load_tatqa(path: str | Path) -> list[TatQAContext]:
    """Load a file in the TAT-QA format (a JSON list of contexts).

    Raises :class:`DataError` for a missing/empty/malformed file, a non-list top level, no contexts, a
    missing or wrong-typed field, or a question uid that appears twice.
    """
    return parse_contexts(read_json(path), path)


def parse_contexts(raw: Any, path: str | Path) -> list[TatQAContext]:
    """:func:`load_tatqa` of JSON already read from ``path`` (named in the errors)."""
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of TAT-QA contexts at the top level, got {_json_type(raw)}")
    if not raw:
        raise DataError(f"{path}: the file has no contexts")
    contexts = [parse_context(item, source=str(path), index=i) for i, item in enumerate(raw)]
    seen: dict[str, int] = {}
    for i, ctx in enumerate(contexts):
        for q in ctx.questions:
            if q.uid in seen:
                raise DataError(f"{path}: question {q.uid}: uid: duplicate uid (first in context {seen[q.uid]})")
            seen[q.uid] = i
    return contexts


# ---------------------------------------------------------------------------------------------------
# Derivations -> FinQA programs
# ---------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*\$?\s*(?:(?P<num>\$?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+)\s*%?)|(?P<op>[-+*/×x])|(?P<open>[(\[])|(?P<close>[)\]]))")


@dataclass
class _Num:
    text: str  # as a FinQA argument: no "$" or commas; a "%" kept (the DSL reads 5% as 0.05)
    value: float
    paren: bool = False  # written as "(71)": an accounting negative, or just brackets


@dataclass
class _Neg:
    operand: Any


@dataclass
class _Bin:
    op: str
    left: Any
    right: Any


_OPS = {"+": "add", "-": "subtract", "*": "multiply", "×": "multiply", "x": "multiply", "/": "divide"}


class _DerivationParser:
    """``expr := term (("+"|"-") term)*; term := factor (("*"|"/") factor)*;
    factor := ("-"|"+") factor | number | "(" expr ")" | "[" expr "]"``."""

    def __init__(self, text: str):
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise ValueError(f"unexpected {text[pos:pos + 12]!r} at position {pos}")
            kind = m.lastgroup
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
            while pos < len(text) and text[pos].isspace():
                pos += 1
        self.i = 0

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def parse(self):
        node = self.expr()
        if self._peek() is not None:
            raise ValueError(f"trailing {self._peek()[1]!r}")
        return node

    def expr(self):
        node = self.term()
        while (t := self._peek()) and t[0] == "op" and t[1] in "+-":
            self.i += 1
            node = _Bin(_OPS[t[1]], node, self.term())
        return node

    def term(self):
        node = self.factor()
        while (t := self._peek()) and t[0] == "op" and t[1] in "*/×x":
            self.i += 1
            node = _Bin(_OPS[t[1]], node, self.factor())
        return node

    def factor(self):
        t = self._peek()
        if t is None:
            raise ValueError("expression ends early")
        self.i += 1
        kind, text = t
        if kind == "op" and text in "+-":
            inner = self.factor()
            return _Neg(inner) if text == "-" else inner
        if kind == "num":
            compact = re.sub(r"[\s$,]", "", text)
            value = float(compact.rstrip("%")) / (100.0 if compact.endswith("%") else 1.0)
            return _Num(compact, value)
        if kind == "open":
            inner = self.expr()
            close = self._peek()
            if close is None or close[0] != "close":
                raise ValueError("unbalanced brackets")
            self.i += 1
            if isinstance(inner, _Num):
                inner = _Num(inner.text, inner.value, paren=True)
            return inner
        raise ValueError(f"unexpected {text!r}")


def parse_derivation(derivation: str):
    """Parse a TAT-QA arithmetic derivation into an expression tree (ValueError when it is not one)."""
    return _DerivationParser(derivation).parse()


@dataclass
class _Program:
    steps: list[str] = field(default_factory=list)
    nested: str = ""


def _to_program(node, context_numbers: set[float], paren_negative: bool) -> tuple[_Program, str, str]:
    """Post-order steps; returns (program so far, this node's argument text, its nested text)."""
    prog = _Program()

    def arg(n) -> tuple[str, str]:
        if isinstance(n, _Num):
            negative = paren_negative and n.paren
            value = -n.value if negative else n.value
            text = ("-" + n.text) if negative else n.text
            if not n.text.endswith("%") and value >= 0 and value == int(value) and abs(value) not in context_numbers:
                text = f"const_{int(value)}"  # a constant of the derivation (e.g. /2 for an average)
            return text, text
        if isinstance(n, _Neg):
            if isinstance(n.operand, _Num):
                inner, _ = arg(n.operand)
                if inner.startswith("const_"):
                    inner = inner[len("const_"):]
                text = inner[1:] if inner.startswith("-") else "-" + inner
                return text, text
            a, nested = arg(n.operand)
            prog.steps.append(f"multiply({a}, const_m1)")
            return f"#{len(prog.steps) - 1}", f"multiply({nested}, const_m1)"
        a, na = arg(n.left)
        b, nb = arg(n.right)
        prog.steps.append(f"{n.op}({a}, {b})")
        return f"#{len(prog.steps) - 1}", f"{n.op}({na}, {nb})"

    top, nested = arg(node)
    prog.nested = nested
    return prog, top, nested


# ---------------------------------------------------------------------------------------------------
# Tables and facts
# ---------------------------------------------------------------------------------------------------

_ACCOUNTING = re.compile(r"^\s*(\$)?\s*\(\s*(\$)?\s*(\d[\d,]*(?:\.\d+)?|\.\d+)\s*(%)?\s*\)\s*(%)?\s*$")
_YEAR = re.compile(r"^(?:19|20)\d\d$")
_CELL_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def finqa_cell(cell: str) -> str:
    """A TAT-QA cell as FinQA writes it: an accounting negative ``(3.1)`` -> ``-3.1 ( 3.1 )``.

    >>> finqa_cell("(3.1)"), finqa_cell("$ (1,200)"), finqa_cell("(12.5%)"), finqa_cell("4,250")
    ('-3.1 ( 3.1 )', '$ -1,200 ( 1,200 )', '-12.5% ( 12.5% )', '4,250')
    """
    m = _ACCOUNTING.match(cell)
    if not m:
        return cell.strip()
    dollar = "$ " if (m.group(1) or m.group(2)) else ""
    pct = "%" if (m.group(4) or m.group(5)) else ""
    num = m.group(3)
    return f"{dollar}-{num}{pct} ( {num}{pct} )"


def _is_label(cell: str) -> bool:
    """A header cell: a year, text, or a unit marker (``$'000``, ``%``), not a data number."""
    cell = cell.strip()
    return bool(_YEAR.match(cell) or re.search(r"[A-Za-z]", cell) or "'" in cell or not re.search(r"\d", cell))


def _is_header_row(row: Sequence[str]) -> bool:
    """A leading row of column labels: no data number, and either no row name or a label in every column."""
    cells = [c.strip() for c in row[1:]]
    if not all(_is_label(c) for c in cells if c):
        return False
    return not row[0].strip() or all(cells)


def convert_table(table: Sequence[Sequence[str]]) -> list[list[str]]:
    """TAT-QA table -> FinQA table: one header row (the leading rows with an empty first cell and no
    data cell, merged column by column), empty rows dropped, accounting negatives rewritten.

    >>> convert_table([["", "2019", "2018"], ["", "$'000", "$'000"], ["Revenue", "(3.1)", "4"], ["", "", ""]])
    [['', "2019 $'000", "2018 $'000"], ['Revenue', '-3.1 ( 3.1 )', '4']]
    """
    rows = [[c if isinstance(c, str) else str(c) for c in r] for r in table if any(str(c).strip() for c in r)]
    if not rows:
        return []
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    n_head = 1
    while n_head < len(rows) - 1 and _is_header_row(rows[n_head]):
        n_head += 1
    head_rows = []
    for r in rows[:n_head]:
        filled = [j for j in range(1, width) if r[j].strip()]
        if len(filled) == 1 and width > 2:  # one label over several columns ("Years Ended December 31,")
            r = [r[0]] + [r[filled[0]]] * (width - 1)
        head_rows.append(r)
    header = [" ".join(r[j].strip() for r in head_rows if r[j].strip()) for j in range(width)]
    return [header] + [[r[0].strip()] + [finqa_cell(c) for c in r[1:]] for r in rows[n_head:]]


def _numbers_in(text: str) -> set[float]:
    out = set()
    for m in _CELL_NUMBER.finditer(text):
        try:
            out.add(abs(float(m.group().replace(",", ""))))
        except ValueError:
            continue
    return out


def _leaves(node) -> list[_Num]:
    if isinstance(node, _Num):
        return [node]
    if isinstance(node, _Neg):
        return _leaves(node.operand)
    return _leaves(node.left) + _leaves(node.right)


# ---------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------


def tatqa_prediction(value: float | str, scale: str) -> tuple[Any, str]:
    """A program's value as a TAT-QA prediction ``[answer, scale]`` (the percent convention above).

    >>> tatqa_prediction(0.03521, "percent"), tatqa_prediction(3499.0, "thousand")
    ((3.521, 'percent'), (3499.0, 'thousand'))
    """
    if isinstance(value, str):
        return value, scale
    if scale == "percent":
        return round(value * 100.0, 8), "percent"
    return value, scale


@dataclass
class ConversionReport:
    """What :func:`to_finqa_records` did, question by question (JSON-ready with :meth:`to_dict`)."""

    contexts: int = 0
    questions: int = 0
    converted: int = 0
    by_answer_type: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in DROP_REASONS})
    dropped_examples: dict[str, list[str]] = field(default_factory=dict)
    percent_divided: int = 0  # derivations in percent units that got a final divide(#k, const_100)
    paren_negative: int = 0  # derivations whose "(71)" had to be read as an accounting negative
    facts_missing: int = 0  # converted questions with no supporting fact found

    def drop(self, reason: str, uid: str) -> None:
        self.dropped[reason] += 1
        examples = self.dropped_examples.setdefault(reason, [])
        if len(examples) < 5:
            examples.append(uid)

    def to_dict(self) -> dict:
        return {
            "contexts": self.contexts, "questions": self.questions, "converted": self.converted,
            "by_answer_type": self.by_answer_type, "dropped": self.dropped, "dropped_examples": self.dropped_examples,
            "percent_divided": self.percent_divided, "paren_negative": self.paren_negative,
            "facts_missing": self.facts_missing,
            "percent_convention": "programs compute the fraction (3.52 % -> 0.0352); TAT-QA scores [v * 100, 'percent']",
        }


def reproduces_answer(value: float | str, gold: dict) -> bool:
    """Whether a program's (unrounded) value gives the TAT-QA answer of ``gold`` (``answer``,
    ``answer_type``, ``scale``) under the official rule, read with the percent convention; what
    conversion keeps and what validation's ``tatqa_program_reproduces_answer`` checks."""
    pred, scale = tatqa_prediction(value, gold["scale"])
    return tatqa_match(gold, pred, scale)[0] == 1.0


def _convert_question(q: TatQAQuestion, table: list[list[str]], context_numbers: set[float], report: ConversionReport):
    """(program, nested program, value) or the drop reason."""
    try:
        tree = parse_derivation(q.derivation)
    except ValueError:
        return "derivation_unparseable"
    if isinstance(tree, _Num) or (isinstance(tree, _Neg) and isinstance(tree.operand, _Num)):
        return "no_operation"
    reason = "not_reproduced"
    for paren_negative in (False, True):
        prog, top, nested = _to_program(tree, context_numbers, paren_negative)
        if not any(n.paren for n in _leaves(tree)) and paren_negative:
            break
        candidates = [(prog.steps, nested)]
        if q.scale == "percent":
            candidates.append((prog.steps + [f"divide({top}, const_100)"], f"divide({nested}, const_100)"))
        for steps, nested_text in candidates:
            program = ", ".join(steps)
            try:
                raw = execute(program, table)
            except ProgramError:
                reason = "execution_error"
                continue
            value = round_result(raw)
            if finqa_eval_program(finqa_tokenize(program), table) != (0, value):  # valid for the official script too
                reason = "execution_error"
                continue
            if reproduces_answer(raw, {"answer": q.answer, "answer_type": q.answer_type, "scale": q.scale}):  # unrounded: 5 decimals of a fraction are too few for 2 of a percent
                report.percent_divided += len(steps) > len(prog.steps)
                report.paren_negative += paren_negative
                return program, nested_text, value, steps, tree
    return reason


def _facts(q: TatQAQuestion, tree, paragraphs: list[TatQAParagraph], table: list[list[str]]) -> dict[str, str]:
    facts: dict[str, str] = {}
    by_order = {str(p.order): i for i, p in enumerate(paragraphs)}
    if q.answer_from in ("text", "table-text"):
        for order in q.rel_paragraphs:
            if order in by_order:
                i = by_order[order]
                facts[f"text_{i}"] = paragraphs[i].text
    if q.answer_from in ("table", "table-text") and table:
        wanted = {abs(n.value * (100.0 if n.text.endswith("%") else 1.0)) for n in _leaves(tree)}
        header = table[0]
        for i, row in enumerate(table[1:], 1):
            if wanted & _numbers_in(" ".join(row[1:])):
                facts[f"table_{i}"] = table_row_to_text(header, row)
    return facts


def _display_answer(q: TatQAQuestion) -> str:
    if q.scale == "percent":
        return f"{q.answer}%"
    return f"{q.answer} {q.scale}".strip()


def to_finqa_records(contexts: Sequence[TatQAContext]) -> tuple[list[dict], ConversionReport]:
    """FinQA-shaped records (dicts in the official FinQA format, plus ``dataset`` and ``tatqa``) for the
    arithmetic questions whose derivation converts, and the report of every question (see module doc)."""
    report = ConversionReport(contexts=len(contexts))
    records: list[dict] = []
    for ctx in contexts:
        paragraphs = sorted(ctx.paragraphs, key=lambda p: p.order)
        table = convert_table(ctx.table.table)
        context_numbers = _numbers_in(" ".join(p.text for p in paragraphs)) | _numbers_in(
            " ".join(" ".join(r) for r in table)
        )
        for q in ctx.questions:
            report.questions += 1
            counts = report.by_answer_type.setdefault(q.answer_type, {"questions": 0, "converted": 0})
            counts["questions"] += 1
            if q.answer_type != "arithmetic":
                report.drop(q.answer_type, q.uid)
                continue
            result = _convert_question(q, table, context_numbers, report)
            if isinstance(result, str):
                report.drop(result, q.uid)
                continue
            program, nested, value, steps, tree = result
            gold_inds = _facts(q, tree, paragraphs, table)
            report.facts_missing += not gold_inds
            counts["converted"] += 1
            report.converted += 1
            records.append({
                "id": q.uid,
                "filename": f"tatqa/{ctx.table.uid}",
                "pre_text": [p.text for p in paragraphs],
                "post_text": [],
                "table": table,
                "table_ori": [list(r) for r in ctx.table.table],
                "qa": {
                    "question": q.question,
                    "answer": _display_answer(q),
                    "explanation": q.derivation.strip(),
                    "ann_table_rows": sorted(int(k.split("_")[1]) for k in gold_inds if k.startswith("table_")),
                    "ann_text_rows": sorted(int(k.split("_")[1]) for k in gold_inds if k.startswith("text_")),
                    "steps": _steps(steps, table),
                    "program": program,
                    "program_re": nested,
                    "gold_inds": gold_inds,
                    "exe_ans": value,
                },
                "dataset": "tatqa",
                "tatqa": {
                    "uid": q.uid, "table_uid": ctx.table.uid, "answer": q.answer, "scale": q.scale,
                    "answer_type": q.answer_type, "answer_from": q.answer_from, "derivation": q.derivation,
                    "rel_paragraphs": list(q.rel_paragraphs),
                },
            })
    return records, report


def _steps(steps: list[str], table: list[list[str]]) -> list[dict]:
    """FinQA's ``qa.steps``: ``{"op", "arg1", "arg2", "res"}`` per step (``res``: the running value)."""
    out = []
    for k, step in enumerate(steps):
        op, rest = step.split("(", 1)
        arg1, arg2 = (a.strip() for a in rest.rstrip(")").split(",", 1))
        value = execute(", ".join(steps[: k + 1]), table)
        out.append({"op": f"{op}{k}-{k}", "arg1": arg1, "arg2": arg2, "res": str(round_result(value))})
    return out


# ---------------------------------------------------------------------------------------------------
# Splitting by table
# ---------------------------------------------------------------------------------------------------


def split_by_table(
    contexts: Sequence[TatQAContext], dev_fraction: float = 0.2, seed: int = 0
) -> tuple[list[TatQAContext], list[TatQAContext]]:
    """Split contexts into (train, dev) so that no table and no paragraph text is on both sides.

    Contexts that share a table uid, a table's content or a paragraph's text form one group (union
    find); a group goes to dev when ``sha256(f"{seed}:{smallest table uid}")`` falls in the lowest
    ``dev_fraction`` of its range. The choice of a group depends on nothing else, so it is stable: the
    same tables stay on the same side when the file grows.
    """
    if not 0.0 <= dev_fraction <= 1.0:
        raise DataError(f"prepare.dev_fraction must be between 0 and 1, got {dev_fraction}")
    parent = list(range(len(contexts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, ctx in enumerate(contexts):
        keys = [f"uid:{ctx.table.uid}", "table:" + repr(ctx.table.table)] + [f"text:{p.text.strip()}" for p in ctx.paragraphs]
        for key in keys:
            if key in first:
                parent[find(i)] = find(first[key])
            else:
                first[key] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(contexts)):
        groups.setdefault(find(i), []).append(i)
    train: list[TatQAContext] = []
    dev: list[TatQAContext] = []
    in_dev = set()
    for members in groups.values():
        name = min(contexts[i].table.uid for i in members)
        digest = int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:12], 16)
        if digest / float(1 << 48) < dev_fraction:
            in_dev.update(members)
    for i, ctx in enumerate(contexts):
        (dev if i in in_dev else train).append(ctx)
    return train, dev


def is_tatqa_file(raw: Any) -> bool:
    """Whether a loaded JSON value is in the TAT-QA format (contexts with ``questions``), not FinQA's."""
    return isinstance(raw, list) and bool(raw) and isinstance(raw[0], dict) and "questions" in raw[0]


__all__ = [
    "TatQATable", "TatQAParagraph", "TatQAQuestion", "TatQAContext", "parse_context", "parse_contexts", "load_tatqa",
    "parse_derivation", "convert_table", "finqa_cell", "tatqa_prediction", "reproduces_answer", "ConversionReport", "to_finqa_records",
    "split_by_table", "is_tatqa_file", "ANSWER_TYPES", "SCALES", "DROP_REASONS",
]
