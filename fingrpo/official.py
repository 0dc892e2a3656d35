"""The official scoring rules of FinQA and TAT-QA, reproduced exactly (our code, their rules).

FinQA (``czyssrs/FinQA`` ``code/evaluate/evaluate.py``) scores a program given as a list of tokens
(``["subtract(", "5829", "5735", ")", "EOF"]``):

- :func:`finqa_tokenize` is its ``program_tokenization`` (program text -> tokens; it splits steps on
  ``", "`` and tokens on parentheses);
- :func:`finqa_eval_program` is its ``eval_program``: the last token is dropped (``EOF``), every 4th
  token must be an operation and every 4th+3 a ``)``; the tokens are joined with ``|`` and split at
  ``)`` into steps, and a step with more than one ``(`` is invalid: so a row name with parentheses,
  ``table_average(private investors ( a ), none)``, is invalid there. Numbers are read by
  ``str_to_num`` (Python's ``float``, ``5%`` = 0.05, ``const_m1`` = -1), a table row by
  ``process_row``; any exception makes the program invalid; the result is rounded to 5 decimals;
- :func:`finqa_equal_program` is its ``equal_program``: the gold program's argument texts and table
  steps become symbols ``a0, a1, ...``; the prediction may use only those (and ``#k`` for an earlier
  step); both become expression strings that ``sympy.simplify`` reads and simplifies, and must be equal.

execution accuracy = ``invalid_flag == 0 and exe_res == exe_ans``; program accuracy = ``equal_program``.
:mod:`fingrpo.scoring` uses these for ``execution_accuracy`` and ``program_accuracy``; its
``tolerant_accuracy`` keeps the lenient reading of :mod:`fingrpo.dsl`.

TAT-QA (``NExTplusplus/TAT-QA`` ``tatqa_eval.py``, ``tatqa_metric.py``, ``tatqa_utils.py``) scores an
``[answer, scale]`` per question uid against the question's ``answer`` and ``scale``
(:func:`tatqa_em_f1`):

- an empty prediction (``None``, ``""``, ``0``, ``[]``) scores 0, a gold answer of ``0`` included;
- answers are sorted and joined with a space; a number is ``'%.4f' % (round(n, 2) * scale)`` in its
  stated scale (thousand 1e3, million 1e6, billion 1e9, percent 0.01), a number written with ``%`` is
  ``'%.4f' % n`` (already a fraction); other text gets the scale word appended;
- a bare number predicted without a scale also matches as ``'%.4f' % n``, so a 4-decimal fraction
  ``0.0352`` matches a percent answer 3.52;
- reading a number: ``(12.6)`` is -12.6, but ``(1,234)`` is not negated (the rule looks for digits,
  dots and spaces only inside the parentheses); ``12%`` is 0.12; ``1.5 million`` is 1,500,000;
- EM: the same bag of normalised strings; F1: DROP's bag-of-tokens F1 with the best one-to-one
  alignment of spans, rounded to 2 decimals; for ``arithmetic`` and ``count`` questions F1 = EM.
"""

from __future__ import annotations

import functools
import re
import string
from typing import Any, Sequence

FINQA_OPS = ("add", "subtract", "multiply", "divide", "exp", "greater", "table_max", "table_min", "table_sum",
             "table_average")
_ARITH = FINQA_OPS[:6]

# ------------------------------------------------------------------------------------------- FinQA


def finqa_tokenize(program: str) -> list[str]:
    """Program text -> the official token list (``program_tokenization``), ``EOF`` appended.

    >>> finqa_tokenize("subtract(5829, 5735), divide(#0, 5735)")
    ['subtract(', '5829', '5735', ')', 'divide(', '#0', '5735', ')', 'EOF']
    """
    tokens: list[str] = []
    for piece in program.split(", "):
        cur = ""
        for c in piece:
            if c == ")" and cur:
                tokens.append(cur)
                cur = ""
            cur += c
            if c in "()":
                tokens.append(cur)
                cur = ""
        if cur:
            tokens.append(cur)
    return tokens + ["EOF"]


