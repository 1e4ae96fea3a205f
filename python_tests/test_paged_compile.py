"""torch.compile traces every paged op (fullgraph) and, on CUDA, runs them inside the CUDA graph tree of
mode="reduce-overhead": append, compaction, row removal, prefill attention, the fused decode step (with ring_keep)
and decode attention, one pipeline, against the same pipeline of the pure-PyTorch references."""

from __future__ import annotations

import contextlib

import pytest
import torch

from attngate_ext.ops import paged_reference

from helpers.devices import CUDA_SKIP_REASON
from helpers.paged_pipeline import STATE, assert_same_results, pipeline, pipeline_inputs


def test_paged_ops_compile_fullgraph(device):
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: pipeline(torch.ops.attngate, t), fullgraph=True)
    got, ref = pipeline_inputs(device, 0), pipeline_inputs("cpu", 0)
    outs = compiled(got)
    ref_outs = pipeline(paged_reference, ref)
    assert_same_results(got, outs, ref, ref_outs)
    assert not torch.equal(ref["lengths"], pipeline_inputs("cpu", 0)["lengths"])  # the state really changed


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
def test_paged_ops_reduce_overhead_replays_a_cuda_graph(monkeypatch):
    """The mutated state tensors are static inputs, refilled with new values before every call; the last calls
    replay a recorded CUDA graph, and every call equals the references on the same values."""
    from torch._dynamo.utils import counters

    replays = []
    original_replay = torch.cuda.CUDAGraph.replay

    def counting_replay(graph):
        replays.append(graph)
        original_replay(graph)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counting_replay)
    torch._dynamo.reset()
    counters.clear()
    static = pipeline_inputs("cuda", 0)
    for name in STATE + ("ring_key", "ring_value", "ring_valid", "ring_keep"):
        torch._dynamo.mark_static_address(static[name])
    compiled = torch.compile(lambda t: pipeline(torch.ops.attngate, t), mode="reduce-overhead", fullgraph=True)
    has_or_error = hasattr(torch._inductor.config.triton, "cudagraph_or_error")
    patch = torch._inductor.config.patch({"triton.cudagraph_or_error": True}) if has_or_error else contextlib.nullcontext()
    before_last = 0
    with patch:
        for call in range(5):  # warm-up, record, replays
            if call == 2:
                before_last = len(replays)
            values = pipeline_inputs("cuda", call)
            for name, v in values.items():
                static[name].copy_(v)
            outs = [o.clone() for o in compiled(static)]  # replays reuse the graph's output memory
            ref = {k: v.cpu() for k, v in values.items()}
            assert_same_results(static, outs, ref, pipeline(paged_reference, ref))
    torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert len(replays) - before_last >= 3, "the last three calls did not replay a CUDA graph"
