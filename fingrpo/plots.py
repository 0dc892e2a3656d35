"""PNG plots of a run: training curves, rewards, completion lengths, ratio clipping, base vs trained.

    fingrpo plot                      # reads params.yaml; writes reports/plots/*.png (dvc.yaml `plot` stage)

Inputs (paths from the config):

- ``train.metrics_path`` (``reports/train_metrics.csv``): one row per optimizer step. Columns used,
  each optional: ``step, loss, reward_mean, reward_std, reward/<name>_mean, reward/<name>_std, kl,
  clip_fraction_low, clip_fraction_high, ratio_mean, completion_length_mean, completion_length_max,
  truncated_fraction, zero_std_group_fraction, grad_norm, lr``.
- ``evaluate.output_path`` (``reports/eval.json``): ``{split: {"adapter": {metric: x, metric + "_ci":
  [lo, hi], "rewards": {name: mean}}, "base": {...}}}``.
- the rollout samples file ``train.rollout_rewards_path`` (``reports/rollout_rewards.jsonl``; optional,
  written by the trainer): one JSON object per step, ``{"step": 3, "reward/<name>": [r_1, ..., r_N],
  "total": [...], "completion_lengths": [...]}`` holding the unweighted reward of every completion of
  that step's rollout batch, their weighted sums and token lengths. It gives the start-vs-end reward
  and length distributions.
- ``evaluate.predictions_path`` (optional): one JSON object per completion; rows with a ``"rewards":
  {name: value}`` dict and a ``"model"`` (``"base"``/``"adapter"``) give base-vs-trained reward
  distributions when there is no rollout samples file.

Outputs (fixed names, so ``dvc.yaml`` can declare them): :data:`PLOT_FILES` in ``reports/plots/``.
A plot whose data is absent is not an error: its file becomes a placeholder image saying what is
missing (so no stale figure from an earlier run survives and DVC finds every declared output), and the
note is logged. No input at all, or a malformed one, raises :class:`fingrpo.errors.DataError`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fingrpo.errors import DataError
from fingrpo.io import atomic_path, read_json, read_jsonl

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import Config

log = logging.getLogger(__name__)

PLOTS_DIR = "reports/plots"
ROLLOUT_REWARDS_FILE = "rollout_rewards.jsonl"
PLOT_FILES = (
    "training_curves.png",
    "rewards_per_function.png",
    "reward_distributions.png",
    "completion_lengths.png",
    "ratio_clipping.png",
    "base_vs_trained.png",
)
#: the models of eval.json drawn in base_vs_trained.png (key, label, colour), those present
_MODEL_BARS = [("base", "base model", "tab:gray"), ("adapter", "trained adapter, retrieved facts (served)", "tab:blue"),
               ("adapter_gold_facts", "trained adapter, gold facts (oracle)", "tab:green")]
EVAL_MODELS = tuple(k for k, _, _ in _MODEL_BARS)
#: eval.json metrics compared in base_vs_trained.png, in this order (those present are drawn).
EVAL_METRICS = ("execution_accuracy", "tolerant_accuracy", "program_accuracy", "format_rate")
_REWARD_PREFIX = "reward/"
_PLACEHOLDER_TAG = "fingrpo placeholder: "
_TOTAL, _LENGTHS = "total", "completion_lengths"  # non-reward lists of the rollout samples file


class _Skip(Exception):
    """A plot's data is absent; the message is the note shown in its placeholder."""


# --------------------------------------------------------------------------------------------------
# Reading inputs
# --------------------------------------------------------------------------------------------------


def read_metrics_csv(path: str | os.PathLike):
    """The per-step metrics CSV -> a pandas DataFrame sorted by ``step`` (numeric columns only).

    Non-numeric cells become NaN; a missing ``step`` column is replaced by the row number.
    Raises :class:`DataError` for an unreadable or empty file.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.csv"; _ = p.write_text("step,loss\\n2,0.5\\n1,0.7\\n")
    >>> read_metrics_csv(p)["loss"].tolist()
    [0.7, 0.5]
    """
    import pandas as pd

    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty (no header)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed CSV: {str(e).strip().splitlines()[-1]}") from None
    if frame.empty:
        raise DataError(f"{path}: no rows (only a header)")
    frame.columns = [str(c).strip() for c in frame.columns]
    frame = frame.apply(pd.to_numeric, errors="coerce")
    if "step" not in frame.columns or frame["step"].isna().all():
        frame["step"] = range(1, len(frame) + 1)
    return frame.sort_values("step", kind="stable").reset_index(drop=True)