def _str_to_num(text: str) -> float | str:
    """Official ``str_to_num``: ``"n/a"`` when not a number; a bad ``const_`` raises (-> invalid)."""
    text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        if "%" in text:
            try:
                return float(text.replace("%", "")) / 100.0
            except ValueError:
                return "n/a"
        if "const" in text:
            text = text.replace("const_", "")
            return float("-1" if text == "m1" else text)
        return "n/a"


def _process_row(cells: Sequence[str]) -> list[float] | str:
    out = []
    for cell in cells:
        num = _str_to_num(cell.replace("$", "").strip().split("(")[0].strip())
        if num == "n/a":
            return "n/a"
        out.append(num)
    return out


def _structure_ok(tokens: Sequence[str]) -> bool:
    for i, tok in enumerate(tokens):
        if i % 4 == 0 and tok.strip("(") not in FINQA_OPS:
            return False
        if (i + 1) % 4 == 0 and tok != ")":
            return False
    return True


def _split_step(step: str) -> tuple[str, str, str]:
    step = step.strip()
    head, args = step.split("(")[0], step.split("(")[1]
    args = args.strip("|").strip()
    parts = args.split("|")
    return head.strip("|").strip(), parts[0].strip(), parts[1].strip()


def finqa_eval_program(tokens: Sequence[str], table: Sequence[Sequence[str]]) -> tuple[int, Any]:
    """Official ``eval_program``: ``(invalid_flag, result)``; result rounded to 5 decimals or ``"n/a"``.

    >>> finqa_eval_program(["subtract(", "5829", "5735", ")", "divide(", "#0", "5735", ")", "EOF"], [])
    (0, 0.01639)
    >>> finqa_eval_program(["table_average(", "private investors ( a )", "none", ")", "EOF"], [])
    (1, 'n/a')
    """
    this_res: Any = "n/a"
    try:
        body = list(tokens)[:-1]
        if not _structure_ok(body):
            return 1, "n/a"
        steps = "|".join(body).split(")")[:-1]
        res: dict[int, Any] = {}
        num_row: Any = None
        for ind, step in enumerate(steps):
            if len(step.strip().split("(")) > 2:
                return 1, this_res
            op, arg1, arg2 = _split_step(step)
            if op in _ARITH:
                a = res[int(arg1.replace("#", ""))] if "#" in arg1 else _str_to_num(arg1)
                if a == "n/a":
                    return 1, this_res
                b = res[int(arg2.replace("#", ""))] if "#" in arg2 else _str_to_num(arg2)
                if b == "n/a":
                    return 1, this_res
                if op == "add":
                    this_res = a + b
                elif op == "subtract":
                    this_res = a - b
                elif op == "multiply":
                    this_res = a * b
                elif op == "divide":
                    this_res = a / b
                elif op == "exp":
                    this_res = a**b
                else:
                    this_res = "yes" if a > b else "no"
                res[ind] = this_res
            elif "table" in op:
                rows = {row[0]: row[1:] for row in table}
                if "#" in arg1:
                    res[int(arg1.replace("#", ""))]  # as officially: looked up, then the last row is reused
                else:
                    if arg1 not in rows:
                        return 1, this_res
                    num_row = _process_row(rows[arg1])
                if num_row is None:
                    raise NameError("num_row")  # officially an unbound local: the except below
                if num_row == "n/a":
                    return 1, this_res
                if op == "table_max":
                    this_res = max(num_row)
                elif op == "table_min":
                    this_res = min(num_row)
                elif op == "table_sum":
                    this_res = sum(num_row)
                elif op == "table_average":
                    this_res = sum(num_row) / len(num_row)
                res[ind] = this_res
        if this_res not in ("yes", "no", "n/a"):
            this_res = round(this_res, 5)
    except Exception:  # noqa: BLE001 - the official script's bare except: any failure is "invalid"
        return 1, this_res
    return 0, this_res


