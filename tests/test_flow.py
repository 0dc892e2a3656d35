"""The Prefect flow `retrain`, in-process on the tiny model: every artifact, the registry state, the
champion gate, retries of tracking errors, and a failing stage never reaching promotion."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

# Prefect reads its settings when first imported: a private home and a throw-away API per session,
# and retries without waiting.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="fingrpo-prefect-home-")
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["FINGRPO_RETRY_DELAY_S"] = "0"

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fingrpo import pipeline  # noqa: E402
from fingrpo.errors import DataError, ModelError, TrackingError  # noqa: E402

MODEL_NAME = "fingrpo-flow-test"


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _small_split(src: Path, dst: Path, n: int) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(json.loads(src.read_text(encoding="utf-8"))[:n]), encoding="utf-8")
    return str(dst)


@pytest.fixture(scope="module")
def work(tmp_path_factory, data_dir, tiny_model_path):
    """A tiny run's overrides: small data copies, the tiny model, every output under one temp folder."""
    w = tmp_path_factory.mktemp("flow")
    data = w / "data"
    provenance = data / "provenance.json"
    provenance.parent.mkdir(parents=True, exist_ok=True)
    provenance.write_text((data_dir / "provenance.json").read_text(encoding="utf-8"), encoding="utf-8")
    reports, models = w / "reports", w / "models"
    overrides = {
        "data": {"train_path": _small_split(data_dir / "train.json", data / "train.json", 6),
                 "dev_path": _small_split(data_dir / "dev.json", data / "dev.json", 4),
                 "test_path": _small_split(data_dir / "test.json", data / "test.json", 4),
                 "provenance_path": str(provenance),
                 "train_sources": None, "eval_sets": None},  # FinQA alone (the DVC pipeline test covers TAT-QA)
        "model": {"name_or_path": str(tiny_model_path)},
        "prompt": {"few_shot": 0, "max_prompt_tokens": 256, "retriever_dir": str(models / "retriever")},  # retrieved
        "retriever": {"epochs": 0.5, "candidates": 6, "max_length": 64, "summary_path": str(reports / "retriever.json")},
        "train": {"max_steps": 2, "prompts_per_step": 1, "group_size": 2, "max_new_tokens": 8, "warmup_steps": 0,
                  "init_adapter": str(models / "sft"), "train_sources": None, "save_interval": 1, "eval_interval": 2, "eval_subset_size": 2, "num_samples_to_log": 1,
                  "output_dir": str(models / "adapter"), "checkpoint_dir": str(models / "checkpoints"),
                  "metrics_path": str(reports / "train_metrics.csv"),
                  "rollout_rewards_path": str(reports / "rollout_rewards.jsonl")},
        "sft": {"epochs": 1, "batch_size": 3, "output_dir": str(models / "sft"),
                "metrics_path": str(reports / "sft_metrics.csv"), "summary_path": str(reports / "sft.json")},
        "evaluate": {"max_records": 2, "max_new_tokens": 8, "batch_size": 2, "bootstrap_samples": 10,
                     "output_path": str(reports / "eval.json"), "predictions_path": str(reports / "predictions.jsonl")},
        "register": {"model_name": MODEL_NAME, "output_path": str(reports / "promotion.json")},
        "tracking": {"tracking_uri": f"sqlite:///{w / 'mlflow.db'}", "experiment_name": "fingrpo-flow-test",
                     "run_file": str(reports / "mlflow_run.json")},
        "pipeline": {"reports_dir": str(reports), "data_docs": False, "plots_dir": str(reports / "plots"),
                     "train_summary_path": str(reports / "train.json")},
    }
    return {"dir": w, "reports": reports, "models": models, "overrides": overrides,
            "uri": overrides["tracking"]["tracking_uri"]}


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _versions(uri: str) -> list[str]:
    return sorted(str(v.version) for v in _client(uri).search_model_versions(f"name='{MODEL_NAME}'"))


def _champion(uri: str) -> str:
    return str(_client(uri).get_model_version_by_alias(MODEL_NAME, "champion").version)


def _run(overrides: dict, **kw):
    from flows.retrain import retrain

    return retrain(params_path=str(ROOT / "params.yaml"), overrides=overrides, **kw)


