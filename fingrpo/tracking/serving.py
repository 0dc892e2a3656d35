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
from fingrpo.model import generate_completions, load_adapter, load_model_and_tokenizer, merge_lora
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


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))  # NaN: a column this row lacks


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _as_list(value: Any, where: str, rows_of_strings: bool = False) -> list:
    """A request's list field (numpy arrays and JSON text accepted) -> a list of strings, or of rows of
    strings for the table; anything else is a :class:`DataError` naming the row and the field."""
    if _absent(value):
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, str):  # JSON text from a CSV / form
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of {'rows of strings' if rows_of_strings else 'strings'}, "
                        f"got {_kind(value)}")
    value = [v.tolist() if hasattr(v, "tolist") else v for v in value]
    for j, item in enumerate(value):
        if rows_of_strings:
            if not isinstance(item, list) or not all(isinstance(c, str) for c in item):
                raise DataError(f"{where}: row {j}: expected a list of strings (table cells), got "
                                f"{_kind(item) if not isinstance(item, list) else 'a non-string cell'}")
        elif not isinstance(item, str):
            raise DataError(f"{where}: item {j}: expected a string, got {_kind(item)}")
    return value


def _request_record(question: Any, pre_text: Any, post_text: Any, table: Any, gold_inds: Any, rid: Any,
                    where: str) -> dict:
    """A validated request row -> a FinQA record dict (official layout: question under ``qa``).

    The question must be a non-empty string (a number is refused, not read as text), some report
    context must be given (``pre_text``/``post_text``: lists of strings; ``table``: rows of strings),
    and ``gold_inds``, when given, maps fact keys to their text.
    """
    if _absent(question):
        raise DataError(f"{where}: column 'question' is missing or empty (or pass a 'record' column)")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: question: expected a non-empty string, got "
                        f"{_kind(question) if not isinstance(question, str) else 'an empty string'}")
    context = {"pre_text": _as_list(pre_text, f"{where}: pre_text"),
               "post_text": _as_list(post_text, f"{where}: post_text"),
               "table": _as_list(table, f"{where}: table", rows_of_strings=True)}
    if not any(context.values()):
        raise DataError(f"{where}: no report context: give pre_text / post_text (lists of strings) and/or "
                        "table (a list of rows of strings)")
    qa: dict[str, Any] = {"question": question}
    if isinstance(gold_inds, str):
        with contextlib.suppress(json.JSONDecodeError):
            gold_inds = json.loads(gold_inds)
    if not _absent(gold_inds) and gold_inds != {}:
        if not isinstance(gold_inds, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in gold_inds.items()):
            raise DataError(f"{where}: gold_inds: expected a mapping of fact keys (text_N / table_N) to "
                            f"their text, got {_kind(gold_inds)}")
        qa["gold_inds"] = gold_inds
    return {"id": str(rid) if not _absent(rid) and rid != "" else None, **context, "qa": qa}


def _row_to_record(row: dict, index: int) -> dict:
    """One input row (the record's fields, or one ``record`` column) -> a validated FinQA record dict."""
    where = f"input row {index}"
    rec = row.get("record")
    if not _absent(rec):
        if isinstance(rec, str):
            try:
                rec = json.loads(rec)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: column 'record' is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: column 'record' must be a FinQA record object")
        qa = rec.get("qa") if isinstance(rec.get("qa"), dict) else {}
        checked = _request_record(qa.get("question"), rec.get("pre_text"), rec.get("post_text"), rec.get("table"),
                                  qa.get("gold_inds"), rec.get("id"), f"{where}: record")
        return {**rec, **{k: v for k, v in checked.items() if k != "qa"}, "id": checked["id"] or f"input-{index}",
                "qa": {**qa, **checked["qa"]}}
    checked = _request_record(row.get("question"), row.get("pre_text"), row.get("post_text"), row.get("table"),
                              row.get("gold_inds"), row.get("id"), where)
    return {**checked, "id": checked["id"] or f"input-{index}"}