def read_eval_json(path: str | os.PathLike) -> dict[str, dict[str, dict]]:
    """``eval.json`` -> ``{split: {"base"/"adapter"/"adapter_gold_facts": metrics}}``, or ``{"<split>/<set>": ...}`` for an
    eval.json of several evaluation sets (other top-level keys are ignored).

    Raises :class:`DataError` when the file is missing/malformed or holds no split with a model's metrics.
    """
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object of splits, got {type(data).__name__}")
    def models(body: dict) -> dict:
        return {model: m for model, m in body.items() if model in EVAL_MODELS and isinstance(m, dict)}

    splits: dict[str, dict] = {}
    for split, body in data.items():
        if not isinstance(body, dict):
            continue
        if models(body):  # {split: {model: metrics}}
            splits[split] = models(body)
        else:  # {split: {set: {model: metrics}}}: one entry per evaluation set
            for name, set_body in body.items():
                if isinstance(set_body, dict):
                    splits[f"{split}/{name}"] = models(set_body)
    splits = {s: b for s, b in splits.items() if b}
    if not splits:
        raise DataError(f"{path}: no split holds 'adapter' or 'base' metrics (keys: {sorted(data)})")
    return splits


def read_rollout_rewards(path: str | os.PathLike) -> dict[int, dict[str, list[float]]]:
    """``rollout_rewards.jsonl`` -> ``{step: {name: [values]}}``: each ``reward/<name>`` list (prefix
    dropped), and the trainer's ``total`` (weighted sums) and ``completion_lengths`` lists when present.
    Non-finite entries are dropped; rows of the same step (a resumed run) are merged.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.jsonl"
    >>> _ = p.write_text('{"step": 1, "reward/format": [0, 1]}\\n')
    >>> read_rollout_rewards(p)
    {1: {'format': [0.0, 1.0]}}
    """
    out: dict[int, dict[str, list[float]]] = {}
    for i, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            raise DataError(f"{path}: line {i}: expected an object with a numeric 'step'")
        values = {}
        for key, vals in row.items():
            if not isinstance(vals, list):
                continue
            if key.startswith(_REWARD_PREFIX):
                key = key[len(_REWARD_PREFIX):]
            elif key not in (_TOTAL, _LENGTHS):
                continue
            values[key] = [float(v) for v in vals if _is_finite_number(v)]
        out.setdefault(int(row["step"]), {}).update(values)
    return out


def read_prediction_rewards(path: str | os.PathLike) -> dict[str, dict[str, list[float]]]:
    """Predictions JSONL -> ``{model: {name: [rewards]}}`` from rows with a ``rewards`` dict.

    The model is the row's ``"model"`` (or ``"variant"``) field, ``"adapter"`` when absent.
    """
    out: dict[str, dict[str, list[float]]] = {}
    for row in read_jsonl(path):
        rewards = row.get("rewards") if isinstance(row, dict) else None
        if not isinstance(rewards, dict):
            continue
        model = str(row.get("model") or row.get("variant") or "adapter")
        for name, value in rewards.items():
            if _is_finite_number(value):
                out.setdefault(model, {}).setdefault(name, []).append(float(value))
    return out


def _is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------------------------------
# Figures (object-oriented matplotlib: no pyplot global state, Agg canvas)
# --------------------------------------------------------------------------------------------------


def _figure(nrows: int, ncols: int, width: float = 11.0, height_per_row: float = 3.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height_per_row * nrows + 0.6), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig, path: Path, description: str | None = None) -> Path:
    """Write a figure as PNG atomically (no half-written image for DVC to pick up)."""
    metadata = {"Software": "fingrpo.plots"}
    if description:
        metadata["Description"] = description
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata=metadata)
    return path


def _has(frame, column: str) -> bool:
    return column in frame.columns and frame[column].notna().any()


def _smoothed(series, window: int):
    """Centered rolling mean, for readable trends over noisy per-step values."""
    return series.rolling(window, min_periods=1, center=True).mean()


