"""Reward functions for GRPO on FinQA: the seed's heuristic, verifiable rewards, shaped partial credit.

Every reward follows the seed API ``reward(prompt, completion, target=None) -> float`` and has a
``batch(prompts, completions, targets) -> list[float | None]`` (a loop by default). The config names
rewards and their weights (``params.yaml``)::

    rewards:
      weights: {correctness: 1.0, program_execution: 0.5, format: 0.2}

and :func:`build_rewards` resolves those names through the one explicit map :data:`REWARD_REGISTRY`.
:func:`reward_completions` runs them over a rollout batch; a reward that raises or returns NaN/inf for a
completion gets ``nan_value`` there and the failure is counted, never propagated.

``target`` may be a :class:`fingrpo.data.prompts.PromptExample`, a FinQA record, a dict with
``exe_ans`` / ``table`` / ``program`` / ``target`` keys, or the target string
``"Program: subtract(5829, 5735)\\nAnswer: 94"`` (then it is parsed). With ``target=None`` the
verifiable rewards (everything that compares to a gold answer or program) return 0.0: there is nothing
to verify against, and 0.0 is the "no evidence of correctness" value of all of them.

>>> r = AnswerCorrectnessReward()
>>> r("q", "Program: subtract(5829, 5735)\\nAnswer: 94", {"exe_ans": 94.0})
1.0

Range of every reward: [0, 1], except :class:`FinancialQAReward` ([-1, 1]).
Parsing and execution come from :mod:`fingrpo.answers` (:func:`~fingrpo.answers.execute_completion`) and
:mod:`fingrpo.dsl`; the tolerant rule from :mod:`fingrpo.scoring`.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from fingrpo.answers import GARBAGE_ERRORS, execute_completion, normalize_answer, parse_completion
from fingrpo.dsl import parse
from fingrpo.errors import ConfigError, DataError
from fingrpo.scoring import tolerant_match

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import RewardsConfig

log = logging.getLogger(__name__)

# Errors a parser or interpreter may raise on garbage text (fingrpo.answers.GARBAGE_ERRORS). A reward turns
# them into "no credit"; anything else (a real bug) propagates to reward_completions, which counts it as a failure.


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What the verifiable rewards compare against (one record's gold).

    >>> Target.coerce({"exe_ans": 0.5, "program": "divide(1, 2)"}).exe_ans
    0.5
    """

    exe_ans: float | str | None = None
    program: str | None = None
    table: list[list[str]] | None = None
    text: str | None = None  # the target string "Program: ...\nAnswer: ..." (heuristic similarity)

    @classmethod
    def coerce(cls, target: Any) -> "Target | None":
        """``PromptExample`` / FinQA record / dict / target string / None -> :class:`Target` or None.

        >>> Target.coerce("Program: add(1, 2)\\nAnswer: 3").program
        'add(1, 2)'
        >>> Target.coerce(None) is None
        True
        """
        if target is None or isinstance(target, Target):
            return target
        if isinstance(target, str):
            return _target_from_text(target)
        if isinstance(target, Mapping):
            get = target.get
        elif hasattr(target, "exe_ans") or hasattr(target, "qa"):
            def get(key, default=None):
                return getattr(target, key, default)
        else:
            raise DataError(
                f"reward target of type {type(target).__name__} is not a PromptExample, FinQA record, dict or str"
            )
        qa = get("qa")  # a FinQA record (object or official dict): the gold lives under qa
        if qa is not None and get("exe_ans") is None:
            qget = qa.get if isinstance(qa, Mapping) else (lambda k, d=None: getattr(qa, k, d))
            exe_ans, program = qget("exe_ans"), qget("program")
        else:
            exe_ans, program = get("exe_ans"), get("program")
        text = get("target")
        if exe_ans is None and isinstance(text, str):  # a dict holding only the target string
            parsed = _target_from_text(text)
            exe_ans, program = parsed.exe_ans, program or parsed.program
        table = get("table")
        if table is not None and not isinstance(table, list):
            raise DataError(f"reward target field 'table' must be a list of rows, got {type(table).__name__}")
        if isinstance(exe_ans, str):
            exe_ans = _normalize_gold_text(exe_ans)
        elif exe_ans is not None and not isinstance(exe_ans, (int, float)):
            raise DataError(f"reward target field 'exe_ans' must be a number or 'yes'/'no', got {exe_ans!r}")
        return cls(
            exe_ans=float(exe_ans) if isinstance(exe_ans, (int, float)) and not isinstance(exe_ans, bool) else exe_ans,
            program=program if isinstance(program, str) and program.strip() else None,
            table=table,
            text=text if isinstance(text, str) else None,
        )


