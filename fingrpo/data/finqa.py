"""FinQA records, loading, table linearisation and prompt building.

    from fingrpo.config import load_config
    from fingrpo.data.finqa import load_split, make_examples, render_prompt

    cfg = load_config("params.yaml")
    train = load_split(cfg.data.train_path)                 # list[FinQARecord], 110 records
    dev = load_split(cfg.data.dev_path)
    examples = make_examples(dev, cfg.prompt, tokenizer, few_shot_records=train)
    text = render_prompt(examples[0], tokenizer)            # the exact string fed to the model
    examples[0].target                                      # 'Program: subtract(482, 75)\\nAnswer: 407'

Records follow the official FinQA JSON format (Chen et al., 2021) field for field; unknown extra fields
are kept. A record that breaks the schema raises :class:`fingrpo.errors.DataError` on one line naming
the file, record index, record id and field::

    data/finqa/train.json: record 17 (id ADI/2009/page_49.pdf-1): qa.exe_ans: missing

The model is asked to answer in two lines, ``Program: <FinQA program>`` then ``Answer: <value>``
(the format :mod:`fingrpo.answers` parses).

Context modes (``prompt.context_mode``):

- ``full``: every pre_text sentence, the table (linearised rows, or a markdown table with
  ``prompt.table_format=markdown``), every post_text sentence, in document order.
- ``gold``: only the supporting facts of ``qa.gold_inds`` (the annotated sentences and table rows).
- ``retrieved``: all sentences and linearised table rows ranked by lexical overlap with the question
  (IDF-weighted shared words), the ``prompt.retrieved_top_k`` best shown in document order.

Token budget (``prompt.max_prompt_tokens``): the whole rendered prompt (instructions, worked
examples, context, question) is counted with the tokenizer when one is given, else estimated as
``ceil(characters / 4)`` (about right for English BPE vocabularies on this text). Over budget, context
is cut least relevant first: first the worked examples' non-supporting lines, then the question's
non-supporting lines, then whole worked examples (last first). The question's supporting facts
(``gold_inds``; in ``retrieved`` mode, those the retriever picked) are never cut, even if they alone
exceed the budget (then ``PromptExample.over_budget`` is set). Measured on dev (457 records) with
SmolLM2's tokenizer, budget 1536, chat template: gold mode median 406 tokens (762 with 2 worked
examples, nothing cut); retrieved (k=5) 582 / 1202; full 1456 / 1499 (48% / 100% of prompts cut).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError, field_validator

from fingrpo.dsl import ProgramError, execute
from fingrpo.errors import ConfigError, DataError
from fingrpo.io import read_json

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import PromptConfig

# The files whose records are a random sample of their official split (see shared/data/finqa/SOURCE.md);
# the others come from a baseline's error files (harder than average) or a stratified demo set.
RANDOM_SAMPLE_SOURCES: dict[str, str] = {
    "train": "sukritganesh/FinQA_Analysis:data/processed/train_100.json",
    "dev": "sukritganesh/FinQA_Analysis:data/processed/dev_200.json",
    "test": "Dolphin2333/FinQA-with-QSTAR:data/test_100.json",
}

GOLD_KEY = re.compile(r"^(text|table)_(\d{1,9})$")  # bounded: int() of a 5,000-digit index raises

# ---------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------


class FinQAStep(BaseModel):
    """One annotated step, e.g. ``{"op": "minus2-1", "arg1": "5829", "arg2": "5735", "res": "94"}``."""

    model_config = ConfigDict(extra="allow")

    op: StrictStr
    arg1: StrictStr
    arg2: StrictStr
    res: StrictStr


class FinQAQA(BaseModel):
    """The ``qa`` object of a FinQA record. ``exe_ans`` is a float, or ``"yes"``/``"no"`` for ``greater``."""

    model_config = ConfigDict(extra="allow")

    question: StrictStr
    answer: StrictStr
    explanation: StrictStr
    ann_table_rows: list[StrictInt]
    ann_text_rows: list[StrictInt]
    steps: list[FinQAStep]
    program: StrictStr
    program_re: StrictStr
    gold_inds: dict[StrictStr, StrictStr]
    exe_ans: float | str

    @field_validator("exe_ans", mode="before")
    @classmethod
    def _exe_ans(cls, v: Any) -> float | str:
        # bool is an int in Python: reject it explicitly; NaN/inf never come out of a FinQA program.
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                value = float(v)  # OverflowError for an integer beyond float range (JSON allows 10**400)
            except OverflowError:
                raise ValueError(f"expected a number or 'yes'/'no', got a number too large for a float ({_short(v)})") from None
            if not math.isfinite(value):
                raise ValueError(f"expected a number or 'yes'/'no', got non-finite {v}")
            return value
        if v in ("yes", "no"):
            return v
        raise ValueError(f"expected a number or 'yes'/'no', got {_json_type(v)} {_short(v)}")

    @field_validator("gold_inds")
    @classmethod
    def _gold_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not GOLD_KEY.match(key):
                raise ValueError(f"key {_short(key)} is not of the form text_N or table_N")
        return v


class FinQARecord(BaseModel):
    """One FinQA example: report text around a table, a question, and its gold program + answer.

    >>> rec = FinQARecord.model_validate(raw)          # raw: one dict of the official JSON list   # doctest: +SKIP
    >>> rec.qa.program, rec.qa.exe_ans   # doctest: +SKIP
    ('subtract(482, 75)', 407.0)
    """

    model_config = ConfigDict(extra="allow")

    pre_text: list[StrictStr]
    post_text: list[StrictStr]
    filename: StrictStr
    table_ori: list[list[StrictStr]]
    table: list[list[StrictStr]]
    qa: FinQAQA
    id: StrictStr

    @property
    def question(self) -> str:
        return self.qa.question

    @property
    def sentences(self) -> list[str]:
        """pre_text + post_text: the index space of ``text_N`` keys in ``qa.gold_inds``."""
        return [*self.pre_text, *self.post_text]


def _json_type(v: Any) -> str:
    return {
        type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
        list: "array", dict: "object",
    }.get(type(v), type(v).__name__)


def _short(v: Any, n: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= n else text[: n - 3] + "..."


_EXPECTED = {
    "string_type": "a string", "int_type": "an integer", "float_type": "a number", "list_type": "an array",
    "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
}


def _describe(err: dict) -> tuple[str, str]:
    """A pydantic error -> (``qa.steps[0].op``, ``expected a string, got number 3``)."""
    loc = ""
    for part in err["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    kind = err["type"]
    if kind == "missing":
        return loc, "missing"
    if kind in _EXPECTED:
        return loc, f"expected {_EXPECTED[kind]}, got {_json_type(err.get('input'))} {_short(err.get('input'))}"
    msg = err["msg"].removeprefix("Value error, ")
    return loc, msg


def parse_record(raw: Any, *, source: str = "<record>", index: int = 0) -> FinQARecord:
    """Validate one raw record; a schema problem raises a one-line :class:`DataError`."""
    rid = raw.get("id") if isinstance(raw, dict) else None
    where = f"{source}: record {index}" + (f" (id {rid})" if isinstance(rid, str) else "")
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(raw)}")
    try:
        return FinQARecord.model_validate(raw)
    except ValidationError as e:
        loc, msg = _describe(e.errors()[0])
        more = len(e.errors()) - 1
        raise DataError(f"{where}: {loc}: {msg}" + (f" (and {more} more problems)" if more else "")) from None


def check_gold_program(rec: FinQARecord, *, source: str = "<record>", index: int = 0) -> float | str:
    """Execute a record's gold ``qa.program`` on its table; a :class:`fingrpo.dsl.ProgramError` (syntax,
    unknown operation, ``#k`` out of range, division by zero, missing row, non-numeric cell, overflow)
    becomes a one-line :class:`DataError` naming the file, record and field.

    It checks that the program *runs*, not that it gives ``exe_ans``: that rule
    (``program_executes_to_exe_ans``) is :mod:`fingrpo.data.validate`'s, which reports every record.

    >>> check_gold_program(rec, source="train.json", index=3)      # doctest: +SKIP
    DataError: train.json: record 3 (id X-1): qa.program: 'divide(5, 0)': divide(5, 0) divides by zero (at position 0)
    """
    try:
        return execute(rec.qa.program, rec.table)
    except ProgramError as e:
        raise DataError(f"{source}: record {index} (id {rec.id}): qa.program: {_short(rec.qa.program, 80)}: {e}") from None


def load_split(path: str | Path, check_programs: bool = True) -> list[FinQARecord]:
    """Load a FinQA split (the official JSON list of records).

    >>> recs = load_split("data/finqa/train.json")
    >>> len(recs), recs[0].id
    (110, 'ETR/2009/page_107.pdf-2')

    Raises :class:`DataError` for a missing/empty/malformed file, a non-list top level, an empty list,
    a non-object record, a missing or wrong-typed field, or a duplicate id; with ``check_programs``
    (the default) also for a gold program that does not execute (:func:`check_gold_program`), so that
    ``train``, ``evaluate`` and ``score`` refuse such a record up front instead of training or scoring on it.
    """
    raw = read_json(path)
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of records at the top level, got {_json_type(raw)}")
    if not raw:
        raise DataError(f"{path}: the split has no records")
    records: list[FinQARecord] = []
    first_seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        rec = parse_record(item, source=str(path), index=i)
        if rec.id in first_seen:
            first = first_seen[rec.id]
            raise DataError(f"{path}: record {i} (id {rec.id}): id: duplicate id (first at record {first})")
        first_seen[rec.id] = i
        if check_programs:
            check_gold_program(rec, source=str(path), index=i)
        records.append(rec)
    return records


def load_provenance(path: str | Path) -> dict:
    """Read ``provenance.json``: ``{"note": ..., "records": {id: {"split", "sources", "index"}}}``."""
    prov = read_json(path)
    if not isinstance(prov, dict) or not isinstance(prov.get("records"), dict):
        raise DataError(f"{path}: expected an object with a 'records' mapping of id -> provenance")
    for rid, entry in prov["records"].items():
        if not isinstance(entry, dict):
            raise DataError(f"{path}: records.{rid}: expected an object, got {_json_type(entry)}")
        if not isinstance(entry.get("split"), str):
            raise DataError(f"{path}: records.{rid}.split: missing or not a string")
        sources = entry.get("sources")
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise DataError(f"{path}: records.{rid}.sources: missing or not a list of strings")
    return prov


def random_subset_ids(provenance_path: str | Path, split: str) -> set[str]:
    """Ids of ``split`` whose sources include that split's random-sample file.

    >>> len(random_subset_ids("data/finqa/provenance.json", "test"))
    100

    ``split`` is ``train``/``dev``/``test`` or a split path such as ``data/finqa/dev.json``.
    """
    name = Path(split).stem if split.endswith(".json") else split
    if name not in RANDOM_SAMPLE_SOURCES:
        raise DataError(f"unknown split {split!r}: expected one of {sorted(RANDOM_SAMPLE_SOURCES)}")
    sample = RANDOM_SAMPLE_SOURCES[name]
    records = load_provenance(provenance_path)["records"]
    return {rid for rid, e in records.items() if e["split"] == name and sample in e["sources"]}


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------

# FinQA's gold_inds were produced from a tokenised table: a ',' or ':' ending a word stands apart
# ("december 31," -> "december 31 ,"). Matching it makes every gold_inds table fact equal our row text.
_TRAILING_PUNCT = re.compile(r"(?<=\S)([,:])(?=\s|$)")


def _tok(cell: str) -> str:
    return _TRAILING_PUNCT.sub(r" \1", cell)


def table_row_to_text(header: Sequence[str], row: Sequence[str]) -> str:
    """One table row as FinQA's retriever/``gold_inds`` sentence (official ``table_row_to_text``).

    >>> table_row_to_text(["in millions", "2009", "2008"], ["balance", "$ 482", "$ 75"])
    'in millions the balance of 2009 is $ 482 ; the balance of 2008 is $ 75 ;'
    """
    res = (_tok(header[0]) + " ") if header and header[0] else ""
    name = _tok(row[0]) if row else ""
    for head, cell in zip(header[1:], row[1:]):
        res += f"the {name} of {_tok(head)} is {_tok(cell)} ; "
    return re.sub(r" +", " ", res).strip()


def linearize_table(table: Sequence[Sequence[str]]) -> list[str]:
    """One sentence per row (row 0, the header, included: ``table_0`` is a valid gold key).

    >>> linearize_table([["", "2017", "2016"], ["gfs", "4138", "4250"]])[1]
    'the gfs of 2017 is 4138 ; the gfs of 2016 is 4250 ;'
    """
    if not table:
        return []
    header = table[0]
    return [table_row_to_text(header, row) for row in table]


def table_to_markdown(table: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table, one line per row (plus the separator after the header).

    >>> table_to_markdown([["", "2017"], ["gfs", "4138"]])
    ['|  | 2017 |', '| --- | --- |', '| gfs | 4138 |']
    """
    if not table:
        return []
    width = max(len(r) for r in table)

    def line(row: Sequence[str]) -> str:
        cells = [c.replace("|", "\\|") for c in row] + [""] * (width - len(row))
        return "| " + " | ".join(cells) + " |"

    return [line(table[0]), "| " + " | ".join(["---"] * width) + " |", *(line(r) for r in table[1:])]


