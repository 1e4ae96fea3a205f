"""Bad input raises a clear error naming the argument, and nothing is written when a check fails."""

from __future__ import annotations

import math

import pytest
import torch

import attngate_ext

from helpers.devices import CUDA_SKIP_REASON

B, H, C, T, D = 2, 2, 8, 3, 16


def _cache(device, dtype=torch.float32):
    return {
        "key_cache": torch.randn(B, H, C, D, device=device, dtype=dtype),
        "value_cache": torch.randn(B, H, C, D, device=device, dtype=dtype),
        "lengths": torch.tensor([[1, 2], [3, 0]], dtype=torch.int32, device=device),
    }


def _append_args(device):
    return {
        **_cache(device),
        "key": torch.randn(B, H, T, D, device=device),
        "value": torch.randn(B, H, T, D, device=device),
        "keep": torch.ones(B, H, T, dtype=torch.bool, device=device),
    }


def _compact_args(device):
    return {**_cache(device), "keep": torch.ones(B, H, C, dtype=torch.bool, device=device)}


def _decode_args(device):
    c = _cache(device)
    return {"query": torch.randn(B, 2 * H, D, device=device), **c, "scale": 0.25}


def _gate_args(device):
    return {
        "gate_out": torch.randn(B, T, 8, device=device),
        "weight": torch.randn(H, 8, device=device),
        "bias": torch.randn(H, device=device),
        "threshold": 0.5,
        "sink_tokens": 0,
        "position_offset": 0,
        "valid": torch.ones(B, T, dtype=torch.bool, device=device),
    }


OPS = {
    "append_kv_": (attngate_ext.append_kv_, _append_args),
    "compact_kv_": (attngate_ext.compact_kv_, _compact_args),
    "decode_attention": (attngate_ext.decode_attention, _decode_args),
    "gate_flags": (attngate_ext.gate_flags, _gate_args),
}

# (op, argument to corrupt, how, message regex)
CASES = [
    ("append_kv_", "key_cache", lambda t: t.double(), "key_cache must be float32, float16 or bfloat16"),
    ("append_kv_", "value_cache", lambda t: t.half(), "value_cache must have the dtype of key_cache"),
    ("append_kv_", "key", lambda t: t.half(), "key must have the dtype of key_cache"),
    ("append_kv_", "lengths", lambda t: t.long(), "lengths must be int32"),
    ("append_kv_", "lengths", lambda t: t[:1], r"lengths must have shape \(B, H\)"),
    ("append_kv_", "key", lambda t: t[:, :1], r"key must have shape \(B, H, T, D\)"),
    ("append_kv_", "value", lambda t: t[:, :, :1], "value must have the shape of key"),
    ("append_kv_", "keep", lambda t: t.int(), "keep must be bool"),
    ("append_kv_", "keep", lambda t: t[:, :, :1], r"keep must have shape \(B, H, T\)"),
    ("append_kv_", "key_cache", lambda t: t.transpose(2, 3).contiguous().transpose(2, 3), "key_cache must have a contiguous last dimension"),
    ("append_kv_", "key", lambda t: t.transpose(2, 3).contiguous().transpose(2, 3), "key must have a contiguous last dimension"),
    ("append_kv_", "key_cache", lambda t: t[:, :1].expand(B, H, C, D), "key_cache must not have internal overlap"),
    ("append_kv_", "lengths", lambda t: t.fill_(-1), r"lengths must lie in \[0, C\]"),
    ("append_kv_", "lengths", lambda t: t.fill_(C + 1), r"lengths must lie in \[0, C\]"),
    ("append_kv_", "lengths", lambda t: t.fill_(C - 1), "capacity overflow"),
    ("append_kv_", "key", lambda t: t.to("meta"), "key must be on the same device as key_cache"),
    ("compact_kv_", "keep", lambda t: t[:, :, :1], r"keep must cover every live row"),
    ("compact_kv_", "keep", lambda t: t[0], r"keep must have shape \(B, H, L\)"),
    ("compact_kv_", "keep", lambda t: t.float(), "keep must be bool"),
    ("compact_kv_", "lengths", lambda t: t.fill_(C + 5), r"lengths must lie in \[0, C\]"),
    ("compact_kv_", "lengths", lambda t: t.fill_(-3), r"lengths must lie in \[0, C\]"),
    ("compact_kv_", "value_cache", lambda t: t[:, :, :, :8], "value_cache must have the shape of key_cache"),
    ("compact_kv_", "lengths", lambda t: t.to("meta"), "lengths must be on the same device as key_cache"),
    ("decode_attention", "query", lambda t: t[:, :3], "query heads Hq must be a positive multiple"),
    ("decode_attention", "query", lambda t: t[..., :8], r"query must have shape \(B, Hq, D\)"),
    ("decode_attention", "query", lambda t: t.bfloat16(), "query must have the dtype of key_cache"),
    ("decode_attention", "query", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2), "query must have a contiguous last dimension"),
    ("decode_attention", "scale", lambda s: math.nan, "scale must be finite"),
    ("decode_attention", "lengths", lambda t: t.fill_(C + 1), r"lengths must lie in \[0, C\]"),
    ("decode_attention", "key_cache", lambda t: t[0], r"key_cache must be 4-D"),
    ("decode_attention", "query", lambda t: t.to("meta"), "query must be on the same device as key_cache"),
    ("gate_flags", "threshold", lambda s: math.nan, "threshold must not be NaN"),
    ("gate_flags", "weight", lambda t: t[:, :4], r"weight must have shape \(H, G\)"),
    ("gate_flags", "weight", lambda t: t.half(), "weight must have the dtype of gate_out"),
    ("gate_flags", "bias", lambda t: t[:1], r"bias must have shape \(H,\)"),
    ("gate_flags", "valid", lambda t: t.float(), "valid must be bool"),
    ("gate_flags", "valid", lambda t: t[:, :1], r"valid must have shape \(B, T\)"),
    ("gate_flags", "gate_out", lambda t: t.int(), "gate_out must be float32, float16 or bfloat16"),
    ("gate_flags", "gate_out", lambda t: t[0], "gate_out must be 3-D"),
    ("gate_flags", "sink_tokens", lambda s: -1, "sink_tokens must be >= 0"),
    ("gate_flags", "position_offset", lambda s: -2, "position_offset must be >= 0"),
    ("gate_flags", "weight", lambda t: t.to("meta"), "weight must be on the same device as gate_out"),
    ("append_kv_", "value", lambda t: t.half(), "value must have the dtype of key_cache"),
    ("append_kv_", "value", lambda t: t.to("meta"), "value must be on the same device as key_cache"),
    ("append_kv_", "value", lambda t: t.transpose(2, 3).contiguous().transpose(2, 3), "value must have a contiguous last dimension"),
    ("append_kv_", "value_cache", lambda t: t.to("meta"), "value_cache must be on the same device as key_cache"),
    ("append_kv_", "value_cache", lambda t: t.transpose(2, 3).contiguous().transpose(2, 3), "value_cache must have a contiguous last dimension"),
    ("append_kv_", "keep", lambda t: t.to("meta"), "keep must be on the same device as key_cache"),
    ("append_kv_", "lengths", lambda t: t.to("meta"), "lengths must be on the same device as key_cache"),
    ("compact_kv_", "keep", lambda t: t.to("meta"), "keep must be on the same device as key_cache"),
    ("compact_kv_", "value_cache", lambda t: t[:, :1].expand(B, H, C, D), "value_cache must not have internal overlap"),
    ("decode_attention", "value_cache", lambda t: t.half(), "value_cache must have the dtype of key_cache"),
    ("decode_attention", "lengths", lambda t: t[:, :1], r"lengths must have shape \(B, H\)"),
    ("decode_attention", "lengths", lambda t: t.fill_(-1), r"lengths must lie in \[0, C\]"),
    ("decode_attention", "scale", lambda s: math.inf, "scale must be finite"),
    ("decode_attention", "key_cache", lambda t: t.int(), "key_cache must be float32, float16 or bfloat16"),
    ("gate_flags", "bias", lambda t: t.half(), "bias must have the dtype of weight"),
    ("gate_flags", "bias", lambda t: t.to("meta"), "bias must be on the same device as gate_out"),
    ("gate_flags", "valid", lambda t: t.to("meta"), "valid must be on the same device as gate_out"),
    ("gate_flags", "gate_out", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2), "gate_out must have a contiguous last dimension"),
    ("gate_flags", "weight", lambda t: t.t().contiguous().t(), "weight must have a contiguous last dimension"),
]


