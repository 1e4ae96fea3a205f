"""GatedHFLM: lm-evaluation-harness's ``HFLM`` running a gated model through an ``AttnGateCache`` on every call.

``HFLM`` scores log-likelihoods with ``_model_call`` (one forward of context + continuation) and generates with
``_model_generate`` (``model.generate``). Both are overridden here, and only to (1) size the installed policy for
the call's input length, (2) hand the model a fresh :class:`~attngate_ext.AttnGateCache` (with the policy's hard
budget, if any), so that tokens are evicted in context while the prompt is read and, when generating, while tokens
are produced, and (3) add the cache's :class:`~attngate_ext.MemoryReport` to the running :class:`EvictionTally`.
Everything else (batching, padding, stop sequences, metrics) is the harness's own.

This module imports ``lm_eval``: :mod:`attngate_ext.evaluation.lm_eval` imports it on first use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch
from lm_eval.models.huggingface import HFLM

from ..cache.cache import AttnGateCache
from ..cache.memory import MemoryReport
from ..models.decoder import cache_kwarg
from .eviction_setup import InstalledPolicy


@dataclasses.dataclass
class EvictionTally:
    """What the caches of one kind of call (log-likelihood forwards or generations) held, summed over the calls,
    each measured when its call ended (a generation: prompt and generated tokens).

    ``eviction_ratio``: ``1 - kept rows / rows`` over every (call, layer, row, KV head) (``MemoryReport``'s
    definition); ``kv_share``: bytes held (the gates' K'/V' and the recent window included) over a dense cache of
    the same tokens. Padding of a batch counts as tokens in a log-likelihood call (the harness passes no mask
    there); with ``batch_size=1`` there is none."""

    calls: int = 0
    kept_rows: int = 0
    total_rows: int = 0
    held_bytes: int = 0
    dense_valid_bytes: int = 0
    peak_held_bytes: int = 0

    def add(self, report: MemoryReport) -> None:
        """Adds one call's cache report."""
        self.calls += 1
        self.kept_rows += report.kept_rows
        self.total_rows += report.total_rows
        self.held_bytes += report.held_bytes
        self.dense_valid_bytes += report.dense_valid_bytes
        self.peak_held_bytes = max(self.peak_held_bytes, report.held_bytes)

    def summary(self) -> Dict[str, Any]:
        """The sums with ``eviction_ratio`` and ``kv_share`` (None before any call)."""
        out: Dict[str, Any] = dataclasses.asdict(self)
        out["eviction_ratio"] = 1.0 - self.kept_rows / self.total_rows if self.total_rows else None
        out["kv_share"] = self.held_bytes / self.dense_valid_bytes if self.dense_valid_bytes else None
        return out


class GatedHFLM(HFLM):
    """``HFLM`` for a gated model: every forward and ``generate`` goes through a fresh ``AttnGateCache`` under the
    installed policy (see the module docstring). Build it with :func:`attngate_ext.evaluation.lm_eval.gated_lm`."""

    def __init__(self, pretrained: torch.nn.Module, installed: InstalledPolicy, page_size: int = 16,
                 **kwargs: Any) -> None:
        """``pretrained``: the gated model (``installed.model``); ``page_size``: rows per page of the caches;
        ``kwargs``: ``HFLM``'s (``tokenizer``, ``batch_size``, ``max_length``, ...)."""
        if installed.model is not pretrained:
            raise ValueError("the installed policy belongs to another model")
        super().__init__(pretrained=pretrained, **kwargs)
        self.installed = installed
        self.page_size = page_size
        self.tallies: Dict[str, EvictionTally] = {}

    def reset_eviction(self) -> None:
        """Forgets the tallies (e.g. between tasks)."""
        self.tallies = {}

    def eviction_report(self) -> Dict[str, Any]:
        """``{"policy": the settings, "loglikelihood": tally, "generate_until": tally}`` (kinds without calls left
        out)."""
        report: Dict[str, Any] = {"policy": self.installed.describe()}
        report.update({kind: tally.summary() for kind, tally in self.tallies.items()})
        return report

    def _record(self, kind: str, cache: AttnGateCache) -> None:
        self.tallies.setdefault(kind, EvictionTally()).add(cache.memory_report())

    def _model_call(self, inps: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                    labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attn_mask is not None or labels is not None:
            raise NotImplementedError("GatedHFLM evaluates causal (decoder-only) models")
        self.installed.before_call(inps.shape[1])
        cache = AttnGateCache(self.page_size, **self.installed.cache_options)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            logits = self.model(input_ids=inps, use_cache=True, **{cache_kwarg(self.model): cache}).logits
        self._record("loglikelihood", cache)
        return logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list, **generation_kwargs: Any):
        self.installed.before_call(context.shape[1])
        cache = AttnGateCache(self.page_size, **self.installed.cache_options)
        generation_kwargs[cache_kwarg(self.model)] = cache
        out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        self._record("generate_until", cache)
        return out
