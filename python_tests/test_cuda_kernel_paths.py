"""The CUDA kernels' less common paths, as CPU/CUDA twins (the CUDA twin skips without a GPU).

Each test names the CUDA path it is there for. Append and compaction are compared bit for bit (with the pure-
PyTorch reference, or with the CPU op for the large compaction on CUDA), decode attention against a float64
truth with PyTorch's own error at the same precision as the tolerance. The CPU twins run the same checks against
the reference, at reduced sizes where the CUDA size would take minutes on a CPU.
"""

from __future__ import annotations

import pytest
import torch

import attngate_ext
from attngate_ext import reference

from helpers.checks import check_decode_attention, check_gate_flags
from helpers.devices import sync_if_cuda
from helpers.rect_cache import assert_same_live_rows
from helpers.tensors import misaligned_randn, randn_strided, random_lengths, random_mask


def _append_and_compare(kc, vc, lengths, key, value, keep):
    expected = [kc.clone(), vc.clone(), lengths.clone()]
    reference.append_kv_(*expected, key, value, keep)
    attngate_ext.append_kv_(kc, vc, lengths, key, value, keep)
    sync_if_cuda(kc.device.type)
    assert_same_live_rows((kc, vc, lengths), expected)


def _compact_and_compare(kc, vc, lengths, keep):
    expected = [kc.clone(), vc.clone(), lengths.clone()]
    reference.compact_kv_(*expected, keep)
    attngate_ext.compact_kv_(kc, vc, lengths, keep)
    sync_if_cuda(kc.device.type)
    assert_same_live_rows((kc, vc, lengths), expected)


# ---- decode attention: GQA tiles and device-side splits ------------------------------------------------------

GROUP_DTYPES = {2: torch.float32, 3: torch.float16, 5: torch.bfloat16, 8: torch.float32, 12: torch.float16,
                16: torch.bfloat16}