def _invalid_request(errors: list[str]) -> Exception:
    """Bad request rows as MLflow's INVALID_PARAMETER_VALUE: ``mlflow models serve`` answers HTTP 400 with
    this message (every bad row named), instead of a made-up answer."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    head = f"{len(errors)} bad request row(s), nothing answered: " if len(errors) > 1 else ""
    return MlflowException(head + "; ".join(errors), error_code=INVALID_PARAMETER_VALUE)


class _FinQAPyfunc:
    """The registered model: base LM (named, not stored) + the LoRA adapter + the prompt config.

    ``predict(df)``: each row a FinQA record (columns ``question``, ``pre_text``, ``post_text``,
    ``table``, optional ``gold_inds``/``id``; or one column ``record`` holding the record or its JSON)
    -> DataFrame ``id, completion, program, answer, answer_value, value, context_mode`` where ``value``
    is the completion's program executed on the row's table (None when it does not execute). The prompt is
    built by :mod:`fingrpo.data.prompts` from the prompt config saved with the version, exactly as in
    training and evaluation; generation is greedy. Every row is checked first (:func:`_row_to_record`): a
    bad one raises MLflow's ``INVALID_PARAMETER_VALUE`` naming each bad row and field (HTTP 400 from
    ``mlflow models serve``), and nothing of that batch is generated.

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
        if "retriever" in context.artifacts:  # the version's own retriever: serving ranks as evaluation did
            self.prompt_cfg = self.prompt_cfg.model_copy(update={"retriever_dir": context.artifacts["retriever"]})
        elif self.prompt_cfg.retriever != "lexical":
            raise DataError(f"this model version's prompt uses the {self.prompt_cfg.retriever} retriever but the "
                            "version holds no 'retriever' artifact")
        self.generation = serving.get("generation", {})
        base, self.tokenizer = load_model_and_tokenizer(self.model_cfg)  # via resolve_model_path: bundled: works
        self.model = merge_lora(load_adapter(base, context.artifacts["adapter"]))  # as evaluation decodes
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
        rows, errors = [], []
        for i, row in enumerate(df.to_dict(orient="records")):
            try:
                rows.append(_row_to_record(row, i))
            except DataError as e:
                errors.append(str(e))
        if errors:
            raise _invalid_request(errors)
        try:
            records = self._records([_serving_defaults(r) for r in rows], "input")
        except DataError as e:
            raise _invalid_request([str(e)]) from None
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

    Every input column is optional: a request sends either the record's fields (``question``: a
    string, ``pre_text``/``post_text``: lists of strings, ``table``: a list of rows of strings, as in the
    official FinQA JSON, ``gold_inds``: a mapping, ``id``) or one ``record`` column. The record columns
    are declared ``Any``: MLflow's own enforcement would refuse a whole batch in which one row leaves an
    optional list out ("Expected data to be list or numpy array, got float") and would pass a number as
    the question; the pyfunc checks every row itself and names the bad row and field (HTTP 400).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([
        ColSpec(DataType.string, "id", required=False),
        *(ColSpec(AnyType(), name, required=False)
          for name in ("question", "pre_text", "post_text", "table", "gold_inds", "record")),
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
    # sections of the trained config, as far as this version of the config knows their fields (an adapter
    # trained by an older fingrpo registers too)
    data = {**cfg.data.model_dump(mode="json"), **trained.get("data", {})}
    known = {"data": DataConfig(**{k: v for k, v in data.items() if k in DataConfig.model_fields}),
             "prompt": PromptConfig(**{k: v for k, v in prompt.items() if k in PromptConfig.model_fields})}
    trained_cfg = cfg.model_copy(update=known)
    few_shot = [r.model_dump(mode="json") for r in few_shot_records(trained_cfg)]
    return {
        "model": {"name_or_path": model["name_or_path"], "dtype": model["dtype"]},
        "prompt": prompt,
        "generation": {"max_new_tokens": cfg.evaluate.max_new_tokens, "batch_size": cfg.evaluate.batch_size},
        "few_shot_records": few_shot,
        "trained_config": str(saved) if trained else None,
    }
