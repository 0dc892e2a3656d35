"""The GRPO objective: group-relative advantages, the clipped surrogate, the k3 KL, and its aggregations.

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])   # 2 prompts x G=3, grouped contiguously
    adv = group_advantages(rewards, group_size=3)               # group 2 has equal rewards -> exactly 0
    loss_fn = GRPOLoss(epsilon=0.2, beta=0.04, loss_type="grpo")
    loss, stats = loss_fn(logprobs, old_logprobs, ref_logprobs, adv, completion_mask)   # (N, T) each
    loss.backward(); stats["kl"], stats["clip_fraction_low"], ...

For each completion i (advantage Â_i) and token t (where this sits in a training step: ``docs/architecture.md``,
"One record, end to end"):

    ρ = exp(log π_θ − log π_old)
    ℓ = −min(ρ·Â, clip(ρ, 1−ε_low, 1+ε_high)·Â) + β·KL,     KL = exp(ref − logp) − (ref − logp) − 1

**Off-policy rows** (gold-guided groups, ``off_policy[i]`` true: the gold reply put in place of a sampled
completion, as LUFFY does): the sampling policy of that row is unknown, so there is no ratio to clip. Its
tokens use the shaped probability instead (γ = ``off_policy_gamma``, π_θ at the sampling temperature):

    ℓ_it = −f(π_θ(o_it))·Â_i + β·KL,     f(x) = x / (x + γ),     ∂ℓ/∂log π_θ = −Â·γ·π_θ / (π_θ + γ)²

(the gradient of a token the policy already finds likely is damped; an unlikely one still teaches,
unlike the clipped ratio, which would stop at 1 + ε_high). Ratio and clip statistics count on-policy
tokens only.

Aggregations (m = completion mask, |o_i| = Σ_t m_it, N sequences, T = ``completion_mask.shape[1]``):

    grpo        Σ_i (Σ_t ℓ_it m_it / |o_i|) / N
    bnpo, dapo  Σ_it ℓ_it m_it / Σ_it m_it
    dr_grpo     Σ_it ℓ_it m_it / (N · T)

**Back-propagating one group at a time.** The normalisers (N, Σ m, T) can be overridden with
``num_sequences=``, ``num_tokens=`` and ``max_length=``. Called on a slice of the batch with the normalisers
of the FULL batch, the per-slice losses add up to exactly the full-batch loss (and so do their gradients),
so a trainer can ``loss.backward()`` per group and keep only one group's activations alive::

    full = dict(num_sequences=N, num_tokens=int(mask.sum()), max_length=mask.shape[1])
    for rows in groups:  # slices of the (N, T) tensors
        loss, stats = loss_fn(lp[rows], old[rows], ref[rows], adv[rows], mask[rows], **full)
        loss.backward()    # accumulates the full-batch gradient

(For ``dr_grpo`` pass the full batch's ``max_length``; slices may then be narrower than it.)
"""

from __future__ import annotations

from typing import Literal

import torch

from fingrpo.errors import ConfigError, TrainingError

LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dapo", "dr_grpo")
ADVANTAGE_SCALES: tuple[str, ...] = ("group", "batch", "none")


# ----------------------------------------------------------------------------------------------------- advantages


