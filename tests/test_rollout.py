"""Shared-prompt rollouts and scoring on the tiny llama + LoRA: equal to the naive full-sequence
computation (values and gradients), EOS handling, greedy agreement with HF generate, seeding."""

from __future__ import annotations

import pytest
import torch

from fingrpo.grpo.loss import GRPOLoss
from fingrpo.grpo.rollout import (
    Rollout,
    completion_logprobs,
    naive_completion_logprobs,
    sample_groups,
)

EOS = PAD = 2
G = 3


def _load_base(path):
    """The tiny llama with its weights perturbed (seeded, std 0.3): the raw random init is so flat that
    greedy decoding repeats one token, which would hide position and padding bugs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "norm" not in name:
                w.add_(0.3 * torch.randn(w.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def base_model(tiny_model_path):
    return _load_base(tiny_model_path)


@pytest.fixture(scope="module")
def lora_model(tiny_model_path):
    """The same weights with LoRA on q_proj, v_proj (r=4) and NON-zero B weights, so the adapter matters."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        _load_base(tiny_model_path),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "lora_B" in name:
                w.normal_(0.0, 0.3)
    return model.eval()


def _prompts(lengths=(9, 23, 14), seed=0):
    g = torch.Generator().manual_seed(seed)
    # tokens 3..99 avoid <unk>, bos and eos; a bos first, as a chat template would
    return [torch.cat([torch.tensor([1]), torch.randint(3, 100, (n - 1,), generator=g)]) for n in lengths]


def _random_completions(num_rows, t, seed=0):
    """(N, T) completions with varied lengths: EOS at each row's end, pad after (one row truncated)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (num_rows, t), generator=g)
    lengths = torch.randint(1, t + 1, (num_rows,), generator=g)
    lengths[0] = t  # a truncated row: no EOS
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    for i, n in enumerate(lengths.tolist()):
        if i > 0:
            ids[i, n - 1] = EOS
        ids[i, n:] = PAD
    return ids, mask


def _lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


# -------------------------------------------------------------------------------------- the acceptance test


def test_shared_prefix_logprobs_and_gradients_equal_naive(lora_model):
    model = lora_model
    prompts = _prompts()
    ids, mask = _random_completions(len(prompts) * G, t=7)
    adv = torch.tensor([1.0, -0.5, 0.3, 0.8, -1.2, 0.1, -0.4, 0.9, 0.6])
    ref = torch.full(ids.shape, -4.0)

    results = {}
    for name, fn in (("shared", completion_logprobs), ("naive", naive_completion_logprobs)):
        model.zero_grad(set_to_none=True)
        logp = fn(model, prompts, ids, mask, G)
        assert logp.shape == ids.shape and logp.dtype == torch.float32
        # old = logp + noise so ratios differ from 1 (some clipped), KL active: every path of the loss
        old = logp.detach() + 0.1 * torch.sin(torch.arange(ids.numel()).view(ids.shape).float())
        loss, _ = GRPOLoss(epsilon=0.2, beta=0.04)(logp, old, ref, adv, mask)
        loss.backward()
        results[name] = (logp.detach(), _lora_grads(model))

    (shared, g_shared), (naive, g_naive) = results["shared"], results["naive"]
    assert (shared - naive).abs().max() <= 1e-4
    assert (shared[mask == 0] == 0).all()
    assert set(g_shared) == set(g_naive) and len(g_naive) == 8  # A and B of q, v in 2 layers
    for name in g_naive:
        assert g_naive[name].abs().max() > 0, name
        assert _rel(g_shared[name], g_naive[name]) <= 1e-3, name


def test_gradient_flows_through_the_shared_prefix(lora_model):
    """Cutting the prompt's cache from the graph changes the LoRA gradients: the prefix term is real."""
    model = lora_model
    prompts = _prompts((12, 8))
    ids, mask = _random_completions(2 * G, t=5, seed=3)

    model.zero_grad(set_to_none=True)
    completion_logprobs(model, prompts, ids, mask, G).sum().backward()
    full = _lora_grads(model)

    # the same computation with the prompt's keys/values detached: only the completion positions' grads
    from fingrpo.grpo import rollout as R

    original = R._rows_logprobs

    def detached(model, cache, prefix, *args):
        return original(model, cache, [(k.detach(), v.detach()) for k, v in prefix], *args)

    model.zero_grad(set_to_none=True)
    R._rows_logprobs = detached
    try:
        completion_logprobs(model, prompts, ids, mask, G).sum().backward()
    finally:
        R._rows_logprobs = original
    cut = _lora_grads(model)
    assert max(_rel(cut[n], full[n]) for n in full) > 1e-2