def _plot_series(ax, frame, column: str, label: str | None = None, color=None, smooth: bool = True) -> None:
    """Raw per-step values (thin) and, with enough steps, a rolling mean (thick)."""
    data = frame[["step", column]].dropna()
    window = max(1, len(data) // 10)
    if smooth and window >= 3:
        (line,) = ax.plot(data["step"], data[column], lw=0.8, alpha=0.35, color=color)
        ax.plot(data["step"], _smoothed(data[column], window), lw=1.8, color=line.get_color(),
                label=f"{label or column} (rolling mean, {window} steps)")
    else:
        ax.plot(data["step"], data[column], lw=1.5, marker="o" if len(data) <= 30 else None, ms=3,
                color=color, label=label or column)


def _empty_panel(ax, note: str) -> None:
    ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _reward_names(frame) -> list[str]:
    return [c[len(_REWARD_PREFIX):-len("_mean")] for c in frame.columns
            if c.startswith(_REWARD_PREFIX) and c.endswith("_mean") and frame[c].notna().any()]


def plot_training_curves(frame, path: Path) -> Path:
    """Loss, reward mean ± std, gradient norm and learning rate over steps (2 × 2 panels)."""
    if not any(_has(frame, c) for c in ("loss", "reward_mean", "grad_norm", "lr")):
        raise _Skip("metrics CSV has none of loss, reward_mean, grad_norm, lr")
    fig, axes = _figure(2, 2)
    panels = [("loss", "loss"), ("reward_mean", "reward (weighted total)"), ("grad_norm", "gradient norm (before clipping)"),
              ("lr", "learning rate")]
    for ax, (column, title) in zip(axes, panels):
        ax.set_title(title)
        if not _has(frame, column):
            _empty_panel(ax, f"no '{column}' column")
            continue
        _plot_series(ax, frame, column)
        if column == "reward_mean" and _has(frame, "reward_std"):
            data = frame[["step", "reward_mean", "reward_std"]].dropna()
            ax.fill_between(data["step"], data["reward_mean"] - data["reward_std"],
                            data["reward_mean"] + data["reward_std"], alpha=0.2, label="± std over completions")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("GRPO training curves")
    return _save(fig, path)


def plot_rewards_per_function(frame, path: Path) -> Path:
    """Each reward function's mean (± std) over steps, and the share of groups with no signal."""
    names = _reward_names(frame)
    if not names:
        raise _Skip("metrics CSV has no reward/<name>_mean column")
    fig, (ax, ax_zero) = _figure(1, 2)
    for name in names:
        column = f"{_REWARD_PREFIX}{name}_mean"
        data = frame[["step", column]].dropna()
        (line,) = ax.plot(data["step"], data[column], lw=1.5, marker="o" if len(data) <= 30 else None, ms=3, label=name)
        std = f"{_REWARD_PREFIX}{name}_std"
        if _has(frame, std):
            d = frame[["step", column, std]].dropna()
            ax.fill_between(d["step"], d[column] - d[std], d[column] + d[std], color=line.get_color(), alpha=0.12)
    ax.set_title("reward per function (unweighted mean ± std)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax_zero.set_title("groups with zero reward std (no learning signal)")
    if _has(frame, "zero_std_group_fraction"):
        _plot_series(ax_zero, frame, "zero_std_group_fraction", color="tab:red")
        ax_zero.set_ylim(-0.02, 1.02)
        ax_zero.set_xlabel("step")
        ax_zero.grid(alpha=0.3)
        ax_zero.legend(fontsize=8)
    else:
        _empty_panel(ax_zero, "no 'zero_std_group_fraction' column")
    return _save(fig, path)


def plot_reward_distributions(path: Path, rollout: dict | None, predictions: dict | None, window: int = 3) -> Path:
    """Histograms per reward function: first vs last ``window`` steps of the rollout samples, or
    (without them) base vs adapter over the predictions file."""
    if rollout and any(k != _LENGTHS for v in rollout.values() for k in v):
        first, last = _start_end(rollout, window)
        groups = {
            f"steps {first[0]}–{first[-1]}": _pool(rollout, first),
            f"steps {last[0]}–{last[-1]}": _pool(rollout, last),
        }
        title = "reward distributions: start vs end of training (rollout samples)"
    elif predictions:
        order = [m for m in ("base", "adapter") if m in predictions] + sorted(set(predictions) - {"base", "adapter"})
        groups = {m: predictions[m] for m in order}
        title = "reward distributions on the evaluation set: base vs trained"
    else:
        raise _Skip("no rollout reward samples (train.rollout_rewards_path) and no per-completion rewards in the predictions")
    names = sorted({n for g in groups.values() for n, v in g.items() if v}, key=lambda n: (n.startswith("total"), n))
    if not names:
        raise _Skip("the reward samples are all empty")
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = _figure(nrows, ncols, width=4.2 * ncols + 1, height_per_row=3.2)
    import numpy as np

    for ax, name in zip(axes, names):
        values = [np.asarray(g.get(name, []), dtype=float) for g in groups.values()]
        lo = min((v.min() for v in values if v.size), default=0.0)
        hi = max((v.max() for v in values if v.size), default=1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 21)
        for (label, _), v in zip(groups.items(), values):
            if v.size:
                # density, so start and end compare even with different sample counts
                ax.hist(v, bins=bins, alpha=0.5, density=True, label=f"{label} (n={v.size}, mean={v.mean():.3f})")
        ax.set_title(name)
        ax.set_xlabel("reward")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)


def _pool(rollout: dict[int, dict[str, list[float]]], steps: list[int]) -> dict[str, list[float]]:
    """Rewards of several steps pooled per function (``total`` shown as "total (weighted)")."""
    pooled: dict[str, list[float]] = {}
    for s in steps:
        for name, values in rollout[s].items():
            if name != _LENGTHS:
                pooled.setdefault("total (weighted)" if name == _TOTAL else name, []).extend(values)
    return pooled


def _start_end(rollout: dict[int, dict[str, list[float]]], window: int) -> tuple[list[int], list[int]]:
    """The first and last ``window`` steps (fewer when the run is short; they never overlap)."""
    steps = sorted(rollout)
    window = max(1, min(window, len(steps) // 2 or 1))
    return steps[:window], steps[-window:]


def plot_completion_lengths(frame, path: Path, rollout: dict | None = None, window: int = 3) -> Path:
    """Mean and max completion length (tokens) over steps, the share truncated at the length cap, and
    (with the rollout samples' ``completion_lengths``) the length distribution at the start vs the end."""
    if not any(_has(frame, c) for c in ("completion_length_mean", "completion_length_max", "truncated_fraction")):
        raise _Skip("metrics CSV has none of completion_length_mean, completion_length_max, truncated_fraction")
    import numpy as np

    lengths = {s: v[_LENGTHS] for s, v in (rollout or {}).items() if v.get(_LENGTHS)}
    fig, axes = _figure(1, 3 if lengths else 2, width=15 if lengths else 11)
    ax_len, ax_trunc = axes[:2]
    if lengths:
        first, last = _start_end(lengths, window)
        ax_hist = axes[2]
        every = [x for s in first + last for x in lengths[s]]
        bins = np.linspace(min(every), max(every) + 1, 21)  # shared bins: the two histograms compare
        for label, steps in ((f"steps {first[0]}–{first[-1]}", first), (f"steps {last[0]}–{last[-1]}", last)):
            pooled = [x for s in steps for x in lengths[s]]
            ax_hist.hist(pooled, bins=bins, alpha=0.5, density=True,
                         label=f"{label} (n={len(pooled)}, mean={sum(pooled) / len(pooled):.1f})")
        ax_hist.set_title("length distribution: start vs end (rollout samples)")
        ax_hist.set_xlabel("tokens")
        ax_hist.set_ylabel("density")
        ax_hist.legend(fontsize=8)
    for column, label in (("completion_length_mean", "mean"), ("completion_length_max", "max")):
        if _has(frame, column):
            _plot_series(ax_len, frame, column, label=label)
    ax_len.set_title("completion length (tokens)")
    ax_len.set_xlabel("step")
    ax_len.grid(alpha=0.3)
    if ax_len.lines:
        ax_len.legend(fontsize=8)
    else:
        _empty_panel(ax_len, "no completion length columns")
    ax_trunc.set_title("completions truncated at max_new_tokens")
    if _has(frame, "truncated_fraction"):
        _plot_series(ax_trunc, frame, "truncated_fraction", color="tab:red")
        ax_trunc.set_ylim(-0.02, 1.02)
        ax_trunc.set_xlabel("step")
        ax_trunc.grid(alpha=0.3)
        ax_trunc.legend(fontsize=8)
    else:
        _empty_panel(ax_trunc, "no 'truncated_fraction' column")
    return _save(fig, path)


def plot_ratio_clipping(frame, path: Path) -> Path:
    """Policy-ratio clipping: clip fractions (low/high), mean ratio, and KL to the reference, over steps."""
    if not any(_has(frame, c) for c in ("clip_fraction_low", "clip_fraction_high", "ratio_mean", "kl")):
        raise _Skip("metrics CSV has none of clip_fraction_low, clip_fraction_high, ratio_mean, kl")
    fig, (ax_clip, ax_ratio, ax_kl) = _figure(1, 3, width=14)
    for column, label in (("clip_fraction_low", "ρ < 1 − ε (A < 0)"), ("clip_fraction_high", "ρ > 1 + ε_high (A > 0)")):
        if _has(frame, column):
            _plot_series(ax_clip, frame, column, label=label)
    ax_clip.set_title("clipped token fraction")
    for ax, column, title in ((ax_ratio, "ratio_mean", "mean policy ratio ρ"), (ax_kl, "kl", "KL to reference (k3)")):
        ax.set_title(title)
        if _has(frame, column):
            _plot_series(ax, frame, column, color="tab:purple" if column == "kl" else "tab:green")
            if column == "ratio_mean":
                ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    for ax in (ax_clip, ax_ratio, ax_kl):
        if ax.lines:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        else:
            _empty_panel(ax, "no data")
    return _save(fig, path)


def plot_base_vs_trained(evaluation: dict[str, dict[str, dict]], path: Path) -> Path:
    """Grouped bars, base vs adapter, for :data:`EVAL_METRICS` with their 95% intervals: one column
    per split, plus one per split's ``random_subset`` (the records that are a random sample of the
    official split, reported apart: the rest are harder than average); a second row, when eval.json
    has them, holds the mean of each reward function."""
    import numpy as np

    present = {k for body in evaluation.values() for k in body}
    models = [m for m in _MODEL_BARS if m[0] in present]
    width = 0.8 / max(1, len(models))
    columns: list[tuple[str, dict, bool]] = []  # (title, {model: metrics}, is the full split)
    for split in sorted(evaluation):
        body = evaluation[split]
        columns.append((split, body, True))
        subset = {k: m["random_subset"] for k, m in body.items() if isinstance(m.get("random_subset"), dict)
                  and m["random_subset"].get("n") != m.get("n")}  # not when it is the whole set
        if not split.endswith("/pooled") and any(_is_finite_number(m.get(x)) for m in subset.values() for x in EVAL_METRICS):
            columns.append((f"{split}, random-sample records", subset, False))
    has_rewards = any(isinstance(m.get("rewards"), dict) and m["rewards"] for b in evaluation.values() for m in b.values())
    ncols = len(columns)
    fig, axes = _figure(2 if has_rewards else 1, ncols, width=max(6.5, 5.5 * ncols), height_per_row=3.8)
    for col, (title, body, full) in enumerate(columns):
        ax = axes[col]
        metrics = [m for m in EVAL_METRICS if any(_is_finite_number(body.get(k, {}).get(m)) for k, _, _ in models)]
        ax.set_title(f"{title}: accuracy (95% interval)")
        if not metrics:
            _empty_panel(ax, f"no {', '.join(EVAL_METRICS)} in eval.json")
        else:
            x = np.arange(len(metrics))
            for i, (key, label, color) in enumerate(models):
                if key not in body:
                    continue
                vals, errs = _values_and_errors(body[key], metrics)
                n = body[key].get("n")
                bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, yerr=errs, capsize=3, color=color,
                              label=f"{label}" + (f" (n={n})" if n else ""))
                ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
            ax.set_xticks(x, [m.replace("_", "\n") for m in metrics], fontsize=8)
            ax.set_ylim(0, 1.05)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
        if not has_rewards:
            continue
        ax_r = axes[ncols + col]
        if not full:
            ax_r.set_visible(False)  # eval.json keeps reward means for whole splits only
            continue
        names = sorted({n for k, _, _ in models for n in (body.get(k, {}).get("rewards") or {})})
        ax_r.set_title(f"{title}: mean reward per function")
        if not names:
            _empty_panel(ax_r, "no rewards in eval.json")
            continue
        x = np.arange(len(names))
        for i, (key, label, color) in enumerate(models):
            rewards = (body.get(key) or {}).get("rewards") or {}
            vals = [float(rewards[n]) if _is_finite_number(rewards.get(n)) else np.nan for n in names]
            if key in body:
                ax_r.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, color=color, label=label)
        ax_r.set_xticks(x, names, fontsize=8, rotation=20)
        ax_r.grid(axis="y", alpha=0.3)
        ax_r.legend(fontsize=8)
    fig.suptitle("the trained adapter with the facts a served question gets"
                 + (", the base model" if "base" in present else "")
                 + (", and the adapter with the gold facts (an oracle retriever)" if "adapter_gold_facts" in present else ""))
    return _save(fig, path)


def _values_and_errors(metrics: dict, names: list[str]):
    """Bar heights and asymmetric error bars ``(2, k)`` from ``<name>`` and ``<name>_ci`` = [lo, hi]."""
    import numpy as np

    vals, lower, upper = [], [], []
    for name in names:
        v = metrics.get(name)
        v = float(v) if _is_finite_number(v) else np.nan
        ci = metrics.get(f"{name}_ci")
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_finite_number(c) for c in ci) and math.isfinite(v):
            lower.append(max(0.0, v - float(ci[0])))
            upper.append(max(0.0, float(ci[1]) - v))
        else:
            lower.append(0.0)
            upper.append(0.0)
        vals.append(v)
    return vals, np.array([lower, upper])


