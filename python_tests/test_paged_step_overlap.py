"""paged_decode_step_ writes the pools, the page table, lengths, the free stack and the window ring, and reads the new
token: arguments whose memory overlaps where it writes are refused before anything is written, naming both; views
that only look alike (two halves of one buffer, a strided but disjoint ring) are accepted."""

from __future__ import annotations

from typing import Callable, Dict

import pytest
import torch

import attngate_ext

B, H, P, S, D, W = 2, 2, 6, 4, 8, 3


def _args(device: str) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    table = torch.full((B, H, 2), -1, dtype=torch.int32)
    table[:, :, 0] = torch.arange(B * H, dtype=torch.int32).view(B, H)
    args = {
        "query": torch.randn(B, 2 * H, D, generator=g),
        "key_pages": torch.randn(P, S, D, generator=g), "value_pages": torch.randn(P, S, D, generator=g),
        "page_table": table, "lengths": torch.full((B, H), 2, dtype=torch.int32),
        "free_pages": torch.tensor([5, 4, 0, 0, 0, 0], dtype=torch.int32),
        "free_count": torch.tensor([2], dtype=torch.int32),
        "key": torch.randn(B, H, D, generator=g), "value": torch.randn(B, H, D, generator=g),
        "keep": torch.tensor([[True, False], [False, True]]),
        "ring_key": torch.randn(B, H, W, D, generator=g), "ring_value": torch.randn(B, H, W, D, generator=g),
        "ring_valid": torch.ones(B, H, W, dtype=torch.bool), "ring_keep": torch.zeros(B, H, W, dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in args.items()}


def _call(a: Dict[str, torch.Tensor]) -> torch.Tensor:
    return attngate_ext.paged_decode_step_(a["query"], a["key_pages"], a["value_pages"], a["page_table"], a["lengths"],
                                           a["free_pages"], a["free_count"], a["key"], a["value"], a["keep"], None,
                                           a["ring_key"], a["ring_value"], a["ring_valid"], 1, 0.5, a["ring_keep"])


def _ring_in_pool(a, pool):
    return a[pool].view(-1)[: B * H * W * D].view(B, H, W, D)


OVERLAPS: Dict[str, tuple] = {
    "ring_key_in_key_pages": (lambda a: {"ring_key": _ring_in_pool(a, "key_pages")}, "ring_key and key_pages"),
    "ring_key_in_value_pages": (lambda a: {"ring_key": _ring_in_pool(a, "value_pages")}, "ring_key and value_pages"),
    "ring_value_in_key_pages": (lambda a: {"ring_value": _ring_in_pool(a, "key_pages")}, "ring_value and key_pages"),
    "ring_value_is_ring_key": (lambda a: {"ring_value": a["ring_key"]}, "ring_key and ring_value"),
    "ring_key_expanded": (lambda a: {"ring_key": a["ring_key"][:1].expand(B, H, W, D)}, "ring_key must not have internal"),
    "ring_valid_expanded": (lambda a: {"ring_valid": a["ring_valid"][:, :1].expand(B, H, W)},
                            "ring_valid must not have internal"),
    "ring_keep_is_ring_valid": (lambda a: {"ring_keep": a["ring_valid"]}, "ring_keep and ring_valid"),
    "key_in_ring_key": (lambda a: {"key": a["ring_key"][:, :, 0]}, "key and ring_key"),
    "value_in_ring_value": (lambda a: {"value": a["ring_value"][:, :, 2]}, "value and ring_value"),
    "key_in_key_pages": (lambda a: {"key": a["key_pages"].view(-1)[: B * H * D].view(B, H, D)}, "key and key_pages"),
    "lengths_in_page_table": (lambda a: {"lengths": a["page_table"][:, :, 1]}, "page_table and lengths"),
    "free_count_in_free_pages": (lambda a: {"free_count": a["free_pages"][-1:]}, "free_pages and free_count"),
}


@pytest.mark.parametrize("case", list(OVERLAPS))
def test_overlapping_arguments_are_refused_before_any_write(device, case):
    make, message = OVERLAPS[case]
    a = _args(device)
    a.update(make(a))
    snapshot = {k: v.clone() for k, v in a.items()}
    with pytest.raises(RuntimeError, match=message):
        _call(a)
    for name, before in snapshot.items():
        assert torch.equal(a[name], before), f"{name} was written"


ACCEPTED: Dict[str, Callable] = {
    # One buffer (B, H, W, 2, D) holding keys and values side by side: interleaved rows, no shared element.
    "fused_ring": lambda a: dict(zip(("ring_key", "ring_value"),
                                     torch.stack([a["ring_key"], a["ring_value"]], dim=3).unbind(3))),
    # The new token next to the ring in one buffer (B, H, W + 1, D): its last row.
    "key_beside_ring": lambda a: (lambda buf: {"ring_key": buf[:, :, :W], "key": buf[:, :, W]})(
        torch.cat([a["ring_key"], a["key"].unsqueeze(2)], dim=2)),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_disjoint_views_are_accepted(device, case):
    a = _args(device)
    plain = {k: v.clone() for k, v in a.items()}
    a.update(ACCEPTED[case](a))
    for name in ("ring_key", "ring_value", "key"):
        assert torch.equal(a[name], plain[name])  # the same values, other storage
    out = _call(a)
    expected = _call(plain)
    torch.testing.assert_close(out, expected)
    for name in ("ring_key", "ring_value", "lengths", "ring_valid", "ring_keep"):
        assert torch.equal(a[name], plain[name]), name
