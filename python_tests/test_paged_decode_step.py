"""paged_decode_step_ (one fused gated decode step) against its reference: the composition of paged_append_kv_, the
window-ring write and paged_decode_attention."""

from __future__ import annotations

import pytest
import torch

import attngate_ext
from attngate_ext import gather_pages, paged_reference

from helpers.devices import sync_if_cuda
from helpers.tensors import DTYPES

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _state(B, H, D, W, page_size, dtype, device, gen, rows=40, spare=6):
    """A paged cache filled by appends of random tokens (reference), a free stack with room, and a random ring."""
    per_head = (rows + page_size) // page_size + 2
    P = B * H * per_head + spare
    pages = [torch.zeros(P, page_size, D, dtype=dtype) for _ in range(2)]
    table = torch.full((B, H, per_head), -1, dtype=torch.int32)
    lengths = torch.zeros(B, H, dtype=torch.int32)
    free = torch.randperm(P, generator=gen).to(torch.int32)
    count = torch.tensor([P], dtype=torch.int32)
    key = torch.randn(B, H, rows, D, generator=gen).to(dtype)
    keep = torch.rand(B, H, rows, generator=gen) < 0.5
    keep[0, 0] = False  # one empty head
    paged_reference.paged_append_kv_(*pages, table, lengths, free, count, key, key * 0.5, keep)
    ring = [torch.randn(B, H, W, D, generator=gen).to(dtype) for _ in range(2)]
    ring_valid = torch.rand(B, H, W, generator=gen) < 0.5
    state = [*pages, table, lengths, free, count, *ring, ring_valid]
    return [t.to(device) for t in state]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size,group,W", [(1, 1, 1), (16, 3, 4), (4, 8, 2)])
def test_decode_step_matches_its_reference(device, dtype, page_size, group, W):
    gen = torch.Generator().manual_seed(page_size * 10 + group)
    B, H, D = 3, 2, 32
    state = _state(B, H, D, W, page_size, dtype, device, gen)
    expected = [t.cpu().clone() for t in state]  # the reference's copy of the state, on the CPU
    for step in range(5):  # a few steps: pages fill up, new ones are taken, ring slots wrap around
        query = torch.randn(B, H * group, D, generator=gen).to(dtype).to(device)
        key = torch.randn(B, H, D, generator=gen).to(dtype).to(device)
        value = torch.randn(B, H, D, generator=gen).to(dtype).to(device)
        keep = (torch.rand(B, H, generator=gen) < 0.5).to(device)
        valid = torch.tensor([True, step != 2, True], device=device)
        keep &= valid.unsqueeze(1)
        slot = step % W
        kp, vp, table, lengths, free, count, rk, rv, rvalid = state
        out = attngate_ext.paged_decode_step_(query, kp, vp, table, lengths, free, count, key, value, keep, valid, rk,
                                              rv, rvalid, slot, 0.2)
        ekp, evp, etable, elengths, efree, ecount, erk, erv, ervalid = expected
        ref = paged_reference.paged_decode_step_(query.cpu(), ekp, evp, etable, elengths, efree, ecount, key.cpu(),
                                                 value.cpu(), keep.cpu(), valid.cpu(), erk, erv, ervalid, slot, 0.2)
        sync_if_cuda(device)
        torch.testing.assert_close(out.cpu(), ref, atol=TOL[dtype], rtol=TOL[dtype])
        # Same storage state: lengths, page ids, free stack, rows, ring.
        assert torch.equal(lengths.cpu(), elengths.cpu())
        assert torch.equal(count.cpu(), ecount.cpu())
        n = int(count[0])
        assert torch.equal(free.cpu()[:n], efree.cpu()[:n])
        got = gather_pages(kp.cpu(), vp.cpu(), table.cpu(), lengths.cpu())
        for a, b in zip(got, gather_pages(ekp, evp, etable, elengths)):
            assert torch.equal(a, b)
        for a, b in ((rk, erk), (rv, erv), (rvalid, ervalid)):
            assert torch.equal(a.cpu(), b)


def test_decode_step_out_of_pages_writes_nothing(device):
    gen = torch.Generator().manual_seed(1)
    B, H, D = 2, 2, 8
    state = _state(B, H, D, 2, 1, torch.float32, device, gen, spare=0)
    kp, vp, table, lengths, free, count, rk, rv, rvalid = state
    count.zero_()  # no free page: any kept token needs one (page size 1)
    before = [t.clone() for t in state]
    key = torch.randn(B, H, D, device=device)
    with pytest.raises(RuntimeError, match="out of pages"):
        attngate_ext.paged_decode_step_(torch.randn(B, H, D, device=device), kp, vp, table, lengths, free, count, key,
                                        key, torch.ones(B, H, dtype=torch.bool, device=device), None, rk, rv, rvalid,
                                        0, 1.0)
    for a, b in zip(state, before):
        assert torch.equal(a, b)


