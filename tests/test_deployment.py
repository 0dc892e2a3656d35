"""The scheduled deployment against a real `prefect server start` on loopback (slow): serve the
`retrain` flow with a cron schedule (flows/deploy.py), check the schedule, trigger a run with the
README's command and wait until it completes. Every process is stopped by process group."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CRON = "0 3 * * 1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM the process group (servers spawn children), then SIGKILL what is left."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def _tiny_params(work: Path, data_dir: Path, model: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    data, reports, models = work / "data", work / "reports", work / "models"
    data.mkdir(parents=True)
    for split, n in (("train", 6), ("dev", 3), ("test", 3)):
        records = json.loads((data_dir / f"{split}.json").read_text(encoding="utf-8"))[:n]
        (data / f"{split}.json").write_text(json.dumps(records), encoding="utf-8")
        params["data"][f"{split}_path"] = str(data / f"{split}.json")
    (data / "provenance.json").write_text((data_dir / "provenance.json").read_text(encoding="utf-8"), encoding="utf-8")
    params["data"]["provenance_path"] = str(data / "provenance.json")
    params["data"].update(train_sources=None, eval_sets=None)  # FinQA alone
    params["train"]["train_sources"] = None
    params["model"]["name_or_path"] = str(model)
    params["prompt"].update(few_shot=0, max_prompt_tokens=256, retriever="lexical")
    params["train"].update(max_steps=2, prompts_per_step=1, group_size=2, max_new_tokens=8, warmup_steps=0,
                           save_interval=1, eval_interval=2, eval_subset_size=2,
                           output_dir=str(models / "adapter"), checkpoint_dir=str(models / "checkpoints"),
                           metrics_path=str(reports / "train_metrics.csv"),
                           rollout_rewards_path=str(reports / "rollout_rewards.jsonl"))
    params["sft"].update(epochs=1, batch_size=3, output_dir=str(models / "sft"),
                         metrics_path=str(reports / "sft_metrics.csv"), summary_path=str(reports / "sft.json"))
    params["train"]["init_adapter"] = str(models / "sft")
    params["evaluate"].update(max_records=2, max_new_tokens=8, batch_size=2, bootstrap_samples=10,
                              output_path=str(reports / "eval.json"), predictions_path=str(reports / "predictions.jsonl"))
    params["register"].update(model_name="fingrpo-deploy-test", output_path=str(reports / "promotion.json"))
    params["tracking"].update(tracking_uri=f"sqlite:///{work / 'mlflow.db'}", run_file=str(reports / "mlflow_run.json"))
    params["pipeline"].update(reports_dir=str(reports), data_docs=False, plots_dir=str(reports / "plots"),
                              train_summary_path=str(reports / "train.json"))
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.slow
def test_scheduled_deployment_runs_on_a_local_prefect_server(tmp_path, data_dir, tiny_model_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "FINGRPO_RETRAIN_CRON": CRON}
    params = _tiny_params(tmp_path / "work", data_dir, tiny_model_path)
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = serve = None
    try:
        # the README's commands: a server on loopback in its own session, then the cron deployment
        with server_log.open("w") as log:
            server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_healthy(api, server, server_log)
        with serve_log.open("w") as log:
            serve = subprocess.Popen([sys.executable, "flows/deploy.py", "--params", str(params)], cwd=ROOT, env=env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        # the deployment appears with its cron schedule (from $FINGRPO_RETRAIN_CRON)
        deadline, inspect = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            assert serve.poll() is None, f"deploy.py exited:\n{serve_log.read_text()[-3000:]}"
            inspect = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", "retrain/scheduled-retrain"],
                                     env=env, capture_output=True, text=True, timeout=60)
            if inspect.returncode == 0:
                break
            time.sleep(1)
        assert inspect is not None and inspect.returncode == 0, inspect.stderr if inspect else "no inspect"
        assert CRON in inspect.stdout
        assert str(params) in inspect.stdout  # the baked-in params file

        # trigger a run now and wait for it
        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "retrain/scheduled-retrain",
                              "--watch", "--watch-timeout", "500"],
                             env=env, capture_output=True, text=True, timeout=560)
        out = run.stdout + run.stderr
        assert run.returncode == 0, f"{out[-3000:]}\n--- serve log ---\n{serve_log.read_text()[-3000:]}"
        assert "Completed" in out, out[-3000:]
        promotion = json.loads((tmp_path / "work" / "reports" / "promotion.json").read_text())
        assert promotion["decision"] == "promoted" and promotion["model_name"] == "fingrpo-deploy-test"
    finally:
        _stop(serve)
        _stop(server)