# ------------------------------------------------------------------- GroupLogprobs: chunked backward, same grads


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_group_scorer_chunks_give_the_gradients_of_one_backward(lora_model, chunk):
    """Rows back-propagated ``chunk`` at a time against one prompt forward, then the prompt's share:
    the same log-probs and LoRA gradients as one backward over the whole group (the prefix term included)."""
    from fingrpo.grpo.rollout import GroupLogprobs

    model = lora_model
    prompts = _prompts((11, 17))
    ids, mask = _random_completions(len(prompts) * G, t=6, seed=5)
    adv = torch.tensor([0.7, -1.1, 0.4, -0.2, 1.3, -0.6])
    full = dict(num_sequences=ids.shape[0], num_tokens=float(mask.sum()), max_length=ids.shape[1])
    loss_fn = GRPOLoss(epsilon=0.2, beta=0.04, loss_type="grpo")
    ref = torch.full(ids.shape, -4.0)

    model.zero_grad(set_to_none=True)
    whole = completion_logprobs(model, prompts, ids, mask, G)
    whole_loss, _ = loss_fn(whole, None, ref, adv, mask)
    whole_loss.backward()
    expected = _lora_grads(model)

    model.zero_grad(set_to_none=True)
    rows_out, losses = [], []
    for p, prompt in enumerate(prompts):
        with GroupLogprobs(model, prompt) as scorer:
            for start in range(0, G, chunk):
                rows = slice(p * G + start, p * G + min(start + chunk, G))
                logp = scorer.logprobs(ids[rows], mask[rows])
                loss, _ = loss_fn(logp, None, ref[rows], adv[rows], mask[rows], **full)
                loss.backward()
                rows_out.append(logp.detach())
                losses.append(float(loss.detach()))
            scorer.backward_prompt()
    got = _lora_grads(model)

    assert (torch.cat(rows_out) - whole.detach()).abs().max() <= 1e-5
    assert sum(losses) == pytest.approx(float(whole_loss), rel=1e-5, abs=1e-7)
    assert set(got) == set(expected) and len(expected) == 8
    for name in expected:
        assert _rel(got[name], expected[name]) <= 1e-4, name


def test_group_scorer_without_the_prompt_share_gets_different_gradients(lora_model):
    """Skipping ``backward_prompt`` drops the prefix's gradient: the step that makes chunking exact is real."""
    from fingrpo.grpo.rollout import GroupLogprobs

    model = lora_model
    (prompt,) = _prompts((13,))
    ids, mask = _random_completions(G, t=5, seed=7)

    model.zero_grad(set_to_none=True)
    completion_logprobs(model, [prompt], ids, mask, G).sum().backward()
    full = _lora_grads(model)

    model.zero_grad(set_to_none=True)
    with GroupLogprobs(model, prompt) as scorer:
        scorer.logprobs(ids, mask).sum().backward()  # no backward_prompt()
    partial = _lora_grads(model)
    assert max(_rel(partial[n], full[n]) for n in full) > 1e-2


def test_group_scorer_without_gradients_scores_and_restores_attention(lora_model):
    from fingrpo.grpo.rollout import GroupLogprobs

    model = lora_model
    config = model.get_base_model().config
    before = config._attn_implementation
    (prompt,) = _prompts((10,))
    ids, mask = _random_completions(G, t=4, seed=9)
    with torch.no_grad():
        expected = completion_logprobs(model, [prompt], ids, mask, G)
        with GroupLogprobs(model, prompt) as scorer:
            assert config._attn_implementation != before  # the packed-GQA impl while scoring
            got = torch.cat([scorer.logprobs(ids[:2], mask[:2]), scorer.logprobs(ids[2:], mask[2:])])
            scorer.backward_prompt()  # nothing to do without gradients
    assert config._attn_implementation == before
    assert not got.requires_grad
    assert (got - expected).abs().max() <= 1e-5
    assert (got[mask == 0] == 0).all()


