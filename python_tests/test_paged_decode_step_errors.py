"""A failing paged_decode_step_ writes nothing: not the pages, not the page table or lengths, not the free stack,
not the window ring (slot rows, ring_valid, ring_keep). The step validates the whole paged state (every length,
every page id it will read) before its first write, on every device; on CUDA with sync checks off (the cache's hot
path, and CUDA graphs) it raises nothing and still writes nothing, and a retry after the fix appends exactly once.

The state: B = 1, H = 2, page size 2, each head one full page (2 rows), so any kept row needs a new page."""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch

import attngate_ext
from attngate_ext.ops import paged_reference

from helpers.devices import CUDA_SKIP_REASON

B, H, S, D, W = 1, 2, 2, 8, 2
SLOT = 1
ID_MSG = r"page id in page_table or free_pages is outside \[0, P\)"
CASES: Dict[str, str] = {
    "out_of_pages": "out of pages",
    "table_full": "page table full",
    "bad_id_in_a_full_page": ID_MSG,  # a page the append does not touch, but the attention reads
    "bad_popped_page": ID_MSG,
    "length_out_of_range": r"lengths must lie in \[0",
}
NAMES = ["key_pages", "value_pages", "page_table", "lengths", "free_pages", "free_count", "ring_key", "ring_value",
         "ring_valid", "ring_keep"]


def _state(device: str, case: str) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    P, M = 4, 1 if case == "table_full" else 3
    table = torch.full((B, H, M), -1, dtype=torch.int32)
    table[0, :, 0] = torch.tensor([0, 1], dtype=torch.int32)
    state = {
        "key_pages": torch.randn(P, S, D, generator=g),
        "value_pages": torch.randn(P, S, D, generator=g),
        "page_table": table,
        "lengths": torch.full((B, H), S, dtype=torch.int32),
        "free_pages": torch.tensor([3, 2, 0, 0], dtype=torch.int32),
        "free_count": torch.tensor([2], dtype=torch.int32),
        "ring_key": torch.randn(B, H, W, D, generator=g),
        "ring_value": torch.randn(B, H, W, D, generator=g),
        "ring_valid": torch.ones(B, H, W, dtype=torch.bool),
        "ring_keep": torch.ones(B, H, W, dtype=torch.bool),  # every row leaving the ring is kept
    }
    if case == "out_of_pages":
        state["free_count"][0] = 0
    elif case == "bad_id_in_a_full_page":
        state["page_table"][0, 0, 0] = 9
    elif case == "bad_popped_page":
        state["free_pages"][1] = -3  # the top of the stack
    elif case == "length_out_of_range":
        state["lengths"][0, 1] = 99
    return {k: v.to(device) for k, v in state.items()}


def _inputs(device: str, case: str) -> Tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    query = torch.randn(B, 2 * H, D, generator=g)
    key, value = torch.randn(B, H, D, generator=g), torch.randn(B, H, D, generator=g)
    keep = torch.ones(B, H, dtype=torch.bool)
    if case == "bad_id_in_a_full_page":
        keep[0, 0] = False  # only head 1 appends: its page ids are fine, head 0's full page is not
    return tuple(t.to(device) for t in (query, key, value, keep))


def _step(state: Dict[str, torch.Tensor], inputs, with_ring_keep: bool, op=None):
    query, key, value, keep = inputs
    s = state
    fn = op or attngate_ext.paged_decode_step_
    return fn(query, s["key_pages"], s["value_pages"], s["page_table"], s["lengths"], s["free_pages"],
              s["free_count"], key, value, keep, None, s["ring_key"], s["ring_value"], s["ring_valid"], SLOT, 0.5,
              s["ring_keep"] if with_ring_keep else None)


def _for_case(state: Dict[str, torch.Tensor], case: str, with_ring_keep: bool) -> None:
    """With ring_keep it is the row leaving the slot that is appended: for the full-page case, only head 1's."""
    if case == "bad_id_in_a_full_page" and with_ring_keep:
        state["ring_keep"][0, 0, SLOT] = False


