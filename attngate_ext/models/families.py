"""The attention families the gates wrap: how each computes its query, key and value, and what is refused.

Every supported block has q/k/v/o projections (separate, or fused into ``qkv_proj``), rotary position embeddings
and grouped-query attention; the families differ only in the steps between the projections and RoPE, and in
soft-capping. Each :class:`AttentionFamily` reproduces its modeling file's steps on the wrapped module's own
submodules (nothing is copied from ``transformers``):

=====================  ==========================================================================================
family                 attention classes and what differs from Llama
=====================  ==========================================================================================
Llama                  ``LlamaAttention``, ``MistralAttention``, ``Qwen2Attention`` (q/k/v bias), and any block of
                       that shape
Qwen3                  ``Qwen3Attention``: RMSNorm ``q_norm``/``k_norm`` over each head (``head_dim`` wide)
OLMo-2                 ``Olmo2Attention``: RMSNorm ``q_norm``/``k_norm`` over the whole projection, before the
                       split into heads
Phi-3                  ``Phi3Attention``: one fused ``qkv_proj`` split as ``[q | k | v]``; partial rotary
                       (``partial_rotary_factor``: the model's cos/sin are narrower than a head)
Gemma 2                ``Gemma2Attention``: ``attn_logit_softcapping``; scale ``query_pre_attn_scalar ** -0.5``
Gemma 3                ``Gemma3Attention``: per-head ``q_norm``/``k_norm``; no soft-capping (the module never passes
                       its ``attn_logit_softcapping`` to the attention)
=====================  ==========================================================================================

Gemma 2 and 3 (and Qwen2/Qwen3 with ``use_sliding_window``) also mix sliding-window and full-attention layers: see
:func:`~.decoder.window_only_layers`. Anything else raises ``TypeError`` naming the model class and the missing
piece (:func:`attention_family`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn as nn

from ..gate.gate import apply_rope

QKV = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# (attention module, hidden (B, T, d), head_dim) -> query (B, Hq, T, D), key and value (B, H, T, D), before RoPE.
Projections = Callable[[nn.Module, torch.Tensor, int], QKV]

SUPPORTED = ("Llama, Mistral, Qwen2, Qwen3, OLMo-2, Phi-3, Gemma 2 and Gemma 3 attention (and other Llama-shaped "
             "blocks: q/k/v/o projections, RoPE, GQA, optional bias)")


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``(B, T, n * D)`` -> ``(B, n, T, D)``."""
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def separate_projections(attn: nn.Module, hidden: torch.Tensor, head_dim: int) -> QKV:
    """Llama: ``q_proj``, ``k_proj``, ``v_proj``, split into heads."""
    return (_heads(attn.q_proj(hidden), head_dim), _heads(attn.k_proj(hidden), head_dim),
            _heads(attn.v_proj(hidden), head_dim))


def per_head_norms(attn: nn.Module, hidden: torch.Tensor, head_dim: int) -> QKV:
    """Qwen3, Gemma 3: ``q_norm``/``k_norm`` over the last dim of each head (Qwen3 norms before the transpose,
    Gemma 3 after: the same numbers)."""
    query, key, value = separate_projections(attn, hidden, head_dim)
    return attn.q_norm(query), attn.k_norm(key), value


def full_width_norms(attn: nn.Module, hidden: torch.Tensor, head_dim: int) -> QKV:
    """OLMo-2: ``q_norm``/``k_norm`` over the whole ``Hq * D`` / ``H * D`` projection, then the split into heads."""
    query = attn.q_norm(attn.q_proj(hidden))
    key = attn.k_norm(attn.k_proj(hidden))
    return _heads(query, head_dim), _heads(key, head_dim), _heads(attn.v_proj(hidden), head_dim)


def fused_projection(attn: nn.Module, hidden: torch.Tensor, head_dim: int) -> QKV:
    """Phi-3: one ``qkv_proj`` whose output is ``[q (Hq * D) | k (H * D) | v (H * D)]``."""
    config = attn.config
    q_size = config.num_attention_heads * head_dim
    kv_size = config.num_key_value_heads * head_dim
    query, key, value = attn.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
    return _heads(query, head_dim), _heads(key, head_dim), _heads(value, head_dim)


def apply_model_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The model's RoPE on ``x`` ``(B, heads, T, D)`` with its tables ``(B, T, r)``: the first ``r`` dims rotate
    and the rest pass through (partial rotary, Phi-3 with ``partial_rotary_factor < 1``; ``r = D`` elsewhere)."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)


