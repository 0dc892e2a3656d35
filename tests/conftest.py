"""Shared fixtures. Fast tests use the tiny random llama (fingrpo.testing); tests marked `slow` use
the bundled SmolLM2 and real services. Everything runs offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # subprocess flows on a busy machine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "finqa"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The DVC-tracked FinQA splits (``dvc pull`` materialises them; the test command runs it)."""
    if not (DATA / "train.json").exists():
        pytest.fail(f"{DATA} is missing: run `dvc pull` (the README's test command does)")
    return DATA


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A tiny random llama + char tokenizer saved as a normal HF folder."""
    from fingrpo.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _torch_threads():
    """Tests run on 2 shared cores; one intra-op thread keeps them predictable."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture()
def tiny_finqa(tmp_path, data_dir):
    """6 train and 3 dev FinQA records with short gold contexts (the char tokenizer: 1 token per char)."""
    train = json.loads((data_dir / "train.json").read_text())
    dev = json.loads((data_dir / "dev.json").read_text())

    def short(records, k):
        picked = sorted(records, key=lambda r: len(" ".join(r["qa"]["gold_inds"].values())) + len(r["qa"]["question"]))
        return picked[:k]

    paths = {}
    for name, recs in (("train", short(train, 6)), ("dev", short(dev, 3)), ("test", short(dev, 2))):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(recs))
    return paths
