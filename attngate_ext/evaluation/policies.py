"""Baseline eviction policies on the gated cache machinery, so comparisons measure policies, not implementations.

Every policy scores the tokens of a prompt per (batch row, KV head); :func:`budget_flags` keeps the best
``ceil((1 - eviction_ratio) * n)`` valid tokens of each head. Two ways to apply them:

* post-prefill pruning (as kvpress does): prefill with every token cached, score, then drop the rest of each head's
  rows in place with ``compact_kv_`` (:func:`prune_cache`);
* in context (causal, during prefill, as the gate does) for the policies that decide a token when it is created:
  :func:`in_context_policy` turns them into a gate replacement (``GatedAttention.flag_source``) plus the window
  ``protect_recent`` of the eviction rule (docs/design.md, section 2).

Scores are computed from the post-RoPE queries and keys the gated layers record (``GatedAttention.record_qk``);
with grouped-query attention the attention of a KV head is the sum over the query heads of its group.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

_FORCED = float("inf")  # score of tokens a policy always keeps (sinks, recent window)


class Policy:
    """A scoring rule: higher scores are kept first."""

    name = "policy"

    def scores(self, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, H, T)`` for queries ``(B, Hq, T, D)``, keys ``(B, H, T, D)``, ``valid`` ``(B, T)`` (False on
        left padding) and the per-row budget ``(B,)`` of tokens each head will keep."""
        raise NotImplementedError


def _recency(valid: torch.Tensor) -> torch.Tensor:
    """Index of each valid token counted from the end of its row (0 = the last token); padding gets a large value."""
    from_end = valid.flip(1).long().cumsum(1).flip(1) - 1
    return torch.where(valid, from_end, valid.shape[1])


def _positions(valid: torch.Tensor) -> torch.Tensor:
    return valid.long().cumsum(1) - 1


class LocalWindow(Policy):
    """Keeps the most recent tokens only (a sliding window; no sinks)."""

    name = "window"

    def scores(self, query, key, valid, budget):
        return -_recency(valid).float().unsqueeze(1).expand(key.shape[0], key.shape[1], -1)


class StreamingLLM(Policy):
    """StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024): the first
    ``sinks`` tokens (default 4, the paper's) plus a window of the most recent tokens."""

    name = "streaming_llm"

    def __init__(self, sinks: int = 4) -> None:
        self.sinks = sinks

    def scores(self, query, key, valid, budget):
        recent = -_recency(valid).float()
        sink = (_positions(valid) < self.sinks) & valid
        return torch.where(sink, _FORCED, recent).unsqueeze(1).expand(key.shape[0], key.shape[1], -1)


