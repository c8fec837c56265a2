"""Run archives: a sweep's finished runs packed into one file and restored by a merge
equal the runs as they were (checkpoints aside), and a bad archive changes nothing."""

from __future__ import annotations

import base64
import copy
import json
import lzma
import os
from pathlib import Path

import pytest

from sgdgeom.errors import ConfigError, InputError, SgdgeomError
from sgdgeom.experiments.archive import RunArchive, write_archive
from sgdgeom.experiments.merge import merge_store
from sgdgeom.experiments.store import STORE, ResultStore
from sgdgeom.experiments.sweep import load_sweep, run_sweep
from tests.test_cli import assert_one_line_error, sgdgeom
from tests.test_merge import folder_bytes, snapshot, sweep_part
from tests.test_sweep import SMALL, store_content, sweep_file


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Three runs of SMALL finished, one left pending, a hidden file in one folder and a
    binary file two folders down in another."""
    root = tmp_path_factory.mktemp("archive")
    path = sweep_file(root, SMALL)
    sweep_part(path, root / "out", "none_*", "pla_R=0.1_seed=0")
    pending = load_sweep(path, root / "out").runs[-1]
    ResultStore(root / "out" / STORE).register("small", [pending.as_row()])
    (root / "out" / "runs" / "none_seed=0" / ".notes.swp").write_text("editor's")
    nested = root / "out" / "runs" / "none_seed=1" / "figures" / "epochs"
    nested.mkdir(parents=True)  # a folder two levels down travels too
    (nested / "curve.png").write_bytes(bytes(range(256)))
    return path, root / "out", pending.name


def without_checkpoints_and_hidden(files: dict) -> dict:
    return {k: v for k, v in files.items() if k[1] != "checkpoint.pt" and "/." not in f"/{k[1]}"}


def finished_content(store: ResultStore) -> dict:
    return {k: v for k, v in store_content(store).items() if v[3] == "finished"}


def test_an_archive_restores_the_finished_runs_as_they_were(tmp_path, swept):
    path, out, pending = swept
    names = write_archive(out, tmp_path / "runs.json.xz")
    assert sorted(names) == ["none_seed=0", "none_seed=1", "pla_R=0.1_seed=0"]
    assert pending not in names

    summary = merge_store(tmp_path / "runs.json.xz", tmp_path / "new")
    assert sorted(summary.merged) == sorted(names)
    restored = ResultStore(tmp_path / "new" / STORE)
    assert finished_content(restored) == finished_content(ResultStore(out / STORE))
    # every run file but the checkpoint (and the hidden file), byte for byte
    assert folder_bytes(tmp_path / "new") == without_checkpoints_and_hidden(folder_bytes(out))
    assert restored.sweeps() == ResultStore(out / STORE).sweeps()
    original = {r["hash"]: r for r in ResultStore(out / STORE).runs()}
    for row in restored.runs():  # timestamps and attempts came along; the folder is here
        assert row["finished"] == original[row["hash"]]["finished"]
        assert row["attempts"] == original[row["hash"]]["attempts"]
        assert Path(row["run_dir"]) == tmp_path / "new" / "runs" / row["name"]

    # archiving the restored runs gives the same file, byte for byte
    write_archive(tmp_path / "new", tmp_path / "again.json.xz")
    assert (tmp_path / "again.json.xz").read_bytes() == (tmp_path / "runs.json.xz").read_bytes()

    # a sweep there runs only what the archive lacked; a second merge keeps everything
    run_sweep(load_sweep(path, tmp_path / "new"), tmp_path / "new", threads=1, progress=False)
    after = {r["name"]: r["finished"] for r in restored.runs()}
    for row in original.values():
        if row["name"] in names:
            assert after[row["name"]] == row["finished"]
    assert len(after) == len(load_sweep(path, tmp_path / "new").runs)
    before = snapshot(tmp_path / "new")
    again = merge_store(tmp_path / "runs.json.xz", tmp_path / "new")
    assert again.merged == [] and sorted(again.kept) == sorted(names)
    assert again.differing == []
    assert snapshot(tmp_path / "new") == before

    # the same run with other digits (another machine): kept as it is here, and named
    document = lzma.decompress((tmp_path / "runs.json.xz").read_bytes())
    other = json.loads(document)
    other["runs"][1]["row"]["final"]["final_test_acc"] += 0.001
    (tmp_path / "other.json.xz").write_bytes(lzma.compress(json.dumps(other).encode()))
    differs = merge_store(tmp_path / "other.json.xz", tmp_path / "new")
    assert differs.differing == [other["runs"][1]["row"]["name"]]
    assert sorted(differs.kept) == sorted(names) and differs.merged == []
    assert snapshot(tmp_path / "new") == before


def test_an_archive_replaces_an_interrupted_run_and_its_checkpoint(tmp_path, swept):
    path, out, _ = swept
    write_archive(out, tmp_path / "runs.json.xz")
    here = tmp_path / "here"
    stale = next(r for r in load_sweep(path, here).runs if r.name == "pla_R=0.1_seed=0")
    ResultStore(here / STORE).register("small", [stale.as_row()])
    ResultStore(here / STORE).start(stale.hash, resumed_from=0)
    ResultStore(here / STORE).interrupt([stale.hash])
    Path(stale.run_dir).mkdir(parents=True)
    (Path(stale.run_dir) / "checkpoint.pt").write_bytes(b"stale")
    summary = merge_store(tmp_path / "runs.json.xz", here)
    assert stale.name in summary.merged
    assert not (Path(stale.run_dir) / "checkpoint.pt").exists()
    assert ResultStore(here / STORE).runs()[0]["status"] == "finished"


def test_a_link_in_a_run_folder_is_refused_and_nothing_is_written(tmp_path, swept):
    _, out, _ = swept
    link = out / "runs" / "none_seed=1" / "elsewhere"
    os.symlink(tmp_path, link)
    try:
        with pytest.raises(InputError, match="not a plain file or folder"):
            write_archive(out, tmp_path / "runs.json.xz")
    finally:
        link.unlink()
    assert not (tmp_path / "runs.json.xz").exists()
    with pytest.raises(SgdgeomError, match="nothing to archive"):
        write_archive(tmp_path / "nowhere", tmp_path / "runs.json.xz")


def archive_document(tmp_path: Path, swept) -> dict:
    _, out, _ = swept
    write_archive(out, tmp_path / "good.json.xz")
    return json.loads(lzma.decompress((tmp_path / "good.json.xz").read_bytes()))


def broken(document: dict, change) -> dict:
    document = copy.deepcopy(document)
    change(document)
    return document


def set_file(name: str, content: dict):
    return lambda d: d["runs"][0]["files"].__setitem__(name, content)


BAD = [
    ("not an sgdgeom run archive", lambda d: d.__setitem__("format", "zip")),
    ("has version 2", lambda d: d.__setitem__("version", 2)),
    ("keys", lambda d: d.__setitem__("extra", 1)),
    ("finished runs only", lambda d: d["runs"][0]["row"].__setitem__("status", "failed")),
    ("is not its config's hash", lambda d: d["runs"][0]["row"]["config"].__setitem__("seed", 7)),
    ("not a folder name", lambda d: d["runs"][0]["row"].__setitem__("name", "../up")),
    ("row's columns", lambda d: d["runs"][0]["row"].__setitem__("run_dir", "/tmp/x")),
    ("attempts is not int", lambda d: d["runs"][0]["row"].__setitem__("attempts", [1])),
    ("created is not int or float", lambda d: d["runs"][0]["row"].__setitem__("created", True)),
    ("not among the archive's", lambda d: d["runs"][0]["row"].__setitem__("sweep", "other")),
    ("distinct epochs", lambda d: d["runs"][0]["epochs"].append(d["runs"][0]["epochs"][0])),
    (
        "share a name",
        lambda d: d["runs"][1]["row"].__setitem__("name", d["runs"][0]["row"]["name"]),
    ),
    ("lacks final.json", lambda d: d["runs"][0]["files"].pop("final.json")),
    ("not a plain relative path", set_file("../../evil.txt", {"text": "x"})),
    ("not a plain relative path", set_file("/tmp/evil.txt", {"text": "x"})),
    ("not a plain relative path", set_file(".hidden", {"text": "x"})),
    ("not a plain relative path", set_file("a//b", {"text": "x"})),
    ("not a plain relative path", set_file("checkpoint.pt", {"base64": ""})),
    ("not valid base64", set_file("x.npy", {"base64": "%%%"})),
    ("is not {'text'", set_file("x.npy", {"pickle": "..."})),
    (
        "both a file and a folder",
        lambda d: d["runs"][0]["files"].update(
            {"plots": {"text": "x"}, "plots/a.txt": {"text": "y"}}
        ),
    ),
]


@pytest.mark.parametrize(("message", "change"), BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_a_bad_archive_is_refused_before_anything_is_written(tmp_path, swept, message, change):
    target = tmp_path / "target"
    sweep_part(swept[0], target, "none_seed=0")
    before = snapshot(target)
    bad = tmp_path / "bad.json.xz"
    bad.write_bytes(
        lzma.compress(json.dumps(broken(archive_document(tmp_path, swept), change)).encode())
    )
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("{", r"\{")):
        merge_store(bad, target)
    assert snapshot(target) == before
    assert not (tmp_path / "evil.txt").exists()


def test_unreadable_archives_are_refused(tmp_path, swept):
    bad = tmp_path / "bad.json.xz"
    for content, message in (
        (b"plain text", "not xz-compressed"),
        (lzma.compress(b"{not json"), "not JSON"),
        (lzma.compress(b"[1, 2]"), "not an sgdgeom run archive"),
        (lzma.compress(b'{"format": "sgdgeom-run-archive"}'), "has version None"),
    ):
        bad.write_bytes(content)
        with pytest.raises(InputError, match=message):
            RunArchive.read(bad)
    # an archive's config is checked as a config is
    document = archive_document(tmp_path, swept)
    document["runs"][0]["row"]["config"]["optimizer"]["lr"] = "fast"
    bad.write_bytes(lzma.compress(json.dumps(document).encode()))
    with pytest.raises(ConfigError, match="lr"):
        RunArchive.read(bad)
    # a text file and a binary one come back as their bytes
    npy = base64.b64decode(document["runs"][0]["files"]["test_correct.npy"]["base64"])
    assert npy.startswith(b"\x93NUMPY")


def test_archive_command(tmp_path, swept):
    _, out, _ = swept
    proc = sgdgeom("archive", out, "--out", tmp_path / "new" / "runs.json.xz")
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "new" / "runs.json.xz").rename(tmp_path / "runs.json.xz")  # a folder made
    assert "archived 3 finished runs" in proc.stdout and "sgdgeom merge" in proc.stdout
    proc = sgdgeom("merge", tmp_path / "runs.json.xz", "--into", tmp_path / "here")
    assert proc.returncode == 0, proc.stderr
    assert "merged 3 finished runs" in proc.stdout
    assert (tmp_path / "here" / "report.html").is_file()
    other = json.loads(lzma.decompress((tmp_path / "runs.json.xz").read_bytes()))
    other["runs"][0]["row"]["final"]["best_test_acc"] = 0.5
    (tmp_path / "other.json.xz").write_bytes(lzma.compress(json.dumps(other).encode()))
    proc = sgdgeom("merge", tmp_path / "other.json.xz", "--into", tmp_path / "here")
    assert proc.returncode == 0, proc.stderr
    assert "1 of the runs finished in both differ" in proc.stdout
    assert f"  {other['runs'][0]['row']['name']}" in proc.stdout
    assert_one_line_error(
        sgdgeom("archive", tmp_path / "none", "--out", tmp_path / "x.xz"), "no result store"
    )
    (tmp_path / "bad.json.xz").write_bytes(b"junk")
    assert_one_line_error(
        sgdgeom("merge", tmp_path / "bad.json.xz", "--into", tmp_path / "y"), "not xz-compressed"
    )
    assert not (tmp_path / "y").exists()
