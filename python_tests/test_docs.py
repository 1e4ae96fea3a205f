"""The documentation stays true: the README's quick start runs, and every module, name and file the docs mention
exists."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import torch
import transformers

import attngate_ext as ag

from helpers.models import make_model, make_tokenizer, random_ids

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def quick_start() -> str:
    """The first python block under the README's "Quick start" heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


def _shipped_gates_at_random(model, name: str, eviction: float):
    """load_pretrained_gates for a tiny model: gates of the shipped config with random weights, one threshold set
    for ``eviction`` on random tokens (the shipped weights need the real model's shape)."""
    config = ag.AttentionGateConfig.from_dict(json.loads(
        (Path(ag.pretrained_gates(name)) / "attention_gates.json").read_text())["gate_config"])
    ag.add_attention_gates(model, config)
    ag.randomize_gates(model, seed=0)
    ag.calibrate_gate_threshold(model, random_ids(1, 1024, seed=3), eviction)
    return model


def test_the_quick_start_runs_and_saves_memory(monkeypatch, capsys):
    """The README block itself, with the downloads replaced: a tiny random Llama, a character tokenizer and random
    gates of the shipped config. It must print the eviction and the bytes held, and hold less than dense."""
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        staticmethod(lambda name, **kw: make_model("llama", max_position_embeddings=4096)))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda name, **kw: make_tokenizer()))
    monkeypatch.setattr(ag, "load_pretrained_gates", _shipped_gates_at_random)
    torch.manual_seed(0)
    namespace = {"__name__": "quick_start"}
    with torch.no_grad():
        exec(compile(quick_start(), "README.md (quick start)", "exec"), namespace)
    printed = capsys.readouterr().out
    match = re.search(r"evicted (\d\.\d\d): holds ([\d.]+) MiB, dense ([\d.]+) MiB \((\d\.\d\d) of dense\)", printed)
    assert match, printed
    report = namespace["cache"].memory_report()
    assert namespace["ids"].shape == (1, 2048)  # the long prompt, so that eviction pays
    assert float(match.group(1)) == pytest.approx(report.eviction_ratio, abs=0.005) and report.eviction_ratio > 0.3
    assert float(match.group(4)) == pytest.approx(report.held_bytes / report.dense_bytes, abs=0.005)
    assert report.held_bytes < 0.85 * report.dense_bytes  # memory saved, the window and the gates' K'/V' included


def _mentioned_modules():
    """Every dotted name ``attngate_ext.x.y`` the docs mention, with the file that mentions it."""
    for path in DOCS:
        for name in sorted(set(re.findall(r"\battngate_ext(?:\.[A-Za-z_][A-Za-z0-9_]*)+", path.read_text()))):
            yield path.name, name


@pytest.mark.parametrize("doc,name", list(_mentioned_modules()))
def test_every_name_the_docs_mention_imports(doc, name):
    """The longest importable module prefix of the name, then attributes for the rest of it."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            assert hasattr(obj, attribute), f"{doc} mentions {name}, but {'.'.join(parts[:cut])} has no {attribute}"
            obj = getattr(obj, attribute)
        return
    pytest.fail(f"{doc} mentions {name}, which does not import")


# Paths of this repository (not ones inside another, such as torch/csrc/...); the outputs of runs do not count.
_PATH = re.compile(r"(?<![\w/.])((?:attngate_ext|benchmarks|csrc|docs|examples|python_tests|scripts|build_helpers|"
                   r"\.ci)/[\w./*{},-]*[\w*}])")
_OUTPUTS = ("benchmarks/results/",)


def _expand(path: str):
    """``a/{b,c}.h`` -> ``a/b.h``, ``a/c.h``."""
    brace = re.search(r"\{([^}]*)\}", path)
    if not brace:
        return [path]
    return [p for option in brace.group(1).split(",")
            for p in _expand(path[:brace.start()] + option + path[brace.end():])]


def _mentioned_paths():
    for path in DOCS:
        for mention in sorted(set(_PATH.findall(path.read_text()))):
            if not mention.startswith(_OUTPUTS):
                yield path.name, mention


@pytest.mark.parametrize("doc,mention", list(_mentioned_paths()))
def test_every_file_the_docs_mention_exists(doc, mention):
    for path in _expand(mention.rstrip(".")):
        assert list(ROOT.glob(path)) or (ROOT / path).exists(), f"{doc} mentions {path}, which does not exist"
