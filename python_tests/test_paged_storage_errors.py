"""Errors of the paged storage ops: value errors (lengths, free_count, out of pages, page table full, page ids,
rows) raise and write nothing; bad arguments raise an error naming the argument."""

from __future__ import annotations

import pytest
import torch

import attngate_ext
from attngate_ext.ops import paged_reference

from helpers.devices import CUDA_SKIP_REASON
from helpers.paged_state import PagedState, make_paged_state

B, H, M, S, D, T = 2, 2, 4, 4, 16, 3
LENGTHS = [5, 0, 8, 13]  # head 0 and 3 end inside a page, head 2 on a page boundary


def _state(device, spare=6) -> PagedState:
    return make_paged_state(B, H, M, S, D, LENGTHS, torch.float32, device, spare_pages=spare,
                            gen=torch.Generator().manual_seed(0))


def _new_rows(device, T=T):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, H, T, D, generator=g).to(device), torch.randn(B, H, T, D, generator=g).to(device)


def _expect_error(op: str, state: PagedState, args, message: str, reference_too: bool = True) -> None:
    """The op raises `message` and leaves every tensor (and the buffers of views) as it was; so does the
    reference (on a CPU copy), unless reference_too is False."""
    if reference_too:
        ref = state.to("cpu")
        with pytest.raises(RuntimeError, match=message):
            getattr(paged_reference, op)(*ref.tensors(), *[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    snap = state.snapshot()
    with attngate_ext.sync_checks(True), pytest.raises(RuntimeError, match=message):
        getattr(attngate_ext, op)(*state.tensors(), *args)
    state.assert_unchanged(snap)


def _set(t: torch.Tensor, index, value) -> None:
    t[index] = value


# ---------------------------------------------------------------------------------------------------------
# Value errors: (op, how to break the state / args, message)
# ---------------------------------------------------------------------------------------------------------

LENGTH_MSG = r"lengths must lie in \[0"
FREE_MSG = r"free_count must lie in \[0, P\]"
ID_MSG = r"page id in page_table or free_pages is outside \[0, P\)"


def _append_case(device, case):
    state = _state(device)
    key, value = _new_rows(device)
    keep = torch.ones(B, H, T, dtype=torch.bool, device=device)
    P = state.key_pages.shape[0]
    free = int(state.free_count[0])
    message = {
        "length_high": LENGTH_MSG, "length_negative": LENGTH_MSG, "free_count_high": FREE_MSG,
        "free_count_negative": FREE_MSG, "table_full": "page table full", "out_of_pages": "out of pages",
        "bad_partial_page": ID_MSG, "bad_popped_page": ID_MSG, "table_full_and_out_of_pages": "page table full",
        "length_and_free_count": LENGTH_MSG,
    }[case]
    if case == "length_high":
        _set(state.lengths, (1, 0), M * S + 1)
    elif case == "length_negative":
        _set(state.lengths, (0, 1), -1)
    elif case == "free_count_high":
        _set(state.free_count, 0, P + 1)
    elif case == "free_count_negative":
        _set(state.free_count, 0, -2)
    elif case == "table_full":  # head 3: 13 + 3 = 16 rows fit, 17 do not
        key, value = _new_rows(device, T=4)
        keep = torch.ones(B, H, 4, dtype=torch.bool, device=device)
    elif case == "out_of_pages":  # the append needs 2 new pages (heads 1 and 2)
        _set(state.free_count, 0, 1)
    elif case == "bad_partial_page":  # head 0 writes into its partly filled 2nd page
        _set(state.page_table, (0, 0, 1), P + 3)
    elif case == "bad_popped_page":  # the topmost free page goes to head 1
        _set(state.free_pages, free - 1, -5)
    elif case == "table_full_and_out_of_pages":  # both: the reference's order reports the page table first
        key, value = _new_rows(device, T=4)
        keep = torch.ones(B, H, 4, dtype=torch.bool, device=device)
        _set(state.free_count, 0, 0)
    elif case == "length_and_free_count":
        _set(state.lengths, (0, 0), -3)
        _set(state.free_count, 0, P + 9)
    return state, (key, value, keep), message


APPEND_CASES = ["length_high", "length_negative", "free_count_high", "free_count_negative", "table_full",
                "out_of_pages", "bad_partial_page", "bad_popped_page", "table_full_and_out_of_pages",
                "length_and_free_count"]


@pytest.mark.parametrize("case", APPEND_CASES)
def test_append_value_errors(device, case):
    state, args, message = _append_case(device, case)
    _expect_error("paged_append_kv_", state, args, message)


def test_append_ignores_entries_it_does_not_touch(device):
    """A head that appends nothing does not read its table; entries past a head's pages are never read."""
    state = _state(device)
    key, value = _new_rows(device)
    keep = torch.ones(B, H, T, dtype=torch.bool, device=device)
    keep[0, 0] = False
    _set(state.page_table, (0, 0, 1), -7)  # head 0's partly filled page: not written, so not checked
    attngate_ext.paged_append_kv_(*state.tensors(), key, value, keep)
    assert state.lengths.flatten().tolist() == [5, 3, 11, 16]


def _compact_case(device, case):
    state = _state(device)
    keep = torch.rand(B, H, 16, generator=torch.Generator().manual_seed(2)).to(device) < 0.5
    P = state.key_pages.shape[0]
    message = {"length_high": LENGTH_MSG, "free_count_high": FREE_MSG, "bad_used_page": ID_MSG,
               "keep_too_short": "keep must cover every live row",
               "free_overflow": "pages given back must fit|free_pages would overflow"}[case]
    if case == "length_high":
        _set(state.lengths, (0, 1), M * S + 1)
    elif case == "free_count_high":
        _set(state.free_count, 0, P + 1)
    elif case == "keep_too_short":
        keep = keep[..., :12]  # head 3 has 13 rows
    elif case == "bad_used_page":  # a page of head 2 that does not move
        _set(state.page_table, (1, 0, 0), P)
    elif case == "free_overflow":  # an inconsistent stack that claims every page is free already
        _set(state.free_count, 0, P)
        keep[1, 1] = False  # head 3 gives back its 4 pages
    return state, (keep,), message


@pytest.mark.parametrize("case", ["length_high", "free_count_high", "keep_too_short", "bad_used_page", "free_overflow"])
def test_compact_value_errors(device, case):
    state, args, message = _compact_case(device, case)
    # The reference moves rows before it finds the overflow (its check comes after the moves): only the op is
    # held to "nothing written" there.
    _expect_error("paged_compact_kv_", state, args, message, reference_too=case != "free_overflow")


def _remove_case(device, case):
    state = _state(device)
    rows = torch.full((B, H, 3), -1, dtype=torch.int32, device=device)
    rows[0, 0, 0], rows[1, 1, 0] = 1, 2
    P = state.key_pages.shape[0]
    message = {"length_negative": LENGTH_MSG, "free_count_negative": FREE_MSG,
               "row_past_length": "rows must be distinct live rows", "row_twice": "rows must be distinct live rows",
               "row_in_empty_head": "rows must be distinct live rows", "bad_used_page": ID_MSG,
               "free_overflow": "pages given back must fit|free_pages would overflow"}[case]
    if case == "length_negative":
        _set(state.lengths, (1, 1), -1)
    elif case == "free_count_negative":
        _set(state.free_count, 0, -1)
    elif case == "row_past_length":
        rows[1, 0, 2] = 8  # head 2 has rows 0..7
    elif case == "row_twice":
        rows[1, 1, 2] = 2
    elif case == "row_in_empty_head":
        rows[0, 1, 1] = 0
    elif case == "bad_used_page":
        _set(state.page_table, (1, 1, 3), -4)
    elif case == "free_overflow":
        _set(state.free_count, 0, P)
        rows[0, 0] = torch.tensor([0, 3, 4], dtype=torch.int32)  # head 0: 5 -> 2 rows, gives back a page
    return state, (rows,), message


@pytest.mark.parametrize("case", ["length_negative", "free_count_negative", "row_past_length", "row_twice",
                                  "row_in_empty_head", "bad_used_page", "free_overflow"])
def test_remove_value_errors(device, case):
    state, args, message = _remove_case(device, case)
    _expect_error("paged_remove_rows_", state, args, message)


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
@pytest.mark.parametrize("op,case", [("paged_append_kv_", "out_of_pages"), ("paged_append_kv_", "table_full"),
                                     ("paged_compact_kv_", "bad_used_page"), ("paged_remove_rows_", "row_twice")])
def test_cuda_value_errors_without_sync_checks_write_nothing(op, case):
    """With the host read-back off the CUDA ops do not raise, and still write nothing (device-side all or nothing)."""
    make = {"paged_append_kv_": _append_case, "paged_compact_kv_": _compact_case, "paged_remove_rows_": _remove_case}
    state, args, _ = make[op]("cuda", case)
    snap = state.snapshot()
    with attngate_ext.sync_checks(False):
        getattr(attngate_ext, op)(*state.tensors(), *args)
    torch.cuda.synchronize()
    state.assert_unchanged(snap)


# ---------------------------------------------------------------------------------------------------------
# Bad arguments: (op, argument, how to corrupt it, message)
# ---------------------------------------------------------------------------------------------------------


def _args(op: str, device):
    state = _state(device)
    args = {f: getattr(state, f) for f in ("key_pages", "value_pages", "page_table", "lengths", "free_pages",
                                           "free_count")}
    if op == "paged_append_kv_":
        key, value = _new_rows(device)
        args.update(key=key, value=value, keep=torch.ones(B, H, T, dtype=torch.bool, device=device))
    elif op == "paged_compact_kv_":
        args.update(keep=torch.ones(B, H, 16, dtype=torch.bool, device=device))
    else:
        args.update(rows=torch.full((B, H, 2), -1, dtype=torch.int32, device=device))
    return args


def _expanded(t):
    return t[:1].expand(t.shape)


BAD_ARGS = [
    ("paged_append_kv_", "key_pages", lambda a: a["key_pages"].double(), "key_pages must be float32, float16 or bfloat16"),
    ("paged_append_kv_", "key_pages", lambda a: a["key_pages"][0], r"key_pages must be 3-D"),
    ("paged_append_kv_", "value_pages", lambda a: a["value_pages"].half(), "value_pages must have the dtype of key_pages"),
    ("paged_append_kv_", "value_pages", lambda a: a["value_pages"][:, :2], "value_pages must have the shape of key_pages"),
    ("paged_append_kv_", "key_pages", lambda a: a["key_pages"].transpose(1, 2).contiguous().transpose(1, 2),
     "key_pages must have a contiguous last dimension"),
    ("paged_append_kv_", "key_pages", lambda a: _expanded(a["key_pages"]), "key_pages must not have internal overlap"),
    ("paged_append_kv_", "value_pages", lambda a: a["key_pages"], "key_pages and value_pages must not share memory"),
    ("paged_append_kv_", "page_table", lambda a: a["page_table"].long(), "page_table must be int32"),
    ("paged_append_kv_", "page_table", lambda a: a["page_table"][0], r"page_table must be 3-D"),
    ("paged_append_kv_", "lengths", lambda a: a["lengths"].long(), "lengths must be int32"),
    ("paged_append_kv_", "lengths", lambda a: a["lengths"][:1], r"lengths must have shape \(B, H\)"),
    ("paged_append_kv_", "lengths", lambda a: a["page_table"].view(-1)[: B * H].view(B, H),
     "page_table and lengths must not share memory"),
    ("paged_append_kv_", "lengths", lambda a: a["page_table"][:, :, 0],  # a strided alias: proven exactly
     "page_table and lengths must not share memory"),
    ("paged_append_kv_", "free_pages", lambda a: a["free_pages"].long(), "free_pages must be int32"),
    ("paged_append_kv_", "free_pages", lambda a: a["free_pages"][1:], r"free_pages must have shape \(P,\)"),
    ("paged_append_kv_", "free_pages", lambda a: _expanded(a["free_pages"]), "free_pages must not have internal overlap"),
    ("paged_append_kv_", "free_count", lambda a: a["free_count"].repeat(2), r"free_count must have shape \(1,\)"),
    ("paged_append_kv_", "free_count", lambda a: a["free_count"].long(), "free_count must be int32"),
    ("paged_append_kv_", "free_count", lambda a: a["free_pages"][:1], "free_pages and free_count must not share memory"),
    ("paged_append_kv_", "free_count", lambda a: a["lengths"][0, :1], "lengths and free_count must not share memory"),
    ("paged_append_kv_", "key", lambda a: a["key"].half(), "key must have the dtype of key_pages"),
    ("paged_append_kv_", "key", lambda a: a["key"][:, :1], r"key must have shape \(B, H, T, D\)"),
    ("paged_append_kv_", "value", lambda a: a["value"][:, :, :1], "value must have the shape of key"),
    ("paged_append_kv_", "key", lambda a: a["key_pages"].view(-1)[: B * H * T * D].view(B, H, T, D),
     "key and key_pages must not share memory"),
    ("paged_append_kv_", "keep", lambda a: a["keep"].int(), "keep must be bool"),
    ("paged_append_kv_", "keep", lambda a: a["keep"][:, :, :1], r"keep must have shape \(B, H, T\)"),
    ("paged_compact_kv_", "keep", lambda a: a["keep"][0], r"keep must have shape \(B, H, L\)"),
    ("paged_compact_kv_", "keep", lambda a: a["keep"].float(), "keep must be bool"),
    ("paged_compact_kv_", "page_table", lambda a: _expanded(a["page_table"]), "page_table must not have internal overlap"),
    ("paged_compact_kv_", "lengths", lambda a: a["lengths"].to("meta"), "lengths must be on the same device as key_pages"),
    ("paged_remove_rows_", "rows", lambda a: a["rows"].long(), "rows must be int32"),
    ("paged_remove_rows_", "rows", lambda a: a["rows"][:1], r"rows must have shape \(B, H, K\)"),
    ("paged_remove_rows_", "free_pages", lambda a: a["free_pages"].view(1, -1), r"free_pages must have shape \(P,\)"),
]


@pytest.mark.parametrize("op,arg,corrupt,message", BAD_ARGS, ids=[f"{c[0]}-{c[1]}-{c[3][:32]}" for c in BAD_ARGS])
def test_bad_argument_raises_and_writes_nothing(device, op, arg, corrupt, message):
    args = _args(op, device)
    args[arg] = corrupt(args)
    before = {k: v.clone() for k, v in args.items() if v.device.type != "meta"}
    with pytest.raises(RuntimeError, match=message):
        getattr(attngate_ext, op)(**args)
    for name, old in before.items():
        assert torch.equal(args[name], old), f"{op} wrote into {name} although it raised"


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
@pytest.mark.parametrize("op,arg", [("paged_append_kv_", "free_pages"), ("paged_append_kv_", "key"),
                                    ("paged_append_kv_", "keep"), ("paged_compact_kv_", "keep"),
                                    ("paged_remove_rows_", "rows")])
def test_cross_device_on_cuda(op, arg):
    """A real CPU/CUDA mismatch reaches the CUDA entry point, which names the argument."""
    args = _args(op, "cuda")
    args[arg] = args[arg].cpu()
    with pytest.raises(RuntimeError, match=f"{arg} must be on the same device as key_pages"):
        getattr(attngate_ext, op)(**args)