@pytest.mark.parametrize("C", [65, 4128])
@pytest.mark.parametrize("group", sorted(GROUP_DTYPES))
def test_decode_gqa_groups_ragged_lengths(device, group, C):
    """Tiles of 4 and 8 query heads, partly filled (3, 5, 12) or several per KV head (12, 16); lengths 0, 1, C and
    ragged, on a one-tile cache and on one long enough for several splits per head."""
    dtype = GROUP_DTYPES[group]
    g = torch.Generator().manual_seed(group * 1000 + C)
    B, H, D = 3, 2, 64
    kc = randn_strided((B, H, C, D), dtype, device, generator=g)
    vc = randn_strided((B, H, C, D), dtype, device, generator=g)
    query = randn_strided((B, H * group, D), dtype, device, generator=g)
    lengths = torch.tensor([[0, C], [1, C // 2 + 3], [min(C, 257), C - 5]], dtype=torch.int32, device=device)
    out = check_decode_attention(query, kc, vc, lengths, D**-0.5)
    assert not bool(out[0, :group].any())  # the empty head gives zeros
    assert bool(out[0, group:].abs().sum() > 0)


# ---- scalar paths: unaligned storage and rows that are not a multiple of 16 bytes ---------------------------

LAYOUTS = [("misaligned", 64), ("aligned", 66), ("misaligned", 66)]
LAYOUT_IDS = [f"{kind}-D{D}" for kind, D in LAYOUTS]


def _tensor(kind, shape, dtype, device, g):
    return misaligned_randn(shape, dtype, device, g) if kind == "misaligned" else randn_strided(shape, dtype, device, generator=g)


@pytest.mark.parametrize("T", [1, 40])  # the one-launch small path and the three-launch path
@pytest.mark.parametrize("kind,D", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_scalar_paths(device, dtype, kind, D, T):
    g = torch.Generator().manual_seed(D + T)
    B, H, C = 2, 3, 2 * T + 64
    kc, vc = (_tensor(kind, (B, H, C, D), dtype, device, g) for _ in range(2))
    key, value = (_tensor(kind, (B, H, T, D), dtype, device, g) for _ in range(2))
    lengths = random_lengths(B, H, 0, 64, device, generator=g)
    _append_and_compare(kc, vc, lengths, key, value, random_mask((B, H, T), 0.6, device, generator=g))
    _append_and_compare(kc, vc, lengths, key, value, None)


@pytest.mark.parametrize("kind,D", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_scalar_paths(device, dtype, kind, D):
    g = torch.Generator().manual_seed(D)
    B, H, C = 2, 3, 600  # several chunks per head
    kc, vc = (_tensor(kind, (B, H, C, D), dtype, device, g) for _ in range(2))
    lengths = random_lengths(B, H, 0, C, device, generator=g)
    lengths[0, 0] = C
    keep = random_mask((B, H, C), 0.5, device, generator=g)
    keep[0, 1, : C // 2] = True  # a long kept prefix that must not move
    _compact_and_compare(kc, vc, lengths, keep)


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("kind,D", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_scalar_paths(device, dtype, kind, D, group):
    g = torch.Generator().manual_seed(D * group)
    B, H, C = 2, 2, 300
    kc, vc = (_tensor(kind, (B, H, C, D), dtype, device, g) for _ in range(2))
    query = _tensor(kind, (B, H * group, D), dtype, device, g)
    lengths = torch.tensor([[C, 0], [129, 1]], dtype=torch.int32, device=device)
    check_decode_attention(query, kc, vc, lengths, D**-0.5)


# ---- one contract: any head dim ------------------------------------------------------------------------------

# CUDA: D = 300 bfloat16 rows are not 16-byte multiples (wide kernel, scalar loads); D = 512 bfloat16 takes the
# tiled kernel with large staged tiles; D = 1024 float32 rows are too wide to stage (wide kernel, 16-byte loads).
@pytest.mark.parametrize("D,dtype", [(300, torch.bfloat16), (512, torch.bfloat16), (1024, torch.float32)])
@pytest.mark.parametrize("group", [1, 4])
def test_decode_large_head_dims(device, D, dtype, group):
    g = torch.Generator().manual_seed(D + group)
    B, H, C = 2, 2, 700
    kc = randn_strided((B, H, C, D), dtype, device, generator=g)
    vc = randn_strided((B, H, C, D), dtype, device, generator=g)
    query = randn_strided((B, H * group, D), dtype, device, generator=g)
    lengths = torch.tensor([[C, 0], [300, 1]], dtype=torch.int32, device=device)
    check_decode_attention(query, kc, vc, lengths, D**-0.5)


# ---- append: many chunks, and both sides of the one-launch threshold -------------------------------------------

@pytest.mark.parametrize("keep_kind", ["mask", "none"])
@pytest.mark.parametrize("T", [257, 4099])
def test_append_long(device, T, keep_kind):
    g = torch.Generator().manual_seed(T)
    B, H, D, slack = 2, 3, 64, 40
    C = T + slack
    kc, vc = (randn_strided((B, H, C, D), torch.bfloat16, device, generator=g) for _ in range(2))
    key, value = (randn_strided((B, H, T, D), torch.bfloat16, device, generator=g) for _ in range(2))
    lengths = random_lengths(B, H, 0, slack, device, generator=g)
    keep = random_mask((B, H, T), 0.4, device, generator=g) if keep_kind == "mask" else None
    _append_and_compare(kc, vc, lengths, key, value, keep)


# (B, H, T) with D = 128 bfloat16 (16 vectors of 16 bytes per row): on CUDA, B * H * T * 16 <= 8192 and T <= 32
# is one launch, the rest three.
@pytest.mark.parametrize("B,H,T", [(64, 8, 1), (65, 8, 1), (2, 2, 32), (2, 2, 33)])
@pytest.mark.parametrize("keep_kind", ["mask", "none"])
def test_append_small_launch_threshold(device, B, H, T, keep_kind):
    g = torch.Generator().manual_seed(B * H * T)
    D, C = 128, 80
    kc, vc = (randn_strided((B, H, C, D), torch.bfloat16, device, generator=g) for _ in range(2))
    key, value = (randn_strided((B, H, T, D), torch.bfloat16, device, generator=g) for _ in range(2))
    lengths = random_lengths(B, H, 0, C - T, device, generator=g)
    keep = random_mask((B, H, T), 0.5, device, generator=g) if keep_kind == "mask" else None
    _append_and_compare(kc, vc, lengths, key, value, keep)


def test_append_small_launch_overflow_writes_nothing(device):
    B, H, C, D = 4, 4, 8, 128
    kc, vc = torch.zeros(B, H, C, D, device=device), torch.zeros(B, H, C, D, device=device)
    lengths = torch.full((B, H), 3, dtype=torch.int32, device=device)
    lengths[3, 2] = C  # one full head
    before = [kc.clone(), vc.clone(), lengths.clone()]
    with attngate_ext.sync_checks(True), pytest.raises(RuntimeError, match="capacity overflow"):
        attngate_ext.append_kv_(kc, vc, lengths, torch.ones(B, H, 1, D, device=device), torch.ones(B, H, 1, D, device=device))
    for t, old in zip((kc, vc, lengths), before):
        assert torch.equal(t, old)


# ---- compaction: thousands of blocks, rows that do not move, opt-in and beyond shared memory -----------------

def _kernel_chunk_rows(D, elem_size):
    """Rows per block of the CUDA compaction for rows that fit its 46 KiB shared-memory budget."""
    return min(256, (46 * 1024) // (2 * D * elem_size))


def _stress_keep(pattern, shape, chunk, generator):
    B, H, C = shape
    if pattern == "drop_row_0":  # every row moves by one
        keep = torch.ones(shape, dtype=torch.bool)
        keep[..., 0] = False
    elif pattern == "last_row_of_chunk":  # each chunk moves one row far down
        keep = torch.zeros(shape, dtype=torch.bool)
        keep[..., chunk - 1 :: chunk] = True
    elif pattern == "keep_all":  # nothing moves
        keep = torch.ones(shape, dtype=torch.bool)
    else:
        keep = torch.rand(shape, generator=generator) < 0.5
    return keep


@pytest.mark.parametrize("pattern", ["drop_row_0", "last_row_of_chunk", "keep_all", "random"])
def test_compaction_stress(device, pattern):
    """CUDA: B16 H8 C32768 bfloat16 (1 GiB of K and V, ~23k blocks), three compactions in a row (the pattern
    twice, then random), each bit-exact with the CPU op. CPU twin: B2 H2 C4096 against the reference."""
    on_cuda = device == "cuda"
    B, H, C, D = (16, 8, 32768, 64) if on_cuda else (2, 2, 4096, 16)
    g = torch.Generator().manual_seed(17)
    dev_gen = torch.Generator(device=device).manual_seed(17)
    kc = torch.randn(B, H, C, D, device=device, generator=dev_gen).to(torch.bfloat16)
    vc = torch.randn(B, H, C, D, device=device, generator=dev_gen).to(torch.bfloat16)
    lengths = torch.full((B, H), C, dtype=torch.int32)
    lengths[::3, ::2] = torch.randint(0, C + 1, lengths[::3, ::2].shape, generator=g, dtype=torch.int32)
    lengths = lengths.to(device)
    chunk = _kernel_chunk_rows(D, 2)
    for pattern_now in (pattern, pattern, "random"):
        keep = _stress_keep(pattern_now, (B, H, C), chunk, g)
        if on_cuda:  # the CPU op on host copies
            expected = [kc.cpu(), vc.cpu(), lengths.cpu()]
            attngate_ext.compact_kv_(*expected, keep)
        else:
            expected = [kc.clone(), vc.clone(), lengths.clone()]
            reference.compact_kv_(*expected, keep)
        attngate_ext.compact_kv_(kc, vc, lengths, keep.to(device))
        sync_if_cuda(device)
        assert_same_live_rows((kc, vc, lengths), expected)


# D = 8192 float32: a K + V row pair (64 KiB) exceeds the 46 KiB budget, so CUDA uses the opt-in shared memory
# with 3 rows per block; D = 8193 is the same on the scalar path; D = 32768 (256 KiB per pair) exceeds even that
# and takes the one-block-per-head fallback.
@pytest.mark.parametrize("D", [8192, 8193, 32768])
def test_compaction_wide_rows(device, D):
    g = torch.Generator().manual_seed(D)
    B, H, C = 1, 3, 40
    kc, vc = (randn_strided((B, H, C, D), torch.float32, device, generator=g) for _ in range(2))
    lengths = torch.tensor([[C, 23, 0]], dtype=torch.int32, device=device)
    keep = random_mask((B, H, C), 0.5, device, generator=g)
    keep[0, 0, :5] = True  # a stationary prefix, then moves
    _compact_and_compare(kc, vc, lengths, keep)
    drop_first = torch.ones(B, H, C, dtype=torch.bool, device=device)
    drop_first[..., 0] = False
    _compact_and_compare(kc, vc, lengths, drop_first)


# ---- gate_flags: weights too large for shared memory ----------------------------------------------------------

@pytest.mark.parametrize("G", [1024, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gate_flags_weights_in_global_memory(device, dtype, G):
    """H = 32 heads x G = 1024 float weights (128 KiB) are read from global memory on CUDA, not staged."""
    g = torch.Generator().manual_seed(G)
    B, T, H = 2, 70, 32
    gate_out = randn_strided((B, T, G), dtype, device, generator=g)
    weight = (randn_strided((H, G), dtype, device, generator=g) / G**0.5).to(dtype)
    bias = randn_strided((H,), dtype, device, generator=g)
    valid = (torch.rand(B, T, generator=g) > 0.2).to(device)
    check_gate_flags(gate_out, weight, bias, 0.5, 2, 0, valid)


# ---- opcheck on the unusual paths (schema, fake tensors, AOT dispatch with the scalar and wide kernels) ---------

@pytest.mark.parametrize("D", [66, 300])
def test_opcheck_unusual_head_dims(device, D):
    g = torch.Generator().manual_seed(D)
    B, H, C, T = 2, 2, 24, 3
    kc, vc = (misaligned_randn((B, H, C, D), torch.bfloat16, device, g) for _ in range(2))
    lengths = random_lengths(B, H, 0, C - T, device, generator=g)
    key, value = (randn_strided((B, H, T, D), torch.bfloat16, device, generator=g) for _ in range(2))
    keep = random_mask((B, H, T), 0.5, device, generator=g)
    torch.library.opcheck(torch.ops.attngate.append_kv_.default, (kc, vc, lengths, key, value, keep))
    torch.library.opcheck(torch.ops.attngate.compact_kv_.default, (kc, vc, lengths, random_mask((B, H, C), 0.5, device, generator=g)))
    query = randn_strided((B, 4 * H, D), torch.bfloat16, device, generator=g)
    torch.library.opcheck(torch.ops.attngate.decode_attention.default, (query, kc, vc, lengths, D**-0.5))
