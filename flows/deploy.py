"""Scheduled retraining: the ``retrain`` flow as a deployment with a cron schedule, either served by
this process (one machine) or, with ``--pool``, deployed to a Prefect work pool whose workers run it
(a team: ``flows/team.sh up`` starts a server, a ``process`` pool and a worker).

Needs a running Prefect API (a cron schedule lives on the server). Locally, from the project root::

    export PREFECT_HOME=$PWD/.prefect PREFECT_SERVER_ANALYTICS_ENABLED=false
    setsid prefect server start --host 127.0.0.1 --port 4200 > .prefect-server.log 2>&1 &
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python flows/deploy.py --cron "0 3 * * 1"            # weekly, Monday 03:00 (UTC unless --timezone)
    # another shell: trigger a run now instead of waiting for the schedule
    prefect deployment run 'retrain/scheduled-retrain' --param resume=false

``serve`` registers the deployment, then polls the server and runs each scheduled (or triggered)
flow run in a subprocess until stopped (Ctrl-C pauses the schedule on the way out).

With a work pool (README "Team mode")::

    python flows/deploy.py --pool fingrpo-team --cron "0 3 * * 1"   # registers and exits
    prefect deployment run 'retrain/scheduled-retrain' --watch

registers the deployment on the pool with this project folder as its code (a worker runs
``flows/retrain.py:retrain`` with this folder as its working directory, so ``dvc pull`` and
``params.yaml`` are this project's) and exits; the pool's workers pick up its runs. The cron comes
from ``--cron``, else ``$FINGRPO_RETRAIN_CRON``, else weekly. Per-run parameters (``params_path``,
``overrides``, ``resume``) are the flow's; ``--set`` bakes overrides into the deployment.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fingrpo.config import load_config, parse_overrides
from fingrpo.errors import FingrpoError

DEFAULT_CRON = "0 3 * * 1"  # weekly: Monday 03:00
DEPLOYMENT_NAME = "scheduled-retrain"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve the retrain flow on a cron schedule (needs PREFECT_API_URL).")
    p.add_argument("--name", default=DEPLOYMENT_NAME, help=f"deployment name (default: {DEPLOYMENT_NAME})")
    p.add_argument(
        "--cron", default=os.environ.get("FINGRPO_RETRAIN_CRON", DEFAULT_CRON),
        help=f"cron schedule (default: $FINGRPO_RETRAIN_CRON or {DEFAULT_CRON!r}, weekly)",
    )
    p.add_argument("--timezone", default=os.environ.get("FINGRPO_RETRAIN_TZ"), help="IANA timezone of the cron (default UTC)")
    p.add_argument("--params", default="params.yaml", help="params file the scheduled runs read")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override baked into every scheduled run (repeatable)")
    p.add_argument("--paused", action="store_true", help="register the schedule paused (trigger runs by hand)")
    p.add_argument("--pool", default=os.environ.get("FINGRPO_POOL"),
                   help="deploy to this Prefect work pool and exit (its workers run the flow; default: "
                        "$FINGRPO_POOL, else serve from this process)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not os.environ.get("PREFECT_API_URL"):
        # No silent fallback: without a server `serve` would start a throw-away API and the schedule
        # would die with this process.
        print("error: PREFECT_API_URL is not set: start `prefect server start --host 127.0.0.1` and export "
              "PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=args.cron, timezone=args.timezone)
    except ValueError:  # pydantic's ValidationError is a ValueError
        print(f"error: --cron {args.cron!r} / --timezone {args.timezone!r}: not a valid cron schedule", file=sys.stderr)
        return 2

    try:
        overrides = parse_overrides(args.overrides)
        load_config(args.params, overrides)  # fail now on a bad params file, not at 03:00 on Monday
    except FingrpoError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from prefect.schedules import Cron

    from flows.retrain import retrain

    common = dict(
        name=args.name,
        schedules=[Cron(args.cron, timezone=args.timezone)],
        parameters={"params_path": args.params, "overrides": overrides, "resume": False},
        paused=args.paused,
        tags=["fingrpo", "retrain"],
        description=f"fingrpo scheduled retraining ({args.cron})",
    )
    if not args.pool:
        retrain.serve(**common)
        return 0
    # the code is this project folder (no image, nothing pushed): a worker on this machine (or one
    # that mounts the same path) runs the entrypoint with it as the working directory
    source = retrain.from_source(source=str(root), entrypoint="flows/retrain.py:retrain")
    deployment_id = source.deploy(work_pool_name=args.pool, print_next_steps=False, **common)
    print(f"deployed retrain/{args.name} ({deployment_id}) to work pool {args.pool!r}, cron {args.cron!r}; "
          f"run it now: prefect deployment run 'retrain/{args.name}' --watch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
