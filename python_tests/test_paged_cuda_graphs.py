"""The paged ops and a whole gated decode step captured once in a CUDA graph and replayed, with the inputs restored
or changed in between: every replay must equal an eager run on the same inputs. A scratch word that is not reset per
replay (a status, a counter) would make a later replay differ; a host read-back would break the capture."""

from __future__ import annotations

import copy
from typing import List

import pytest
import torch

import attngate_ext as ag
from attngate_ext.models.calibration import calibrate_gate_bias, randomize_gates
from attngate_ext import cache_kwarg

from helpers.devices import CUDA_SKIP_REASON
from helpers.models import make_model, random_ids
from helpers.paged_pipeline import STATE, assert_same_results, pipeline, pipeline_inputs

pytestmark = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))


def _capture(fn):
    """Warms ``fn`` up on a side stream (as capture requires), then captures it; returns (graph, its outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(warm_up=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn(warm_up=False)
    return graph, outs


@pytest.mark.parametrize("chunk", [5, 300])  # one-launch and three-launch appends
def test_paged_ops_capture_replay_restore_replay(chunk):
    static = pipeline_inputs("cuda", 0, chunk)

    def run(warm_up: bool):
        t = {k: v.clone() for k, v in static.items()} if warm_up else static
        with ag.sync_checks(False):
            return pipeline(torch.ops.attngate, t)

    graph, outs = _capture(run)
    for seed in (0, 1, 0):  # the same inputs, new ones, the first ones again
        values = pipeline_inputs("cuda", seed, chunk)
        for name, v in values.items():
            static[name].copy_(v)  # restore (or change) every input, the mutated state included
        graph.replay()
        torch.cuda.synchronize()
        eager = {k: v.clone() for k, v in values.items()}
        eager_outs = pipeline(torch.ops.attngate, eager)
        assert_same_results(static, outs, eager, eager_outs)


def test_replayed_failing_decode_step_writes_nothing():
    """Out of pages inside the graph cannot raise (no read-back in a capture): every replay leaves the state as
    it was, the ring included."""
    static = pipeline_inputs("cuda", 0)
    static["free_count"].zero_()
    static["ring_keep"].copy_(static["ring_valid"])  # every row leaving the ring is kept: it needs a page

    def run(warm_up: bool):
        t = {k: v.clone() for k, v in static.items()} if warm_up else static
        s = [t[n] for n in STATE]
        with ag.sync_checks(False):
            return torch.ops.attngate.paged_decode_step_(t["query"], *s, t["new_key"], t["new_value"], t["new_keep"],
                                                         None, t["ring_key"], t["ring_value"], t["ring_valid"], 1,
                                                         0.5, t["ring_keep"])

    # The state has a head whose leaving row is kept and whose last page is full: the step needs a page.
    assert bool((static["ring_keep"][:, :, 1] & (static["lengths"] % 4 == 0)).any())
    graph, _ = _capture(run)
    before = {k: v.clone() for k, v in static.items()}
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        for name, old in before.items():
            assert torch.equal(static[name], old), f"{name} was written by a failing replay"


# ---- a whole gated decode step of a tiny model ----------------------------------------------------------------


def _cache_tensors(cache: ag.AttnGateCache) -> List[torch.Tensor]:
    """Every tensor a gated cache holds, in a fixed order (the pages, tables, free stacks, rings, counters)."""
    out: List[torch.Tensor] = []
    for layer in cache.layers:
        gate_stores = (layer.gate_kv.pages, layer.gate_kv.ring) if layer.gate_kv is not None else ()
        for store in (layer.kv, layer.window, *gate_stores):
            if store is not None:
                out += [v for _, v in sorted(vars(store).items()) if isinstance(v, torch.Tensor)]
        out.append(layer.valid_count)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 4])
@torch.no_grad()
def test_gated_decode_step_capture_replay_restore_replay(dtype, window):
    """One decode step of a gated model (gate projections and scoring, the gate's and the model's fused decode
    steps on the paged caches, every layer) with sync checks off, captured after a prompt; replayed, restored,
    replayed again: logits and the whole cache equal an eager step from the same state every time."""
    model = make_model("llama")
    ag.add_attention_gates(model, ag.AttentionGateConfig(protect_recent=window))
    randomize_gates(model, seed=1)
    calibrate_gate_bias(model, random_ids(2, 48, seed=7), 0.5)
    model = model.to("cuda", dtype)
    key = cache_kwarg(model)
    cache = ag.AttnGateCache()
    prompt = random_ids(2, 40, seed=3).cuda()
    model(prompt, use_cache=True, **{key: cache})
    token = random_ids(2, 1, seed=4).cuda()
    model(token, use_cache=True, **{key: cache})  # one eager step first: every lazy allocation is made
    assert cache.memory_report().eviction_ratio > 0.2  # the gates really evict
    snapshot = copy.deepcopy(cache)

    def run(warm_up: bool):
        target = copy.deepcopy(snapshot) if warm_up else cache
        return model(token, use_cache=True, **{key: target}).logits

    graph, logits = _capture(run)
    state = _cache_tensors(cache)
    assert [t.shape for t in state] == [t.shape for t in _cache_tensors(snapshot)], "the capture reallocated"
    for _ in range(2):
        for t, saved in zip(state, _cache_tensors(snapshot)):
            t.copy_(saved)  # restore the state before the step
        graph.replay()
        torch.cuda.synchronize()
        eager_cache = copy.deepcopy(snapshot)
        eager_logits = model(token, use_cache=True, **{key: eager_cache}).logits
        # The same kernels on the same inputs; only a library matmul could pick another algorithm in a graph.
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(logits, eager_logits, rtol=tol, atol=tol)
        for got, want in zip(state, _cache_tensors(eager_cache)):
            if got.is_floating_point():
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            else:
                assert torch.equal(got, want)