@dataclasses.dataclass(frozen=True)
class AttentionFamily:
    """One way of computing an attention block's query, key and value (see the module docstring).

    Attributes:
        name: the family's name in messages and docs.
        projections: query ``(B, Hq, T, D)``, key and value ``(B, H, T, D)`` of the hidden states, before RoPE.
        softcapped: the block soft-caps its scores with its ``attn_logit_softcapping`` (Gemma 2).
        needs: the submodules the projections read.
    """

    name: str
    projections: Projections
    softcapped: bool = False
    needs: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj")

    def project(self, attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                head_dim: int) -> QKV:
        """The block's query, key and value of ``hidden`` ``(B, T, d)``, RoPE (tables ``(B, T, r)``) applied."""
        query, key, value = self.projections(attn, hidden, head_dim)
        return apply_model_rope(query, cos, sin), apply_model_rope(key, cos, sin), value

    def softcap(self, attn: nn.Module) -> float:
        """The soft-cap of the block's scores (0: none)."""
        return float(getattr(attn, "attn_logit_softcapping", None) or 0.0) if self.softcapped else 0.0


LLAMA = AttentionFamily("Llama", separate_projections)
QWEN3 = AttentionFamily("Qwen3", per_head_norms, needs=("q_proj", "k_proj", "v_proj", "q_norm", "k_norm"))
OLMO2 = AttentionFamily("OLMo-2", full_width_norms, needs=("q_proj", "k_proj", "v_proj", "q_norm", "k_norm"))
PHI3 = AttentionFamily("Phi-3", fused_projection, needs=("qkv_proj",))
GEMMA2 = AttentionFamily("Gemma 2", separate_projections, softcapped=True)
GEMMA3 = AttentionFamily("Gemma 3", per_head_norms, needs=("q_proj", "k_proj", "v_proj", "q_norm", "k_norm"))

# Attention classes whose modeling file each family was written from (and tested against).
FAMILIES: Dict[str, AttentionFamily] = {
    "LlamaAttention": LLAMA, "MistralAttention": LLAMA, "Qwen2Attention": LLAMA, "Qwen3Attention": QWEN3,
    "Olmo2Attention": OLMO2, "Phi3Attention": PHI3, "Gemma2Attention": GEMMA2, "Gemma3Attention": GEMMA3,
}

_COMMON = ("o_proj", "head_dim", "scaling", "layer_idx")
# Features of an unlisted class that change the math beyond Llama's shape, each with the words an error uses.
_FEATURES = (
    ("sinks", "attention sinks (a learned per-head softmax logit, `sinks`)"),
    ("kv_a_proj_with_mqa", "multi-head latent attention (`kv_a_proj_with_mqa`)"),
    ("q_norm", "q/k norms (`q_norm`, `k_norm`) of a class whose order of steps is not known here"),
    ("k_norm", "q/k norms (`q_norm`, `k_norm`) of a class whose order of steps is not known here"),
    ("qk_norm", "a q/k norm (`qk_norm`) of a class whose order of steps is not known here"),
    ("attn_logit_softcapping", "attention logit soft-capping (`attn_logit_softcapping`) of an unknown class"),
    ("qkv_proj", "a fused `qkv_proj` of an unknown class"),
    ("c_attn", "a fused `c_attn` projection (GPT-2 style, without RoPE)"),
)


def _refusal(model_name: str, layer_idx: int, attn: Any, piece: str) -> TypeError:
    return TypeError(f"{model_name}: layer {layer_idx} ({type(attn).__name__}) is not supported: {piece}; attention "
                     f"gates support {SUPPORTED}")


def attention_family(model_name: str, layer_idx: int, attn: Any) -> AttentionFamily:
    """The family of one attention block, or ``TypeError`` naming the model class, the block and the missing piece
    (attention sinks, latent attention, no RoPE, bidirectional attention, an unknown fused projection or norm...)."""
    if attn is None:
        raise _refusal(model_name, layer_idx, attn, "the decoder layer has no `self_attn`")
    if getattr(attn, "sinks", None) is not None:
        raise _refusal(model_name, layer_idx, attn, dict(_FEATURES)["sinks"])
    if not getattr(attn, "use_rope", True):  # SmolLM3 and Llama 4 NoPE layers (an int 0 in SmolLM3)
        raise _refusal(model_name, layer_idx, attn, "no rotary position embedding on this layer (NoPE)")
    if not getattr(attn, "is_causal", True):
        raise _refusal(model_name, layer_idx, attn, "bidirectional (non-causal) attention")
    family = FAMILIES.get(type(attn).__name__)
    if family is None:
        present = [words for attr, words in _FEATURES if getattr(attn, attr, None) is not None]
        if present:
            raise _refusal(model_name, layer_idx, attn, present[0])
        family = LLAMA
    missing = [attr for attr in family.needs + _COMMON if not hasattr(attn, attr)]
    if missing:
        raise _refusal(model_name, layer_idx, attn, f"missing {missing}")
    return family
