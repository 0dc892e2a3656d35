"""Property-based tests (hypothesis) of the code that reads untrusted text: the DSL parser and
executor, the answer normaliser / completion parser, and the FinQA record loader.

Properties:

- only the documented error types ever escape (``ProgramError`` subclasses from the DSL,
  ``DataError`` from the loader; the normaliser and completion parser never raise);
- executing a program is deterministic (same value, or the same error, every time);
- formatting a parsed program and parsing it again gives the same program.

Runs are derandomized with no example database (CI gets the same examples every time); set
``FINGRPO_FUZZ_RANDOM=1`` to explore new examples locally. The whole file runs in well under 30 s.
"""

from __future__ import annotations

import json
import math
import os
import string

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fingrpo import dsl
from fingrpo.answers import normalize_answer, parse_completion
from fingrpo.data.finqa import FinQARecord, load_split
from fingrpo.errors import DataError

_RANDOM = os.environ.get("FINGRPO_FUZZ_RANDOM") == "1"


def fuzz(max_examples: int):
    """Deterministic settings: derandomize + no database (CI); no deadline (2 shared cores are noisy)."""
    return settings(
        max_examples=max_examples,
        derandomize=not _RANDOM,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


# --------------------------------------------------------------------------------------------- strategies

# characters a program (or a model's attempt at one) is made of, plus some noise
PROGRAM_CHARS = string.ascii_letters + string.digits + "(),#%_.-+ eE" + "$/\n\t'\"{}[]é€−"
program_like_text = st.text(alphabet=PROGRAM_CHARS, max_size=80)

numbers = st.one_of(
    st.integers(min_value=-10**6, max_value=10**6).map(str),
    st.decimals(min_value=-10**6, max_value=10**6, places=3, allow_nan=False, allow_infinity=False).map(str),
    st.integers(min_value=0, max_value=500).map(lambda n: f"{n}%"),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).map(lambda x: f"{x:.4g}"),
    st.sampled_from(["1e3", ".5", "3.", "-0.25", "1e-7", "0", "-0"]),
)
consts = st.one_of(st.sampled_from(["const_m1", "const_100", "const_1000", "const_1"]),
                   st.integers(0, 10**6).map(lambda n: f"const_{n}"))
# a row name: letters, digits, spaces and the punctuation FinQA row names use; never '(' ')' ','
ROW_CHARS = string.ascii_lowercase + string.digits + " -$&'./:;"
row_names = (
    st.text(alphabet=ROW_CHARS, min_size=1, max_size=24)
    .map(str.strip)
    .filter(lambda s: bool(s) and not s.startswith("#") and not s.startswith("const_"))
)


@st.composite
def valid_programs(draw) -> tuple[str, list[list[str]]]:
    """A syntactically valid program (1-5 steps) and a table holding every row it names.

    Row cells are numbers or junk (``-``, ``n/a``) so execution may still fail, with an ``ArgumentError``.
    """
    n_steps = draw(st.integers(1, 5))
    table: list[list[str]] = [["", "2019", "2018"]]
    steps = []
    for i in range(n_steps):
        op = draw(st.sampled_from(dsl.OPERATIONS))
        if op in dsl.TABLE_OPS:
            row = draw(row_names)
            cells = draw(st.lists(st.one_of(numbers.map(lambda n: f"$ {n}"), st.sampled_from(["-", "n/a", "( 12 )", "1,234", "5%"])),
                                  min_size=2, max_size=2))
            table.append([row, *cells])
            steps.append(f"{op}({row}, none)")
            continue
        args = []
        for _ in range(2):
            kinds = [numbers, consts] + ([st.integers(0, i - 1).map(lambda k: f"#{k}")] if i else [])
            args.append(draw(st.one_of(*kinds)))
        sep = draw(st.sampled_from([", ", ",", " , "]))
        steps.append(f"{op}({args[0]}{sep}{args[1]})")
    return ", ".join(steps), table