def _snapshot(args):
    return {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}


@pytest.mark.parametrize("op_name,arg,corrupt,message", CASES, ids=[f"{c[0]}-{c[1]}-{c[3][:30]}" for c in CASES])
def test_bad_argument_raises_and_writes_nothing(device, op_name, arg, corrupt, message):
    op, make = OPS[op_name]
    args = make(device)
    args[arg] = corrupt(args[arg])
    before = _snapshot(args)
    with attngate_ext.sync_checks(True), pytest.raises(RuntimeError, match=message):
        op(**args)
    for name, old in before.items():
        assert torch.equal(args[name], old), f"{op_name} wrote into {name} although it raised"


def test_sizes_beyond_int32_are_refused(device):
    """A capacity or a T of 2^31 rows (expanded views, no memory) is refused by name before any kernel runs."""
    rows = torch.zeros(1, 1, 1, D, device=device).expand(1, 1, 2**31, D)
    lengths = torch.zeros(1, 1, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="key_cache capacity C must fit in int32"):
        attngate_ext.decode_attention(torch.zeros(1, 1, D, device=device), rows, rows, lengths, 1.0)
    kc, vc = torch.zeros(1, 1, C, D, device=device), torch.zeros(1, 1, C, D, device=device)
    with pytest.raises(RuntimeError, match="key must have T < 2"):
        attngate_ext.append_kv_(kc, vc, lengths, rows, rows)
    assert not bool(kc.any()) and int(lengths) == 0


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
def test_cross_device_on_cuda():
    """A real CPU/CUDA mismatch, checked by the CUDA entry points (CPU tensors alone cannot reach them)."""
    args = _append_args("cuda")
    args["key"] = args["key"].cpu()
    with pytest.raises(RuntimeError, match="key must be on the same device as key_cache"):
        attngate_ext.append_kv_(**args)


def test_set_sync_checks_returns_previous():
    assert attngate_ext.set_sync_checks(False) is True
    assert attngate_ext.set_sync_checks(True) is False
