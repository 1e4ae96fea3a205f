"""The public names of ``attngate_ext``: listed once, each resolving to what its module defines, the references
importable as modules, and the ops usable without transformers being imported."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import attngate_ext as ag


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)


def test_every_public_name_is_listed_once_and_resolves_to_its_module():
    assert len(ag.__all__) == len(set(ag.__all__))
    for name in ag.__all__:
        module = importlib.import_module(f"attngate_ext.{ag._PUBLIC[name]}")
        assert getattr(ag, name) is getattr(module, name), name
    assert set(ag.__all__) <= set(dir(ag))


def test_the_helpers_users_are_told_about_are_exported():
    from attngate_ext.models.calibration import calibrate_gate_threshold
    from attngate_ext.models.model import update_gate_config
    from attngate_ext.training.losses import distillation_loss, eviction_loss

    assert ag.update_gate_config is update_gate_config
    assert ag.calibrate_gate_threshold is calibrate_gate_threshold
    assert ag.distillation_loss is distillation_loss and ag.eviction_loss is eviction_loss


def test_the_references_import_as_modules():
    done = _run("""
        import attngate_ext.reference as reference
        import attngate_ext.paged_reference as paged_reference
        import attngate_ext
        assert reference is attngate_ext.ops.reference is attngate_ext.reference
        assert paged_reference is attngate_ext.ops.paged_reference is attngate_ext.paged_reference
        from attngate_ext.reference import decode_attention
        from attngate_ext.paged_reference import paged_remove_rows_
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_ops_do_not_import_transformers():
    done = _run("""
        import sys
        import torch, attngate_ext
        attngate_ext.gate_flags(torch.randn(1, 3, 4), torch.randn(2, 4))
        attngate_ext.AttentionGateConfig()
        print("transformers" in sys.modules)
    """)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
