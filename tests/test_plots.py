"""PNG plots from synthetic metrics / eval / rollout files: real images, placeholders, clear errors."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest

from fingrpo.config import config_from_dict
from fingrpo.errors import DataError
from fingrpo.plots import (
    PLOT_FILES,
    placeholder_note,
    plot_from_config,
    read_metrics_csv,
    read_rollout_rewards,
)

REWARD_NAMES = ("correctness", "program_execution", "format", "numbers_from_context")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cfg(tmp: Path):
    reports = tmp / "reports"
    return config_from_dict({
        "train": {"metrics_path": str(reports / "train_metrics.csv"),
                  "rollout_rewards_path": str(reports / "rollout_rewards.jsonl")},
        "evaluate": {"output_path": str(reports / "eval.json"), "predictions_path": str(reports / "predictions.jsonl")},
    })


def _write_metrics(path: Path, steps: int = 40, columns: tuple[str, ...] | None = None) -> None:
    rng = random.Random(0)
    rows = []
    for s in range(1, steps + 1):
        progress = s / steps
        row = {
            "step": s, "loss": 0.05 * rng.gauss(0, 1) - 0.01 * progress, "reward_mean": 0.2 + 0.6 * progress,
            "reward_std": 0.3 - 0.1 * progress, "kl": 0.002 * s, "clip_fraction_low": 0.02 * rng.random(),
            "clip_fraction_high": 0.03 * rng.random(), "ratio_mean": 1 + 0.01 * rng.gauss(0, 1),
            "completion_length_mean": 40 - 15 * progress, "completion_length_max": 64,
            "truncated_fraction": max(0.0, 0.5 - 0.5 * progress), "zero_std_group_fraction": 0.9 - 0.6 * progress,
            "grad_norm": 0.5 + rng.random(), "lr": 2e-4 * math.cos(progress * math.pi / 2),
            "rollout_tokens_per_s": 120.0, "step_seconds": 30.0,
        }
        for i, name in enumerate(REWARD_NAMES):
            row[f"reward/{name}_mean"] = min(1.0, 0.1 * i + 0.5 * progress)
            row[f"reward/{name}_std"] = 0.2
        rows.append({k: v for k, v in row.items() if columns is None or k in columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _eval_body(acc: float, with_rewards: bool = True) -> dict:
    body = {"n": 40}
    for i, metric in enumerate(("execution_accuracy", "tolerant_accuracy", "program_accuracy", "format_rate")):
        v = min(1.0, acc + 0.1 * i)
        body[metric] = v
        body[f"{metric}_ci"] = [max(0.0, v - 0.1), min(1.0, v + 0.1)]
    if with_rewards:
        body["rewards"] = {name: acc + 0.05 * i for i, name in enumerate(REWARD_NAMES)}
    return body


def _write_eval(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    adapter, base = _eval_body(0.25), _eval_body(0.05)
    adapter["random_subset"], base["random_subset"] = _eval_body(0.4, False), _eval_body(0.1, False)
    data = {"dev": {"adapter": adapter, "base": base},
            "test": {"adapter": _eval_body(0.2), "base": _eval_body(0.04)}, "summary": "ignored"}
    path.write_text(json.dumps(data))


def _write_rollouts(path: Path, steps: int = 40) -> None:
    rng = random.Random(1)
    with path.open("w") as f:
        for s in range(1, steps + 1):
            row = {"step": s}
            for name in REWARD_NAMES:
                row[f"reward/{name}"] = [float(rng.random() < s / steps) for _ in range(32)]
            row["total"] = [sum(row[f"reward/{n}"][i] for n in REWARD_NAMES) for i in range(32)]
            row["completion_lengths"] = [rng.randint(5, 64 - s) for _ in range(32)]
            f.write(json.dumps(row) + "\n")


def _assert_real_png(path: Path, min_width: int = 600) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = imread(path)
    height, width = image.shape[:2]
    assert width >= min_width and height >= 250, (path.name, image.shape)
    assert path.stat().st_size > 20_000, (path.name, path.stat().st_size)  # drawn content, not a blank frame
    assert image[..., :3].std() > 0.05  # not a single colour
    assert placeholder_note(path) is None, path.name


def test_all_plots_from_full_inputs(tmp_path):
    cfg = _cfg(tmp_path)
    _write_metrics(Path(cfg.train.metrics_path))
    _write_eval(Path(cfg.evaluate.output_path))
    _write_rollouts(Path(cfg.train.rollout_rewards_path))
    out = tmp_path / "plots"
    paths = plot_from_config(cfg, output_dir=out)
    assert [p.name for p in paths] == list(PLOT_FILES)
    for path in paths:
        _assert_real_png(path)
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temporary files


def test_default_output_dir_is_reports_plots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(Path("."))  # relative paths, as in params.yaml
    _write_eval(Path(cfg.evaluate.output_path))
    paths = plot_from_config(cfg)
    assert {p.parent.resolve() for p in paths} == {(tmp_path / "reports" / "plots").resolve()}


def test_missing_columns_become_placeholders_with_notes(tmp_path):
    cfg = _cfg(tmp_path)
    _write_metrics(Path(cfg.train.metrics_path), columns=("step", "loss", "reward_mean"))
    paths = {p.name: p for p in plot_from_config(cfg, output_dir=tmp_path / "plots")}
    _assert_real_png(paths["training_curves.png"])
    assert "reward/<name>_mean" in placeholder_note(paths["rewards_per_function.png"])
    assert "clip_fraction_low" in placeholder_note(paths["ratio_clipping.png"])
    assert "completion_length_mean" in placeholder_note(paths["completion_lengths.png"])
    assert "rollout reward samples" in placeholder_note(paths["reward_distributions.png"])
    assert "eval.json not found" in placeholder_note(paths["base_vs_trained.png"])
    for p in paths.values():  # placeholders are valid PNGs too (dvc finds every declared output)
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_a_rerun_replaces_a_stale_plot_with_a_placeholder(tmp_path):
    cfg = _cfg(tmp_path)
    _write_metrics(Path(cfg.train.metrics_path))
    _write_eval(Path(cfg.evaluate.output_path))
    out = tmp_path / "plots"
    plot_from_config(cfg, output_dir=out)
    assert placeholder_note(out / "base_vs_trained.png") is None
    Path(cfg.evaluate.output_path).unlink()
    plot_from_config(cfg, output_dir=out)
    assert placeholder_note(out / "base_vs_trained.png") is not None


def test_eval_only_and_prediction_reward_distributions(tmp_path):
    cfg = _cfg(tmp_path)
    _write_eval(Path(cfg.evaluate.output_path))
    rng = random.Random(2)
    with Path(cfg.evaluate.predictions_path).open("w") as f:
        for model in ("base", "adapter"):
            for i in range(40):
                rewards = {name: float(rng.random() < (0.6 if model == "adapter" else 0.2)) for name in REWARD_NAMES}
                f.write(json.dumps({"id": f"r{i}", "model": model, "completion": "...", "rewards": rewards}) + "\n")
    paths = {p.name: p for p in plot_from_config(cfg, output_dir=tmp_path / "plots")}
    _assert_real_png(paths["base_vs_trained.png"])
    _assert_real_png(paths["reward_distributions.png"])
    assert "train_metrics.csv not found" in placeholder_note(paths["training_curves.png"])


def test_served_and_oracle_figures_without_the_base_model(tmp_path):
    """An eval.json of several sets with the served adapter and the gold-fact oracle, no base model
    (``evaluate.compare_base: false``): both models are read and drawn."""
    from fingrpo.plots import plot_base_vs_trained, read_eval_json

    fig = {"n": 10, "execution_accuracy": 0.2, "execution_accuracy_ci": [0.1, 0.3], "format_rate": 1.0}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"dev": {"finqa_random": {"adapter": fig, "adapter_gold_facts": dict(fig, execution_accuracy=0.3)},
                                        "pooled": {"adapter": fig}}, "summary": {"x": 1}}))
    evaluation = read_eval_json(path)
    assert evaluation["dev/finqa_random"].keys() == {"adapter", "adapter_gold_facts"}
    assert evaluation["dev/finqa_random"]["adapter_gold_facts"]["execution_accuracy"] == 0.3
    _assert_real_png(plot_base_vs_trained(evaluation, tmp_path / "bars.png"))


def test_no_inputs_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nothing to plot.*train_metrics.csv.*eval.json"):
        plot_from_config(_cfg(tmp_path), output_dir=tmp_path / "plots")


@pytest.mark.parametrize(
    "which, content, message",
    [
        ("eval", "{not json", "malformed JSON at line 1"),
        ("eval", json.dumps({"dev": {"other": 1}}), "no split holds 'adapter' or 'base'"),
        ("eval", json.dumps([1, 2]), "expected a JSON object"),
        ("metrics", "", "file is empty"),
        ("metrics", "step,loss\n", "no rows"),
        ("rollout", '{"step": 1, "reward/format": [1]}\n{oops\n', "line 2"),
        ("rollout", '{"reward/format": [1]}\n', "numeric 'step'"),
    ],
)
def test_malformed_inputs_are_data_errors_naming_the_file(tmp_path, which, content, message):
    cfg = _cfg(tmp_path)
    metrics, evaluation = Path(cfg.train.metrics_path), Path(cfg.evaluate.output_path)
    _write_metrics(metrics)
    _write_eval(evaluation)
    target = {"eval": evaluation, "metrics": metrics, "rollout": Path(cfg.train.rollout_rewards_path)}[which]
    target.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        plot_from_config(cfg, output_dir=tmp_path / "plots")
    assert target.name in str(err.value)


def test_read_metrics_csv_is_tolerant(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("loss,reward_mean,note\n0.5,0.1,a\n0.4,,b\n0.3,0.3,c\n")
    frame = read_metrics_csv(path)
    assert frame["step"].tolist() == [1, 2, 3]  # no step column: row numbers
    assert frame["reward_mean"].isna().tolist() == [False, True, False]
    assert frame["note"].isna().all()  # non-numeric cells become NaN


def test_read_rollout_rewards_drops_non_finite_and_merges_steps(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"step": 2, "reward/format": [1, null, "x", 0.5], "total": [1.5], "other": [3]}\n'
                    '{"step": 2, "reward/correctness": [0], "completion_lengths": [12]}\n')
    assert read_rollout_rewards(path) == {
        2: {"format": [1.0, 0.5], "total": [1.5], "correctness": [0.0], "completion_lengths": [12.0]}}


def test_cli_plot_command(tmp_path, monkeypatch, capsys):
    from fingrpo.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = _cfg(Path("."))
    _write_metrics(Path(cfg.train.metrics_path), steps=5)
    assert main(["plot", "--params", "missing-is-defaults.yaml"]) == 2  # explicit missing params file
    assert main(["plot"]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == list(PLOT_FILES)
    _assert_real_png(tmp_path / "reports" / "plots" / "training_curves.png")


def test_docstring_examples_hold():
    import doctest

    import fingrpo.plots

    result = doctest.testmod(fingrpo.plots)
    assert result.attempted >= 3 and result.failed == 0