# ---------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------

OPERATIONS_HELP = (
    "add(a, b), subtract(a, b), multiply(a, b), divide(a, b), exp(a, b), greater(a, b), "
    "table_max(row, none), table_min(row, none), table_sum(row, none), table_average(row, none)"
)

SYSTEM_PROMPT = (
    "You answer questions about a company's financial report. Compute the answer with a FinQA "
    "program over the numbers in the context, then give the program's value.\n"
    "Reply with exactly two lines:\n"
    "Program: <program>\n"
    "Answer: <value>\n"
    f"A program is one or more steps separated by \", \". Operations: {OPERATIONS_HELP}. "
    "Arguments are numbers from the context, constants such as const_100 or const_1000, a table row "
    "name (table_* operations), or #n for the result of step n (counting from 0). The answer is the "
    "program's value as a plain number without units (a percentage as a fraction, 0.25 for 25%), "
    "or yes/no for greater.\n"
    "Example:\n"
    "Program: subtract(5829, 5735), divide(#0, 5735)\n"
    "Answer: 0.01639"
)

_STOPWORDS = frozenset(
    "a an and are as at be by did do does for from had has have how in is it its of on or than that the "
    "their this to was were what when which who will with during between total change percentage percent "
    "average".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")


def _terms(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


def format_exe_ans(value: float | str) -> str:
    """``407.0 -> '407'``, ``0.34719 -> '0.34719'``, ``'yes' -> 'yes'`` (exe_ans has 5 decimals at most).

    >>> format_exe_ans(-12.5), format_exe_ans(1e6)
    ('-12.5', '1000000')
    """
    if isinstance(value, str):
        return value
    text = f"{value:.5f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def make_target(record: FinQARecord) -> str:
    """``'Program: subtract(482, 75)\\nAnswer: 407'`` — the completion a perfect model writes."""
    return f"Program: {record.qa.program}\nAnswer: {format_exe_ans(record.qa.exe_ans)}"


@dataclass
class _Unit:
    """One line of context: a sentence or a table row."""

    key: str  # "text_3", "table_2", "table_header", "table_sep"
    text: str
    order: int  # document position: pre_text, then table rows, then post_text
    gold: bool
    score: float = 0.0
    pinned: bool = False  # markdown header/separator: kept with the table


@dataclass
class PromptExample:
    """A record turned into chat messages plus what scoring needs.

    ``messages``: ``[{"role": "system", ...}, (user, assistant) per worked example, {"role": "user", ...}]``;
    ``target``: ``"Program: <gold program>\\nAnswer: <exe_ans>"``; ``prompt_tokens``: the budget count
    (tokens, or the chars/4 estimate without a tokenizer); ``truncated``: context was cut to fit;
    ``over_budget``: still over after all cuts (the supporting facts alone are longer than the budget).
    """

    id: str
    messages: list[dict]
    target: str
    exe_ans: float | str
    program: str
    table: list[list[str]]
    question: str = ""
    prompt_tokens: int = 0
    truncated: bool = False
    over_budget: bool = False
    context_keys: list[str] = field(default_factory=list)


def _doc_order(rec: FinQARecord, key: str) -> int:
    kind, idx = GOLD_KEY.match(key).groups()  # type: ignore[union-attr]
    i, n_pre, n_rows = int(idx), len(rec.pre_text), len(rec.table)
    if kind == "table":
        return n_pre + i
    return i if i < n_pre else n_pre + n_rows + (i - n_pre)


def _all_units(rec: FinQARecord, table_format: str) -> list[_Unit]:
    gold = rec.qa.gold_inds
    units = [_Unit(f"text_{i}", s, i, f"text_{i}" in gold) for i, s in enumerate(rec.pre_text)]
    n_pre, n_rows = len(rec.pre_text), len(rec.table)
    if table_format == "markdown" and rec.table:
        lines = table_to_markdown(rec.table)
        units.append(_Unit("table_0", lines[0], n_pre, "table_0" in gold, pinned=True))
        units.append(_Unit("table_sep", lines[1], n_pre, False, pinned=True))
        units += [_Unit(f"table_{i}", line, n_pre + i, f"table_{i}" in gold) for i, line in enumerate(lines[2:], 1)]
    else:
        rows = linearize_table(rec.table)
        units += [_Unit(f"table_{i}", s, n_pre + i, f"table_{i}" in gold) for i, s in enumerate(rows)]
    units += [
        _Unit(f"text_{n_pre + j}", s, n_pre + n_rows + j, f"text_{n_pre + j}" in gold)
        for j, s in enumerate(rec.post_text)
    ]
    return units


def _rank_by_overlap(units: list[_Unit], question: str) -> None:
    """IDF-weighted count of question words shared with each unit (IDF over this record's units)."""
    q = _terms(question)
    term_sets = [_terms(u.text) for u in units]
    n = len(units)
    df: dict[str, int] = {}
    for ts in term_sets:
        for t in ts & q:
            df[t] = df.get(t, 0) + 1
    for u, ts in zip(units, term_sets):
        u.score = sum(math.log(1.0 + n / df[t]) for t in ts & q)


def _context_units(rec: FinQARecord, cfg: "PromptConfig") -> list[_Unit]:
    mode = cfg.context_mode
    if mode == "gold":
        units = [_Unit(k, v, _doc_order(rec, k), True) for k, v in rec.qa.gold_inds.items()]
        _rank_by_overlap(units, rec.question)
    elif mode == "full":
        units = _all_units(rec, getattr(cfg, "table_format", "linearized"))
        _rank_by_overlap(units, rec.question)
    elif mode == "retrieved":
        units = _all_units(rec, "linearized")
        _rank_by_overlap(units, rec.question)
        # best first; ties keep document order (sorted is stable)
        units = sorted(units, key=lambda u: -u.score)[: cfg.retrieved_top_k]
    else:  # pragma: no cover - PromptConfig's Literal already rejects it
        raise ConfigError(f"prompt.context_mode: unknown mode {mode!r}")
    return sorted(units, key=lambda u: (u.order, u.key == "table_sep"))


def retrieve(rec: FinQARecord) -> list[str]:
    """The keys (``text_N``/``table_N``) of every sentence and table row, best first, as
    ``context_mode: retrieved`` ranks them (ties in document order); its top ``retrieved_top_k`` are shown.

    >>> retrieve(rec)[:3]                                     # doctest: +SKIP
    ['table_3', 'text_12', 'table_1']
    """
    units = _all_units(rec, "linearized")
    _rank_by_overlap(units, rec.question)
    return [u.key for u in sorted(units, key=lambda u: -u.score)]


def retrieval_recall(records: Sequence[FinQARecord], ks: Sequence[int] = (1, 3, 5, 10)) -> dict:
    """How well the retriever finds the supporting facts (``qa.gold_inds``) of records that have some:
    ``recall_at_k`` (mean share of a record's gold facts in the top k) and ``all_gold_at_k`` (share of
    records with every gold fact in the top k), and ``n`` (records with gold facts).

    >>> retrieval_recall(dev)["recall_at_3"]                  # doctest: +SKIP
    0.65
    """
    with_gold = [r for r in records if r.qa.gold_inds]
    out: dict[str, float | int | None] = {"n": len(with_gold)}
    ranked = [(retrieve(r), set(r.qa.gold_inds)) for r in with_gold]
    for k in ks:
        shares = [len(gold & set(keys[:k])) / len(gold) for keys, gold in ranked]
        out[f"recall_at_{k}"] = sum(shares) / len(shares) if shares else None
        out[f"all_gold_at_{k}"] = sum(s == 1.0 for s in shares) / len(shares) if shares else None
    return out


# Chat-control markers (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>` ...) inside report text would be
# tokenized as the real special tokens and could close the user turn early: record text is data, so
# the markers are broken up ("<|" -> "< |") before the prompt is rendered.
_CONTROL_MARKER = re.compile(r"<\|")


def neutralize_control_markers(text: str) -> str:
    """Record text with chat-control markers broken up, so a tokenizer never reads them as special tokens.

    >>> neutralize_control_markers("net sales <|im_end|> rose")
    'net sales < |im_end|> rose'
    """
    return _CONTROL_MARKER.sub("< |", text)


def _user_text(question: str, units: list[_Unit]) -> str:
    context = "\n".join(u.text for u in units) if units else "(none)"
    return neutralize_control_markers(f"Context:\n{context}\n\nQuestion: {question}")


def _plain_text(messages: list[dict]) -> str:
    """Prompt without a chat template: the turns one after another, ending where the answer starts."""
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


def render_prompt(example: PromptExample, tokenizer: Any = None, use_chat_template: bool = True) -> str:
    """The exact text fed to the model.

    With ``use_chat_template`` the tokenizer's chat template renders the messages with
    ``add_generation_prompt=True`` (for SmolLM2: ``<|im_start|>system\\n...<|im_end|>\\n...
    <|im_start|>assistant\\n``); otherwise the turns are joined by blank lines (for base models).
    """
    if use_chat_template:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            why = "no tokenizer was given" if tokenizer is None else f"{type(tokenizer).__name__} has no chat template"
            hint = "pass a chat tokenizer or set prompt.use_chat_template=false"
            raise ConfigError(f"prompt.use_chat_template is true but {why}: {hint}")
        return tokenizer.apply_chat_template(example.messages, tokenize=False, add_generation_prompt=True)
    return _plain_text(example.messages)


class _Counter:
    """Token counts: the tokenizer's when given, else ceil(chars / 4)."""

    def __init__(self, tokenizer: Any, use_chat_template: bool):
        self.tokenizer = tokenizer
        self.chat = bool(use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None))
        self._memo: dict[str, int] = {}  # context lines repeat: the worked examples' in every prompt

    def text(self, s: str) -> int:
        if self.tokenizer is None:
            return math.ceil(len(s) / 4)
        if s not in self._memo:
            self._memo[s] = len(self.tokenizer(s, add_special_tokens=False)["input_ids"])
        return self._memo[s]

    def prompt(self, messages: list[dict]) -> int:
        if self.chat:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.tokenizer is None:
            return self.text(_plain_text(messages))
        return len(self.tokenizer(_plain_text(messages), add_special_tokens=False)["input_ids"])


@dataclass
class _Shot:
    record: FinQARecord
    units: list[_Unit]
    dropped: bool = False


def _messages(shots: list[_Shot], question: str, units: list[_Unit]) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}]
    for shot in shots:
        if not shot.dropped:
            msgs.append({"role": "user", "content": _user_text(shot.record.question, shot.units)})
            msgs.append({"role": "assistant", "content": make_target(shot.record)})
    msgs.append({"role": "user", "content": _user_text(question, units)})
    return msgs


