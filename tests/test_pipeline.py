"""fingrpo.pipeline: the stage functions' wiring (fakes for the library calls), and the DVC pipeline
on a tiny config in a throw-away repo (slow)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import fingrpo
from fingrpo import pipeline
from fingrpo.config import load_config
from fingrpo.errors import ConfigError, DataError, TrackingError

ROOT = Path(__file__).resolve().parents[1]


def fake_module(monkeypatch, dotted: str, **attrs) -> types.ModuleType:
    """Install a stand-in for ``fingrpo.<...>`` in sys.modules *and* as the parent package's attribute
    (``from fingrpo import tracking`` reads the attribute when the real module was imported before)."""
    mod = types.ModuleType(dotted)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, dotted, mod)
    parent_name, _, leaf = dotted.rpartition(".")
    parent = importlib.import_module(parent_name)  # the real package (cheap: its names resolve lazily)
    monkeypatch.setattr(parent, leaf, mod, raising=False)
    return mod


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, {
        "pipeline": {"reports_dir": str(tmp_path / "reports"), "train_summary_path": str(tmp_path / "reports/train.json")},
    })


class FakeTracking:
    """Records the order of calls across the fake tracking and trainer modules."""

    def __init__(self, monkeypatch, check_error: Exception | None = None):
        self.calls: list[tuple] = []
        calls = self.calls

        class MLflowCallback:
            def __init__(self, cfg):
                calls.append(("MLflowCallback", cfg.tracking.experiment_name))

        def check_tracking(cfg):
            calls.append(("check_tracking",))
            if check_error is not None:
                raise check_error

        self.callback_cls = MLflowCallback
        fake_module(
            monkeypatch, "fingrpo.tracking.runs",
            MLflowCallback=MLflowCallback, check_tracking=check_tracking,
            callbacks_from_config=lambda cfg: [MLflowCallback(cfg)] if cfg.tracking.enabled else [],
            log_evaluation=lambda cfg, result: calls.append(("log_evaluation", result)),
            log_plots=lambda cfg, paths: calls.append(("log_plots", list(paths))),
        )
        fake_module(monkeypatch, "fingrpo.tracking.registry",
                    register_from_config=lambda cfg, evaluate_champion=None: calls.append(("promote",)) or {"promoted": True})

        def train_from_config(cfg, resume=False, callbacks=()):
            calls.append(("train", resume, list(callbacks)))
            return {"steps": 3, "reward_mean": 0.25, "loss": float("nan"), "final": {"reward_std": 0.5},
                    "output_dir": "models/adapter", "ok": True}

        fake_module(monkeypatch, "fingrpo.grpo.trainer", train_from_config=train_from_config)


def test_train_stage_checks_tracking_first_then_trains_with_the_mlflow_callback(monkeypatch, cfg):
    fake = FakeTracking(monkeypatch)
    summary = pipeline.train_stage(cfg, resume=True)

    names = [c[0] for c in fake.calls]
    assert names == ["check_tracking", "MLflowCallback", "train"]
    _, resume, callbacks = fake.calls[-1]
    assert resume is True
    assert len(callbacks) == 1 and isinstance(callbacks[0], fake.callback_cls)
    assert summary["output_dir"] == "models/adapter"
    # the dvc metrics file keeps finite numbers only (NaN is not JSON; strings and bools are not metrics)
    written = json.loads(Path(cfg.pipeline.train_summary_path).read_text())
    assert written["steps"] == 3 and written["reward_mean"] == 0.25 and written["final"] == {"reward_std": 0.5}
    assert "loss" not in written and "output_dir" not in written and "ok" not in written
    assert written["wall_seconds"] >= 0


def test_a_fresh_training_drops_an_earlier_runs_checkpoints_and_resume_keeps_them(monkeypatch, cfg, tmp_path):
    FakeTracking(monkeypatch)
    ckpt = tmp_path / "ckpt"
    for name in ("step-20", "step-5"):
        (ckpt / name).mkdir(parents=True)
    (ckpt / "notes.txt").write_text("mine")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"checkpoint_dir": str(ckpt)})})

    pipeline.train_stage(cfg, resume=True)
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes.txt", "step-20", "step-5"]
    pipeline.train_stage(cfg, resume=False)
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes.txt"]


def test_unreachable_tracking_fails_before_any_training(monkeypatch, cfg):
    fake = FakeTracking(monkeypatch, check_error=TrackingError("http://127.0.0.1:5000: connection refused"))
    with pytest.raises(TrackingError, match="connection refused"):
        pipeline.train_stage(cfg)
    assert [c[0] for c in fake.calls] == ["check_tracking"]
    assert not Path(cfg.pipeline.train_summary_path).exists()


def test_train_stage_without_tracking_passes_no_callbacks(monkeypatch, cfg):
    fake = FakeTracking(monkeypatch)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})
    pipeline.train_stage(cfg)
    assert fake.calls == [("train", False, [])]


def test_evaluate_and_plot_stages_hand_their_results_to_tracking(monkeypatch, cfg, tmp_path):
    fake = FakeTracking(monkeypatch)
    result = {"dev": {"adapter": {"execution_accuracy": 0.5}}}
    seen = {}

    def evaluate_from_config(c, adapter_dir=None, base_only=False):
        seen["adapter_dir"], seen["base_only"] = adapter_dir, base_only
        return result

    fake_module(monkeypatch, "fingrpo.evaluate", evaluate_from_config=evaluate_from_config)
    fake_module(monkeypatch, "fingrpo.plots",
                plot_from_config=lambda c, output_dir=None: [str(Path(output_dir) / "a.png")])
    cfg = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"plots_dir": str(tmp_path)})})

    assert pipeline.evaluate_stage(cfg, adapter_dir="somewhere") is result
    assert seen["adapter_dir"] == "somewhere" and seen["base_only"] is False
    assert pipeline.plot_stage(cfg) == [tmp_path / "a.png"]
    assert fake.calls == [("log_evaluation", result), ("log_plots", [tmp_path / "a.png"])]


def test_register_stage_needs_tracking(monkeypatch, cfg):
    fake = FakeTracking(monkeypatch)
    assert pipeline.register_stage(cfg) == {"promoted": True}
    off = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})
    with pytest.raises(ConfigError, match="tracking.enabled"):
        pipeline.register_stage(off)
    assert fake.calls == [("promote",)]


def test_validate_stage_defaults_to_the_three_splits_and_the_reports_dir(monkeypatch, cfg):
    seen = {}

    def run_validation(files, report_dir="reports", data_docs=True):
        seen.update(files=files, report_dir=report_dir, data_docs=data_docs)
        return 1

    fake_module(monkeypatch, "fingrpo.data.validate", run_validation=run_validation)
    assert pipeline.validate_stage(cfg) == 1
    assert seen == {"files": pipeline.data_files(cfg), "report_dir": cfg.pipeline.reports_dir, "data_docs": True}
    with pytest.raises(DataError, match="validation.json"):
        pipeline.require_valid(cfg, ["x.json"])
    assert seen["files"] == ["x.json"]


# --------------------------------------------------------------------------------------------------
# DVC: a second `dvc repro` does nothing; a train param re-runs train and what follows, not validate.

def _small_split(src: Path, dst: Path, n: int) -> None:
    records = json.loads(src.read_text(encoding="utf-8"))[:n]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(records), encoding="utf-8")


def make_tiny_project(root: Path, data_dir: Path, model_path: Path) -> dict:
    """A throw-away git + DVC repo with this project's code, dvc.yaml, tiny data and a tiny config.

    Returns the environment to run `dvc` / `fingrpo` in (PATH has the venv; MLflow on a SQLite file).
    """
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "fingrpo", root / "fingrpo", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    for split, n in (("train", 6), ("dev", 4), ("test", 4)):
        _small_split(data_dir / f"{split}.json", root / "data/finqa" / f"{split}.json", n)
    shutil.copy(data_dir / "provenance.json", root / "data/finqa/provenance.json")
    tatqa = json.loads((data_dir.parent / "tatqa" / "tatqa_dataset_dev.json").read_text(encoding="utf-8"))[:30]
    (root / "data/tatqa").mkdir(parents=True)
    (root / "data/tatqa/tatqa_dataset_dev.json").write_text(json.dumps(tatqa), encoding="utf-8")

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(name_or_path=str(model_path))
    params["prompt"].update(few_shot=0, max_prompt_tokens=256)  # retrieved, with the cross-encoder: the stage runs
    params["retriever"].update(epochs=0.5, candidates=6, max_length=64)
    params["train"].update(max_steps=2, prompts_per_step=1, group_size=2, max_new_tokens=8, warmup_steps=0,
                           save_interval=1, eval_interval=2, eval_subset_size=2, num_samples_to_log=0)
    params["sft"].update(epochs=1, batch_size=3)
    params["evaluate"].update(max_records=2, max_new_tokens=8, batch_size=2, bootstrap_samples=10, compare_base=True)
    params["pipeline"].update(data_docs=False)
    params["prepare"].update(dev_fraction=0.3)
    params["data"]["train_sources"][1]["max_records"] = 3  # 6 FinQA + 3 TAT-QA records
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "tiny project"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=120)
    return env


def _dvc(root: Path, env: dict, *args: str, timeout: int = 900) -> str:
    proc = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> set[str]:
    """Stage names `dvc repro` actually ran (it prints "Running stage 'x':")."""
    import re

    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.slow
def test_dvc_pipeline_reproduces_incrementally(tmp_path, data_dir, tiny_model_path):
    root = tmp_path / "proj"
    env = make_tiny_project(root, data_dir, tiny_model_path)

    first = _dvc(root, env, "repro")
    assert _ran(first) == {"prepare", "validate", "retriever", "sft", "train", "evaluate_base", "evaluate", "plot",
                           "register"}
    for rel in ("reports/prepare.json", "prepared/tatqa_train.json", "prepared/tatqa_dev.json", "reports/validation.json", "reports/sft.json", "models/sft/adapter_model.safetensors", "reports/train.json", "reports/train_metrics.csv", "reports/eval.json",
                "reports/predictions.jsonl", "reports/promotion.json", "models/adapter", "reports/retriever.json",
                "models/retriever/head.safetensors", "models/retriever/rankings.json"):
        assert (root / rel).exists(), rel
    assert list((root / "reports/plots").glob("*.png"))

    second = _dvc(root, env, "repro")
    assert _ran(second) == set(), second
    assert "Data and pipelines are up to date" in _dvc(root, env, "status")

    shown = json.loads(_dvc(root, env, "metrics", "show", "--json"))
    metrics = json.dumps(shown)
    assert "execution_accuracy" in metrics and "train.reward_mean" in metrics and "sft.peak_rss_mb" in metrics
    # the declared metrics are the headline figures only: few columns for `dvc exp show`, no ids, no details
    files = {f: v["data"] for f, v in shown[""]["data"].items()}
    assert set(files) == {f"reports/metrics/{n}.json" for n in ("retriever", "sft", "train", "eval", "promotion")}
    columns = [k for body in files.values() for k in body]
    assert 10 <= len(columns) <= 30, columns
    assert not any("final_metrics" in k or "run_id" in k or k.endswith(".n") for k in columns), columns
    plots = json.loads(_dvc(root, env, "plots", "show", "--json"))["data"]
    assert "training curves" in plots and any(k.endswith("training_curves.png") for k in plots)

    # the baseline is committed (dvc.lock; metrics live in the DVC cache)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=120)

    # a train knob, as an experiment: train and everything downstream re-run, validate does not
    third = _dvc(root, env, "exp", "run", "-S", "train.learning_rate=0.0005")
    assert not {"prepare", "validate", "retriever", "sft", "evaluate_base"} & _ran(third), third  # not downstream
    summary = json.loads((root / "reports/eval.json").read_text())["summary"]
    assert summary["base_from"] == "reports/predictions_base.jsonl"  # the base figures: from its cached stage
    assert summary["dev.pooled.base.execution_accuracy"] is not None
    assert {"train", "evaluate", "register"} <= _ran(third), third
    assert "train.learning_rate" in _dvc(root, env, "params", "diff")
    assert "0.0005" in (root / "params.yaml").read_text()
    # metrics of both sides are readable: HEAD's from the cache, the experiment's from the workspace
    diff = json.loads(_dvc(root, env, "metrics", "diff", "--all", "--json"))
    eval_diff = diff["reports/metrics/eval.json"]["dev.pooled.adapter.execution_accuracy"]
    assert eval_diff["old"] is not None and eval_diff["new"] is not None
    assert "train.reward_mean" in diff["reports/metrics/train.json"]
    exp_show = json.dumps(json.loads(_dvc(root, env, "exp", "show", "--json")))
    assert "0.0005" in exp_show and "execution_accuracy" in exp_show


def test_needs_prepare_when_a_source_or_set_is_a_prepared_file(tmp_path):
    recipe = load_config(ROOT / "params.yaml")
    assert pipeline.needs_prepare(recipe)  # the recipe trains and evaluates on prepared TAT-QA files
    assert not pipeline.needs_prepare(load_config(None))  # FinQA alone
    moved = load_config(ROOT / "params.yaml", {"prepare": {"output_dir": str(tmp_path / "elsewhere")}})
    assert not pipeline.needs_prepare(moved)  # the files named are not that stage's outputs


def test_prepare_stage_names_an_empty_split(tmp_path, monkeypatch):
    """A TAT-QA file whose every table falls on one side cannot give both splits: a clear DataError."""
    src = ROOT / "data" / "tatqa" / "tatqa_dataset_dev.json"
    small = tmp_path / "one.json"
    small.write_text(json.dumps(json.loads(src.read_text())[:1]))
    cfg = load_config(None, {"prepare": {"dev_fraction": 0.0, "report_path": str(tmp_path / "prepare.json")}})
    with pytest.raises(DataError, match="the dev split of .* has no converted question"):
        pipeline.prepare_stage(cfg, input_path=str(small), output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "prepare.json").exists()
