"""MLflow tracking, the registry's promotion gate and the pyfunc model (fingrpo.tracking).

Every test uses its own SQLite store under tmp_path (``sqlite:////tmp/.../mlflow.db``, artifacts in
``<tmp>/mlartifacts``) and the tiny random llama with a tiny LoRA adapter saved in the test.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fingrpo.config import load_config
from fingrpo.errors import ConfigError, DataError, TrackingError
from fingrpo.tracking.client import fluent_uri

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TEMPLATE_DB: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _template_db(tmp_path_factory):
    """One SQLite store with MLflow's schema, copied for each test: creating the schema (alembic
    migrations) costs seconds on a busy machine, copying the file milliseconds."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments(max_results=1)
    _TEMPLATE_DB[:] = [db]
    yield db
    _TEMPLATE_DB.clear()


def fresh_db(path: Path) -> str:
    """``sqlite:///<path>``, a copy of the template store (a new store when there is no template)."""
    import shutil

    if _TEMPLATE_DB and not path.exists():
        shutil.copyfile(_TEMPLATE_DB[0], path)
    return f"sqlite:///{path}"


def make_cfg(tmp: Path, model_path: Path | str = "bundled:SmolLM2-135M-Instruct", **sections) -> "object":
    """A config whose every output lands in ``tmp`` and whose MLflow store is ``tmp/mlflow.db``."""
    tree = {
        "model": {"name_or_path": str(model_path)},
        "prompt": {"few_shot": 1, "max_prompt_tokens": 2048},
        "train": {"output_dir": str(tmp / "adapter"), "metrics_path": str(tmp / "train_metrics.csv")},
        "evaluate": {"output_path": str(tmp / "eval.json"), "predictions_path": str(tmp / "predictions.jsonl"),
                     "max_new_tokens": 6, "batch_size": 2},
        # the gate tests write eval.json + predictions.jsonl by hand for one set, "x" (write_evaluation)
        "register": {"output_path": str(tmp / "promotion.json"), "metric": "dev.x.adapter.execution_accuracy"},
        "tracking": {"tracking_uri": fresh_db(tmp / "mlflow.db"), "run_file": str(tmp / "mlflow_run.json"),
                     "experiment_name": "fingrpo-test", "retry_backoff_s": 0.0},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return load_config(None, tree)


@pytest.fixture(autouse=True)
def _project_root(monkeypatch):
    # provenance tags read data.dvc / dvc.lock / git from the working directory, like `dvc repro`
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_path) -> Path:
    """A tiny LoRA adapter (non-zero B, so it changes the outputs) + tokenizer, saved like training does."""
    import torch

    from fingrpo.config import LoraConfig, ModelConfig
    from fingrpo.model import add_lora, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_path)))
    policy = add_lora(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("adapter-src") / "adapter"
    policy.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _client(cfg):
    from mlflow import MlflowClient

    uri = cfg.tracking.tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ------------------------------------------------------------------------------------------------
# URIs, health check, retries
# ------------------------------------------------------------------------------------------------


def test_redact_uri_strips_credentials():
    from fingrpo.config import redact_uri

    assert redact_uri("http://bob:hunter2@10.0.0.5:5000") == "http://***@10.0.0.5:5000"
    assert "hunter2" not in redact_uri("postgresql://bob:hunter2@db/mlflow")
    assert redact_uri("https://h/?api_token=xyz&a=1") == "https://h/?api_token=***&a=1"
    assert redact_uri("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"
    assert redact_uri(None) is None


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    from fingrpo.tracking import (
        DEFAULT_TRACKING_URI,
        default_artifact_location,
        resolve_tracking_uri,
    )

    cfg = load_config(None)
    assert resolve_tracking_uri(cfg) == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    assert default_artifact_location(cfg) == str(ROOT / "mlartifacts")  # inside the project, git-ignored
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(cfg) == "http://127.0.0.1:5999"
    cfg = make_cfg(tmp_path)
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path}/mlflow.db"
    assert default_artifact_location(cfg) == str(tmp_path / "mlartifacts")


def test_unreachable_server_fails_fast_without_leaking_credentials(tmp_path):
    from fingrpo.tracking import MLflowCallback, check_tracking

    port = _free_port()  # bound then released: nothing listens there
    cfg = make_cfg(tmp_path, tracking={"tracking_uri": f"http://alice:s3cret@127.0.0.1:{port}"})
    start = time.perf_counter()
    with pytest.raises(TrackingError) as err:
        check_tracking(cfg)
    assert time.perf_counter() - start < 3.0
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "unreachable" in msg and "mlflow server" in msg
    assert "s3cret" not in msg and "alice" not in msg
    # the callback checks at construction, i.e. before any training starts
    with pytest.raises(TrackingError):
        MLflowCallback(cfg)


def test_unusable_sqlite_store_is_a_tracking_error(tmp_path):
    from fingrpo.tracking import check_tracking

    (tmp_path / "not-a-db").write_text("this is not sqlite")
    cfg = make_cfg(tmp_path, tracking={"tracking_uri": f"sqlite:///{tmp_path}/not-a-db"})
    with pytest.raises(TrackingError, match="not-a-db"):
        check_tracking(cfg)


def test_retry_wrapper_backs_off_and_gives_up(monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        INVALID_PARAMETER_VALUE,
        TEMPORARILY_UNAVAILABLE,
    )

    from fingrpo.tracking import client as tracking

    sleeps: list[float] = []
    monkeypatch.setattr(tracking.time, "sleep", sleeps.append)
    calls = []

    def always_down():
        calls.append(1)
        raise MlflowException("server busy", error_code=TEMPORARILY_UNAVAILABLE)

    with pytest.raises(TrackingError, match=r"always_down failed after 3 attempts against http://\*\*\*@h"):
        tracking.call_with_retries(always_down, attempts=3, backoff_s=0.5, uri="http://u:p@h")
    assert len(calls) == 3 and sleeps == [0.5, 1.0]  # exponential backoff

    def bad_request():
        calls.append(1)
        raise MlflowException("bad param", error_code=INVALID_PARAMETER_VALUE)

    calls.clear()
    with pytest.raises(MlflowException, match="bad param"):  # not transient: no retry
        tracking.call_with_retries(bad_request, attempts=3, backoff_s=0.5)
    assert len(calls) == 1


def test_callback_retries_a_transient_failure(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from fingrpo.tracking import MLflowCallback

    cfg = make_cfg(tmp_path)
    cb = MLflowCallback(cfg)
    cb.on_train_begin(SimpleNamespace(config=cfg))
    real = MlflowClient.log_batch
    calls = []

    def flaky(self, run_id, metrics=(), params=(), tags=(), **kw):
        calls.append(len(metrics))
        if len(calls) == 1:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return real(self, run_id, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    cb.on_step_end(1, {"loss": 0.5})
    monkeypatch.setattr(MlflowClient, "log_batch", real)
    assert calls == [1, 1]  # failed once, retried once
    assert cb.failed_calls == 0
    assert [m.value for m in _client(cfg).get_metric_history(cb.run_id, "loss")] == [0.5]


def test_mid_training_logging_failures_never_stop_training(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from fingrpo.tracking import MLflowCallback

    cfg = make_cfg(tmp_path, tracking={"retries": 2})
    cb = MLflowCallback(cfg)
    cb.on_train_begin(SimpleNamespace(config=cfg))
    calls = []

    def down(self, *a, **k):
        calls.append(1)
        raise ConnectionError("connection refused")

    real_log_batch = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", down)
    for step in range(1, 6):
        cb.on_step_end(step, {"loss": 1.0})  # warns, does not raise
    assert cb.failed_calls == 5
    assert len(calls) == 2 * MLflowCallback.MAX_CONSECUTIVE_FAILURES  # then logging pauses: no more waiting
    monkeypatch.setattr(MlflowClient, "log_batch", real_log_batch)
    monkeypatch.setattr(MlflowClient, "set_terminated", down)
    with pytest.raises(TrackingError, match="failed after 2 attempts"):
        cb.on_train_end({"steps": 5, "output_dir": None})  # the end of training is not silent about it


# ------------------------------------------------------------------------------------------------
# The callback and the stages' shared run
# ------------------------------------------------------------------------------------------------


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except subprocess.CalledProcessError:  # a repository without commits yet
        return "unknown"


def test_callback_logs_params_metrics_tags_samples_and_adapter(tmp_path, adapter_dir):
    import shutil

    from fingrpo.tracking import MLflowCallback, data_hash

    cfg = make_cfg(tmp_path, train={"learning_rate": 3e-4, "max_steps": 2, "warmup_steps": 0},
                   pipeline={"reports_dir": str(tmp_path / "reports")})
    shutil.copytree(adapter_dir, cfg.train.output_dir)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "validation.json").write_text('{"success": true}')  # the validate stage's report
    cb = MLflowCallback(cfg)
    cb.on_train_begin(SimpleNamespace(config=cfg))
    for step in (1, 2):
        cb.on_step_end(step, {"loss": 1.0 / step, "reward/mean": 0.1 * step, "kl": float("nan"), "note": "x"})
    cb.on_evaluate(2, {"eval/execution_accuracy": 0.25},
                   [{"id": "a", "completion": "Program: add(1, 2)\nAnswer: 3", "reward": 1.0},
                    {"id": "b", "completion": "", "reward": 0.0, "rewards": {"format": 0.0}}])
    cb.on_save(2, tmp_path / "ckpt" / "step-2")
    cb.on_train_end({"steps": 2, "reward_mean": 0.2, "output_dir": cfg.train.output_dir})

    client = _client(cfg)
    run = client.get_run(cb.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "fingrpo-test"
    assert client.get_experiment(run.info.experiment_id).artifact_location.endswith(f"{tmp_path}/mlartifacts")
    params = run.data.params
    assert params["train.learning_rate"] == "0.0003"
    assert params["lora.target_modules"] == '["q_proj", "v_proj"]'
    assert params["model.name_or_path"] == "bundled:SmolLM2-135M-Instruct"
    assert [(m.step, m.value) for m in client.get_metric_history(cb.run_id, "reward/mean")] == [(1, 0.1), (2, 0.2)]
    assert "kl" not in run.data.metrics  # NaN is skipped, not logged
    assert run.data.metrics["eval/execution_accuracy"] == 0.25
    assert run.data.metrics["summary.reward_mean"] == 0.2
    tags = run.data.tags
    assert tags["fingrpo.git_commit"] == _git_head()
    assert tags["fingrpo.git_dirty"] in {"true", "false", "unknown"}
    assert tags["fingrpo.data_md5"] == data_hash(ROOT / "data.dvc") and tags["fingrpo.data_md5"].endswith(".dir")
    assert "fingrpo.dvc_lock_md5" in tags and tags["fingrpo.version"]
    assert tags["fingrpo.last_checkpoint_step"] == "2"

    assert [f.path for f in client.list_artifacts(cb.run_id, "validation")] == ["validation/validation.json"]
    artifacts = {f.path for f in client.list_artifacts(cb.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= artifacts
    table = json.loads(Path(client.download_artifacts(cb.run_id, "samples/eval_samples.json", str(tmp_path))).read_text())
    assert table["columns"][:2] == ["step", "id"] and len(table["data"]) == 2
    summary = json.loads(Path(client.download_artifacts(cb.run_id, "train_summary.json", str(tmp_path))).read_text())
    assert summary["steps"] == 2

    run_file = json.loads(Path(cfg.tracking.run_file).read_text())
    assert run_file["run_id"] == cb.run_id and run_file["experiment_id"] == run.info.experiment_id
    assert run_file["tracking_uri"] == cfg.tracking.tracking_uri


def test_real_trainer_logs_through_the_callback(tmp_path, tiny_model_path, data_dir):
    """GRPO on the tiny model for 2 steps: the train stage attaches MLflowCallback itself (tracking on)."""
    from fingrpo.pipeline import train_stage

    cfg = make_cfg(
        tmp_path, model_path=tiny_model_path,
        prompt={"few_shot": 0, "context_mode": "gold", "max_prompt_tokens": 512},
        train={"max_steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, "warmup_steps": 0,
               "eval_interval": 2, "eval_subset_size": 1, "save_interval": 2, "max_train_records": 4,
               "checkpoint_dir": str(tmp_path / "ckpt"), "rollout_rewards_path": str(tmp_path / "rollouts.jsonl")},
        data={"train_path": str(data_dir / "train.json"), "dev_path": str(data_dir / "dev.json"),
              "test_path": str(data_dir / "test.json"), "provenance_path": str(data_dir / "provenance.json")},
    )
    summary = train_stage(cfg)
    run_id = json.loads(Path(cfg.tracking.run_file).read_text())["run_id"]
    client = _client(cfg)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and summary["steps"] == 2
    assert run.data.params["train.group_size"] == "2"
    losses = client.get_metric_history(run_id, "loss")
    assert [m.step for m in losses] == [1, 2]
    assert any(k.startswith("reward") for k in run.data.metrics)
    assert run.data.tags["fingrpo.last_checkpoint_step"] == "2"
    top = {f.path for f in client.list_artifacts(run_id)}
    assert {"adapter", "train_summary.json", "config", "samples"} <= top  # eval at step 2 logged samples
    assert "summary.steps" in run.data.metrics and not any(k.startswith("summary.final_metrics") for k in run.data.metrics)
    assert "adapter/fingrpo_config.json" in {f.path for f in client.list_artifacts(run_id, "adapter")}


def test_a_resumed_training_continues_its_run(tmp_path):
    from fingrpo.tracking import MLflowCallback

    cfg = make_cfg(tmp_path)
    first = MLflowCallback(cfg, log_adapter=False)
    first.on_train_begin(SimpleNamespace(config=cfg, step=0))
    for step in (1, 2):
        first.on_step_end(step, {"loss": float(step)})
    first.close("FAILED")  # the process died after step 2's checkpoint

    resumed = MLflowCallback(cfg, log_adapter=False)
    resumed.on_train_begin(SimpleNamespace(config=cfg, step=2))  # the trainer restored step 2
    for step in (3, 4):
        resumed.on_step_end(step, {"loss": float(step)})
    resumed.on_train_end({"steps": 4})
    assert resumed.run_id == first.run_id
    client = _client(cfg)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["fingrpo.resumed_at_step"] == "2"
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2, 3, 4]

    fresh = MLflowCallback(cfg, log_adapter=False)  # a training from scratch gets a new run
    fresh.on_train_begin(SimpleNamespace(config=cfg, step=0))
    assert fresh.run_id != first.run_id
    fresh.close()


def test_disabled_tracking_logs_nothing(tmp_path):
    from fingrpo.tracking import MLflowCallback, callbacks_from_config, log_evaluation

    cfg = make_cfg(tmp_path, tracking={"enabled": False, "tracking_uri": "http://127.0.0.1:9"})
    assert callbacks_from_config(cfg) == []
    cb = MLflowCallback(cfg)  # no health check either
    cb.on_train_begin(SimpleNamespace(config=cfg))
    cb.on_step_end(1, {"loss": 1.0})
    cb.on_train_end({})
    assert cb.run_id is None and log_evaluation(cfg, {"dev": {"x": 1}}) is None
    assert not Path(cfg.tracking.run_file).exists()


def test_later_stages_log_into_the_training_run(tmp_path):
    from fingrpo.tracking import (
        MLflowCallback,
        log_artifacts,
        log_evaluation,
        log_plots,
    )

    cfg = make_cfg(tmp_path)
    cb = MLflowCallback(cfg, log_adapter=False)
    cb.on_train_begin(SimpleNamespace(config=cfg))
    cb.on_train_end({"steps": 1})

    result = {"dev": {"adapter": {"execution_accuracy": 0.3, "ci95": [0.1, 0.5], "n": 40},
                      "base": {"execution_accuracy": 0.2}}}
    Path(cfg.evaluate.output_path).write_text(json.dumps(result))
    Path(cfg.evaluate.predictions_path).write_text('{"id": "a", "completion": "x"}\n')
    png = tmp_path / "plots" / "reward.png"
    png.parent.mkdir()
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    report = tmp_path / "validation.json"
    report.write_text("{}")

    # each call is what a separate `dvc repro` stage process does: config in, run id from the run file
    assert log_evaluation(cfg, result) == cb.run_id
    assert log_plots(cfg, [png]) == cb.run_id
    assert log_artifacts(cfg, [report]) == cb.run_id
    with pytest.raises(DataError, match="missing.json"):
        log_artifacts(cfg, [tmp_path / "missing.json"])

    client = _client(cfg)
    metrics = client.get_run(cb.run_id).data.metrics
    assert metrics["dev.adapter.execution_accuracy"] == 0.3
    assert metrics["dev.base.execution_accuracy"] == 0.2
    assert metrics["dev.adapter.ci95.1"] == 0.5
    paths = {f.path for d in ("", "evaluation", "plots") for f in client.list_artifacts(cb.run_id, d or None)}
    assert {"evaluation/eval.json", "evaluation/predictions.jsonl", "plots/reward.png", "validation.json"} <= paths
    assert len(client.search_runs([client.get_run(cb.run_id).info.experiment_id])) == 1


def test_run_file_from_another_store_is_an_error(tmp_path):
    from fingrpo.tracking import MLflowCallback, log_evaluation

    cfg = make_cfg(tmp_path)
    cb = MLflowCallback(cfg, log_adapter=False)
    cb.on_train_begin(SimpleNamespace(config=cfg))
    other = make_cfg(tmp_path, tracking={"tracking_uri": fresh_db(tmp_path / "other.db"),
                                         "run_file": cfg.tracking.run_file})
    with pytest.raises(TrackingError, match="lives in sqlite:///.*mlflow.db"):
        log_evaluation(other, {"dev": {"x": 1.0}})
    cb.close("KILLED")
    assert _client(cfg).get_run(cb.run_id).info.status == "KILLED"


# ------------------------------------------------------------------------------------------------
# Registry + promotion gate
# ------------------------------------------------------------------------------------------------


METRIC = "dev.x.adapter.execution_accuracy"


def write_evaluation(eval_path, predictions_path, right: int, n: int = 100, *, first_id: int = 0,
                     data_md5: str = "data-v1.dir", context_mode: str = "gold") -> None:
    """What `fingrpo evaluate` writes for the adapter on one set "x": records r<first_id>..r<first_id+n-1>,
    the first ``right`` of them right."""
    rows = [{"id": f"r{i}", "dataset": "finqa", "model": "adapter", "split": "dev", "sets": ["x"],
             "random_subset": True, "correct_official": i - first_id < right} for i in range(first_id, first_id + n)]
    Path(predictions_path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    Path(eval_path).write_text(json.dumps({
        "dev": {"x": {"adapter": {"execution_accuracy": right / n, "n": n}}},
        "summary": {"sets": {"dev.x": {"pooled": True}}, "data_md5": data_md5, "context_mode": context_mode},
    }))


def _promote(tmp_path, adapter_dir, tiny_model_path, right, n=100, evaluate_champion=None, evaluation=None, **register):
    import shutil

    from fingrpo.tracking import MLflowCallback, register_from_config

    cfg = make_cfg(tmp_path, model_path=tiny_model_path, register=register)
    if not Path(cfg.train.output_dir).exists():
        shutil.copytree(adapter_dir, cfg.train.output_dir)
    cb = MLflowCallback(cfg, log_adapter=False)  # every promotion follows its own training run
    cb.on_train_begin(SimpleNamespace(config=cfg))
    cb.on_train_end({})
    write_evaluation(cfg.evaluate.output_path, cfg.evaluate.predictions_path, right, n, **(evaluation or {}))
    decision = register_from_config(cfg, evaluate_champion=evaluate_champion)
    assert json.loads(Path(cfg.register.output_path).read_text()) == decision
    assert decision["challenger"]["run_id"] == cb.run_id
    return cfg, decision


def test_promotion_gate(tmp_path, adapter_dir, tiny_model_path):
    cfg, d1 = _promote(tmp_path, adapter_dir, tiny_model_path, 20)
    assert d1["decision"] == "promoted" and "first version" in d1["reason"]
    assert d1["challenger"] == {"version": "1", "value": 0.20, "run_id": d1["challenger"]["run_id"]}
    assert d1["previous_champion"] == {"version": None, "value": None}

    # the same 100 records, 10 more right: 10 gained, 0 lost, exact McNemar p = 2^-10
    _, d2 = _promote(tmp_path, adapter_dir, tiny_model_path, 30)
    assert d2["decision"] == "promoted" and d2["champion"]["version"] == "2"
    assert d2["previous_champion"] == {"version": "1", "value": 0.20}
    cmp = d2["gate"]["comparison"]
    assert (cmp["gained"], cmp["lost"], cmp["records"], cmp["rule"]) == (10, 0, 100, "mcnemar")
    assert cmp["p_value"] == pytest.approx(2 ** -10)
    assert d2["gate"]["challenger"]["set_md5"] == d2["gate"]["champion"]["set_md5"]
    assert not d2["gate"]["champion_reevaluated"]

    _, d3 = _promote(tmp_path, adapter_dir, tiny_model_path, 30)  # equal: not better
    assert d3["decision"] == "kept" and "0 gained, 0 lost" in d3["reason"] and "champion v2" in d3["reason"]
    assert d3["challenger"]["value"] == 0.30 and d3["previous_champion"] == {"version": "2", "value": 0.30}

    _, d4 = _promote(tmp_path, adapter_dir, tiny_model_path, 25)  # worse
    assert d4["decision"] == "kept" and "0 gained, 5 lost" in d4["reason"]

    _, d5 = _promote(tmp_path, adapter_dir, tiny_model_path, 33)  # better, by 3 records: p = 1/8
    assert d5["decision"] == "kept" and "not significant at alpha=0.05" in d5["reason"]
    _, d5b = _promote(tmp_path, adapter_dir, tiny_model_path, 35, min_improvement=0.1)  # better, not enough
    assert d5b["decision"] == "kept" and "by more than 0.1" in d5b["reason"]

    _, d6 = _promote(tmp_path, adapter_dir, tiny_model_path, 41, min_improvement=0.1)
    assert d6["decision"] == "promoted" and d6["previous_champion"]["version"] == "2"
    _, d7 = _promote(tmp_path, adapter_dir, tiny_model_path, 43, rule="gained_minus_lost")  # +2: no test asked
    assert d7["decision"] == "promoted" and d7["gate"]["comparison"]["gained"] == 2

    client = _client(cfg)
    assert str(client.get_model_version_by_alias("fingrpo-finqa", "champion").version) == "8"
    assert str(client.get_model_version_by_alias("fingrpo-finqa", "challenger").version) == "8"
    v4 = client.get_model_version("fingrpo-finqa", "4")
    assert v4.tags["fingrpo.gate_metric"] == METRIC
    assert float(v4.tags["fingrpo.gate_metric_value"]) == 0.25
    assert v4.tags["fingrpo.gate_set_n"] == "100" and v4.tags["fingrpo.gate_data_md5"] == "data-v1.dir"
    assert v4.tags["fingrpo.gate_context_mode"] == "gold" and v4.tags["fingrpo.gate_decision"] == "kept"
    assert v4.tags["fingrpo.gate_compared_with"] == "v2" and v4.tags["fingrpo.gate_lost"] == "5"
    assert v4.tags["fingrpo.git_commit"] == _git_head()
    assert v4.tags["fingrpo.data_md5"].endswith(".dir")
    assert v4.tags["fingrpo.fingerprint.data"] == v4.tags["fingrpo.data_md5"] and len(v4.tags["fingrpo.fingerprint"]) == 32
    assert json.loads(v4.tags["fingrpo.params"])["model"]["name_or_path"] == str(tiny_model_path)
    run = client.get_run(v4.run_id)
    assert run.data.tags["fingrpo.promotion"] == "kept"
    assert run.data.tags["fingrpo.fingerprint"] == v4.tags["fingrpo.fingerprint"]


def test_a_challenger_on_a_smaller_set_never_wins_on_that_comparison(tmp_path, adapter_dir, tiny_model_path):
    """1 right of 4 records (0.25) against a champion measured at 0.11 on 457: not the same set, so not
    compared (kept); re-evaluated on the challenger's 4 records, 1 gained / 0 lost is p = 0.5 (kept)."""
    _, d1 = _promote(tmp_path, adapter_dir, tiny_model_path, 50, n=457)
    assert d1["decision"] == "promoted" and d1["challenger"]["value"] == pytest.approx(50 / 457)

    small = {"first_id": 1000, "data_md5": "data-v2.dir"}  # a scheduled run's 4 records of another data version
    _, d2 = _promote(tmp_path, adapter_dir, tiny_model_path, 1, n=4, evaluation=small)
    assert d2["decision"] == "kept" and "not the same evaluation set" in d2["reason"]
    assert d2["gate"]["challenger"]["n"] == 4 and d2["gate"]["champion"]["n"] == 457
    assert d2["champion"]["version"] == "1"

    seen = []

    def evaluate_champion(adapter, serving):  # what pipeline.register_stage passes: the champion on the challenger's set
        seen.append(((adapter / "adapter_config.json").is_file(), serving["model"]["name_or_path"]))
        out = tmp_path / "champion_eval"
        out.mkdir(exist_ok=True)
        write_evaluation(out / "eval.json", out / "predictions.jsonl", 0, 4, **small)
        return out / "eval.json", out / "predictions.jsonl"

    _, d3 = _promote(tmp_path, adapter_dir, tiny_model_path, 1, n=4, evaluation=small, evaluate_champion=evaluate_champion)
    assert seen == [(True, str(tiny_model_path))]  # the champion's own adapter and serving config
    assert d3["decision"] == "kept" and d3["gate"]["champion_reevaluated"]
    assert "re-evaluated" in d3["reason"] and "1 gained, 0 lost" in d3["reason"] and "not significant" in d3["reason"]
    assert d3["gate"]["champion"]["n"] == 4 and d3["gate"]["champion_as_registered"]["n"] == 457
    assert d3["previous_champion"] == {"version": "1", "value": 0.0}


def test_gate_reads_an_untagged_champion_from_its_run(tmp_path, adapter_dir, tiny_model_path):
    """A champion registered by hand (no gate tags): kept (nothing to compare with); with its run's
    metric but no set it is still not compared, until it is re-evaluated on the challenger's set."""
    cfg, d1 = _promote(tmp_path, adapter_dir, tiny_model_path, 50)
    client = _client(cfg)
    for key in ("fingrpo.gate_metric", "fingrpo.gate_metric_value", "fingrpo.gate_set_md5"):
        client.delete_model_version_tag("fingrpo-finqa", "1", key)
    _, d2 = _promote(tmp_path, adapter_dir, tiny_model_path, 90)
    assert d2["decision"] == "kept" and f"v1 has no recorded {METRIC}" in d2["reason"]
    client.log_metric(d1["challenger"]["run_id"], METRIC, 0.5)
    _, d3 = _promote(tmp_path, adapter_dir, tiny_model_path, 60)
    assert d3["decision"] == "kept" and "not the same evaluation set" in d3["reason"]

    def evaluate_champion(adapter, serving):
        out = tmp_path / "champion_eval"
        out.mkdir(exist_ok=True)
        write_evaluation(out / "eval.json", out / "predictions.jsonl", 50)
        return out / "eval.json", out / "predictions.jsonl"

    _, d4 = _promote(tmp_path, adapter_dir, tiny_model_path, 60, evaluate_champion=evaluate_champion)
    assert d4["decision"] == "promoted" and d4["previous_champion"] == {"version": "1", "value": 0.5}
    assert "10 gained, 0 lost" in d4["reason"]


def test_promotion_needs_the_metric_and_the_adapter(tmp_path, adapter_dir, tiny_model_path):
    import shutil

    from fingrpo.errors import ModelError
    from fingrpo.tracking import register_from_config

    cfg = make_cfg(tmp_path, model_path=tiny_model_path)
    Path(cfg.evaluate.output_path).write_text(json.dumps({"dev": {"x": {"adapter": {"program_accuracy": 0.1}}}}))
    with pytest.raises(DataError, match=rf"eval.json: register.metric '{METRIC}' not found"):
        register_from_config(cfg)
    write_evaluation(cfg.evaluate.output_path, cfg.evaluate.predictions_path, 10)
    Path(cfg.evaluate.predictions_path).unlink()
    with pytest.raises(DataError, match="predictions.jsonl: the per-record predictions of .* are missing"):
        register_from_config(cfg)
    write_evaluation(cfg.evaluate.output_path, cfg.evaluate.predictions_path, 10)
    with pytest.raises(ConfigError, match="register.metric 'dev.adapter.execution_accuracy': expected <split>.<set>.<model>"):
        register_from_config(make_cfg(tmp_path, model_path=tiny_model_path,
                                      register={"metric": "dev.adapter.execution_accuracy"}))
    with pytest.raises(ModelError, match="adapter"):
        register_from_config(cfg)
    shutil.copytree(adapter_dir, cfg.train.output_dir)
    assert register_from_config(cfg)["decision"] == "promoted"  # no training run file: a new run is made


# ------------------------------------------------------------------------------------------------
# The pyfunc model
# ------------------------------------------------------------------------------------------------


def test_serving_config_follows_the_trained_config(tmp_path, data_dir):
    from fingrpo.tracking import serving_config

    cfg = make_cfg(tmp_path, prompt={"few_shot": 2, "context_mode": "gold"}, evaluate={"max_new_tokens": 7})
    serving = serving_config(cfg)  # no adapter folder yet: the config's own sections
    train = json.loads((data_dir / "train.json").read_text())
    assert serving["prompt"]["few_shot"] == 2 and serving["few_shot_records"] == train[:3]
    assert serving["model"] == {"name_or_path": "bundled:SmolLM2-135M-Instruct", "dtype": "float32"}
    assert serving["generation"]["max_new_tokens"] == 7

    # the trainer saved the config it really used beside the adapter: that one wins
    trained = cfg.model_dump(mode="json")
    trained["prompt"].update(few_shot=0, context_mode="retrieved")
    trained["model"]["name_or_path"] = "/models/base-used-in-training"
    Path(cfg.train.output_dir).mkdir()
    (Path(cfg.train.output_dir) / "fingrpo_config.json").write_text(json.dumps(trained))
    serving = serving_config(cfg)
    assert serving["prompt"]["context_mode"] == "retrieved" and serving["few_shot_records"] == []
    assert serving["model"]["name_or_path"] == "/models/base-used-in-training"


@pytest.fixture
def champion(tmp_path, adapter_dir, tiny_model_path):
    cfg, decision = _promote(tmp_path, adapter_dir, tiny_model_path, 50)
    assert decision["decision"] == "promoted"
    return cfg


def _dev_record(data_dir: Path) -> dict:
    return json.loads((data_dir / "dev.json").read_text())[0]


def test_pyfunc_champion_answers_a_finqa_record(champion, data_dir, adapter_dir, tiny_model_path):
    import mlflow
    import pandas as pd

    from fingrpo.config import ModelConfig
    from fingrpo.data.finqa import load_split
    from fingrpo.data.prompts import make_examples, render_prompt
    from fingrpo.model import (
        generate_completions,
        load_adapter,
        load_model_and_tokenizer,
    )

    cfg = champion
    with fluent_uri(cfg.tracking.tracking_uri):  # restores mlflow's global URIs and env afterwards
        model = mlflow.pyfunc.load_model("models:/fingrpo-finqa@champion")
    rec = _dev_record(data_dir)
    row = {"id": rec["id"], "question": rec["qa"]["question"], "pre_text": rec["pre_text"],
           "post_text": rec["post_text"], "table": rec["table"], "gold_inds": rec["qa"]["gold_inds"]}
    out = model.predict(pd.DataFrame([row]))
    as_record = model.predict(pd.DataFrame([{"record": json.dumps(rec)}]))  # the other input layout
    assert list(out.columns) == ["id", "completion", "program", "answer", "answer_value", "value", "context_mode"]
    assert out["id"][0] == as_record["id"][0] == rec["id"]
    assert out["completion"][0] == as_record["completion"][0]
    assert out["context_mode"][0] == "gold"

    # the served completion is exactly what evaluation produces with the same base + adapter + prompt
    base, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_path)))
    policy = load_adapter(base, adapter_dir).eval()
    train = load_split(cfg.data.train_path)
    dev = [r for r in load_split(cfg.data.dev_path) if r.id == rec["id"]]
    (ex,) = make_examples(dev, cfg.prompt, tok, few_shot_records=train)
    prompt = render_prompt(ex, tok, use_chat_template=cfg.prompt.use_chat_template)
    expected = generate_completions(policy, tok, [prompt], max_new_tokens=cfg.evaluate.max_new_tokens, batch_size=1)
    assert out["completion"][0] == expected[0]

    # generation params ride along with the request (the signature declares them)
    short = model.predict(pd.DataFrame([row]), params={"max_new_tokens": 1})
    assert len(short["completion"][0]) <= 1 and out["completion"][0].startswith(short["completion"][0])

    # a request without gold facts gets retrieved ones (and says so); bad input is a one-line DataError
    no_gold = {k: v for k, v in row.items() if k != "gold_inds"}
    assert model.predict(pd.DataFrame([no_gold]))["context_mode"][0] == "retrieved"
    with pytest.raises(Exception, match="input row 0: column 'question' is missing"):
        model.predict(pd.DataFrame([{"table": rec["table"]}]))


def test_pyfunc_value_is_the_executed_program(monkeypatch, champion, data_dir):
    """``value`` = the completion's program run on the row's table; None when it does not execute."""
    import mlflow
    import pandas as pd

    from fingrpo.tracking import serving

    cfg = champion
    with fluent_uri(cfg.tracking.tracking_uri):  # restores mlflow's global URIs and env afterwards
        model = mlflow.pyfunc.load_model("models:/fingrpo-finqa@champion")
    rec = _dev_record(data_dir)
    gold = rec["qa"]["program"]
    canned = iter([[f"Program: {gold}\nAnswer: {rec['qa']['exe_ans']}", "Program: divide(1, 0)\nAnswer: 7"]])
    monkeypatch.setattr(serving, "generate_completions", lambda *a, **k: next(canned))
    out = model.predict(pd.DataFrame([{"record": rec}, {"record": rec}]))
    assert out["program"][0] == gold
    assert round(out["value"][0], 5) == pytest.approx(rec["qa"]["exe_ans"])
    assert out["value"][1] is None and out["answer"][1] == "7"


# ------------------------------------------------------------------------------------------------
# The promotion gate as a pure function (no MLflow)
# ------------------------------------------------------------------------------------------------


def _fig(right, n=100, set_md5="s", data_md5="d", context="gold", first=0):
    from fingrpo.tracking.registry import GateFigure

    return GateFigure(right / n, n, set_md5, data_md5, context, {f"r{first + i}": float(i < right) for i in range(n)})


def _decide(challenger, champion, champion_version="3", margin=0.0, rule="mcnemar", alpha=0.05):
    from fingrpo.tracking.registry import decide_promotion

    return decide_promotion(challenger, champion, metric="dev.pooled.adapter.execution_accuracy", rule=rule,
                            alpha=alpha, min_improvement=margin, name="fingrpo-finqa", version="4",
                            champion_version=champion_version)


def test_decide_promotion_first_version_becomes_champion():
    d = _decide(_fig(0), None, champion_version=None)
    assert d.promote and "first version" in d.reason


def test_decide_promotion_is_paired_on_the_same_records():
    assert _decide(_fig(40), _fig(30)).promote  # 10 gained, 0 lost: p = 2^-10
    assert not _decide(_fig(30), _fig(30)).promote  # a tie keeps the champion
    assert not _decide(_fig(29), _fig(30)).promote
    assert "0 gained, 1 lost" in _decide(_fig(29), _fig(30)).reason and "champion v3" in _decide(_fig(29), _fig(30)).reason
    three = _decide(_fig(33), _fig(30))  # +3 records: one-sided exact p = 1/8
    assert not three.promote and three.comparison["p_value"] == pytest.approx(1 / 8) and "not significant" in three.reason
    assert _decide(_fig(33), _fig(30), alpha=0.2).promote and _decide(_fig(33), _fig(30), rule="gained_minus_lost").promote
    assert not _decide(_fig(40), _fig(30), margin=0.1).promote and _decide(_fig(41), _fig(30), margin=0.1).promote


def test_decide_promotion_counts_gains_and_losses_not_the_difference_of_means():
    """Same accuracy, different records: 10 gained and 10 lost is no improvement."""
    from fingrpo.tracking.registry import GateFigure

    champ = _fig(30)
    shifted = GateFigure(0.30, 100, "s", "d", "gold", {f"r{i}": float(10 <= i < 40) for i in range(100)})
    d = _decide(shifted, champ)
    assert not d.promote and (d.comparison["gained"], d.comparison["lost"]) == (10, 10)


def test_decide_promotion_never_compares_different_sets():
    """A 4-record challenger at 1/4 against a champion at 0.11 on 457 records: not compared."""
    small, big = _fig(1, n=4, set_md5="four"), _fig(50, n=457, set_md5="all")
    d = _decide(small, big)
    assert not d.promote and "not the same evaluation set" in d.reason and "4 records" in d.reason and "457 records" in d.reason
    assert not _decide(_fig(90, data_md5="v2"), _fig(10, data_md5="v1")).promote  # another data version
    assert not _decide(_fig(90, context="retrieved"), _fig(10, context="gold")).promote  # another context
    assert not _decide(_fig(90), _fig(10, first=100)).promote  # same label, other records: no outcomes to pair


def test_mcnemar_p_is_the_exact_one_sided_binomial_tail():
    from fingrpo.tracking.registry import mcnemar_p

    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(1, 0) == 0.5 and mcnemar_p(4, 0) == 1 / 16
    assert mcnemar_p(15, 13) == pytest.approx(sum(math.comb(28, k) for k in range(15, 29)) / 2 ** 28)
    assert mcnemar_p(3, 5) > 0.5


def test_decide_promotion_refuses_a_non_finite_challenger_and_a_champion_without_the_metric():
    from fingrpo.tracking.registry import GateFigure

    nan = GateFigure(float("nan"), 1, "s", "d", "gold", {"r0": 0.0})
    assert not _decide(nan, _fig(10)).promote and "not finite" in _decide(nan, _fig(10)).reason
    kept = _decide(_fig(90), None)  # the champion has no value of this metric (the metric was renamed)
    assert not kept.promote and "promote by hand" in kept.reason
    assert not _decide(_fig(90), _fig(10), champion_version="4").promote  # already the champion


# ------------------------------------------------------------------------------------------------
# Served requests are validated (the pyfunc answers a bad row with an error naming it, never a guess)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row, needle", [
    ({"question": 5, "table": [["a", "1"]]}, "input row 0: question: expected a non-empty string, got a number"),
    ({"question": "  ", "table": [["a", "1"]]}, "input row 0: question: expected a non-empty string, got an empty string"),
    ({"question": "what?"}, "input row 0: no report context"),
    ({"question": "what?", "pre_text": "growth"}, "input row 0: pre_text: expected a list of strings, got a string"),
    ({"question": "what?", "pre_text": ["a", 3]}, "input row 0: pre_text: item 1: expected a string, got a number"),
    ({"question": "what?", "table": [["a", 1]]}, "input row 0: table: row 0: expected a list of strings"),
    ({"question": "what?", "table": ["a", "b"]}, "input row 0: table: row 0: expected a list of strings"),
    ({"question": "what?", "pre_text": ["a"], "gold_inds": ["text_0"]}, "input row 0: gold_inds: expected a mapping"),
    ({"record": {"qa": {"question": 7}, "pre_text": ["a"]}}, "input row 0: record: question: expected a non-empty string"),
])
def test_a_bad_request_row_is_refused_naming_the_row_and_the_field(row, needle):
    from fingrpo.tracking.serving import _row_to_record

    with pytest.raises(DataError) as err:
        _row_to_record(row, 0)
    assert needle in str(err.value)


def test_a_good_request_row_becomes_a_record():
    from fingrpo.tracking.serving import _row_to_record

    rec = _row_to_record({"question": "what?", "pre_text": ["sales rose"], "table": [["", "2019"], ["sales", "5"]],
                          "gold_inds": {"text_0": "sales rose"}, "id": float("nan")}, 3)
    assert rec["id"] == "input-3" and rec["qa"] == {"question": "what?", "gold_inds": {"text_0": "sales rose"}}
    assert rec["table"] == [["", "2019"], ["sales", "5"]] and rec["post_text"] == []


def test_invalid_request_is_mlflows_invalid_parameter_value_naming_every_bad_row():
    from mlflow.exceptions import MlflowException

    from fingrpo.tracking.serving import _invalid_request

    err = _invalid_request(["input row 1: question: x", "input row 3: no report context"])
    assert isinstance(err, MlflowException) and err.error_code == "INVALID_PARAMETER_VALUE"
    assert err.get_http_status_code() == 400
    assert "2 bad request row(s)" in err.message and "input row 1" in err.message and "input row 3" in err.message


def test_serving_config_reads_an_adapter_saved_by_an_older_config(tmp_path, data_dir):
    """A trained config with fields this version no longer knows still registers (they are ignored)."""
    from fingrpo.tracking.serving import serving_config

    cfg = make_cfg(tmp_path, prompt={"few_shot": 1, "context_mode": "gold"})
    trained = cfg.model_dump(mode="json")
    trained["data"]["a_removed_knob"] = 1
    trained["prompt"]["another_removed_knob"] = 2
    Path(cfg.train.output_dir).mkdir()
    (Path(cfg.train.output_dir) / "fingrpo_config.json").write_text(json.dumps(trained))
    serving = serving_config(cfg)
    train = json.loads((data_dir / "train.json").read_text())
    assert serving["few_shot_records"] == train[:2]
