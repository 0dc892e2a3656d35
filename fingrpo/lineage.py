"""Retraining on new data: bring ``data/`` to the version ``data.dvc`` names, fingerprint the run, and
find whether a registered model version was already trained from the same fingerprint.

    fingrpo check-new [--force] [--no-pull]    # exit 0: something is new (or --force), 3: nothing new

A run's **fingerprint** is the md5 of three parts, each also kept as a tag:

- ``data``: the md5 that ``data.dvc`` names (the version of ``data/``, ``ec76a117...dir``); in a folder
  without a pointer, ``files:<md5>`` of the configured data files' bytes;
- ``params``: the md5 of the resolved config without the sections that only say where results go
  (``tracking``, ``register``, ``pipeline``): changing the MLflow server or the gate's rule retrains nothing;
- ``code``: the md5 of the fingrpo package's source files as they are on disk, so an uncommitted edit
  counts and a commit that only touches docs or ``dvc.lock`` does not (the git commit is tagged beside it).

Every registered version carries its fingerprint (``fingrpo.fingerprint`` and its parts,
:meth:`Fingerprint.tags`, written by the ``register`` stage); :func:`check_new` compares the current
one with the champion's and every earlier version's and says "nothing new" when one matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fingrpo
from fingrpo.data.sources import data_files
from fingrpo.errors import DataError
from fingrpo.io import write_json_atomic

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import Config
    from fingrpo.tracking.client import Tracker

DATA_POINTER = "data.dvc"
# sections that say where results go, not what is trained: outside the params fingerprint
OUTPUT_SECTIONS = ("tracking", "register", "pipeline")
TAG = "fingrpo.fingerprint"
NOTHING_NEW_EXIT = 3  # `fingrpo check-new`: exit code when the fingerprint was already trained


# --------------------------------------------------------------------------------------------------
# Provenance: the code and data a run came from (every run and model version is tagged with them)
# --------------------------------------------------------------------------------------------------


def _git(*args: str, cwd: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_info(cwd: str | os.PathLike | None = None) -> dict[str, str]:
    """``{"commit": <sha or "unknown">, "dirty": "true"/"false"/"unknown"}`` of the repository at ``cwd``.

    Read-only (``--no-optional-locks``: not even the index is refreshed). Untracked files don't count
    as dirty; modified tracked files do.
    """
    commit = _git("rev-parse", "HEAD", cwd=cwd)
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=cwd) if commit else None
    return {
        "commit": commit or "unknown",
        "dirty": "unknown" if status is None else ("true" if status else "false"),
    }


def data_hash(dvc_file: str | os.PathLike = "data.dvc") -> str | None:
    """The ``md5`` of the first ``outs`` entry of a ``.dvc`` pointer (``ec76a117...dir``), or None if absent."""
    import yaml

    path = Path(dvc_file)
    if not path.is_file():
        return None
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return str(doc["outs"][0]["md5"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        raise DataError(f"{path}: not a DVC pointer file (outs[0].md5 missing)") from None


def file_md5(path: str | os.PathLike) -> str | None:
    """md5 of a file's bytes (``dvc.lock``), or None if it does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    return hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - a content fingerprint, not security


# --------------------------------------------------------------------------------------------------
# The fingerprint and the lookup
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """The three parts of a run's fingerprint; :attr:`value` is their md5."""

    data: str
    params: str
    code: str
    git_commit: str = "unknown"

    @property
    def value(self) -> str:
        """md5 of ``data|params|code`` (the git commit is informational, not part of it).

        >>> Fingerprint("d.dir", "p", "c").value == Fingerprint("d.dir", "p", "c", "abc").value
        True
        """
        return hashlib.md5(f"{self.data}|{self.params}|{self.code}".encode()).hexdigest()  # noqa: S324 - fingerprint

    def tags(self) -> dict[str, str]:
        """The version/run tags that record it."""
        return {TAG: self.value, f"{TAG}.data": self.data, f"{TAG}.params": self.params,
                f"{TAG}.code": self.code, f"{TAG}.git_commit": self.git_commit}


