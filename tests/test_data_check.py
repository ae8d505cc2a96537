"""``python -m vltune.data check``: a complete miniature root passes; a missing split file, an emptied class folder,
a corrupted image or an absent dataset give a precise message and a non-zero exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO
from layouts import LAYOUTS

from vltune.data.check import PUBLISHED, check, main


@pytest.fixture
def full_root(coop_layout_root):
    return coop_layout_root


def _copy(full_root, tmp_path, *names):
    root = tmp_path / "data"
    root.mkdir()
    for name in names:
        folder = LAYOUTS[name](tmp_path / "probe", False).dataset_dir
        shutil.copytree(full_root / folder, root / folder)
    return root


def test_a_complete_miniature_root_passes_with_count_warnings_only(full_root, capsys):
    assert set(LAYOUTS) >= set(PUBLISHED)
    reports = check(str(full_root))
    assert [r.name for r in reports] == list(PUBLISHED)
    assert all(r.status == "warning" for r in reports), [(r.name, r.lines) for r in reports if r.status != "warning"]
    assert main(["--root", str(full_root)]) == 0
    out = capsys.readouterr().out
    assert "15 of 15 usable" in out and "published: 37 classes, 2,944 / 736 / 3,669" in out


def test_a_removed_split_file_is_named_with_the_expected_layout(full_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLTUNE_CACHE_DIR", str(tmp_path / "cache"))  # no cached split to fall back on
    root = _copy(full_root, tmp_path, "FGVCAircraft", "OxfordPets", "DescribableTextures")
    os.remove(root / "oxford_pets" / "split_zhou_OxfordPets.json")
    os.remove(root / "fgvc_aircraft" / "images_variant_test.txt")
    os.remove(root / "dtd" / "split_zhou_DescribableTextures.json")
    assert main(["--root", str(root), "--dataset", "FGVCAircraft", "OxfordPets", "DescribableTextures"]) == 1
    out = capsys.readouterr().out
    assert "images_variant_test.txt not found" in out
    assert "oxford_pets/annotations/trainval.txt not found" in out  # no JSON, and no raw files to rebuild it from
    assert "dtd/split_zhou_DescribableTextures.json is missing: a split rebuilt from the raw files" in out
    assert "unusable: FGVCAircraft, OxfordPets" in out


def test_an_emptied_class_folder_is_reported(full_root, tmp_path, capsys):
    root = _copy(full_root, tmp_path, "OxfordFlowers", "ImageNetR")
    folder = root / "imagenet-rendition" / "imagenet-r" / "n01440764"
    for f in folder.iterdir():
        f.unlink()
    jpg = root / "oxford_flowers" / "jpg"
    victim = sorted(jpg.iterdir())[0]
    victim.unlink()
    assert main(["--root", str(root), "--dataset", "ImageNetR", "OxfordFlowers"]) == 1
    out = capsys.readouterr().out
    assert "no images for folder 'n01440764' (1 class(es)): restore those class folders" in out
    assert f"listed images are missing, e.g. {victim}" in out and "re-extract" in out


def test_a_corrupted_image_is_named(full_root, tmp_path, capsys):
    root = _copy(full_root, tmp_path, "EuroSAT")
    victim = sorted((root / "eurosat" / "2750").rglob("*.jpg"))[0]
    victim.write_bytes(b"not an image at all")
    assert main(["--root", str(root), "--dataset", "EuroSAT"]) == 1
    out = capsys.readouterr().out
    assert f"1 image(s) cannot be decoded, e.g. {victim}" in out
    assert main(["--root", str(root), "--dataset", "EuroSAT", "--images", "none"]) == 0  # existence only


def test_an_absent_dataset_and_an_unknown_name(tmp_path, capsys):
    assert main(["--root", str(tmp_path), "--dataset", "SUN397"]) == 1
    assert "sun397 not found" in capsys.readouterr().out
    with pytest.raises(Exception, match="did you mean 'OxfordPets'"):
        main(["--root", str(tmp_path), "--dataset", "OxfordPet"])


@pytest.mark.slow  # two `python -m vltune.data` subprocesses
def test_module_entry_point(full_root):
    run = subprocess.run([sys.executable, "-m", "vltune.data", "check", "--root", str(full_root), "--dataset",
                          "OxfordPets", "--images", "sample"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "1 of 1 usable" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "vltune.data", "inspect"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "usage" in bad.stderr
