"""TokenPolicy: the one interface through which something other than the gate decides what a gated layer keeps.

A gated layer normally keeps what its gate flags. With a policy set (``GatedAttention.policy``), the policy's
:meth:`~TokenPolicy.keep_flags` replace the gate's flags when each token is created, and the cache calls
:meth:`~TokenPolicy.after_chunk` after it stored each chunk (a prompt chunk or a decode step), where the policy may
prune the pages (baselines that choose from attention received later, such as H2O and SnapKV). The baselines live in
:mod:`attngate_ext.evaluation.policies`; :class:`KeepEveryToken` (the unmodified model, e.g. a distillation
teacher) is here because it needs nothing else.
"""

from __future__ import annotations

from typing import Optional

import torch

from .paged_kv import PagedKV


class TokenPolicy:
    """Decides the keep flags of a gated layer instead of its gate (and may prune the cache between chunks).

    One object may serve every layer of a model and every cache: state a policy keeps per cache layer must be keyed
    by the ``pages`` it is handed.
    """

    #: Whether :meth:`after_chunk` changes the cache. Such a policy needs a forward through an ``AttnGateCache``.
    prunes_cache: bool = False

    def keep_flags(self, valid: torch.Tensor, positions: Optional[torch.Tensor], heads: int) -> torch.Tensor:
        """Flags ``(B, heads, T)`` of new tokens, ``valid`` ``(B, T)`` (False on padding), ``positions`` ``(B, T)``
        their positions when the model passed them. Padding is never kept, whatever this returns."""
        raise NotImplementedError

    def after_chunk(self, pages: PagedKV, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor,
                    tokens_seen: torch.Tensor) -> None:
        """Called once a chunk is stored: ``pages`` holds the layer's kept rows (the chunk's included), ``query``
        ``(B, Hq, T, D)`` / ``key`` ``(B, H, T, D)`` are the chunk's (RoPE applied), ``valid`` ``(B, T)`` and
        ``tokens_seen`` ``(B,)`` the valid tokens of each row so far. The default does nothing."""


class KeepEveryToken(TokenPolicy):
    """Keeps every valid token: the gated model computes what the base model computes."""

    def keep_flags(self, valid: torch.Tensor, positions: Optional[torch.Tensor], heads: int) -> torch.Tensor:
        return valid.unsqueeze(1).expand(valid.shape[0], heads, valid.shape[1])
