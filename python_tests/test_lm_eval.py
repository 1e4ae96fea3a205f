"""lm-evaluation-harness on a gated model (attngate_ext.evaluation.lm_eval): two tiny local tasks (multiple choice,
scored by log-likelihood, and generate_until) on a tiny random Llama with the character tokenizer, offline.

Dense through the wrapper must give what the harness's plain ``HFLM`` gives on the ungated model; a policy that
evicts must change the log-likelihoods and the generations' cache, and report the eviction its caches measured."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install .[eval])")

from lm_eval.models.huggingface import HFLM  # noqa: E402

import attngate_ext as ag  # noqa: E402
from attngate_ext.evaluation.lm_eval import evaluate_tasks, gated_lm, main  # noqa: E402

from helpers.models import make_model, make_tokenizer, random_ids, save_tiny_model  # noqa: E402

DOCS = 5
LAYERS, KV_HEADS = 2, 4  # the tiny Llama of helpers.models

UTILS = '''
import json
from pathlib import Path

import datasets


def load_docs(**kwargs):
    rows = [json.loads(line) for line in (Path(__file__).parent / "docs.jsonl").read_text().splitlines()]
    return {"test": datasets.Dataset.from_list(rows)}
'''

COMMON = """dataset_path: ""
custom_dataset: !function tiny_utils.load_docs
test_split: test
doc_to_text: "{{context}}"
"""

MC_TASK = COMMON + """task: tiny_mc
output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_TASK = COMMON + """task: tiny_gen
output_type: generate_until
doc_to_target: "{{choices[label]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The two task YAMLs and their documents: contexts of ~150-250 characters (= tokens), three choices each."""
    folder = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    words = ["river", "stone", "blue", "quiet", "lamp", "north", "seven", "paper", "green", "cloud"]
    with open(folder / "docs.jsonl", "w") as f:
        for i in range(DOCS):
            context = " ".join(rng.choice(words) for _ in range(30 + 8 * i)) + f". Item {i}: the answer is"
            f.write(json.dumps({"context": context, "choices": [" red", " stone", " seven"], "label": i % 3}) + "\n")
    (folder / "tiny_utils.py").write_text(UTILS)
    (folder / "tiny_mc.yaml").write_text(MC_TASK)
    (folder / "tiny_gen.yaml").write_text(GEN_TASK)
    return folder


def _run(lm, task_dir):
    return evaluate_tasks(lm, ["tiny_mc", "tiny_gen"], include_path=str(task_dir), include_defaults=False,
                          log_samples=True)


def _loglikelihoods(out):
    return torch.tensor([ll for doc in out["raw"]["tiny_mc"]["samples"]["tiny_mc"]
                         for ll, _ in doc["filtered_resps"]], dtype=torch.float64)


def _generations(out):
    return [doc["filtered_resps"][0] for doc in out["raw"]["tiny_gen"]["samples"]["tiny_gen"]]


@pytest.fixture(scope="module")
def plain(task_dir):
    """The harness's own HFLM on the ungated model: the reference."""
    return _run(HFLM(pretrained=make_model("llama"), tokenizer=make_tokenizer(), batch_size=1), task_dir)


@pytest.fixture(scope="module")
def dense(task_dir):
    return _run(gated_lm(make_model("llama"), make_tokenizer(), "dense"), task_dir)


