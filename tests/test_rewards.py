"""Rewards: exact values on correct / wrong / garbage completions, the registry, failure isolation."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fingrpo.errors import ConfigError, DataError
from fingrpo.rewards import (
    REWARD_REGISTRY,
    AnswerCorrectnessReward,
    CombinedReward,
    FinancialQAReward,
    FormatReward,
    NumbersFromContextReward,
    OperationReward,
    ProgramExecutionReward,
    RandomReward,
    RewardFunction,
    Target,
    WeightedReward,
    build_rewards,
    numbers_in_text,
    reward_completions,
)

ROOT = Path(__file__).resolve().parents[1]

GOLD = {"exe_ans": 94.0, "program": "subtract(5829, 5735)", "table": None, "target": "Program: subtract(5829, 5735)\nAnswer: 94"}
PROMPT = "Revenue was $ 5,829 million in 2009 and $ 5,735 million in 2008. What was the change?"
CORRECT = "Program: subtract(5829, 5735)\nAnswer: 94"
WRONG = "Program: add(5829, 5735)\nAnswer: 11564"
TABLE = [["", "2009", "2008"], ["net revenue", "$ 5,829", "$ 5,735"], ["expenses", "1,000", "900"]]

GARBAGE = [
    "",
    "   \n\t ",
    "🤑💸 ünïcödé ∑∫ — résumé",
    "Program: divide(1, 0)\nAnswer: inf",
    "Program: multiply(1e308, 1e308)\nAnswer: 1e400",
    "Answer: 9" * 5 + "9" * 400,
    "Program: " + "add(" * 500 + "1, 2" + ")" * 500 + "\nAnswer: 3",
    "Program: subtract(#7, 3)\nAnswer: nan",
    "Program: table_sum(no such row, none)\nAnswer: 1",
    "x" * 10_000,
    "Program: add(1, 2)\nAnswer: 3\n" * 600,
    "\x00\x01\x02 Program:\x00 Answer:",
    "0000000000000000000000000000",
]


# ------------------------------------------------------------------ targets


def test_target_coercion_from_every_accepted_form():
    example = SimpleNamespace(exe_ans=94.0, program="subtract(5829, 5735)", table=TABLE, target=CORRECT)
    record = {"id": "X/2009/page_1.pdf-1", "table": TABLE, "qa": {"exe_ans": 94.0, "program": "subtract(5829, 5735)"}}
    for target in (GOLD, example, record, CORRECT):
        t = Target.coerce(target)
        assert t.exe_ans == 94.0 and t.program == "subtract(5829, 5735)"
    assert Target.coerce(example).table == TABLE
    assert Target.coerce(record).table == TABLE
    assert Target.coerce("yes").exe_ans == "yes"  # a bare gold answer
    assert Target.coerce({"target": "Program: add(1, 2)\nAnswer: 3"}).exe_ans == 3.0
    assert Target.coerce(None) is None


def test_target_of_unknown_type_or_bad_field_is_a_data_error():
    with pytest.raises(DataError, match="int"):
        Target.coerce(42)
    with pytest.raises(DataError, match="exe_ans"):
        Target.coerce({"exe_ans": [1, 2]})
    with pytest.raises(DataError, match="table"):
        Target.coerce({"exe_ans": 1.0, "table": "a | b"})


# ------------------------------------------------------------------ verifiable rewards


def test_answer_correctness_exact_values():
    r = AnswerCorrectnessReward()
    assert r(PROMPT, CORRECT, GOLD) == 1.0
    assert r(PROMPT, WRONG, GOLD) == 0.0
    assert r(PROMPT, "Program: subtract(5829, 5735)", GOLD) == 0.0  # a program alone states no answer
    assert r(PROMPT, "Answer: 94.05", GOLD) == 1.0  # within rel_tol=1e-3
    assert r(PROMPT, "Answer: 94.2", GOLD) == 0.0
    assert r(PROMPT, "Answer: 34.72%", {"exe_ans": 0.34719}) == 1.0  # percent vs fraction
    assert r(PROMPT, "Answer: yes", {"exe_ans": "yes"}) == 1.0
    assert r(PROMPT, "Answer: no", {"exe_ans": "yes"}) == 0.0
    assert r(PROMPT, CORRECT, CORRECT) == 1.0  # target string
    assert r(PROMPT, CORRECT, None) == 0.0  # no target: nothing to verify
    assert AnswerCorrectnessReward(rel_tol=0.01)(PROMPT, "Answer: 94.5", GOLD) == 1.0


def test_program_execution_exact_values_and_partial_credit():
    r = ProgramExecutionReward()
    assert r(PROMPT, CORRECT, GOLD) == 1.0
    assert r(PROMPT, "Program: subtract(5829, 5735)\nAnswer: 7", GOLD) == 1.0  # the program decides
    assert r(PROMPT, WRONG, GOLD) == 0.1  # runs, wrong value
    assert r(PROMPT, "Program: divide(1, 0)\nAnswer: 1", GOLD) == 0.0
    assert r(PROMPT, "Program: subtract(5829\nAnswer: 94", GOLD) == 0.0  # does not parse
    assert r(PROMPT, "Answer: 94", GOLD) == 0.0  # no program
    assert r(PROMPT, CORRECT, None) == 0.0
    assert ProgramExecutionReward(partial_credit=0.0)(PROMPT, WRONG, GOLD) == 0.0
    with pytest.raises(ConfigError, match="partial_credit"):
        ProgramExecutionReward(partial_credit=1.0)


def test_program_execution_uses_the_records_table():
    r = ProgramExecutionReward()
    gold = {"exe_ans": 11564.0, "table": TABLE}
    assert r("q", "Program: table_sum(net revenue, none)\nAnswer: 11564", gold) == 1.0
    assert r("q", "Program: table_sum(expenses, none)\nAnswer: 1900", gold) == 0.1
    assert r("q", "Program: table_sum(no such row, none)\nAnswer: 1", gold) == 0.0  # missing row
    assert r("q", "Program: table_sum(net revenue, none)", {"exe_ans": 11564.0}) == 0.0  # no table given


def test_format_reward_exact_values():
    r = FormatReward()
    assert r("q", CORRECT) == 1.0
    assert r("q", "```\nProgram: add(1, 2)\nAnswer: 3\n```") == 1.0
    assert r("q", "Program: add(1,\nAnswer: 3") == 0.5  # labels right, program does not parse
    assert r("q", "Answer: 3\nProgram: add(1, 2)") == 0.5  # wrong order
    assert r("q", "add(1, 2) gives the answer is 3") == 0.5  # no labels
    assert r("q", "Program: add(1, 2)") == 0.0  # no answer
    assert r("q", "The answer is unclear.") == 0.0
    assert r("q", "") == 0.0


def test_numbers_from_context_exact_values():
    r = NumbersFromContextReward()
    assert r(PROMPT, CORRECT) == 1.0
    assert r(PROMPT, "Program: subtract(5829, 17)\nAnswer: 1") == 0.5
    assert r(PROMPT, "Program: divide(-5829, 5735%)\nAnswer: 1") == 1.0  # sign and % ignored
    assert r(PROMPT, "Program: subtract(5829, 5735), divide(#0, const_100)") == 1.0  # consts/refs neutral
    assert r(PROMPT, "Program: add(const_1, const_2)") == 0.0  # nothing groundable
    assert r(PROMPT, "Answer: 94") == 0.0  # no program
    assert r(PROMPT, "Program: add(5829, 5735") == 0.0  # unparsable
    # row names count when the table (given through the target) or the prompt holds them
    assert r("q", "Program: table_sum(net revenue, none)", {"exe_ans": 1.0, "table": TABLE}) == 1.0
    assert r("q", "Program: table_sum(net income, none)", {"exe_ans": 1.0, "table": TABLE}) == 0.0
    assert r("q", "Program: add(900, 3)", {"exe_ans": 1.0, "table": TABLE}) == 0.5


def test_numbers_in_text():
    assert numbers_in_text("$ 5,829 (12) 1.5% and .5") == frozenset({5829.0, 12.0, 1.5, 0.5})
    assert numbers_in_text("no digits") == frozenset()


def test_operation_reward_exact_values():
    r = OperationReward()
    gold = {"exe_ans": 0.016, "program": "subtract(5829, 5735), divide(#0, 5735)"}
    assert r("q", "Program: subtract(1, 2), divide(#0, 2)", gold) == 1.0
    assert r("q", "Program: divide(1, 2), subtract(#0, 2), divide(#1, 4)", gold) == 1.0  # sets, any order
    assert r("q", "Program: divide(5829, 5735)", gold) == 0.5
    assert r("q", "Program: subtract(1, 2), add(#0, 3), multiply(#1, 2)", gold) == 0.25
    assert r("q", "Program: add(1, 2)", gold) == 0.0
    assert r("q", "Answer: 0.016", gold) == 0.0
    assert r("q", "Program: subtract(1, 2)", {"exe_ans": 1.0}) == 0.0  # gold has no program
    assert r("q", "Program: subtract(1, 2)", None) == 0.0


def test_random_reward_is_seeded_uniform_and_ignores_the_completion():
    a, b, c = RandomReward(seed=7), RandomReward(seed=7), RandomReward(seed=8)
    xs = [a("q", "x") for _ in range(200)]
    assert xs == [b("p", "completely different", GOLD) for _ in range(200)]
    assert xs[:10] != [c("q", "x") for _ in range(10)]
    assert all(0.0 <= x < 1.0 for x in xs)
    assert 0.4 < sum(xs) / len(xs) < 0.6


# ------------------------------------------------------------------ the heuristic


def test_financial_qa_exact_value_and_components():
    r = FinancialQAReward()
    text = "Revenue increased by $ 94 million because sales grew."
    c = r.components(text)
    # keywords: revenue, increased, million, sales = 4/5; analysis: "because" = 1/3; 9 words -> length 1;
    # numbers: 94 = 1/3; symbols: $, million = 2/2
    assert c == {"keywords": 0.8, "analysis": pytest.approx(1 / 3), "length": 1.0, "numeric": pytest.approx(1 / 3),
                 "currency": 1.0, "similarity": 0.0, "exact_match": 0.0, "repetition": 0.0}
    expected = 0.15 * 0.8 + 0.10 / 3 + 0.15 + 0.15 / 3 + 0.05
    assert r("q", text) == pytest.approx(expected)
    # with the target: exact answer match and word overlap add credit
    with_target = r("q", text, GOLD)
    assert with_target == pytest.approx(expected + 0.20 + 0.20 * r.components(text, GOLD)["similarity"])
    assert r.components(text, GOLD)["exact_match"] == 1.0
    assert r.components("it was 1945", GOLD)["exact_match"] == 0.0


def test_financial_qa_length_optimum_is_5_to_50_words():
    r = FinancialQAReward()
    assert [r.length_score(n) for n in (0, 1, 4, 5, 20, 50, 51, 125, 200, 1000)] == [
        0.0, 0.2, 0.8, 1.0, 1.0, 1.0, pytest.approx(1 - 1 / 150), 0.5, 0.0, 0.0]
    def word(i):  # distinct letter-only filler words ("ba", "bb", ...): no keyword, number or repetition
        return "b" + "".join(chr(97 + int(d)) for d in str(i))

    def score(n):  # only the length component varies
        return r("q", " ".join(word(i) for i in range(n)))
    assert score(3) < score(5) == score(30) == score(50) > score(120) > score(250)
    assert score(30) == pytest.approx(0.15)


def test_financial_qa_weights_are_configurable_and_range_is_clipped():
    only_length = FinancialQAReward(keywords=0, analysis=0, length=1.0, numeric=0, currency=0, similarity=0,
                                    exact_match=0, repetition=0)
    assert only_length("q", "one two three four five six") == 1.0
    assert FinancialQAReward(length=5.0)("q", "one two three four five six") == 1.0  # clipped at 1
    assert FinancialQAReward(repetition=3.0)("q", "loss loss loss loss loss loss") == -1.0  # clipped at -1
    assert FinancialQAReward()("q", "loss loss loss loss loss loss") < 0  # repetition penalty
    with pytest.raises(ConfigError):
        FinancialQAReward(min_words=60, max_words=50)


# ------------------------------------------------------------------ garbage never raises


@pytest.mark.parametrize("name", sorted(REWARD_REGISTRY))
@pytest.mark.parametrize("completion", GARBAGE, ids=range(len(GARBAGE)))
def test_no_reward_raises_on_garbage(name, completion):
    r = REWARD_REGISTRY[name]()
    for target in (GOLD, None, CORRECT, {"exe_ans": "yes", "table": TABLE}):
        value = r(PROMPT, completion, target)
        assert isinstance(value, float) and math.isfinite(value)
        lo, hi = (-1.0, 1.0) if name == "financial_qa" else (0.0, 1.0)
        assert lo <= value <= hi


def test_verifiable_rewards_give_no_credit_to_garbage():
    for completion in GARBAGE:
        for cls in (AnswerCorrectnessReward, ProgramExecutionReward, OperationReward):
            runs = cls is ProgramExecutionReward and completion.startswith("Program: add(1, 2)")
            expected = 0.1 if runs else 0.0  # the repeated block holds a runnable (wrong) program
            assert cls()(PROMPT, completion, GOLD) == expected, (cls.__name__, completion[:40])


# ------------------------------------------------------------------ registry and config


def test_every_name_in_params_yaml_resolves():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    names = list(params["rewards"]["weights"])
    assert names and all(n in REWARD_REGISTRY for n in names)
    from fingrpo.config import load_config

    cfg = load_config(ROOT / "params.yaml")
    built = build_rewards(cfg.rewards)
    assert [w.name for w in built] == names
    assert [w.weight for w in built] == [float(params["rewards"]["weights"][n]) for n in names]
    for w in built:
        assert isinstance(w.function, REWARD_REGISTRY[w.name]) and w.function.name == w.name


def test_registry_names_match_class_names():
    for name, cls in REWARD_REGISTRY.items():
        assert issubclass(cls, RewardFunction) and cls.name == name


def test_build_rewards_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        build_rewards({"weights": {"correctness": 1.0, "corectness": 0.5}})
    msg = str(err.value)
    assert "'corectness'" in msg and all(n in msg for n in REWARD_REGISTRY)
    with pytest.raises(ConfigError, match="at least one"):
        build_rewards({"weights": {}})
    with pytest.raises(ConfigError, match="finite"):
        build_rewards({"weights": {"format": float("nan")}})


def test_build_rewards_passes_config_values():
    from fingrpo.config import config_from_dict

    cfg = config_from_dict({"rewards": {"weights": {"correctness": 1.0, "program_execution": 0.5, "random": 0.0},
                                        "rel_tolerance": 0.05, "program_partial_credit": 0.25, "random_seed": 11}})
    correctness, program, rnd = (w.function for w in build_rewards(cfg.rewards))
    assert correctness.rel_tol == 0.05 and program.rel_tol == 0.05 and program.partial_credit == 0.25
    assert rnd("q", "x") == RandomReward(seed=11)("q", "x")
    assert correctness("q", "Answer: 98", GOLD) == 1.0  # 4% off, inside 5%
    assert program("q", WRONG, GOLD) == 0.25


# ------------------------------------------------------------------ scoring and failure isolation


class _Flaky(RewardFunction):
    """Raises on completions containing 'boom', NaN on 'nan', inf on 'inf', None (abstain) on 'skip'."""

    name = "flaky"

    def __call__(self, prompt, completion, target=None):
        if "boom" in completion:
            raise RuntimeError("kaboom")
        if "nan" in completion:
            return float("nan")
        if "inf" in completion:
            return float("inf")
        if "skip" in completion:
            return None
        return 1.0


def test_score_completions_weights_and_per_function_values():
    rewards = build_rewards({"weights": {"correctness": 1.0, "program_execution": 0.5, "format": 0.2}})
    res = reward_completions(rewards, [PROMPT] * 3, [CORRECT, WRONG, "no idea"], [GOLD] * 3)
    assert res.per_function == {"correctness": [1.0, 0.0, 0.0], "program_execution": [1.0, 0.1, 0.0],
                                "format": [1.0, 1.0, 0.0]}
    assert res.total == pytest.approx([1.7, 0.25, 0.0])
    assert res.failures == {"correctness": 0, "program_execution": 0, "format": 0}
    assert res.means()["program_execution"] == pytest.approx(1.1 / 3)


def test_score_completions_substitutes_and_counts_failures():
    rewards = [WeightedReward("flaky", 2.0, _Flaky()), WeightedReward("format", 1.0, FormatReward())]
    completions = ["ok", "boom", "nan", "inf", "skip", CORRECT]
    res = reward_completions(rewards, ["q"] * 6, completions, None, nan_value=-0.5)
    assert res.per_function["flaky"] == [1.0, -0.5, -0.5, -0.5, -0.5, 1.0]
    assert res.failures == {"flaky": 3, "format": 0}  # abstaining (None) is not a failure
    assert "kaboom" in res.errors["flaky"]
    assert res.total == pytest.approx([2.0, -1.0, -1.0, -1.0, -1.0, 3.0])


def test_score_completions_survives_a_failing_batch_method():
    class BadBatch(FormatReward):
        def batch(self, prompts, completions, targets=None):
            return [1.0]  # wrong length: scored one by one instead

    class Explodes(FormatReward):
        def batch(self, prompts, completions, targets=None):
            raise MemoryError("batch too big")

    for cls in (BadBatch, Explodes):
        res = reward_completions([cls()], ["q", "q"], [CORRECT, "nothing"])
        assert res.per_function["format"] == [1.0, 0.0] and res.failures == {"format": 0}


def test_score_completions_accepts_plain_reward_functions_and_checks_lengths():
    res = reward_completions([FormatReward(), OperationReward()], ["q"], [CORRECT], [GOLD])
    assert res.total == [2.0] and set(res.per_function) == {"format", "operation"}
    with pytest.raises(ValueError, match="2 prompts, 1 completions"):
        reward_completions([FormatReward()], ["q", "q"], [CORRECT])
    with pytest.raises(ConfigError, match="duplicate"):
        reward_completions([FormatReward(), FormatReward()], ["q"], [CORRECT])


def test_combined_reward_and_default_batch():
    combined = CombinedReward(build_rewards({"weights": {"correctness": 1.0, "format": 0.2}}))
    assert combined("q", CORRECT, GOLD) == pytest.approx(1.2)
    assert combined.batch(["q", "q"], [CORRECT, WRONG], [GOLD, GOLD]) == pytest.approx([1.2, 0.2])
    assert FormatReward().batch(["q"], [CORRECT]) == [1.0]


# ------------------------------------------------------------------ real records


def test_gold_programs_of_real_records_earn_full_verifiable_rewards(data_dir):
    import json

    records = json.loads((data_dir / "train.json").read_text())
    prog, numbers = ProgramExecutionReward(), NumbersFromContextReward()
    grounded = []
    for rec in records:
        qa = rec["qa"]
        completion = f"Program: {qa['program']}\nAnswer: {qa['exe_ans']}"
        context = "\n".join(rec["pre_text"] + rec["post_text"])
        assert prog("q", completion, rec) == 1.0, rec["id"]
        assert AnswerCorrectnessReward()("q", completion, rec) == 1.0, rec["id"]
        assert OperationReward()("q", completion, rec) == 1.0, rec["id"]
        grounded.append(numbers(context, completion, rec))
    # gold programs copy their operands from the report (text or table); a few use derived numbers
    assert sum(grounded) / len(grounded) > 0.9


def test_docstring_examples_hold():
    import doctest

    import fingrpo.rewards

    result = doctest.testmod(fingrpo.rewards, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 20 and result.failed == 0


def test_real_prompt_examples_as_targets(data_dir):
    """The trainer's path: PromptExamples from the data module, prompts rendered as the model sees them."""
    from fingrpo.config import load_config
    from fingrpo.data.finqa import load_split
    from fingrpo.data.prompts import make_examples, render_prompt

    cfg = load_config(ROOT / "params.yaml", ["prompt.context_mode=gold"])  # the gold facts: every gold number shown
    records = load_split(data_dir / "train.json")[:30]
    examples = make_examples(records, cfg.prompt, few_shot_records=records)
    prompts = [render_prompt(e, None, use_chat_template=False) for e in examples]
    rewards = build_rewards({"weights": {n: 1.0 for n in REWARD_REGISTRY if n not in ("random", "financial_qa")}})
    gold = reward_completions(rewards, prompts, [e.target for e in examples], examples)
    assert gold.means() == {"correctness": 1.0, "program_execution": 1.0, "format": 1.0,
                            "numbers_from_context": 1.0, "operation": 1.0}
    assert all(v == 0 for v in gold.failures.values())
    # a well-formed but wrong answer keeps only the format credit and its shaped partial credits
    wrong = reward_completions(rewards, prompts, ["Program: add(1, 2)\nAnswer: 3"] * len(prompts), examples)
    assert wrong.means()["correctness"] == 0.0 and wrong.means()["format"] == 1.0
    assert max(wrong.per_function["program_execution"]) == 0.1
