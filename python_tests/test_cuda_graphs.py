"""append_kv_, compact_kv_ and decode_attention captured once in a CUDA graph and replayed several times, with the
inputs restored or changed in between: every replay must equal an eager run on the same inputs. A scratch word
that is not reset per replay (a ticket counter, a flag, a status) would make a second replay differ or hang."""

from __future__ import annotations

import pytest
import torch

import attngate_ext

from helpers.devices import CUDA_SKIP_REASON
from helpers.rect_cache import assert_same_live_rows

pytestmark = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))

B, H, GROUP, C, D = 2, 2, 4, 2048, 128
T_BIG = 300  # three-launch append; the T = 1 append takes the one-launch path


def _inputs(seed):
    """Fresh input values: caches, lengths, one long and one single-row append, a pruning mask, a query."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device="cuda", dtype=torch.bfloat16)

    lengths = torch.randint(0, C - T_BIG - 1, (B, H), generator=g, dtype=torch.int32)
    return {
        "kc": rnd(B, H, C, D), "vc": rnd(B, H, C, D), "lengths": lengths.cuda(),
        "key": rnd(B, H, T_BIG, D), "value": rnd(B, H, T_BIG, D),
        "keep": (torch.rand(B, H, T_BIG, generator=g) < 0.7).cuda(),
        "key1": rnd(B, H, 1, D), "value1": rnd(B, H, 1, D),
        "prune": (torch.rand(B, H, C, generator=g) < 0.6).cuda(),
        "query": rnd(B, H * GROUP, D),
    }


def _step(t):
    """The captured work: append (three launches), append one row (one launch), prune (many chunks), attend
    (several splits per head: few (batch, head) blocks and a long cache)."""
    attngate_ext.append_kv_(t["kc"], t["vc"], t["lengths"], t["key"], t["value"], t["keep"])
    attngate_ext.append_kv_(t["kc"], t["vc"], t["lengths"], t["key1"], t["value1"], None)
    attngate_ext.compact_kv_(t["kc"], t["vc"], t["lengths"], t["prune"])
    return attngate_ext.decode_attention(t["query"], t["kc"], t["vc"], t["lengths"], D**-0.5)


def _eager(values):
    t = {k: v.clone() for k, v in values.items()}
    out = _step(t)
    torch.cuda.synchronize()
    return t, out


def test_capture_replay_restore_replay():
    static = _inputs(0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as graph capture requires
        _step({k: v.clone() for k, v in static.items()})
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _step(static)

    for seed in (0, 1, 0, 2):  # the same inputs again, new inputs, the first ones once more
        values = _inputs(seed)
        for name, v in values.items():
            static[name].copy_(v)  # restore (or change) every input, the mutated caches and lengths included
        graph.replay()
        torch.cuda.synchronize()
        expected, expected_out = _eager(values)
        assert_same_live_rows((static["kc"], static["vc"], static["lengths"]),
                              (expected["kc"], expected["vc"], expected["lengths"]))
        assert torch.equal(out, expected_out), f"decode output differs from eager after replay (inputs {seed})"


def test_replayed_failure_writes_nothing():
    """A capacity overflow inside the graph cannot raise (no host read-back during capture or replay): the op
    must leave the cache and lengths untouched instead, on every replay."""
    static = _inputs(0)
    static["lengths"].fill_(C - 1)  # the long append overflows every head
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), attngate_ext.sync_checks(False):
        attngate_ext.append_kv_(static["kc"].clone(), static["vc"].clone(), static["lengths"].clone(), static["key"],
                                static["value"], None)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attngate_ext.append_kv_(static["kc"], static["vc"], static["lengths"], static["key"], static["value"], None)
    before = [static[k].clone() for k in ("kc", "vc", "lengths")]
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        for name, old in zip(("kc", "vc", "lengths"), before):
            assert torch.equal(static[name], old), name