def _symbols_of(tokens: Sequence[str]) -> tuple[dict[str, str], dict[int, str], list[str]]:
    """The gold program's symbol map (argument text or table step -> ``a<i>``) and its steps."""
    steps = "|".join(list(tokens)[:-1]).split(")")[:-1]
    sym: dict[str, str] = {}
    step_dict: dict[int, str] = {}
    for ind, step in enumerate(steps):
        step = step.strip()
        if len(step.split("(")) > 2:
            raise ValueError(f"gold program step {step!r} has more than one '('")
        op, arg1, arg2 = _split_step(step)
        step_dict[ind] = step
        keys = [step] if "table" in op else [a for a in (arg1, arg2) if "#" not in a]
        for key in keys:
            sym.setdefault(key, f"a{len(sym)}")
    return sym, step_dict, steps


_SYMBOL_OPS = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/", "exp": "**", "greater": ">"}


def _symbolic(step: str, step_dict: dict[int, str], sym: dict[str, str]) -> str | None:
    op, arg1, arg2 = _split_step(step)
    if "table" in op:
        return sym[step.strip()]
    a = _symbolic(step_dict[int(arg1.replace("#", ""))], step_dict, sym) if "#" in arg1 else sym[arg1]
    b = _symbolic(step_dict[int(arg2.replace("#", ""))], step_dict, sym) if "#" in arg2 else sym[arg2]
    if op not in _SYMBOL_OPS:
        return None
    return f"( {a} {_SYMBOL_OPS[op]} {b} )"


def _simplify(expr: str | None):
    import sympy

    return sympy.simplify(expr, evaluate=False)


@functools.lru_cache(maxsize=4096)
def _gold_expression(gold_tokens: tuple[str, ...]):
    """The gold program's simplified expression (cached: every prediction of a record shares it)."""
    sym, step_dict, steps = _symbols_of(gold_tokens)
    return _simplify(_symbolic(steps[-1], step_dict, sym))


def finqa_equal_program(gold_tokens: Sequence[str], pred_tokens: Sequence[str]) -> bool:
    """Official ``equal_program(gold, pred)``: symbolic equality over the gold program's arguments.

    >>> finqa_equal_program(finqa_tokenize("add(2, 3), divide(#0, 4)"), finqa_tokenize("add(3, 2), divide(#0, 4)"))
    True
    >>> finqa_equal_program(finqa_tokenize("subtract(2, 3)"), finqa_tokenize("subtract(3, 2)"))
    False
    """
    sym, gold_steps_dict, gold_steps = _symbols_of(gold_tokens)
    body = list(pred_tokens)[:-1]
    step_dict: dict[int, str] = {}
    try:
        if not _structure_ok(body):
            return False
        steps = "|".join(body).split(")")[:-1]
        for ind, step in enumerate(steps):
            step = step.strip()
            if len(step.split("(")) > 2:
                return False
            op, arg1, arg2 = _split_step(step)
            step_dict[ind] = step
            if "table" in op:
                if step not in sym:
                    return False
                continue
            for arg in (arg1, arg2):
                if "#" not in arg:
                    if arg not in sym:
                        return False
                elif int(arg.strip("#")) >= ind:
                    return False
    except Exception:  # noqa: BLE001 - official bare except
        return False
    if list(pred_tokens) == list(gold_tokens):  # same tokens: the official checks and sympy say True
        return True
    gold_expr = _gold_expression(tuple(gold_tokens))
    try:
        pred_expr = _simplify(_symbolic(steps[-1], step_dict, sym))
    except Exception:  # noqa: BLE001 - official bare except
        return False
    return bool(gold_expr == pred_expr)


# ------------------------------------------------------------------------------------------ TAT-QA


