"""GRPOLoss and group advantages: hand-computed values, clipping, KL, masking, gradients, normalisers."""

from __future__ import annotations

import math

import pytest
import torch

from fingrpo.errors import ConfigError, TrainingError
from fingrpo.grpo.loss import GRPOLoss, group_advantages, zero_std_fraction

LN2 = math.log(2.0)


def _batch():
    """N=2, T=2 with old = 0, so ρ = exp(logp). Row 0: Â=+1, ρ=[1.5, 0.9]; row 1: Â=-1, ρ=[0.5, masked].

    With ε=0.2, per-token policy losses: row 0: −min(1.5, 1.2) = −1.2 (high clip binds), −0.9;
    row 1: −min(−0.5, −0.8) = 0.8 (low clip binds). ref − logp = [[0, ln2], [−ln2, ·]] gives
    k3 KLs 0, 2 − ln2 − 1, 0.5 + ln2 − 1 (these two sum to exactly 0.5)."""
    logp = torch.log(torch.tensor([[1.5, 0.9], [0.5, 1.1]])).requires_grad_(True)
    old = torch.zeros(2, 2)
    ref = logp.detach() + torch.tensor([[0.0, LN2], [-LN2, 5.0]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    return logp, old, ref, adv, mask


KL1, KL2 = 2 - LN2 - 1, 0.5 + LN2 - 1

HAND = {
    # loss_type: (without KL, with KL beta=0.1)
    "grpo": ((-1.05 + 0.8) / 2, ((-1.2 - 0.9 + 0.1 * KL1) / 2 + 0.8 + 0.1 * KL2) / 2),
    "bnpo": (-1.3 / 3, (-1.3 + 0.1 * 0.5) / 3),
    "dapo": (-1.3 / 3, (-1.3 + 0.1 * 0.5) / 3),
    "dr_grpo": (-1.3 / 4, (-1.3 + 0.1 * 0.5) / 4),
}


@pytest.mark.parametrize("loss_type", sorted(HAND))
def test_hand_computed_values_without_and_with_kl(loss_type):
    logp, old, ref, adv, mask = _batch()
    loss, stats = GRPOLoss(epsilon=0.2, beta=0.0, loss_type=loss_type)(logp, old, None, adv, mask)
    assert float(loss.detach()) == pytest.approx(HAND[loss_type][0], abs=1e-6)
    assert math.isnan(stats["kl"])  # no reference given

    loss, stats = GRPOLoss(epsilon=0.2, beta=0.1, loss_type=loss_type)(logp, old, ref, adv, mask)
    assert float(loss.detach()) == pytest.approx(HAND[loss_type][1], abs=1e-6)
    assert stats["kl"] == pytest.approx(0.5 / 3, abs=1e-6)
    assert stats["policy_loss"] == pytest.approx(HAND[loss_type][0], abs=1e-6)


def test_stats_clip_fractions_and_ratios():
    logp, old, ref, adv, mask = _batch()
    _, stats = GRPOLoss(epsilon=0.2, beta=0.04)(logp, old, ref, adv, mask)
    assert stats["clip_fraction_low"] == pytest.approx(1 / 3)  # row 1 token 0: ρ=0.5 < 0.8, Â<0
    assert stats["clip_fraction_high"] == pytest.approx(1 / 3)  # row 0 token 0: ρ=1.5 > 1.2, Â>0
    assert stats["clip_fraction"] == pytest.approx(2 / 3)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.9 + 0.5) / 3, abs=1e-6)
    assert stats["ratio_min"] == pytest.approx(0.5, abs=1e-6)
    assert stats["ratio_max"] == pytest.approx(1.5, abs=1e-6)  # the masked ρ=1.1 is not counted
    assert stats["num_tokens"] == 3 and stats["num_sequences"] == 2
    assert all(isinstance(v, float) for v in stats.values())


def test_clip_not_active_against_the_advantage_sign():
    """ρ > 1+ε with Â < 0 (or ρ < 1−ε with Â > 0) is not clipped: min() keeps the unclipped term."""
    logp = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_(True)
    adv = torch.tensor([-1.0])
    loss, stats = GRPOLoss(epsilon=0.2, beta=0.0, loss_type="bnpo")(logp, torch.zeros(1, 2), None, adv,
                                                                    torch.ones(1, 2))
    # tokens: −min(−1.5, −1.2) = 1.5 (unclipped), −min(−0.5, −0.8) = 0.8 (clipped)
    assert float(loss.detach()) == pytest.approx((1.5 + 0.8) / 2, abs=1e-6)
    assert stats["clip_fraction_low"] == pytest.approx(0.5) and stats["clip_fraction_high"] == 0.0
    loss.backward()
    assert logp.grad[0, 0] == pytest.approx(1.5 / 2, abs=1e-6)  # d(−ρÂ)/dlogp = −Âρ, / 2 tokens
    assert logp.grad[0, 1] == 0.0  # clipped: no gradient