def _check_rewards(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    rewards = torch.as_tensor(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    bad = (~torch.isfinite(rewards)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise TrainingError(
            f"reward of completion {i} (prompt {i // group_size}) is {float(rewards[i])}: rewards must be finite "
            "(rewards.nan_value replaces abstentions)"
        )
    return rewards


def _equal_groups(grouped: torch.Tensor) -> torch.Tensor:
    """(P, G) -> (P,) bool: every reward of the group is identical (an exact test, not std < eps)."""
    return grouped.amax(dim=1) == grouped.amin(dim=1)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-relative advantages Â_i = (R_i − mean_group(R)) / (std + eps).

    ``rewards`` is ``(N,)`` with the G completions of each prompt contiguous (rows ``p*G .. p*G+G-1``).
    ``scale``: ``"group"`` divides by the group's std, ``"batch"`` by the std of all N rewards,
    ``"none"`` only centres (Dr. GRPO). std is the unbiased one (as TRL). A group whose rewards are all
    equal gets exactly 0 (not a tiny rounding residue, never NaN): it carries no learning signal.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), group_size=2, scale="none")
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    if scale not in ADVANTAGE_SCALES:
        raise ConfigError(f"advantage scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    rewards = _check_rewards(rewards, group_size)
    rewards = rewards.to(torch.float32) if not rewards.is_floating_point() else rewards
    grouped = rewards.view(-1, group_size)  # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (P, G)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
        centred = centred / (std + eps)
    # exact zeros for equal-reward groups: (x - mean) of identical floats can leave ~1e-17 residues
    centred = torch.where(_equal_groups(grouped)[:, None], torch.zeros_like(centred), centred)
    return centred.reshape(-1)


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose G rewards are all equal (zero advantage, no gradient signal).

    >>> zero_std_fraction(torch.tensor([1.0, 0.0, 0.5, 0.5]), group_size=2)
    0.5
    """
    rewards = _check_rewards(rewards, group_size)
    return float(_equal_groups(rewards.view(-1, group_size)).float().mean())


# ----------------------------------------------------------------------------------------------------- the loss


class GRPOLoss:
    """The clipped GRPO surrogate with a k3 KL penalty; see the module docstring for the formulas.

    ``loss_fn(logprobs, old_logprobs, ref_logprobs, advantages, completion_mask) -> (loss, stats)``

    - ``logprobs`` ``(N, T)``: log π_θ of the completion tokens (with gradient).
    - ``old_logprobs`` ``(N, T)`` or None: log π_old of the sampling policy. None means the first
      (on-policy) pass: ρ = exp(logp − logp.detach()) ≡ 1 but keeps the gradient ∇logp.
    - ``ref_logprobs`` ``(N, T)`` or None: the reference policy (None allowed only when ``beta == 0``).
    - ``advantages`` ``(N,)``; ``completion_mask`` ``(N, T)`` (1 for completion tokens incl. EOS, 0 after).

    Masked positions never reach the loss or the gradients, even when they hold inf/NaN garbage.
    ``stats`` holds python floats: ``loss``, ``policy_loss``, ``kl`` (masked token mean; NaN without
    ``ref_logprobs``; reported also when ``beta == 0``), ``ratio_mean``,
    ``ratio_min``, ``ratio_max``, ``clip_fraction_low`` (ρ < 1−ε_low with Â < 0: the clip binds on the low
    side), ``clip_fraction_high`` (ρ > 1+ε_high with Â > 0), ``clip_fraction`` (either), ``num_tokens`` and
    ``num_sequences`` of this call (weights for averaging stats over slices). Token stats are NaN when the
    mask is empty.

    >>> loss_fn = GRPOLoss(epsilon=0.2, beta=0.0, loss_type="dr_grpo")
    >>> lp = torch.zeros(1, 2, requires_grad=True)
    >>> loss, stats = loss_fn(lp, None, None, torch.tensor([1.0]), torch.tensor([[1, 0]]))
    >>> float(loss.detach()), stats["ratio_mean"]
    (-0.5, 1.0)
    """

    def __init__(
        self,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.04,
        loss_type: LossType = "grpo",
        off_policy_gamma: float = 0.1,
    ) -> None:
        if not epsilon > 0:
            raise ConfigError(f"train.epsilon must be > 0, got {epsilon}")
        if epsilon_high is not None and not epsilon_high > 0:
            raise ConfigError(f"train.epsilon_high must be > 0 or null, got {epsilon_high}")
        if not beta >= 0:
            raise ConfigError(f"train.beta must be >= 0, got {beta}")
        if loss_type not in LOSS_TYPES:
            raise ConfigError(f"train.loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if not off_policy_gamma > 0:
            raise ConfigError(f"train.gold_guidance_gamma must be > 0, got {off_policy_gamma}")
        self.off_policy_gamma = float(off_policy_gamma)
        self.epsilon_low = float(epsilon)
        self.epsilon_high = float(epsilon if epsilon_high is None else epsilon_high)
        self.beta = float(beta)
        self.loss_type = loss_type

    def __repr__(self) -> str:
        return (
            f"GRPOLoss(epsilon={self.epsilon_low}, epsilon_high={self.epsilon_high}, beta={self.beta}, "
            f"loss_type={self.loss_type!r})"
        )

    def __call__(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        ref_logprobs: torch.Tensor | None,
        advantages: torch.Tensor,
        completion_mask: torch.Tensor,
        *,
        num_sequences: int | None = None,
        num_tokens: int | float | None = None,
        max_length: int | None = None,
        off_policy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return ``(loss, stats)``. The keyword overrides replace the normalisers (module docstring):
        ``num_sequences`` (grpo, dr_grpo; default N), ``num_tokens`` (bnpo/dapo; default mask sum),
        ``max_length`` (dr_grpo; default T). ``off_policy`` ``(N,)`` bool marks rows not sampled from the
        policy (gold replies): they take the shaped-probability term of the module docstring."""
        n, t = self._check_shapes(logprobs, old_logprobs, ref_logprobs, advantages, completion_mask)
        mask = completion_mask.to(device=logprobs.device).bool()  # (N, T)
        maskf = mask.to(logprobs.dtype)
        adv = advantages.to(device=logprobs.device, dtype=logprobs.dtype)[:, None]  # (N, 1)

        # Sanitise before exp(): garbage (inf, NaN) at masked positions must not leak into the loss, and a
        # zero upstream gradient times an inf local derivative would still give NaN in backward.
        zero = torch.zeros_like(logprobs)
        old = logprobs.detach() if old_logprobs is None else old_logprobs.to(logprobs.dtype)
        log_ratio = torch.where(mask, logprobs - old, zero)  # (N, T); 0 (ρ = 1) where masked
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, 1.0 - self.epsilon_low, 1.0 + self.epsilon_high)
        per_token = -torch.minimum(ratio * adv, clipped * adv)  # (N, T)
        ratio_mask = mask
        if off_policy is not None:
            if tuple(off_policy.shape) != (n,):
                raise ValueError(f"off_policy must be (N,) = {(n,)}, got {tuple(off_policy.shape)}")
            off = off_policy.to(device=logprobs.device).bool()[:, None] & mask  # (N, T)
            if bool(off.any()):
                prob = torch.exp(torch.where(mask, logprobs, zero))  # π_θ; masked entries exp(0) = 1, unused
                shaped = prob / (prob + self.off_policy_gamma)
                per_token = torch.where(off, -shaped * adv, per_token)
            ratio_mask = mask & ~off
        policy_per_token = per_token

        kl = None
        if ref_logprobs is not None:  # with beta == 0 the KL is still reported, not optimised
            delta = torch.where(mask, ref_logprobs.to(logprobs.dtype) - logprobs, zero)  # log(π_ref/π_θ)
            kl = torch.exp(delta) - delta - 1.0  # (N, T), k3 estimator, >= 0
            if self.beta > 0:
                per_token = per_token + self.beta * kl

        loss = self._aggregate(per_token, maskf, n, t, num_sequences, num_tokens, max_length)
        stats = self._stats(loss, policy_per_token, kl, ratio, adv, mask, maskf, n, t,
                            num_sequences, num_tokens, max_length, ratio_mask)
        return loss, stats

    # -------------------------------------------------------------------------------------------- internals

    def _check_shapes(self, logprobs, old_logprobs, ref_logprobs, advantages, completion_mask) -> tuple[int, int]:
        if logprobs.ndim != 2:
            raise ValueError(f"logprobs must be (N, T), got shape {tuple(logprobs.shape)}")
        shape = tuple(logprobs.shape)
        for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                        ("completion_mask", completion_mask)):
            if x is not None and tuple(x.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(x.shape)}, logprobs has {shape}")
        if tuple(advantages.shape) != shape[:1]:
            raise ValueError(f"advantages must be (N,) = {shape[:1]}, got {tuple(advantages.shape)}")
        if self.beta > 0 and ref_logprobs is None:
            raise ValueError(f"ref_logprobs is None but beta={self.beta} > 0: the KL term needs the reference")
        return shape[0], shape[1]

    def _aggregate(self, per_token, maskf, n, t, num_sequences, num_tokens, max_length) -> torch.Tensor:
        masked = per_token * maskf  # (N, T); masked entries are finite (sanitised), so * 0 is exactly 0
        if self.loss_type == "grpo":
            lengths = maskf.sum(dim=1).clamp(min=1.0)  # (N,); an empty row contributes 0
            return (masked.sum(dim=1) / lengths).sum() / (num_sequences if num_sequences is not None else n)
        if self.loss_type in ("bnpo", "dapo"):
            denom = num_tokens if num_tokens is not None else maskf.sum().clamp(min=1.0)
            return masked.sum() / denom
        # dr_grpo: a constant normaliser, so no length bias
        return masked.sum() / ((num_sequences if num_sequences is not None else n)
                               * (max_length if max_length is not None else t))

    @torch.no_grad()
    def _stats(self, loss, policy_per_token, kl, ratio, adv, mask, maskf, n, t,
               num_sequences, num_tokens, max_length, ratio_mask=None) -> dict[str, float]:
        count = int(mask.sum())
        nan = float("nan")
        ratio_mask = mask if ratio_mask is None else ratio_mask
        on_count = int(ratio_mask.sum())

        def masked_mean(x: torch.Tensor) -> float:
            return float((x * maskf).sum() / count) if count else nan

        low = (ratio < 1.0 - self.epsilon_low) & (adv < 0) & ratio_mask
        high = (ratio > 1.0 + self.epsilon_high) & (adv > 0) & ratio_mask
        stats = {
            "loss": float(loss.detach()),
            "policy_loss": float(self._aggregate(policy_per_token.detach(), maskf, n, t,
                                                 num_sequences, num_tokens, max_length)),
            "kl": masked_mean(kl) if kl is not None else nan,
            "ratio_mean": float(ratio[ratio_mask].mean()) if on_count else nan,
            "ratio_min": float(ratio[ratio_mask].min()) if on_count else nan,
            "ratio_max": float(ratio[ratio_mask].max()) if on_count else nan,
            "clip_fraction_low": float(low.sum()) / on_count if on_count else nan,
            "clip_fraction_high": float(high.sum()) / on_count if on_count else nan,
            "num_tokens": float(count),
            "num_sequences": float(n),
        }
        stats["clip_fraction"] = (
            stats["clip_fraction_low"] + stats["clip_fraction_high"] if on_count else nan
        )
        return stats