def test_retrain_flow_writes_every_artifact_and_registers_a_champion(prefect_api, work):
    result = _run(work["overrides"])
    reports, models = work["reports"], work["models"]

    validation = json.loads((reports / "validation.json").read_text())
    assert validation  # the validation report was written (its content is the data layer's business)
    assert json.loads((reports / "sft.json").read_text())["steps"] == 2  # the warm start ran: 6 records / 3
    assert (models / "sft" / "adapter_model.safetensors").is_file()
    # the retriever task trained the cross-encoder the prompts rank facts with (3 of the 6 train records)
    retriever = json.loads((reports / "retriever.json").read_text())
    assert retriever["retriever"] == "cross_encoder" and retriever["training"]["steps"] == 3
    assert (models / "retriever" / "head.safetensors").is_file() and (models / "retriever" / "rankings.json").is_file()
    assert (models / "adapter" / "adapter_config.json").is_file()
    assert any((models / "adapter").glob("adapter_model.safetensors"))
    csv_lines = (reports / "train_metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step") or "step" in csv_lines[0].split(",")
    assert len(csv_lines) == 1 + 2  # header + one row per step
    train_json = json.loads((reports / "train.json").read_text())
    assert train_json["steps"] == 2
    evaluation = json.loads((reports / "eval.json").read_text())
    assert "execution_accuracy" in json.dumps(evaluation)
    assert (reports / "predictions.jsonl").read_text().strip()
    pngs = sorted(p.name for p in (reports / "plots").glob("*.png"))
    assert "training_curves.png" in pngs and len(pngs) == len(result["plots"])
    promotion = json.loads((reports / "promotion.json").read_text())
    assert promotion["decision"] == "promoted"
    assert result["promotion"]["decision"] == "promoted"

    # the registry: one version, and it is the champion
    assert _versions(work["uri"]) == ["1"]
    assert _champion(work["uri"]) == "1"

    # the run's summary artifact in Prefect
    from prefect.artifacts import Artifact

    artifact = Artifact.get("fingrpo-retrain-summary")
    assert artifact is not None
    assert "execution_accuracy" in artifact.data and "promoted" in artifact.data
    assert "| gate: challenger |" in artifact.data and "records (set " in artifact.data
    lineage = json.loads((reports / "lineage.json").read_text())
    assert result["status"] == "trained" and lineage["new"] and lineage["trained_as"] == []
    version = _client(work["uri"]).get_model_version(MODEL_NAME, "1")
    assert version.tags["fingrpo.fingerprint"] == lineage["fingerprint"] == promotion["fingerprint"]


def test_the_same_data_params_and_code_again_is_nothing_new(prefect_api, work, monkeypatch):
    """Rerun exactly the first run: it ends Completed as "nothing new" before anything trains; force retrains."""
    from prefect.artifacts import Artifact

    before = _versions(work["uri"])
    trained = []
    monkeypatch.setattr(pipeline, "sft_stage", lambda cfg: trained.append("sft") or {})
    result = _run(work["overrides"], pull=False)  # validated, then looked up: nothing trained
    assert result["status"] == "nothing new" and trained == [] and _versions(work["uri"]) == before
    assert "already trained into fingrpo-flow-test champion v1" in result["lineage"]["reason"]
    assert "nothing new" in Artifact.get("fingrpo-retrain-summary").data
    changed = json.loads(json.dumps(work["overrides"]))
    changed["train"]["learning_rate"] = 1e-4  # a knob that shapes the model: new
    monkeypatch.setattr(pipeline, "train_stage", lambda cfg, resume=False: (_ for _ in ()).throw(ModelError("stop here")))
    with pytest.raises(ModelError, match="stop here"):
        _run(changed, pull=False)
    assert trained == ["sft"]
    changed = json.loads(json.dumps(work["overrides"]))
    changed["register"]["alpha"] = 0.2  # where results go / how the gate decides: not new
    assert _run(changed, pull=False)["status"] == "nothing new"


