"""Several datasets in one config: the training pool (``data.train_sources``) and the evaluation sets
(``data.eval_sets``), each a file of FinQA-shaped records (FinQA itself, or TAT-QA after ``fingrpo
prepare``), so the prompts, rewards, trainer and evaluation serve every dataset unchanged.

    few_shot, pool = training_pool(cfg)      # the worked examples, then the mixed training records
    for s in eval_sets(cfg): ...             # EvalSetConfig: name, path, split, subset, max_records, pooled

The worked examples (``prompt.few_shot``) are the first records of the first source and are left out
of the pool. Sources are mixed in turn (one record of each, round robin, each source contributing its
first ``max_records``), so ``train.max_train_records`` keeps the mix. GRPO trains on the same pool, or on
its own (``train.train_sources``, e.g. more of the same files: prompts the warm start has not memorised).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fingrpo.config import EvalSetConfig, TrainSourceConfig
from fingrpo.data.finqa import FinQARecord, load_split, random_subset_ids
from fingrpo.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import Config


def dataset_of(record: FinQARecord) -> str:
    """``"tatqa"`` for a converted TAT-QA record, else ``"finqa"``."""
    return str((record.model_extra or {}).get("dataset") or "finqa")


def train_sources(cfg: "Config", stage: Literal["sft", "grpo"] = "sft") -> list[TrainSourceConfig]:
    """``data.train_sources`` with every path resolved (a null path is ``data.train_path``), or the FinQA
    train split alone when the list is null. For ``stage="grpo"``: ``train.train_sources`` when set (GRPO's
    own pool; its files must be among those of ``data.train_sources``, which ``validate`` checks and the
    retriever stage ranks), else the same sources as the warm start."""
    if cfg.data.train_sources is None:
        warm = [TrainSourceConfig(name="finqa", path=cfg.data.train_path)]
    else:
        warm = [s.model_copy(update={"path": s.path or cfg.data.train_path}) for s in cfg.data.train_sources]
    if stage == "sft" or cfg.train.train_sources is None:
        return warm
    own = [s.model_copy(update={"path": s.path or cfg.data.train_path}) for s in cfg.train.train_sources]
    unknown = sorted({s.path for s in own} - {s.path for s in warm})
    if unknown:
        raise ConfigError(f"train.train_sources: {unknown} is not a file of data.train_sources "
                          f"{[s.path for s in warm]} (only those are validated and ranked by the retriever stage)")
    return own


def few_shot_records(cfg: "Config") -> list[FinQARecord]:
    """The worked examples' pool, the one few-shot choice of the project: the first ``prompt.few_shot + 1``
    records of the first training source ([] for 0-shot). :func:`fingrpo.data.prompts.make_examples` shows
    the first ``prompt.few_shot`` of them that are not the question itself (the spare one stands in when
    the question is among them, as a served record may be); :func:`training_pool` keeps the first
    ``prompt.few_shot`` out of training. The trainer, the evaluation and the served model all use it."""
    k = cfg.prompt.few_shot
    return load_split(train_sources(cfg)[0].path)[: k + 1] if k else []


def training_pool(cfg: "Config", stage: Literal["sft", "grpo"] = "sft") -> tuple[list[FinQARecord], list[FinQARecord]]:
    """(worked examples, training records) of the warm start (``"sft"``) or of GRPO (``"grpo"``:
    ``train.train_sources`` when set): see the module docstring."""
    per_source: list[list[FinQARecord]] = []
    k = cfg.prompt.few_shot
    shown = {r.id for r in few_shot_records(cfg)[:k]}  # the worked examples are not trained on
    for source in train_sources(cfg, stage):
        records = [r for r in load_split(source.path) if r.id not in shown]
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
