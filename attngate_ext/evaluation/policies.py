"""Baseline eviction policies as scoring rules, so comparisons measure policies, not implementations.

Every policy scores the tokens of a prompt per (batch row, KV head); :func:`budget_flags` keeps the best
``ceil((1 - eviction_ratio) * n)`` valid tokens of each head. Two ways to apply them, on the gated cache machinery:

* post-prefill pruning (as kvpress does, :mod:`.post_prefill`): prefill with every token cached, score, then drop
  the rest of each head's rows in place with ``paged_compact_kv_``;
* in context (causal, during prefill, as the gate does, :mod:`.in_context`).

Scores are computed from the post-RoPE queries and keys of the prompt; with grouped-query attention the attention
of a KV head is the sum over the query heads of its group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FORCED = float("inf")  # score of tokens a policy always keeps (sinks, recent window)


class Policy:
    """A scoring rule: higher scores are kept first."""

    name = "policy"

    def scores(self, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, H, T)`` for queries ``(B, Hq, T, D)``, keys ``(B, H, T, D)``, ``valid`` ``(B, T)`` (False on
        left padding) and the per-row budget ``(B,)`` of tokens each head will keep."""
        raise NotImplementedError


def recency(valid: torch.Tensor) -> torch.Tensor:
    """Index of each valid token counted from the end of its row (0 = the last token); padding gets a large value."""
    from_end = valid.flip(1).long().cumsum(1).flip(1) - 1
    return torch.where(valid, from_end, valid.shape[1])


def token_positions(valid: torch.Tensor) -> torch.Tensor:
    """Position of each token among the valid tokens of its row (left padding does not count)."""
    return valid.long().cumsum(1) - 1


class LocalWindow(Policy):
    """Keeps the most recent tokens only (a sliding window; no sinks)."""

    name = "window"

    def scores(self, query, key, valid, budget):
        return -recency(valid).float().unsqueeze(1).expand(key.shape[0], key.shape[1], -1)


class StreamingLLM(Policy):
    """StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024): the first
    ``sinks`` tokens (default 4, the paper's) plus a window of the most recent tokens."""

    name = "streaming_llm"

    def __init__(self, sinks: int = 4) -> None:
        self.sinks = sinks

    def scores(self, query, key, valid, budget):
        recent = -recency(valid).float()
        sink = (token_positions(valid) < self.sinks) & valid
        return torch.where(sink, FORCED, recent).unsqueeze(1).expand(key.shape[0], key.shape[1], -1)


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
        recent = recency(valid).unsqueeze(1) < torch.ceil(budget * self.recent_fraction).view(-1, 1, 1)
        return torch.where(recent, FORCED, accumulated)


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
        return torch.where(recency(valid).unsqueeze(1) < protected, FORCED, pooled)

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
