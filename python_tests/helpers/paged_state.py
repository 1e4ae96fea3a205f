"""A whole paged state (pools, page table, lengths, free stack) for the paged storage ops, and the exact checks of
their tests: every tensor against the reference's, the page-id invariant, nothing written outside strided views.

The reference always runs on CPU copies of the inputs. (The paged attention tests read pages only:
:mod:`helpers.paged_rows`.)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence

import torch

import attngate_ext
from attngate_ext.ops import paged_reference

from helpers.devices import sync_if_cuda
from helpers.tensors import randn_strided

PAGE_SIZES = [1, 16, 64]
GARBAGE_ID = 1 << 20  # table entries past a head's pages and free_pages past free_count: never read


def pages_for(n: int, S: int) -> int:
    return (n + S - 1) // S


def strided_like(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in a non-contiguous tensor: a slice of a bigger buffer (padding on every dim but the last one's
    end) or, for 1-D tensors, every second element."""
    if layout == "contiguous":
        return t.clone()
    if t.dim() == 1:
        buf = torch.full((2 * t.shape[0] + 1,), -99, dtype=t.dtype, device=t.device)
        view = buf[1::2]
    else:
        buf = torch.full([s + 2 for s in t.shape[:-1]] + [t.shape[-1] + 8], -99, dtype=t.dtype, device=t.device)
        view = buf[tuple(slice(1, 1 + s) for s in t.shape[:-1]) + (slice(0, t.shape[-1]),)]
    view.copy_(t)
    return view


@dataclass
class PagedState:
    key_pages: torch.Tensor
    value_pages: torch.Tensor
    page_table: torch.Tensor
    lengths: torch.Tensor
    free_pages: torch.Tensor
    free_count: torch.Tensor

    def tensors(self):
        return tuple(getattr(self, f.name) for f in fields(self))

    def to(self, device) -> "PagedState":
        return PagedState(*(t.to(device).clone() for t in self.tensors()))

    def snapshot(self) -> Dict[str, torch.Tensor]:
        """Copies of every tensor and of the buffers the strided ones are views of."""
        out = {f.name: getattr(self, f.name).clone() for f in fields(self)}
        for f in fields(self):
            t = getattr(self, f.name)
            if t._base is not None:
                out[f.name + "._base"] = t._base.clone()
        return out

    def assert_unchanged(self, snap: Dict[str, torch.Tensor]) -> None:
        for name, old in snap.items():
            obj, attr = (name[: -len("._base")], "_base") if name.endswith("._base") else (name, None)
            now = getattr(self, obj) if attr is None else getattr(self, obj)._base
            assert torch.equal(now, old), f"{name} was written although the op raised"