# ----------------------------------------------------------------------------------------------- the DSL


@fuzz(400)
@given(program_like_text)
def test_parse_random_text_raises_only_program_errors(text):
    try:
        steps = dsl.parse(text)
    except dsl.ProgramError as e:
        assert e.position is None or 0 <= e.position <= len(text)
        assert "\n" not in str(e).split(" (at position")[0] or "\n" in text  # one-line reason
        return
    assert steps and all(s.op in dsl.OPERATIONS for s in steps)


@fuzz(200)
@given(valid_programs())
def test_valid_program_round_trips_through_format(program_table):
    program, _ = program_table
    steps = dsl.parse(program)
    text = dsl.format_program(steps)
    assert dsl.parse(text) == steps
    assert dsl.format_program(dsl.parse(text)) == text  # the canonical text is a fixed point
    # the official token format carries the same program
    assert dsl.parse(dsl.tokens_to_program(dsl.program_to_tokens(steps))) == steps


def _outcome(program, table):
    try:
        value = dsl.execute(program, table)
    except dsl.ProgramError as e:
        return ("error", type(e).__name__, str(e))
    assert isinstance(value, str) and value in ("yes", "no") or isinstance(value, float) and math.isfinite(value)
    return ("value", value)


@fuzz(200)
@given(valid_programs())
def test_execute_is_deterministic_and_raises_only_program_errors(program_table):
    program, table = program_table
    first = _outcome(program, table)
    assert _outcome(program, table) == first
    # parsed steps and the canonical text execute to the same thing as the original text
    assert _outcome(dsl.parse(program), table) == first
    assert _outcome(dsl.format_program(dsl.parse(program)), table)[:2] == first[:2]


@fuzz(300)
@given(valid_programs(), st.data())
def test_mutated_programs_raise_only_program_errors(program_table, data):
    """Delete, insert or swap characters of a valid program: parse/execute fail only with ProgramError."""
    program, table = program_table
    chars = list(program)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(chars)))
        action = data.draw(st.sampled_from(["delete", "insert", "replace"]))
        c = data.draw(st.sampled_from(list("(),#%_ 0-9xe.") + ["const_", "table_sum(", "#99", "1e400", "const_x", "exp("]))
        if action == "delete" and i < len(chars):
            del chars[i]
        elif action == "replace" and i < len(chars):
            chars[i] = c
        else:
            chars.insert(i, c)
    mutated = "".join(chars)
    _outcome(mutated, table)  # asserts the value is well-formed when there is one
    _outcome(mutated, None)
    # random tables of the wrong shape are data too
    junk_table = data.draw(st.lists(st.lists(st.one_of(st.text(max_size=5), st.none(), st.integers()), max_size=3), max_size=3))
    _outcome(mutated, junk_table)


@fuzz(100)
@given(st.lists(st.text(alphabet=PROGRAM_CHARS, max_size=12), max_size=12))
def test_tokens_to_program_raises_only_program_errors(tokens):
    try:
        text = dsl.tokens_to_program(tokens + ["EOF"])
    except dsl.ProgramError:
        return
    assert isinstance(text, str)


# ------------------------------------------------------------------------------------- answers/completions

any_json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40)
)


@fuzz(400)
@given(st.one_of(st.text(max_size=120), st.text(alphabet="0123456789.,()%$-−+eE yesno=million ", max_size=40), any_json_scalar,
                 st.lists(st.integers(), max_size=2), st.binary(max_size=10)))
def test_normalize_answer_never_raises(value):
    out = normalize_answer(value)
    assert out is None or out in ("yes", "no") or (isinstance(out, float) and math.isfinite(out))
    assert normalize_answer(value) == out  # deterministic


