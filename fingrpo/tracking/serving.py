"""The registered model: a pyfunc (MLflow models-from-code) that holds the LoRA adapter and the serving
config (base model name, prompt config, generation lengths, few-shot records) and answers FinQA-shaped
requests exactly as evaluation prompts and scores them.

Serving the champion from the project's own environment (the pyfunc imports the installed ``fingrpo``;
activate the venv: the server execs ``uvicorn`` from PATH)::

    mlflow models serve -m models:/fingrpo-finqa@champion --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"question": "...", "pre_text": [...], "post_text": [...], "table": [[...]]}]}'

or in Python: ``mlflow.pyfunc.load_model("models:/fingrpo-finqa@champion").predict(df)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fingrpo.answers import execute_completion
from fingrpo.config import DataConfig, ModelConfig, PromptConfig
from fingrpo.data.finqa import FinQARecord
from fingrpo.data.prompts import make_examples, render_prompt
from fingrpo.data.sources import few_shot_records
from fingrpo.errors import DataError
from fingrpo.io import read_json
from fingrpo.model import generate_completions, load_adapter, load_model_and_tokenizer
from fingrpo.tracking.client import one_line

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import Config

SERVING_CONFIG = "fingrpo_serving.json"  # saved beside the adapter in every model version
PYFUNC_ENTRY_POINT = """\\
# fingrpo's registered model (MLflow models-from-code): the class lives in the installed package.
import mlflow
from fingrpo.tracking.serving import FinQAPyfuncModel

mlflow.models.set_model(FinQAPyfuncModel())
"""
PREDICTION_COLUMNS = ("id", "completion", "program", "answer", "answer_value", "value", "context_mode")


def pip_requirements() -> list[str]:
    """What the pyfunc needs, pinned to what is installed. Explicit, so MLflow infers nothing (its
    inference wanted torchvision for transformers models). ``fingrpo`` itself comes from the serving
    environment (``--env-manager local`` in the project venv)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "gguf",
                 "pandas", "numpy", "pydantic", "pyyaml", "sympy"):
        with contextlib.suppress(PackageNotFoundError):
            reqs.append(f"{dist}=={version(dist)}")
    return reqs


def _row_to_record(row: dict, index: int) -> dict:
    """One input row -> a FinQA record dict (official layout: question under ``qa``)."""
    rec = row.get("record")
    if rec is not None and not (isinstance(rec, float) and math.isnan(rec)):  # NaN: this row has no record
        if isinstance(rec, str):
            try:
                rec = json.loads(rec)
            except json.JSONDecodeError as e:
                raise DataError(f"input row {index}: column 'record' is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"input row {index}: column 'record' must be a FinQA record object")
        return rec
    if not row.get("question"):
        raise DataError(f"input row {index}: column 'question' is missing or empty (or pass a 'record' column)")

    def _as_list(name: str) -> list:
        value = row.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return []
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, str):  # JSON text from a CSV / form
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
        if not isinstance(value, list):
            raise DataError(f"input row {index}: column {name!r} must be a list")
        return [v.tolist() if hasattr(v, "tolist") else v for v in value]

    qa = {"question": str(row["question"])}
    gold_inds = row.get("gold_inds")
    if isinstance(gold_inds, str):
        with contextlib.suppress(json.JSONDecodeError):
            gold_inds = json.loads(gold_inds)
    if isinstance(gold_inds, dict) and gold_inds:
        qa["gold_inds"] = gold_inds
    return {
        "id": str(row.get("id") or f"input-{index}"),
        "pre_text": _as_list("pre_text"),
        "post_text": _as_list("post_text"),
        "table": _as_list("table"),
        "qa": qa,
    }