def make_paged_state(B: int, H: int, M: int, S: int, D: int, lengths: Sequence[int], dtype=torch.float32,
                     device="cpu", spare_pages: int = 8, gen: Optional[torch.Generator] = None,
                     layout: str = "contiguous") -> PagedState:
    """A consistent random state: each head (b, h) holds lengths[b * H + h] random rows in randomly chosen pages;
    every other page is on the free stack, in random order. `layout` "strided" makes every tensor a strided view."""
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    lengths = list(lengths)
    assert len(lengths) == B * H and all(0 <= n <= M * S for n in lengths)
    used = sum(pages_for(n, S) for n in lengths)
    P = used + spare_pages
    perm = torch.randperm(P, generator=gen).tolist()
    table = torch.full((B, H, M), GARBAGE_ID, dtype=torch.int32)
    at = 0
    for bh, n in enumerate(lengths):
        k = pages_for(n, S)
        table[bh // H, bh % H, :k] = torch.tensor(perm[at : at + k], dtype=torch.int32)
        at += k
    free = torch.full((P,), -GARBAGE_ID, dtype=torch.int32)
    free[: P - used] = torch.tensor(perm[used:], dtype=torch.int32)
    key_pages = randn_strided((P, S, D), dtype, "cpu", generator=gen)
    value_pages = randn_strided((P, S, D), dtype, "cpu", generator=gen)
    tensors = [key_pages, value_pages, table, torch.tensor(lengths, dtype=torch.int32).view(B, H), free,
               torch.tensor([P - used], dtype=torch.int32)]
    tensors = [t.to(device) for t in tensors]
    if layout == "strided":  # built on the device: .to() would make them contiguous again
        tensors = [strided_like(t, "strided") for t in tensors]
        assert not any(t.is_contiguous() for t in tensors[:5])
    return PagedState(*tensors)


def ragged_lengths(B: int, H: int, high: int, gen: torch.Generator, zero: bool = True) -> List[int]:
    """Ragged lengths in [0, high], the first head empty (zero) and one head at high."""
    out = torch.randint(0, high + 1, (B * H,), generator=gen).tolist()
    if zero:
        out[0] = 0
    out[-1] = high
    return out


def logical_rows(state: PagedState):
    """keys, values (B, H, L, D) and live (B, H, L) of every head, in logical order."""
    return attngate_ext.gather_pages(state.key_pages, state.value_pages, state.page_table, state.lengths)


def assert_same_state(got: PagedState, ref: PagedState) -> None:
    """Every tensor of the op's state equals the reference's (ref on CPU), and each head's logical rows too."""
    sync_if_cuda(got.key_pages.device.type)
    g = got.to("cpu")
    assert torch.equal(g.lengths, ref.lengths), (g.lengths, ref.lengths)
    assert torch.equal(g.free_count, ref.free_count), (g.free_count, ref.free_count)
    n_free = int(ref.free_count[0])
    assert torch.equal(g.free_pages[:n_free], ref.free_pages[:n_free]), "free stack differs"
    assert torch.equal(g.free_pages, ref.free_pages), "free_pages past free_count differ"
    assert torch.equal(g.page_table, ref.page_table), "page table differs"
    for got_rows, ref_rows in zip(logical_rows(g), logical_rows(ref)):
        assert torch.equal(got_rows, ref_rows), "logical rows differ"
    assert torch.equal(g.key_pages, ref.key_pages) and torch.equal(g.value_pages, ref.value_pages), "pools differ"


def assert_invariant(state: PagedState) -> None:
    """Every page id is in exactly one head's used pages or in the free stack."""
    s = state.to("cpu")
    P, S, _ = s.key_pages.shape
    B, H, _ = s.page_table.shape
    ids = [int(i) for b in range(B) for h in range(H) for i in s.page_table[b, h, : pages_for(int(s.lengths[b, h]), S)]]
    ids += s.free_pages[: int(s.free_count[0])].tolist()
    assert sorted(ids) == list(range(P)), "a page is lost, duplicated or out of range"


def padding_untouched(state: PagedState, snap: Dict[str, torch.Tensor]) -> None:
    """For strided views: the parts of their buffers outside the view still hold what they held."""
    for f in fields(state):
        t = getattr(state, f.name)
        if t._base is None:
            continue
        inside = torch.zeros(t._base.shape, dtype=torch.bool, device=t.device)
        inside.as_strided(t.shape, t.stride(), t.storage_offset() - t._base.storage_offset()).fill_(True)
        assert torch.equal(t._base[~inside], snap[f.name + "._base"][~inside]), f"{f.name}: write outside the view"


def run_both(op: str, state: PagedState, *args) -> PagedState:
    """Runs the op on `state` and the reference on a CPU copy (args moved to CPU); asserts they agree."""
    ref = state.to("cpu")
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    getattr(paged_reference, op)(*ref.tensors(), *cpu_args)
    snap = state.snapshot()
    getattr(attngate_ext, op)(*state.tensors(), *args)
    assert_same_state(state, ref)
    padding_untouched(state, snap)
    return ref


def random_rows(lengths: List[int], B: int, H: int, K: int, gen: torch.Generator, pad: float = 0.3) -> torch.Tensor:
    """(B, H, K) int32: up to K distinct live rows per head in random order, some entries -1 (ignored)."""
    rows = torch.full((B * H, K), -1, dtype=torch.int32)
    for bh, n in enumerate(lengths):
        k = min(n, K)
        picked = torch.randperm(n, generator=gen)[:k].to(torch.int32)
        rows[bh, :k] = picked
        rows[bh] = rows[bh, torch.randperm(K, generator=gen)]
        drop = torch.rand(K, generator=gen) < pad
        rows[bh, drop] = -1 - torch.randint(0, 5, (int(drop.sum()),), generator=gen, dtype=torch.int32)
    return rows.view(B, H, K)
