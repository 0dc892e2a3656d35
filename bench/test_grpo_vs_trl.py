"""Tests of the benchmark script: the floor arithmetic, the summary/table, and both workers on the tiny model.

    .venv/bin/python -m pytest bench/test_grpo_vs_trl.py -q -m "not slow"   # fast (tiny random llama)
    .venv/bin/python -m pytest bench/test_grpo_vs_trl.py -q -m slow         # TRL's worker on the tiny model

`make test` runs both (pytest's testpaths include bench/); TRL comes with the install (the ``bench`` extra).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
_spec = importlib.util.spec_from_file_location("grpo_vs_trl", HERE / "grpo_vs_trl.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["grpo_vs_trl"] = bench
_spec.loader.exec_module(bench)

SMOL = bench.ModelShape(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64,
                        vocab=49152, tied=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from fingrpo.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------ floor


def test_smollm2_parameter_count_matches_the_published_135m():
    assert SMOL.params == 134_515_008  # 134.5 M (ENVIRONMENT.md)
    assert SMOL.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4


def test_forward_flops_counts_the_prompt_once_per_group():
    one = bench.forward_flops(SMOL, [400], [64] * 8, group_size=8)
    # a prompt shared by 8 rows costs the same as a prompt with 1 row: only completions scale with G
    solo = bench.forward_flops(SMOL, [400], [64], group_size=1)
    assert one["prompt"] == solo["prompt"]
    assert one["completions"] == pytest.approx(8 * solo["completions"])
    # body matmuls dominate: 2 * body params per prompt token, within the attention share
    assert 2 * SMOL.body_params * 400 < one["prompt"] < 1.2 * 2 * SMOL.body_params * 400


def test_step_floor_phases_follow_beta_and_mu():
    args = dict(prompt_lengths=[400] * 4, completion_lengths=[64] * 32, group_size=8,
                matmul_gflops=218.0, memory_gbps=45.0)
    base = bench.step_floor(SMOL, beta=0.04, num_iterations=1, **args)
    no_ref = bench.step_floor(SMOL, beta=0.0, num_iterations=1, **args)
    two = bench.step_floor(SMOL, beta=0.04, num_iterations=2, **args)
    assert no_ref["reference"] == 0 and base["reference"] > 0
    assert base["old"] == 0 and two["old"] == pytest.approx(base["reference"])
    assert two["policy"] == pytest.approx(2 * base["policy"])
    # policy = forward + activation backward = 2 forwards; the reference is 1 forward
    assert base["policy"] == pytest.approx(2 * base["reference"])
    assert base["total"] == pytest.approx(base["prefill"] + base["decode"] + base["policy"] + base["reference"])
    # the estimate: a gold step (~300-400 prompt tokens) needs roughly 14-18 s at 218 GFLOP/s
    assert 12 < base["total"] < 22


def test_decode_floor_is_memory_bound_on_a_slow_memory():
    args = dict(prompt_lengths=[400], completion_lengths=[64] * 8, group_size=8, beta=0.0, num_iterations=1)
    fast = bench.step_floor(SMOL, matmul_gflops=218.0, memory_gbps=1000.0, **args)
    slow = bench.step_floor(SMOL, matmul_gflops=218.0, memory_gbps=1.0, **args)
    assert fast["decode"] == fast["decode_compute"]
    # 64 decode steps each read at least all weights once
    assert slow["decode"] == slow["decode_memory"] >= 64 * SMOL.params * 4 / 1e9


# ------------------------------------------------------------------------------------------------ summary


def _worker_result(system: str, seconds: list[float], rss: float) -> dict:
    return {
        "system": system, "mode": "gold", "prompt_lengths": [400, 420], "peak_rss_gib": rss,
        "steps": [{"seconds": s, "warmup": i == 0, "generated_tokens": 128, "completion_lengths": [32] * 4 + [16] * 4,
                   "rollout_tokens_per_s": 10.0, "phases": {"generate": s / 2}} for i, s in enumerate(seconds)],
    }


def test_summary_uses_measured_steps_only_and_ratios_and_checks():
    spec = bench.BenchSpec.quick()
    ceil = {"matmul_gflops": 100.0, "memory_gbps": 10.0}
    f = bench.summarize(_worker_result("fingrpo", [99.0, 10.0, 12.0], 2.0), SMOL, spec, ceil)
    t = bench.summarize(_worker_result("trl", [500.0, 40.0, 44.0], 6.0), SMOL, spec, ceil)
    assert f["median_s"] == 11.0 and f["min_s"] == 10.0  # the 99 s warm-up is not measured
    assert t["median_s"] == 42.0
    summary = {"gold": {"fingrpo": f, "trl": t}}
    r = bench.ratios(summary)["gold"]
    assert r["speedup"] == pytest.approx(42.0 / 11.0) and r["rss"] == pytest.approx(1 / 3)
    checks = bench.acceptance(summary)
    assert any("speed-up 3.8x" in c and "PASS" in c for c in checks)
    table = bench.format_table(summary, {"gold": f["floor_s"]})
    assert "| gold | fingrpo | 11.0 (10.0–12.0)" in table and "3.8×" in table


def test_a_failed_worker_is_reported_not_raised():
    summary = {"full": {"fingrpo": {"failed": "killed by signal 9 (out of memory?)"},
                        "trl": {"failed": "timed out after 10 s"}}}
    table = bench.format_table(summary, {"full": 30.0})
    assert "failed: killed by signal 9" in table and bench.ratios(summary)["full"] == {}


def test_quick_flag_and_overrides_build_the_spec():
    _, spec = bench.parse_args(["--quick", "--steps", "3", "--threads", "1"])
    assert (spec.prompts, spec.group_size, spec.max_new_tokens, spec.steps, spec.threads) == (2, 4, 32, 3, 1)
    _, again = bench.parse_args(spec.to_argv())
    assert again == spec
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    # fingrpo's memory knob: 2 completions per backward by default, 0 = the whole group (None in the config)
    _, whole = bench.parse_args(["--backward-chunk-size", "0"])
    assert bench.parse_args([])[1].backward_chunk_size == 2 and bench.parse_args(whole.to_argv())[1] == whole
    assert bench.bench_config(whole, "gold", ROOT / "unused").train.backward_chunk_size is None
    assert bench.bench_config(spec, "gold", ROOT / "unused").train.backward_chunk_size == 2


# ------------------------------------------------------------------------------------------------ workers


def _tiny_spec(tiny_model: Path) -> "bench.BenchSpec":
    return bench.BenchSpec(prompts=2, group_size=2, max_new_tokens=4, warmup=1, steps=1, model=str(tiny_model))


def test_fingrpo_worker_runs_the_project_trainer_on_the_same_prompts(tiny_model):
    spec = _tiny_spec(tiny_model)
    result = bench.run_fingrpo_worker(spec, "gold")
    assert [s["warmup"] for s in result["steps"]] == [True, False]
    step = result["steps"][1]
    assert len(step["completion_lengths"]) == 4 and step["generated_tokens"] == sum(step["completion_lengths"])
    assert set(step["phases"]) == {"rollout+rewards", "reference_forward", "policy_fwd_bwd+optimizer"}
    assert result["peak_rss_gib"] > 0
    # the prompts are the rendered train records after the worked examples: same ids as the bench builds
    from fingrpo.model import load_model_and_tokenizer

    cfg = bench.bench_config(spec, "gold", ROOT / "unused")
    _, tok = load_model_and_tokenizer(cfg.model)
    ids = bench.prompt_token_ids(bench.bench_examples(cfg, tok, spec), tok)
    assert result["prompt_lengths"] == [len(x) for x in ids]


def test_worker_main_prints_one_json_result_line(tiny_model, capsys):
    spec = _tiny_spec(tiny_model)
    assert bench.main(["--worker", "fingrpo", "--mode", "gold", *spec.to_argv()]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith(bench.RESULT_MARKER)]
    assert len(lines) == 1
    assert json.loads(lines[0][len(bench.RESULT_MARKER):])["system"] == "fingrpo"


@pytest.mark.slow
def test_trl_worker_runs_grpotrainer_with_the_same_prompts(tiny_model):
    spec = _tiny_spec(tiny_model)
    result = bench.run_trl_worker(spec, "gold")
    assert result["gradient_checkpointing"] is True  # TRL's default, kept
    assert len(result["steps"]) == 2 and result["steps"][1]["generated_tokens"] > 0
    assert "generate" in result["steps"][1]["phases"]
    fin = bench.run_fingrpo_worker(spec, "gold")
    assert result["prompt_lengths"] == fin["prompt_lengths"]  # TRL tokenizes the same texts to the same ids


def test_fingrpo_side_is_pinned_to_trls_defaults(tiny_model):
    """The knobs both trainers have are TRL's defaults on fingrpo's side too (not params.yaml's recipe)."""
    import trl

    args = trl.GRPOConfig(output_dir=str(ROOT / "unused"), use_cpu=True, bf16=False)
    cfg = bench.bench_config(_tiny_spec(tiny_model), "gold", ROOT / "unused").train
    assert cfg.loss_type == args.loss_type
    assert cfg.epsilon == args.epsilon
    assert cfg.epsilon_high == (args.epsilon_high if args.epsilon_high is not None else args.epsilon)
    assert cfg.learning_rate == args.learning_rate and cfg.weight_decay == args.weight_decay
    assert tuple(cfg.adam_betas) == (args.adam_beta1, args.adam_beta2)
    assert cfg.max_grad_norm == args.max_grad_norm and cfg.warmup_steps == args.warmup_steps == 0
    assert cfg.lr_scheduler == str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    assert cfg.advantage_scale == args.scale_rewards == "group"
    assert cfg.init_adapter is None  # the bench adds its own fresh LoRA on both sides