def test_epsilon_high_widens_the_upper_clip_only():
    logp, old, _, adv, mask = _batch()
    loss, stats = GRPOLoss(epsilon=0.2, epsilon_high=0.6, beta=0.0, loss_type="bnpo")(logp, old, None, adv, mask)
    # row 0 token 0: ρ=1.5 < 1.6 no longer clipped -> −1.5; the low side is unchanged
    assert float(loss.detach()) == pytest.approx((-1.5 - 0.9 + 0.8) / 3, abs=1e-6)
    assert stats["clip_fraction_high"] == 0.0 and stats["clip_fraction_low"] == pytest.approx(1 / 3)


def test_gradients_zero_on_clipped_tokens_and_policy_gradient_elsewhere():
    logp, old, _, adv, mask = _batch()
    loss, _ = GRPOLoss(epsilon=0.2, beta=0.0, loss_type="grpo")(logp, old, None, adv, mask)
    loss.backward()
    # grpo: d/dlogp of −ρÂ/(len·N) = −Âρ/(len·N); clipped tokens and the masked token get 0
    expected = torch.tensor([[0.0, -0.9 / (2 * 2)], [0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_first_pass_ratio_one_gives_the_policy_gradient(loss_type):
    """old_logprobs=None: ρ ≡ 1, loss value −mean(Â) and gradient −Â·∇logp / normaliser."""
    torch.manual_seed(0)
    logp = (-torch.rand(3, 4) * 3).requires_grad_(True)
    adv = torch.tensor([1.5, -0.5, 0.25])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    lengths = mask.sum(1, keepdim=True).float()
    loss, stats = GRPOLoss(beta=0.0, loss_type=loss_type)(logp, None, None, adv, mask)
    loss.backward()
    if loss_type == "grpo":
        expected = -adv[:, None] * mask / lengths / 3
    elif loss_type == "bnpo":
        expected = -adv[:, None] * mask / mask.sum()
    else:
        expected = -adv[:, None] * mask / (3 * 4)
    torch.testing.assert_close(logp.grad, expected.float(), atol=1e-7, rtol=1e-6)
    assert stats["ratio_min"] == stats["ratio_max"] == 1.0 and stats["clip_fraction"] == 0.0
    # value: Σ −Â·m / normaliser, i.e. <expected gradient, 1> since ρ = 1
    assert float(loss.detach()) == pytest.approx(float(expected.sum()), abs=1e-6)


def test_kl_gradient_and_value_at_reference():
    """At π_θ = π_ref the k3 KL is 0 with zero gradient; away from it, d KL/d logp = 1 − exp(ref − logp)."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -2.0 + LN2]])
    loss, stats = GRPOLoss(beta=1.0, loss_type="dr_grpo")(logp, None, ref, torch.zeros(1), torch.ones(1, 2))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(KL1 / 2, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, (1 - 2.0) / 2]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_masked_positions_do_not_affect_loss_or_gradients(loss_type):
    torch.manual_seed(1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    base = -torch.rand(2, 4)
    old = base + 0.3 * torch.randn(2, 4)
    ref = base + 0.3 * torch.randn(2, 4)
    adv = torch.tensor([0.7, -1.2])
    fn = GRPOLoss(epsilon=0.2, beta=0.04, loss_type=loss_type)

    clean = base.clone().requires_grad_(True)
    loss_a, stats_a = fn(clean, old, ref, adv, mask)
    loss_a.backward()

    garbage = torch.tensor([float("inf"), float("nan"), -float("inf")])
    dirty_in = base.clone()
    dirty_old, dirty_ref = old.clone(), ref.clone()
    pos = mask == 0
    dirty_in[pos] = torch.tensor([1e4, -1e4, 50.0])
    dirty_old[pos], dirty_ref[pos] = garbage, garbage.flip(0)
    dirty = dirty_in.requires_grad_(True)
    loss_b, stats_b = fn(dirty, dirty_old, dirty_ref, adv, mask)
    loss_b.backward()

    assert float(loss_a.detach()) == pytest.approx(float(loss_b.detach()), abs=1e-7)
    torch.testing.assert_close(clean.grad, dirty.grad)
    assert torch.isfinite(dirty.grad).all() and (dirty.grad[pos] == 0).all()
    for key in ("kl", "ratio_mean", "ratio_min", "ratio_max", "clip_fraction"):
        assert stats_a[key] == pytest.approx(stats_b[key])


def _reference_loss(logp, old, ref, adv, mask, eps_lo, eps_hi, beta, loss_type):
    """A scalar, loop-by-loop transcription of the formulas (independent of the vectorised code)."""
    n, t = len(logp), len(logp[0])
    per_seq, total, count = [], 0.0, 0
    for i in range(n):
        seq, seq_count = 0.0, 0
        for j in range(t):
            if not mask[i][j]:
                continue
            rho = math.exp(logp[i][j] - old[i][j])
            clipped = min(max(rho, 1 - eps_lo), 1 + eps_hi)
            ell = -min(rho * adv[i], clipped * adv[i])
            d = ref[i][j] - logp[i][j]
            ell += beta * (math.exp(d) - d - 1)
            seq, seq_count = seq + ell, seq_count + 1
        per_seq.append(seq / max(seq_count, 1))
        total, count = total + seq, count + seq_count
    if loss_type == "grpo":
        return sum(per_seq) / n
    if loss_type in ("bnpo", "dapo"):
        return total / count
    return total / (n * t)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_matches_scalar_reference_on_random_batches(seed, loss_type):
    g = torch.Generator().manual_seed(seed)
    n, t = 6, 5
    logp = -torch.rand(n, t, generator=g) * 4
    old = logp + 0.4 * torch.randn(n, t, generator=g)
    ref = logp + 0.4 * torch.randn(n, t, generator=g)
    adv = torch.randn(n, generator=g)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    loss, _ = GRPOLoss(epsilon=0.2, epsilon_high=0.28, beta=0.04, loss_type=loss_type)(logp, old, ref, adv, mask)
    expected = _reference_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                               0.2, 0.28, 0.04, loss_type)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_per_group_backward_with_full_batch_normalisers_equals_full_batch(loss_type):
    torch.manual_seed(2)
    n, t, g = 6, 5, 3
    base = -torch.rand(n, t) * 3
    old = base + 0.3 * torch.randn(n, t)
    ref = base + 0.3 * torch.randn(n, t)
    adv = torch.randn(n)
    mask = (torch.arange(t)[None] < torch.tensor([5, 2, 3, 1, 4, 2])[:, None]).long()
    fn = GRPOLoss(epsilon=0.2, beta=0.04, loss_type=loss_type)

    full = base.clone().requires_grad_(True)
    loss_full, _ = fn(full, old, ref, adv, mask)
    loss_full.backward()

    parts = base.clone().requires_grad_(True)
    norms = dict(num_sequences=n, num_tokens=int(mask.sum()), max_length=t)
    total = 0.0
    for rows in (slice(0, g), slice(g, n)):
        # each group trimmed to its own longest completion: dr_grpo still uses the full batch's T
        width = int(mask[rows].sum(1).max())
        loss, _ = fn(parts[rows, :width], old[rows, :width], ref[rows, :width], adv[rows], mask[rows, :width],
                     **norms)
        loss.backward()
        total += float(loss.detach())
    assert total == pytest.approx(float(loss_full.detach()), abs=1e-6)
    torch.testing.assert_close(parts.grad, full.grad, atol=1e-7, rtol=1e-5)


def test_errors_are_clear():
    logp = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="ref_logprobs is None but beta"):
        GRPOLoss(beta=0.04)(logp, None, None, torch.zeros(2), mask)
    with pytest.raises(ValueError, match="advantages must be"):
        GRPOLoss(beta=0.0)(logp, None, None, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="completion_mask has shape"):
        GRPOLoss(beta=0.0)(logp, None, None, torch.zeros(2), torch.ones(2, 4))
    with pytest.raises(ConfigError, match="loss_type"):
        GRPOLoss(loss_type="ppo")
    with pytest.raises(ConfigError, match="epsilon"):
        GRPOLoss(epsilon=0.0)


# ------------------------------------------------------------------------------------------------ advantages


def test_group_advantages_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, 1.0, 2.0])  # G = 3
    adv = group_advantages(rewards, group_size=3, scale="group", eps=1e-4)
    # group 0: mean 1/3, unbiased std sqrt(1/3); group 1: mean 2, std 1
    s0 = math.sqrt(1 / 3) + 1e-4
    expected = torch.tensor([(2 / 3) / s0, (-1 / 3) / s0, (-1 / 3) / s0, 1 / 1.0001, -1 / 1.0001, 0.0])
    torch.testing.assert_close(adv, expected)
    none = group_advantages(rewards, group_size=3, scale="none")
    torch.testing.assert_close(none, torch.tensor([2 / 3, -1 / 3, -1 / 3, 1.0, -1.0, 0.0]))
    batch = group_advantages(rewards, group_size=3, scale="batch")
    torch.testing.assert_close(batch, none / (rewards.std() + 1e-4))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_reward_groups_give_exact_zero_and_no_nan(scale):
    # 0.1 three times: (x − mean) in float leaves a ~1e-17 residue unless handled
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float64)
    adv = group_advantages(rewards, group_size=3, scale=scale)
    assert torch.equal(adv, torch.zeros(6, dtype=torch.float64))
    assert zero_std_fraction(rewards, 3) == 1.0
    mixed = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), group_size=2, scale=scale)
    assert torch.isfinite(mixed).all() and mixed[:2].eq(0).all() and mixed[2] < 0 < mixed[3]
    assert zero_std_fraction(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2) == 0.5


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(TrainingError, match="completion 3 \\(prompt 1\\)"):
        group_advantages(torch.tensor([0.0, 1.0, 0.0, float("nan")]), group_size=2)
    with pytest.raises(ConfigError, match="advantage scale"):
        group_advantages(torch.zeros(4), group_size=2, scale="global")


# ------------------------------------------------------------------------------- off-policy (gold-guided) rows


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_off_policy_rows_take_the_shaped_probability_and_its_gradient(loss_type):
    """A gold row: ℓ = −f(π_θ)·Â with f(x) = x/(x+γ); ∂ℓ/∂logπ = −Â·γπ/(π+γ)² (the written-down formula);
    on-policy rows keep ρ ≡ 1 (gradient −Â); ratio statistics count on-policy tokens only."""
    gamma = 0.1
    logp = torch.log(torch.tensor([[0.9, 0.05, 0.5], [0.3, 0.6, 0.2]], dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.5, -0.5], dtype=torch.float64)
    off = torch.tensor([True, False])
    loss_fn = GRPOLoss(epsilon=0.2, beta=0.0, loss_type=loss_type, off_policy_gamma=gamma)
    loss, stats = loss_fn(logp, None, None, adv, mask, off_policy=off)
    loss.backward()

    p = logp.detach().exp()
    per_token = torch.where(torch.tensor([[True], [False]]), -(p / (p + gamma)) * adv[:, None], -adv[:, None].expand(2, 3))
    dper = torch.where(torch.tensor([[True], [False]]), -adv[:, None] * gamma * p / (p + gamma) ** 2, -adv[:, None].expand(2, 3))
    m = mask.double()
    if loss_type == "dapo":
        expected, grad = (per_token * m).sum() / m.sum(), dper * m / m.sum()
    else:  # grpo: per-sequence token means, averaged over sequences
        lengths = m.sum(dim=1, keepdim=True)
        expected, grad = ((per_token * m).sum(dim=1) / lengths[:, 0]).sum() / 2, dper * m / lengths / 2
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)
    assert torch.allclose(logp.grad, grad, rtol=1e-10, atol=1e-14)
    assert logp.grad[0, 2] == 0.0  # masked
    # the unlikely gold token (p = 0.05) gets a larger push than the likely one (p = 0.9)
    assert abs(float(logp.grad[0, 1])) > abs(float(logp.grad[0, 0]))
    assert stats["ratio_mean"] == 1.0 and stats["clip_fraction"] == 0.0
    assert stats["num_tokens"] == 5.0


def test_off_policy_shape_and_gamma_are_checked():
    lp = torch.zeros(2, 2, requires_grad=True)
    with pytest.raises(ValueError, match="off_policy"):
        GRPOLoss(beta=0.0)(lp, None, None, torch.ones(2), torch.ones(2, 2), off_policy=torch.ones(3, dtype=torch.bool))
    with pytest.raises(Exception, match="gamma"):
        GRPOLoss(beta=0.0, off_policy_gamma=0.0)
