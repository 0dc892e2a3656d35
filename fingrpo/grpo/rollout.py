"""Rollouts and scoring with the prompt computed once per group.

FinQA prompts are long (~300-1,600 tokens) and completions short (<= 64 tokens), with G = 8 completions
per prompt. Recomputing the prompt for each of the G rows would cost G times the prompt, so both
phases share it:

- :func:`sample_groups` prefills each prompt once (batch 1) and keeps ONE copy of its key/value cache
  for its whole group: the decode batch has a row per prompt, fed the G current tokens of that prompt's
  completions as G queries under a mask that lets each see the prompt and its own earlier tokens. A
  decode step reads each prompt once, not G times (several prompts' groups share one decode batch:
  their caches are left-padded to a common length and masked, with per-row RoPE positions).
- :func:`completion_logprobs` runs the prompt once per group (WITH gradients when grad is enabled),
  expands its key/value cache to G rows as a view, then runs the G completions against it.
  The gradient of the shared prefix is the sum over the G completions, exactly as with G full
  sequences. :func:`naive_completion_logprobs` computes the same numbers from full prompt+completion
  sequences: the reference for tests and benchmarks.

Both give attention explicit masks; :mod:`fingrpo.grpo.attention` runs them without copying the cache per
query head (grouped-query models) and turns each group's queries into one matrix product.

    rollout = sample_groups(model, [tok(p).input_ids for p in prompts], group_size=8, max_new_tokens=64,
                            temperature=1.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                            generator=torch.Generator().manual_seed(0))
    logp = completion_logprobs(model, rollout.prompt_ids, rollout.completion_ids,
                               rollout.completion_mask, rollout.group_size)        # (N, T), with grad
    with model.disable_adapter(), torch.no_grad():                                   # the reference policy
        ref = completion_logprobs(model, rollout.prompt_ids, rollout.completion_ids,
                                  rollout.completion_mask, rollout.group_size)

Rows are grouped contiguously: completions ``p*G .. p*G+G-1`` belong to prompt ``p``. Callers put the
model in ``eval()`` mode (or use LoRA dropout 0) so sampling and scoring see the same function. The
model is any Hugging Face causal LM with an attention KV cache (``DynamicCache``) and ``sdpa`` or ``eager``
attention, or a peft model over one; ``transformers`` 5 names the cache argument ``cache=``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicLayer

from fingrpo.errors import ModelError
from fingrpo.grpo.attention import shared_prompt_attention

if TYPE_CHECKING:  # pragma: no cover
    from fingrpo.rewards import RewardResult

# ------------------------------------------------------------------------------------------------- the rollout


@dataclass
class Rollout:
    """G sampled completions for each of P prompts (N = P·G rows, grouped contiguously).

    - ``prompt_ids``: P LongTensors ``(L_i,)`` (lengths may differ).
    - ``completion_ids`` ``(N, T)``: sampled tokens, ``pad_token_id`` after each row's EOS;
      T = the longest completion (<= ``max_new_tokens``).
    - ``completion_mask`` ``(N, T)`` long: 1 up to and including the EOS token, 0 after.
    - ``truncated`` ``(N,)`` bool: no EOS within ``max_new_tokens`` (the mask is 1 to the end).
    """

    prompt_ids: list[torch.Tensor]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    group_size: int
    truncated: torch.Tensor

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_completions(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def completion_lengths(self) -> torch.Tensor:
        """``(N,)`` tokens per completion, EOS included."""
        return self.completion_mask.sum(dim=1)

    def group(self, p: int) -> slice:
        """The rows of prompt ``p``: ``rollout.completion_ids[rollout.group(p)]`` is ``(G, T)``."""
        return slice(p * self.group_size, (p + 1) * self.group_size)

    def completion_token_lists(self) -> list[list[int]]:
        """Each completion's tokens up to and including EOS (for decoding to text)."""
        lengths = self.completion_lengths.tolist()
        return [row[:n] for row, n in zip(self.completion_ids.tolist(), lengths)]


