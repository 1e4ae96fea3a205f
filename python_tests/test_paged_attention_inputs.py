"""Paged attention ops: bad inputs raise errors naming the argument, opcheck, and the CPU SIMD variants."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import attngate_ext

B, H, S, D, T, E = 2, 2, 4, 16, 5, 3


def _decode(device):
    table = torch.tensor([[[0, 1], [2, -1]], [[3, 4], [-1, -1]]], dtype=torch.int32, device=device)
    return {
        "query": torch.randn(B, 2 * H, D, device=device),
        "key_pages": torch.randn(6, S, D, device=device),
        "value_pages": torch.randn(6, S, D, device=device),
        "page_table": table,
        "lengths": torch.tensor([[7, 2], [5, 0]], dtype=torch.int32, device=device),
        "scale": 0.25,
        "extra_key": torch.randn(B, H, E, D, device=device),
        "extra_value": torch.randn(B, H, E, D, device=device),
        "extra_valid": torch.ones(B, H, E, dtype=torch.bool, device=device),
    }


def _prefill(device):
    a = _decode(device)
    del a["extra_valid"]
    return {
        **a,
        "query": torch.randn(B, 2 * H, T, D, device=device),
        "key": torch.randn(B, H, T, D, device=device),
        "value": torch.randn(B, H, T, D, device=device),
        "keep": torch.ones(B, H, T, dtype=torch.bool, device=device),
        "valid": torch.ones(B, T, dtype=torch.bool, device=device),
        "window": 2,
        "extra_until": torch.full((B, H, E), 1, dtype=torch.int32, device=device),
    }


OPS = {
    "decode": (attngate_ext.paged_decode_attention, _decode),
    "prefill": (attngate_ext.paged_prefill_attention, _prefill),
}


def _set(name, value):
    return lambda a: a.__setitem__(name, value(a[name]) if callable(value) else value)


def _table_entry(value):
    def edit(a):
        a["page_table"] = a["page_table"].clone()
        a["page_table"][0, 0, 1] = value  # the second (live) page of head (0, 0)
    return edit


# (ops, how to corrupt the arguments, message regex)
CASES = [
    ("both", _set("query", lambda t: t[..., :8]), r"query must have shape \(B, Hq"),
    ("both", _set("query", lambda t: t[:, :3]), "query heads Hq must be a positive multiple of the KV heads"),
    ("both", _set("query", lambda t: t.half()), "query must have the dtype of key_pages"),
    ("both", _set("query", lambda t: t.to("meta")), "query must be on the same device as key_pages"),
    ("both", _set("query", lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)),
     "query must have a contiguous last dimension"),
    ("both", _set("key_pages", lambda t: t.double()), "key_pages must be float32, float16 or bfloat16"),
    ("both", _set("value_pages", lambda t: t[:, :2]), "value_pages must have the shape of key_pages"),
    ("both", _set("page_table", lambda t: t.long()), "page_table must be int32"),
    ("both", _set("lengths", lambda t: t[:1]), r"lengths must have shape \(B, H\)"),
    ("both", _set("scale", float("nan")), "scale must be finite"),
    ("both", _set("extra_value", None), "extra_key was given without extra_value"),
    ("both", _set("extra_key", lambda t: t[:, :, :, :8]), r"extra_key must have shape \(B, H, T, D\)"),
    ("both", _set("extra_value", lambda t: t[:, :, :2]), "extra_value must have the shape of extra_key"),
    ("both", _set("extra_key", lambda t: t.half()), "extra_key must have the dtype of key_pages"),
    ("both", _set("lengths", lambda t: torch.full_like(t, -1)), r"lengths must lie in \[0, "),
    ("both", _set("lengths", lambda t: torch.full_like(t, 2 * S + 1)), r"lengths must lie in \[0, "),
    ("both", _table_entry(6), r"page id in page_table or free_pages is outside \[0, P\)"),
    ("both", _table_entry(-1), r"page id in page_table or free_pages is outside \[0, P\)"),
    ("decode", _set("extra_valid", lambda t: t.int()), "extra_valid must be bool"),
    ("decode", _set("extra_valid", lambda t: t[:, :, :1]), r"extra_valid must have shape \(B, H, E\)"),
    ("prefill", _set("key", lambda t: t[:, :, :2]), r"key must have shape \(B, H, T, D\) with T = 5"),
    ("prefill", _set("value", lambda t: t[:, :, :, :8]), "value must have"),
    ("prefill", _set("key", lambda t: t.half()), "key must have the dtype of key_pages"),
    ("prefill", _set("keep", lambda t: t.int()), "keep must be bool"),
    ("prefill", _set("keep", lambda t: t[:, :, :2]), r"keep must have shape \(B, H, T\)"),
    ("prefill", _set("valid", lambda t: t[:, :2]), r"valid must have shape \(B, T\)"),
    ("prefill", _set("valid", lambda t: t.float()), "valid must be bool"),
    ("prefill", _set("window", 0), "window must be >= 1"),
    ("prefill", _set("extra_until", lambda t: t.long()), "extra_until must be int32"),
    ("prefill", _set("extra_until", lambda t: t[:, :1]), r"extra_until must have shape \(B, H, E\)"),
]


@pytest.mark.parametrize("op, case", [(op, i) for i, c in enumerate(CASES) for op in OPS if c[0] in ("both", op)])
def test_bad_input_names_the_argument(device, op, case):
    _, corrupt, message = CASES[case]
    fn, make = OPS[op]
    args = make(device)
    corrupt(args)
    with pytest.raises(RuntimeError, match=message):
        fn(**args)
        if device == "cuda":
            torch.cuda.synchronize()


@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_extra_rows_mask_without_extra_key(device, op):
    fn, make = OPS[op]
    args = make(device)
    args["extra_key"] = args["extra_value"] = None
    with pytest.raises(RuntimeError, match=("extra_valid" if op == "decode" else "extra_until")
                       + " was given without extra_key"):
        fn(**args)
    args = make(device)
    args["extra_key"] = None
    mask = "extra_valid" if op == "decode" else "extra_until"
    args[mask] = None
    with pytest.raises(RuntimeError, match="extra_value was given without extra_key"):
        fn(**args)


@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_table_entries_past_the_live_pages_are_never_read(device, op):
    fn, make = OPS[op]
    args = make(device)
    expected = fn(**args)
    args["page_table"] = args["page_table"].clone()
    args["page_table"][0, 1, 1] = 10**6  # head (0, 1) has 2 rows: one page
    args["page_table"][1, 1, :] = -7  # head (1, 1) has none
    torch.testing.assert_close(fn(**args), expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", [False, True])
def test_opcheck(device, dtype, extra):
    for name, op in (("decode", torch.ops.attngate.paged_decode_attention.default),
                     ("prefill", torch.ops.attngate.paged_prefill_attention.default)):
        args = OPS[name][1](device)
        args = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()}
        if not extra:
            for key in ("extra_key", "extra_value", "extra_valid", "extra_until"):
                args.pop(key, None)
        torch.library.opcheck(op, (), args)


_ISA_SCRIPT = textwrap.dedent("""
    import torch, attngate_ext
    from attngate_ext import paged_reference as ref
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for D in (8, 66):
            P, S = 40, 16
            kp, vp = torch.randn(P, S, D, generator=g).to(dtype), torch.randn(P, S, D, generator=g).to(dtype)
            table = torch.randperm(P, generator=g).to(torch.int32).view(2, 2, 10)
            lengths = torch.tensor([[150, 0], [33, 160]], dtype=torch.int32)
            q = torch.randn(2, 6, 21, D, generator=g).to(dtype)
            k, v = torch.randn(2, 2, 21, D, generator=g).to(dtype), torch.randn(2, 2, 21, D, generator=g).to(dtype)
            keep, valid = torch.rand(2, 2, 21, generator=g) < 0.5, torch.rand(2, 21, generator=g) < 0.8
            ek, ev = torch.randn(2, 2, 4, D, generator=g).to(dtype), torch.randn(2, 2, 4, D, generator=g).to(dtype)
            until = torch.randint(-1, 23, (2, 2, 4), generator=g, dtype=torch.int32)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            args = (q, kp, vp, table, lengths, k, v, keep, valid, 3, 0.3, ek, ev, until)
            err = (attngate_ext.paged_prefill_attention(*args).float() - ref.paged_prefill_attention(*args).float())
            assert err.abs().max() <= tol, ("prefill", dtype, D, err.abs().max())
            args = (q[:, :, 0], kp, vp, table, lengths, 0.3, ek, ev, until >= 3)
            err = (attngate_ext.paged_decode_attention(*args).float() - ref.paged_decode_attention(*args).float())
            assert err.abs().max() <= tol, ("decode", dtype, D, err.abs().max())
    print("ok")
""")


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_cpu_simd_variants(isa):
    """The AVX2 and portable kernels (picked on CPUs without AVX-512 / AVX2) against the reference, in a child
    process with ATTNGATE_CPU_ISA capping the choice."""
    env = dict(os.environ, ATTNGATE_CPU_ISA=isa)
    run = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
