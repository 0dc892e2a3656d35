"""Data-parallel GRPO: two CPU processes (torchrun, gloo) split each step's prompts and end with
identical adapter weights (gradients all-reduced). Slow: it starts two Python processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).with_name("dist_train_helper.py")


@pytest.mark.slow
def test_torchrun_two_processes_identical_weights(tmp_path, tiny_model_path):
    import torch

    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HELPER), str(tiny_model_path), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["num_processes"] for i in info] == [2, 2] and [i["steps"] for i in info] == [3, 3]
    # the same start (seeded LoRA init), a real update, and identical weights at the end
    final0, final1 = ranks[0]["final"], ranks[1]["final"]
    assert final0.keys() == final1.keys()
    assert all(torch.equal(ranks[0]["initial"][k], ranks[1]["initial"][k]) for k in final0)
    assert all(torch.equal(final0[k], final1[k]) for k in final0), "ranks diverged"
    assert max(float((final0[k] - ranks[0]["initial"][k]).abs().max()) for k in final0) > 1e-3
    # the data was split: disjoint prompts, together the 3 steps x 4 prompts of the seeded order
    p0, p1 = set(info[0]["prompts"]), set(info[1]["prompts"])
    assert p0 and p1 and not (p0 & p1)
    assert len(p0 | p1) == 12
    # metrics are global (gathered) and identical; only the main process wrote files
    assert info[0]["reward_mean"] == info[1]["reward_mean"]
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step-2", "step-3"]
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + 3
    rows = [json.loads(x) for x in (out / "rollout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(len(r["total"]) == 4 * 4 for r in rows)


@pytest.mark.slow
def test_train_launcher_runs_the_train_stage_in_two_processes(tmp_path, tiny_model_path, data_dir):
    """``train.launcher``: the stage re-runs itself as ``<launcher> -m fingrpo train`` on the resolved
    config (what the flow's train task and ``fingrpo train`` do on a multi-GPU worker)."""
    from fingrpo import pipeline
    from fingrpo.config import load_config

    train = tmp_path / "train.json"
    train.write_text(json.dumps(json.loads((data_dir / "train.json").read_text())[:8]))
    cfg = load_config(None, {
        "data": {"train_path": str(train), "train_sources": None, "eval_sets": None,
                 "provenance_path": str(data_dir / "provenance.json")},
        "model": {"name_or_path": str(tiny_model_path)},
        "prompt": {"few_shot": 0, "max_prompt_tokens": 256},
        "train": {"max_steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 6, "warmup_steps": 0,
                  "save_interval": 10, "eval_interval": 10, "output_dir": str(tmp_path / "adapter"),
                  "checkpoint_dir": str(tmp_path / "ckpt"), "metrics_path": str(tmp_path / "metrics.csv"),
                  "rollout_rewards_path": str(tmp_path / "rollouts.jsonl"),
                  "launcher": f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2"},
        "tracking": {"enabled": False},
        "pipeline": {"train_summary_path": str(tmp_path / "train.json.summary"), "reports_dir": str(tmp_path)},
    })
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    summary = pipeline.train_stage(cfg)
    assert summary["num_processes"] == 2 and summary["steps"] == 2
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert len((tmp_path / "metrics.csv").read_text().strip().splitlines()) == 1 + 2  # the main process wrote