@dataclass
class GroupBatch:
    """One rollout micro-batch of a training step, from sampling to the update (N = P·G rows).

    Filled in order by the trainer: ``examples`` + ``rollout`` (sampling), ``completions`` (decoding),
    ``advantages`` (after the step's rewards are gathered), ``ref_logprobs`` / ``old_logprobs`` (the
    fixed log-prob passes, only when β > 0 / μ > 1).
    """

    examples: list[Any]  # (P,) the micro-batch's examples (PromptExample, or a ready prompt str)
    rollout: Rollout  # completion_ids (N, T), completion_mask (N, T), prompt_ids P x (L_i,)
    completions: list[str] | None = None  # (N,) decoded completion texts
    advantages: torch.Tensor | None = None  # (N,) float32 group-relative advantages, on the model's device
    ref_logprobs: list[torch.Tensor] | None = None  # P x (G, T): the reference policy (adapter off)
    old_logprobs: list[torch.Tensor] | None = None  # P x (G, T): the sampling policy (before the updates)
    off_policy: torch.Tensor | None = None  # (N,) bool: rows not sampled from the policy (gold-guided groups)

    def groups(self) -> Iterator[tuple[torch.Tensor, slice]]:
        """``(prompt_ids (L,), rows)`` per group: ``rollout.completion_ids[rows]`` is ``(G, T)``."""
        for p, prompt in enumerate(self.rollout.prompt_ids):
            yield prompt, self.rollout.group(p)


@dataclass
class StepRollout:
    """A training step's rollouts on this process, rewarded, with the figures of every process gathered
    (N_all = completions of all processes in rank order, N = this process's)."""

    batches: list[GroupBatch]  # this process's micro-batches (train.gradient_accumulation_steps)
    rewards: list[float]  # (N_all,) total reward per completion
    per_function: dict[str, list[float]]  # reward name -> (N_all,) its values
    failures: dict[str, int]  # reward name -> completions it failed on (raised / NaN), all processes
    errors: dict[str, str]  # reward name -> its first error message on this process
    lengths: list[float]  # (N_all,) completion lengths in tokens (EOS included)
    truncated: list[float]  # (N_all,) 1.0 where a completion reached max_new_tokens without EOS
    zero_std_group_fraction: float  # share of groups whose rewards are all equal (no signal)
    rollout_tokens_per_s: float  # generated tokens of all processes / this process's sampling time
    prompts: list[str]  # (N,) the prompt text of each local completion
    completions: list[str]  # (N,) the local completion texts
    scores: "RewardResult"  # the local completions' rewards (total, per function, failures)
    group_metrics: dict[str, float] = field(default_factory=dict)  # equal-reward split, dropped/refilled, gold share


# ------------------------------------------------------------------------------------------------- helpers


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _as_prompts(prompt_ids, device: torch.device) -> list[torch.Tensor]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.ndim != 2:
            raise ValueError(f"prompt_ids as a tensor must be (P, L), got shape {tuple(prompt_ids.shape)}")
        prompt_ids = list(prompt_ids)
    prompts = []
    for i, p in enumerate(prompt_ids):
        p = torch.as_tensor(p, dtype=torch.long, device=device)
        if p.ndim != 1 or p.numel() == 0:
            raise ValueError(f"prompt {i} must be a non-empty 1-D token sequence, got shape {tuple(p.shape)}")
        prompts.append(p)
    if not prompts:
        raise ValueError("no prompts given")
    return prompts


def _check_rows(prompts: list[torch.Tensor], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                group_size: int) -> None:
    if completion_ids.ndim != 2:
        raise ValueError(f"completion_ids must be (N, T), got shape {tuple(completion_ids.shape)}")
    if tuple(completion_mask.shape) != tuple(completion_ids.shape):
        raise ValueError(
            f"completion_mask {tuple(completion_mask.shape)} and completion_ids {tuple(completion_ids.shape)} differ"
        )
    if completion_ids.shape[0] != len(prompts) * group_size:
        raise ValueError(
            f"{completion_ids.shape[0]} completion rows but {len(prompts)} prompts x group_size {group_size} "
            f"= {len(prompts) * group_size}"
        )


def cache_of(out):
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise ModelError(
            "the model returned no KV cache (use_cache=True was ignored; gradient checkpointing in train mode "
            "disables the cache): shared-prompt rollouts and scoring need it"
        )
    return cache


