"""Checks shared by the train and evaluate command lines: help texts that state defaults, hyperparameters that must
be finite and in range, the local model directory, and the output folder of a training run.

What ``train`` does with its ``--out`` folder:

* a new folder, or one without results of a run (other files, such as a gate config, may be there): the run writes
  into it; if the run fails before its first checkpoint, a folder that the run created is removed again (nothing
  half-made is left behind);
* a folder that holds results of a run already (checkpoints, gates, lora, report.json): refused, unless
  ``--resume`` (continue its latest checkpoint) or ``--overwrite`` (those results are deleted first; other files
  stay);
* ``--resume`` with no checkpoint in the folder: refused (nothing to resume) instead of starting over.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional, Tuple

# What a training run writes into --out (and --overwrite deletes).
RUN_OUTPUTS = ("checkpoints", "gates", "lora", "report.json")


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


def fraction(x: float) -> bool:
    return math.isfinite(x) and 0.0 <= x <= 1.0


def at_least_one(x: int) -> bool:
    return x >= 1


def require_model_dir(path: str) -> None:
    """The model is read from local files only: a missing directory is refused before transformers sees it (whose
    message would be about hub repository ids)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model must be a local model directory, got {path!r} (no such directory)")


def prepare_out_dir(out: Path, resume: bool, overwrite: bool, latest_checkpoint: Callable,
                    write: bool = True) -> bool:
    """Makes ``out`` ready for a run (see the module docstring); returns whether this call created it.

    ``write=False`` only checks (every data-parallel process checks, so that all of them refuse together; process
    0 alone deletes and creates)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if resume:
        if latest_checkpoint(out) is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'}, nothing to resume; "
                                    "start the run without --resume")
        return False
    existing = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"--out {out} holds the results of a run already ({', '.join(existing)}): pass --resume "
                              "to continue it, --overwrite to replace them, or choose another folder")
    if overwrite:
        for name in RUN_OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return created


def clean_up_failed_run(out: Path, created: bool, latest_checkpoint: Callable) -> Optional[str]:
    """After a failed run: removes ``out`` when this run created it and saved no checkpoint; returns what it did."""
    if created and out.is_dir() and latest_checkpoint(out) is None:
        shutil.rmtree(out, ignore_errors=True)
        return f"removed {out} (the failed run had created it and saved no checkpoint)"
    return None