class RandomPolicy(Policy):
    """Keeps a uniformly random subset of each head's tokens (seeded)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def scores(self, query, key, valid, budget):
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(key.shape[0], key.shape[1], key.shape[2], generator=generator).to(key.device)


def _causal_attention(query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, rows: slice) -> torch.Tensor:
    """Causal softmax attention of the queries ``rows`` over all keys, summed over each KV head's query heads:
    ``(B, H, len(rows), T)`` float32."""
    B, Hq, T, D = query.shape
    H = key.shape[1]
    q = query[:, :, rows].float().view(B, H, Hq // H, -1, D)
    scores = torch.matmul(q, key.float().unsqueeze(2).transpose(-1, -2)) / math.sqrt(D)
    i = torch.arange(T, device=query.device)[rows].view(-1, 1)
    j = torch.arange(T, device=query.device).view(1, -1)
    visible = (j <= i) & valid.view(B, 1, 1, 1, T)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0).sum(dim=2)


class H2O(Policy):
    """H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs", NeurIPS 2023):
    the budget is split between heavy hitters (largest attention accumulated over every query of the prompt) and
    the most recent tokens, half each (``recent_fraction=0.5``, the paper's equal heavy/recent ratios)."""

    name = "h2o"

    def __init__(self, recent_fraction: float = 0.5) -> None:
        self.recent_fraction = recent_fraction

    def scores(self, query, key, valid, budget):
        accumulated = _causal_attention(query, key, valid, slice(None)).sum(dim=2)  # (B, H, T)
        recent = _recency(valid).unsqueeze(1) < torch.ceil(budget * self.recent_fraction).view(-1, 1, 1)
        return torch.where(recent, _FORCED, accumulated)


class SnapKV(Policy):
    """SnapKV (Li et al., "SnapKV: LLM Knows What You Are Looking For Before Generation", NeurIPS 2024): the
    attention of the last ``window`` queries (the observation window, default 32) to each earlier token, summed
    over the window, smoothed by 1-D pooling (``kernel`` 5, average pooling: the reference implementation's
    defaults), selects the prefix tokens; the observation window itself is always kept (capped at half the budget
    when the budget is small, see :meth:`protected`)."""

    name = "snapkv"

    def __init__(self, window: int = 32, kernel: int = 5, pooling: str = "avgpool") -> None:
        if pooling not in ("avgpool", "maxpool"):
            raise ValueError(f"pooling must be 'avgpool' or 'maxpool', got {pooling!r}")
        self.window, self.kernel, self.pooling = window, kernel, pooling

    def scores(self, query, key, valid, budget):
        T = key.shape[2]
        window = min(self.window, T)
        votes = _causal_attention(query, key, valid, slice(T - window, T)).sum(dim=2)  # (B, H, T)
        B, H, _ = votes.shape
        pool = F.avg_pool1d if self.pooling == "avgpool" else F.max_pool1d
        pooled = pool(votes.view(B * H, 1, T), kernel_size=self.kernel, stride=1, padding=self.kernel // 2)
        pooled = pooled.view(B, H, T)
        protected = self.protected(window, budget).view(B, 1, 1)
        return torch.where(_recency(valid).unsqueeze(1) < protected, _FORCED, pooled)

    @staticmethod
    def protected(window, budget: torch.Tensor) -> torch.Tensor:
        """How many of the newest tokens are always kept: the observation window, but at most half the budget.
        SnapKV assumes a budget larger than its window; without the cap a small budget would keep the window only
        and drop every older token (in context, at every chunk)."""
        return torch.minimum(torch.as_tensor(window, device=budget.device), torch.ceil(budget / 2).long())


POLICIES = {cls.name: cls for cls in (LocalWindow, StreamingLLM, RandomPolicy, H2O, SnapKV)}


def keep_budget(valid: torch.Tensor, eviction_ratio: float) -> torch.Tensor:
    """Tokens each head of a row keeps: ``ceil((1 - eviction_ratio) * valid tokens)``, ``(B,)``."""
    if not 0.0 <= eviction_ratio <= 1.0:
        raise ValueError(f"eviction_ratio must lie in [0, 1], got {eviction_ratio}")
    return torch.ceil(valid.sum(dim=1) * (1.0 - eviction_ratio) - 1e-9).long()


def budget_flags(scores: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Keep flags ``(B, H, T)``: the ``budget[b]`` highest-scoring valid tokens of every head (ties: the earlier).

    ``valid`` is ``(B, T)`` (per row) or ``(B, H, T)`` (per head, e.g. the live rows of a cache).
    """
    B, H, T = scores.shape
    valid = valid.unsqueeze(1) if valid.dim() == 2 else valid
    ranked = scores.masked_fill(~valid, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(T, device=scores.device).expand(B, H, T))
    return (rank < budget.view(B, 1, 1)) & valid


def _gated_layers(model: nn.Module) -> List[nn.Module]:
    from ..models.model import _decoder, _state

    _state(model)
    return [layer.self_attn for layer in _decoder(model).layers]


def record_queries_and_keys(model: nn.Module, enabled: bool) -> None:
    """Makes the gated layers keep the post-RoPE queries/keys of their next forward (for :func:`prune_cache`);
    ``enabled=False`` stops recording and keeps what was recorded (``prune_cache`` releases it)."""
    for attn in _gated_layers(model):
        attn.record_qk = enabled
        if enabled:
            attn.recorded = None


@torch.no_grad()
def prune_cache(model: nn.Module, cache, policy: Policy, eviction_ratio: float) -> List[torch.Tensor]:
    """Post-prefill pruning: scores the prompt the model just prefilled into ``cache`` (every token cached, with
    :func:`record_queries_and_keys` on) and compacts each layer in place to the policy's budget.

    Returns the keep flags ``(B, H, T)`` of every layer (indexed by sequence slot).
    """
    flags = []
    for attn, layer in zip(_gated_layers(model), cache.layers):
        if attn.recorded is None:
            raise RuntimeError("prune_cache needs the prefill's queries and keys: call record_queries_and_keys("
                               "model, True) before the prefill")
        query, key, valid = attn.recorded
        B, H, T, _ = key.shape
        valid = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=key.device)
        if not torch.equal(layer.kv.lengths.long().sum(dim=1), valid.sum(dim=1) * H):
            raise RuntimeError("prune_cache needs a cache that holds every prompt token (keep-all gates, w = 1)")
        budget = keep_budget(valid, eviction_ratio)
        keep = budget_flags(policy.scores(query, key, valid, budget), valid, budget)
        # Cache rows are the valid slots in order: move each row's flag to its row index.
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        keep_rows = keep.gather(2, order.unsqueeze(1).expand(B, H, T))
        layer.kv.compact(keep_rows)
        layer.kv.shrink()
        flags.append(keep)
        attn.recorded = None
    return flags


class ChunkPruner:
    """In-context H2O / SnapKV: every token is cached, and after each prefill chunk (``chunk`` tokens, default 32,
    SnapKV's observation window) each head is pruned back to ``ceil((1 - eviction_ratio) * tokens seen)`` rows
    from the attention the cached rows received, so the ratio holds all along the sequence, as with the gates.

    * H2O: scores are the attention each row accumulated from every query since it was cached (greedy H2O at
      chunk granularity); the most recent ``recent_fraction`` of the budget is always kept.
    * SnapKV: the chunk's queries are the observation window; their attention, summed and pooled over the cached
      rows (rows are in token order, with gaps where tokens were evicted), picks the rows; the chunk's own tokens
      are kept, up to half the budget (:meth:`SnapKV.protected`).
    """

    def __init__(self, policy: Policy, eviction_ratio: float) -> None:
        if not isinstance(policy, (H2O, SnapKV)):
            raise TypeError(f"ChunkPruner handles H2O and SnapKV, got {type(policy).__name__}")
        self.policy = policy
        self.eviction_ratio = eviction_ratio

    def __call__(self, layer, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor) -> None:
        kv = layer.kv
        B, H = kv.lengths.shape
        cached, _, _ = kv.gather()  # (B, H, rows, D): every head's rows in token order
        rows = cached.shape[2]
        lengths = kv.lengths.long()
        new = valid.sum(dim=1)  # rows this chunk appended (every valid token: w = 1, keep all)
        # Attention of the chunk's queries over the cached rows: old rows are visible to all, new ones causally.
        Hq, T, D = query.shape[1], query.shape[2], query.shape[3]
        q = query.float().reshape(B, H, Hq // H, T, D)
        scores = torch.matmul(q, cached.float().unsqueeze(2).transpose(-1, -2)) / math.sqrt(D)
        r = torch.arange(rows, device=key.device).view(1, 1, 1, rows)
        first_new = (lengths - new.view(-1, 1)).view(B, H, 1, 1)
        rank = (valid.long().cumsum(1) - 1).view(B, 1, T, 1)
        visible = (r < first_new) | ((r - first_new <= rank) & (r < lengths.view(B, H, 1, 1)))
        visible = visible & valid.view(B, 1, T, 1)
        probs = torch.softmax(scores.masked_fill(~visible.unsqueeze(2), float("-inf")), dim=-1).nan_to_num(0.0)
        votes = probs.sum(dim=(2, 3))  # (B, H, rows): summed over the group's heads and the chunk's queries
        live = r.view(1, 1, rows) < lengths.unsqueeze(-1)
        from_end = lengths.unsqueeze(-1) - 1 - r.view(1, 1, rows)  # 0 = the newest row
        budget = torch.ceil(layer.valid_count.float() * (1.0 - self.eviction_ratio) - 1e-6).long()
        if isinstance(self.policy, H2O):
            acc = getattr(layer, "h2o_accumulated", None)  # kept on the layer cache: one per cache and layer
            acc = votes if acc is None else votes + _fit(acc, rows)
            recent = from_end < torch.ceil(budget * self.policy.recent_fraction).view(B, 1, 1)
            ranked = torch.where(recent, _FORCED, acc)
        else:
            pool = F.avg_pool1d if self.policy.pooling == "avgpool" else F.max_pool1d
            k = self.policy.kernel
            pooled = pool(votes.reshape(B * H, 1, rows), kernel_size=k, stride=1, padding=k // 2).view(B, H, rows)
            protected = SnapKV.protected(new, budget).view(B, 1, 1)
            ranked = torch.where(from_end < protected, _FORCED, pooled)
        keep_rows = budget_flags(ranked, live, budget)
        kv.compact(keep_rows)
        if isinstance(self.policy, H2O):  # follow the rows compact_kv_ moved; rows past the new length are free
            order = torch.argsort((~keep_rows).to(torch.int8), dim=-1, stable=True)
            layer.h2o_accumulated = acc.gather(-1, order) * keep_rows.gather(-1, order)


def _fit(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Pads or cuts the last axis to ``rows``."""
    if tensor.shape[-1] >= rows:
        return tensor[..., :rows]
    return F.pad(tensor, (0, rows - tensor.shape[-1]))


def in_context_policy(
    policy: Policy, eviction_ratio: float, context_length: int
) -> Tuple[Callable[[torch.Tensor, Optional[torch.Tensor], int], torch.Tensor], int, int]:
    """A creation-time version of a policy for in-context eviction: ``(flag_source, sink_tokens, protect_recent)``.

    The window is sized so that after ``context_length`` tokens each head holds the policy's budget: StreamingLLM
    keeps its sinks and the last ``w - 1`` tokens, a local window the last ``w - 1``, random keeps each token with
    probability ``1 - eviction_ratio`` (w = 1). H2O and SnapKV choose tokens from attention that arrives after the
    token is created, so they have no creation-time form here and raise ``NotImplementedError``.
    """
    keep = max(int(math.ceil((1.0 - eviction_ratio) * context_length - 1e-9)), 0)
    if isinstance(policy, (StreamingLLM, LocalWindow)):
        sinks = policy.sinks if isinstance(policy, StreamingLLM) else 0
        window = max(keep - sinks + 1, 1)

        def evict_all(valid, positions, heads):
            pos = positions if positions is not None else _positions(valid)
            return ((pos < sinks) & valid).unsqueeze(1).expand(valid.shape[0], heads, valid.shape[1])

        return evict_all, sinks, window
    if isinstance(policy, RandomPolicy):
        generator = torch.Generator().manual_seed(policy.seed)

        def coin(valid, positions, heads):
            draw = torch.rand(valid.shape[0], heads, valid.shape[1], generator=generator).to(valid.device)
            return draw < (1.0 - eviction_ratio)

        return coin, 0, 1
    raise NotImplementedError(f"{type(policy).__name__} decides from attention that arrives after a token is "
                              "created: use ChunkPruner (use_in_context_policy does)")


def use_in_context_policy(model: nn.Module, policy: Optional[Policy], eviction_ratio: float = 0.0,
                          context_length: int = 0) -> None:
    """Makes every gated layer take its flags from ``policy`` (see :func:`in_context_policy`) instead of its gate;
    ``policy=None`` gives the gates back (with the window of the model's gate config)."""
    import dataclasses

    from ..models.model import gate_config

    pruner, chunk = None, gate_config(model).prefill_chunk
    if policy is None:
        source, window = None, gate_config(model).protect_recent
    elif isinstance(policy, (H2O, SnapKV)):
        # Cache every token, prune between chunks of SnapKV's window (32 by default) from received attention.
        pruner = ChunkPruner(policy, eviction_ratio)
        chunk = policy.window if isinstance(policy, SnapKV) else 32
        window = 1

        def source(valid, positions, heads):
            return valid.unsqueeze(1).expand(valid.shape[0], heads, valid.shape[1])
    else:
        source, _, window = in_context_policy(policy, eviction_ratio, context_length)
    for attn in _gated_layers(model):
        attn.flag_source = source
        attn.after_chunk = pruner
        attn.gate.config = dataclasses.replace(attn.gate.config, protect_recent=window, prefill_chunk=chunk)