def test_decode_step_bad_arguments_name_them(device):
    gen = torch.Generator().manual_seed(2)
    state = _state(2, 2, 8, 3, 4, torch.float32, device, gen)
    kp, vp, table, lengths, free, count, rk, rv, rvalid = state
    q, key = torch.randn(2, 4, 8, device=device), torch.randn(2, 2, 8, device=device)
    keep = torch.ones(2, 2, dtype=torch.bool, device=device)
    call = lambda **kw: attngate_ext.paged_decode_step_(  # noqa: E731
        kw.get("q", q), kp, vp, table, lengths, free, count, kw.get("key", key), key, kw.get("keep", keep),
        kw.get("valid"), rk, rv, kw.get("rvalid", rvalid), kw.get("slot", 0), 1.0)
    with pytest.raises(RuntimeError, match="slot must lie in"):
        call(slot=3)
    with pytest.raises(RuntimeError, match="keep must be bool"):
        call(keep=keep.int())
    with pytest.raises(RuntimeError, match="keep must have shape"):
        call(keep=keep[:1])
    with pytest.raises(RuntimeError, match="valid must have shape"):
        call(valid=torch.ones(3, dtype=torch.bool, device=device))
    with pytest.raises(RuntimeError, match="key must have shape"):
        call(key=torch.randn(2, 2, 4, device=device))
    with pytest.raises(RuntimeError, match="extra_valid"):
        call(rvalid=rvalid[:, :, :2])


def test_decode_step_opcheck():
    gen = torch.Generator().manual_seed(3)
    state = _state(2, 2, 8, 2, 4, torch.float32, "cpu", gen)
    kp, vp, table, lengths, free, count, rk, rv, rvalid = state
    key = torch.randn(2, 2, 8)
    torch.library.opcheck(torch.ops.attngate.paged_decode_step_,
                          (torch.randn(2, 4, 8), kp, vp, table, lengths, free, count, key, key,
                           torch.tensor([[True, False], [False, True]]), None, rk, rv, rvalid, 1, 0.5))


def _ring_keep(state, gen, device):
    """A ring_keep for the state's ring: random flags, never set where ring_valid is not."""
    rvalid = state[-1]
    return (torch.rand(rvalid.shape, generator=gen).to(device) < 0.5) & rvalid


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size,group,W", [(1, 1, 1), (16, 3, 4), (4, 8, 3), (64, 2, 5)])
def test_decode_step_with_ring_keep_matches_its_reference(device, dtype, page_size, group, W):
    # The ring holds kept tokens until they leave the window: each step appends the kept row leaving its slot to
    # the pages, then the new token waits in the slot, visible, with its flag in ring_keep.
    gen = torch.Generator().manual_seed(page_size * 7 + group + W)
    B, H, D = 3, 2, 24
    state = _state(B, H, D, W, page_size, dtype, device, gen)
    state.append(_ring_keep(state, gen, device))
    expected = [t.cpu().clone() for t in state]
    for step in range(2 * W + 3):  # every slot is taken at least twice
        query = torch.randn(B, H * group, D, generator=gen).to(dtype).to(device)
        key = torch.randn(B, H, D, generator=gen).to(dtype).to(device)
        value = torch.randn(B, H, D, generator=gen).to(dtype).to(device)
        keep = (torch.rand(B, H, generator=gen) < 0.5).to(device)
        valid = None if step % 3 == 0 else torch.tensor([True, step != 2, True], device=device)
        slot = step % W
        kp, vp, table, lengths, free, count, rk, rv, rvalid, rkeep = state
        out = attngate_ext.paged_decode_step_(query, kp, vp, table, lengths, free, count, key, value, keep, valid, rk,
                                              rv, rvalid, slot, 0.3, rkeep)
        ekp, evp, etable, elengths, efree, ecount, erk, erv, ervalid, erkeep = expected
        ref = paged_reference.paged_decode_step_(query.cpu(), ekp, evp, etable, elengths, efree, ecount, key.cpu(),
                                                 value.cpu(), keep.cpu(), None if valid is None else valid.cpu(),
                                                 erk, erv, ervalid, slot, 0.3, erkeep)
        sync_if_cuda(device)
        torch.testing.assert_close(out.cpu(), ref, atol=TOL[dtype], rtol=TOL[dtype])
        assert torch.equal(lengths.cpu(), elengths) and torch.equal(count.cpu(), ecount)
        got = gather_pages(kp.cpu(), vp.cpu(), table.cpu(), lengths.cpu())
        for a, b in zip(got, gather_pages(ekp, evp, etable, elengths)):
            assert torch.equal(a, b)
        for a, b in ((rk, erk), (rv, erv), (rvalid, ervalid), (rkeep, erkeep)):
            assert torch.equal(a.cpu(), b)
        assert not (rkeep & ~rvalid).any()  # flags stay on visible rows only