def test_dense_through_the_wrapper_is_the_plain_model(plain, dense):
    assert set(dense["results"]) == {"tiny_mc", "tiny_gen"}
    assert 0.0 <= dense["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in dense["results"]["tiny_gen"]
    assert _loglikelihoods(dense).numel() == 3 * DOCS
    torch.testing.assert_close(_loglikelihoods(dense), _loglikelihoods(plain), rtol=0, atol=2e-4)
    assert _generations(dense) == _generations(plain)
    assert all(len(text) > 0 for text in _generations(dense))
    # Every request went through an AttnGateCache that kept every token.
    mc, gen = dense["eviction"]["tiny_mc"]["loglikelihood"], dense["eviction"]["tiny_gen"]["generate_until"]
    assert mc["calls"] == 3 * DOCS and gen["calls"] == DOCS  # a forward per choice (several tokens each)
    assert mc["eviction_ratio"] == 0.0 and gen["eviction_ratio"] == 0.0
    assert dense["eviction"]["tiny_mc"]["policy"]["policy"] == "dense"


def test_h2o_evicts_in_forwards_and_in_generation(task_dir, dense):
    out = _run(gated_lm(make_model("llama"), make_tokenizer(), "h2o", ratio=0.5), task_dir)
    mc, gen = out["eviction"]["tiny_mc"]["loglikelihood"], out["eviction"]["tiny_gen"]["generate_until"]
    assert mc["eviction_ratio"] == pytest.approx(0.5, abs=0.02)
    assert gen["eviction_ratio"] == pytest.approx(0.5, abs=0.02)  # pruned while generating too
    for tally in (mc, gen):
        assert tally["held_bytes"] < 0.65 * tally["dense_valid_bytes"]
    dense_tally = dense["eviction"]["tiny_gen"]["generate_until"]
    assert gen["held_bytes"] < 0.65 * dense_tally["held_bytes"]  # the same prompts held in fewer bytes
    assert (_loglikelihoods(out) - _loglikelihoods(dense)).abs().max() > 1e-3


def test_gates_from_a_directory_at_a_calibrated_ratio(task_dir, dense, tmp_path):
    lm = gated_lm(make_model("llama"), make_tokenizer(), "gate", gates=_random_gates(tmp_path / "gates"), ratio=0.5,
                  calibration_ids=random_ids(2, 256, seed=4))
    out = _run(lm, task_dir)
    settings = out["eviction"]["tiny_mc"]["policy"]
    assert settings["calibrated_eviction"] == pytest.approx(0.5, abs=0.05)
    assert settings["gate_config"]["protect_recent"] == 8
    mc = out["eviction"]["tiny_mc"]["loglikelihood"]
    assert 0.2 < mc["eviction_ratio"] < 0.8  # other text than the calibration's: near the ratio, not at it
    assert out["eviction"]["tiny_gen"]["generate_until"]["eviction_ratio"] > 0.2
    assert (_loglikelihoods(out) - _loglikelihoods(dense)).abs().max() > 1e-3


def _random_gates(path) -> str:
    source = make_model("llama")
    ag.add_attention_gates(source, ag.AttentionGateConfig(sink_tokens=2, protect_recent=8))
    ag.randomize_gates(source, seed=1)
    ag.save_gates(source, str(path))
    return str(path)


def test_h2o_under_a_hard_budget_alone(task_dir, dense):
    """max_tokens_per_head with no ratio: H2O fills the budget in every (call, layer, KV head), prompts being longer
    (~150-250 tokens), in log-likelihood forwards and while generating. H2O's window is one slot, the current token,
    which the cache reserves: it holds N - 1 earlier rows."""
    out = _run(gated_lm(make_model("llama"), make_tokenizer(), "h2o", max_tokens_per_head=48), task_dir)
    mc, gen = out["eviction"]["tiny_mc"]["loglikelihood"], out["eviction"]["tiny_gen"]["generate_until"]
    for tally in (mc, gen):
        heads = LAYERS * KV_HEADS * tally["calls"]
        assert 47 * heads <= tally["kept_rows"] <= 48 * heads
    assert out["eviction"]["tiny_mc"]["policy"]["max_tokens_per_head"] == 48
    assert (_loglikelihoods(out) - _loglikelihoods(dense)).abs().max() > 1e-3


def test_gates_under_a_hard_budget_read_in_chunks(task_dir, tmp_path):
    """The gates with a hard budget of 40 tokens and 16-token prompt chunks hold at most 40 rows per head, fewer than
    the same gates without the budget, and their log-likelihoods change."""
    path = _random_gates(tmp_path / "gates")
    free = _run(gated_lm(make_model("llama"), make_tokenizer(), "gate", gates=path, prefill_chunk=16), task_dir)
    capped = _run(gated_lm(make_model("llama"), make_tokenizer(), "gate", gates=path, prefill_chunk=16,
                           max_tokens_per_head=40), task_dir)
    for task, kind in (("tiny_mc", "loglikelihood"), ("tiny_gen", "generate_until")):
        tally, unbounded = capped["eviction"][task][kind], free["eviction"][task][kind]
        assert tally["kept_rows"] <= 40 * LAYERS * KV_HEADS * tally["calls"]
        assert unbounded["kept_rows"] > 40 * LAYERS * KV_HEADS * unbounded["calls"]  # the budget binds
    assert (_loglikelihoods(capped) - _loglikelihoods(free)).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs,message", [
    (dict(policy="gate", budget=64), "not a budget"),
    (dict(policy="h2o"), "exactly one of ratio and budget"),
    (dict(policy="dense", ratio=0.5), "evicts nothing"),
    (dict(policy="snapkv", ratio=1.0), "ratio must lie"),
    (dict(policy="dense", max_tokens_per_head=64), "evicts nothing"),
    (dict(policy="window", max_tokens_per_head=64), "give it budget=N"),
    (dict(policy="h2o", max_tokens_per_head=0), "max_tokens_per_head must be an integer >= 1"),
    (dict(policy="h2o", ratio=0.5, prefill_chunk=16), "prefill_chunk applies to the trained gates only"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gated_lm(make_model("llama"), make_tokenizer(), **kwargs)


def test_command_line_with_a_budget(task_dir, tmp_path, capsys):
    save_tiny_model(tmp_path / "model")
    out_file = tmp_path / "out.json"
    assert main(["--model", str(tmp_path / "model"), "--tasks", "tiny_mc", "--include-path", str(task_dir),
                 "--no-default-tasks", "--policy", "window", "--budget", "32", "--limit", "3", "--device", "cpu",
                 "--out", str(out_file)]) == 0
    saved = json.loads(out_file.read_text())
    tally = saved["eviction"]["tiny_mc"]["loglikelihood"]
    assert tally["calls"] == 3 * 3 and saved["limit"] == 3  # 3 documents x 3 choices
    assert tally["kept_rows"] == 32 * 2 * 4 * 9  # the budget in every (call, layer, KV head): inputs are longer
    assert tally["eviction_ratio"] > 0.8
    assert "acc,none" in saved["results"]["tiny_mc"]
    assert "tiny_mc" in capsys.readouterr().out


def test_command_line_with_a_hard_budget(task_dir, tmp_path):
    save_tiny_model(tmp_path / "model")
    out_file = tmp_path / "out.json"
    assert main(["--model", str(tmp_path / "model"), "--tasks", "tiny_mc", "--include-path", str(task_dir),
                 "--no-default-tasks", "--policy", "snapkv", "--max-tokens-per-head", "40", "--limit", "2",
                 "--device", "cpu", "--out", str(out_file)]) == 0
    eviction = json.loads(out_file.read_text())["eviction"]["tiny_mc"]
    assert eviction["policy"]["max_tokens_per_head"] == 40
    heads = LAYERS * KV_HEADS * 2 * 3  # 2 documents x 3 choices
    assert 39 * heads <= eviction["loglikelihood"]["kept_rows"] <= 40 * heads


def test_gates_window_larger_than_the_hard_budget_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"max_tokens_per_head \(6\) must be at least .* window \(8\)"):
        gated_lm(make_model("llama"), make_tokenizer(), "gate", gates=_random_gates(tmp_path / "gates"),
                 max_tokens_per_head=6)
