"""Comparing runs: the tables, learning curves and sample completions of ``docs/results.md``.

    fingrpo results results/recipe results/control-random results/control-heuristic results/baseline-* \\
        --output docs/results

Each run folder holds what a pipeline run leaves in ``reports/`` (``eval.json``, optionally
``train_metrics.csv``, ``sft_metrics.csv`` and ``predictions.jsonl``); ``experiments/results.sh`` fills
them. Writes ``table.md`` (one row per run and model: official and tolerant execution accuracy and the
format rate with bootstrap 95% intervals, on the random-sample records and on all records evaluated),
``paired.md`` (the first run against each of the others on the same records: gained, lost, exact McNemar),
``learning_curves.png`` (training reward terms per step, one line per run), ``group_statistics.png`` (the
groups that carried signal, dropped and gold-guided, per step), ``samples.md`` (the same
dev questions answered by the base model and by each adapter).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Sequence

from fingrpo.errors import DataError
from fingrpo.io import write_text_atomic
from fingrpo.rewards import REWARD_REGISTRY
from fingrpo.scoring import ROW_METRICS, mcnemar_p


def _pct(value: Any, ci: Sequence[Any] | None = None) -> str:
    if value is None:
        return "–"
    out = f"{100 * value:.1f}"
    if ci and ci[0] is not None:
        out += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return out


def load_runs(folders: Sequence[str | os.PathLike]) -> dict[str, dict]:
    """``{run name (folder name): {"eval": eval.json, "folder": Path}}``; a folder without eval.json is a
    :class:`DataError` naming it."""
    runs: dict[str, dict] = {}
    for folder in folders:
        folder = Path(folder)
        path = folder / "eval.json"
        if not path.is_file():
            raise DataError(f"{folder}: no eval.json (run the pipeline or `fingrpo evaluate` into it first)")
        try:
            runs[folder.name] = {"eval": json.loads(path.read_text(encoding="utf-8")), "folder": folder}
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
    return runs


def results_table(runs: dict[str, dict], split: str = "dev") -> str:
    """Markdown: one row per (run, model) with n, accuracies and intervals, in the runs' order."""
    head = (
        "| run | model | prompt | random subset: n | exec. acc. % [95% CI] | tolerant % | format % "
        "| all records: n | exec. acc. % [95% CI] | format % |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    if any(not ({"adapter", "base"} & set(run["eval"].get(split, {}))) for run in runs.values()):
        return _sets_table(runs, split)
    lines = []
    for name, run in runs.items():
        body = run["eval"].get(split, {})
        prompt = run["eval"].get("summary", {}).get("prompt", "")
        for model in ("base", "adapter"):
            m = body.get(model)
            if not m:
                continue
            r = m.get("random_subset", {})
            all_cells = ["–", "–", "–"]
            if m.get("n") != r.get("n"):  # more than the random subset was evaluated
                all_cells = [str(m["n"]), _pct(m["execution_accuracy"], m.get("execution_accuracy_ci")),
                             _pct(m["format_rate"])]
            lines.append(
                f"| {name} | {model} | {prompt} | {r.get('n', '–')} "
                f"| {_pct(r.get('execution_accuracy'), r.get('execution_accuracy_ci'))} "
                f"| {_pct(r.get('tolerant_accuracy'))} | {_pct(r.get('format_rate'))} | " + " | ".join(all_cells) + " |"
            )
    return head + "\n".join(lines) + "\n"


def _sets_table(runs: dict[str, dict], split: str) -> str:
    """Markdown for an eval.json of several evaluation sets: one row per (run, set, model)."""
    head = (
        "| run | set | model | prompt | n | exec. acc. % [95% CI] | tolerant % | format % | TAT-QA EM % |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, run in runs.items():
        prompt = run["eval"].get("summary", {}).get("prompt", "")
        for set_name, body in run["eval"].get(split, {}).items():
            for model in ("base", "adapter"):
                m = body.get(model) if isinstance(body, dict) else None
                if not m:
                    continue
                tatqa = _pct(m["tatqa_exact_match"], m.get("tatqa_exact_match_ci")) if "tatqa_exact_match" in m else "–"
                lines.append(
                    f"| {name} | {set_name} | {model} | {prompt} | {m.get('n', '–')} "
                    f"| {_pct(m.get('execution_accuracy'), m.get('execution_accuracy_ci'))} "
                    f"| {_pct(m.get('tolerant_accuracy'))} | {_pct(m.get('format_rate'))} | {tatqa} |"
                )
    return head + "\n".join(lines) + "\n"


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# the reward terms drawn: every registered reward, in the registry's order, except the stated answer's
# correctness (0 throughout for a 135M model, which cannot do the arithmetic: the program is executed instead)
LEARNING_CURVE_TERMS = tuple(name for name in REWARD_REGISTRY if name != "correctness")


def _train_frames(runs: dict[str, dict]) -> dict:
    import pandas as pd

    return {name: pd.read_csv(run["folder"] / "train_metrics.csv") for name, run in runs.items()
            if (run["folder"] / "train_metrics.csv").is_file()}


def _colors(runs: dict[str, dict]) -> dict[str, str]:
    """One colour per run, the same in every panel of a figure (the order the runs were given)."""
    return {name: f"C{i % 10}" for i, name in enumerate(runs)}


def _panel(ax: Any, frames: dict, column: str, title: str, colors: dict[str, str]) -> None:
    """One line per run of ``column`` against the GRPO step (rolling mean over 5 steps)."""
    for name, frame in frames.items():
        if column in frame.columns:
            data = frame[["step", column]].dropna()
            ax.plot(data["step"], data[column].rolling(5, min_periods=1, center=True).mean(), lw=1.6, label=name,
                    color=colors[name])
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("GRPO step")
    ax.grid(alpha=0.3)


def _save(fig: Any, legend_ax: Any, title: str, path: str | os.PathLike) -> Path:
    legend_ax.legend(fontsize=8)
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# where GRPO's signal goes, per step: (column of train_metrics.csv, panel title); a panel is drawn when a run has it
GROUP_STATISTICS = (
    ("solved_group_fraction", "groups with a correct completion"),
    ("zero_std_all_right_fraction", "groups all equal: all right"),
    ("zero_std_all_wrong_fraction", "groups all equal: none right"),
    ("dynamic/dropped_share", "dynamic sampling: dropped / sampled groups"),
    ("gold_guided_fraction", "gold-guided groups (share of the update)"),
)


def plot_group_statistics(runs: dict[str, dict], path: str | os.PathLike) -> Path | None:
    """The group statistics of every run with ``train_metrics.csv`` (:data:`GROUP_STATISTICS`), one panel
    each, one line per run: how many groups carried signal, how many dynamic sampling dropped, how many were
    gold-guided. None when no run trained."""
    from matplotlib.figure import Figure

    frames = _train_frames(runs)
    for frame in frames.values():
        if {"dynamic/dropped_groups", "dynamic/sampled_groups"} <= set(frame.columns):
            frame["dynamic/dropped_share"] = frame["dynamic/dropped_groups"] / frame["dynamic/sampled_groups"]
    present = [(c, t) for c, t in GROUP_STATISTICS if any(c in f.columns for f in frames.values())]
    if not present:
        return None
    fig = Figure(figsize=(3.6 * len(present), 3.4), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    colors = _colors(runs)
    for ax, (column, title) in zip(axes, present):
        _panel(ax, frames, column, title, colors)
        ax.set_ylim(-0.03, 1.03)
    return _save(fig, axes[0], "GRPO group statistics per step (rolling mean over 5 steps)", path)


def plot_learning_curves(runs: dict[str, dict], path: str | os.PathLike,
                         terms: Sequence[str] = LEARNING_CURVE_TERMS) -> Path | None:
    """One panel per reward term (its per-step mean during GRPO; rolling mean over 5 steps), one line per
    run that has ``train_metrics.csv``; the last panel is the warm start's loss of every run that has
    ``sft_metrics.csv`` (its own legend: those need not be the runs that ran GRPO). A run keeps its colour
    in every panel. None when no run trained."""
    fig = _learning_curves_figure(runs, terms)
    return None if fig is None else _save(fig, fig.axes[0], "GRPO learning curves: recipe vs controls", path)


def _learning_curves_figure(runs: dict[str, dict], terms: Sequence[str]) -> Any:
    from matplotlib.figure import Figure

    frames = _train_frames(runs)
    if not frames:
        return None
    colors = _colors(runs)
    present = [t for t in terms if any(f"reward/{t}_mean" in f.columns for f in frames.values())]
    n = len(present) + 1
    cols = 3
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(12, 3.2 * rows + 0.6), dpi=110, layout="constrained")
    axes = [ax for row in fig.subplots(rows, cols, squeeze=False) for ax in row]
    for ax, term in zip(axes, present):
        _panel(ax, frames, f"reward/{term}_mean", f"{term} (mean over rollouts)", colors)
    ax = axes[len(present)]
    for name, run in runs.items():
        sft_csv = run["folder"] / "sft_metrics.csv"
        if sft_csv.is_file():
            rows_ = [r for r in _read_csv(sft_csv) if r.get("loss")]
            if rows_:
                ax.plot([int(r["step"]) for r in rows_], [float(r["loss"]) for r in rows_], lw=1.2, label=name,
                        color=colors[name])
    ax.set_title("warm start: reply cross-entropy")
    ax.set_xlabel("SFT step")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    for extra in axes[len(present) + 1 :]:
        extra.set_visible(False)
    return fig


def sample_completions(runs: dict[str, dict], k: int = 6, split: str = "dev") -> str:
    """Markdown: for the first ``k`` random-sample records every run predicted, the gold program and each
    model's completion (base once, then each run's adapter), marked ✓ when it executes to the answer."""
    preds: dict[str, dict[str, dict]] = {}
    base: dict[str, dict] = {}
    for name, run in runs.items():
        path = run["folder"] / "predictions.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("split") != split or not row.get("random_subset"):
                continue
            if row["model"] == "base":
                base.setdefault(row["id"], row)
            else:
                preds.setdefault(name, {})[row["id"]] = row
    if not preds:
        return ""
    ids = [i for i in base if all(i in p for p in preds.values())][:k]
    out = []
    for rid in ids:
        out.append(f"**{rid}** — gold answer `{base[rid]['exe_ans']}`\n")
        entries = [("base", base[rid])] + [(name, p[rid]) for name, p in preds.items()]
        for name, row in entries:
            mark = "✓" if row["correct_official"] else "✗"
            text = " ⏎ ".join(row["completion"].strip().splitlines())[:160]
            out.append(f"- {name} {mark}: `{text}`")
        out.append("")
    return "\n".join(out)


def _correct_by_set(run: dict, model: str, split: str) -> dict[str, dict[tuple[str, str], bool]]:
    """``{set name: {(dataset, id): right}}`` of one model in a run's predictions.jsonl, with ``"pooled"``:
    the records of the sets its eval.json marks pooled ({} without predictions)."""
    path = run["folder"] / "predictions.jsonl"
    if not path.is_file():
        return {}
    pooled = {k.split(".", 1)[1] for k, v in run["eval"].get("summary", {}).get("sets", {}).items()
              if k.startswith(f"{split}.") and v.get("pooled")}
    out: dict[str, dict[tuple[str, str], bool]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("model") != model or row.get("split") != split:
            continue
        key, right = (row.get("dataset", "finqa"), row["id"]), bool(row[ROW_METRICS["execution_accuracy"]])
        for name in row.get("sets", []):
            out.setdefault(name, {})[key] = right
        if pooled & set(row.get("sets", [])):
            out.setdefault("pooled", {})[key] = right
    return out


def paired_comparisons(runs: dict[str, dict], model: str = "adapter", split: str = "dev") -> str:
    """Markdown: the first run's ``model`` against each other run's, per evaluation set and pooled, on the
    records both predicted: accuracies, records gained (right only in the first run) and lost, and the
    two-sided exact McNemar p-value (twice the one-sided tail of the larger count; 1 with no discordant
    record). The first run is what is being judged (the recipe), the others what it is judged against."""
    names = list(runs)
    if len(names) < 2:
        return ""
    first = _correct_by_set(runs[names[0]], model, split)
    lines = []
    for other_name in names[1:]:
        other = _correct_by_set(runs[other_name], model, split)
        for set_name in [*(n for n in first if n != "pooled"), "pooled"]:
            keys = sorted(set(first.get(set_name, {})) & set(other.get(set_name, {})))
            if not keys:
                continue
            a, b = first[set_name], other[set_name]
            gained = sum(a[k] and not b[k] for k in keys)
            lost = sum(b[k] and not a[k] for k in keys)
            p = min(1.0, 2 * mcnemar_p(max(gained, lost), min(gained, lost))) if gained + lost else 1.0
            acc_a, acc_b = (100 * sum(x[k] for k in keys) / len(keys) for x in (a, b))
            lines.append(f"| {names[0]} vs {other_name} | {set_name} | {len(keys)} | {acc_a:.1f} | {acc_b:.1f} "
                         f"| {acc_a - acc_b:+.1f} | {gained} | {lost} | {p:.3g} |")
    if not lines:
        return ""
    head = (f"| comparison ({model}) | set | n (paired) | first % | second % | Δ points | gained | lost "
            "| McNemar p (exact, two-sided) |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(lines) + "\n"


def write_results(folders: Sequence[str | os.PathLike], output: str | os.PathLike) -> list[Path]:
    """``table.md``, ``paired.md`` (the first run against each other one, with predictions),
    ``learning_curves.png``, ``group_statistics.png`` and ``samples.md`` under ``output``; returns their paths."""
    runs = load_runs(folders)
    output = Path(output)
    written = [write_text_atomic(output / "table.md", results_table(runs))]
    paired = paired_comparisons(runs)
    if paired:
        written.append(write_text_atomic(output / "paired.md", paired))
    for png in (plot_learning_curves(runs, output / "learning_curves.png"),
                plot_group_statistics(runs, output / "group_statistics.png")):
        if png is not None:
            written.append(png)
    samples = sample_completions(runs)
    if samples:
        written.append(write_text_atomic(output / "samples.md", samples))
    return written


__all__ = ["load_runs", "results_table", "paired_comparisons", "plot_learning_curves", "plot_group_statistics", "sample_completions", "write_results"]