def _build_example(
    rec: FinQARecord, shot_records: list[FinQARecord], cfg: "PromptConfig", counter: _Counter
) -> PromptExample:
    units = _context_units(rec, cfg)
    shots = [_Shot(s, _context_units(s, cfg)) for s in shot_records]

    def render() -> list[dict]:
        return _messages(shots, rec.question, units)

    # Cut candidates, least relevant first (see module docstring). Each: (shot index or -1, unit or None).
    cuts: list[tuple[int, _Unit | None]] = []
    shot_units = [(si, u) for si, s in enumerate(shots) for u in s.units if not (u.gold or u.pinned)]
    cuts += sorted(shot_units, key=lambda t: (t[1].score, -t[0], -t[1].order))
    cuts += [(-1, u) for u in sorted((u for u in units if not (u.gold or u.pinned)), key=lambda u: (u.score, -u.order))]
    cuts += [(si, None) for si in reversed(range(len(shots)))]

    budget = cfg.max_prompt_tokens
    # Estimate = the prompt without context lines (counted exactly) + each line's own count; cut on
    # the estimate, then count the whole prompt exactly, repeating while it is still over budget.
    # (Line counts are nearly additive and memoised; an exact count of an uncut full-context prompt
    # with worked examples would cost ~6k tokens of tokenisation per record.)
    skeleton = _messages([_Shot(s.record, []) for s in shots], rec.question, [])
    lines = [*units, *(u for s in shots for u in s.units)]
    est = counter.prompt(skeleton) + sum(counter.text(u.text + "\n") for u in lines)
    truncated = False
    pos = 0
    while True:
        while est > budget and pos < len(cuts):
            si, unit = cuts[pos]
            pos += 1
            truncated = True
            if unit is None:
                shot = shots[si]
                if not shot.dropped:
                    est -= counter.text(_user_text(shot.record.question, shot.units) + make_target(shot.record))
                    shot.dropped = True
            elif si >= 0:
                if not shots[si].dropped:
                    est -= counter.text(unit.text + "\n")
                    shots[si].units.remove(unit)
            else:
                est -= counter.text(unit.text + "\n")
                units.remove(unit)
        total = counter.prompt(render())
        if total <= budget or pos >= len(cuts):
            break
        est = total

    return PromptExample(
        id=rec.id,
        messages=render(),
        target=make_target(rec),
        exe_ans=rec.qa.exe_ans,
        program=rec.qa.program,
        table=[list(r) for r in rec.table],
        question=rec.question,
        prompt_tokens=total,
        truncated=truncated,
        over_budget=total > budget,
        context_keys=[u.key for u in units if u.key != "table_sep"],
    )


