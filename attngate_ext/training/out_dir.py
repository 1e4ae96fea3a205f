"""The output folder of a training run (``python -m attngate_ext.train --out``).

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

import shutil
from pathlib import Path
from typing import Callable, Optional

# What a training run writes into --out (and --overwrite deletes).
RUN_OUTPUTS = ("checkpoints", "gates", "lora", "report.json")


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