def test_decode_step_with_ring_keep_moves_exactly_the_kept_leaving_rows():
    # Independent of the reference: a head's pages grow by one row exactly when the row leaving the slot was kept,
    # and that row is the old ring row.
    gen = torch.Generator().manual_seed(11)
    B, H, D, W = 2, 3, 8, 2
    state = _state(B, H, D, W, 4, torch.float32, "cpu", gen)
    kp, vp, table, lengths, free, count, rk, rv, rvalid = state
    rkeep = _ring_keep(state, gen, "cpu")
    leaving_key, leaving_kept = rk[:, :, 1].clone(), rkeep[:, :, 1].clone()
    before = lengths.clone()
    key = torch.randn(B, H, D)
    attngate_ext.paged_decode_step_(torch.randn(B, H, D), kp, vp, table, lengths, free, count, key, key,
                                    torch.ones(B, H, dtype=torch.bool), None, rk, rv, rvalid, 1, 1.0, rkeep)
    assert torch.equal(lengths - before, leaving_kept.int())
    keys, _, _ = gather_pages(kp, vp, table, lengths)
    for b in range(B):
        for h in range(H):
            if leaving_kept[b, h]:
                assert torch.equal(keys[b, h, int(lengths[b, h]) - 1], leaving_key[b, h])
    assert torch.equal(rk[:, :, 1], key) and rvalid[:, :, 1].all() and rkeep[:, :, 1].all()


def test_decode_step_with_ring_keep_out_of_pages_writes_nothing():
    gen = torch.Generator().manual_seed(12)
    state = _state(2, 2, 8, 2, 1, torch.float32, "cpu", gen, spare=0)
    kp, vp, table, lengths, free, count, rk, rv, rvalid = state
    rvalid.fill_(True)
    rkeep = torch.ones_like(rvalid)  # every leaving row is kept: each needs a page (page size 1)
    count.zero_()
    before = [t.clone() for t in (*state, rkeep)]
    key = torch.randn(2, 2, 8)
    with pytest.raises(RuntimeError, match="out of pages"):
        attngate_ext.paged_decode_step_(torch.randn(2, 2, 8), kp, vp, table, lengths, free, count, key, key,
                                        torch.zeros(2, 2, dtype=torch.bool), None, rk, rv, rvalid, 0, 1.0, rkeep)
    for a, b in zip((*state, rkeep), before):
        assert torch.equal(a, b)


def test_decode_step_ring_keep_bad_arguments_name_it(device):
    gen = torch.Generator().manual_seed(13)
    state = _state(2, 2, 8, 3, 4, torch.float32, device, gen)
    kp, vp, table, lengths, free, count, rk, rv, rvalid = state
    key = torch.randn(2, 2, 8, device=device)
    keep = torch.ones(2, 2, dtype=torch.bool, device=device)
    call = lambda rkeep: attngate_ext.paged_decode_step_(  # noqa: E731
        torch.randn(2, 4, 8, device=device), kp, vp, table, lengths, free, count, key, key, keep, None, rk, rv, rvalid,
        0, 1.0, rkeep)
    with pytest.raises(RuntimeError, match="ring_keep must be bool"):
        call(torch.zeros(2, 2, 3, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="ring_keep must have shape"):
        call(torch.zeros(2, 2, 2, dtype=torch.bool, device=device))
    with pytest.raises(RuntimeError, match="ring_keep"):
        call(rvalid)  # the same memory as ring_valid


def test_decode_step_with_ring_keep_opcheck():
    gen = torch.Generator().manual_seed(14)
    state = _state(2, 2, 8, 3, 4, torch.float32, "cpu", gen)
    kp, vp, table, lengths, free, count, rk, rv, rvalid = state
    key = torch.randn(2, 2, 8)
    torch.library.opcheck(torch.ops.attngate.paged_decode_step_,
                          (torch.randn(2, 4, 8), kp, vp, table, lengths, free, count, key, key,
                           torch.tensor([[True, False], [False, True]]), torch.tensor([True, False]), rk, rv, rvalid,
                           2, 0.5, _ring_keep(state, gen, "cpu")))
