"""Shared-prompt attention: grouped query heads packed into the query axis equal transformers' sdpa
(values and gradients), the implementation switch is scoped, eager models take the same masks, the
decode cache holds each prompt once, and the inverse-CDF sampler is exact."""

from __future__ import annotations

import pytest
import torch

from fingrpo.errors import ModelError
from fingrpo.grpo.attention import (
    IMPLEMENTATION,
    gqa_packed_sdpa,
    shared_prompt_attention,
)
from fingrpo.grpo.rollout import (
    _pick_tokens,
    completion_logprobs,
    naive_completion_logprobs,
    sample_groups,
)

EOS = PAD = 2


class _Attn(torch.nn.Module):
    """What transformers' attention functions read from the module: the GQA factor and causality."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _qkv(b, h, h_kv, q, k, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, requires_grad=True)
            for shape in ((b, h, q, d), (b, h_kv, k, d), (b, h_kv, k, d))]


@pytest.mark.parametrize("mask_batch", [1, 3])
@pytest.mark.parametrize("h, h_kv, q", [(6, 2, 5), (6, 3, 1), (4, 4, 5)])
def test_packed_gqa_equals_sdpa_values_and_gradients(mask_batch, h, h_kv, q):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, k = 3, 11
    g = torch.Generator().manual_seed(1)
    allowed = torch.rand(mask_batch, 1, q, k, generator=g) > 0.4
    allowed[..., 0] = True  # every query sees at least one key
    module = _Attn(h // h_kv)
    grad = torch.randn(b, q, h, 8, generator=g)

    outs = []
    for fn in (gqa_packed_sdpa, sdpa_attention_forward):
        query, key, value = _qkv(b, h, h_kv, q, k)
        out, weights = fn(module, query, key, value, allowed, scaling=0.3)
        assert weights is None and out.shape == (b, q, h, 8)
        out.backward(grad)
        outs.append((out.detach(), query.grad, key.grad, value.grad))
    for mine, ref in zip(*outs):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)


def test_no_mask_is_passed_to_sdpa_unchanged():
    """A prefill (no mask, causal) takes transformers' path: same result as sdpa's own causal attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value = _qkv(2, 6, 2, 7, 7)
    module = _Attn(3)
    mine, _ = gqa_packed_sdpa(module, query, key, value, None)
    ref, _ = sdpa_attention_forward(module, query, key, value, None)
    torch.testing.assert_close(mine, ref)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    explicit, _ = gqa_packed_sdpa(module, query, key, value, causal)
    torch.testing.assert_close(mine, explicit, atol=1e-5, rtol=1e-5)


def test_the_switch_is_scoped_and_restored_on_error(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="sdpa")
    with shared_prompt_attention(model) as attn:
        assert model.config._attn_implementation == IMPLEMENTATION == attn.implementation
        with shared_prompt_attention(model) as inner:  # nested: stays, and the outer block restores
            assert inner.implementation == IMPLEMENTATION
        assert model.config._attn_implementation == IMPLEMENTATION
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"), shared_prompt_attention(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_an_implementation_without_explicit_masks_is_refused(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model.config._attn_implementation = "flash_attention_2"  # not installable here; the check is by name
    with pytest.raises(ModelError, match="flash_attention_2.*attn_implementation='sdpa'"):
        sample_groups(model, [[1, 5, 6]], 2, 3, eos_token_id=EOS)
    with pytest.raises(ModelError, match="flash_attention_2"):
        completion_logprobs(model, [[1, 5, 6]], torch.tensor([[7, 8]] * 2), torch.ones(2, 2, dtype=torch.long), 2)


def test_eager_and_sdpa_models_agree(tiny_model_path):
    """An eager model gets the masks as additive floats: same log-probs and the same greedy tokens."""
    from transformers import AutoModelForCausalLM

    models = {impl: AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation=impl).eval()
              for impl in ("eager", "sdpa")}
    g = torch.Generator().manual_seed(0)
    prompts = [torch.cat([torch.tensor([1]), torch.randint(3, 100, (n,), generator=g)]) for n in (6, 13)]
    ids = torch.randint(3, 100, (4, 5), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        lp = {k: completion_logprobs(m, prompts, ids, mask, 2) for k, m in models.items()}
        naive = naive_completion_logprobs(models["eager"], prompts, ids, mask, 2)
    torch.testing.assert_close(lp["eager"], naive, atol=1e-5, rtol=0)
    torch.testing.assert_close(lp["sdpa"], naive, atol=1e-5, rtol=0)
    kwargs = dict(max_new_tokens=6, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD)
    eager = sample_groups(models["eager"], prompts, 2, **kwargs).completion_token_lists()
    assert eager == sample_groups(models["sdpa"], prompts, 2, **kwargs).completion_token_lists()
    assert models["eager"].config._attn_implementation == "eager"


def test_decode_cache_holds_each_prompt_once(tiny_model_path, monkeypatch):
    """The decode batch has one cache row per prompt (not per completion): P rows of L_max + T·G slots."""
    from transformers import AutoModelForCausalLM

    from fingrpo.grpo import rollout as R

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    shapes = []
    original = R._decode_cache

    def spy(caches, lengths, capacity):
        cache = original(caches, lengths, capacity)
        shapes.append(tuple(cache.layers[0]._k.shape))
        return cache

    monkeypatch.setattr(R, "_decode_cache", spy)
    r = sample_groups(model, [[1, 5, 6, 7], [1, 8]], group_size=4, max_new_tokens=3, eos_token_id=EOS,
                      generator=torch.Generator().manual_seed(0))
    assert r.completion_ids.shape[0] == 8
    heads, dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    assert shapes == [(2, heads, 4 + 3 * 4, dim)]


def test_inverse_cdf_sampler_never_picks_zero_probability_tokens(monkeypatch):
    logits = torch.full((4000, 6), float("-inf"))
    logits[:, 1] = 0.0
    logits[:, 4] = 1.0  # the last token (and 0, 2, 3) has probability 0
    picked = _pick_tokens(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert set(picked.tolist()) == {1, 4}
    share = (picked == 4).float().mean().item()
    assert abs(share - torch.sigmoid(torch.tensor(1.0)).item()) < 0.03  # p(4) = e/(1+e) ≈ 0.731
    # a draw that rounds up to the CDF's total (past every bucket) lands on the last token of non-zero
    # probability, not on the zero-probability token after it
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, dtype=kw.get("dtype")))
    assert set(_pick_tokens(logits, 1.0, 1.0, None).tolist()) == {4}


def test_inverse_cdf_sampler_follows_temperature_and_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)
    g = torch.Generator().manual_seed(1)
    freq = torch.bincount(_pick_tokens(logits, 2.0, 1.0, g), minlength=4).float() / 20000
    expected = torch.softmax(logits[0] / 2.0, -1)
    assert (freq - expected).abs().max() < 0.015
    nucleus = _pick_tokens(logits, 1.0, 0.75, g)  # keeps the two most likely tokens (0.5 + 0.3 >= 0.75)
    assert set(nucleus.tolist()) == {0, 1}
    assert abs((nucleus == 0).float().mean().item() - 0.5 / 0.8) < 0.015
