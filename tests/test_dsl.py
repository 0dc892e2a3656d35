"""FinQA program DSL: parser, interpreter, official token format, errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fingrpo.dsl import (
    ArgumentError,
    Const,
    DivisionByZeroError,
    MissingRowError,
    Number,
    ProgramError,
    ProgramSyntaxError,
    RowName,
    Step,
    StepRef,
    StepReferenceError,
    UnknownOperationError,
    execute,
    format_program,
    parse,
    parse_cell,
    program_to_tokens,
    round_result,
    str_to_num,
    tokens_to_program,
)
from fingrpo.errors import FingrpoError
from fingrpo.official import finqa_tokenize

TABLE = [
    ["( in millions )", "2019", "2018", "2017"],
    ["net sales", "$ 1,200", "$ 1,000", "$ 800"],
    ["operating margin", "12.5% ( 12.5 % )", "10% ( 10 % )", "7.5% ( 7.5 % )"],
    ["losses", "$ -6129 ( 6129 )", "-3332 ( 3332 )", "59"],
    ["total ( in millions, net )", "1", "2", "3"],
    ["with dash", "5", "-", "7"],
    ["duplicate", "1", "1", "1"],
    ["duplicate", "10", "20", "30"],
    ["empty", ""],
    ["only name"],
]


# ---------------------------------------------------------------------------------- the real data


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_every_gold_program_executes_to_exe_ans(data_dir: Path, split: str):
    records = json.loads((data_dir / f"{split}.json").read_text())
    assert len(records) == {"train": 110, "dev": 457, "test": 509}[split]
    wrong = []
    for r in records:
        value = round_result(execute(r["qa"]["program"], r["table"]))
        if value != r["qa"]["exe_ans"]:
            wrong.append((r["id"], r["qa"]["program"], value, r["qa"]["exe_ans"]))
    assert wrong == []


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_gold_programs_round_trip_text_and_tokens(data_dir: Path, split: str):
    for r in json.loads((data_dir / f"{split}.json").read_text()):
        program = r["qa"]["program"]
        steps = parse(program)
        assert parse(format_program(steps)) == steps
        assert format_program(steps) == program  # FinQA gold programs are already canonical
        tokens = program_to_tokens(program)
        assert tokens == finqa_tokenize(program)
        assert parse(tokens_to_program(tokens)) == steps


# ---------------------------------------------------------------------------------- operations


@pytest.mark.parametrize(
    "program, expected",
    [
        ("add(1, 2)", 3.0),
        ("subtract(5829, 5735)", 94.0),
        ("multiply(3.8, const_100)", 380.0),
        ("divide(1, 8)", 0.125),
        ("exp(1.1, 2)", 1.1**2),
        ("exp(const_2, const_m1)", 0.5),
        ("greater(5, 3)", "yes"),
        ("greater(3, 5)", "no"),
        ("greater(3, 3)", "no"),
        ("add(5%, 1)", 1.05),
        ("add(-2, .5)", -1.5),
        ("add(1e3, 0)", 1000.0),
        ("multiply(const_1000000, 2)", 2_000_000.0),
        ("subtract(5829, 5735), divide(#0, 5735)", 94 / 5735),
        ("add(1, 2), add(#0, 3), multiply(#0, #1)", 18.0),
        ("table_max(net sales, none)", 1200.0),
        ("table_min(net sales, none)", 800.0),
        ("table_sum(net sales, none)", 3000.0),
        ("table_average(net sales, none)", 1000.0),
        ("table_average(operating margin, none)", 0.1),
        ("table_sum(losses, none)", -6129 - 3332 + 59),
        ("table_sum(total ( in millions, net ), none)", 6.0),
        ("table_sum(duplicate, none)", 60.0),  # a later row of the same name wins, as officially
        ("table_max(net sales, none), divide(#0, const_100)", 12.0),
    ],
)
def test_operations(program: str, expected):
    value = execute(program, TABLE)
    if isinstance(expected, str):
        assert value == expected
    else:
        assert math.isclose(value, expected, rel_tol=1e-12)


def test_result_is_unrounded_and_round_result_is_official():
    value = execute("divide(1, 3)")
    assert value == 1 / 3
    assert round_result(value) == 0.33333
    assert round_result("yes") == "yes"


def test_parse_structure_and_canonical_text():
    steps = parse("  subtract( 5829 ,5735 ) ,divide(#0,  5 % ) , table_max( net sales ,none)")
    assert steps == [
        Step("subtract", (Number("5829", 5829.0), Number("5735", 5735.0))),
        Step("divide", (StepRef(0), Number("5%", 0.05))),
        Step("table_max", (RowName("net sales"), RowName("none"))),
    ]
    assert format_program(steps) == "subtract(5829, 5735), divide(#0, 5%), table_max(net sales, none)"
    assert parse("divide(1, const_m1)")[0].args[1] == Const("m1")
    assert Const("m1").value == -1.0 and Const("1000").value == 1000.0


def test_official_cell_and_number_semantics():
    assert str_to_num("1,234") == 1234.0
    assert str_to_num("5%") == 0.05
    assert str_to_num("const_m1") == -1.0
    assert str_to_num("abc") is None
    assert parse_cell("$ 1,234") == 1234.0
    assert parse_cell("$ -6129 ( 6129 )") == -6129.0
    assert parse_cell("12.5% ( 12.5 % )") == 0.125
    for not_a_number in ["-", "n/a", "", "( 12 )", "nm", "december 31"]:
        assert parse_cell(not_a_number) is None, not_a_number


def test_tokens_to_program_official_format():
    toks = ["subtract(", "5829", "5735", ")", "divide(", "#0", "5735", ")", "EOF", "junk"]
    assert tokens_to_program(toks) == "subtract(5829, 5735), divide(#0, 5735)"
    assert tokens_to_program(["add(", "1,234", "1", ")", "EOF"]) == "add(1234, 1)"
    assert program_to_tokens("table_max(a, b, none)") == ["table_max(", "a, b", "none", ")", "EOF"]
    with pytest.raises(ProgramSyntaxError):
        tokens_to_program(["add(", "1", "2", "EOF"])
    with pytest.raises(UnknownOperationError):
        tokens_to_program(["plus(", "1", "2", ")", "EOF"])
    with pytest.raises(ProgramSyntaxError):
        tokens_to_program(["add(", "1", "2", "3", "EOF"])
    with pytest.raises(ProgramSyntaxError):
        tokens_to_program(["EOF"])
    with pytest.raises(ProgramSyntaxError):
        tokens_to_program("add(1, 2)")  # a string is not a token list


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "program, error, position, reason",
    [
        ("", ProgramSyntaxError, 0, "empty program"),
        ("   ", ProgramSyntaxError, 0, "empty program"),
        ("add(1, 2", ProgramSyntaxError, 8, "expected ')'"),
        ("add 1, 2)", ProgramSyntaxError, 4, "expected '('"),
        ("add(1, 2) divide(#0, 3)", ProgramSyntaxError, 10, "expected ','"),
        ("add(1, )", ProgramSyntaxError, 7, "missing argument"),
        ("add(1, add(2, 3))", ProgramSyntaxError, 10, "do not nest"),
        ("(1, 2)", ProgramSyntaxError, 0, "operation name"),
        ("add(1, 2),", ProgramSyntaxError, 10, "operation name"),
        ("sum(1, 2)", UnknownOperationError, 0, "unknown operation 'sum'"),
        ("add(1, 2), Divide(#0, 2)", UnknownOperationError, 11, "unknown operation 'Divide'"),
        ("divide(#0, 2)", StepReferenceError, 7, "#0 refers to step 0"),
        ("add(1, 2), divide(#1, 2)", StepReferenceError, 18, "#1 refers to step 1"),
        ("add(1, 2), divide(#x, 2)", StepReferenceError, 18, "bad step reference"),
        ("add(1)", ArgumentError, 5, "takes 2 arguments, got 1"),
        ("add(1, 2, 3)", ArgumentError, 8, "got more"),
        ("add(net sales, 2)", ArgumentError, 4, "row name goes in a table_"),
        ("add(const_x, 2)", ArgumentError, 4, "unknown constant"),
        ("table_max(net sales)", ArgumentError, 10, "takes 2 arguments"),
        ("table_max(#0, none)", ArgumentError, 10, "not a step reference"),
        ("table_max(, none)", ProgramSyntaxError, 10, "missing row name"),
        ("table_max(net sales, none", ProgramSyntaxError, 9, "missing ')'"),
        ("add(1" + "0" * 400 + ", 1)", ArgumentError, 4, "too large"),
    ],
)
def test_parse_errors_name_position_and_reason(program, error, position, reason):
    with pytest.raises(error) as info:
        parse(program)
    assert info.value.position == position
    assert reason in info.value.reason
    assert f"(at position {position})" in str(info.value)
    assert isinstance(info.value, ProgramError) and isinstance(info.value, FingrpoError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "program, table, error, reason",
    [
        ("divide(1, 0)", None, DivisionByZeroError, "divides by zero"),
        ("subtract(2, 2), divide(1, #0)", None, DivisionByZeroError, "divides by zero"),
        ("exp(0, -1)", None, DivisionByZeroError, "divides by zero"),
        ("table_max(revenue, none)", TABLE, MissingRowError, "no table row named 'revenue'"),
        ("table_max(net sale, none)", TABLE, MissingRowError, "closest row is 'net sales'"),
        ("table_max(net sales, none)", None, MissingRowError, "needs a table"),
        ("table_sum(with dash, none)", TABLE, ArgumentError, "column 2 cell '-' is not a number"),
        ("table_sum(empty, none)", TABLE, ArgumentError, "column 1 cell '' is not a number"),
        ("table_sum(only name, none)", TABLE, ArgumentError, "has no cells"),
        ("greater(2, 1), add(#0, 1)", None, ArgumentError, "comparison result"),
        ("exp(10, 400)", None, ArgumentError, "overflows"),
        ("multiply(1e300, 1e300)", None, ArgumentError, "overflows"),
        ("exp(-8, 0.5)", None, ArgumentError, "no real result"),
    ],
)
def test_execution_errors(program, table, error, reason):
    with pytest.raises(error) as info:
        execute(program, table)
    assert reason in str(info.value)
    assert info.value.position is not None


def test_non_string_program_is_a_syntax_error():
    with pytest.raises(ProgramSyntaxError):
        parse(None)  # type: ignore[arg-type]
    with pytest.raises(ProgramSyntaxError):
        parse("add(1, 2)" * 5000)  # longer than any program


def test_the_module_never_evaluates_text():
    source = Path(__import__("fingrpo.dsl", fromlist=["x"]).__file__).read_text()
    assert not re.search(r"(?<![.\w])(eval|exec|literal_eval|compile)\(", source)  # re.compile is fine


def test_malicious_text_is_rejected_not_run():
    for text in ["__import__('os').system('echo hi')", "add(1, 2); import os", "add(1, 2)\nexec('x')"]:
        with pytest.raises(ProgramError):
            execute(text)


# ---------------------------------------------------------------------------------- properties

_value = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(0.001, 1e6, allow_nan=False).map(lambda f: f"{f:.3f}"),
    st.integers(0, 100).map(lambda i: f"{i}%"),
    st.sampled_from(["const_100", "const_1000", "const_m1", "const_2"]),
)


@st.composite
def _programs(draw):
    n = draw(st.integers(1, 5))
    steps = []
    for i in range(n):
        op = draw(st.sampled_from(["add", "subtract", "multiply", "divide", "exp", "greater", "table_sum"]))
        if op == "table_sum":
            steps.append(f"table_sum({draw(st.sampled_from(['net sales', 'total ( in millions, net )']))}, none)")
            continue
        args = [draw(st.one_of(_value, st.integers(0, i - 1).map(lambda k: f"#{k}"))) if i else draw(_value) for _ in range(2)]
        ws = draw(st.sampled_from(["", " ", "  "]))
        steps.append(f"{op}({ws}{args[0]}{ws},{ws}{args[1]})")
    return ", ".join(steps)


@settings(max_examples=200, deadline=None)
@given(_programs())
def test_format_round_trip_property(program):
    steps = parse(program)
    assert parse(format_program(steps)) == steps
    assert parse(tokens_to_program(program_to_tokens(steps))) == steps
    try:
        a = execute(program, TABLE)
    except ProgramError:
        return  # division by zero, overflow, comparison used as a number: errors, never garbage
    b = execute(format_program(steps), TABLE)
    assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_text_parses_or_raises_program_error(text):
    try:
        steps = parse(text)
    except ProgramError:
        return
    assert parse(format_program(steps)) == steps