def _attention_layers(cache) -> list:
    """The cache's layers, checked to hold plain (batch, kv_heads, seq, head_dim) key/value tensors."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ModelError(f"unsupported KV cache {type(cache).__name__}: expected a transformers DynamicCache")
    for i, layer in enumerate(layers):
        if not isinstance(getattr(layer, "keys", None), torch.Tensor) or getattr(layer, "is_sliding", False):
            raise ModelError(
                f"KV cache layer {i} ({type(layer).__name__}) is not a full-attention layer: "
                "the shared-prompt code supports full-attention caches only"
            )
    return list(layers)


def expand_cache_(cache, group_size: int, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Make a batch-1 cache serve ``group_size`` rows, in place, as views: ``(1, H, L, D) -> (G, H, L, D)``.

    ``prefix`` (per-layer ``(1, H, L, D)`` keys/values) resets the layers to it first, e.g. after an earlier
    forward appended to them; default: the layers' own. ``expand`` shares the storage, and autograd sums
    the G rows' gradients back into the prefix."""
    layers = _attention_layers(cache)
    for layer, (k, v) in zip(layers, prefix if prefix is not None else [(x.keys, x.values) for x in layers]):
        layer.keys, layer.values = k.expand(group_size, -1, -1, -1), v.expand(group_size, -1, -1, -1)


def prompt_forward(model, prompt: torch.Tensor):
    """One prompt's forward: its cache object, per-layer ``(1, H, L, D)`` (keys, values) and last logit ``(1, V)``."""
    pre = model(input_ids=prompt[None], use_cache=True, logits_to_keep=1)
    cache = cache_of(pre)
    return cache, [(layer.keys, layer.values) for layer in _attention_layers(cache)], pre.logits[:, -1, :]


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs (fp32) of ``tokens`` under ``logits``: ``(B, T, V)`` with ``(B, T)`` (token t under the
    distribution at t), or ``(B, V)`` with ``(B, K)`` (K tokens under one distribution per row)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    if logits.ndim == 2:
        return logp.gather(-1, tokens)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


