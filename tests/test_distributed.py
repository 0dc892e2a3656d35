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