def _normalize_gold_text(text: str) -> float | str | None:
    """A gold answer given as text ("yes", "94", "34.7%") -> a value via :func:`fingrpo.answers.normalize_answer`."""
    return normalize_answer(text)


def _target_from_text(text: str) -> Target:
    """Parse the target string ``"Program: <program>\\nAnswer: <value>"`` (either line may be absent)."""
    parsed = parse_completion(text)
    exe_ans = parsed.answer_value
    if exe_ans is None and parsed.program is None:
        exe_ans = _normalize_gold_text(text)  # a bare answer such as "94" or "yes"
    return Target(exe_ans=exe_ans, program=parsed.program, text=text)


# --------------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------------


def safe_parse_completion(completion: str):
    """:func:`fingrpo.answers.parse_completion`, or None when the text defeats the parser.

    >>> safe_parse_completion("Program: add(1, 2)\\nAnswer: 3").answer_value
    3.0
    """
    if not isinstance(completion, str):
        return None
    try:
        return parse_completion(completion)
    except GARBAGE_ERRORS:
        return None


def safe_parse_program(program: str | None):
    """:func:`fingrpo.dsl.parse` -> steps, or None when there is no program or it does not parse.

    >>> [s.op for s in safe_parse_program("subtract(5, 3), divide(#0, 3)")]
    ['subtract', 'divide']
    >>> safe_parse_program("subtract(5") is None
    True
    """
    if not program:
        return None
    try:
        steps = parse(program)
    except GARBAGE_ERRORS:
        return None
    return steps or None


def answers_match(value: float | str | None, exe_ans: float | str | None, rel_tol: float = 1e-3) -> bool:
    """The tolerant FinQA rule (:func:`fingrpo.scoring.tolerant_match`), False for missing/garbage values.

    >>> answers_match(94.0, 94.0), answers_match(None, 94.0), answers_match(float("inf"), 94.0)
    (True, False, False)
    """
    if value is None or exe_ans is None:
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    try:
        return bool(tolerant_match(value, exe_ans, rel_tol=rel_tol))
    except GARBAGE_ERRORS:
        return False


_NUMBER_RE = re.compile(r"\d[\d,]*(?:\.\d+)?|\.\d+")


@functools.lru_cache(maxsize=512)
def numbers_in_text(text: str) -> frozenset[float]:
    """Absolute values of the numbers written in ``text`` (commas dropped; signs, ``$`` and ``%`` ignored).

    Cached: the G completions of a group share one prompt. Signs are ignored because FinQA writes
    negatives as ``(12)`` or "a decrease of 12" and programs as ``subtract(0, 12)`` or ``-12``.

    >>> sorted(numbers_in_text("revenue was $ 5,829 in 2009 (up 1.5%)"))
    [1.5, 2009.0, 5829.0]
    """
    found = set()
    for m in _NUMBER_RE.finditer(text):
        try:
            found.add(abs(float(m.group().replace(",", ""))))
        except ValueError:  # "1,,2" style runs
            continue
    return frozenset(found)


def _number_grounded(value: float, numbers: frozenset[float]) -> bool:
    """Does ``value`` (a program literal) appear among ``numbers``? (exact up to float noise; ``-12`` ~ ``12``)."""
    v = abs(value)
    return any(math.isclose(v, n, rel_tol=1e-9, abs_tol=1e-12) for n in numbers)


def program_operations(steps) -> list[str]:
    """The operation names of parsed steps, in order.

    >>> program_operations(safe_parse_program("subtract(5, 3), divide(#0, 3)"))
    ['subtract', 'divide']
    """
    return [s.op for s in steps or ()]


def _arg_kind(arg) -> str:
    """'number' | 'row' | 'const' | 'ref' | 'other' for a dsl argument (by class name: no import cycle)."""
    return {"Number": "number", "RowName": "row", "Const": "const", "StepRef": "ref"}.get(type(arg).__name__, "other")


