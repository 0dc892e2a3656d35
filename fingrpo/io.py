"""Small file helpers: atomic writes (temp file + rename) so no report, metric or checkpoint is ever
left half-written, and JSON reading with errors that name the file and position."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from fingrpo.errors import DataError


# ".<target name>.<pid of the writer>.<random>.tmp": the pid lets a later writer tell a temp left by a
# killed process (kill -9, OOM: no `except` ran) from one being written right now.
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its files
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files/folders that :func:`atomic_path` writers left in ``folder`` when they
    were killed (their pid is gone); returns what was removed. Called by every :func:`atomic_path`, so
    a crashed run's half-written checkpoint or report disappears on the next write into that folder.

    Same-host assumption: a writer on another machine (or in another PID namespace) sharing the folder
    looks dead; fingrpo writes each output from one process (the main rank).

    >>> remove_stale_temps("models/checkpoints")          # doctest: +SKIP
    [PosixPath('models/checkpoints/.step-4.12345.k2j3h4.tmp')]
    """
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except FileNotFoundError:  # another writer cleaned it first
            continue
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it is renamed onto ``path``.

    On an exception the temporary file/folder is removed and ``path`` is left untouched. A process
    killed outright (``kill -9``) cannot clean up: its temporary sibling is named with its pid and the
    next ``atomic_path`` in the same folder removes it (:func:`remove_stale_temps`). Readers never see
    a temporary: its name starts with ``.`` and ends with ``.tmp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    prefix = f".{path.name}.{os.getpid()}."
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir:
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file + fsync + rename: readers see the old or the new file."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing file or malformed JSON raises :class:`DataError` naming the position."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is not JSON's business
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits (Python's int-from-string limit)
        raise DataError(f"{path}: unreadable JSON value: {str(e).split(';')[0]}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON on line {i}, column {e.colno}: {e.msg}") from None
        except ValueError as e:
            raise DataError(f"{path}: line {i}: unreadable JSON value: {str(e).split(';')[0]}") from None
        except RecursionError:
            raise DataError(f"{path}: line {i}: JSON nested too deeply to read") from None
    return rows
