"""Merging a sweep directory made elsewhere into another: the merged store equals the one
a single sweep writes, unfinished runs there are replaced, and bad input changes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sgdgeom.errors import ConfigError, InputError, SgdgeomError
from sgdgeom.experiments.merge import merge_store
from sgdgeom.experiments.store import STORE, ResultStore
from sgdgeom.experiments.sweep import load_sweep, run_sweep, select_runs
from tests.test_cli import assert_one_line_error, sgdgeom
from tests.test_sweep import SMALL, store_content, sweep_file


def sweep_part(path: Path, out: Path, *only: str) -> None:
    sweep = load_sweep(path, out)
    run_sweep(select_runs(sweep, list(only)), out, threads=1, progress=False)


def folder_bytes(out: Path) -> dict[tuple[str, str], bytes]:
    """Every file of every run folder, by (run, file)."""
    return {
        (run.name, str(path.relative_to(run))): path.read_bytes()
        for run in sorted((out / "runs").iterdir())
        for path in sorted(run.rglob("*"))
        if path.is_file()
    }


def snapshot(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.startswith(STORE)
    } | {"store": repr(store_content(ResultStore(out / STORE))).encode()}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """SMALL run as one sweep: what a merge must reproduce."""
    root = tmp_path_factory.mktemp("whole")
    path = sweep_file(root, SMALL)
    run_sweep(load_sweep(path, root / "out"), root / "out", threads=1, progress=False)
    return path, root / "out"


def test_a_merged_store_is_the_store_of_one_sweep(tmp_path, whole):
    path, reference = whole
    elsewhere, here = tmp_path / "gpu", tmp_path / "here"
    sweep_part(path, elsewhere, "pla_*")
    sweep_part(path, here, "none_*")
    # one pla run was started here and interrupted, leaving a stale checkpoint
    sweep = load_sweep(path, here)
    stale = sweep.runs[2]
    assert stale.name.startswith("pla_")
    plots = [plot.model_dump() for plot in sweep.plots]
    ResultStore(here / STORE).register("small", [stale.as_row()], plots)
    ResultStore(here / STORE).start(stale.hash, resumed_from=0)
    ResultStore(here / STORE).interrupt([stale.hash])
    Path(stale.run_dir).mkdir(parents=True)
    (Path(stale.run_dir) / "checkpoint.pt").write_bytes(b"stale")
    (elsewhere / "runs" / stale.name / "checkpoint.pt").unlink()  # packed without it
    elsewhere_rows = {r["hash"]: r for r in ResultStore(elsewhere / STORE).runs()}
    kept_here = {k: v for k, v in folder_bytes(here).items() if k[0].startswith("none_")}

    summary = merge_store(elsewhere, here)
    assert sorted(summary.merged) == sorted(r["name"] for r in elsewhere_rows.values())
    assert summary.kept == [] and summary.unfinished == []
    store = ResultStore(here / STORE)
    assert store_content(store) == store_content(ResultStore(reference / STORE))
    # the folders: those made here as they were, the others byte for byte as made elsewhere,
    # the stale checkpoint gone with the folder it was in
    assert folder_bytes(here) == kept_here | folder_bytes(elsewhere)
    assert {run for run, _ in folder_bytes(here)} == {run for run, _ in folder_bytes(reference)}
    assert not (Path(stale.run_dir) / "checkpoint.pt").exists()
    assert not [p for p in (here / "runs").iterdir() if p.name.startswith(".")]
    for row in store.runs():  # rows point into this folder; the timestamps came along
        assert Path(row["run_dir"]) == here / "runs" / row["name"]
        if row["hash"] in elsewhere_rows:
            assert row["finished"] == elsewhere_rows[row["hash"]]["finished"]
    assert store.sweeps() == ResultStore(reference / STORE).sweeps()

    # a sweep run there now has nothing left to do; a second merge keeps everything
    stamps = {r["hash"]: r["finished"] for r in store.runs()}
    run_sweep(load_sweep(path, here), here, threads=1, progress=False)
    assert {r["hash"]: r["finished"] for r in store.runs()} == stamps
    before = snapshot(here)
    again = merge_store(elsewhere / STORE, here)
    assert again.merged == [] and sorted(again.kept) == sorted(summary.merged)
    assert again.differing == []
    assert snapshot(here) == before


def test_unfinished_runs_stay_behind_and_a_new_folder_is_made(tmp_path, whole):
    path, _ = whole
    source = tmp_path / "source"
    sweep_part(path, source, "none_seed=0")
    pending = load_sweep(path, source).runs[1]
    ResultStore(source / STORE).register("small", [pending.as_row()])
    summary = merge_store(source, tmp_path / "new")
    assert summary.merged == ["none_seed=0"] and summary.unfinished == [pending.name]
    assert [r["name"] for r in ResultStore(tmp_path / "new" / STORE).runs()] == ["none_seed=0"]
    assert not (tmp_path / "new" / "runs" / pending.name).exists()


def test_bad_merges_are_refused_before_anything_is_written(tmp_path, whole):
    path, reference = whole
    source = tmp_path / "source"
    sweep_part(path, source, "none_*")

    other = tmp_path / "other"  # the same folder names, another config (a shorter sweep)
    shorter = {**SMALL, "base": {**SMALL["base"], "train": {"epochs": 1, "device": "cpu"}}}
    sweep_part(sweep_file(tmp_path, shorter, "shorter.yaml"), other, "none_seed=0")
    before = snapshot(other)
    with pytest.raises(ConfigError, match="holds a run of another config"):
        merge_store(source, other)
    assert snapshot(other) == before

    stray = tmp_path / "stray"
    (stray / "runs" / "none_seed=1").mkdir(parents=True)
    (stray / "runs" / "none_seed=1" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="no run of .* owns it"):
        merge_store(source, stray)
    assert (stray / "runs" / "none_seed=1" / "notes.txt").read_text() == "mine"
    assert ResultStore(stray / STORE).runs() == []

    os.symlink(tmp_path / "elsewhere", source / "runs" / "none_seed=1" / "link")
    with pytest.raises(InputError, match="not a plain file"):
        merge_store(source, tmp_path / "fresh")
    (source / "runs" / "none_seed=1" / "link").unlink()
    (source / "runs" / "none_seed=1" / "final.json").unlink()
    with pytest.raises(InputError, match="lacks final.json"):
        merge_store(source, tmp_path / "fresh")
    assert ResultStore(tmp_path / "fresh" / STORE).runs() == []
    with pytest.raises(InputError, match="is the target itself"):
        merge_store(source, source)
    with pytest.raises(SgdgeomError, match="no result store"):
        merge_store(tmp_path / "nowhere", reference)


def test_merge_command(tmp_path, whole):
    path, _ = whole
    sweep_part(path, tmp_path / "gpu", "pla_R=0.1_*")
    proc = sgdgeom("merge", tmp_path / "gpu", "--into", tmp_path / "here")
    assert proc.returncode == 0, proc.stderr
    assert "merged 2 finished runs" in proc.stdout and "pla_R=0.1_seed=1" in proc.stdout
    assert (tmp_path / "here" / "report.html").is_file()
    assert_one_line_error(sgdgeom("merge", tmp_path / "none", "--into", tmp_path), "no result")
