"""FinQA records: the typed schema, loading with one-line errors, provenance, and table text.

    from fingrpo.data.finqa import load_split
    train = load_split("data/finqa/train.json")             # list[FinQARecord], 110 records

Records follow the official FinQA JSON format (Chen et al., 2021) field for field; unknown extra fields
are kept. A record that breaks the schema raises :class:`fingrpo.errors.DataError` on one line naming
the file, record index, record id and field::

    data/finqa/train.json: record 17 (id ADI/2009/page_49.pdf-1): qa.exe_ans: missing

Prompts built from records (context modes, retrieval, the token budget) are :mod:`fingrpo.data.prompts`'s.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError, field_validator

from fingrpo.dsl import ProgramError, execute
from fingrpo.errors import DataError
from fingrpo.io import read_json

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


__all__ = [
    "FinQARecord", "FinQAQA", "FinQAStep", "load_split", "check_gold_program", "parse_record", "load_provenance",
    "random_subset_ids", "RANDOM_SAMPLE_SOURCES", "GOLD_KEY", "table_row_to_text", "linearize_table", "table_to_markdown",
]
