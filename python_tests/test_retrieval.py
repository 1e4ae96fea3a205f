"""The synthetic retrieval task: examples of exact lengths with the needle at its depth, exact-match scoring, and
python -m attngate_ext.evaluate --retrieval-text at equal held bytes on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from attngate_ext.evaluate import main as evaluate_main
from attngate_ext.evaluation.retrieval import exact_match, make_examples, retrieval_table, score

from helpers.gated import save_tiny_gated_model
from helpers.models import make_tokenizer

TEXT = "".join(f"Row {i}: a line of filler text number {i * 37 % 101}.\n" for i in range(400))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_examples_have_exact_lengths_needles_at_depth_and_answers_last(tok):
    filler = tok(TEXT, add_special_tokens=False)["input_ids"]
    examples = make_examples(tok, filler, [300, 500], [0.0, 0.5, 1.0], per_cell=2, kinds=["passkey", "fact"], seed=3)
    assert len(examples) == 2 * 3 * 2 * 2
    assert examples == make_examples(tok, filler, [300, 500], [0.0, 0.5, 1.0], 2, ["passkey", "fact"], seed=3)
    assert examples != make_examples(tok, filler, [300, 500], [0.0, 0.5, 1.0], 2, ["passkey", "fact"], seed=4)
    text_of = lambda ids: "".join(tok.convert_ids_to_tokens(ids))  # noqa: E731  (characters, no separators)
    for ex in examples:
        text = text_of(ex.input_ids)
        assert ex.length in (300, 500)
        assert text_of(ex.input_ids[ex.context_len:]) == " " + ex.answer  # the answer closes the example
        needle = "pass key is" if ex.kind == "passkey" else "magic number for"
        assert text.count(needle) == (2 if ex.kind == "passkey" else 3)  # needle and question (twice in "fact")
        assert text.count(ex.answer) == (3 if ex.kind == "passkey" else 2)  # in the needle, and the answer
        assert abs(ex.needle_at - ex.depth * ex.filler_len) <= 48  # near its depth (snapped to a line start)
        before = text_of(ex.input_ids[: ex.needle_at])
        assert before == "" or before.endswith("\n")
    with pytest.raises(ValueError, match="filler tokens"):
        make_examples(tok, filler[:100], [300], [0.5])
    with pytest.raises(ValueError, match="unknown retrieval kinds"):
        make_examples(tok, filler, [300], [0.5], kinds=["nope"])


def test_exact_match_and_score_with_a_model_that_knows_or_guesses(tok):
    logits = torch.zeros(2, 3, 10)
    targets = torch.tensor([[1, 2, 3], [1, 2, 3]])
    logits[0, torch.arange(3), targets[0]] = 1.0
    logits[1, torch.arange(3), torch.tensor([1, 2, 4])] = 1.0
    assert exact_match(logits, targets).tolist() == [True, False]

    filler = tok(TEXT, add_special_tokens=False)["input_ids"]
    examples = make_examples(tok, filler, [200, 260], [0.25, 0.75], per_cell=2, seed=1)

    def oracle(ids, context):  # one-hot logits of the true continuation, except for deep needles in long examples
        out = torch.nn.functional.one_hot(ids[:, context:], 100).float()
        if ids.shape[1] == 260:
            out[..., :] = out.roll(1, dims=-1)
        return out, {"eviction_ratio": 0.5, "kv_bytes": 1, "dense_bytes": 2}

    result = score(oracle, examples, batch_size=3)
    assert result["accuracy"] == 0.5 and result["by_length"] == {"200": 1.0, "260": 0.0}
    assert result["by_depth"] == {"0.25": 0.5, "0.75": 0.5} and result["held_share"] == 0.5
    assert result["correct"] == [ex.length == 200 for ex in examples]


@pytest.fixture
def setup(tmp_path):
    save_tiny_gated_model(tmp_path, "llama", protect_recent=8, sink_tokens=2)
    (tmp_path / "filler.txt").write_text(TEXT)
    (tmp_path / "calibration.txt").write_text(TEXT[::-1])
    return tmp_path


def _run(root, out, *extra):
    evaluate_main(["--model", str(root / "model"), "--gates", str(root / "gates"), "--retrieval-text",
                   str(root / "filler.txt"), "--calibration-text", str(root / "calibration.txt"),
                   "--retrieval-lengths", "160", "224", "--retrieval-depths", "0.2", "0.8", "--retrieval-per-cell",
                   "1", "--retrieval-kinds", "passkey", "fact", "--budgets", "0.6", "--policies", "gate",
                   "streaming_llm", "h2o", "--ratios",
                   "--calibration-windows", "1", "--page-size", "4", "--no-progress", "--out", str(out), *extra])
    return json.loads(out.read_text())


def test_evaluate_retrieval_at_equal_bytes(setup, tmp_path):
    first = _run(setup, tmp_path / "a.json")
    assert first == _run(setup, tmp_path / "b.json")
    records = {r["policy"]: r for r in first["retrieval"]}
    assert set(records) == {"dense", "gate", "streaming_llm", "h2o"} and first["results"] == []
    for policy, r in records.items():
        assert r["examples"] == 2 * 2 * 2 and 0.0 <= r["accuracy"] <= 1.0
        assert set(r["by_length"]) == {"160", "224"} and set(r["by_depth"]) == {"0.2", "0.8"}
        if policy == "dense":
            assert r["held_share"] == 1.0
        else:  # held at the end of the example (the answer included), set for the budget per length
            assert r["target_share"] == 0.6 and abs(r["held_share"] - 0.6) < 0.12
            assert set(r["ratio_by_length"]) == {"160", "224"}
    table = retrieval_table(first["retrieval"])
    assert "| h2o |" in table and "0.60 of dense bytes" in table
