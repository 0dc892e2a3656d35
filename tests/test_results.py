"""fingrpo.results: the comparison table, learning curves and samples from run folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fingrpo.errors import DataError
from fingrpo.results import write_results


def _metrics(acc: float, n: int, sub_acc: float, sub_n: int) -> dict:
    return {"n": n, "execution_accuracy": acc, "execution_accuracy_ci": [acc / 2, acc * 1.5],
            "tolerant_accuracy": acc, "format_rate": 0.9,
            "random_subset": {"n": sub_n, "execution_accuracy": sub_acc, "execution_accuracy_ci": [0.0, 2 * sub_acc],
                              "tolerant_accuracy": sub_acc, "format_rate": 0.95}}


def _run(folder: Path, adapter_acc: float, with_curves: bool) -> Path:
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps({
        "dev": {"adapter": _metrics(adapter_acc, 10, adapter_acc, 4), "base": _metrics(0.1, 10, 0.0, 4)},
        "summary": {"prompt": "gold, 0-shot"}}))
    rows = []
    for rid, sub in (("a", True), ("b", True), ("c", False)):
        for model in ("base", "adapter"):
            rows.append({"id": rid, "split": "dev", "model": model, "random_subset": sub, "exe_ans": 1.5,
                         "completion": f"Program: add(1, 0.5)\nAnswer: 1.5 ({model})",
                         "correct_official": model == "adapter"})
    (folder / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    if with_curves:
        (folder / "train_metrics.csv").write_text(
            "step,reward/program_execution_mean,reward/format_mean\n" + "\n".join(f"{s},{0.1 * s},{0.5}" for s in range(1, 8)))
        (folder / "sft_metrics.csv").write_text("step,epoch,loss\n1,1,1.2\n2,1,0.8\n")
    return folder


def test_table_curves_and_samples(tmp_path):
    recipe = _run(tmp_path / "recipe", 0.3, with_curves=True)
    control = _run(tmp_path / "control-random", 0.05, with_curves=True)
    paths = write_results([recipe, control], tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == ["learning_curves.png", "samples.md", "table.md"]
    table = (tmp_path / "out" / "table.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| recipe") or line.startswith("| control")]
    assert len(lines) == 4  # 2 runs x (base, adapter)
    recipe_adapter = next(line for line in lines if line.startswith("| recipe | adapter"))
    assert "| 4 | 30.0 [0.0, 60.0] |" in recipe_adapter and "| 10 | 30.0 [15.0, 45.0] |" in recipe_adapter
    assert (tmp_path / "out" / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (tmp_path / "out" / "samples.md").read_text()
    assert "**a**" in samples and "**b**" in samples and "**c**" not in samples  # random subset only
    assert samples.count("- base ✗") == 2 and samples.count("- recipe ✓") == 2


def test_folder_without_eval_json_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no eval.json"):
        write_results([tmp_path / "empty"], tmp_path / "out")


def test_baseline_only_folder_has_no_curves(tmp_path):
    base = tmp_path / "baseline-gold-0shot"
    base.mkdir()
    (base / "eval.json").write_text(json.dumps({"dev": {"base": _metrics(0.02, 200, 0.02, 200)}, "summary": {}}))
    paths = write_results([base], tmp_path / "out")
    assert [p.name for p in paths] == ["table.md"]
    row = (tmp_path / "out" / "table.md").read_text().splitlines()[-1]
    assert row.startswith("| baseline-gold-0shot | base |") and row.endswith("| – | – | – |")


def _paired_run(folder: Path, right: dict[str, list[bool]]) -> Path:
    """A run whose adapter got ``right[set][i]`` on record i of each set (set 'extra' is not pooled)."""
    folder.mkdir(parents=True)
    sets = {f"dev.{name}": {"pooled": name != "extra"} for name in right}
    (folder / "eval.json").write_text(json.dumps({"dev": {}, "summary": {"sets": sets}}))
    rows = [{"id": f"{name}-{i}", "dataset": "tatqa" if name == "tatqa" else "finqa", "split": "dev",
             "model": model, "sets": [name], "random_subset": False, "completion": "", "exe_ans": 1.0,
             "correct_official": ok if model == "adapter" else False}
            for name, oks in right.items() for i, ok in enumerate(oks) for model in ("base", "adapter")]
    (folder / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def test_paired_comparison_counts_gained_and_lost_records_with_exact_mcnemar(tmp_path):
    from math import comb

    # finqa: the recipe gains records 0-5 and loses record 6 (7 discordant); tatqa: gains 0-1, no loss
    recipe = _paired_run(tmp_path / "recipe", {"finqa": [True] * 6 + [False, True, False],
                                               "tatqa": [True, True, False], "extra": [True]})
    warm = _paired_run(tmp_path / "sft-only", {"finqa": [False] * 6 + [True, True, False],
                                               "tatqa": [False, False, False], "extra": [False]})
    paths = write_results([recipe, warm], tmp_path / "out")
    assert "paired.md" in [p.name for p in paths]
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:-1]]
            for line in (tmp_path / "out" / "paired.md").read_text().splitlines() if line.startswith("| recipe vs")}
    p_finqa = 2 * sum(comb(7, k) for k in range(6, 8)) / 2 ** 7  # two-sided: twice P(X >= 6), X ~ Bin(7, 1/2)
    assert rows["finqa"] == ["9", "77.8", "22.2", "+55.6", "6", "1", f"{p_finqa:.3g}"]
    assert rows["tatqa"] == ["3", "66.7", "0.0", "+66.7", "2", "0", "0.5"]
    # pooled: the sets marked pooled only (not 'extra'): 8 gained, 1 lost of 12
    p_pooled = 2 * sum(comb(9, k) for k in range(8, 10)) / 2 ** 9
    assert rows["pooled"] == ["12", "75.0", "16.7", "+58.3", "8", "1", f"{p_pooled:.3g}"]
    assert rows["extra"][4:6] == ["1", "0"]
    # the same run against itself: nothing discordant, p = 1
    same = write_results([recipe, _paired_run(tmp_path / "again", {"finqa": [True] * 6 + [False, True, False]})],
                         tmp_path / "out2")
    text = (tmp_path / "out2" / "paired.md").read_text() if any(p.name == "paired.md" for p in same) else ""
    assert "| recipe vs again | finqa | 9 | 77.8 | 77.8 | +0.0 | 0 | 0 | 1 |" in text


def test_group_statistics_are_drawn_for_runs_that_logged_them(tmp_path):
    recipe = _run(tmp_path / "recipe", 0.3, with_curves=True)
    (recipe / "train_metrics.csv").write_text(
        "step,reward/format_mean,zero_std_all_right_fraction,zero_std_all_wrong_fraction,dynamic/dropped_groups,"
        "dynamic/sampled_groups\n" + "\n".join(f"{s},0.5,0.25,0.5,{s % 3},6" for s in range(1, 8)))
    old = _run(tmp_path / "old", 0.1, with_curves=True)  # no group statistics: a line for recipe only
    paths = write_results([recipe, old], tmp_path / "out")
    assert "group_statistics.png" in [p.name for p in paths]
    assert (tmp_path / "out" / "group_statistics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from fingrpo.results import load_runs, plot_group_statistics
    assert plot_group_statistics(load_runs([old]), tmp_path / "none.png") is None  # nothing logged: no picture


def test_a_run_keeps_its_colour_in_every_panel_and_the_warm_start_panel_names_its_runs(tmp_path):
    # the compute-matched warm start has sft_metrics.csv but no GRPO: its loss line must not take the colour
    # GRPO's recipe has in the reward panels, and the loss panel says whose line is whose
    from fingrpo.results import _learning_curves_figure, load_runs

    recipe = _run(tmp_path / "recipe", 0.3, with_curves=True)
    (recipe / "sft_metrics.csv").unlink()          # GRPO only
    matched = _run(tmp_path / "compute-matched", 0.2, with_curves=False)
    (matched / "sft_metrics.csv").write_text("step,epoch,loss\n1,1,1.2\n2,1,0.8\n3,2,0.6\n")
    fig = _learning_curves_figure(load_runs([recipe, matched]), ["program_execution", "format"])
    colour = {}
    for ax in fig.axes:
        for line in ax.lines:
            colour.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colour) == {"recipe", "compute-matched"}
    assert all(len(c) == 1 for c in colour.values()) and colour["recipe"] != colour["compute-matched"]
    loss_ax = next(ax for ax in fig.axes if ax.get_title().startswith("warm start"))
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["compute-matched"]
