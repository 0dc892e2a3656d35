"""The seed's public API, kept by name: ``FinancialJSONDataLoader`` (a FinQA split's prompts and targets)
and ``GRPOJSONTrainer`` (train from JSON paths with a few keyword settings). Both map onto the typed
config and the library; new code uses :mod:`fingrpo.data.finqa` and :mod:`fingrpo.pipeline` directly.

    from fingrpo import FinancialJSONDataLoader, GRPOJSONTrainer     # re-exported by fingrpo/__init__.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

from pydantic import ValidationError

from fingrpo import pipeline
from fingrpo.config import PromptConfig, config_from_dict, load_config
from fingrpo.data.finqa import FinQARecord, load_split
from fingrpo.data.prompts import PromptExample, make_examples, render_prompt
from fingrpo.errors import ConfigError, TrainingError


class FinancialJSONDataLoader:
    """Load a FinQA split and build its prompts and targets (the seed's data loader, kept by name).

    >>> loader = FinancialJSONDataLoader("data/finqa/dev.json", tokenizer=tok, context_mode="gold",   # doctest: +SKIP
    ...                                  few_shot_records=load_split("data/finqa/train.json"))
    >>> len(loader), loader.prompts[0][:20], loader.targets[0]   # doctest: +SKIP
    (457, '<|im_start|>system\\nYou', 'Program: ...\\nAnswer: ...')

    Prompt options come from ``prompt_cfg`` (a :class:`fingrpo.config.PromptConfig`) and/or keyword
    overrides of its fields. Without ``few_shot_records`` the worked examples come from the loaded
    split itself (never the record being asked about). ``max_records`` keeps the first N records.
    """

    def __init__(
        self,
        path: str | Path,
        prompt_cfg: "PromptConfig | None" = None,
        tokenizer: Any = None,
        few_shot_records: Sequence[FinQARecord] | None = None,
        max_records: int | None = None,
        **prompt_options: Any,
    ):
        base = (prompt_cfg or PromptConfig()).model_dump()
        try:
            self.prompt_cfg = PromptConfig.model_validate({**base, **prompt_options})
        except ValidationError as e:
            err = e.errors()[0]
            raise ConfigError(f"prompt.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        self.path = Path(path)
        self.tokenizer = tokenizer
        all_records = load_split(path)
        self.records: list[FinQARecord] = all_records[:max_records]
        shots = few_shot_records if few_shot_records is not None else all_records
        self.examples: list[PromptExample] = make_examples(self.records, self.prompt_cfg, tokenizer, shots)
        self._prompts: list[str] | None = None

    @property
    def prompts(self) -> list[str]:
        """Rendered prompts (chat template when ``prompt.use_chat_template``; needs a tokenizer then)."""
        if self._prompts is None:
            self._prompts = [render_prompt(e, self.tokenizer, self.prompt_cfg.use_chat_template) for e in self.examples]
        return self._prompts

    @property
    def targets(self) -> list[str]:
        return [e.target for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[PromptExample]:
        return iter(self.examples)

    def __getitem__(self, i: int) -> PromptExample:
        return self.examples[i]


class GRPOJSONTrainer:
    """The seed's entry point, mapped onto the typed config and :func:`fingrpo.pipeline.train_stage` (which
    attaches the MLflow callback when ``tracking.enabled``).

    >>> t = GRPOJSONTrainer(model_str="bundled:SmolLM2-135M-Instruct", train_path="data/finqa/train.json",   # doctest: +SKIP
    ...                     dev_path="data/finqa/dev.json", test_path="data/finqa/test.json")   # doctest: +SKIP
    >>> summary = t.train(num_epochs=1, batch_size=4, learning_rate=1e-4, eval_interval=10, save_interval=5)   # doctest: +SKIP

    ``num_epochs`` becomes ``train.max_steps = ceil(num_epochs * train records / batch_size)``;
    ``batch_size`` is ``train.prompts_per_step``. Other settings come from ``params`` (a params.yaml,
    default none: built-in defaults) and ``overrides`` (``["train.group_size=4", ...]`` or a nested dict).
    """

    def __init__(
        self,
        model_str: str | None = None,
        train_path: str = "data/finqa/train.json",
        dev_path: str = "data/finqa/dev.json",
        test_path: str | None = "data/finqa/test.json",
        params: str | None = None,
        overrides: list[str] | dict | None = None,
        callbacks: Sequence[Any] = (),
    ) -> None:
        self.cfg = load_config(params, overrides)
        tree = self.cfg.model_dump(mode="json")
        if model_str is not None:
            tree["model"]["name_or_path"] = model_str
        tree["data"].update(train_path=str(train_path), dev_path=str(dev_path))
        if test_path is not None:
            tree["data"]["test_path"] = str(test_path)
        self._tree = tree
        self.callbacks = list(callbacks)
        self.summary: dict | None = None

    def train(
        self,
        num_epochs: float = 1,
        batch_size: int = 4,
        learning_rate: float = 2e-4,
        eval_interval: int = 10,
        save_interval: int = 5,
        resume: bool = False,
    ) -> dict:
        tree = json.loads(json.dumps(self._tree))
        n_records = len(load_split(tree["data"]["train_path"])) - tree["prompt"]["few_shot"]
        if tree["train"].get("max_train_records"):
            n_records = min(n_records, tree["train"]["max_train_records"])
        if n_records < 1:
            raise TrainingError(f"{tree['data']['train_path']}: no records left after the few-shot examples")
        max_steps = max(1, math.ceil(num_epochs * n_records / batch_size))
        tree["train"].update(
            max_steps=max_steps, prompts_per_step=batch_size, learning_rate=learning_rate,
            eval_interval=eval_interval, save_interval=save_interval,
            warmup_steps=min(tree["train"]["warmup_steps"], max(0, max_steps - 1)),
        )
        self.cfg = config_from_dict(tree, "GRPOJSONTrainer")
        self.summary = pipeline.train_stage(self.cfg, resume=resume, callbacks=self.callbacks)
        return self.summary


__all__ = ["FinancialJSONDataLoader", "GRPOJSONTrainer"]
