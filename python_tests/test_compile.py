"""torch.compile traces every op (fullgraph); on CUDA, the ops also run inside a captured CUDA graph."""

from __future__ import annotations

import contextlib

import pytest
import torch

import attngate_ext
from attngate_ext import reference

from helpers.devices import CUDA_SKIP_REASON


def _pipeline(gate_out, weight, bias, key_cache, value_cache, lengths, key, value, query):
    """One gated step: score, append the kept rows, prune the cache again, attend."""
    probs, keep = torch.ops.attngate.gate_flags(gate_out, weight, bias, 0.5, 1, 0, None)
    torch.ops.attngate.append_kv_(key_cache, value_cache, lengths, key, value, keep)
    prune = torch.ones(key_cache.shape[:3], dtype=torch.bool, device=key_cache.device)
    prune[:, :, 1::3] = False
    torch.ops.attngate.compact_kv_(key_cache, value_cache, lengths, prune)
    out = torch.ops.attngate.decode_attention(query, key_cache, value_cache, lengths, 0.125)
    return probs, out


def _inputs(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, C, T, D, G = 2, 2, 32, 12, 64, 16

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    return [rnd(B, T, G), rnd(H, G), rnd(H), rnd(B, H, C, D), rnd(B, H, C, D),
            torch.tensor([[0, 3], [5, 1]], dtype=torch.int32, device=device), rnd(B, H, T, D), rnd(B, H, T, D),
            rnd(B, 4 * H, D)]


def _reference_pipeline(gate_out, weight, bias, key_cache, value_cache, lengths, key, value, query):
    probs, keep = reference.gate_flags(gate_out, weight, bias, 0.5, 1, 0, None)
    reference.append_kv_(key_cache, value_cache, lengths, key, value, keep)
    prune = torch.ones(key_cache.shape[:3], dtype=torch.bool, device=key_cache.device)
    prune[:, :, 1::3] = False
    reference.compact_kv_(key_cache, value_cache, lengths, prune)
    return probs, reference.decode_attention(query, key_cache, value_cache, lengths, 0.125)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    compiled = torch.compile(_pipeline, fullgraph=True)
    got_inputs, ref_inputs = _inputs(device), _inputs(device)
    probs, out = compiled(*got_inputs)
    ref_probs, ref_out = _reference_pipeline(*ref_inputs)
    torch.testing.assert_close(probs, ref_probs)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert torch.equal(got_inputs[5], ref_inputs[5])  # lengths mutated in place through the compiled graph


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
def test_cuda_graph_reduce_overhead(monkeypatch):
    """mode="reduce-overhead" really captures the ops in a CUDA graph tree and replays it with new input values.

    The caches and lengths are mutated in place, which cudagraph trees only accept on static inputs: the same
    tensors (marked static) are reused every call, refilled with new values. Any cudagraph skip raises
    (cudagraph_or_error), the skip counter stays 0, the tree manager holds a recorded graph node, and
    torch.cuda.CUDAGraph.replay runs at least once per call after the warm-up and recording calls.
    """
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    replays = []
    original_replay = torch.cuda.CUDAGraph.replay

    def counting_replay(graph):
        replays.append(graph)
        original_replay(graph)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counting_replay)
    torch._dynamo.reset()
    counters.clear()
    static = _inputs("cuda")
    for i in (3, 4, 5):  # the mutated inputs: key_cache, value_cache, lengths
        torch._dynamo.mark_static_address(static[i])
    compiled = torch.compile(_pipeline, mode="reduce-overhead", fullgraph=True)
    replays_before_last_calls = 0
    has_or_error = hasattr(torch._inductor.config.triton, "cudagraph_or_error")
    with torch._inductor.config.patch({"triton.cudagraph_or_error": True}) if has_or_error else contextlib.nullcontext():
        for call in range(5):  # warm-up, record, replays
            if call == 2:
                replays_before_last_calls = len(replays)
            values = _inputs("cuda", seed=call)
            values[5] = values[5] + call  # different lengths every call
            for t, v in zip(static, values):
                t.copy_(v)
            probs, out = compiled(*static)
            probs, out = probs.clone(), out.clone()  # replays reuse the graph's output memory
            ref_inputs = [v.clone() for v in values]
            ref_probs, ref_out = _reference_pipeline(*ref_inputs)
            torch.testing.assert_close(probs, ref_probs)
            torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
            assert torch.equal(static[5], ref_inputs[5]), f"lengths after call {call}"
    torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None, "no cudagraph tree was created"
    nodes = [n for roots in manager.roots.values() for n in roots]
    assert any(isinstance(n, cudagraph_trees.CUDAGraphNode) for n in nodes), "nothing was recorded"
    assert len(replays) - replays_before_last_calls >= 3, "the last three calls did not replay a CUDA graph"


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
def test_manual_cuda_graph_capture_and_replay():
    """Capture append + decode in a torch.cuda.CUDAGraph and replay: same results as eager."""
    static = _inputs("cuda")
    eager = [t.clone() for t in static]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _pipeline(*[t.clone() for t in static])  # warm-up on a side stream, as CUDA graphs require
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        probs, out = _pipeline(*static)
    graph.replay()
    torch.cuda.synchronize()
    ref_probs, ref_out = _pipeline(*eager)
    torch.testing.assert_close(out, ref_out)
    assert torch.equal(static[5], eager[5])