def tatqa_scale_to_num(scale: str) -> float:
    """``"million"`` -> 1e6, ``"percent"`` -> 0.01, anything else -> 1 (official ``scale_to_num``)."""
    scale = scale.lower()
    for word, num in (("hundred", 100), ("thousand", 1000), ("million", 1000000), ("billion", 1000000000),
                      ("percent", 0.01)):
        if word in scale:
            return num
    return 1


_EXCLUDE_IN_NUM = set("'\"\\$€£¥%(),[]")
_NUM_RE = re.compile(r"([+-]?\d+(\.\d+)?)|([+-]?\.\d+)")


def _clean_num(text: Any) -> str:
    return "".join(ch for ch in str(text) if ch not in _EXCLUDE_IN_NUM)


def _extract_one_num(text: str) -> float | int | None:
    groups = _NUM_RE.findall(_clean_num(text))
    if not groups or groups[0][0] == "":
        return None
    num = groups[0][0]
    return float(num) if "." in num else int(num)


def tatqa_is_number(text: str) -> bool:
    """Official ``is_number``: the first word (punctuation of numbers removed) is a float, not NaN,
    and a second word, if any, is a scale word.

    >>> tatqa_is_number("1,234"), tatqa_is_number("1.5 million"), tatqa_is_number("2019 revenue")
    (True, True, False)
    """
    import math

    words = " ".join(_clean_num(w) for w in text.split()).split()
    if not words:
        return False
    try:
        num = float(words[0])
    except ValueError:
        return False
    if math.isnan(num):
        return False
    return not (len(words) >= 2 and tatqa_scale_to_num(words[1]) == 1)


def tatqa_to_number(text: str) -> float | None:
    """Official ``to_number``: first number x word scale x sign (``(12.6)``) x percent, rounded to 4.

    >>> tatqa_to_number("(12.6)"), tatqa_to_number("(1,234)"), tatqa_to_number("12%"), tatqa_to_number("1.5 million")
    (-12.6, 1234, 0.12, 1500000.0)
    """
    num = _extract_one_num(text)
    if num is None:
        return None
    scale = 1
    for match in re.finditer(r"([\d.]+\s?[a-zA-Z]+)", text):
        scale = tatqa_scale_to_num(match.group(0).lower())
        break
    negative = -1 if re.findall(r"(\([\d.\s]+\))", text.strip()) else 1
    percent = 0.01 if re.findall(r"([\d.\s]+%)", text.strip()) else 1
    return round(num * scale * negative * percent, 4)


def tatqa_answer_strings(answers: Sequence[Any], scale: str) -> list[str]:
    """Official ``get_answer_str``: sorted answers, each normalised in its scale, joined by spaces.

    >>> tatqa_answer_strings([3.52], "percent"), tatqa_answer_strings(["Apple"], "million")
    (['0.0352'], ['Apple million'])
    """
    out = []
    for ans in sorted(answers):
        text = str(ans)
        if tatqa_is_number(text):
            num = tatqa_to_number(text)
            if num is None:
                text = f"{text} {scale}" if scale else text
            elif "%" in text:
                text = "%.4f" % num
            else:
                text = "%.4f" % (round(num, 2) * tatqa_scale_to_num(scale))
        elif scale:
            text = f"{text} {scale}"
        out.append(text)
    return [" ".join(out)]


_PUNCT = set(string.punctuation)


def _normalize(text: str) -> str:
    """Official ``normalize_answer``: per space-separated token: lower, drop punctuation (not of
    numbers), number -> ``str(to_number)``, drop articles, fix whitespace."""
    parts = []
    for token in re.split(" ", text):
        t = token.lower()
        if not tatqa_is_number(t):
            t = "".join(ch for ch in t if ch not in _PUNCT)
        if tatqa_is_number(t):
            t = str(tatqa_to_number(t))
        t = " ".join(re.sub(r"\b(a|an|the)\b", " ", t, flags=re.UNICODE).split())
        if t.strip():
            parts.append(t)
    return " ".join(parts).strip()