def _number_value(arg) -> float | None:
    """A program literal's magnitude as written: ``Number("5%", 0.05)`` -> 5.0 (the prompt says "5%")."""
    text = getattr(arg, "text", None)
    if isinstance(text, str):
        try:
            return abs(float(text.strip().rstrip("%").replace(",", "")))
        except ValueError:
            pass
    v = getattr(arg, "value", None)
    return abs(float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _row_name(arg) -> str | None:
    """A table row name, or None for the placeholder second argument ``none`` of table operations."""
    name = getattr(arg, "name", None)
    return name if isinstance(name, str) and name.strip().lower() != "none" else None


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# --------------------------------------------------------------------------------------------------
# The reward API
# --------------------------------------------------------------------------------------------------


class RewardFunction:
    """Seed API: ``reward(prompt, completion, target=None) -> float``; ``batch`` loops over it.

    Subclasses implement :meth:`__call__` (pure: no state between calls, except :class:`RandomReward`)
    and set ``name`` (the registry name). ``batch`` may return None for a completion to abstain.
    """

    name: str = "reward"

    def __call__(self, prompt: str, completion: str, target: Any = None) -> float:  # pragma: no cover
        raise NotImplementedError

    def batch(
        self, prompts: Sequence[str], completions: Sequence[str], targets: Sequence[Any] | None = None
    ) -> list[float | None]:
        """One reward per completion; ``targets`` default to None for all.

        >>> FormatReward().batch(["q", "q"], ["Program: add(1, 2)\\nAnswer: 3", "no idea"])
        [1.0, 0.0]
        """
        targets = [None] * len(completions) if targets is None else targets
        return [self(p, c, t) for p, c, t in zip(prompts, completions, targets, strict=True)]

    @classmethod
    def from_config(cls, rewards_cfg: "RewardsConfig | Mapping[str, Any]") -> "RewardFunction":
        """Build from the ``rewards`` config section (default: no arguments)."""
        return cls()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FinancialQAReward(RewardFunction):
    """The seed's heuristic: does the completion read like a short, numeric, on-topic financial answer?

    Score = sum of weighted components, each in [0, 1], minus a repetition penalty, clipped to [-1, 1].
    With the default weights (they sum to 1.0) the score lies in [-0.5, 1.0]:

    ==================  ======  ===============================================================
    component           weight  value in [0, 1]
    ==================  ======  ===============================================================
    ``keywords``         0.15   financial keywords present / 5 (capped at 1)
    ``analysis``         0.10   analytical phrases present ("because", "due to", ...) / 3
    ``length``           0.15   1 for 5-50 words; n/5 below; decays linearly to 0 at 200 words
    ``numeric``          0.15   numbers written / 3
    ``currency``         0.05   ``$``/``%``/scale words ("million") / 2
    ``similarity``       0.20   Jaccard overlap of word sets with the target text
    ``exact_match``      0.20   the target's answer text appears in the completion
    ``repetition``       0.50   subtracted when fewer than half the words (of > 3) are distinct
    ==================  ======  ===============================================================

    Without a target, ``similarity`` and ``exact_match`` give 0. Weights are constructor kwargs.

    >>> r = FinancialQAReward()
    >>> round(r("q", "Revenue increased by $ 94 million because sales grew."), 3)
    0.403
    """

    name = "financial_qa"
    FINANCIAL_KEYWORDS = frozenset(
        """revenue revenues profit profits loss losses income expense expenses asset assets liability
        liabilities equity cash investment investments return returns risk market stock stocks bond bonds
        interest rate rates percentage percent growth decline increase increased decrease decreased balance
        statement quarter annual financial economic trading portfolio dividend dividends earnings million
        billion thousand dollar dollars currency exchange hedge derivative contract obligation credit debt
        loan payment transaction volume average amount total sales margin shares fiscal tax operating
        capital net gross change ratio""".split()
    )
    ANALYSIS_PHRASES = (
        "because", "therefore", "however", "although", "while", "since", "due to", "as a result",
        "consequently", "furthermore", "additionally", "in contrast", "on the other hand", "specifically",
        "in particular", "according to", "based on", "indicates", "shows", "demonstrates", "thus",
        "so the", "which means", "compared to", "divided by", "minus", "calculate",
    )
    _WORD_RE = re.compile(r"[a-z][a-z'\-]*|\d[\d,]*(?:\.\d+)?")
    _SYMBOL_RE = re.compile(r"\$|%|\b(?:million|billion|thousand)s?\b", re.IGNORECASE)

    def __init__(
        self,
        *,
        keywords: float = 0.15,
        analysis: float = 0.10,
        length: float = 0.15,
        numeric: float = 0.15,
        currency: float = 0.05,
        similarity: float = 0.20,
        exact_match: float = 0.20,
        repetition: float = 0.50,
        min_words: int = 5,
        max_words: int = 50,
        zero_length_at: int = 200,
    ) -> None:
        if not 0 < min_words <= max_words < zero_length_at:
            raise ConfigError(
                f"FinancialQAReward: need 0 < min_words ({min_words}) <= max_words ({max_words}) < zero_length_at ({zero_length_at})"
            )
        self.weights = dict(
            keywords=keywords, analysis=analysis, length=length, numeric=numeric, currency=currency,
            similarity=similarity, exact_match=exact_match,
        )
        self.repetition = repetition
        self.min_words, self.max_words, self.zero_length_at = min_words, max_words, zero_length_at

    def length_score(self, n_words: int) -> float:
        """1.0 inside the optimum [min_words, max_words]; linear ramps outside.

        >>> r = FinancialQAReward()
        >>> r.length_score(0), r.length_score(5), r.length_score(50), r.length_score(125), r.length_score(300)
        (0.0, 1.0, 1.0, 0.5, 0.0)
        """
        if n_words < self.min_words:
            return n_words / self.min_words
        if n_words <= self.max_words:
            return 1.0
        return max(0.0, 1.0 - (n_words - self.max_words) / (self.zero_length_at - self.max_words))

    def components(self, completion: str, target: Any = None) -> dict[str, float]:
        """Each component's unweighted value in [0, 1] (and ``repetition`` in {0, 1}).

        >>> FinancialQAReward().components("94", "Answer: 94")["exact_match"]
        1.0
        """
        text = completion.lower()
        words = self._WORD_RE.findall(text)
        word_set = set(words)
        tgt = Target.coerce(target)
        out = {
            "keywords": min(1.0, len(word_set & self.FINANCIAL_KEYWORDS) / 5),
            "analysis": min(1.0, sum(_contains_phrase(text, p) for p in self.ANALYSIS_PHRASES) / 3),
            "length": self.length_score(len(completion.split())),
            "numeric": min(1.0, len(_NUMBER_RE.findall(completion)) / 3),
            "currency": min(1.0, len(self._SYMBOL_RE.findall(completion)) / 2),
            "similarity": 0.0,
            "exact_match": 0.0,
            "repetition": float(len(words) > 3 and len(word_set) / len(words) < 0.5),
        }
        if tgt is not None and tgt.text:
            target_words = set(self._WORD_RE.findall(tgt.text.lower()))
            union = word_set | target_words
            out["similarity"] = len(word_set & target_words) / len(union) if union else 0.0
            answer = _answer_text(tgt.text)
            out["exact_match"] = float(_contains_answer(text, answer))
        return out

    def __call__(self, prompt: str, completion: str, target: Any = None) -> float:
        if not isinstance(completion, str) or not completion.strip():
            return 0.0  # empty: every component is 0
        c = self.components(completion, target)
        score = sum(w * c[k] for k, w in self.weights.items()) - self.repetition * c["repetition"]
        return max(-1.0, min(1.0, score))

    def __repr__(self) -> str:
        return f"FinancialQAReward({self.weights}, repetition={self.repetition})"


def _contains_phrase(text: str, phrase: str) -> bool:
    return re.search(r"\b" + re.escape(phrase) + r"\b", text) is not None


def _normalize_space(text: str) -> str:
    return " ".join(text.lower().split())


def _contains_answer(text: str, answer: str) -> bool:
    """Is ``answer`` in ``text`` as a whole token run (so "94" is not found in "1945" or "0.94")?

    >>> _contains_answer("the change is 94.", "94"), _contains_answer("in 1945", "94"), _contains_answer("94.5", "94")
    (True, False, False)
    """
    answer = _normalize_space(answer)
    if not answer:
        return False
    pattern = r"(?<![\w.])" + re.escape(answer) + r"(?!\w|\.\d)"
    return re.search(pattern, _normalize_space(text)) is not None


def _answer_text(target_text: str) -> str:
    """``"Program: ...\\nAnswer: 94"`` -> ``"94"``; a bare target is its own answer text."""
    m = re.search(r"answer\s*:\s*(.+)", target_text, re.IGNORECASE)
    return (m.group(1) if m else target_text).strip()


class _VerifiableReward(RewardFunction):
    """Base of rewards that compare to the gold: ``rel_tol`` of the tolerant match, 0.0 without a target."""

    def __init__(self, rel_tol: float = 1e-3) -> None:
        if not rel_tol >= 0:
            raise ConfigError(f"{type(self).__name__}: rel_tol must be >= 0, got {rel_tol}")
        self.rel_tol = rel_tol

    @classmethod
    def from_config(cls, rewards_cfg: "RewardsConfig | Mapping[str, Any]") -> "RewardFunction":
        return cls(rel_tol=_cfg_get(rewards_cfg, "rel_tolerance", 1e-3))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rel_tol={self.rel_tol})"