@fuzz(200)
@given(st.one_of(
    st.text(max_size=200),
    st.builds(lambda p, a, junk: f"{junk}\nProgram: {p}\nAnswer: {a}\n{junk}",
              program_like_text, st.text(max_size=20), st.text(max_size=20)),
    any_json_scalar,
))
def test_parse_completion_never_raises(completion):
    pc = parse_completion(completion)
    assert isinstance(pc.format_ok, bool)
    assert pc.answer_value is None or pc.answer_value in ("yes", "no") or math.isfinite(pc.answer_value)
    if pc.format_ok:
        dsl.parse(pc.program)  # format_ok promises a parseable program


# --------------------------------------------------------------------------------------------- the loader

json_values = st.recursive(
    any_json_scalar.filter(lambda v: not (isinstance(v, float) and not math.isfinite(v))),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=20,
)

VALID = {
    "pre_text": ["revenue was $ 10 million ."], "post_text": [], "filename": "X/2019/page_1.pdf",
    "table_ori": [["", "2019"], ["revenue", "10"]], "table": [["", "2019"], ["revenue", "10"]],
    "id": "X/2019/page_1.pdf-1",
    "qa": {"question": "what is revenue?", "answer": "10", "explanation": "", "ann_table_rows": [1],
           "ann_text_rows": [], "steps": [{"op": "add1-1", "arg1": "10", "arg2": "0", "res": "10"}],
           "program": "add(10, const_0)", "program_re": "add(10, const_0)",
           "gold_inds": {"table_1": "the revenue of 2019 is 10 ;"}, "exe_ans": 10.0},
}


def _load(tmp_path, text: str | bytes):
    path = tmp_path / "split.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    try:
        records = load_split(path)
    except DataError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg  # one line, naming the file
        return None
    assert records and all(isinstance(r, FinQARecord) for r in records)
    return records


@fuzz(150)
@given(json_values)
def test_load_split_random_json_raises_only_data_error(tmp_path_factory, value):
    _load(tmp_path_factory.mktemp("fuzz"), json.dumps(value))


@fuzz(100)
@given(st.one_of(st.binary(max_size=60), st.text(alphabet='[]{}",:0123456789 nulltruefalse\\', max_size=60)))
def test_load_split_random_bytes_raise_only_data_error(tmp_path_factory, blob):
    _load(tmp_path_factory.mktemp("fuzz"), blob)


def _paths(obj, prefix=()):
    """Every (path) inside a JSON value: keys of dicts and indexes of lists."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


ALL_PATHS = [p for p in _paths(VALID) if p]


@fuzz(200)
@given(st.sampled_from(ALL_PATHS), st.one_of(st.just("<delete>"), json_values), st.integers(1, 3))
def test_load_split_mutated_record_raises_data_error_naming_the_record(tmp_path_factory, path, replacement, n_records):
    """Replace or delete one field anywhere in an otherwise valid record: either the record is still
    schema-valid, or the DataError names the file, the record index and (when readable) its id."""
    import copy

    records = [copy.deepcopy(VALID) for _ in range(n_records)]
    for i, r in enumerate(records):
        r["id"] = f"X/2019/page_1.pdf-{i}"
    target = records[-1]
    node = target
    for key in path[:-1]:
        node = node[key]
    if replacement == "<delete>":
        del node[path[-1]]
    else:
        node[path[-1]] = replacement
    tmp = tmp_path_factory.mktemp("fuzz")
    try:
        load_split(_write(tmp, records))
    except DataError as e:
        msg = str(e)
        assert "\n" not in msg
        assert f"record {n_records - 1}" in msg, msg
        if isinstance(target.get("id"), str):
            assert f"(id {target['id']})" in msg, msg


def _write(tmp, records):
    p = tmp / "split.json"
    p.write_text(json.dumps(records), encoding="utf-8")
    return p


def test_fuzz_file_sanity_valid_record_loads(tmp_path):
    """The mutation test's base record is itself valid (else that test would prove nothing)."""
    (rec,) = load_split(_write(tmp_path, [VALID]))
    assert rec.id == VALID["id"]
    assert dsl.execute(rec.qa.program, rec.table) == 10.0