def test_a_challenger_that_does_not_beat_the_champion_leaves_it_and_tracking_errors_are_retried(
    prefect_api, work, monkeypatch
):
    before = _champion(work["uri"])
    calls = []
    real_plot_stage = pipeline.plot_stage

    def flaky_plot_stage(cfg):  # the tracking server blinks once during the plot stage
        calls.append(1)
        if len(calls) == 1:
            raise TrackingError("mlflow: connection reset (simulated)")
        return real_plot_stage(cfg)

    monkeypatch.setattr(pipeline, "plot_stage", flaky_plot_stage)
    overrides = json.loads(json.dumps(work["overrides"]))
    overrides["register"]["min_improvement"] = 1.0  # nothing can beat an accuracy by more than 1.0
    overrides["train"]["seed"] = 1
    result = _run(overrides, pull=False)

    assert len(calls) == 2  # failed once, retried once, then succeeded
    assert result["promotion"]["decision"] == "kept"
    assert _versions(work["uri"]) == ["1", "2"]  # the challenger is registered ...
    assert _champion(work["uri"]) == before  # ... but the champion did not move
    assert str(_client(work["uri"]).get_model_version_by_alias(MODEL_NAME, "challenger").version) == "2"


def test_a_failing_stage_never_reaches_promotion(prefect_api, work, monkeypatch):
    before_versions, before = _versions(work["uri"]), _champion(work["uri"])
    promoted = []

    def broken_evaluate(cfg, adapter_dir=None):
        raise ModelError("adapter folder unreadable (simulated)")

    monkeypatch.setattr(pipeline, "evaluate_stage", broken_evaluate)
    monkeypatch.setattr(pipeline, "register_stage", lambda cfg: promoted.append(cfg) or {})
    with pytest.raises(ModelError, match="simulated"):
        _run(work["overrides"], force=True, pull=False)  # the same fingerprint as run 1: forced
    assert promoted == []  # a ModelError is not transient: no retry, and promote never ran
    assert _versions(work["uri"]) == before_versions and _champion(work["uri"]) == before


def test_invalid_data_stops_the_flow_at_validation(prefect_api, work, monkeypatch):
    trained = []
    monkeypatch.setattr(pipeline, "train_stage", lambda cfg, resume=False: trained.append(1) or {})
    bad = work["dir"] / "bad.json"
    bad.write_text('[{"id": "x"}]', encoding="utf-8")
    overrides = json.loads(json.dumps(work["overrides"]))
    overrides["data"]["dev_path"] = str(bad)
    with pytest.raises(DataError):
        _run(overrides, pull=False)
    assert trained == []


def test_overrides_accept_dotted_keys_and_retry_only_transient_errors():
    from prefect.states import Failed

    from flows.retrain import _is_transient, normalize_overrides

    assert normalize_overrides({"train.max_steps": 2, "train": {"seed": 3}}) == {"train": {"max_steps": 2, "seed": 3}}
    assert normalize_overrides(None) == {}
    assert _is_transient(None, None, Failed(data=TrackingError("down")))
    assert _is_transient(None, None, Failed(data=ConnectionError("refused")))
    assert not _is_transient(None, None, Failed(data=DataError("bad record")))
    assert not _is_transient(None, None, Failed(data=ValueError("bug")))
    from mlflow.exceptions import MlflowException

    assert _is_transient(None, None, Failed(data=MlflowException("database is locked")))
    assert not _is_transient(None, None, Failed(data=MlflowException("registered model not found",
                                                                      error_code="RESOURCE_DOES_NOT_EXIST")))


def test_flow_overrides_use_the_config_dotted_key_rules():
    from fingrpo.config import dotted_items, get_dotted, set_dotted

    tree: dict = {}
    set_dotted(tree, "train.max_steps", 2)
    set_dotted(tree, "train", {"seed": 3})
    assert tree == {"train": {"max_steps": 2, "seed": 3}}
    assert dict(dotted_items({"a": {"b": 1, "c": {"d": None}}})) == {"a.b": 1, "a.c.d": None}
    assert get_dotted({"dev": {"pooled": {"adapter": {"n": 5}}}}, "dev.pooled.adapter.n") == 5
    with pytest.raises(KeyError):
        get_dotted({"dev": {}}, "dev.pooled")
