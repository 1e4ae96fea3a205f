"""Baselines evicting in context (causally, while the prompt is read, as the gates do), as :class:`TokenPolicy`
objects the gated layers call instead of their gates.

* Policies that decide a token when it is created (a local window, StreamingLLM, random) become creation-time
  flags plus the window ``protect_recent`` of the eviction rule (docs/design.md, section 2):
  :func:`in_context_policy`.
* H2O and SnapKV choose from attention that arrives later: every token is cached and the cache is pruned back to the
  ratio after each chunk (:class:`ChunkPruner`).

:func:`use_in_context_policy` installs either on every gated layer of a model.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache.paged_kv import PagedKV
from ..cache.policy import KeepEveryToken, TokenPolicy
from ..models.model import gate_config, gated_layers
from .policies import (FORCED, H2O, LocalWindow, Policy, RandomPolicy, SnapKV, StreamingLLM, budget_flags,
                       token_positions)


class KeepSinks(TokenPolicy):
    """Keeps the first ``sinks`` tokens of each row and evicts the rest when they leave the window (a local window
    with ``sinks = 0``, StreamingLLM otherwise)."""

    def __init__(self, sinks: int) -> None:
        self.sinks = sinks

    def keep_flags(self, valid: torch.Tensor, positions: Optional[torch.Tensor], heads: int) -> torch.Tensor:
        pos = positions if positions is not None else token_positions(valid)
        return ((pos < self.sinks) & valid).unsqueeze(1).expand(valid.shape[0], heads, valid.shape[1])


class KeepAtRandom(TokenPolicy):
    """Keeps each token with probability ``keep``, drawn from a seeded generator (reproducible per instance)."""

    def __init__(self, keep: float, seed: int) -> None:
        self.keep = keep
        self.generator = torch.Generator().manual_seed(seed)

    def keep_flags(self, valid: torch.Tensor, positions: Optional[torch.Tensor], heads: int) -> torch.Tensor:
        draw = torch.rand(valid.shape[0], heads, valid.shape[1], generator=self.generator).to(valid.device)
        return draw < self.keep


def in_context_policy(policy: Policy, eviction_ratio: float, context_length: int) -> Tuple[TokenPolicy, int, int]:
    """A creation-time version of a policy for in-context eviction: ``(token policy, sink_tokens, protect_recent)``.

    The window is sized so that after ``context_length`` tokens each head holds the policy's budget: StreamingLLM
    keeps its sinks and the last ``w - 1`` tokens, a local window the last ``w - 1``, random keeps each token with
    probability ``1 - eviction_ratio`` (w = 1). H2O and SnapKV choose tokens from attention that arrives after the
    token is created, so they have no creation-time form here and raise ``NotImplementedError``.
    """
    keep = max(int(math.ceil((1.0 - eviction_ratio) * context_length - 1e-9)), 0)
    if isinstance(policy, (StreamingLLM, LocalWindow)):
        sinks = policy.sinks if isinstance(policy, StreamingLLM) else 0
        return KeepSinks(sinks), sinks, max(keep - sinks + 1, 1)
    if isinstance(policy, RandomPolicy):
        return KeepAtRandom(1.0 - eviction_ratio, policy.seed), 0, 1
    raise NotImplementedError(f"{type(policy).__name__} decides from attention that arrives after a token is "
                              "created: use ChunkPruner (use_in_context_policy does)")


class ChunkPruner(KeepEveryToken):
    """In-context H2O / SnapKV: every token is cached, and after each prefill chunk (``chunk`` tokens, default 32,
    SnapKV's observation window) each head is pruned back to ``ceil((1 - eviction_ratio) * tokens seen)`` rows
    from the attention the cached rows received, so the ratio holds all along the sequence, as with the gates.

    * H2O: scores are the attention each row accumulated from every query since it was cached (greedy H2O at
      chunk granularity); the most recent ``recent_fraction`` of the budget is always kept.
    * SnapKV: the chunk's queries are the observation window; their attention, summed and pooled over the cached
      rows (rows are in token order, with gaps where tokens were evicted), picks the rows; the chunk's own tokens
      are kept, up to half the budget (:meth:`SnapKV.protected`).

    Under a cache's hard budget (``AttnGateCache(max_tokens_per_head=N)``) the budget is also capped at the rows the
    cache allows, so the policy's own scores choose what goes.
    """

    prunes_cache = True

    def __init__(self, policy: Policy, eviction_ratio: float) -> None:
        if not isinstance(policy, (H2O, SnapKV)):
            raise TypeError(f"ChunkPruner handles H2O and SnapKV, got {type(policy).__name__}")
        self.policy = policy
        self.eviction_ratio = eviction_ratio
        # H2O: the attention each cached row accumulated, per cache layer (its pages), in row order.
        self.accumulated: "weakref.WeakKeyDictionary[PagedKV, torch.Tensor]" = weakref.WeakKeyDictionary()

    def after_chunk(self, pages: PagedKV, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor,
                    tokens_seen: torch.Tensor) -> None:
        B, H = pages.lengths.shape
        cached, _, _ = pages.gather()  # (B, H, rows, D): every head's rows in token order
        rows = cached.shape[2]
        lengths = pages.lengths.long()
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
        budget = torch.ceil(tokens_seen.float() * (1.0 - self.eviction_ratio) - 1e-6).long()
        if pages.row_limit is not None:  # the cache's hard budget, met with the policy's own scores
            budget = budget.clamp(max=pages.row_limit)
        if isinstance(self.policy, H2O):
            acc = self.accumulated.get(pages)
            acc = votes if acc is None else votes + _fit(acc, rows)
            recent = from_end < torch.ceil(budget * self.policy.recent_fraction).view(B, 1, 1)
            ranked = torch.where(recent, FORCED, acc)
        else:
            pool = F.avg_pool1d if self.policy.pooling == "avgpool" else F.max_pool1d
            k = self.policy.kernel
            pooled = pool(votes.reshape(B * H, 1, rows), kernel_size=k, stride=1, padding=k // 2).view(B, H, rows)
            protected = SnapKV.protected(new, budget).view(B, 1, 1)
            ranked = torch.where(from_end < protected, FORCED, pooled)
        keep_rows = budget_flags(ranked, live, budget)
        pages.compact(keep_rows)
        if isinstance(self.policy, H2O):  # follow the rows paged_compact_kv_ moved; rows past the new length are free
            order = torch.argsort((~keep_rows).to(torch.int8), dim=-1, stable=True)
            self.accumulated[pages] = acc.gather(-1, order) * keep_rows.gather(-1, order)


def _fit(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Pads or cuts the last axis to ``rows``."""
    if tensor.shape[-1] >= rows:
        return tensor[..., :rows]
    return F.pad(tensor, (0, rows - tensor.shape[-1]))


def use_in_context_policy(model: nn.Module, policy: Optional[Policy], eviction_ratio: float = 0.0,
                          context_length: int = 0) -> None:
    """Makes every gated layer take its flags from ``policy`` (see :func:`in_context_policy`; H2O and SnapKV through
    a :class:`ChunkPruner`) instead of its gate; ``policy=None`` gives the gates back (with the window of the
    model's gate config)."""
    chunk = gate_config(model).prefill_chunk
    if policy is None:
        token_policy, window = None, gate_config(model).protect_recent
    elif isinstance(policy, (H2O, SnapKV)):
        # Cache every token, prune between chunks of SnapKV's window (32 by default) from received attention.
        token_policy = ChunkPruner(policy, eviction_ratio)
        chunk = policy.window if isinstance(policy, SnapKV) else 32
        window = 1
    else:
        token_policy, _, window = in_context_policy(policy, eviction_ratio, context_length)
    for attn in gated_layers(model):
        attn.policy = token_policy
        attn.gate.config = dataclasses.replace(attn.gate.config, protect_recent=window, prefill_chunk=chunk)
