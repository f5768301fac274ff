"""A folder is walked once (storage.walk_files): a real folder with a symlink loop, a link to a
folder already walked, links to files, a hard link, a link to a folder outside, a FIFO, a dangling
link, a link to itself and a file name that is not UTF-8. Each real file is listed (and scored)
exactly once; every other entry is listed once with its reason; nothing aborts the run.

Before the walk, pyarrow's recursive listing followed every link: on this folder (several loops)
the paths multiply and the listing never returns; the last test takes each defect of the issue
alone, where the old listing failed fast (a file 40 times, UnicodeDecodeError, no rows)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fracray import storage
from fracray.data import adapters
from fracray.scoring.archive import ScoreConfig, read_image_results, score_archive
from conftest import synthetic_jpeg

NOT_UTF8 = b"caf\xe9-\xff.jpg"  # Latin-1 and a 0xFF byte: not UTF-8


def _hostile_folder(tmp_path: Path) -> tuple[Path, set[str], dict[str, str]]:
    """The archive, the paths that must be listed as files, and {path: reason} for the rest."""
    rng = np.random.default_rng(5)
    root = tmp_path / "archive"
    s1, s2, outside = root / "study1", root / "study2", tmp_path / "outside" / "study3"
    for folder in (s1, s2, outside):
        folder.mkdir(parents=True)
    for path in (s1 / "a.jpg", s1 / "b.jpg", s2 / "c.jpg", outside / "d.jpg"):
        path.write_bytes(synthetic_jpeg(rng, h=200, w=160))
    (s2 / "loop").symlink_to("..")                    # back to the archive's root: a loop
    (s2 / "up").symlink_to("../study2")               # to the folder that holds it: a loop
    (s1 / "again").symlink_to("../study2")            # a folder already walked
    (s1 / "00link.jpg").symlink_to("a.jpg")           # sorts before its target: the target's path wins
    (s2 / "a-too.jpg").symlink_to("../study1/a.jpg")  # a file already listed
    os.link(s1 / "b.jpg", s2 / "b-hard.jpg")          # a hard link: the same file
    (root / "linked").symlink_to(tmp_path / "outside")  # a folder outside: followed once
    (root / "linked-again").symlink_to(tmp_path / "outside")
    (root / "self").symlink_to("self")                # resolves to itself
    (s1 / "gone.jpg").symlink_to("missing.jpg")       # dangling
    os.mkfifo(s2 / "pipe.jpg")                        # a FIFO named like an image: never opened
    with open(os.fsencode(s2) + b"/" + NOT_UTF8, "wb") as f:
        f.write(synthetic_jpeg(rng, h=200, w=160))
    files = {str(s1 / "a.jpg"), str(s1 / "b.jpg"), str(s2 / "c.jpg"), str(root / "linked" / "study3" / "d.jpg")}
    rejects = {
        str(s2 / "loop"): "symlink_loop", str(s2 / "up"): "symlink_loop", str(root / "self"): "symlink_loop",
        str(s1 / "again"): "duplicate_link", str(s1 / "00link.jpg"): "duplicate_link",
        str(s2 / "a-too.jpg"): "duplicate_link", str(root / "linked-again"): "duplicate_link",
        str(s2 / "b-hard.jpg"): "duplicate_file",
        str(s1 / "gone.jpg"): "dangling_symlink",
        str(s2 / "pipe.jpg"): "special_file",
        str(s2) + "/caf\\xe9-\\xff.jpg": "undecodable_name",
    }
    return root, files, rejects


def test_walk_lists_each_real_file_once_and_the_rest_with_reasons(tmp_path):
    root, files, rejects = _hostile_folder(tmp_path)
    listing = storage.walk_files(str(root))
    assert listing.files == sorted(files)
    assert {uri: reason for uri, reason, _ in listing.rejects} == rejects
    assert len(listing.rejects) == len(rejects) and all(detail for *_, detail in listing.rejects)
    details = {uri: detail for uri, _, detail in listing.rejects}
    assert details[str(root / "study1" / "00link.jpg")] == f"the same file as {root}/study1/a.jpg, which is listed"
    assert details[str(root / "study1" / "gone.jpg")] == "symbolic link to 'missing.jpg', which does not exist"
    assert details[str(root / "study2" / "pipe.jpg")] == "a FIFO (named pipe), not a regular file"
    assert "contains the link" in details[str(root / "study2" / "loop")]
    # Every entry of the tree (links not followed) is a file or a reject, but for the one link
    # that was followed, whose file is listed under it.
    entries = set()
    for folder, dirs, names in os.walk(os.fsencode(root)):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            entries.add(storage.printable_path(os.fsdecode(os.path.join(folder, name))))
    assert entries - set(rejects) - files == {str(root / "linked")}
    # The listing everyone else uses: the same files, and the same on a second walk.
    assert storage.list_files(str(root)) == listing.files
    assert storage.walk_files(str(root)) == listing


def test_walk_without_recursion_and_of_what_is_not_a_folder(tmp_path):
    root, _, _ = _hostile_folder(tmp_path)
    top = storage.walk_files(str(root / "study1"), recursive=False)
    assert top.files == [str(root / "study1" / "a.jpg"), str(root / "study1" / "b.jpg")]
    assert {r[1] for r in top.rejects} == {"duplicate_link", "dangling_symlink"}  # `again` is a folder: not walked
    with pytest.raises(storage.StorageError, match="Not found"):
        storage.walk_files(str(tmp_path / "nothing"))
    with pytest.raises(storage.StorageError, match="not a directory"):
        storage.walk_files(str(root / "study1" / "a.jpg"))


def test_the_scoring_index_takes_the_walk(tmp_path):
    """index_tree (what score_archive runs on a folder): the real files as images, the rest as
    rejects with reasons, nothing twice (it used to crash on the name, or list files 40 times)."""
    root, files, rejects = _hostile_folder(tmp_path)
    result = adapters.index_dataset("auto", str(root))
    uris = result.manifest["image_uri"].to_pylist()
    assert sorted(uris) == sorted(files)
    assert dict(zip(result.rejects["uri"].to_pylist(), result.rejects["reason"].to_pylist())) == rejects
    studies = dict(zip(uris, result.manifest["study_id"].to_pylist()))
    assert studies[str(root / "linked" / "study3" / "d.jpg")] == "linked/study3"
    # index_folder (class folders) takes the same walk
    classes = tmp_path / "classes"
    (classes / "fractured").mkdir(parents=True)
    (classes / "fractured" / "x.jpg").write_bytes((root / "study1" / "a.jpg").read_bytes())
    (classes / "normal").symlink_to("fractured")
    folder = adapters.index_folder(str(classes))
    assert folder.manifest["image_uri"].to_pylist() == [str(classes / "fractured" / "x.jpg")]
    assert folder.rejects["reason"].to_pylist() == ["duplicate_link"]


def test_score_archive_scores_each_real_file_exactly_once(ray_local, untrained_index, tmp_path):
    root, files, rejects = _hostile_folder(tmp_path)
    output = str(tmp_path / "scores")
    summary = score_archive(ScoreConfig(input=str(root), models=untrained_index, output=output, batch_size=4),
                            log=lambda *_: None)
    images = read_image_results(output).to_pylist()
    uris = [r["image_uri"] for r in images]
    assert len(uris) == len(set(uris)) == len(files) + len(rejects)
    status = {r["image_uri"]: r["status"] for r in images}
    assert {u for u, s in status.items() if s == "ok"} == files
    assert {u: s for u, s in status.items() if s != "ok"} == rejects
    assert all(r["error"] for r in images if r["status"] != "ok")
    assert summary.inputs == len(files) + len(rejects) and summary.scored == len(files)
    assert summary.rejected == {"dangling_symlink": 1, "duplicate_file": 1, "duplicate_link": 4, "special_file": 1,
                                "symlink_loop": 3, "undecodable_name": 1}


def _three_images(root: Path) -> set[str]:
    rng = np.random.default_rng(6)
    paths = [root / "s1" / "a.jpg", root / "s1" / "b.jpg", root / "s2" / "c.jpg"]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(synthetic_jpeg(rng, h=200, w=160))
    return {str(p) for p in paths}


def _one_loop(root: Path) -> dict[str, str]:
    (root / "s2" / "loop").symlink_to("..")
    return {str(root / "s2" / "loop"): "symlink_loop"}


def _not_utf8(root: Path) -> dict[str, str]:
    with open(os.fsencode(root / "s1") + b"/\xff.jpg", "wb") as f:
        f.write(b"\xff\xd8 not really")
    return {str(root / "s1") + "/\\xff.jpg": "undecodable_name"}


def _fifo_and_dangling(root: Path) -> dict[str, str]:
    os.mkfifo(root / "s1" / "pipe")
    (root / "s2" / "gone.jpg").symlink_to("nowhere.jpg")
    return {str(root / "s1" / "pipe"): "special_file", str(root / "s2" / "gone.jpg"): "dangling_symlink"}


@pytest.mark.parametrize("defect", [_one_loop, _not_utf8, _fifo_and_dangling])
def test_each_defect_of_the_issue_alone(tmp_path, defect):
    """Issue 23, item 6, one defect at a time: a loop listed each file ~40 times, a 0xFF byte in a
    name aborted the listing (UnicodeDecodeError), a FIFO and a dangling link left no row."""
    root = tmp_path / "archive"
    files = _three_images(root)
    rejects = defect(root)
    result = adapters.index_tree(str(root))
    assert sorted(result.manifest["image_uri"].to_pylist()) == sorted(files)
    assert dict(zip(result.rejects["uri"].to_pylist(), result.rejects["reason"].to_pylist())) == rejects