class AnswerCorrectnessReward(_VerifiableReward):
    """1.0 when the completion's final answer matches ``exe_ans`` (tolerant rule), else 0.0.

    The answer is the ``Answer:`` value that :func:`fingrpo.answers.parse_completion` finds.

    >>> r = AnswerCorrectnessReward()
    >>> r("q", "Answer: 94", {"exe_ans": 94.0}), r("q", "Answer: 95", {"exe_ans": 94.0}), r("q", "", None)
    (1.0, 0.0, 0.0)
    """

    name = "correctness"

    def __call__(self, prompt: str, completion: str, target: Any = None) -> float:
        tgt = Target.coerce(target)
        if tgt is None or tgt.exe_ans is None:
            return 0.0
        parsed = safe_parse_completion(completion)
        if parsed is None:
            return 0.0
        return 1.0 if answers_match(parsed.answer_value, tgt.exe_ans, self.rel_tol) else 0.0


class ProgramExecutionReward(_VerifiableReward):
    """The completion's ``Program:`` executes (with the record's table) to ``exe_ans``.

    1.0 correct; ``partial_credit`` (default 0.1) when it parses and executes to a finite value but a
    wrong one — a small nudge towards runnable programs that stays far below a correct one; 0.0 when
    there is no program, it does not parse, or it fails (``divide(1, 0)``, a missing table row).
    Table operations need the record's table: a bare target string carries none, so pass the
    ``PromptExample`` or record as the target when programs may use ``table_*`` operations.

    >>> r = ProgramExecutionReward()
    >>> gold = {"exe_ans": 94.0}
    >>> r("q", "Program: subtract(5829, 5735)", gold), r("q", "Program: add(1, 2)", gold)
    (1.0, 0.1)
    >>> r("q", "Program: divide(1, 0)", gold)
    0.0
    """

    name = "program_execution"

    def __init__(self, rel_tol: float = 1e-3, partial_credit: float = 0.1) -> None:
        super().__init__(rel_tol)
        if not 0.0 <= partial_credit < 1.0:
            raise ConfigError(f"ProgramExecutionReward: partial_credit must be in [0, 1), got {partial_credit}")
        self.partial_credit = partial_credit

    @classmethod
    def from_config(cls, rewards_cfg: "RewardsConfig | Mapping[str, Any]") -> "RewardFunction":
        return cls(
            rel_tol=_cfg_get(rewards_cfg, "rel_tolerance", 1e-3),
            partial_credit=_cfg_get(rewards_cfg, "program_partial_credit", 0.1),
        )

    def __call__(self, prompt: str, completion: str, target: Any = None) -> float:
        tgt = Target.coerce(target)
        if tgt is None or tgt.exe_ans is None:
            return 0.0
        if not isinstance(completion, str):
            return 0.0
        try:
            parsed, run = execute_completion(completion, tgt.table)
        except GARBAGE_ERRORS:
            return 0.0
        if not parsed.program or run.value is None:
            return 0.0
        return 1.0 if answers_match(run.value, tgt.exe_ans, self.rel_tol) else self.partial_credit

    def __repr__(self) -> str:
        return f"ProgramExecutionReward(rel_tol={self.rel_tol}, partial_credit={self.partial_credit})"


