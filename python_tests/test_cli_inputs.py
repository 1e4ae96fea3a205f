"""The train and evaluate CLIs with bad input from a user: hyperparameters, output folders, model directories, JSON
and JSONL files (errors name the file and line), help texts; and load_gates with non-finite weights."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import attngate_ext as ag
from attngate_ext.evaluate import main as evaluate_main
from attngate_ext.evaluation import evaluate as evaluate_module
from attngate_ext.train import main as train_main
from attngate_ext.training import utils as cli_utils
from attngate_ext.training import train as train_module
from attngate_ext.training.data import sft_examples
from attngate_ext.training.utils import read_json_file, read_jsonl

from helpers.models import make_model, make_tokenizer, save_tiny_model

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40))


@pytest.fixture
def model_and_text(tmp_path):
    model_dir = tmp_path / "model"
    save_tiny_model(model_dir, "llama")
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 3)
    return model_dir, text


def _train(model_dir, text, out, *extra):
    return train_main(["--model", str(model_dir), "--text", str(text), "--out", str(out), "--seq-len", "32",
                       "--batch-size", "2", "--steps", "2", "--warmup", "1", "--no-progress", *extra])


@pytest.mark.parametrize("flag, value, rule", [
    ("--lr", "nan", "a finite number > 0"), ("--lr", "-0.1", "a finite number > 0"), ("--lr", "0", "a finite number > 0"),
    ("--lora-lr", "inf", "a finite number > 0"), ("--alpha", "nan", "a finite number >= 0"),
    ("--weight-decay", "-1", "a finite number >= 0"), ("--init-spread", "inf", "a finite number >= 0"),
    ("--warmup", "-1", ">= 0"), ("--lora-rank", "0", ">= 1"), ("--keep-checkpoints", "0", ">= 1"),
    ("--stop-after", "0", ">= 1"), ("--target-eviction", "nan", None),
])
def test_train_rejects_invalid_hyperparameters(flag, value, rule, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--model", "m", "--text", "t", "--out", str(tmp_path / "o"), flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and (rule is None or f"must be {rule}, got {value}" in err), err
    assert not (tmp_path / "o").exists()


def test_load_gates_refuses_non_finite_weights(tmp_path):
    model = ag.add_attention_gates(make_model("llama"), ag.AttentionGateConfig())
    ag.save_gates(model, str(tmp_path / "gates"))
    path = tmp_path / "gates" / "attention_gates.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, path)
    with pytest.raises(ValueError, match=rf"gate weight {name} has \d+ NaN or infinite values"):
        ag.load_gates(make_model("llama"), str(tmp_path / "gates"))


def test_resume_without_a_checkpoint_is_refused(model_and_text, tmp_path):
    model_dir, text = model_and_text
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint under .*nothing to resume"):
        _train(model_dir, text, tmp_path / "out", "--resume")


def test_a_second_run_into_a_full_out_is_refused_unless_overwrite(model_and_text, tmp_path):
    model_dir, text = model_and_text
    out = tmp_path / "out"
    _train(model_dir, text, out)
    first = (out / "report.json").read_text()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"--out .* holds the results of a run already \(checkpoints, gates, "
                                              r"report.json\): pass --resume .*--overwrite"):
        _train(model_dir, text, out)
    assert (out / "report.json").read_text() == first  # untouched
    _train(model_dir, text, out, "--overwrite", "--seed", "1")
    assert (out / "report.json").read_text() != first
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite deletes the run's outputs only
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]


def test_a_folder_without_results_is_used_as_it_is(model_and_text, tmp_path):
    model_dir, text = model_and_text
    out = tmp_path / "out"
    out.mkdir()
    (out / "gate_config.json").write_text(ag.AttentionGateConfig(protect_recent=2).to_json())
    _train(model_dir, text, out, "--gate-config", str(out / "gate_config.json"))
    assert (out / "report.json").is_file() and (out / "gate_config.json").is_file()


def test_a_failed_run_leaves_no_empty_out_behind(model_and_text, tmp_path):
    model_dir, text = model_and_text
    bad_config = tmp_path / "gate.json"
    bad_config.write_text("{\n  'protect_recent': 2\n}\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"--gate-config {bad_config}:2: not valid JSON"):
        _train(model_dir, text, out, "--gate-config", str(bad_config))
    assert not out.exists()
    kept = tmp_path / "existing"
    kept.mkdir()
    with pytest.raises(FileNotFoundError, match="--model must be a local model directory"):
        _train(tmp_path / "missing-model", text, kept)
    assert kept.is_dir()  # a folder the run did not create stays


def test_train_says_where_its_outputs_went(model_and_text, tmp_path, capsys):
    model_dir, text = model_and_text
    _train(model_dir, text, tmp_path / "out")
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("outputs: ")]
    assert line and str(tmp_path / "out" / "gates") in line[0] and str(tmp_path / "out" / "report.json") in line[0]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n\n" + '{"prompt": "a", "answer": }\n')
    with pytest.raises(ValueError, match=rf"{path}:3: not valid JSON \(Expecting value at column 27\)"):
        list(read_jsonl(str(path)))
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=rf"{path}:1: expected a JSON object"):
        list(read_jsonl(str(path)))
    with pytest.raises(ValueError, match=rf"{path}:1: expected a JSON object"):
        sft_examples(make_tokenizer(), str(path), seq_len=16)


def test_sft_answer_must_be_a_string(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n" + json.dumps({"prompt": "3+3?", "answer": 6}))
    with pytest.raises(ValueError, match=rf"{path}:2: 'answer' must be a string, got int 6"):
        sft_examples(make_tokenizer(), str(path), seq_len=16)


def test_multiple_choice_records_are_checked_with_file_and_line(tmp_path):
    path = tmp_path / "mc.jsonl"
    good = json.dumps({"context": "a", "choices": [" b", " c"], "label": 1})
    path.write_text(good + "\n" + "{not json}\n")
    with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON"):
        evaluate_module._mc_records(str(path))
    path.write_text(good + "\n" + json.dumps({"context": "a", "choices": [" b", 3], "label": 0}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: context must be a string and choices a non-empty list"):
        evaluate_module._mc_records(str(path))
    path.write_text(json.dumps({"context": "a", "choices": [" b"], "label": "0"}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:1: label must be an integer index into the 1 choices, got '0'"):
        evaluate_module._mc_records(str(path))
    assert len(evaluate_module._mc_records(_write(tmp_path, good))) == 1


def _write(tmp_path, line: str) -> str:
    path = tmp_path / "one.jsonl"
    path.write_text(line + "\n")
    return str(path)


def test_json_file_errors_name_option_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": 1,\n "b": }\n')
    with pytest.raises(ValueError, match=rf"--gate-config {path}:2: not valid JSON"):
        read_json_file(str(path), "--gate-config")
    with pytest.raises(FileNotFoundError, match="--gate-config: no file at"):
        read_json_file(str(tmp_path / "missing.json"), "--gate-config")


def test_evaluate_on_a_missing_model_directory_says_so(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    with pytest.raises(FileNotFoundError, match=r"--model must be a local model directory, got .*no such directory"):
        evaluate_main(["--model", str(tmp_path / "nope"), "--text", str(text), "--out", str(tmp_path / "e.json")])


def test_evaluate_counts_progress_per_forward_and_says_where_results_went(tmp_path, capsys):
    model_dir = tmp_path / "model"
    save_tiny_model(model_dir, "llama")
    gates_dir = tmp_path / "gates"
    ag.save_gates(ag.add_attention_gates(make_model("llama"), ag.AttentionGateConfig()), str(gates_dir))
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 4)
    out = tmp_path / "e.json"
    evaluate_main(["--model", str(model_dir), "--gates", str(gates_dir), "--text", str(text), "--policies", "gate",
                   "--modes", "in_context", "--ratios", "0.5", "--context-len", "16", "--continuation-len", "16",
                   "--windows", "3", "--batch-size", "2", "--out", str(out)])
    captured = capsys.readouterr()
    # dense: 2 batches of windows; gate: 1 calibration + 2 batches.
    assert "5/5" in captured.err, captured.err[-500:]
    assert f"results: {out}" in captured.out


def _parser_of(main, monkeypatch) -> argparse.ArgumentParser:
    class Captured(Exception):
        pass

    def capture(self, *args, **kwargs):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Captured) as exc:
        main([])
    return exc.value.args[0]


@pytest.mark.parametrize("main", [train_main, evaluate_main], ids=["train", "evaluate"])
def test_every_option_has_help_that_states_its_default(main, monkeypatch):
    parser = _parser_of(main, monkeypatch)
    assert isinstance(parser.formatter_class(prog="x"), cli_utils.HelpWithDefaults)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = formatter._get_help_string(action)
        assert action.help, f"{action.option_strings} has no help text"
        if action.default not in (None, False):
            assert "default" in text, f"{action.option_strings}: help does not state the default: {text!r}"
    for module in (train_module, evaluate_module):
        assert "SPEC" not in (module.__doc__ or "")


def test_help_formatter_appends_defaults_once():
    p = argparse.ArgumentParser(formatter_class=cli_utils.HelpWithDefaults)
    p.add_argument("--a", type=int, default=3, help="a number")
    p.add_argument("--b", type=int, default=4, help="b (default 4)")
    p.add_argument("--c", nargs="+", default=[1, 2], help="c list")
    text = p.format_help()
    assert "a number (default: 3)" in text and "b (default 4)" in text and "(default: 4)" not in text
    assert "c list (default: 1 2)" in text


def test_train_leaves_gates_finite_for_valid_hyperparameters(model_and_text, tmp_path):
    model_dir, text = model_and_text
    _train(model_dir, text, tmp_path / "out", "--lr", "1e-2")
    for name, t in load_file(tmp_path / "out" / "gates" / "attention_gates.safetensors").items():
        assert torch.isfinite(t).all(), name
