"""examples/real_assets.py pip-installs what it needs only into a virtual environment's interpreter (or when allowed)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_real_assets():
    spec = importlib.util.spec_from_file_location("real_assets", ROOT / "examples" / "real_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def real_assets(monkeypatch):
    module = _load_real_assets()
    calls = []
    monkeypatch.setattr(module.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    module.pip_calls = calls
    return module


def test_refuses_to_install_outside_a_virtual_environment(real_assets, monkeypatch):
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)  # as if this were the system interpreter
    monkeypatch.delenv("ATTNGATE_ALLOW_PIP", raising=False)
    with pytest.raises(SystemExit, match=r"would pip-install gguf into .* not a virtual environment's interpreter"):
        real_assets._pip_install(["gguf"])
    assert real_assets.pip_calls == []


def test_installs_into_a_virtual_environment_or_when_allowed(real_assets, monkeypatch):
    monkeypatch.setattr(sys, "base_prefix", "/some/base/python")
    real_assets._pip_install(["gguf"])
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)
    monkeypatch.setenv("ATTNGATE_ALLOW_PIP", "1")
    real_assets._pip_install(["accelerate"])
    assert real_assets.pip_calls == [[sys.executable, "-m", "pip", "install", "-q", "gguf"],
                                     [sys.executable, "-m", "pip", "install", "-q", "accelerate"]]