class FormatReward(RewardFunction):
    """The asked-for format: a ``Program:`` line, then an ``Answer:`` line, and the program parses.

    1.0 when :func:`fingrpo.answers.parse_completion` says ``format_ok`` (both labelled lines in that
    order, the program parses with :func:`fingrpo.dsl.parse`, an answer is stated); 0.5 when a program
    candidate and an answer are both there but the format is off (labels missing or out of order, or
    the program does not parse); 0.0 otherwise. Needs no target.

    >>> r = FormatReward()
    >>> r("q", "Program: add(1, 2)\\nAnswer: 3"), r("q", "Program: add(1,\\nAnswer: 3"), r("q", "3")
    (1.0, 0.5, 0.0)
    """

    name = "format"

    def __call__(self, prompt: str, completion: str, target: Any = None) -> float:
        parsed = safe_parse_completion(completion)
        if parsed is None:
            return 0.0
        if parsed.format_ok:
            return 1.0
        return 0.5 if parsed.program and parsed.answer_text else 0.0


class NumbersFromContextReward(RewardFunction):
    """Shaped: the fraction of the program's grounded arguments — numbers that appear in the prompt
    (or the target's table), and table row names that appear there.

    Constants (``const_100``) and step references (``#0``) are neither grounded nor ungrounded. No
    program, an unparsable one, or one with only constants/references scores 0.0. Numbers match by
    absolute value (``-12`` ~ "(12)"). Few-shot examples in the prompt count as context. It rewards
    copying the right kind of operand — the step a 135M model has to learn before any answer is right.

    >>> r = NumbersFromContextReward()
    >>> r("revenue 5,829 and 5,735", "Program: subtract(5829, 5735)")
    1.0
    >>> r("revenue 5,829 and 5,735", "Program: subtract(5829, 17)")
    0.5
    """

    name = "numbers_from_context"

    def __call__(self, prompt: str, completion: str, target: Any = None) -> float:
        parsed = safe_parse_completion(completion)
        steps = safe_parse_program(parsed.program) if parsed is not None else None
        if steps is None:
            return 0.0
        tgt = Target.coerce(target)
        context = prompt if isinstance(prompt, str) else ""
        if tgt is not None and tgt.table:
            context += "\n" + "\n".join(" | ".join(str(c) for c in row) for row in tgt.table)
        numbers = numbers_in_text(context)
        context_lower = context.lower()
        grounded = total = 0
        for step in steps:
            for arg in step.args:
                kind = _arg_kind(arg)
                if kind == "number":
                    value = _number_value(arg)
                    total += 1
                    grounded += value is not None and math.isfinite(value) and _number_grounded(value, numbers)
                elif kind == "row" and (row := _row_name(arg)) is not None:
                    total += 1
                    grounded += row.strip().lower() in context_lower
        return grounded / total if total else 0.0


