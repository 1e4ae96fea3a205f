"""Fixtures only (the helpers the tests share are in the helpers package): ``device`` runs a test on the CPU and,
as its CUDA twin, on the GPU."""

from __future__ import annotations

import pytest

from helpers.devices import DEVICES


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
