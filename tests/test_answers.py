"""Answer normalisation and completion parsing."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fingrpo.answers import extract_program, normalize_answer, parse_completion

NORMALISER_CASES = [
    # plain numbers, signs, decimals
    ("94", 94.0),
    ("94.0", 94.0),
    (".2", 0.2),
    ("-52", -52.0),
    ("+7", 7.0),
    ("0", 0.0),
    ("1e3", 1000.0),
    ("  12.5  ", 12.5),
    # currency and thousands separators
    ("$94", 94.0),
    ("$ 1,234", 1234.0),
    ("1,234,567.89", 1234567.89),
    ("-$1,200", -1200.0),
    ("$-1,200", -1200.0),
    ("€ 3.5", 3.5),
    # percent -> fraction
    ("24.69%", 0.2469),
    ("-12.5%", -0.125),
    ("5 %", 0.05),
    ("34.7 percent", 0.347),
    ("100%", 1.0),
    # accounting negatives
    ("(12)", -12.0),
    ("( 12 )", -12.0),
    ("(1,234.5)", -1234.5),
    ("( 12 % )", -0.12),
    ("$(12)", -12.0),
    ("($12)", -12.0),
    # scale words are not applied (FinQA values are in the table's units)
    ("3.8 million", 3.8),
    ("$ 5.2 billion", 5.2),
    ("12 thousand", 12.0),
    ("4.5bn", 4.5),
    # unicode minus and dashes
    ("\u22125", -5.0),
    ("\u2013 3.2", -3.2),
    ("\uff0d7", -7.0),
    # trailing period, quotes, markdown
    ("94.", 94.0),
    ("**94**", 94.0),
    ("`0.25`", 0.25),
    ('"17"', 17.0),
    # text around the number
    ("the answer is 25.3%.", 0.253),
    ("approximately 1.6% increase", 0.016),
    ("25% (from 120 to 150)", 0.25),
    ("150 - 120 = 30", 30.0),
    ("(150 - 120) / 120 = 0.25", 0.25),
    ("about $ 3.9 million in 2019", 3.9),
    # yes / no
    ("yes", "yes"),
    ("Yes.", "yes"),
    ("no", "no"),
    ("NO", "no"),
    ("true", "yes"),
    ("False", "no"),
    ("yes, it is greater", "yes"),
    # no answer
    ("", None),
    ("   ", None),
    ("n/a", None),
    ("not available", None),
    ("I cannot tell", None),
    ("yes or no", None),
    ("$", None),
    ("-", None),
    ("%", None),
    # non-strings
    (None, None),
    (True, None),
    (3, 3.0),
    (2.5, 2.5),
    (float("nan"), None),
    ([1, 2], None),
]


@pytest.mark.parametrize("text, expected", NORMALISER_CASES)
def test_normalize_answer(text, expected):
    got = normalize_answer(text)
    if isinstance(expected, float):
        assert isinstance(got, float) and math.isclose(got, expected, rel_tol=1e-12), got
    else:
        assert got == expected


def test_there_are_at_least_forty_normaliser_cases():
    assert len(NORMALISER_CASES) >= 40


def test_overflowing_number_is_no_answer():
    assert normalize_answer("1" + "0" * 400) is None


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80))
def test_normalize_answer_never_raises(text):
    value = normalize_answer(text)
    assert value is None or value in ("yes", "no") or (isinstance(value, float) and math.isfinite(value))


# ---------------------------------------------------------------------------------- completions


def test_well_formed_completion():
    pc = parse_completion("Program: subtract(5829, 5735), divide(#0, 5735)\nAnswer: 1.6%")
    assert pc.program == "subtract(5829, 5735), divide(#0, 5735)"
    assert pc.answer_text == "1.6%"
    assert pc.answer_value == pytest.approx(0.016)
    assert pc.format_ok and pc.program_ok and pc.program_error is None


@pytest.mark.parametrize(
    "completion, program, answer_value",
    [
        # extra whitespace, markdown labels, final answer
        ("  program :   add(1, 2)  \n\n  ANSWER:  3  ", "add(1, 2)", 3.0),
        ("**Program:** add(1, 2)\n**Answer:** 3", "add(1, 2)", 3.0),
        ("Program: add(1, 2)\nFinal answer: 3", "add(1, 2)", 3.0),
        # code fences
        ("```\nProgram: add(1, 2)\nAnswer: 3\n```", "add(1, 2)", 3.0),
        ("```text\nProgram: add(1, 2)\nAnswer: 3\n```\nThat's it.", "add(1, 2)", 3.0),
        # trailing prose after the program on its line
        ("Program: add(1, 2) because we add them.\nAnswer: 3", "add(1, 2)", 3.0),
        ("Program: table_max(net sales, none), divide(#0, 2) then stop\nAnswer: 600", "table_max(net sales, none), divide(#0, 2)", 600.0),
        # label alone, program on the next line
        ("Program:\nadd(1, 2)\nAnswer: 3", "add(1, 2)", 3.0),
        # leading reasoning, then the asked-for lines
        ("Let me think. We need the sum.\nProgram: add(1, 2)\nAnswer: 3\nExtra text", "add(1, 2)", 3.0),
        # yes/no answers
        ("Program: greater(5, 3)\nAnswer: yes", "greater(5, 3)", "yes"),
    ],
)
def test_tolerated_variants_are_format_ok(completion, program, answer_value):
    pc = parse_completion(completion)
    assert pc.program == program
    assert pc.answer_value == answer_value
    assert pc.format_ok


@pytest.mark.parametrize(
    "completion, program, answer_value, program_ok",
    [
        # missing Program: prefix: program still found, format not followed
        ("add(1, 2)\nAnswer: 3", "add(1, 2)", 3.0, True),
        ("We compute subtract(10, 4) which gives\nAnswer: 6", "subtract(10, 4)", 6.0, True),
        # wrong order
        ("Answer: 3\nProgram: add(1, 2)", "add(1, 2)", 3.0, True),
        # missing answer line
        ("Program: add(1, 2)", "add(1, 2)", None, True),
        ("Program: add(1, 2)\nSo the answer is 3.", "add(1, 2)", 3.0, True),
        # program does not parse
        ("Program: add(1, 2\nAnswer: 3", "add(1, 2", 3.0, False),
        ("Program: sum of revenues\nAnswer: 3", "sum of revenues", 3.0, False),
        ("Program: divide(#3, 2)\nAnswer: 3", "divide(#3, 2)", 3.0, False),
        # nothing at all
        ("I don't know.", None, None, False),
        ("", None, None, False),
    ],
)
def test_format_not_followed(completion, program, answer_value, program_ok):
    pc = parse_completion(completion)
    assert pc.program == program
    assert pc.answer_value == answer_value
    assert pc.program_ok is program_ok
    assert not pc.format_ok
    if program is not None and not program_ok:
        assert pc.program_error and "position" in pc.program_error


def test_answer_after_program_is_preferred():
    pc = parse_completion("Answer: 1\nProgram: add(1, 2)\nAnswer: 3")
    assert pc.answer_value == 3.0 and pc.format_ok


def test_non_string_completion():
    pc = parse_completion(None)
    assert pc.program is None and pc.answer_value is None and not pc.format_ok


def test_extract_program_stops_at_prose():
    assert extract_program("x add(1, 2), divide(#0, 3). And then add(4, 5)") == "add(1, 2), divide(#0, 3)"
    assert extract_program("no program here") is None
    assert extract_program("table_sum(total (in millions), none), add(#0, 1)") == "table_sum(total (in millions), none), add(#0, 1)"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_parse_completion_never_raises(text):
    pc = parse_completion(text)
    assert isinstance(pc.format_ok, bool)


def test_huge_completion_is_cut_not_slow():
    pc = parse_completion("Program: add(1, 2)\nAnswer: 3\n" + "(" * 200_000)
    assert pc.format_ok


def test_execute_completion_parses_then_runs_the_program_on_the_table():
    from fingrpo.answers import execute_completion

    table = [["", "2019", "2018"], ["revenue", "120", "100"]]
    parsed, run = execute_completion("Program: subtract(120, 100), divide(#0, 100)\nAnswer: 20%", table)
    assert parsed.format_ok and parsed.answer_value == pytest.approx(0.2)
    assert run.value == pytest.approx(0.2) and run.error is None and run.steps is not None
    parsed, run = execute_completion("Program: table_sum(costs, none)\nAnswer: 1", table)
    assert run.value is None and run.execute_failed and "costs" in run.error
    parsed, run = execute_completion("Program: divide(1,\nAnswer: 1", table)
    assert run.value is None and run.parse_failed and not run.execute_failed
    parsed, run = execute_completion("no program here", table)
    assert parsed.program is None and run.value is None and not run.parse_failed and run.error is None