def test_group_scorer_rejects_rows_that_do_not_match(lora_model):
    from fingrpo.grpo.rollout import GroupLogprobs

    (prompt,) = _prompts((8,))
    ids, mask = _random_completions(2, t=4)
    with GroupLogprobs(lora_model, prompt) as scorer, pytest.raises(ValueError):
        scorer.logprobs(ids, mask[:, :3])
    with GroupLogprobs(lora_model, prompt) as scorer:
        scorer.logprobs(ids, mask).sum().backward()
        scorer.backward_prompt()
        with pytest.raises(RuntimeError, match="spent"):  # the cache is no longer the prompt's alone
            scorer.logprobs(ids, mask)


def test_single_token_completions(lora_model):
    prompts = _prompts((5, 11))
    ids = torch.tensor([[EOS], [7], [8], [EOS], [9], [10]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = completion_logprobs(lora_model, prompts, ids, mask, G)
        b = naive_completion_logprobs(lora_model, prompts, ids, mask, G)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_reference_pass_with_adapter_disabled_is_the_base_model(lora_model, base_model):
    prompts = _prompts((10, 6))
    ids, mask = _random_completions(2 * G, t=6, seed=1)
    with torch.no_grad():
        with lora_model.disable_adapter():
            ref = completion_logprobs(lora_model, prompts, ids, mask, G)
        policy = completion_logprobs(lora_model, prompts, ids, mask, G)
        base = naive_completion_logprobs(base_model, prompts, ids, mask, G)
    assert (ref - base).abs().max() <= 1e-5
    assert (policy - ref).abs().max() > 1e-3  # the adapter does change the policy


def test_temperature_scales_the_scored_distribution(lora_model):
    prompts = _prompts((8,))
    ids, mask = _random_completions(G, t=4, seed=2)
    with torch.no_grad():
        a = completion_logprobs(lora_model, prompts, ids, mask, G, temperature=0.7)
        b = naive_completion_logprobs(lora_model, prompts, ids, mask, G, temperature=0.7)
        plain = completion_logprobs(lora_model, prompts, ids, mask, G)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - plain).abs().max() > 1e-3


def test_scoring_rejects_mismatched_rows(lora_model):
    ids, mask = _random_completions(4, t=3)
    with pytest.raises(ValueError, match="4 completion rows but 2 prompts x group_size 3"):
        completion_logprobs(lora_model, _prompts((5, 6)), ids, mask, G)
    with pytest.raises(ValueError, match="completion_mask"):
        completion_logprobs(lora_model, _prompts((5, 6)), torch.zeros(6, 3, dtype=torch.long), mask, G)


# -------------------------------------------------------------------------------------------------- sampling


def _check_rollout_invariants(r: Rollout, eos_ids: set[int], max_new_tokens: int):
    n, t = r.completion_ids.shape
    assert r.completion_mask.shape == (n, t) and r.truncated.shape == (n,) and t <= max_new_tokens
    for row, m, trunc in zip(r.completion_ids.tolist(), r.completion_mask.tolist(), r.truncated.tolist()):
        length = sum(m)
        assert m == [1] * length + [0] * (t - length)  # 1s then 0s
        eos_at = [i for i, tok in enumerate(row) if tok in eos_ids]
        if trunc:
            assert length == t == max_new_tokens and not eos_at
        else:
            assert eos_at and eos_at[0] == length - 1  # the mask includes the first EOS, nothing after
            assert all(tok == PAD for tok in row[length:])


def test_sampling_stops_at_eos_masks_after_and_flags_truncation(lora_model):
    # half of the vocabulary counts as EOS, so rows stop at varied, early steps
    eos_ids = set(range(2, 50))
    gen = torch.Generator().manual_seed(0)
    r = sample_groups(lora_model, _prompts(), G, max_new_tokens=12, eos_token_id=sorted(eos_ids),
                      pad_token_id=PAD, generator=gen)
    assert r.num_prompts == 3 and r.num_completions == 9 and r.group_size == G
    _check_rollout_invariants(r, eos_ids, 12)
    lengths = r.completion_lengths
    assert lengths.min() < lengths.max()  # rows really stopped at different steps
    assert r.completion_ids.shape[1] == int(lengths.max())  # T trimmed to the longest completion
    assert r.completion_token_lists()[0] == r.completion_ids[0, : int(lengths[0])].tolist()

    # a rarely sampled EOS and a short budget: truncated rows, mask all ones
    r2 = sample_groups(lora_model, _prompts(), G, max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD,
                       generator=torch.Generator().manual_seed(1))
    _check_rollout_invariants(r2, {EOS}, 3)
    assert r2.truncated.any() and r2.completion_ids.shape == (9, 3)


def test_group_stops_when_all_rows_are_done(lora_model):
    # every token is an EOS: each row is done after one token, and the loop stops there
    r = sample_groups(lora_model, _prompts((6,)), 4, max_new_tokens=10, eos_token_id=list(range(101)),
                      pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    assert r.completion_ids.shape == (4, 1) and r.completion_mask.eq(1).all() and not r.truncated.any()


def _hf_greedy(model, prompt, max_new_tokens):
    out = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=PAD)
    return out[0, prompt.numel():].tolist()


@pytest.mark.parametrize("temperature, top_p", [(1e-6, 1.0), (0.0, 1.0), (1.0, 1e-6)])
def test_near_greedy_sampling_equals_hf_generate(lora_model, temperature, top_p):
    """Temperature → 0 (or a tiny nucleus) reproduces greedy decoding; several prompts of different
    lengths decode in one left-padded batch, so this also checks the padding and per-row positions."""
    prompts = _prompts()
    r = sample_groups(lora_model, prompts, G, max_new_tokens=8, temperature=temperature, top_p=top_p,
                      eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p, prompt in enumerate(prompts):
            expected = _hf_greedy(lora_model, prompt, 8)
            for row in r.completion_token_lists()[p * G:(p + 1) * G]:
                assert row == expected[: len(row)]
                assert len(row) == len(expected) or (len(expected) > len(row) and row[-1] == EOS)


def test_batched_decode_equals_one_prompt_at_a_time(lora_model, base_model):
    """Left-padded multi-prompt decoding gives the same tokens as decoding each group alone (greedy),
    with the adapter on and off."""
    prompts = _prompts((4, 19, 11, 7), seed=5)
    kwargs = dict(max_new_tokens=10, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD)
    together = sample_groups(lora_model, prompts, 2, **kwargs)
    alone = sample_groups(lora_model, prompts, 2, prompts_per_batch=1, **kwargs)
    assert together.completion_token_lists() == alone.completion_token_lists()
    with lora_model.disable_adapter():
        off = sample_groups(lora_model, prompts, 2, **kwargs)
    base = sample_groups(base_model, prompts, 2, prompts_per_batch=1, **kwargs)
    assert off.completion_token_lists() == base.completion_token_lists()
    assert off.completion_token_lists() != together.completion_token_lists()
    # equal prompt lengths: the decode batch needs no padding mask
    same = _prompts((9, 9), seed=6)
    assert (sample_groups(lora_model, same, 2, **kwargs).completion_token_lists()
            == sample_groups(lora_model, same, 2, prompts_per_batch=1, **kwargs).completion_token_lists())


def test_finished_prompts_leave_the_decode_batch(lora_model, monkeypatch):
    """A prompt whose rows have all stopped is dropped from the decode batch (fewer rows per forward), and
    that changes no token: greedy decoding equals each prompt alone, and seeded sampling equals the same
    draw with the dropping switched off (every row still draws its uniform)."""
    from fingrpo.grpo import rollout as R

    prompts = _prompts((4, 19, 11, 7, 13, 5, 9, 16), seed=11)
    eos_ids = list(range(2, 40))  # many stop tokens: prompts finish at different steps
    rows_fed = []
    original_compact = R._compact

    def spy(cache, active, finished, mask, positions):
        out = original_compact(cache, active, finished, mask, positions)
        rows_fed.append(int(out[0].numel()))
        return out

    monkeypatch.setattr(R, "_compact", spy)
    greedy = dict(max_new_tokens=14, temperature=0.0, eos_token_id=eos_ids, pad_token_id=PAD)
    together = sample_groups(lora_model, prompts, 1, **greedy)
    assert rows_fed and min(rows_fed) < len(prompts)  # prompts really left the batch
    assert together.completion_token_lists() == sample_groups(
        lora_model, prompts, 1, prompts_per_batch=1, **greedy).completion_token_lists()
    assert together.completion_lengths.min() < together.completion_lengths.max()

    def draw():
        return sample_groups(lora_model, prompts, 2, max_new_tokens=14, temperature=1.0, eos_token_id=eos_ids,
                             pad_token_id=PAD, generator=torch.Generator().manual_seed(3))

    rows_fed.clear()
    dropped = draw()
    assert min(rows_fed) < len(prompts)
    monkeypatch.setattr(R, "_compact", lambda cache, active, finished, mask, positions: (active, mask, positions))
    kept = draw()
    assert torch.equal(dropped.completion_ids, kept.completion_ids)
    assert torch.equal(dropped.completion_mask, kept.completion_mask)
    assert torch.equal(dropped.truncated, kept.truncated)


def test_a_shared_prefix_prefilled_once_decodes_as_each_prompt_alone(lora_model, monkeypatch):
    """``share_prefix``: the prefix all prompts start with runs once, each prompt's forward only its own
    tokens (fewer prefill tokens), and greedy decoding gives the same tokens as without sharing; a
    prompt that IS the prefix plus one token, and prompts with no common prefix, work too."""
    from fingrpo.grpo import rollout as R

    system = _prompts((30,), seed=7)[0]
    prompts = [torch.cat([system, tail[1:]]) for tail in _prompts((2, 12, 6, 17), seed=8)]
    kwargs = dict(max_new_tokens=9, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD)
    fed = []
    original = R._prompt_prefill

    def spy(model, prompt, prefix):
        fed.append(int(prompt.numel()) - (prefix.length if prefix is not None else 0))
        return original(model, prompt, prefix)

    monkeypatch.setattr(R, "_prompt_prefill", spy)
    shared = sample_groups(lora_model, prompts, 2, share_prefix=True, prompts_per_batch=2, **kwargs)
    assert fed == [1, 11, 5, 16]  # the 30 shared tokens are not fed again
    fed.clear()
    plain = sample_groups(lora_model, prompts, 2, **kwargs)
    assert fed == [31, 41, 35, 46]
    assert shared.completion_token_lists() == plain.completion_token_lists()
    unrelated = _prompts((5, 8), seed=9)
    unrelated[1][0] = 2  # no common first token: nothing shared
    assert (sample_groups(lora_model, unrelated, 2, share_prefix=True, **kwargs).completion_token_lists()
            == sample_groups(lora_model, unrelated, 2, **kwargs).completion_token_lists())


def test_seeded_generator_is_reproducible(lora_model):
    prompts = _prompts()

    def draw(seed, **kw):
        return sample_groups(lora_model, prompts, G, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD,
                             generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # the G rows of a group are different samples, not copies
    assert len({tuple(row) for row in a.completion_ids[:G].tolist()}) > 1
    # outputs are ordinary tensors (not inference-mode ones): usable in an autograd computation
    logp = completion_logprobs(lora_model, a.prompt_ids, a.completion_ids, a.completion_mask, G)
    assert logp.requires_grad


def test_sampling_follows_the_model_distribution(lora_model):
    """First-token frequencies over many draws match softmax(logits) of the prompt's last position."""
    prompt = _prompts((6,))[0]
    n = 4000
    r = sample_groups(lora_model, [prompt], n, max_new_tokens=1, temperature=1.5, eos_token_id=EOS,
                      pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = torch.softmax(lora_model(input_ids=prompt[None]).logits[0, -1] / 1.5, dim=-1)
    freq = torch.bincount(r.completion_ids[:, 0], minlength=probs.numel()).float() / n
    assert (freq - probs).abs().max() < 0.02  # ~4.5 sigma for p ≈ 0.05


def test_sampling_rejects_bad_arguments(lora_model):
    with pytest.raises(ValueError, match="top_p"):
        sample_groups(lora_model, _prompts((4,)), 2, 4, top_p=0.0, eos_token_id=EOS)
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty"):
        sample_groups(lora_model, [[1, 5], []], 2, 4, eos_token_id=EOS)
