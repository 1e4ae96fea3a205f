"""Helpers of the train and evaluate command lines: help texts that state their defaults, hyperparameters that must
be finite and in range, the model (a local directory, in a named dtype), and the JSON / JSONL files a user hands
them (errors name the file and the line)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Tuple

import torch

# The --dtype choices of the command lines.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HelpWithDefaults(argparse.HelpFormatter):
    """Adds "(default: X)" to the help of every option that has a default and does not state it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        shown = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {shown})".strip()


def require(parser: argparse.ArgumentParser, args: argparse.Namespace, checks: Iterable[Tuple[str, Callable, str]]):
    """For each (dest, predicate, rule): ``parser.error("--dest must be rule, got value")`` unless the value is None
    or passes the predicate."""
    for dest, ok, rule in checks:
        value = getattr(args, dest)
        if value is not None and not ok(value):
            parser.error(f"--{dest.replace('_', '-')} must be {rule}, got {value}")


def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def non_negative(x: float) -> bool:
    return math.isfinite(x) and x >= 0


def at_least_one(x: int) -> bool:
    return x >= 1


def require_model_dir(path: str) -> None:
    """The model is read from local files only: a missing directory is refused before transformers sees it (whose
    message would be about hub repository ids)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model must be a local model directory, got {path!r} (no such directory)")


def load_local_model(path: str, dtype: str, device: str):
    """``(model, tokenizer)`` from the local model directory ``path``, the model in ``DTYPES[dtype]`` on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True).to(device)
    return model, tokenizer


def _where(exc: json.JSONDecodeError) -> str:
    return f"{exc.msg} at column {exc.colno}"


def read_jsonl(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Yields (line number, object) for every non-blank line of a JSONL file; a line that is not a JSON object is a
    ValueError naming ``path:line``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no JSONL file at {path!r}")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({_where(exc)})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object {{...}}, got {type(record).__name__}")
            yield number, record


def read_json_file(path: str, option: str) -> Any:
    """The JSON document in ``path``, given on the command line as ``option``; errors name both, and the line."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{option}: no file at {path!r}")
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{option} {path}:{exc.lineno}: not valid JSON ({_where(exc)})") from None
