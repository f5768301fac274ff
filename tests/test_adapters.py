"""Dataset adapters on data written in the released layouts (and the real FracAtlas copy)."""

import collections
import csv
import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from fracray.data import adapters
from fracray.data.manifest import MANIFEST_SCHEMA, MURA_BODY_PARTS, filter_rows, read_manifest, summarize, write_table


def _png(path: Path, value: int = 128, size=(32, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


# ----------------------------------------------------------------------------- MURA

def test_mura_layout_is_indexed_exactly(mura_root):
    result = adapters.index_mura(str(mura_root))
    m = result.manifest
    assert m.schema == MANIFEST_SCHEMA
    paths = {split: (mura_root / "MURA-v1.1" / f"{split}_image_paths.csv").read_text().split() for split in ("train", "valid")}
    assert m.num_rows == len(paths["train"]) + len(paths["valid"])
    assert set(m["body_part"].to_pylist()) == set(MURA_BODY_PARTS)
    # Labels come from the labelled-studies CSV and agree with the folder suffix here.
    for row in m.to_pylist():
        assert row["image_label"] == (1 if "_positive/" in row["image_uri"] else 0)
        assert row["study_label"] == row["image_label"]
        assert row["patient_id"].startswith("patient") and row["study_id"].endswith(("positive", "negative"))
    # The AppleDouble file the generator planted is reported, not indexed.
    strays = [r for r in result.rejects.to_pylist() if r["reason"] == "stray_file"]
    assert len(strays) == 1 and Path(strays[0]["uri"]).name.startswith("._")


def test_mura_accepts_the_MURA_folder_itself(mura_root):
    a = adapters.index_mura(str(mura_root))
    b = adapters.index_mura(str(mura_root / "MURA-v1.1"))
    assert a.manifest.equals(b.manifest)


def _write_mura(root: Path, studies: list[tuple[str, str, str, int, int]], extra_rows=()):
    """studies: (split, body part, study folder name, csv label, images)."""
    paths = collections.defaultdict(list)
    labels = collections.defaultdict(list)
    for i, (split, part, study, label, n) in enumerate(studies):
        rel = f"MURA-v1.1/{split}/XR_{part}/patient{i:05d}/{study}/"
        labels[split].append(f"{rel},{label}")
        for k in range(n):
            _png(root / rel / f"image{k + 1}.png")
            paths[split].append(f"{rel}image{k + 1}.png")
    for split, rel in extra_rows:
        paths[split].append(rel)
    for split in ("train", "valid"):
        (root / "MURA-v1.1").mkdir(parents=True, exist_ok=True)
        (root / "MURA-v1.1" / f"{split}_image_paths.csv").write_text("\n".join(paths[split]) + "\n")
        (root / "MURA-v1.1" / f"{split}_labeled_studies.csv").write_text("\n".join(labels[split]) + "\n")


def test_mura_label_disagreement_missing_and_unlisted_files_are_reported(tmp_path):
    _write_mura(tmp_path, [
        ("train", "WRIST", "study1_positive", 1, 2),
        ("train", "ELBOW", "study1_negative", 1, 1),   # CSV says abnormal, folder says negative
        ("valid", "HAND", "study1_negative", 0, 1),
    ], extra_rows=[("train", "MURA-v1.1/train/XR_WRIST/patient00000/study1_positive/image9.png")])
    _png(tmp_path / "MURA-v1.1/valid/XR_HAND/patient00002/study1_negative/unlisted.png")
    (tmp_path / "MURA-v1.1/train/XR_WRIST/patient00000/study1_positive/._image1.png").write_bytes(b"\0\5\26\7")
    result = adapters.index_mura(str(tmp_path))
    rows = {Path(r["image_uri"]).parent.parent.parent.name + "/" + Path(r["image_uri"]).name: r
            for r in result.manifest.to_pylist()}
    assert result.manifest.num_rows == 4
    elbow = next(r for r in result.manifest.to_pylist() if r["body_part"] == "elbow")
    assert elbow["image_label"] == 1 and "CSV (official label) wins" in elbow["label_note"]
    assert result.label_disagreements == 1
    reasons = collections.Counter(r["reason"] for r in result.rejects.to_pylist())
    assert reasons == {"missing_file": 1, "unlisted_file": 1, "stray_file": 1}
    assert any("disagree" in n for n in result.notes)
    assert rows  # every image has a row keyed by its path


def test_mura_missing_csv_says_where_to_point(tmp_path):
    with pytest.raises(FileNotFoundError, match="MURA-v1.1"):
        adapters.index_mura(str(tmp_path))


# ----------------------------------------------------------------------------- FracAtlas

def test_fracatlas_layout(fracatlas_root):
    result = adapters.index_fracatlas(str(fracatlas_root))
    m = result.manifest.to_pylist()
    assert len(m) == 60
    fractured = [r for r in m if r["image_label"] == 1]
    assert fractured and all("/Fractured/" in r["image_uri"] for r in fractured)
    assert all(r["boxes"] and 0 < r["boxes"][0]["width"] <= 1 for r in fractured)
    assert all(not r["boxes"] for r in m if r["image_label"] == 0)
    assert {r["body_part"] for r in m} <= {"hand", "leg", "hip", "shoulder", "mixed"}
    assert {r["split"] for r in m} <= {"train", "valid", "test"}
    # The generator writes no test.csv, as in the shared copy: said, not crashed on.
    assert any("test.csv is missing" in n for n in result.notes)


def _copy_fracatlas(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "FracAtlas", dst / "FracAtlas")
    return dst / "FracAtlas"


def test_fracatlas_label_disagreement_uses_the_majority_rule(fracatlas_root, tmp_path):
    root = _copy_fracatlas(fracatlas_root, tmp_path)
    text = (root / "dataset.csv").read_bytes().decode()
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], rows[1:]
    i_frac, i_count = header.index("fractured"), header.index("fracture_count")
    # Like IMG0003298 in the release: in images/Fractured, fracture_count=1, but fractured=0.
    target = next(r for r in body if (root / "images" / "Fractured" / r[0]).exists())
    target[i_frac], target[i_count] = "0", "1"
    (root / "dataset.csv").write_bytes(("\r\n".join(",".join(r) for r in rows) + "\r\n").encode())
    result = adapters.index_fracatlas(str(tmp_path))
    row = next(r for r in result.manifest.to_pylist() if r["image_uri"].endswith(target[0]))
    assert row["image_label"] == 1 and "majority" in row["label_note"]
    assert result.label_disagreements == 1


def test_fracatlas_split_policy_reproduces_the_papers_fractions():
    ids = [f"IMG{i:07d}.jpg" for i in range(2000)]
    split = adapters.fracatlas_split_for_nonfractured(ids, seed=1)
    counts = collections.Counter(split.values())
    assert counts == {"train": 1600, "valid": 230, "test": 170}  # 80 / 11.5 / 8.5 %
    # Deterministic, and independent of the order files were listed in.
    assert adapters.fracatlas_split_for_nonfractured(list(reversed(ids)), seed=1) == split
    assert adapters.fracatlas_split_for_nonfractured(ids, seed=2) != split


def test_fracatlas_without_split_files_still_splits_everything(fracatlas_root, tmp_path):
    root = _copy_fracatlas(fracatlas_root, tmp_path)
    shutil.rmtree(root / "Utilities")
    result = adapters.index_fracatlas(str(tmp_path))
    assert result.manifest.num_rows == 60
    assert set(result.manifest["split"].to_pylist()) <= {"train", "valid", "test"}
    assert sum("is missing" in n for n in result.notes) == 3


def test_real_fracatlas_index(shared_fracatlas):
    result = adapters.index_fracatlas(str(shared_fracatlas))
    m = result.manifest
    assert m.num_rows == 3736
    labels = collections.Counter(m["image_label"].to_pylist())
    assert labels == {0: 3080, 1: 656}
    # The release's fracture split covers every fractured image here (574 train, 82 valid).
    frac_splits = collections.Counter(r["split"] for r in m.to_pylist() if r["image_label"] == 1)
    assert frac_splits == {"train": 574, "valid": 82}
    # Non-fractured follow the 80 / 11.5 / 8.5 policy.
    non = collections.Counter(r["split"] for r in m.to_pylist() if r["image_label"] == 0)
    assert non["train"] == round(0.8 * 3080) and non["valid"] == round(0.115 * 3080)
    assert sum(1 for h in m["hardware"].to_pylist() if h) > 0
    assert all(b for b, label in zip(m["boxes"].to_pylist(), m["image_label"].to_pylist()) if label == 1)
    hardware_free = filter_rows(m, exclude_hardware=True)
    assert 0 < hardware_free.num_rows < m.num_rows


# ----------------------------------------------------------------------------- class folders, manifests

def test_class_folder_layout(tmp_path):
    for split in ("train", "val"):
        for cls, n in (("fractured", 2), ("not fractured", 3)):
            for k in range(n):
                _png(tmp_path / split / cls / f"{k}.png")
    (tmp_path / "train" / "fractured" / ".DS_Store").write_bytes(b"junk")
    result = adapters.index_folder(str(tmp_path))
    m = result.manifest.to_pylist()
    assert len(m) == 10
    assert collections.Counter((r["split"], r["image_label"]) for r in m) == {
        ("train", 1): 2, ("train", 0): 3, ("valid", 1): 2, ("valid", 0): 3}
    assert [r["reason"] for r in result.rejects.to_pylist()] == ["stray_file"]


def test_class_folder_unknown_class_name_is_a_clear_error(tmp_path):
    _png(tmp_path / "train" / "maybe" / "a.png")
    with pytest.raises(ValueError, match="--positive-class"):
        adapters.index_folder(str(tmp_path))
    result = adapters.index_folder(str(tmp_path), positive_classes=("maybe",))
    assert result.manifest["image_label"].to_pylist() == [1]


def test_user_manifest_csv_with_relative_paths(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png")
    (tmp_path / "list.csv").write_text("path,label,body_part,split,scanner\nimgs/a.png,fractured,Wrist,train,x\n"
                                       "imgs/b.png,0,HAND,valid,y\n")
    result = adapters.index_manifest_file(str(tmp_path / "list.csv"))
    rows = result.manifest.to_pylist()
    assert [r["image_label"] for r in rows] == [1, 0]
    assert [r["body_part"] for r in rows] == ["wrist", "hand"]
    assert rows[0]["image_uri"] == str(tmp_path / "imgs" / "a.png")
    assert any("scanner" in n for n in result.notes)


def test_user_manifest_parquet_round_trip(tmp_path, mura_root):
    original = adapters.index_mura(str(mura_root)).manifest
    write_table(original, str(tmp_path / "m.parquet"))
    again = adapters.index_manifest_file(str(tmp_path / "m.parquet")).manifest
    assert again.equals(original)
    assert read_manifest(str(tmp_path / "m.parquet")).equals(original)


def test_user_manifest_without_an_image_column_is_a_clear_error(tmp_path):
    (tmp_path / "bad.csv").write_text("label\n1\n")
    with pytest.raises(ValueError, match="image column"):
        adapters.index_manifest_file(str(tmp_path / "bad.csv"))


def test_summary_counts(mura_root):
    m = adapters.index_mura(str(mura_root)).manifest
    counts = summarize(m)
    assert sum(c["images"] for c in counts) == m.num_rows
    assert all(set(c) == {"split", "body_part", "image_label", "images"} for c in counts)
