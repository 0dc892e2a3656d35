"""The examples/ scripts run end to end on the tiny model (subprocesses, tiny settings)."""

from __future__ import annotations

import doctest
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TINY = ["--max-new-tokens", "8", "--max-prompt-tokens", "256", "--few-shot", "0"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("examples-data")
    for split, n in (("train", 6), ("dev", 3), ("test", 3)):
        records = json.loads((data_dir / f"{split}.json").read_text(encoding="utf-8"))[:n]
        (out / f"{split}.json").write_text(json.dumps(records), encoding="utf-8")
    (out / "provenance.json").write_text((data_dir / "provenance.json").read_text(encoding="utf-8"), encoding="utf-8")
    return out


def run_example(script: str, args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_custom_reward_doctests():
    spec = importlib.util.spec_from_file_location("custom_reward", EXAMPLES / "custom_reward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert doctest.testmod(module).failed == 0
    # a garbage completion never raises
    assert module.ConciseAnswerReward()("q", None) == 0.0


def test_custom_reward_is_used_in_training(tmp_path, tiny_model_path, small_data):
    proc = run_example("custom_reward.py", ["--model", str(tiny_model_path), "--data-dir", str(small_data),
                                            "--out", str(tmp_path / "out"), "--steps", "2", "--group-size", "2", *TINY],
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rewards = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    # the trainer scored every completion with the custom reward and logged its mean
    assert "reward/concise_answer_mean" in rewards
    assert 0.0 <= rewards["reward/concise_answer_mean"] <= 1.0
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "mlflow.db").exists()  # tracking off in the example


def test_json_trainer_with_custom_parameters(tmp_path, tiny_model_path, small_data):
    # 6 train records, batch 2, half an epoch -> ceil(0.5 * 6 / 2) = 2 steps
    proc = run_example("json_trainer.py", ["--model", str(tiny_model_path), "--data-dir", str(small_data),
                                           "--out", str(tmp_path / "out"), "--num-epochs", "0.5", "--batch-size", "2",
                                           "--learning-rate", "5e-4", "--eval-interval", "2", "--save-interval", "1",
                                           "--group-size", "2", *TINY], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"): proc.stdout.rindex("}") + 1])
    assert summary["steps"] == 2
    assert Path(summary["adapter"]).is_dir() and "checkpoint" in summary["checkpoint"]
    saved = json.loads((tmp_path / "out" / "adapter" / "fingrpo_config.json").read_text())
    assert saved["train"]["learning_rate"] == pytest.approx(5e-4)  # the custom parameters reached the trainer
    assert saved["train"]["prompts_per_step"] == 2 and saved["train"]["max_steps"] == 2


def test_ask_champion_loads_the_promoted_model_from_the_registry(tmp_path, tiny_model_path, small_data):
    common = ["--model", str(tiny_model_path), "--data-dir", str(small_data), "--out", str(tmp_path / "out"),
              "--model-name", "fingrpo-example", *TINY]
    empty = run_example("ask_champion.py", common, cwd=tmp_path)
    assert empty.returncode == 2
    assert "no 'champion' version" in empty.stderr and "Traceback" not in empty.stderr

    first = run_example("ask_champion.py", [*common, "--train-if-missing", "--steps", "2"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "registered version 1: promoted" in first.stdout
    assert "models:/fingrpo-example@champion (version 1)" in first.stdout
    assert "completion:" in first.stdout and "gold exe_ans:" in first.stdout

    asked = run_example("ask_champion.py", [*common, "--question", "what is 150 minus 120?",
                                            "--table", '[["", "2019", "2018"], ["revenue", "150", "120"]]'], cwd=tmp_path)
    assert asked.returncode == 0, asked.stderr[-3000:]
    assert "registered version" not in asked.stdout  # the existing champion answered, nothing was trained
    assert "question: what is 150 minus 120?" in asked.stdout