class OperationReward(RewardFunction):
    """Shaped: Jaccard overlap of the operation sets of the completion's program and the gold program.

    1.0 when the program uses exactly the gold's operations (any order/count); 0.0 without a gold
    program (or no target), without a parsable completion program, or with no operation in common.

    >>> r = OperationReward()
    >>> gold = {"exe_ans": 0.1, "program": "subtract(5, 3), divide(#0, 3)"}
    >>> r("q", "Program: divide(5, 3)", gold), r("q", "Program: subtract(9, 1), divide(#0, 2)", gold)
    (0.5, 1.0)
    """

    name = "operation"

    def __call__(self, prompt: str, completion: str, target: Any = None) -> float:
        tgt = Target.coerce(target)
        if tgt is None or not tgt.program:
            return 0.0
        gold_ops = set(program_operations(safe_parse_program(tgt.program)))
        parsed = safe_parse_completion(completion)
        pred_ops = set(program_operations(safe_parse_program(parsed.program))) if parsed is not None else set()
        if not gold_ops or not pred_ops:
            return 0.0
        return len(gold_ops & pred_ops) / len(gold_ops | pred_ops)


class RandomReward(RewardFunction):
    """The control of the experiments: a seeded uniform draw in [0, 1), independent of the completion.

    Not pure on purpose: successive calls walk one ``random.Random(seed)`` stream, so two runs with the
    same seed see the same rewards in the same order (a resumed run restarts the stream).

    >>> a, b = RandomReward(seed=3), RandomReward(seed=3)
    >>> [a("q", "x") for _ in range(3)] == [b("q", "y") for _ in range(3)]
    True
    """

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._rng = random.Random(seed)

    @classmethod
    def from_config(cls, rewards_cfg: "RewardsConfig | Mapping[str, Any]") -> "RewardFunction":
        return cls(seed=_cfg_get(rewards_cfg, "random_seed", 0))

    def __call__(self, prompt: str, completion: str, target: Any = None) -> float:
        return self._rng.random()

    def __repr__(self) -> str:
        return f"RandomReward(seed={self.seed})"


