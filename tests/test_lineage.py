"""Retraining only on something new (fingrpo.lineage): the fingerprint's parts, the lookup among the
registered versions (a real SQLite MLflow store), `fingrpo check-new`'s exit codes, `dvc pull` errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fingrpo import cli, lineage
from fingrpo.config import load_config
from fingrpo.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def _cfg(tmp: Path, **sections):
    tree = {"register": {"model_name": "fingrpo-lineage-test"},
            "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "retry_backoff_s": 0.0},
            "pipeline": {"reports_dir": str(tmp / "reports")}}
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return load_config(None, tree)


def test_the_params_part_ignores_where_results_go_and_follows_what_is_trained(tmp_path):
    base = lineage.params_md5(_cfg(tmp_path))
    assert lineage.params_md5(_cfg(tmp_path, tracking={"experiment_name": "elsewhere"},
                                   register={"alpha": 0.2}, pipeline={"data_docs": False})) == base
    assert lineage.params_md5(_cfg(tmp_path, train={"learning_rate": 1e-4})) != base
    assert lineage.params_md5(_cfg(tmp_path, data={"train_path": "other.json"})) != base


def test_the_data_and_code_parts(tmp_path):
    shutil.copy(SHARED / "data" / "data-v1.dvc", tmp_path / "data.dvc")
    cfg = _cfg(tmp_path)
    v1 = lineage.fingerprint(cfg, tmp_path)
    assert v1.data.startswith("ec76a117") and v1.value == lineage.fingerprint(cfg, tmp_path).value
    shutil.copy(SHARED / "data" / "data.dvc", tmp_path / "data.dvc")
    v2 = lineage.fingerprint(cfg, tmp_path)
    assert v2.data.startswith("404b986d") and v2.value != v1.value and v2.params == v1.params
    (tmp_path / "data.dvc").unlink()  # no pointer: the configured data files' bytes
    train = tmp_path / "train.json"
    train.write_text("[]")
    files_cfg = _cfg(tmp_path, data={"train_path": str(train), "train_sources": None, "eval_sets": None})
    plain = lineage.fingerprint(files_cfg, tmp_path).data
    assert plain.startswith("files:") and plain == lineage.fingerprint(files_cfg, tmp_path).data
    train.write_text("[ ]")
    assert lineage.fingerprint(files_cfg, tmp_path).data != plain

    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    before = lineage.code_md5(pkg)
    (pkg / "sub" / "b.py").write_text("y = 3\n")  # an uncommitted edit counts
    assert lineage.code_md5(pkg) != before
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    (pkg / "notes.md").write_text("docs do not count")
    assert lineage.code_md5(pkg) == before


def _register_version(cfg, fingerprint_value: str | None) -> str:
    from mlflow import MlflowClient

    uri = cfg.tracking.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = cfg.register.model_name
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, source=f"file://{Path(uri.split(':///', 1)[1]).parent}/m").version
    if fingerprint_value is not None:
        client.set_model_version_tag(name, version, lineage.TAG, fingerprint_value)
    return str(version)


def test_check_new_finds_a_trained_fingerprint_and_force_overrides_it(tmp_path, monkeypatch):
    from fingrpo.tracking.client import Tracker

    shutil.copy(SHARED / "data" / "data-v1.dvc", tmp_path / "data.dvc")
    cfg = _cfg(tmp_path)
    first = lineage.check_new(cfg, Tracker(cfg), pull=False, root=tmp_path)
    assert first["new"] and not first["forced"] and first["trained_as"] == [] and "new: no version" in first["reason"]

    _register_version(cfg, "another-fingerprint")
    assert lineage.check_new(cfg, Tracker(cfg), pull=False, root=tmp_path)["new"]
    version = _register_version(cfg, first["fingerprint"])
    again = lineage.check_new(cfg, Tracker(cfg), pull=False, root=tmp_path)
    assert not again["new"] and again["trained_as"][0]["version"] == version
    assert again["reason"].startswith("nothing new") and f"fingrpo-lineage-test v{version}" in again["reason"]
    assert json.loads((tmp_path / "reports" / "lineage.json").read_text()) == again
    forced = lineage.check_new(cfg, Tracker(cfg), force=True, pull=False, root=tmp_path)
    assert forced["new"] and forced["forced"] and "retraining anyway" in forced["reason"]
    assert lineage.check_new(cfg, None, pull=False, root=tmp_path)["new"]  # tracking disabled: always new

    # the CLI DVC users call before `dvc repro`: exit 3 = nothing new
    monkeypatch.chdir(tmp_path)
    args = ["check-new", "--params", str(ROOT / "params.yaml"), "--no-pull",
            "--set", f"tracking.tracking_uri={cfg.tracking.tracking_uri}", "--set", "register.model_name=fingrpo-lineage-test",
            "--set", f"pipeline.reports_dir={tmp_path / 'reports'}"]
    assert cli.main(args) == 0  # params.yaml's config is not the one registered above
    _register_version(cfg, json.loads((tmp_path / "reports" / "lineage.json").read_text())["fingerprint"])
    assert cli.main(args) == lineage.NOTHING_NEW_EXIT == 3
    assert cli.main(args + ["--force"]) == 0


def test_pull_data_names_the_pointer_and_dvcs_error(tmp_path):
    with pytest.raises(DataError, match=r"data.dvc: no DVC pointer to pull"):
        lineage.pull_data(tmp_path)
    shutil.copy(SHARED / "data" / "data-v1.dvc", tmp_path / "data.dvc")  # a pointer, but no DVC repository here
    with pytest.raises(DataError, match=r"`dvc pull data.dvc` failed \(exit \d+\): .+check the DVC remote"):
        lineage.pull_data(tmp_path)
    assert not (tmp_path / "data").exists()  # nothing half-pulled