def _snapshot(state: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    return [state[n].clone() for n in NAMES]


def _assert_unchanged(state: Dict[str, torch.Tensor], snap: List[torch.Tensor]) -> None:
    for name, before in zip(NAMES, snap):
        assert torch.equal(state[name], before), f"{name} was written by a failing step"


@pytest.mark.parametrize("with_ring_keep", [False, True], ids=["w1", "ring_keep"])
@pytest.mark.parametrize("case", list(CASES))
def test_failing_step_raises_and_writes_nothing(device, case, with_ring_keep):
    state = _state(device, case)
    _for_case(state, case, with_ring_keep)
    inputs = _inputs(device, case)
    ref_state = {k: v.cpu().clone() for k, v in state.items()}
    with pytest.raises(RuntimeError, match=CASES[case]):  # the reference agrees on the error
        _step(ref_state, tuple(t.cpu() for t in inputs), with_ring_keep, op=paged_reference.paged_decode_step_)
    snap = _snapshot(state)
    with attngate_ext.sync_checks(True), pytest.raises(RuntimeError, match=CASES[case]):
        _step(state, inputs, with_ring_keep)
    _assert_unchanged(state, snap)


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
@pytest.mark.parametrize("with_ring_keep", [False, True], ids=["w1", "ring_keep"])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_failing_step_without_sync_checks_writes_nothing(case, with_ring_keep):
    # Nobody is told (no read-back), so the device-side order must hold: validate, then append, then the ring.
    state = _state("cuda", case)
    _for_case(state, case, with_ring_keep)
    snap = _snapshot(state)
    with attngate_ext.sync_checks(False):
        _step(state, _inputs("cuda", case), with_ring_keep)
    torch.cuda.synchronize()
    _assert_unchanged(state, snap)


@pytest.mark.parametrize("with_ring_keep", [False, True], ids=["w1", "ring_keep"])
def test_retry_after_a_bad_page_id_appends_once(device, with_ring_keep):
    # The bad id sits in a full page that the step does not write: the step must refuse before it grows lengths.
    case = "bad_id_in_a_full_page"
    state = _state(device, case)
    _for_case(state, case, with_ring_keep)
    inputs = _inputs(device, case)
    with pytest.raises(RuntimeError, match=ID_MSG):
        _step(state, inputs, with_ring_keep)
    state["page_table"][0, 0, 0] = 0
    expected = {k: v.cpu().clone() for k, v in state.items()}
    out = _step(state, inputs, with_ring_keep)
    ref = _step(expected, tuple(t.cpu() for t in inputs), with_ring_keep, op=paged_reference.paged_decode_step_)
    assert state["lengths"].tolist() == [[S, S + 1]]  # head 1 once, head 0 nothing
    assert torch.equal(state["lengths"].cpu(), expected["lengths"])
    torch.testing.assert_close(out.cpu(), ref)


@pytest.mark.parametrize("T", [1, 33, 300])
def test_append_with_no_heads_is_a_no_op(device, T):
    # B * H = 0 with T > 32 and keep given once launched an empty CUDA grid (a launch error); it changes nothing.
    P, S_, M = 3, 4, 2
    kp, vp = torch.randn(P, S_, D, device=device), torch.randn(P, S_, D, device=device)
    table = torch.zeros(0, 2, M, dtype=torch.int32, device=device)
    lengths = torch.zeros(0, 2, dtype=torch.int32, device=device)
    free, count = torch.arange(P, dtype=torch.int32, device=device), torch.tensor([P], dtype=torch.int32, device=device)
    key = torch.randn(0, 2, T, D, device=device)
    keep = torch.ones(0, 2, T, dtype=torch.bool, device=device)
    before = [t.clone() for t in (kp, vp, free, count)]
    attngate_ext.paged_append_kv_(kp, vp, table, lengths, free, count, key, key, keep)
    if device == "cuda":
        torch.cuda.synchronize()
    for a, b in zip((kp, vp, free, count), before):
        assert torch.equal(a, b)