class _FinQAPyfunc:
    """The registered model: base LM (named, not stored) + the LoRA adapter + the prompt config.

    ``predict(df)``: each row a FinQA record (columns ``question``, ``pre_text``, ``post_text``,
    ``table``, optional ``gold_inds``/``id``; or one column ``record`` holding the record or its JSON)
    -> DataFrame ``id, completion, program, answer, answer_value, value, context_mode`` where ``value``
    is the completion's program executed on the row's table (None when it does not execute). The prompt is
    built by ``fingrpo.data.finqa`` from the prompt config saved with the version, exactly as in
    training and evaluation; generation is greedy.

    >>> m = mlflow.pyfunc.load_model("models:/fingrpo-finqa@champion")      # doctest: +SKIP
    >>> m.predict(pd.DataFrame(  # doctest: +SKIP
    ...     [{"question": "...", "pre_text": [...], "post_text": [...], "table": [...]}]))
    """

    def load_context(self, context: Any) -> None:
        serving = read_json(context.artifacts["serving_config"])
        self.serving = serving
        model_fields = {k: v for k, v in serving["model"].items() if k in ModelConfig.model_fields}
        self.model_cfg = ModelConfig(**model_fields)  # cache_dir: this machine's default ($FINGRPO_CACHE)
        self.prompt_cfg = PromptConfig(**serving["prompt"])
        self.generation = serving.get("generation", {})
        base, self.tokenizer = load_model_and_tokenizer(self.model_cfg)  # via resolve_model_path: bundled: works
        self.model = load_adapter(base, context.artifacts["adapter"])
        self.model.eval()
        few_shot = serving.get("few_shot_records") or []
        self.few_shot_records = self._records(few_shot, "few_shot_records") if few_shot else None

    @staticmethod
    def _records(rows: list[dict], what: str) -> list:
        out = []
        for i, row in enumerate(rows):
            try:
                out.append(FinQARecord.model_validate(row))
            except Exception as e:  # noqa: BLE001 - pydantic's error, made one line
                raise DataError(f"{what} row {i} (id {row.get('id')}): not a FinQA record: {one_line(e)}") from None
        return out

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate against them
        import pandas as pd

        if isinstance(model_input, dict):
            model_input = [model_input]
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(list(model_input))
        rows = [_row_to_record(row, i) for i, row in enumerate(df.to_dict(orient="records"))]
        records = self._records([_serving_defaults(r) for r in rows], "input")
        # context_mode=gold needs the supporting facts; a request without qa.gold_inds gets the closest
        # thing, the top-k retrieved facts, and the output column context_mode says so
        modes = [self.prompt_cfg.context_mode if (self.prompt_cfg.context_mode != "gold" or rec.qa.gold_inds)
                 else "retrieved" for rec in records]
        prompts: list[str] = [""] * len(records)
        for mode in sorted(set(modes)):
            idx = [i for i, m in enumerate(modes) if m == mode]
            prompt_cfg = self.prompt_cfg.model_copy(update={"context_mode": mode})
            examples = make_examples([records[i] for i in idx], prompt_cfg, tokenizer=self.tokenizer,
                                     few_shot_records=self.few_shot_records)
            for i, ex in zip(idx, examples):
                prompts[i] = render_prompt(ex, self.tokenizer, use_chat_template=prompt_cfg.use_chat_template)
        params = params or {}
        completions = generate_completions(
            self.model, self.tokenizer, prompts,
            max_new_tokens=int(params.get("max_new_tokens", self.generation.get("max_new_tokens", 64))),
            batch_size=int(params.get("batch_size", self.generation.get("batch_size", 8))),
            progress=False,
        )
        out = []
        for rec, mode, completion in zip(records, modes, completions):
            parsed, run = execute_completion(completion, rec.table)
            value = run.value  # None when there is no program, or it does not parse or run
            answer_value = parsed.answer_value
            if isinstance(answer_value, float) and not math.isfinite(answer_value):
                answer_value = None
            out.append({"id": rec.id, "completion": completion, "program": parsed.program,
                        "answer": parsed.answer_text, "answer_value": answer_value, "value": value,
                        "context_mode": mode})
        # object dtype keeps None as None (not NaN) so the scoring server's JSON stays valid
        return pd.DataFrame(out, columns=list(PREDICTION_COLUMNS), dtype=object)