# --------------------------------------------------------------------------------------------------
# Registry, weighting, scoring
# --------------------------------------------------------------------------------------------------

#: The one name -> class map used by ``rewards.weights`` in params.yaml.
REWARD_REGISTRY: dict[str, type[RewardFunction]] = {
    "correctness": AnswerCorrectnessReward,
    "program_execution": ProgramExecutionReward,
    "format": FormatReward,
    "numbers_from_context": NumbersFromContextReward,
    "operation": OperationReward,
    "financial_qa": FinancialQAReward,
    "random": RandomReward,
}


@dataclass(frozen=True)
class WeightedReward:
    """One configured reward: its registry ``name``, ``weight`` in the total, and the ``function``.

    >>> w = WeightedReward("format", 0.2, FormatReward())
    >>> w("q", "Program: add(1, 2)\\nAnswer: 3")
    0.2
    """

    name: str
    weight: float
    function: RewardFunction

    def __call__(self, prompt: str, completion: str, target: Any = None) -> float:
        """The weighted value ``weight * function(...)``."""
        return self.weight * self.function(prompt, completion, target)


class CombinedReward(RewardFunction):
    """A weighted sum of rewards behind the seed API (one float per completion).

    Failures are not caught here; :func:`reward_completions` is the batch path that isolates them.

    >>> r = CombinedReward([WeightedReward("format", 0.2, FormatReward()), WeightedReward("correctness", 1.0, AnswerCorrectnessReward())])
    >>> r("q", "Program: add(1, 2)\\nAnswer: 3", {"exe_ans": 3.0})
    1.2
    """

    name = "combined"

    def __init__(self, rewards: Iterable[WeightedReward]) -> None:
        self.rewards = list(rewards)

    def __call__(self, prompt: str, completion: str, target: Any = None) -> float:
        return sum(w(prompt, completion, target) for w in self.rewards)

    def __repr__(self) -> str:
        return f"CombinedReward({[(w.name, w.weight) for w in self.rewards]})"