def _eos_ids(model, eos_token_id) -> torch.Tensor:
    if eos_token_id is None:
        gen = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos_token_id is None:
        raise ModelError("no eos_token_id given and the model's generation config has none")
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _pick_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """``(B, V)`` next-token logits -> ``(B,)`` tokens: temperature, nucleus (HF's warpers), then sampling.

    ``temperature == 0`` is greedy (argmax). Sampling inverts each row's CDF at one uniform draw per row:
    exact (a token of probability 0 is never picked) and ~25x cheaper on CPU than ``torch.multinomial``,
    which draws an exponential variate for every vocabulary entry (49,152 per row for SmolLM2)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    if temperature != 1.0:
        logits = TemperatureLogitsWarper(temperature)(None, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p)(None, logits)
    cdf = torch.softmax(logits, dim=-1).cumsum_(dim=-1)  # (B, V)
    total = cdf[:, -1:].contiguous()
    u = torch.rand(total.shape, generator=generator, device=logits.device, dtype=cdf.dtype) * total
    picked = torch.searchsorted(cdf, u, right=True)  # the first token whose CDF exceeds u
    # u can round up to the total: never past the last token of non-zero probability
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(picked, last).squeeze(-1)


# ------------------------------------------------------------------------------------------------- sampling


class _PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer whose keys/values live in one buffer sized for the whole decode.

    transformers' ``DynamicLayer.update`` grows the cache with ``torch.cat`` at every decode step, i.e.
    it copies the whole cache once per generated token. Here a step writes its new positions in place
    and attention reads a view ``[:, :, :length]``. Only what a decode forward calls is provided.
    """

    is_sliding = False
    is_compileable = False
    is_initialized = True

    def __init__(self, buffer_keys: torch.Tensor, buffer_values: torch.Tensor, length: int):
        # no super().__init__(): it assigns .keys/.values, which are views of the buffers here
        self._k, self._v = buffer_keys, buffer_values  # (B, H, capacity, D)
        self._len = length
        self.device = buffer_keys.device

    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, :, : self._len]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :, : self._len]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self._len + key_states.shape[-2]
        if end > self._k.shape[-2]:  # cannot happen within max_new_tokens; grow rather than fail
            grow = max(end, 2 * self._k.shape[-2]) - self._k.shape[-2]
            self._k = torch.nn.functional.pad(self._k, (0, 0, 0, grow))
            self._v = torch.nn.functional.pad(self._v, (0, 0, 0, grow))
        self._k[:, :, self._len:end] = key_states
        self._v[:, :, self._len:end] = value_states
        self._len = end
        return self.keys, self.values

    def keep_rows_(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (finished prompts leave the decode batch; one copy of the buffer)."""
        self._k, self._v = self._k.index_select(0, rows), self._v.index_select(0, rows)

    def get_seq_length(self) -> int:
        return self._len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._len + query_length, 0

    def get_max_length(self) -> int:
        return -1


def _decode_cache(caches: list, lengths: list[int], capacity: int):
    """Merge P batch-1 prompt caches into one preallocated cache of P rows and ``capacity`` positions.

    Prompts are left-padded with zeros to ``max(L_i)`` (the caller masks the padding; zeros, not
    uninitialised memory, so a masked slot can never inject NaN through ``0 * value``). Each prompt's
    keys/values are copied once: its G completions share the row (see :func:`_decode_chunk`). Returns the
    first prompt's cache object with its layers replaced."""
    l_max = max(lengths)
    merged = caches[0]
    per_prompt = [_attention_layers(c) for c in caches]
    new_layers = []
    for li, layer in enumerate(_attention_layers(merged)):
        buffers = []
        for name in ("keys", "values"):
            first = getattr(layer, name)  # (1, H, L_0, D)
            _, h, _, d = first.shape
            buf = first.new_empty(len(caches), h, capacity, d)  # (P, H, capacity, D); decode slots: written before read
            for i, (layers, n) in enumerate(zip(per_prompt, lengths)):
                buf[i, :, : l_max - n].zero_()
                buf[i, :, l_max - n : l_max] = getattr(layers[li], name)[0]
            buffers.append(buf)
        new_layers.append(_PreallocatedLayer(buffers[0], buffers[1], l_max))
    merged.layers[:] = new_layers
    return merged


def _decode_mask(lengths: list[int], group_size: int, capacity: int, device: torch.device) -> torch.Tensor:
    """``(P, 1, G, capacity)`` bool: which cache slots completion g of prompt p may attend to.

    The packed decode layout of one prompt's row: its prompt right-aligned in ``[0, L_max)``, then the G
    completions interleaved, step s of completion g at slot ``L_max + s·G + g``. Completion g sees its
    prompt (not the left padding) and its own earlier tokens; a step slices the first
    ``L_max + (s+1)·G`` slots."""
    l_max, g = max(lengths), group_size
    allowed = torch.zeros(len(lengths), 1, g, capacity, dtype=torch.bool, device=device)
    for p, n in enumerate(lengths):
        allowed[p, 0, :, l_max - n : l_max] = True
    for j in range(g):
        allowed[:, 0, j, l_max + j :: g] = True
    return allowed


@dataclass
class _SharedPrefix:
    """The first ``length`` tokens every prompt of a call starts with, prefilled once: the cache object and
    its per-layer ``(1, H, length, D)`` keys/values."""

    cache: Any
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    length: int


def _shared_prefix(model, prompts: list[torch.Tensor]) -> _SharedPrefix | None:
    """Prefill the longest token prefix all ``prompts`` share (at most each one's length - 1: a prompt's last
    token must stay in its own forward, whose logit picks the first completion token); None when there is
    no such prefix or only one prompt."""
    if len(prompts) < 2:
        return None
    limit = min(int(p.numel()) for p in prompts) - 1
    first = prompts[0]
    n = 0
    while n < limit and all(bool(p[n] == first[n]) for p in prompts[1:]):
        n += 1
    if n == 0:
        return None
    cache, kv, _ = prompt_forward(model, first[:n])
    return _SharedPrefix(cache, kv, n)


def _prompt_prefill(model, prompt: torch.Tensor, prefix: _SharedPrefix | None):
    """One prompt's forward at batch 1 (no padding), logits at its last position only; with ``prefix``, only
    the tokens after it run, against the prefix's keys/values (RoPE positions continue from it). Returns
    the model output and a cache object holding the whole prompt."""
    if prefix is None:
        out = model(input_ids=prompt[None], use_cache=True, logits_to_keep=1)
        return out, cache_of(out)
    n, length = prefix.length, int(prompt.numel())
    expand_cache_(prefix.cache, 1, prefix.kv)  # back to the prefix alone (the previous prompt appended to it)
    out = model(input_ids=prompt[None, n:], attention_mask=torch.ones(1, length, dtype=torch.long, device=prompt.device),
                position_ids=torch.arange(n, length, device=prompt.device)[None], cache=prefix.cache, use_cache=True,
                logits_to_keep=1)
    # a snapshot: the layers' new (prefix + suffix) tensors, before the next prompt resets the shared object
    snapshot = copy.copy(prefix.cache)
    snapshot.layers = [copy.copy(layer) for layer in prefix.cache.layers]
    return out, snapshot


def _decode_chunk(model, prompts: list[torch.Tensor], group_size: int, max_new_tokens: int, temperature: float,
                  top_p: float, eos: torch.Tensor, pad_token_id: int, generator,
                  prefix: _SharedPrefix | None = None) -> tuple[torch.Tensor, ...]:
    """Sample G completions for each prompt of ``prompts`` in one decode batch of P·G rows.

    Each prompt's key/value cache is held once: the decode batch has one row per PROMPT, and a decode
    step feeds that row the G current tokens of its completions as G queries (RoPE position L_p + step
    for all of them), with a mask that lets each see the prompt and its own earlier tokens only
    (:func:`_decode_mask`). Attention then reads each prompt once per step for its whole group instead
    of G times, and the G queries of a group form one matrix product (``fingrpo_sdpa``)."""
    device = prompts[0].device
    g = group_size
    n = len(prompts) * g
    lengths = [int(p.numel()) for p in prompts]
    l_max = max(lengths)
    capacity = l_max + max_new_tokens * g
    with shared_prompt_attention(model) as attention:
        # 1. prefill: one forward per prompt at batch 1 (no padding, causal), logits only at its last position
        caches, first_logits = [], []
        for p in prompts:
            out, cache = _prompt_prefill(model, p, prefix)
            caches.append(cache)
            first_logits.append(out.logits[:, -1])  # (1, V)
        cache = _decode_cache(caches, lengths, capacity)  # (P, H, L_max + T·G, D)
        del caches
        mask = attention.mask(_decode_mask(lengths, g, capacity, device))  # (P, 1, G, capacity)
        positions = torch.tensor(lengths, device=device)[:, None].expand(-1, g)  # (P, G): RoPE position of step 0
        logits = torch.cat(first_logits).repeat_interleave(g, dim=0)  # (N, V)

        # 2. decode: one token for all N rows per step; finished rows are fed pad and masked out, and a
        # prompt whose G rows have all finished leaves the decode batch (see _compact)
        eos = eos.to(device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        active = torch.arange(len(prompts), device=device)  # the prompts still in the decode batch
        tokens, masks = [], []
        for step in range(max_new_tokens):
            sampled = _pick_tokens(logits, temperature, top_p, generator)  # (N,): every row draws, dead or not
            sampled = torch.where(done, torch.full_like(sampled, pad_token_id), sampled)
            masks.append(~done)  # 1 up to and including the EOS token
            tokens.append(sampled)
            done = done | torch.isin(sampled, eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            active, mask, positions = _compact(cache, active, done.view(-1, g).all(dim=1), mask, positions)
            out = model(input_ids=sampled.view(-1, g)[active], attention_mask=mask[..., : l_max + (step + 1) * g],
                        position_ids=positions + step, cache=cache, use_cache=True)
            # (P', G, V) -> the N rows (finished prompts' rows: zeros, never used: they are fed pad)
            logits = out.logits.new_zeros(len(prompts), g, out.logits.shape[-1])
            logits[active] = out.logits
            logits = logits.view(n, -1)
    return torch.stack(tokens, dim=1), torch.stack(masks, dim=1).long(), ~done


def _compact(cache, active: torch.Tensor, finished: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
    """Drop finished prompts from the decode batch once a quarter of its rows (or more) have finished.

    ``active``: the prompt indices now in the batch (its rows, in order); ``finished``: per prompt (all
    prompts), every one of its G rows has stopped. The cache, mask and RoPE positions lose the finished
    rows (one copy of the cache each time: waiting for a quarter bounds the copies at a few per decode,
    while each later step runs on fewer rows). The rows left compute the same function as before: a
    row's attention reads its own cache row only."""
    gone = finished[active]
    if not bool(gone.any()) or 4 * int(gone.sum()) < active.numel():
        return active, mask, positions
    keep = (~gone).nonzero().squeeze(1)
    for layer in _attention_layers(cache):
        layer.keep_rows_(keep)
    return active[keep], mask[keep], positions[keep]


def sample_groups(
    model,
    prompt_ids: Sequence[torch.Tensor] | Sequence[Sequence[int]],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    *,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    prompts_per_batch: int | None = None,
    share_prefix: bool = False,
) -> Rollout:
    """Sample ``group_size`` completions per prompt, each prompt prefilled once (KV cache shared by G rows).

    - ``temperature`` > 0 samples (``0`` is greedy); ``top_p`` < 1 keeps the nucleus (HF's warpers).
    - ``eos_token_id``: an id or a list (default: the model's generation config); each row stops at its
      first EOS, the batch when every row has stopped or after ``max_new_tokens``.
    - ``pad_token_id`` fills rows after their EOS (default: the first EOS id).
    - ``generator``: a seeded ``torch.Generator`` on the model's device makes the draw reproducible
      (for the same prompts, arguments and ``prompts_per_batch``).
    - ``prompts_per_batch``: how many prompts' groups decode together (None: all). Prefill stays per prompt
      (no padding); in the decode batch shorter prompts' caches are left-padded and masked, each row keeps
      its own RoPE positions, so each row computes the same function as it would alone.
    - ``share_prefix``: the token prefix all prompts start with (a system prompt) is prefilled once and
      each prompt's prefill runs only its own tokens against it (the same function up to float rounding;
      evaluation's greedy decoding of many prompts with one system prompt prefills about half the tokens).

    >>> r = sample_groups(model, [[1, 5, 6], [1, 7]], group_size=4, max_new_tokens=16, eos_token_id=2,
    ...                   pad_token_id=2, generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
    >>> r.completion_ids.shape[0], r.completion_mask.shape == r.completion_ids.shape  # doctest: +SKIP
    (8, True)
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    device = _model_device(model)
    prompts = _as_prompts(prompt_ids, device)
    eos = _eos_ids(model, eos_token_id)
    pad = int(eos[0]) if pad_token_id is None else int(pad_token_id)
    chunk = len(prompts) if prompts_per_batch is None else max(1, int(prompts_per_batch))

    ids, masks, truncated = [], [], []
    with torch.inference_mode():
        prefix = _shared_prefix(model, prompts) if share_prefix else None
        for start in range(0, len(prompts), chunk):
            c_ids, c_mask, c_trunc = _decode_chunk(model, prompts[start:start + chunk], group_size, max_new_tokens,
                                                   temperature, top_p, eos, pad, generator, prefix)
            ids.append(c_ids)
            masks.append(c_mask)
            truncated.append(c_trunc)
    # chunks may stop at different lengths: right-pad to the longest
    t = max(x.shape[1] for x in ids)
    ids = [torch.nn.functional.pad(x, (0, t - x.shape[1]), value=pad) for x in ids]
    masks = [torch.nn.functional.pad(x, (0, t - x.shape[1]), value=0) for x in masks]
    # clone: leave inference mode's tensors behind so callers may use them in autograd
    return Rollout(
        prompt_ids=[p.clone() for p in prompts],
        completion_ids=torch.cat(ids).clone(),
        completion_mask=torch.cat(masks).clone(),
        group_size=group_size,
        truncated=torch.cat(truncated).clone(),
    )


# ------------------------------------------------------------------------------------------------- scoring


def _logprob_inputs(model, prompt_ids, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                    group_size: int):
    """(device, prompts, completion_ids, completion_mask) on the model's device, rows checked."""
    device = _model_device(model)
    prompts = _as_prompts(prompt_ids, device)
    completion_ids = completion_ids.to(device)
    completion_mask = completion_mask.to(device)
    _check_rows(prompts, completion_ids, completion_mask, group_size)
    return device, prompts, completion_ids, completion_mask


def _zero_masked(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(G, T)`` log-probs with masked positions set to 0 (``where``: no NaN/inf leaks from padding)."""
    return torch.where(mask.bool(), logp, torch.zeros_like(logp))


def _logprob_mask(prompt_length: int, fed: int, device: torch.device) -> torch.Tensor:
    """``(1, 1, fed, prompt_length + fed)`` bool, shared by the G rows: every fed completion position sees
    the whole prompt and its own row's positions up to itself (causal)."""
    allowed = torch.ones(1, 1, fed, prompt_length + fed, dtype=torch.bool, device=device)
    allowed[0, 0, :, prompt_length:] = torch.ones(fed, fed, dtype=torch.bool, device=device).tril_()
    return allowed


def _rows_logprobs(model, cache, prefix: list[tuple[torch.Tensor, torch.Tensor]], first: torch.Tensor, length: int,
                comp: torch.Tensor, temperature: float, attention) -> torch.Tensor:
    """``(g, T)`` log-probs of ``g`` completion rows of one prompt, given the prompt's forward: its per-layer
    ``(1, H, L, D)`` keys/values ``prefix`` and its last logit ``first`` ``(1, V)``. ``cache`` (the prompt's
    cache object) is reset to the prefix, expanded to the g rows as views, before the completions run."""
    g, t = comp.shape
    logp = _token_logprobs(first, comp[None, :, 0], temperature).view(g, 1)  # token 0: one distribution
    if t == 1:
        return logp
    expand_cache_(cache, g, prefix)
    positions = torch.arange(length, length + t - 1, device=comp.device)[None].expand(g, -1)  # (g, T-1)
    out = model(input_ids=comp[:, :-1], attention_mask=attention.mask(_logprob_mask(length, t - 1, comp.device)),
                position_ids=positions, cache=cache, use_cache=True)
    return torch.cat([logp, _token_logprobs(out.logits, comp[:, 1:], temperature)], dim=1)  # (g, T)


def completion_logprobs(
    model,
    prompt_ids: Sequence[torch.Tensor] | Sequence[Sequence[int]],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    group_size: int,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probabilities ``(N, T)`` (fp32) of each completion token, the prompt computed once per group.

    Per group: one forward over the prompt ``(1, L)`` (its KV cache and last logit, with gradients when
    grad is enabled), the cache expanded to G rows as a view, one forward over the completions
    ``(G, T-1)`` at positions L..L+T-2 with an explicit mask over prefix + completion (one mask for the
    G rows; grouped query heads packed, see :mod:`fingrpo.grpo.attention`). Token t is scored from the
    logits at the position before it (token 0 from the prompt's last logit), so the last completion token
    is never fed in. Only completion positions get vocab logits. Masked positions are returned as 0.
    ``temperature`` scales the logits as in sampling (1: the plain policy). One backward of (a function
    of) the result reaches the prompt's forward too; :class:`GroupLogprobs` does the same in row chunks.

    Equal (up to float rounding) to :func:`naive_completion_logprobs`, values and gradients.
    """
    device, prompts, completion_ids, completion_mask = _logprob_inputs(
        model, prompt_ids, completion_ids, completion_mask, group_size)
    g = group_size
    out_rows = []
    with shared_prompt_attention(model) as attention:
        for p, prompt in enumerate(prompts):
            rows = slice(p * g, (p + 1) * g)
            cache, prefix, first = prompt_forward(model, prompt)
            logp = _rows_logprobs(model, cache, prefix, first, prompt.numel(), completion_ids[rows], temperature,
                               attention)
            out_rows.append(_zero_masked(logp, completion_mask[rows]))
    return torch.cat(out_rows)


class GroupLogprobs:
    """One prompt's completions scored in row chunks against ONE forward of the prompt, for training.

    ``completion_logprobs`` keeps the whole group's graph (the prompt's and all G completions'
    activations) alive until the backward. Here, with gradients enabled, the prompt's keys/values and
    last logit are cut from its graph into leaves; each chunk of completion rows runs against them and its
    own backward frees its activations while the leaves accumulate their gradients;
    :meth:`backward_prompt` then back-propagates those sums through the prompt's forward once. The peak
    holds the prompt's activations plus ONE chunk's, and the gradients are exactly those of one backward
    over the whole group (the prompt's gradient is linear in the sum of its rows' contributions).

        group = GroupLogprobs(model, prompt, temperature=1.0)
        for rows in (slice(0, 4), slice(4, 8)):
            logp = group.logprobs(completion_ids[rows], completion_mask[rows])   # (4, T), with grad
            loss_fn(logp, ...).backward()                                        # LoRA + leaf gradients
        group.backward_prompt()                                                 # the prompt's share, once

    Without gradients (``torch.no_grad``) it is a plain chunked log-prob pass and ``backward_prompt`` does nothing.
    Use it as a context manager or call ``close`` to restore the model's attention implementation.
    """

    def __init__(self, model, prompt_ids: torch.Tensor | Sequence[int], *, temperature: float = 1.0) -> None:
        self.model, self.temperature = model, temperature
        (self.prompt,) = _as_prompts([prompt_ids], _model_device(model))
        self._attention_cm = shared_prompt_attention(model)
        self._attention = self._attention_cm.__enter__()
        try:
            self._cache, prefix, first = prompt_forward(model, self.prompt)
        except BaseException:
            self.close()
            raise
        outputs = [t for kv in prefix for t in kv] + [first]
        # the prompt graph's ends that carry gradient (not e.g. layer 0's keys without a LoRA on k_proj)
        self._outputs = [t for t in outputs if t.requires_grad]
        leaves = [t.detach().requires_grad_() if t.requires_grad else t for t in outputs]
        self._leaves = [leaf for leaf in leaves if leaf.requires_grad]
        self._prefix = list(zip(leaves[:-1:2], leaves[1:-1:2]))
        self._first = leaves[-1]

    def logprobs(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """``(g, T)`` fp32 log-probs of g completion rows of this prompt (masked positions 0)."""
        if not self._prefix:
            raise RuntimeError("backward_prompt() was called: this GroupLogprobs's prompt forward is spent")
        device = self.prompt.device
        completion_ids, completion_mask = completion_ids.to(device), completion_mask.to(device)
        _check_rows([self.prompt], completion_ids, completion_mask, completion_ids.shape[0])
        logp = _rows_logprobs(self.model, self._cache, self._prefix, self._first, self.prompt.numel(), completion_ids,
                           self.temperature, self._attention)
        return _zero_masked(logp, completion_mask)

    def backward_prompt(self) -> None:
        """Back-propagate the gradients the chunks accumulated on the prompt's keys/values and last logit
        through the prompt's forward (once; a no-op without gradients or when no chunk reached them)."""
        pairs = [(out, leaf.grad) for out, leaf in zip(self._outputs, self._leaves) if leaf.grad is not None]
        self._outputs, self._leaves, self._prefix = [], [], []
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

    def close(self) -> None:
        """Restore the model's attention implementation (idempotent)."""
        if self._attention_cm is not None:
            cm, self._attention_cm = self._attention_cm, None
            cm.__exit__(None, None, None)

    def __enter__(self) -> "GroupLogprobs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def naive_completion_logprobs(
    model,
    prompt_ids: Sequence[torch.Tensor] | Sequence[Sequence[int]],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    group_size: int,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The reference for :func:`completion_logprobs`: per group, G full prompt+completion sequences
    ``(G, L+T)`` in one plain forward (the prompt recomputed G times, vocab logits at every position)."""
    device, prompts, completion_ids, completion_mask = _logprob_inputs(
        model, prompt_ids, completion_ids, completion_mask, group_size)
    g, t = group_size, completion_ids.shape[1]
    out_rows = []
    for p, prompt in enumerate(prompts):
        comp = completion_ids[p * g:(p + 1) * g]  # (G, T)
        length = prompt.numel()
        full = torch.cat([prompt[None].expand(g, -1), comp], dim=1)  # (G, L+T)
        logits = model(input_ids=full, attention_mask=torch.ones_like(full), use_cache=False).logits
        logp = _token_logprobs(logits[:, length - 1:length + t - 1], comp, temperature)  # (G, T)
        out_rows.append(_zero_masked(logp, completion_mask[p * g:(p + 1) * g]))
    return torch.cat(out_rows)