def __getattr__(name: str) -> Any:
    """``FinQAPyfuncModel`` = ``_FinQAPyfunc`` + ``mlflow.pyfunc.PythonModel``, built on first use so that
    ``import fingrpo.tracking`` does not import mlflow. Model versions load it through
    :data:`PYFUNC_ENTRY_POINT` (models-from-code: no pickle)."""
    if name == "FinQAPyfuncModel":
        from mlflow.pyfunc import PythonModel

        cls = type("FinQAPyfuncModel", (_FinQAPyfunc, PythonModel),
                   {"__module__": __name__, "__qualname__": "FinQAPyfuncModel", "__doc__": _FinQAPyfunc.__doc__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _serving_defaults(rec: dict) -> dict:
    """A served record has no gold answer: fill the gold-only fields FinQARecord requires with empty
    placeholders (they never reach the prompt) and make table cells strings."""
    rec = dict(rec)
    qa = dict(rec.get("qa") or {})
    for key, empty in (("answer", ""), ("explanation", ""), ("ann_table_rows", []), ("ann_text_rows", []),
                       ("steps", []), ("program", ""), ("program_re", ""), ("gold_inds", {}), ("exe_ans", 0.0)):
        qa.setdefault(key, empty)
    rec["qa"] = qa
    rec["table"] = [[str(c) for c in row] for row in rec.get("table") or []]
    rec.setdefault("table_ori", rec["table"])
    rec.setdefault("filename", "")
    rec.setdefault("pre_text", [])
    rec.setdefault("post_text", [])
    return rec


def pyfunc_signature(serving: dict) -> Any:
    """The model's input/output schema and its two params (what ``/invocations`` accepts).

    Every input column is optional: a request sends either the record's fields (``question``,
    ``pre_text``, ``post_text``, ``table``, ``gold_inds``, ``id``) or one ``record`` column. Table
    cells are strings, as in the official FinQA JSON.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import (
        AnyType,
        Array,
        ColSpec,
        Map,
        ParamSchema,
        ParamSpec,
        Schema,
    )

    text = Array(DataType.string)
    inputs = Schema([
        ColSpec(DataType.string, "id", required=False),
        ColSpec(DataType.string, "question", required=False),
        ColSpec(text, "pre_text", required=False),
        ColSpec(text, "post_text", required=False),
        ColSpec(Array(text), "table", required=False),
        ColSpec(Map(DataType.string), "gold_inds", required=False),
        ColSpec(AnyType(), "record", required=False),
    ])
    outputs = Schema([
        ColSpec(DataType.string, "id"), ColSpec(DataType.string, "completion"),
        ColSpec(DataType.string, "program", required=False), ColSpec(DataType.string, "answer", required=False),
        ColSpec(AnyType(), "answer_value", required=False), ColSpec(AnyType(), "value", required=False),
        ColSpec(DataType.string, "context_mode"),
    ])
    gen = serving.get("generation", {})
    params = ParamSchema([
        ParamSpec("max_new_tokens", DataType.long, int(gen.get("max_new_tokens", 64))),
        ParamSpec("batch_size", DataType.long, int(gen.get("batch_size", 8))),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def serving_config(cfg: "Config", adapter_dir: str | os.PathLike | None = None) -> dict:
    """What the pyfunc needs besides the adapter: which base, dtype, prompt config, generation lengths
    and the few-shot records, so served prompts are built exactly as in training.

    The model/prompt/data sections come from the config the trainer saved beside the adapter
    (``fingrpo_config.json``) when it is there, else from ``cfg``.
    """
    trained: dict = {}
    saved = Path(adapter_dir or cfg.train.output_dir) / "fingrpo_config.json"
    if saved.is_file():
        trained = read_json(saved)
        if not isinstance(trained, dict):
            raise DataError(f"{saved}: expected the resolved config (a JSON object)")
    model = {**cfg.model.model_dump(mode="json"), **trained.get("model", {})}
    prompt = {**cfg.prompt.model_dump(mode="json"), **trained.get("prompt", {})}
    data = {**cfg.data.model_dump(mode="json"), **trained.get("data", {})}
    trained_cfg = cfg.model_copy(update={"data": DataConfig(**data), "prompt": PromptConfig(**prompt)})
    few_shot = [r.model_dump(mode="json") for r in few_shot_records(trained_cfg)]
    return {
        "model": {"name_or_path": model["name_or_path"], "dtype": model["dtype"]},
        "prompt": prompt,
        "generation": {"max_new_tokens": cfg.evaluate.max_new_tokens, "batch_size": cfg.evaluate.batch_size},
        "few_shot_records": few_shot,
        "trained_config": str(saved) if trained else None,
    }
