"""torch.compile traces every op (fullgraph); on CUDA, the ops also run inside a captured CUDA graph."""

from __future__ import annotations

import pytest
import torch

import attngate_ext
from attngate_ext import reference

from conftest import CUDA_SKIP_REASON


def _pipeline(gate_out, weight, bias, key_cache, value_cache, lengths, key, value, query):
    """One gated step: score, append the kept rows, prune the cache again, attend."""
    probs, keep = torch.ops.attngate.gate_flags(gate_out, weight, bias, 0.5, 1, 0, None)
    torch.ops.attngate.append_kv_(key_cache, value_cache, lengths, key, value, keep)
    prune = torch.ones(key_cache.shape[:3], dtype=torch.bool, device=key_cache.device)
    prune[:, :, 1::3] = False
    torch.ops.attngate.compact_kv_(key_cache, value_cache, lengths, prune)
    out = torch.ops.attngate.decode_attention(query, key_cache, value_cache, lengths, 0.125)
    return probs, out


def _inputs(device):
    g = torch.Generator().manual_seed(0)
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
def test_cuda_graph_reduce_overhead():
    """mode="reduce-overhead" captures the ops in a CUDA graph: they must be capturable (no host sync)."""
    torch._dynamo.reset()
    compiled = torch.compile(_pipeline, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        got_inputs, ref_inputs = _inputs("cuda"), _inputs("cuda")
        probs, out = compiled(*got_inputs)
        ref_probs, ref_out = _reference_pipeline(*ref_inputs)
        torch.testing.assert_close(out.clone(), ref_out, rtol=1e-4, atol=1e-5)
    torch.cuda.synchronize()


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
