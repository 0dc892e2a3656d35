"""Team mode for real (slow): ``flows/team.sh up`` starts PostgreSQL, an MLflow server whose backend
store is on it, a Prefect server whose database is on it, a ``process`` work pool and a worker, all on
loopback; ``flows/deploy.py --pool`` puts the ``retrain`` deployment on the pool; runs are triggered
with ``prefect deployment run`` exactly as the README says, in a copy of this project (its own git
repo and DVC cache, the shared DVC remote), with the tiny fixture model.

The story: data version 1 -> run -> champion v1; run again -> "nothing new", no new version; the data
engineer commits data version 2's pointer -> run -> challenger v2 with the new data hash, the champion
re-evaluated on v2's records and moved or kept with the reason; a run on bad data -> Failed with the
file, rule and record, the worker still up. Then the MLflow server is killed during a run (brought back
inside the retry window: the run completes, every metric logged once; killed for good: the run ends
Failed before promotion, champion untouched), and no credential of either URI leaks anywhere.
Every server process is stopped by process group at the end, pass or fail (``flows/team.sh down``).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_serve import _post, _wait_http

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BIN = Path(sys.executable).parent
POOL = "fingrpo-team-test"
DEPLOYMENT = "retrain/scheduled-retrain"
MODEL = "fingrpo-finqa"
MLFLOW_SECRET = "mlflow-Secret-7f3a"  # the credential in the MLflow URI the clients use
V1, V2 = "ec76a117", "404b986d"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sh(cmd: list[str], cwd: Path, env: dict, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _tiny_params(project: Path, model: Path) -> None:
    """The project's params.yaml, made tiny the way a team would commit a smoke-test config."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(train_sources=None, eval_sets=None)  # FinQA alone: data version 1 has no TAT-QA
    params["train"]["train_sources"] = None
    params["model"]["name_or_path"] = str(model)
    params["prompt"].update(few_shot=0, max_prompt_tokens=256, retriever="lexical")  # the retriever: test_serve, test_flow
    params["sft"].update(epochs=1, batch_size=16)
    params["train"].update(max_steps=2, prompts_per_step=1, group_size=2, max_new_tokens=8, warmup_steps=0,
                           save_interval=1, eval_interval=2, eval_subset_size=2, max_train_records=16)
    params["evaluate"].update(max_records=6, max_new_tokens=8, batch_size=6, bootstrap_samples=10)
    params["pipeline"]["data_docs"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _git(project: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=data-engineer", "-c", "user.email=de@example.com", *args],
                   cwd=project, check=True, capture_output=True)


def _copy_project(dst: Path, model: Path) -> Path:
    """This checkout's files (tracked + new, as on disk) in a new git repo with data version 1's pointer."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    shutil.copy(SHARED / "data" / "data-v1.dvc", dst / "data.dvc")
    _tiny_params(dst, model)
    _git(dst, "init", "-q")
    _git(dst, "add", "-A")
    _git(dst, "commit", "-q", "-m", "project at data version 1")
    subprocess.run([str(BIN / "dvc"), "remote", "modify", "--local", "storage", "url", str(SHARED / "dvc-store")],
                   cwd=dst, check=True, capture_output=True)
    return dst


class Team:
    """The servers of ``flows/team.sh`` for one test module, and the helpers the story needs."""

    def __init__(self, project: Path, team_dir: Path):
        self.project, self.dir = project, team_dir
        self.ports = {"pg": _free_port(), "mlflow": _free_port(), "prefect": _free_port()}
        self.mlflow_plain = f"http://127.0.0.1:{self.ports['mlflow']}"
        self.base_env = {
            **os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FINGRPO_BIN": str(BIN),
            "FINGRPO_TEAM_DIR": str(team_dir), "FINGRPO_POOL": POOL, "FINGRPO_PG_PORT": str(self.ports["pg"]),
            "FINGRPO_MLFLOW_PORT": str(self.ports["mlflow"]), "FINGRPO_PREFECT_PORT": str(self.ports["prefect"]),
            "FINGRPO_MLFLOW_URI": f"http://team:{MLFLOW_SECRET}@127.0.0.1:{self.ports['mlflow']}",
            "PREFECT_UI_ENABLED": "false", "OMP_NUM_THREADS": "1", "FINGRPO_RETRY_DELAY_S": "2",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        }
        for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME"):
            self.base_env.pop(key, None)

    def up(self) -> None:
        _sh(["bash", "flows/team.sh", "up"], self.project, self.base_env, timeout=400)

    def down(self) -> None:
        subprocess.run(["bash", "flows/team.sh", "down"], cwd=self.project, env=self.base_env, timeout=120,
                       capture_output=True)

    @property
    def env(self) -> dict:
        """``source .team/env``: the client side of the README's commands."""
        env = dict(self.base_env)
        for line in (self.dir / "env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value.strip("'")
        return env

    def pid(self, name: str) -> int:
        return int((self.dir / f"{name}.pid").read_text())

    def alive(self, name: str) -> bool:
        try:
            os.kill(self.pid(name), 0)
            return True
        except (OSError, ValueError):
            return False

    def pg_password(self) -> str:
        return (Path((self.dir / "pgdata").read_text().strip()) / ".pw").read_text().strip()

    def client(self):
        from mlflow import MlflowClient

        uri = self.env["MLFLOW_TRACKING_URI"]
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def versions(self) -> list[str]:
        return sorted((str(v.version) for v in self.client().search_model_versions(f"name='{MODEL}'")), key=int)

    def champion(self) -> str:
        return str(self.client().get_model_version_by_alias(MODEL, "champion").version)

    def trigger(self, *params: str, timeout: int = 540) -> str:
        """``prefect deployment run ... --watch``; returns its output (the final state is in it)."""
        cmd = [str(BIN / "prefect"), "deployment", "run", DEPLOYMENT, "--watch", "--watch-timeout", str(timeout)]
        for p in params:
            cmd += ["--param", p]
        proc = _sh(cmd, self.project, self.env, timeout=timeout + 60, check=False)
        return proc.stdout + proc.stderr

    def _api(self, coroutine_fn):
        """Run ``coroutine_fn(client)`` against the team's Prefect server."""
        import asyncio

        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        async def call():
            async with get_client() as client:
                return await coroutine_fn(client)

        with temporary_settings({PREFECT_API_URL: self.env["PREFECT_API_URL"]}):
            return asyncio.run(call())

    def flow_runs(self) -> list:
        """Every flow run of the server, oldest first, with its state."""
        async def read(client):
            return sorted(await client.read_flow_runs(), key=lambda r: r.created)

        return self._api(read)

    def logs_of(self, flow_run_id) -> str:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        async def read(client):
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            return "\n".join(log.message for log in logs)

        return self._api(read)

    def report(self, name: str) -> dict:
        return json.loads((self.project / "reports" / name).read_text())


@pytest.fixture(scope="module")
def team(tmp_path_factory, tiny_model_path):
    shutil.which("runuser") or pytest.fail("runuser (util-linux) is needed to start PostgreSQL as root")
    work = tmp_path_factory.mktemp("team")
    project = _copy_project(work / "project", tiny_model_path)
    t = Team(project, work / "team")
    try:
        t.up()
        _sh([sys.executable, "flows/deploy.py", "--pool", POOL, "--cron", "0 3 * * 1"], project, t.env, timeout=180)
        yield t
    finally:
        t.down()
        shutil.rmtree(Path((t.dir / "pgdata").read_text().strip()), ignore_errors=True) \
            if (t.dir / "pgdata").is_file() else None


def test_the_team_story_new_data_nothing_new_and_a_gate_that_compares_like_with_like(team):
    # 0. the servers: MLflow's backend store and Prefect's database are the PostgreSQL databases
    import psycopg

    pg = f"postgresql://fingrpo:{team.pg_password()}@127.0.0.1:{team.ports['pg']}"
    inspect = _sh([str(BIN / "prefect"), "deployment", "inspect", DEPLOYMENT], team.project, team.env).stdout
    assert POOL in inspect and "0 3 * * 1" in inspect

    # 1. data version 1 -> the first run -> champion v1
    out = team.trigger()
    assert "Completed" in out, out[-3000:]
    assert team.versions() == ["1"] and team.champion() == "1"
    v1 = team.client().get_model_version(MODEL, "1")
    assert v1.tags["fingrpo.data_md5"].startswith(V1) and v1.tags["fingrpo.fingerprint.data"].startswith(V1)
    with psycopg.connect(pg + "/mlflow") as conn:  # the registry lives in PostgreSQL
        assert conn.execute("SELECT count(*) FROM model_versions WHERE name = %s", (MODEL,)).fetchone()[0] == 1
    with psycopg.connect(pg + "/prefect") as conn:  # ... and so do Prefect's flow runs
        assert conn.execute("SELECT count(*) FROM flow_run").fetchone()[0] >= 1

    # 2. the same data, params and code again -> "nothing new": nothing trained, no new version
    out = team.trigger()
    assert "Completed" in out, out[-3000:]
    lineage = team.report("lineage.json")
    assert not lineage["new"] and "nothing new" in lineage["reason"] and lineage["trained_as"][0]["version"] == "1"
    assert team.versions() == ["1"]
    assert "nothing new" in team.logs_of(team.flow_runs()[-1].id)

    # 3. the data engineer commits data version 2's pointer -> a challenger on the new data
    shutil.copy(SHARED / "data" / "data.dvc", team.project / "data.dvc")
    _git(team.project, "commit", "-q", "-am", "data version 2")
    out = team.trigger()
    assert "Completed" in out, out[-3000:]
    assert team.versions() == ["1", "2"]
    v2 = team.client().get_model_version(MODEL, "2")
    assert v2.tags["fingrpo.data_md5"].startswith(V2) and v2.tags["fingrpo.gate_data_md5"].startswith(V2)
    promotion = team.report("promotion.json")
    gate = promotion["gate"]
    # the champion was measured on data version 1: it is measured again on the challenger's records
    assert gate["champion_reevaluated"] and gate["champion_as_registered"]["data_md5"].startswith(V1)
    assert gate["champion"]["set_md5"] == gate["challenger"]["set_md5"] and gate["champion"]["data_md5"].startswith(V2)
    assert promotion["decision"] in ("promoted", "kept") and "re-evaluated" in promotion["reason"]
    assert team.champion() == ("2" if promotion["decision"] == "promoted" else "1")
    assert v2.tags["fingrpo.gate_decision"] == promotion["decision"]
    print(f"data v2: {promotion['decision']}: {promotion['reason']}")

    # 4. bad data -> the run ends Failed naming the file, rule and record; the worker survives it
    bad = team.project / "bad" / "dev.json"
    bad.parent.mkdir()
    records = json.loads((team.project / "data" / "finqa" / "dev.json").read_text())[:3]
    del records[1]["qa"]["program"]
    bad.write_text(json.dumps(records))
    out = team.trigger('overrides={"data": {"dev_path": "bad/dev.json"}}')
    assert "Failed" in out, out[-3000:]
    failed = team.flow_runs()[-1]
    assert failed.state.is_failed()
    message = failed.state.message or ""
    assert "bad/dev.json" in message and records[1]["id"] in message, message
    assert team.alive("worker")
    assert team.versions() == ["1", "2"]


def _csv_steps(path: Path) -> list[int]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [int(float(r["step"])) for r in csv.DictReader(f) if r.get("step")]


def _run_with_mlflow_killed(team: Team, bring_back: bool, steps: int = 8) -> tuple[subprocess.CompletedProcess, str]:
    """One in-process flow run (``python flows/retrain.py``, recorded on the team's Prefect server) whose
    MLflow server is SIGKILLed (its process group) after the second training step; restarted with
    ``flows/team.sh up`` 3 s later when ``bring_back``."""
    env = {**team.env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
    metrics = team.project / "reports" / "train_metrics.csv"
    metrics.unlink(missing_ok=True)
    # brought back: a retry window (1+2+4+8+16 s, each attempt after MLflow's own retry) that outlasts the
    # restart; for good: a short one, the run is to fail
    retries = 6 if bring_back else 2
    cmd = [sys.executable, "flows/retrain.py", "--force", "--no-pull", "--set", f"train.max_steps={steps}",
           "--set", "train.save_interval=2", "--set", f"tracking.retries={retries}", "--set", "tracking.retry_backoff_s=1"]
    log = team.dir / f"killed-run-{int(bring_back)}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=team.project, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while len(_csv_steps(metrics)) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "training never reached step 2"
            time.sleep(0.2)
        os.killpg(team.pid("mlflow"), signal.SIGKILL)
        if bring_back:
            time.sleep(3)
            team.up()  # starts what is not running: the MLflow server, on the same store and port
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode), log.read_text()


def test_mlflow_killed_and_brought_back_during_a_run_loses_nothing(team):
    before = team.versions()
    proc, log = _run_with_mlflow_killed(team, bring_back=True)
    assert proc.returncode == 0, log[-4000:]
    run_id = team.report("mlflow_run.json")["run_id"]
    client = team.client()
    steps = _csv_steps(team.project / "reports" / "train_metrics.csv")
    assert steps == list(range(1, 9))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    per_step = [k for k in run.data.metrics if k.startswith("loss") or k.startswith("reward")]
    assert per_step, sorted(run.data.metrics)
    for key in per_step:
        history = [m.step for m in client.get_metric_history(run_id, key)]
        if len(history) > 1:  # a per-step metric: every step there, once
            assert sorted(history) == steps, (key, sorted(history))
    assert team.versions() == before + [str(int(before[-1]) + 1)]  # registered after the outage
    assert team.report("promotion.json")["challenger"]["run_id"] == run_id


def test_mlflow_killed_for_good_fails_the_run_before_promotion(team):
    before_versions, before_champion = team.versions(), team.champion()
    promotion = team.project / "reports" / "promotion.json"
    stamp = promotion.stat().st_mtime_ns
    try:
        proc, log = _run_with_mlflow_killed(team, bring_back=False, steps=6)
        assert proc.returncode != 0, log[-4000:]
        assert "Tracking" in log or "MLflow" in log
        assert promotion.stat().st_mtime_ns == stamp  # register never ran
        last = team.flow_runs()[-1]
        assert last.state.is_failed(), last.state
    finally:
        team.up()
    assert team.versions() == before_versions and team.champion() == before_champion


def test_the_champion_answers_through_mlflow_models_serve_from_the_team_server(team):
    """`mlflow models serve -m models:/fingrpo-finqa@champion` against the team's MLflow server."""
    rec = json.loads((team.project / "data" / "finqa" / "dev.json").read_text())[0]
    port = _free_port()
    log = team.dir / "models-serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                cwd=team.project, env=team.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)

    try:
        _wait_http(f"http://127.0.0.1:{port}/ping", proc, log, timeout=240)
        row = {"id": rec["id"], "question": rec["qa"]["question"], "pre_text": rec["pre_text"],
               "post_text": rec["post_text"], "table": rec["table"], "gold_inds": rec["qa"]["gold_inds"]}
        ok, bad = _post(port, [row]), _post(port, [{"question": 5}])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert ok[0] == 200 and ok[1]["predictions"][0]["id"] == rec["id"], ok
    assert isinstance(ok[1]["predictions"][0]["completion"], str)
    assert bad[0] == 400 and "input row 0: question" in bad[1]["message"]


def test_no_credential_leaks_into_params_tags_artifacts_logs_or_states(team):
    import psycopg
    from mlflow import MlflowClient

    secrets = [MLFLOW_SECRET, team.pg_password()]
    # one more run whose tracking URI is the PostgreSQL database itself, password in it (no MLflow server)
    pg = f"postgresql://fingrpo:{team.pg_password()}@127.0.0.1:{team.ports['pg']}"
    with psycopg.connect(pg + "/postgres", autocommit=True) as conn:
        conn.execute('CREATE DATABASE "mlflow_direct"')
    direct = pg.replace("postgresql://", "postgresql+psycopg://") + "/mlflow_direct"
    proc = _sh([sys.executable, "flows/retrain.py", "--force", "--no-pull"], team.project,
               {**team.env, "MLFLOW_TRACKING_URI": direct}, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    texts: list[tuple[str, str]] = [("direct run output", proc.stdout + proc.stderr)]
    for client in (team.client(), MlflowClient(tracking_uri=direct, registry_uri=direct)):
        for exp in client.search_experiments():
            for run in client.search_runs([exp.experiment_id], max_results=1000):
                texts.append((f"run {run.info.run_id} params/tags", json.dumps([run.data.params, run.data.tags])))
        for v in client.search_model_versions(f"name='{MODEL}'"):
            texts.append((f"version {v.version} tags", json.dumps(v.tags)))
    direct_client = MlflowClient(tracking_uri=direct, registry_uri=direct)
    assert len(direct_client.search_model_versions(f"name='{MODEL}'")) == 1  # registered there, first version
    for folder in (team.dir / "mlartifacts", team.project / "mlruns", team.project / "mlartifacts"):
        for path in folder.rglob("*") if folder.is_dir() else ():
            if path.is_file():
                texts.append((str(path), path.read_bytes().decode("utf-8", "replace")))
    for path in (team.project / "reports").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".csv", ".md", ".html", ".txt"):
            texts.append((str(path), path.read_text(errors="replace")))
    runs = team.flow_runs()
    assert len(runs) >= 7
    for fr in runs:
        texts.append((f"flow run {fr.name} logs", team.logs_of(fr.id)))
        texts.append((f"flow run {fr.name} state", f"{fr.state.name} {fr.state.message}"))
        texts.append((f"flow run {fr.name} parameters", json.dumps(fr.parameters, default=str)))
    leaks = [(where, s) for where, text in texts for s in secrets if s in text]
    assert not leaks, leaks[:5]
