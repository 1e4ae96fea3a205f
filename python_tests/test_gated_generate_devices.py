"""The gated model on every device and in the dtypes it runs in (float32, bfloat16): incremental decoding through an
AttnGateCache equals one full forward under the rule, and on CUDA, generate() picks the greedy tokens the CPU picks.
A tiny Llama whose random gates evict about half of the tokens."""

from __future__ import annotations

import copy

import pytest
import torch

import attngate_ext as ag
from attngate_ext.models.calibration import calibrate_gate_bias, randomize_gates
from attngate_ext import cache_kwarg

from helpers.devices import CUDA_SKIP_REASON
from helpers.models import make_model, random_ids

PROMPT, STEPS = 40, 24
# bfloat16 keeps 8 bits of mantissa: the two ways of computing the same logits (chunk by chunk, or at once) differ
# by a few of its rounding steps of the logits' size.
TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2}


def _gated_llama(dtype: torch.dtype, window: int = 2) -> torch.nn.Module:
    model = make_model("llama")
    ag.add_attention_gates(model, ag.AttentionGateConfig(protect_recent=window, sink_tokens=1))
    randomize_gates(model, seed=2)
    calibrate_gate_bias(model, random_ids(2, 48, seed=7), 0.5)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_incremental_decode_equals_the_full_forward(device, dtype):
    model = _gated_llama(dtype).to(device)
    ids = random_ids(2, PROMPT + STEPS, seed=3).to(device)
    full = model(ids, use_cache=False).logits.float()
    cache = ag.AttnGateCache()
    key = cache_kwarg(model)
    logits = [model(ids[:, :PROMPT], use_cache=True, **{key: cache}).logits]
    for t in range(PROMPT, ids.shape[1]):
        logits.append(model(ids[:, t : t + 1], use_cache=True, **{key: cache}).logits)
    step = torch.cat(logits, dim=1).float()
    scale = full.abs().max()
    torch.testing.assert_close(step / scale, full / scale, rtol=0, atol=TOL[dtype])
    assert cache.memory_report().eviction_ratio > 0.3  # the gates really evict


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_cuda_generate_picks_the_cpu_greedy_tokens(dtype):
    """Equal tokens; in bfloat16 a first difference is allowed only where the CPU's two best logits are within the
    dtype's rounding of each other (then both devices are right), and never in float32."""
    cpu = _gated_llama(dtype)
    gpu = copy.deepcopy(cpu).cuda()
    ids = random_ids(2, PROMPT, seed=5)
    kwargs = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    want = cpu.generate(ids, **kwargs)
    got = gpu.generate(ids.cuda(), **kwargs)
    want_tokens, got_tokens = want.sequences[:, PROMPT:], got.sequences[:, PROMPT:].cpu()
    if dtype == torch.float32:
        assert torch.equal(got_tokens, want_tokens)
        return
    for row in range(ids.shape[0]):
        differs = (got_tokens[row] != want_tokens[row]).nonzero()
        if differs.numel() == 0:
            continue
        first = int(differs[0])
        top2 = want.logits[first][row].float().topk(2).values
        margin = float(top2[0] - top2[1])
        assert margin <= 2 * TOL[dtype] * float(top2[0].abs()), (
            f"row {row}: CUDA chose another token at step {first} although the CPU's margin was {margin:.4f}")
