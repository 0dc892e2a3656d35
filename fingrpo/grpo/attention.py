"""Attention for the shared-prompt layouts of :mod:`fingrpo.grpo.rollout`: explicit masks, GQA without copies.

Shared-prompt decoding and scoring give attention an explicit boolean mask (B, 1, Q, K) (which key
each query may see: its own prompt's tokens and its own completion's). Two things make that slow with
transformers' ``sdpa`` attention on a grouped-query model (SmolLM2: 9 query heads on 3 key/value heads):

- with a mask and more than one query, ``sdpa`` repeats every key/value head for its query heads
  (``repeat_kv``: a copy of the whole cache, 3x, per layer and call, and its gradient in the backward);
- a decode step with one query per row runs a separate (1 x K) attention per row and head.

``fingrpo_sdpa`` (registered with transformers' ``AttentionInterface``) packs the query heads that share a
key/value head into the query axis instead: ``(B, H, Q, D) -> (B, H_kv, (H/H_kv)·Q, D)``, with the mask's
rows repeated to match (a few KB-MB of booleans), and calls ``scaled_dot_product_attention`` once on the
key/value heads as they are. The arithmetic is the same; nothing the size of the cache is copied, and the
packed queries of a group form one matrix product against the shared keys. Every other call (no mask, one
key/value head per query head, a head-specific mask, ...) is passed to transformers' ``sdpa`` unchanged.

    with shared_prompt_attention(model) as attn:      # sdpa -> fingrpo_sdpa for the block (restored after)
        mask = attn.mask(allowed)                      # bool (B, 1, Q, K) -> the format `attn` expects
        model(input_ids=..., attention_mask=mask, position_ids=..., cache=...)

``eager`` attention takes the same masks as an additive float mask; implementations that accept no
arbitrary mask (flash-attention kernels) are refused with a clear error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fingrpo.errors import ModelError

IMPLEMENTATION = "fingrpo_sdpa"
# implementations whose attention takes an explicit (B, 1, Q, K) mask
_BOOL_MASK = {"sdpa", IMPLEMENTATION}
_FLOAT_MASK = {"eager"}


def gqa_packed_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs):
    """transformers' ``sdpa`` attention, with grouped query heads packed into the query axis when a mask
    shared by all heads is given (see the module docstring). Returns ``(B, Q, H, D)``, ``None``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, q, d = query.shape
    h_kv = key.shape[1]
    if (attention_mask is None or h == h_kv or h % h_kv or attention_mask.ndim != 4 or attention_mask.shape[1] != 1
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or kwargs.get("output_attentions", False)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    n_rep = h // h_kv
    # query head k·n_rep + r uses key/value head k (transformers' repeat_kv order): row r·Q + i of block k
    packed = query.reshape(b, h_kv, n_rep * q, d)
    mask = attention_mask.repeat(1, 1, n_rep, 1)  # (B or 1, 1, n_rep·Q, K), row r·Q + i = row i
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(out.shape[0], h, q, d).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, gqa_packed_sdpa)
    # the masks transformers builds itself (a prefill with no mask given) are sdpa's
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


_register()


def _config(model):
    """The config object the attention layers read ``_attn_implementation`` from (peft: the base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None:
        raise ModelError(f"{type(model).__name__} has no config: shared-prompt attention needs a transformers model")
    return config


class SharedPromptAttention:
    """What :func:`shared_prompt_attention` yields: the implementation in use and its mask format."""

    def __init__(self, implementation: str, dtype: torch.dtype) -> None:
        self.implementation = implementation
        self.dtype = dtype

    def mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean "may attend" mask ``(B, 1, Q, K)`` in the format the implementation takes."""
        if self.implementation in _BOOL_MASK:
            return allowed
        # eager adds the mask to the scores
        return torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(self.dtype).min)


@contextlib.contextmanager
def shared_prompt_attention(model) -> Iterator[SharedPromptAttention]:
    """Run the block with ``fingrpo_sdpa`` when the model uses ``sdpa`` (restored afterwards, also on error).

    Raises :class:`ModelError` for an attention implementation that takes no explicit 4-D mask."""
    config = _config(model)
    current = getattr(config, "_attn_implementation", None) or "eager"
    if current not in _BOOL_MASK | _FLOAT_MASK:
        raise ModelError(
            f"attention implementation {current!r} takes no explicit attention mask, which shared-prompt "
            "sampling and scoring need: load the model with attn_implementation='sdpa' (the default) or 'eager'"
        )
    try:
        dtype = next(model.parameters()).dtype
    except StopIteration:  # pragma: no cover - a model without parameters
        dtype = torch.float32
    if current != "sdpa":
        yield SharedPromptAttention(current, dtype)
        return
    config._attn_implementation = IMPLEMENTATION
    try:
        yield SharedPromptAttention(IMPLEMENTATION, dtype)
    finally:
        config._attn_implementation = current