def _placeholder(path: Path, title: str, note: str) -> Path:
    """A small image that says why a plot is empty (keeps dvc outputs present and never stale)."""
    fig, (ax,) = _figure(1, 1, width=7, height_per_row=2.4)
    ax.set_title(title)
    _empty_panel(ax, f"not plotted: {note}")
    ax.set_frame_on(False)
    return _save(fig, path, description=_PLACEHOLDER_TAG + note)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def plot_from_config(cfg: "Config", output_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write every plot of :data:`PLOT_FILES` into ``output_dir`` (default ``reports/plots``).

    Returns the paths written, in :data:`PLOT_FILES` order. Plots whose data is absent become
    placeholders (logged). Raises :class:`DataError` when neither the metrics CSV nor eval.json exists,
    or when an existing input is malformed.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; the Figure API below does not touch pyplot state either
    out_dir = Path(output_dir if output_dir is not None else PLOTS_DIR)
    metrics_path = Path(cfg.train.metrics_path)
    eval_path = Path(cfg.evaluate.output_path)
    # train.rollout_rewards_path when the config has it, else the file beside the metrics CSV
    rollout_path = Path(getattr(cfg.train, "rollout_rewards_path", None) or metrics_path.parent / ROLLOUT_REWARDS_FILE)
    predictions_path = Path(cfg.evaluate.predictions_path)
    if not metrics_path.exists() and not eval_path.exists():
        raise DataError(
            f"nothing to plot: neither {metrics_path} (run `fingrpo train`) nor {eval_path} (run `fingrpo evaluate`) exists"
        )
    frame = read_metrics_csv(metrics_path) if metrics_path.exists() else None
    evaluation = read_eval_json(eval_path) if eval_path.exists() else None
    rollout = read_rollout_rewards(rollout_path) if rollout_path.exists() else None
    predictions = read_prediction_rewards(predictions_path) if predictions_path.exists() else None

    def needs_frame(fn: Callable) -> Callable:
        def run(path: Path) -> Path:
            if frame is None:
                raise _Skip(f"{metrics_path} not found (run `fingrpo train`)")
            return fn(frame, path)
        return run

    def base_vs_trained(path: Path) -> Path:
        if evaluation is None:
            raise _Skip(f"{eval_path} not found (run `fingrpo evaluate`)")
        return plot_base_vs_trained(evaluation, path)

    builders: dict[str, Callable[[Path], Path]] = {
        "training_curves.png": needs_frame(plot_training_curves),
        "rewards_per_function.png": needs_frame(plot_rewards_per_function),
        "reward_distributions.png": lambda p: plot_reward_distributions(p, rollout, predictions),
        "completion_lengths.png": needs_frame(lambda f, p: plot_completion_lengths(f, p, rollout)),
        "ratio_clipping.png": needs_frame(plot_ratio_clipping),
        "base_vs_trained.png": base_vs_trained,
    }
    written = []
    for name in PLOT_FILES:
        path = out_dir / name
        try:
            written.append(builders[name](path))
        except _Skip as note:
            log.warning("plot %s skipped: %s", name, note)
            written.append(_placeholder(path, name.removesuffix(".png").replace("_", " "), str(note)))
    return written


def placeholder_note(path: str | os.PathLike) -> str | None:
    """The note of a placeholder PNG (stored in its ``Description`` text chunk), None for a real plot."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get("Description", "")
    return text[len(_PLACEHOLDER_TAG):] if text.startswith(_PLACEHOLDER_TAG) else None


__all__ = [
    "EVAL_METRICS", "PLOTS_DIR", "PLOT_FILES", "ROLLOUT_REWARDS_FILE", "plot_from_config", "read_eval_json",
    "placeholder_note", "read_metrics_csv", "read_prediction_rewards", "read_rollout_rewards",
]
