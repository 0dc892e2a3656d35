"""Shared argument handling of the examples: which base model, which data, where outputs go.

Every example takes ``--model`` (default: the bundled SmolLM2-135M-Instruct, offline) and ``--out``
(default ``examples_out/``), so it can run on a tiny test model in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

BUNDLED = "bundled:SmolLM2-135M-Instruct"
DATA = Path(__file__).resolve().parents[1] / "data" / "finqa"

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                     "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=BUNDLED, help=f"base model: {BUNDLED!r}, a local HF folder or a hub id")
    p.add_argument("--data-dir", default=str(DATA), help="folder with train.json / dev.json / test.json")
    p.add_argument("--out", default="examples_out", help="where adapters, checkpoints and reports go")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion length cap")
    p.add_argument("--max-prompt-tokens", type=int, default=1536, help="prompt token budget")
    p.add_argument("--few-shot", type=int, default=2, help="worked examples shown before each question")
    return p


def output_overrides(out: str | Path) -> dict:
    """Every file a training/evaluation writes, under ``out`` (nested override dict for load_config)."""
    out = Path(out)
    return {
        "train": {"output_dir": str(out / "adapter"), "checkpoint_dir": str(out / "checkpoints"),
                  "metrics_path": str(out / "train_metrics.csv"),
                  "rollout_rewards_path": str(out / "rollout_rewards.jsonl")},
        "evaluate": {"output_path": str(out / "eval.json"), "predictions_path": str(out / "predictions.jsonl")},
        "register": {"output_path": str(out / "promotion.json")},
        "tracking": {"run_file": str(out / "mlflow_run.json")},
        "pipeline": {"reports_dir": str(out), "train_summary_path": str(out / "train.json"),
                     "plots_dir": str(out / "plots")},
    }


def data_overrides(data_dir: str | Path) -> dict:
    """The ``data`` section for a folder holding the FinQA splits and ``provenance.json``."""
    data = Path(data_dir)
    return {"train_path": str(data / "train.json"), "dev_path": str(data / "dev.json"),
            "test_path": str(data / "test.json"), "provenance_path": str(data / "provenance.json")}
