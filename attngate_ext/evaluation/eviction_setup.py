"""One eviction policy installed on a gated model for a whole evaluation: dense, the trained gates, or a baseline.

:func:`install_policy` prepares the model once (gates loaded and set to a threshold or a calibrated ratio, or keep-all
gates for a baseline) and returns an :class:`InstalledPolicy`, whose :meth:`~InstalledPolicy.before_call` an
evaluation calls before each forward or ``generate``: baselines sized from the input length (a local window,
StreamingLLM, random) and budgets in tokens are set per call. A hard budget (``max_tokens_per_head``) is a cache
option on top of any of them: :func:`attngate_ext.set_cache_options` for the caches ``generate()`` makes, and
:attr:`InstalledPolicy.cache_options` for caches an evaluation makes itself. The setup itself is the evaluation wing's
(:func:`~.in_context.use_in_context_policy`, :func:`attngate_ext.calibrate_gate_threshold`,
:func:`attngate_ext.load_pretrained_gates`); this module only chooses among them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..cache.policy import KeepEveryToken
from ..gate.config import AttentionGateConfig
from ..models.calibration import calibrate_gate_threshold, set_constant_gates
from ..models.gate_files import load_gates
from ..models.model import (add_attention_gates, gate_config, gated_layers, is_gated, set_cache_options,
                            update_gate_config)
from .in_context import use_in_context_policy
from .policies import POLICIES, H2O, SnapKV

#: Every policy name :func:`install_policy` takes: the dense model, the trained gates, the baselines.
POLICY_NAMES = ("dense", "gate", *POLICIES)


@dataclasses.dataclass
class InstalledPolicy:
    """A policy installed on a gated model. ``ratio``: the target eviction (baselines: per call; gates: what the
    threshold was set for), ``budget``: tokens each KV head keeps (baselines only), ``gates``: where the trained
    gates came from, ``calibrated_eviction``: the eviction the gates' calibration measured, ``max_tokens_per_head``:
    the hard budget of every cache (None: none), ``prefill_chunk``: the gates' prompt chunk, if set."""

    model: nn.Module
    policy: str
    ratio: Optional[float] = None
    budget: Optional[int] = None
    threshold: Optional[float] = None
    gates: Optional[str] = None
    calibrated_eviction: Optional[float] = None
    max_tokens_per_head: Optional[int] = None
    prefill_chunk: Optional[int] = None

    @property
    def cache_options(self) -> Dict[str, Any]:
        """Keyword arguments of every :class:`~attngate_ext.AttnGateCache` made for this policy (the hard budget)."""
        return {} if self.max_tokens_per_head is None else {"max_tokens_per_head": self.max_tokens_per_head}

    def call_ratio(self, length: int) -> float:
        """The eviction ratio of a baseline for an input of ``length`` tokens: the target ratio, or what keeps
        ``budget`` tokens per head (0 when the input is shorter than the budget)."""
        if self.budget is None:
            return float(self.ratio)
        return max(0.0, 1.0 - self.budget / max(length, 1))

    def before_call(self, length: int) -> None:
        """Sizes a baseline for an input (prompt) of ``length`` tokens; dense and the gates need nothing."""
        if self.policy in POLICIES:
            use_in_context_policy(self.model, POLICIES[self.policy](), self.call_ratio(length), length)

    def describe(self) -> Dict[str, Any]:
        """The settings, for a results file."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "model" and v is not None}
        out["gate_config"] = gated_layers(self.model)[0].gate.config.to_dict()  # as applied (the last call)
        return out


def install_policy(model: nn.Module, policy: str, *, gates: Optional[str] = None, ratio: Optional[float] = None,
                   budget: Optional[int] = None, threshold: Optional[float] = None,
                   calibration_ids: Optional[torch.Tensor] = None, per_head: bool = False,
                   gate_window: Optional[int] = None, max_tokens_per_head: Optional[int] = None,
                   prefill_chunk: Optional[int] = None) -> InstalledPolicy:
    """Makes ``model`` (a Llama-style causal LM, gated or not) evaluate under ``policy``, in place.

    * ``"dense"``: keep-all gates and a policy that keeps every token, so the model computes what the plain model
      computes, through the same :class:`~attngate_ext.AttnGateCache` (which reports eviction 0).
    * ``"gate"``: the trained gates, from ``gates`` (a name in :func:`attngate_ext.list_pretrained_gates` or a
      :func:`attngate_ext.save_gates` directory), else the gates the model already has, else the shipped gates that
      match the model. As trained, or at ``threshold``, or shifted to evict ``ratio``: calibrated on
      ``calibration_ids`` ``(N, T)`` with :func:`attngate_ext.calibrate_gate_threshold` (``per_head``: every
      (layer, KV head) to the ratio), or without them from the shift stored with shipped gates
      (:func:`attngate_ext.load_pretrained_gates`). ``gate_window`` replaces their ``protect_recent``.
    * a baseline of :data:`attngate_ext.evaluation.policies.POLICIES` (``"h2o"``, ``"snapkv"``, ``"window"``,
      ``"streaming_llm"``, ``"random"``), in context (:func:`~.in_context.use_in_context_policy`), evicting
      ``ratio`` of each input or keeping ``budget`` tokens per KV head.

    ``max_tokens_per_head``: a hard budget for the gates, H2O or SnapKV: every cache (those ``generate()``
    makes, via :func:`attngate_ext.set_cache_options`, and :attr:`InstalledPolicy.cache_options`) holds each
    (layer, row, KV head) to at most this many tokens after every prompt chunk and decode step, dropping the
    lowest-scoring rows (the gates' probability; H2O and SnapKV their own scores, and they may then take no ratio
    or budget: the hard budget alone; the window-type baselines keep a fixed window already: give them ``budget``
    instead). It must be at least the gates' ``protect_recent`` window. ``prefill_chunk``
    (gates only): the gates read a prompt in chunks of this many tokens (default: the model's, 0 = all at once), so
    a hard budget also binds while a long prompt is read; H2O and SnapKV prune every 32 tokens already.
    """
    if policy not in POLICY_NAMES:
        raise ValueError(f"policy must be one of {list(POLICY_NAMES)}, got {policy!r}")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must lie in [0, 1), got {ratio}")
    if budget is not None and budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    for name, value, least in (("max_tokens_per_head", max_tokens_per_head, 1), ("prefill_chunk", prefill_chunk, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if prefill_chunk is not None and policy != "gate":
        raise ValueError(f"prefill_chunk applies to the trained gates only, not to {policy!r}")
    if policy == "dense":
        if any(x is not None for x in (ratio, budget, threshold, max_tokens_per_head)):
            raise ValueError("the dense policy evicts nothing: give no ratio, budget, threshold or "
                             "max_tokens_per_head (a hard budget: use the gates or a baseline)")
        _keep_every_token(model)
        set_cache_options(model)
        return InstalledPolicy(model, policy)
    if policy == "gate":
        installed = _install_gates(model, gates, ratio, budget, threshold, calibration_ids, per_head, gate_window,
                                   prefill_chunk)
    else:
        installed = _install_baseline(model, policy, ratio, budget, threshold, max_tokens_per_head)
    installed.max_tokens_per_head = max_tokens_per_head
    window = gate_config(model).protect_recent
    if max_tokens_per_head is not None and max_tokens_per_head < window:
        raise ValueError(f"max_tokens_per_head ({max_tokens_per_head}) must be at least the gates' protect_recent "
                         f"window ({window}): every head holds its window (a smaller gate_window lowers it)")
    set_cache_options(model, **installed.cache_options)
    return installed


def _install_baseline(model: nn.Module, policy: str, ratio: Optional[float], budget: Optional[int],
                      threshold: Optional[float], max_tokens_per_head: Optional[int]) -> InstalledPolicy:
    scored = isinstance(POLICIES[policy](), (H2O, SnapKV))  # they meet a hard budget with their own scores
    if max_tokens_per_head is not None and not scored:
        raise ValueError(f"max_tokens_per_head applies to the gates, h2o and snapkv; the {policy} baseline keeps a "
                         "fixed window already: give it budget=N tokens instead")
    if ratio is not None and budget is not None:
        raise ValueError(f"the {policy} baseline takes one of ratio and budget, not both")
    if ratio is None and budget is None:
        if not (scored and max_tokens_per_head is not None):
            raise ValueError(f"the {policy} baseline needs exactly one of ratio and budget"
                             + (" (or, alone, max_tokens_per_head)" if scored else ""))
        ratio = 0.0  # the hard budget alone decides
    if threshold is not None:
        raise ValueError("threshold applies to the trained gates only")
    if not is_gated(model):
        add_attention_gates(model, AttentionGateConfig(decode_gating=False))
    installed = InstalledPolicy(model, policy, ratio=ratio, budget=budget)
    installed.before_call(1)  # checks the policy now; every call sizes it again
    return installed


def _keep_every_token(model: nn.Module) -> None:
    if not is_gated(model):
        add_attention_gates(model, AttentionGateConfig(decode_gating=False))
    set_constant_gates(model, keep=True)
    use_in_context_policy(model, None)
    config = dataclasses.replace(gate_config(model), protect_recent=1, sink_tokens=0, prefill_chunk=0)
    for attn in gated_layers(model):
        attn.policy = KeepEveryToken()
        attn.gate.config = config


def _install_gates(model: nn.Module, gates: Optional[str], ratio: Optional[float], budget: Optional[int],
                   threshold: Optional[float], calibration_ids: Optional[torch.Tensor], per_head: bool,
                   gate_window: Optional[int], prefill_chunk: Optional[int]) -> InstalledPolicy:
    from ..pretrained import list_pretrained_gates, load_pretrained_gates, matching_pretrained_gates, \
        pretrained_gates

    if budget is not None:
        raise ValueError("the gates decide per token: give them a ratio (calibrated) or a threshold, not a budget")
    if ratio is not None and threshold is not None:
        raise ValueError("give the gates a ratio or a threshold, not both")
    if gates is None and not is_gated(model):
        gates = matching_pretrained_gates(model)
        if gates is None:
            raise ValueError("the model has no gates and no shipped gates match it: pass gates=DIRECTORY")
    shipped = gates if gates in list_pretrained_gates() else None
    stored_shift = shipped is not None and ratio is not None and calibration_ids is None
    if stored_shift:
        load_pretrained_gates(model, shipped, eviction=ratio)  # the bias shift stored for this ratio
    elif gates is not None:
        load_gates(model, pretrained_gates(shipped) if shipped else gates)
    use_in_context_policy(model, None)  # the gates decide (a baseline installed before is removed)
    if gate_window is not None:
        update_gate_config(model, protect_recent=gate_window)
    if prefill_chunk is not None:
        update_gate_config(model, prefill_chunk=prefill_chunk)
    measured = None
    if threshold is not None:
        update_gate_config(model, threshold=threshold)
    elif ratio is not None and not stored_shift:
        if calibration_ids is None:
            raise ValueError("gates from a directory need calibration_ids (token windows of unlabelled text) to be "
                             "set to a ratio; or give a threshold")
        device = next(model.parameters()).device
        measured = calibrate_gate_threshold(model, calibration_ids.to(device), ratio, per_head=per_head)
    return InstalledPolicy(model, "gate", ratio=ratio, threshold=threshold, gates=gates,
                           calibrated_eviction=measured, prefill_chunk=prefill_chunk)
