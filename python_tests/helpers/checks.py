"""Checks of the rectangle ops shared by their tests and the CUDA-path tests: each op's output against the
reference and a float64 truth, with PyTorch's own error at the inputs' precision setting the tolerance."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attngate_ext
from attngate_ext import reference


def _torch_same_precision(query, key_cache, value_cache, lengths, scale):
    """What plain PyTorch computes at the inputs' precision (SDPA with a length mask)."""
    B, H, C, D = key_cache.shape
    group = query.shape[1] // H
    k = key_cache.repeat_interleave(group, dim=1)
    v = value_cache.repeat_interleave(group, dim=1)
    live = torch.arange(C, device=query.device).view(1, 1, 1, C) < lengths.repeat_interleave(group, 1)[..., None, None]
    out = F.scaled_dot_product_attention(query.unsqueeze(2), k, v, attn_mask=live, scale=scale).squeeze(2)
    return torch.where(lengths.repeat_interleave(group, 1)[..., None] > 0, out, torch.zeros_like(out))


def check_decode_attention(query, key_cache, value_cache, lengths, scale):
    """decode_attention against a float64 truth, PyTorch's error at the same precision (twice, + 1e-5) as the
    tolerance, and against the reference; returns the op's output."""
    out = attngate_ext.decode_attention(query, key_cache, value_cache, lengths, scale)
    assert out.dtype == query.dtype and out.shape == query.shape and out.is_contiguous()
    exact = reference.decode_attention(query.double(), key_cache.double(), value_cache.double(), lengths, scale)
    torch_out = _torch_same_precision(query, key_cache, value_cache, lengths, scale)
    torch_err = (torch_out.double() - exact).abs().max().item() if exact.numel() else 0.0
    op_err = (out.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert op_err <= 2 * torch_err + 1e-5, (op_err, torch_err)
    ref = reference.decode_attention(query, key_cache, value_cache, lengths, scale)
    assert ((out.double() - ref.double()).abs().max().item() if ref.numel() else 0.0) <= 2 * torch_err + 1e-5
    return out


def check_gate_flags(gate_out, weight, bias, threshold, sink_tokens, position_offset, valid):
    """gate_flags against the reference and a float64 truth (PyTorch's float32 error as the tolerance); the flags
    must agree wherever the probability is not within rounding of the threshold. Returns the op's output."""
    probs, keep = attngate_ext.gate_flags(gate_out, weight, bias, threshold, sink_tokens, position_offset, valid)
    ref_probs, ref_keep = reference.gate_flags(gate_out, weight, bias, threshold, sink_tokens, position_offset, valid)
    # Truth in float64; PyTorch's own float32 error sets the tolerance.
    exact, _ = reference.gate_flags(
        gate_out.double(), weight.double(), None if bias is None else bias.double(), threshold, sink_tokens,
        position_offset, valid,
    )
    assert probs.dtype == torch.float32 and keep.dtype == torch.bool
    assert probs.shape == ref_probs.shape and probs.is_contiguous() and keep.is_contiguous()
    torch_err = (ref_probs.double() - exact).abs().max().item() if exact.numel() else 0.0
    op_err = (probs.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert op_err <= 2 * torch_err + 1e-6, (op_err, torch_err)
    # Flags must agree wherever the probability is not within rounding of the threshold.
    decided = (exact - threshold).abs() > 1e-5
    assert torch.equal(keep[decided], ref_keep[decided])
    return probs, keep