def _bags(answer: str) -> tuple[list[str], list[set[str]]]:
    spans = [_normalize(answer)]
    return spans, [set(s.split()) for s in spans]


def _f1(pred: set[str], gold: set[str]) -> float:
    inter = len(gold & pred)
    precision = inter / len(pred) if pred else 1.0
    recall = inter / len(gold) if gold else 1.0
    return 0.0 if precision == 0.0 and recall == 0.0 else 2 * precision * recall / (precision + recall)


def _em_f1(pred: str, gold: str) -> tuple[float, float]:
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    p_spans, p_bags = _bags(pred)
    g_spans, g_bags = _bags(gold)
    em = 1.0 if set(p_spans) == set(g_spans) and len(p_spans) == len(g_spans) else 0.0
    scores = np.array([[_f1(p, g) for p in p_bags] for g in g_bags])
    rows, cols = linear_sum_assignment(-scores)
    best = np.zeros(max(len(g_bags), len(p_bags)))
    for r, c in zip(rows, cols):
        best[r] = max(best[r], scores[r, c])
    return em, float(round(np.mean(best), 2))  # numpy's rounding of a float64, as officially


def tatqa_gold_answers(question: dict) -> list[str]:
    """Official ``extract_gold_answers``: spans as they are, a count as ``str(int)``, else ``str``."""
    kind, answer = question["answer_type"], question["answer"]
    if kind in ("span", "multi-span"):
        if not isinstance(answer, list):
            raise ValueError(f"a {kind} answer is a list, got {answer!r}")
        return list(answer)
    if kind == "count":
        return [str(int(answer))]
    return [str(answer)]


def tatqa_em_f1(question: dict, prediction: Any, pred_scale: str | None) -> tuple[float, float]:
    """EM and F1 (0..1) of one prediction for one gold question (``answer``, ``answer_type``, ``scale``).

    >>> q = {"answer": 3.52, "answer_type": "arithmetic", "scale": "percent"}
    >>> tatqa_em_f1(q, 0.0352, ""), tatqa_em_f1(q, 3.52, "percent"), tatqa_em_f1(q, 3.52, "")
    ((1.0, 1.0), (1.0, 1.0), (0.0, 0.0))
    """
    if not prediction:
        return 0.0, 0.0
    return tatqa_match(question, prediction, pred_scale)


def tatqa_match(question: dict, prediction: Any, pred_scale: str | None) -> tuple[float, float]:
    """:func:`tatqa_em_f1` without its first rule (an empty prediction scores 0): whether a value
    *reproduces* an answer, a gold ``0`` included (what the TAT-QA adapter checks a converted program by).

    >>> tatqa_match({"answer": 0, "answer_type": "arithmetic", "scale": ""}, 0.0, "")
    (1.0, 1.0)
    """
    gold = tatqa_gold_answers(question)
    if not gold:
        return 0.0, 0.0
    gold_strings = tatqa_answer_strings(gold, question["scale"])
    preds = prediction if isinstance(prediction, list) else [prediction]
    pred_strings = tatqa_answer_strings(preds, pred_scale)
    if len(preds) == 1 and not pred_scale and "%" not in str(preds[0]) and tatqa_is_number(str(preds[0])):
        num = tatqa_to_number(str(preds[0]))
        if num is not None:
            pred_strings.append("%.4f" % num)
    em, f1 = max(_em_f1(p, g) for p in pred_strings for g in gold_strings)
    if question["answer_type"] in ("arithmetic", "count"):
        f1 = em
    return em, f1


__all__ = [
    "FINQA_OPS", "finqa_tokenize", "finqa_eval_program", "finqa_equal_program",
    "tatqa_scale_to_num", "tatqa_is_number", "tatqa_to_number", "tatqa_answer_strings", "tatqa_gold_answers",
    "tatqa_em_f1", "tatqa_match",
]
