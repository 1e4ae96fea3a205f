"""Perplexity of a (gated or dense) model on token windows, with the eviction it measured on the way."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache.cache import AttnGateCache
from ..models.decoder import cache_kwarg
from ..models.model import is_gated


def token_windows(token_ids: Sequence[int], length: int, max_windows: Optional[int] = None,
                  spread: bool = False) -> torch.Tensor:
    """Non-overlapping windows ``(N, length)`` of a token stream (the incomplete tail is dropped).

    With ``max_windows`` smaller than the number of windows the stream holds, the first ``max_windows`` are taken,
    or with ``spread=True`` windows evenly spaced over the whole stream (so a few windows sample every document of a
    concatenated corpus, not only the first one's opening pages).
    """
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    available = len(token_ids) // length
    if available == 0:
        raise ValueError(f"fewer than {length} tokens: no window to evaluate")
    all_windows = torch.tensor(list(token_ids[: available * length]), dtype=torch.long).view(available, length)
    if max_windows is None or max_windows >= available:
        return all_windows
    if not spread:
        return all_windows[:max_windows]
    index = torch.div(torch.arange(max_windows) * available, max_windows, rounding_mode="floor")
    return all_windows[index]


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> Dict[str, Any]:
    """Next-token perplexity over ``windows`` ``(N, T)``, each an independent sequence.

    A gated model runs each batch as one prefill through a fresh :class:`AttnGateCache` (the inference
    machinery: the attention rule, per-head storage of kept rows), so the result also reports the eviction ratio
    and bytes that cache measured; a dense model runs as is.

    Returns ``{"perplexity", "nll", "tokens", "eviction_ratio", "held_bytes", "dense_bytes"}`` (the byte counts are
    per batch, the largest seen, ``held_bytes`` as in ``memory_report``; for a dense model ``eviction_ratio`` is 0 and
    the bytes are None).
    """
    gated = is_gated(model)
    device = next(model.parameters()).device
    total_nll, total_tokens, kept, rows = 0.0, 0, 0, 0
    held = dense = 0
    starts: List[int] = list(range(0, windows.shape[0], batch_size))
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", leave=False)
    for start in starts:
        ids = windows[start : start + batch_size].to(device)
        if gated:
            cache = AttnGateCache()
            logits = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache}).logits
            report = cache.memory_report()
            kept += report.kept_rows
            rows += report.total_rows
            held = max(held, report.held_bytes)
            dense = max(dense, report.dense_bytes)
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
        "held_bytes": held if gated else None,
        "dense_bytes": dense if gated else None,
    }
