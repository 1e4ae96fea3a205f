"""Reading the JSON and JSONL files a user hands the CLIs, with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple


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