def _cfg_get(cfg: Any, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def build_rewards(rewards_cfg: "RewardsConfig | Mapping[str, Any]") -> list[WeightedReward]:
    """``rewards`` config section (or a dict like it) -> configured rewards, in the config's order.

    A weight of 0 keeps the reward (it is computed and logged, e.g. to watch correctness while training
    on shaped rewards) but it adds nothing to the total. An unknown name raises :class:`ConfigError`.

    >>> [(w.name, w.weight) for w in build_rewards({"weights": {"correctness": 1.0, "format": 0.2}})]
    [('correctness', 1.0), ('format', 0.2)]
    """
    weights = _cfg_get(rewards_cfg, "weights", None)
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError("rewards.weights: must map at least one reward name to a weight")
    out = []
    for name, weight in weights.items():
        cls = REWARD_REGISTRY.get(name)
        if cls is None:
            raise ConfigError(
                f"rewards.weights: unknown reward {name!r}; known rewards: {', '.join(sorted(REWARD_REGISTRY))}"
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"rewards.weights.{name}: weight must be a finite number, got {weight!r}")
        out.append(WeightedReward(name, float(weight), cls.from_config(rewards_cfg)))
    return out


@dataclass
class RewardResult:
    """Rewards of one batch of completions.

    ``total[i]`` = sum over functions of ``weight * per_function[name][i]``; ``per_function`` holds the
    unweighted values (``nan_value`` where a function failed or abstained); ``failures[name]`` counts
    completions where the function raised or returned NaN/inf; ``errors[name]`` is the first message.
    """

    total: list[float]
    per_function: dict[str, list[float]]
    failures: dict[str, int]
    errors: dict[str, str] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        """Per-function means (the trainer's ``reward/<name>_mean`` metrics).

        >>> RewardResult([1.0, 0.0], {"format": [1.0, 0.0]}, {"format": 0}).means()
        {'format': 0.5}
        """
        return {k: (sum(v) / len(v) if v else 0.0) for k, v in self.per_function.items()}


def _as_weighted(rewards: Iterable[WeightedReward | RewardFunction]) -> list[WeightedReward]:
    out = []
    for r in rewards:
        if isinstance(r, WeightedReward):
            out.append(r)
        elif isinstance(r, RewardFunction):
            out.append(WeightedReward(r.name, 1.0, r))
        elif callable(r):  # a plain function with the seed signature
            out.append(WeightedReward(getattr(r, "__name__", "reward"), 1.0, r))  # type: ignore[arg-type]
        else:
            raise TypeError(f"not a reward: {r!r}")
    names = [w.name for w in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"rewards: duplicate reward names {names}")
    return out


def _call_one(fn: Callable, prompt, completion, target) -> float | None:
    return fn(prompt, completion, target)


def reward_completions(
    rewards: Iterable[WeightedReward | RewardFunction],
    prompts: Sequence[str],
    completions: Sequence[str],
    targets: Sequence[Any] | None = None,
    nan_value: float = 0.0,
) -> RewardResult:
    """Run every reward over a batch; isolate failures.

    Each function's ``batch`` is tried first; if it raises (or returns the wrong number of values) the
    completions are scored one by one so a single bad completion costs only itself. A value that
    raised, is not a number, or is NaN/inf becomes ``nan_value`` and counts as a failure; ``None``
    (abstain) becomes ``nan_value`` without counting.

    >>> res = reward_completions(build_rewards({"weights": {"format": 0.5}}), ["q"], ["Program: add(1, 2)\\nAnswer: 3"])
    >>> res.total, res.per_function, res.failures
    ([0.5], {'format': [1.0]}, {'format': 0})
    """
    weighted = _as_weighted(rewards)
    n = len(completions)
    targets = [None] * n if targets is None else list(targets)
    if len(prompts) != n or len(targets) != n:
        raise ValueError(f"reward_completions: {len(prompts)} prompts, {n} completions, {len(targets)} targets")
    total = [0.0] * n
    per_function: dict[str, list[float]] = {}
    failures: dict[str, int] = {}
    errors: dict[str, str] = {}
    for w in weighted:
        fn = w.function
        raw: list[Any] | None = None
        batch = getattr(fn, "batch", None)
        if batch is not None:
            try:
                raw = list(batch(list(prompts), list(completions), targets))
                if len(raw) != n:
                    raise ValueError(f"batch returned {len(raw)} values for {n} completions")
            except Exception as e:  # noqa: BLE001 - isolate: fall back to one completion at a time
                log.debug("reward %s: batch failed (%s); scoring one by one", w.name, e)
                raw = None
        if raw is None:
            raw = []
            for p, c, t in zip(prompts, completions, targets):
                try:
                    raw.append(_call_one(fn, p, c, t))
                except Exception as e:  # noqa: BLE001 - a reward must never stop training
                    raw.append(_Failed(f"{type(e).__name__}: {e}"))
        values, n_failed = [], 0
        for v in raw:
            if v is None:
                values.append(nan_value)
                continue
            if isinstance(v, _Failed) or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                n_failed += 1
                errors.setdefault(w.name, v.message if isinstance(v, _Failed) else f"returned {v!r}")
                values.append(nan_value)
                continue
            values.append(float(v))
        if n_failed:
            log.warning("reward %s failed on %d/%d completions (first: %s)", w.name, n_failed, n, errors[w.name])
        per_function[w.name] = values
        failures[w.name] = n_failed
        for i, v in enumerate(values):
            total[i] += w.weight * v
    return RewardResult(total=total, per_function=per_function, failures=failures, errors=errors)


@dataclass(frozen=True)
class _Failed:
    message: str