def params_md5(cfg: "Config") -> str:
    """md5 of the resolved config without :data:`OUTPUT_SECTIONS` (sorted keys, compact JSON)."""
    tree = {k: v for k, v in cfg.public_dump().items() if k not in OUTPUT_SECTIONS}
    blob = json.dumps(tree, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.md5(blob.encode()).hexdigest()  # noqa: S324 - fingerprint


def code_md5(package_dir: str | Path | None = None) -> str:
    """md5 over the package's ``*.py`` files (relative path and bytes, sorted by path)."""
    root = Path(package_dir or Path(fingrpo.__file__).parent)
    digest = hashlib.md5()  # noqa: S324 - fingerprint
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def files_md5(paths: list[str | Path]) -> str:
    """md5 over the files' paths and bytes (a missing file counts as missing)."""
    digest = hashlib.md5()  # noqa: S324 - fingerprint
    for path in map(Path, paths):
        digest.update(str(path).encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<missing>") + b"\0")
    return digest.hexdigest()


def fingerprint(cfg: "Config", root: str | Path = ".", pointer: str = DATA_POINTER) -> Fingerprint:
    """The run's fingerprint: ``<root>/<pointer>``'s hash (without one: ``files:`` + the md5 of the
    config's data files), the params hash, the code hash."""
    root = Path(root)
    data = data_hash(root / pointer) or "files:" + files_md5([root / f for f in data_files(cfg)])
    return Fingerprint(data=data, params=params_md5(cfg), code=code_md5(), git_commit=git_info(root)["commit"])


def pull_data(root: str | Path = ".", pointer: str = DATA_POINTER, timeout_s: float = 1800) -> None:
    """``dvc pull <pointer>`` in ``root``: ``data/`` becomes exactly the version the pointer names (files
    of another version are replaced; nothing is pushed). A failure is a :class:`DataError` with DVC's
    own last lines, and the data already on disk is left as it was."""
    root = Path(root)
    if not (root / pointer).is_file():
        raise DataError(f"{root / pointer}: no DVC pointer to pull (run from the project root, or --no-pull)")
    cmd = [sys.executable, "-m", "dvc", "pull", "--quiet", pointer]
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DataError(f"`dvc pull {pointer}` did not finish within {timeout_s:.0f} s (is the DVC remote reachable?)") from None
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise DataError(f"`dvc pull {pointer}` failed (exit {proc.returncode}): {tail or 'no output'}; "
                        "check the DVC remote (`dvc remote list`) and the pointer")


def trained_versions(tracker: "Tracker", model_name: str, value: str) -> list[dict[str, Any]]:
    """Registered versions of ``model_name`` whose fingerprint tag is ``value`` (newest first):
    ``[{"version", "run_id", "aliases"}]``; none when the model is not registered yet."""
    from mlflow.exceptions import MlflowException

    try:
        versions = tracker.call(tracker.client.search_model_versions, f"name = '{model_name}'",
                                what="search_model_versions")
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    found = [{"version": str(v.version), "run_id": v.run_id, "aliases": []}
             for v in versions if (v.tags or {}).get(TAG) == value]
    if found:  # search results carry no aliases: ask for the ones that matter
        for alias in ("champion", "challenger"):
            try:
                holder = str(tracker.call(tracker.client.get_model_version_by_alias, model_name, alias).version)
            except MlflowException:
                continue
            for v in found:
                if v["version"] == holder:
                    v["aliases"].append(alias)
    return sorted(found, key=lambda v: -int(v["version"]))


def check_new(cfg: "Config", tracker: "Tracker | None", *, force: bool = False, pull: bool = True,
              root: str | Path = ".") -> dict[str, Any]:
    """Pull the data version ``data.dvc`` names (``pull``), fingerprint the run and look it up among the
    registered versions of ``register.model_name`` in ``tracker``'s registry (None: tracking disabled,
    every run is new). Returns (and writes to
    ``<pipeline.reports_dir>/lineage.json``)::

        {"new": bool, "forced": bool, "reason": "...", "fingerprint": md5, "parts": {data, params, code, git_commit},
         "trained_as": [{"version", "run_id", "aliases"}], "model_name": ...}

    ``new`` is False only when a version with this fingerprint exists and not ``force``.
    """
    if pull:
        pull_data(root)
    fp = fingerprint(cfg, root)
    name = cfg.register.model_name
    found = trained_versions(tracker, name, fp.value) if tracker is not None else []
    if found:
        champion = next((v for v in found if "champion" in v["aliases"]), None)
        where = f"champion v{champion['version']}" if champion else f"v{found[0]['version']}"
        reason = (f"nothing new: this data version ({fp.data}), params and code were already trained into {name} "
                  f"{where}" + (f" (and {len(found) - 1} more version(s))" if len(found) > 1 else ""))
        if force:
            reason = "forced: " + reason.replace("nothing new: ", "", 1) + "; retraining anyway"
    elif tracker is None:
        reason = "tracking.enabled is false: no registry to compare with, so the run counts as new"
    else:
        reason = f"new: no version of {name} was trained from data {fp.data} with these params and code"
    result = {"new": bool(force or not found), "forced": bool(force and found), "reason": reason,
              "fingerprint": fp.value, "parts": asdict(fp), "trained_as": found, "model_name": name}
    write_json_atomic(Path(cfg.pipeline.reports_dir) / "lineage.json", result)
    return result


