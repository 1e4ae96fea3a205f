"""gate_flags against reference.gate_flags: fused projection, sigmoid, threshold, sinks and padding."""

from __future__ import annotations

import pytest
import torch

import attngate_ext

from helpers.checks import check_gate_flags
from helpers.tensors import DTYPES, randn_strided


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,G,H", [(1, 1, 16, 1), (2, 37, 64, 3), (3, 129, 72, 8), (1, 300, 256, 4), (2, 5, 7, 2)])
def test_matches_reference(device, dtype, B, T, G, H):
    g = torch.Generator().manual_seed(B * 1000 + T + G + H)
    gate_out = randn_strided((B, T, G), dtype, device, generator=g)
    weight = (randn_strided((H, G), dtype, device, generator=g) / G**0.5).to(dtype)
    bias = randn_strided((H,), dtype, device, generator=g)
    valid = (torch.rand(B, T, generator=g) > 0.2).to(device)
    check_gate_flags(gate_out, weight, bias, 0.5, 3, 0, valid)
    check_gate_flags(gate_out, weight, None, 0.3, 0, 0, None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(device, dtype):
    g = torch.Generator().manual_seed(7)
    gate_out = randn_strided((2, 50, 64), dtype, device, layout="padded", generator=g)
    weight = randn_strided((3, 64), dtype, device, layout="padded", generator=g).mul_(0.1)
    bias = randn_strided((6,), dtype, device, generator=g)[::2]
    valid = (torch.rand(50, 2, generator=g) > 0.3).to(device).t()
    assert not gate_out.is_contiguous() and not weight.is_contiguous() and not valid.is_contiguous()
    check_gate_flags(gate_out, weight, bias, 0.5, 2, 1, valid)


def test_sinks_position_offset_and_padding(device):
    B, T, G, H = 2, 10, 16, 2
    gate_out = torch.zeros(B, T, G, device=device)
    weight = torch.zeros(H, G, device=device)
    bias = torch.full((H,), -10.0, device=device)  # every probability ~ 4.5e-5: nothing kept on its own
    valid = torch.ones(B, T, dtype=torch.bool, device=device)
    valid[1, :2] = False  # left padding of row 1
    _, keep = attngate_ext.gate_flags(gate_out, weight, bias, 0.5, 4, 1, valid)
    expected = torch.zeros(B, H, T, dtype=torch.bool)
    expected[:, :, :3] = True  # positions 1, 2, 3 < 4 sinks
    expected[1, :, :2] = False  # padding wins over sinks
    assert torch.equal(keep.cpu(), expected)


@pytest.mark.parametrize("bias_value,expect_all", [(10.0, True), (-10.0, False)])
def test_everything_or_nothing_kept(device, bias_value, expect_all):
    gate_out = torch.randn(2, 33, 32, device=device) * 0.01
    weight = torch.randn(4, 32, device=device) * 0.01
    bias = torch.full((4,), bias_value, device=device)
    _, keep = check_gate_flags(gate_out, weight, bias, 0.5, 0, 0, None)
    assert bool(keep.all()) if expect_all else not bool(keep.any())


def test_empty_sequence(device):
    probs, keep = attngate_ext.gate_flags(torch.randn(2, 0, 8, device=device), torch.randn(3, 8, device=device))
    assert probs.shape == (2, 3, 0) and keep.shape == (2, 3, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    gate_out = torch.randn(2, 9, 24, device=device, dtype=dtype)
    weight = torch.randn(3, 24, device=device, dtype=dtype)
    bias = torch.randn(3, device=device, dtype=dtype)
    valid = torch.rand(2, 9, device=device) > 0.5
    torch.library.opcheck(torch.ops.attngate.gate_flags.default, (gate_out, weight, bias, 0.5, 1, 0, valid))
    torch.library.opcheck(torch.ops.attngate.gate_flags.default, (gate_out, weight, None, 0.7, 0, 3, None))
