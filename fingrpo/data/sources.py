"""Several datasets in one config: the training pool (``data.train_sources``) and the evaluation sets
(``data.eval_sets``), each a file of FinQA-shaped records (FinQA itself, or TAT-QA after ``fingrpo
prepare``), so the prompts, rewards, trainer and evaluation serve every dataset unchanged.

    few_shot, pool = training_pool(cfg)      # the worked examples, then the mixed training records
    for s in eval_sets(cfg): ...             # EvalSetConfig: name, path, split, subset, max_records, pooled

The worked examples (``prompt.few_shot``) are the first records of the first source and are left out
of the pool. Sources are mixed in turn (one record of each, round robin, each source contributing its
first ``max_records``), so ``train.max_train_records`` keeps the mix.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fingrpo.config import EvalSetConfig, TrainSourceConfig
from fingrpo.data.finqa import FinQARecord, load_split, random_subset_ids
from fingrpo.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import Config


def dataset_of(record: FinQARecord) -> str:
    """``"tatqa"`` for a converted TAT-QA record, else ``"finqa"``."""
    return str((record.model_extra or {}).get("dataset") or "finqa")


def train_sources(cfg: "Config") -> list[TrainSourceConfig]:
    """``data.train_sources`` with every path resolved (a null path is ``data.train_path``), or the FinQA
    train split alone when the list is null."""
    if cfg.data.train_sources is None:
        return [TrainSourceConfig(name="finqa", path=cfg.data.train_path)]
    return [s.model_copy(update={"path": s.path or cfg.data.train_path}) for s in cfg.data.train_sources]


def few_shot_records(cfg: "Config") -> list[FinQARecord]:
    """The worked examples' pool, the one few-shot choice of the project: the first ``prompt.few_shot + 1``
    records of the first training source ([] for 0-shot). :func:`fingrpo.data.prompts.make_examples` shows
    the first ``prompt.few_shot`` of them that are not the question itself (the spare one stands in when
    the question is among them, as a served record may be); :func:`training_pool` keeps the first
    ``prompt.few_shot`` out of training. The trainer, the evaluation and the served model all use it."""
    k = cfg.prompt.few_shot
    return load_split(train_sources(cfg)[0].path)[: k + 1] if k else []


def training_pool(cfg: "Config") -> tuple[list[FinQARecord], list[FinQARecord]]:
    """(worked examples, training records): see the module docstring."""
    per_source: list[list[FinQARecord]] = []
    k = cfg.prompt.few_shot
    for i, source in enumerate(train_sources(cfg)):
        records = load_split(source.path)
        if i == 0:
            records = records[k:]  # the worked examples (few_shot_records) are not trained on
        per_source.append(records[: source.max_records] if source.max_records is not None else records)
    pool: list[FinQARecord] = []
    for j in range(max((len(r) for r in per_source), default=0)):
        pool += [records[j] for records in per_source if j < len(records)]
    if cfg.train.max_train_records is not None:
        pool = pool[: cfg.train.max_train_records]
    return few_shot_records(cfg)[:k], pool


def eval_sets(cfg: "Config") -> list[EvalSetConfig]:
    """``data.eval_sets`` (paths resolved), or (null) one pooled set ``finqa`` per ``evaluate.splits`` with ``evaluate.subset``."""
    if cfg.data.eval_sets is not None:  # a null path is the FinQA split of the set's split
        return [s.model_copy(update={"path": s.path or getattr(cfg.data, f"{s.split}_path")}) for s in cfg.data.eval_sets]
    return [
        EvalSetConfig(name="finqa", path=getattr(cfg.data, f"{split}_path"), split=split, subset=cfg.evaluate.subset,
                      pooled=True)
        for split in cfg.evaluate.splits
    ]


def eval_records(cfg: "Config", eval_set: EvalSetConfig) -> tuple[list[FinQARecord], set[str]]:
    """The set's records (after ``subset`` and the set's and ``evaluate.max_records`` caps) and the ids of
    its FinQA random-sample records (empty for a set that is not a FinQA split)."""
    records = load_split(eval_set.path)
    split = Path(eval_set.path).stem
    random_ids: set[str] = set()
    if split in ("train", "dev", "test") and Path(cfg.data.provenance_path).is_file():
        random_ids = random_subset_ids(cfg.data.provenance_path, split)
    if eval_set.subset == "random":
        if not random_ids:
            raise ConfigError(
                f"data.eval_sets.{eval_set.name}: subset 'random' needs a FinQA split (train/dev/test.json) listed "
                f"in {cfg.data.provenance_path}, got {eval_set.path}"
            )
        records = [r for r in records if r.id in random_ids]
    for cap in (eval_set.max_records, cfg.evaluate.max_records):
        if cap is not None:
            records = records[:cap]
    return records, random_ids


def data_files(cfg: "Config") -> list[str]:
    """Every file the config trains or evaluates on, FinQA's three splits first (what ``validate`` checks)."""
    files = [cfg.data.train_path, cfg.data.dev_path, cfg.data.test_path]
    files += [s.path for s in train_sources(cfg)] + [s.path for s in eval_sets(cfg)]
    return list(dict.fromkeys(files))


__all__ = ["dataset_of", "train_sources", "few_shot_records", "training_pool", "eval_sets", "eval_records", "data_files"]
