"""Real MLflow processes (slow; CI runs them with `pytest -m slow`):

- ``mlflow models serve -m models:/fingrpo-finqa@champion --env-manager local`` answers a FinQA record
  POSTed to ``/invocations``, and refuses bad rows (HTTP 400, the row and the field named);
- the whole tracking flow (callback -> evaluation -> promotion) against a real ``mlflow server``.

Servers start in their own session (``start_new_session``, i.e. setsid) and the whole process group is
stopped in a ``finally``: they spawn workers that would otherwise outlive the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_tracking import (  # noqa: F401 - fixtures
    _free_port,
    _promote,
    _template_db,
    adapter_dir,
    make_cfg,
    write_evaluation,
)

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _start(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process in _stop
    # the venv's bin first: `mlflow models serve` execs `uvicorn` by name (exit 127 without it on PATH)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **env}
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # setsid: its own process group
    proc._log = log  # type: ignore[attr-defined]
    return proc


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc._log.close()  # type: ignore[attr-defined]


def _wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not up after {timeout}s:\n{log_path.read_text(errors='replace')[-3000:]}")


def _post(port: int, rows: list[dict]) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps({"dataframe_records": rows}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_serve_answers_a_finqa_record(tmp_path, adapter_dir, tiny_model_path, data_dir):  # noqa: F811
    cfg, decision = _promote(tmp_path, adapter_dir, tiny_model_path, 40)
    assert decision["decision"] == "promoted"
    rec = json.loads((data_dir / "dev.json").read_text())[3]
    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = {"MLFLOW_TRACKING_URI": cfg.tracking.tracking_uri, "MLFLOW_REGISTRY_URI": cfg.tracking.tracking_uri,
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = _start([str(BIN / "mlflow"), "models", "serve", "-m", "models:/fingrpo-finqa@champion",
                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env, log_path)
    try:
        _wait_http(f"http://127.0.0.1:{port}/ping", proc, log_path)
        row = {"id": rec["id"], "question": rec["qa"]["question"], "pre_text": rec["pre_text"],
               "post_text": rec["post_text"], "table": rec["table"], "gold_inds": rec["qa"]["gold_inds"]}
        body = json.dumps({"dataframe_records": [row]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
        # bad input: HTTP 400, MLflow's INVALID_PARAMETER_VALUE, the row and the field named; never an answer
        number_question = _post(port, [{"question": 5}])
        batch = _post(port, [row, {"id": "q2", "question": "what was the change?"}])
        # rows that leave different optional columns out are one valid batch (MLflow's enforcement refused it)
        mixed = _post(port, [row, {"id": "q3", "question": rec["qa"]["question"], "table": rec["table"]}])
    finally:
        _stop(proc)
    for status, body in (number_question, batch):
        assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE" and "predictions" not in body
    assert "input row 0: question: expected a non-empty string, got a number" in number_question[1]["message"]
    assert "input row 1: no report context" in batch[1]["message"] and "input row 0" not in batch[1]["message"]
    assert mixed[0] == 200 and [p["id"] for p in mixed[1]["predictions"]] == [rec["id"], "q3"]
    assert mixed[1]["predictions"][1]["context_mode"] == "retrieved"
    (pred,) = answer["predictions"]
    assert set(pred) == {"id", "completion", "program", "answer", "answer_value", "value", "context_mode"}
    assert pred["id"] == rec["id"] and isinstance(pred["completion"], str) and pred["context_mode"] == "gold"
    assert pred["value"] is None or isinstance(pred["value"], (int, float, str))


def test_tracking_flow_against_a_real_mlflow_server(tmp_path, adapter_dir, tiny_model_path):  # noqa: F811
    import shutil

    from mlflow import MlflowClient

    from fingrpo.tracking import MLflowCallback, log_evaluation, register_from_config

    port = _free_port()
    log_path = tmp_path / "server.log"
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = _start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                   "--artifacts-destination", str(tmp_path / "server-artifacts"),
                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], env, log_path)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, log_path, timeout=120)
        uri = f"http://127.0.0.1:{port}"
        cfg = make_cfg(tmp_path, model_path=tiny_model_path, tracking={"tracking_uri": uri})
        shutil.copytree(adapter_dir, cfg.train.output_dir)
        cb = MLflowCallback(cfg)
        cb.on_train_begin(SimpleNamespace(config=cfg))
        cb.on_step_end(1, {"loss": 0.7, "reward/mean": 0.2})
        cb.on_train_end({"steps": 1})
        write_evaluation(cfg.evaluate.output_path, cfg.evaluate.predictions_path, 35)  # 35 right of 100
        result = json.loads(Path(cfg.evaluate.output_path).read_text())
        assert log_evaluation(cfg, result) == cb.run_id
        decision = register_from_config(cfg)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        run = client.get_run(cb.run_id)
        champion = client.get_model_version_by_alias("fingrpo-finqa", "champion")
    finally:
        _stop(proc)
    assert decision["decision"] == "promoted" and decision["tracking_uri"] == uri
    assert run.data.metrics["dev.x.adapter.execution_accuracy"] == 0.35 and run.data.metrics["reward/mean"] == 0.2
    assert str(champion.version) == "1" and champion.run_id == cb.run_id
    assert (tmp_path / "server-artifacts").is_dir()  # artifacts went through the server, not to local disk


def test_served_champion_retrieves_and_answers_as_evaluation_did(tmp_path, adapter_dir, tiny_model_path, data_dir):  # noqa: F811
    """A model version trained with the cross-encoder retriever carries it: ``mlflow models serve`` answers a
    record with no gold facts from the facts that retriever picks, with the completion ``fingrpo evaluate``
    gave for that record."""
    import shutil

    from fingrpo.config import RetrieverConfig
    from fingrpo.data.finqa import load_split
    from fingrpo.evaluate import evaluate_from_config
    from fingrpo.retrieval import train_cross_encoder
    from fingrpo.tracking import MLflowCallback, register_from_config

    retriever_dir = tmp_path / "retriever"
    ce, _ = train_cross_encoder(load_split(data_dir / "train.json")[:6], RetrieverConfig(epochs=1.0, warmup_steps=1),
                                progress=False)
    ce.save(retriever_dir)
    cfg = make_cfg(tmp_path, model_path=tiny_model_path,
                   prompt={"context_mode": "retrieved", "retrieved_top_k": 3, "retriever": "cross_encoder",
                           "retriever_dir": str(retriever_dir), "few_shot": 0},
                   data={"eval_sets": [{"name": "x", "split": "dev", "max_records": 3}]},
                   evaluate={"compare_base": False})
    shutil.copytree(adapter_dir, cfg.train.output_dir)
    cb = MLflowCallback(cfg, log_adapter=False)
    cb.on_train_begin(SimpleNamespace(config=cfg))
    cb.on_train_end({})
    evaluate_from_config(cfg)
    evaluated = {r["id"]: r for r in map(json.loads, Path(cfg.evaluate.predictions_path).read_text().splitlines())
                 if r["model"] == "adapter"}
    assert {r["model"] for r in map(json.loads, Path(cfg.evaluate.predictions_path).read_text().splitlines())} == {
        "adapter", "adapter_gold_facts"}  # the oracle figure beside the served one
    assert register_from_config(cfg)["decision"] == "promoted"
    shutil.rmtree(retriever_dir)  # the served model must use the copy the version holds

    rec = json.loads((data_dir / "dev.json").read_text())[1]
    assert rec["id"] in evaluated
    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = {"MLFLOW_TRACKING_URI": cfg.tracking.tracking_uri, "MLFLOW_REGISTRY_URI": cfg.tracking.tracking_uri,
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = _start([str(BIN / "mlflow"), "models", "serve", "-m", "models:/fingrpo-finqa@champion",
                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env, log_path)
    try:
        _wait_http(f"http://127.0.0.1:{port}/ping", proc, log_path)
        no_gold = {"id": rec["id"], "question": rec["qa"]["question"], "pre_text": rec["pre_text"],
                   "post_text": rec["post_text"], "table": rec["table"]}
        status, body = _post(port, [no_gold])
    finally:
        _stop(proc)
    assert status == 200, body
    (pred,) = body["predictions"]
    assert pred["context_mode"] == "retrieved"
    assert pred["completion"] == evaluated[rec["id"]]["completion"]
    assert pred["program"] == evaluated[rec["id"]]["program"]
