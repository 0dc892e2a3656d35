"""GRPO checkpoints: ``train.checkpoint_dir/step-<n>/``, written atomically, pruned to the newest
``train.keep_checkpoints``, and loaded back so that a resumed training continues exactly.

A checkpoint holds the adapter (safetensors), the optimizer and scheduler states, every process's RNG
states, the step, the data position, the failure counters and the difficulty sampler's pass rates
(``trainer_state.json``), and the resolved
config (a resume with a different ``model``/``lora`` section is refused). Tensors are loaded with
``torch.load(weights_only=True)``: never arbitrary pickled code.

    path = save_checkpoint(trainer)                 # every process calls it; the main one writes
    load_checkpoint(trainer, latest_checkpoint(cfg.train.checkpoint_dir))
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fingrpo.errors import TrainingError
from fingrpo.io import atomic_path, write_json_atomic

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.grpo.trainer import GRPOTrainer

CHECKPOINT_PREFIX = "step-"


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """``(n, folder)`` of every ``step-<n>`` folder under ``root`` (temp folders start with '.')."""
    if not root.is_dir():
        return []
    return sorted(
        (int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in root.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()
    )


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The complete ``step-<n>`` folder with the largest n.

    >>> latest_checkpoint("models/checkpoints")   # doctest: +SKIP
    PosixPath('models/checkpoints/step-20')
    """
    found = [(n, p) for n, p in _step_folders(Path(checkpoint_dir)) if (p / "trainer_state.json").is_file()]
    return found[-1][1] if found else None


def prune_checkpoints(checkpoint_dir: str | os.PathLike, keep: int | None) -> None:
    """Delete all but the newest ``keep`` step folders (``None``: keep every one)."""
    if keep is None:
        return
    for _, p in _step_folders(Path(checkpoint_dir))[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load_tensors(path: Path, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary pickled code.
    A file that needs more (or is corrupt) is a :class:`TrainingError` naming it."""
    import torch

    if not path.is_file():
        raise TrainingError(f"{path}: missing from the checkpoint")
    try:
        return torch.load(path, weights_only=True, map_location=map_location)
    except Exception as e:  # UnpicklingError for a poisoned/foreign pickle, RuntimeError for a corrupt zip
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TrainingError(
            f"{path}: refused to load (weights_only): {type(e).__name__}: {first[:200]}; "
            "delete this checkpoint folder or resume from another"
        ) from None


def rng_state(sampling_state: Any) -> dict:
    """This process's RNG states (python, numpy, torch, cuda) + the step's sampling generator state."""
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only loading refuses: store it as a list
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        # the sampling generator is re-derived from (seed, step, rank) each step; kept for the record
        "sampling": sampling_state,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(trainer: "GRPOTrainer") -> Path:
    """Write ``checkpoint_dir/step-<n>/`` atomically (main process) and prune; every process must call it."""
    import torch

    train_cfg = trainer.train_cfg
    sampling = trainer._sampling_generator(trainer.step + 1).get_state().cpu()
    rng_states = trainer._gather_objects(rng_state(sampling))  # one entry per rank
    path = Path(train_cfg.checkpoint_dir) / f"{CHECKPOINT_PREFIX}{trainer.step}"
    if trainer.is_main:
        with atomic_path(path, is_dir=True) as tmp:
            trainer.model.save_pretrained(tmp / "adapter", safe_serialization=True)
            torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"ranks": rng_states}, tmp / "rng_state.pt")
            write_json_atomic(tmp / "config.json", trainer.config.public_dump())
            write_json_atomic(tmp / "trainer_state.json", {
                "step": trainer.step,
                "data_position": trainer.data_position,
                "num_processes": trainer.world,
                "nonfinite_skips": trainer.nonfinite_skips,
                "nonfinite_streak": trainer._nonfinite_streak,
                "reward_fail_streak": trainer._reward_fail_streak,
                # the difficulty sampler's running pass rates: a resumed run draws the same prompts
                "sampler": trainer.sampler.state_dict() if trainer.sampler is not None else None,
            })
        prune_checkpoints(train_cfg.checkpoint_dir, train_cfg.keep_checkpoints)
    trainer.accelerator.wait_for_everyone()
    return path


def load_checkpoint(trainer: "GRPOTrainer", path: str | os.PathLike) -> None:
    """Restore adapter, optimizer, scheduler, RNG, step and data position from a checkpoint folder."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    saved_cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    current = trainer.config.model_dump(mode="json")
    for section in ("model", "lora"):
        if saved_cfg.get(section) != current.get(section):
            raise TrainingError(
                f"{path}: checkpoint was trained with a different {section} config "
                f"({saved_cfg.get(section)} vs now {current.get(section)}); resume with the same params"
            )
    weights = path / "adapter" / "adapter_model.safetensors"
    if not weights.is_file():
        raise TrainingError(f"{path}: adapter/adapter_model.safetensors missing")
    result = set_peft_model_state_dict(trainer.model, load_file(str(weights), device=str(trainer.device)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise TrainingError(f"{weights}: unexpected adapter weights {unexpected[:3]}")
    trainer.optimizer.load_state_dict(load_tensors(path / "optimizer.pt", map_location=trainer.device))
    trainer.scheduler.load_state_dict(load_tensors(path / "scheduler.pt"))
    rng = load_tensors(path / "rng_state.pt")["ranks"]
    set_rng_state(rng[trainer.rank] if trainer.rank < len(rng) else rng[0])
    trainer.step = int(state["step"])
    trainer.data_position = int(state["data_position"])
    trainer.nonfinite_skips = int(state.get("nonfinite_skips", 0))
    trainer._nonfinite_streak = int(state.get("nonfinite_streak", 0))
    trainer._reward_fail_streak = {k: int(v) for k, v in state.get("reward_fail_streak", {}).items()}
    if trainer.sampler is not None:
        trainer.sampler.load_state_dict(state.get("sampler") or {})


__all__ = ["CHECKPOINT_PREFIX", "latest_checkpoint", "load_checkpoint", "load_tensors", "prune_checkpoints",
           "rng_state", "save_checkpoint", "set_rng_state"]
