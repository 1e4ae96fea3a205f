"""Perplexity of a (gated or dense) model on token windows, with the eviction it measured on the way."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def token_windows(token_ids: Sequence[int], length: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping windows ``(N, length)`` of a token stream (the incomplete tail is dropped)."""
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    n = len(token_ids) // length
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"fewer than {length} tokens: no window to evaluate")
    return torch.tensor(list(token_ids[: n * length]), dtype=torch.long).view(n, length)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> Dict[str, Any]:
    """Next-token perplexity over ``windows`` ``(N, T)``, each an independent sequence.

    A gated model runs each batch as one prefill through a fresh :class:`AttnGateCache` (the inference
    machinery: the attention rule, per-head storage of kept rows), so the result also reports the eviction ratio
    and bytes that cache measured; a dense model runs as is.

    Returns ``{"perplexity", "nll", "tokens", "eviction_ratio", "allocated_bytes", "dense_bytes"}`` (the byte
    counts are per batch, the largest seen; for a dense model ``eviction_ratio`` is 0 and the bytes are None).
    """
    from ..cache.cache import AttnGateCache

    gated = hasattr(model, "_attngate_state")
    device = next(model.parameters()).device
    total_nll, total_tokens, kept, rows = 0.0, 0, 0, 0
    allocated = dense = 0
    starts: List[int] = list(range(0, windows.shape[0], batch_size))
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", leave=False)
    for start in starts:
        ids = windows[start : start + batch_size].to(device)
        if gated:
            cache = AttnGateCache()
            logits = model(input_ids=ids, use_cache=True, **{model._attngate_state.cache_kwarg: cache}).logits
            report = cache.memory_report()
            kept += report["kept_rows"]
            rows += report["total_rows"]
            allocated = max(allocated, report["allocated_bytes"])
            dense = max(dense, report["dense_bytes"])
        else:
            logits = model(input_ids=ids, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
    mean = total_nll / total_tokens
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "tokens": total_tokens,
        "eviction_ratio": 1.0 - kept / rows if rows else 0.0,
        "allocated_bytes": allocated if gated else None,
        "dense_bytes": dense if gated else None,
    }