def make_examples(
    records: Sequence[FinQARecord],
    prompt_cfg: "PromptConfig",
    tokenizer: Any = None,
    few_shot_records: Sequence[FinQARecord] | None = None,
) -> list[PromptExample]:
    """Turn records into :class:`PromptExample` s under ``prompt_cfg`` (context mode, budget, few-shot).

    >>> ex = make_examples(dev, PromptConfig(context_mode="gold", few_shot=2), tok, few_shot_records=train)   # doctest: +SKIP
    >>> [m["role"] for m in ex[0].messages]   # doctest: +SKIP
    ['system', 'user', 'assistant', 'user', 'assistant', 'user']

    Worked examples are the first ``prompt_cfg.few_shot`` of ``few_shot_records`` (deterministic),
    skipping the record being asked about; they use the same context mode. ``few_shot_records`` is
    required when ``few_shot > 0`` (typically ``load_split(cfg.data.train_path)``).
    """
    if prompt_cfg.few_shot and few_shot_records is None:
        raise ConfigError(
            f"prompt.few_shot={prompt_cfg.few_shot} needs few_shot_records (e.g. load_split(cfg.data.train_path)) "
            "or prompt.few_shot=0"
        )
    pool = list(few_shot_records or [])
    if prompt_cfg.few_shot and len(pool) < prompt_cfg.few_shot:
        raise ConfigError(f"prompt.few_shot={prompt_cfg.few_shot} but only {len(pool)} few_shot_records were given")
    counter = _Counter(tokenizer, prompt_cfg.use_chat_template)
    examples = []
    for rec in records:
        shots = [s for s in pool[: prompt_cfg.few_shot + 1] if s.id != rec.id][: prompt_cfg.few_shot]
        examples.append(_build_example(rec, shots, prompt_cfg, counter))
    return examples


__all__ = [
    "FinQARecord", "FinQAQA", "FinQAStep", "load_split", "check_gold_program", "parse_record", "load_provenance", "random_subset_ids",
    "RANDOM_SAMPLE_SOURCES", "table_row_to_text", "linearize_table", "table_to_markdown", "PromptExample",
    "make_examples", "render_prompt", "make_target", "format_exe_ans", "SYSTEM_PROMPT",
    "retrieve", "retrieval_recall",
]
