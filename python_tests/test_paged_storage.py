"""paged_append_kv_ against paged_reference.paged_append_kv_, and the helpers the other paged storage tests share.

Every comparison is exact: lengths, the whole page table (used entries, entries set to -1, untouched entries),
free_count and the whole free stack, the whole pools (so no stray write goes unnoticed) and each head's logical
rows through ``gather_pages``. The reference always runs on CPU copies of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence

import pytest
import torch

import attngate_ext
from attngate_ext.ops import paged_reference

from conftest import DTYPES, random_mask, randn_strided, sync_if_cuda

PAGE_SIZES = [1, 16, 64]
GARBAGE_ID = 1 << 20  # table entries past a head's pages and free_pages past free_count: never read


def pages_for(n: int, S: int) -> int:
    return (n + S - 1) // S


def _strided_like(t: torch.Tensor, layout: str) -> torch.Tensor:
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


def make_state(B: int, H: int, M: int, S: int, D: int, lengths: Sequence[int], dtype=torch.float32, device="cpu",
               spare_pages: int = 8, gen: Optional[torch.Generator] = None, layout: str = "contiguous") -> PagedState:
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
        tensors = [_strided_like(t, "strided") for t in tensors]
        assert not any(t.is_contiguous() for t in tensors[:5])
    return PagedState(*tensors)


def random_lengths(B: int, H: int, high: int, gen: torch.Generator, zero: bool = True) -> List[int]:
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


# ---------------------------------------------------------------------------------------------------------
# paged_append_kv_
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_append_matches_reference(device, dtype, S):
    g = torch.Generator().manual_seed(S)
    B, H, D, T = 2, 3, 64, S + 5  # T > page size: a head takes several pages in one call
    M = pages_for(3 * S + 2 * T, S)
    lengths = random_lengths(B, H, 3 * S + 1, g)
    state = make_state(B, H, M, S, D, lengths, dtype, device, spare_pages=B * H * pages_for(T, S) + 1, gen=g)
    key = randn_strided((B, H, T, D), dtype, device, generator=g)
    value = randn_strided((B, H, T, D), dtype, device, generator=g)
    keep = random_mask((B, H, T), 0.6, device, generator=g)
    free_before = int(state.free_count[0])
    run_both("paged_append_kv_", state, key, value, keep)
    assert_invariant(state)
    assert int(state.free_count[0]) < free_before  # pages were really popped


@pytest.mark.parametrize("T", [0, 1, 2, 31, 33, 300])
@pytest.mark.parametrize("with_keep", [True, False])
def test_append_T(device, T, with_keep):
    """T = 0 and 1 (decode), around one warp of flags, and more rows than a copy chunk."""
    g = torch.Generator().manual_seed(T)
    B, H, S, D = 3, 2, 16, 128
    lengths = random_lengths(B, H, 40, g)
    state = make_state(B, H, pages_for(40 + T, S), S, D, lengths, torch.bfloat16, device,
                       spare_pages=B * H * (pages_for(T, S) + 1), gen=g)
    key = randn_strided((B, H, T, D), torch.bfloat16, device, generator=g)
    value = randn_strided((B, H, T, D), torch.bfloat16, device, generator=g)
    keep = random_mask((B, H, T), 0.5, device, generator=g) if with_keep else None
    run_both("paged_append_kv_", state, key, value, keep)
    assert_invariant(state)


@pytest.mark.parametrize("case", ["nothing_kept", "everything_kept", "all_empty", "fill_table_exactly", "pool_exact"])
def test_append_edge_cases(device, case):
    g = torch.Generator().manual_seed(7)
    B, H, S, D, T, M = 2, 2, 4, 16, 6, 4
    lengths = [0, 0, 0, 0] if case == "all_empty" else [3, 4, 0, 10]
    if case == "fill_table_exactly":
        lengths = [M * S - T] * 4
    spare = 0 if case == "pool_exact" else 12
    if case == "pool_exact":  # exactly the pages the append needs
        spare = sum(pages_for(n + T, S) - pages_for(n, S) for n in lengths)
    state = make_state(B, H, M, S, D, lengths, torch.float16, device, spare_pages=spare, gen=g)
    key = randn_strided((B, H, T, D), torch.float16, device, generator=g)
    value = randn_strided((B, H, T, D), torch.float16, device, generator=g)
    keep = {"nothing_kept": torch.zeros(B, H, T, dtype=torch.bool, device=device)}.get(
        case, torch.ones(B, H, T, dtype=torch.bool, device=device))
    run_both("paged_append_kv_", state, key, value, keep)
    assert_invariant(state)
    if case == "pool_exact":
        assert int(state.free_count[0]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_append_non_contiguous(device, dtype):
    """Strided pools, page table, lengths and free stack; NHD key/value; a transposed keep mask."""
    g = torch.Generator().manual_seed(5)
    B, H, S, D, T = 2, 3, 16, 72, 21
    lengths = random_lengths(B, H, 50, g)
    state = make_state(B, H, 6, S, D, lengths, dtype, device, spare_pages=12, gen=g, layout="strided")
    key = randn_strided((B, H, T, D), dtype, device, layout="swap12", generator=g)
    value = randn_strided((B, H, T, D), dtype, device, layout="padded", generator=g)
    keep = random_mask((B, H, T), 0.7, device, generator=g, layout="transposed")
    assert not (key.is_contiguous() or value.is_contiguous() or keep.is_contiguous())
    run_both("paged_append_kv_", state, key, value, keep)
    assert_invariant(state)


def test_append_unaligned_rows(device):
    """Rows whose start is not 16-byte aligned (odd D, pool at an odd element offset): the scalar path."""
    g = torch.Generator().manual_seed(8)
    B, H, S, D, T = 2, 2, 16, 24, 5
    state = make_state(B, H, 4, S, D, [5, 0, 17, 16], torch.float16, device, gen=g)
    buf = torch.randn(state.key_pages.numel() + 1, dtype=torch.float16, device=device)
    state.key_pages = buf[1:].view(state.key_pages.shape).copy_(state.key_pages)
    key = randn_strided((B, H, T, D), torch.float16, device, generator=g)
    run_both("paged_append_kv_", state, key, key.clone(), None)


def test_decode_steps_equal_one_append(device):
    """T = 1 appends step by step hold the same logical rows as one append of all T (page ids may differ)."""
    g = torch.Generator().manual_seed(9)
    B, H, S, D, T = 2, 2, 4, 32, 13
    key = randn_strided((B, H, T, D), torch.bfloat16, device, generator=g)
    value = randn_strided((B, H, T, D), torch.bfloat16, device, generator=g)
    keep = random_mask((B, H, T), 0.6, device, generator=g)
    lengths = [2, 0, 5, 9]
    steps = make_state(B, H, 8, S, D, lengths, torch.bfloat16, device, spare_pages=20,
                       gen=torch.Generator().manual_seed(1))
    whole = steps.to(device)
    for t in range(T):
        run_both("paged_append_kv_", steps, key[:, :, t : t + 1], value[:, :, t : t + 1], keep[:, :, t : t + 1])
    attngate_ext.paged_append_kv_(*whole.tensors(), key, value, keep)
    assert torch.equal(steps.lengths, whole.lengths)
    for a, b in zip(logical_rows(steps), logical_rows(whole)):
        assert torch.equal(a, b)
    assert_invariant(steps)
    assert_invariant(whole)


@pytest.mark.parametrize("dtype", DTYPES)
def test_append_opcheck(device, dtype):
    B, H, S, D, T = 2, 2, 4, 16, 3
    state = make_state(B, H, 16, S, D, [1, 4, 0, 7], dtype, device, spare_pages=48)
    key = torch.randn(B, H, T, D, device=device, dtype=dtype)
    value = torch.randn(B, H, T, D, device=device, dtype=dtype)
    keep = torch.rand(B, H, T, device=device) > 0.5
    op = torch.ops.attngate.paged_append_kv_.default
    # opcheck runs the op several times on copies; each run only needs enough free pages, which spare_pages gives.
    torch.library.opcheck(op, (*state.tensors(), key, value, keep))
    torch.library.opcheck(op, (*state.tensors(), key, value, None))


@pytest.mark.skipif(not torch.cuda.is_available() or not attngate_ext.cuda_kernels_available(),
                    reason="CUDA graphs need a CUDA device and the CUDA kernels")
def test_decode_append_cuda_graph_replay():
    """A decode-time append captured once and replayed: pages are popped on the device at every replay."""
    g = torch.Generator().manual_seed(3)
    B, H, S, D, steps = 2, 4, 4, 128, 9
    lengths = [0, 1, 2, 3, 4, 5, 6, 7]
    state = make_state(B, H, 8, S, D, lengths, torch.bfloat16, "cuda", spare_pages=24, gen=g)
    ref = state.to("cpu")
    key = torch.zeros(B, H, 1, D, dtype=torch.bfloat16, device="cuda")
    value = torch.zeros_like(key)
    keep = torch.zeros(B, H, 1, dtype=torch.bool, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the side stream (allocator, module load), then restore the state
        warm = state.to("cuda")
        attngate_ext.paged_append_kv_(*warm.tensors(), key, value, keep)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attngate_ext.paged_append_kv_(*state.tensors(), key, value, keep)
    # Capture does not run the op: the state is still the initial one.
    assert_same_state(state, ref)
    for _ in range(steps):
        k = torch.randn(B, H, 1, D, generator=g).to(torch.bfloat16)
        v = torch.randn(B, H, 1, D, generator=g).to(torch.bfloat16)
        m = torch.rand(B, H, 1, generator=g) < 0.7
        key.copy_(k), value.copy_(v), keep.copy_(m)
        graph.replay()
        paged_reference.paged_append_kv_(*ref.tensors(), k, v, m)
        assert_same_state(state, ref)
    assert_invariant(state)
