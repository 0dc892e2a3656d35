"""Prompts from FinQA-shaped records: the context (gold facts, everything, or retrieved facts), the
worked examples, the token budget, and the chat rendering the model sees.

    from fingrpo.config import load_config
    from fingrpo.data.finqa import load_split
    from fingrpo.data.prompts import make_examples, render_prompt

    cfg = load_config("params.yaml")
    train, dev = load_split(cfg.data.train_path), load_split(cfg.data.dev_path)
    examples = make_examples(dev, cfg.prompt, tokenizer, few_shot_records=train)
    text = render_prompt(examples[0], tokenizer)            # the exact string fed to the model
    examples[0].target                                      # 'Program: subtract(482, 75)\\nAnswer: 407'

The model is asked to answer in two lines, ``Program: <FinQA program>`` then ``Answer: <value>``
(the format :mod:`fingrpo.answers` parses).

Context modes (``prompt.context_mode``):

- ``full``: every pre_text sentence, the table (linearised rows, or a markdown table with
  ``prompt.table_format=markdown``), every post_text sentence, in document order.
- ``gold``: only the supporting facts of ``qa.gold_inds`` (the annotated sentences and table rows).
- ``retrieved``: all sentences and linearised table rows ranked by the configured retriever
  (``prompt.retriever``, :mod:`fingrpo.retrieval`), the ``prompt.retrieved_top_k`` best shown in document
  order: what a served question gets. With ``prompt.train_with_gold`` (training prompts only), a gold
  fact the retriever missed takes the place of its lowest-ranked other pick, so the warm start's reply
  (the gold program) only names numbers the prompt shows; the prompt keeps the served shape.

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
from typing import TYPE_CHECKING, Any, Sequence

from fingrpo.data.finqa import GOLD_KEY, FinQARecord, linearize_table, table_to_markdown
from fingrpo.errors import ConfigError
from fingrpo.retrieval import get_retriever, lexical_scores

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import PromptConfig

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
    for u, score in zip(units, lexical_scores(question, [u.text for u in units])):
        u.score = score


def _context_units(rec: FinQARecord, cfg: "PromptConfig", training: bool = False) -> list[_Unit]:
    mode = cfg.context_mode
    if mode == "gold":
        units = [_Unit(k, v, _doc_order(rec, k), True) for k, v in rec.qa.gold_inds.items()]
        _rank_by_overlap(units, rec.question)
    elif mode == "full":
        units = _all_units(rec, getattr(cfg, "table_format", "linearized"))
        _rank_by_overlap(units, rec.question)
    elif mode == "retrieved":
        by_key = {u.key: u for u in _all_units(rec, "linearized")}
        ranked = get_retriever(cfg).rank(rec)
        for pos, key in enumerate(ranked):
            by_key[key].score = float(len(ranked) - pos)
        picked = ranked[: cfg.retrieved_top_k]
        if training and getattr(cfg, "train_with_gold", False):
            # a gold fact the retriever missed replaces its lowest-ranked non-gold pick
            missing = [k for k in rec.qa.gold_inds if k in by_key and k not in picked]
            spare = [k for k in reversed(picked) if k not in rec.qa.gold_inds]
            for k_in, k_out in zip(missing, spare):
                picked[picked.index(k_out)] = k_in
        units = [by_key[k] for k in picked]
        for u in units:  # what the retriever picked is the context: never cut (see the module docstring)
            u.gold = True
    else:  # pragma: no cover - PromptConfig's Literal already rejects it
        raise ConfigError(f"prompt.context_mode: unknown mode {mode!r}")
    return sorted(units, key=lambda u: (u.order, u.key == "table_sep"))


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
    rec: FinQARecord, shot_records: list[FinQARecord], cfg: "PromptConfig", counter: _Counter, training: bool = False
) -> PromptExample:
    units = _context_units(rec, cfg, training)
    shots = [_Shot(s, _context_units(s, cfg, training=True)) for s in shot_records]

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
    training: bool = False,
) -> list[PromptExample]:
    """Turn records into :class:`PromptExample` s under ``prompt_cfg`` (context mode, budget, few-shot).
    ``training``: prompts a model learns from (warm start, GRPO rollouts), where ``prompt.train_with_gold``
    applies; evaluation and serving leave it False.

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
        examples.append(_build_example(rec, shots, prompt_cfg, counter, training))
    return examples


__all__ = [
    "PromptExample", "make_examples", "render_prompt", "make_target", "format_exe_ans", "SYSTEM_PROMPT",
    "neutralize_control_markers",
]
