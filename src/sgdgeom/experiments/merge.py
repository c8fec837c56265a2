"""Merging the finished runs of one sweep directory, or of a run archive, into another.

A sweep run elsewhere (on a GPU machine lent for a while, on a second computer) fills a
store of its own. :func:`merge_store` brings its finished runs into another sweep
directory under the same config hashes (a hash depends on the config only, not on the
device or the folder), so that they join the runs made there: tables, plots and paired
comparisons then read one store. Each run brings its row, its epoch rows and its folder
``runs/NAME`` (``config.yaml``, ``metrics.jsonl``, ``final.json``, ``test_correct.npy``,
its checkpoint if one was kept). The source may also be a run archive
(:mod:`sgdgeom.experiments.archive`): the same runs, from a file that a new machine can
be handed, without their checkpoints.

- A run finished in both stores is kept as it is; where its final metrics differ between
  the two (the same config on another machine need not give the same digits), the
  summary names it.
- A run unfinished in the target (pending, running, interrupted, failed) is replaced,
  folder and rows, so that its stale checkpoint is never resumed.
- A run not finished in the source is left out.
- A folder that the target holds for another config, a source folder that is missing or
  holds a link, and a run name that is not a folder name are refused before anything is
  written.

The source is only read, and as bytes and JSON: no checkpoint is loaded. Nothing is
written outside the target directory, and nowhere through a link. The target's lock is
held throughout, so a sweep running there refuses to start (and a merge refuses while one
runs).
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from sgdgeom.errors import ConfigError, InputError
from sgdgeom.experiments.archive import RunArchive, Writer, run_folder_files
from sgdgeom.experiments.store import STORE, ResultStore, sweep_folder
from sgdgeom.files import refuse_links, safe_name

__all__ = ["MergeSource", "MergeSummary", "SweepFolder", "merge_store"]

_RUNS = "runs"


@dataclass
class MergeSummary:
    """The run names of a merge: ``merged`` (copied in), ``kept`` (already finished in the
    target), ``differing`` (those of ``kept`` whose final metrics, the device aside,
    differ from the source's) and ``unfinished`` (not finished in the source, left out)."""

    merged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)


class MergeSource(Protocol):
    """What a merge reads: finished rows, epoch rows, sweeps' figures, folder entries."""

    def runs(self) -> list[dict[str, Any]]: ...

    def epochs(self, run_hash: str) -> list[dict[str, Any]]: ...

    def sweeps(self) -> dict[str, list[dict[str, Any]]]: ...

    def files(self, name: str) -> list[tuple[PurePosixPath, Writer | None]]: ...


@dataclass
class SweepFolder:
    """A sweep directory as a merge's source: its store, read only, and its run folders."""

    path: Path
    store: ResultStore

    def runs(self) -> list[dict[str, Any]]:
        return self.store.runs()

    def epochs(self, run_hash: str) -> list[dict[str, Any]]:
        return self.store.epochs(run_hash)

    def sweeps(self) -> dict[str, list[dict[str, Any]]]:
        return self.store.sweeps()

    def files(self, name: str) -> list[tuple[PurePosixPath, Writer | None]]:
        """``runs/name``'s entries, checked to be plain files and folders (no link on the
        way) holding ``final.json``."""
        if safe_name(name) != name:
            raise InputError(f"{self.store.path}: run name {name!r} is not a folder name")
        return run_folder_files(
            refuse_links(self.path / _RUNS / name, self.path, "source run folder")
        )


def merge_store(source: str | Path, into: str | Path) -> MergeSummary:
    """Copy the finished runs of ``source`` (a sweep directory, its ``results.sqlite``, or
    a run archive written by :func:`~sgdgeom.experiments.archive.write_archive`) into the
    sweep directory ``into`` (created if missing); see the module's rules.

    Examples:
        >>> merge_store("nowhere", "anywhere")
        Traceback (most recent call last):
        ...
        sgdgeom.errors.SgdgeomError: no result store at nowhere/results.sqlite: nothing to merge ...
    """
    origin = _open_source(Path(source), Path(into))
    plots = origin.sweeps()
    target = Path(into)
    store = ResultStore(target / STORE)
    summary = MergeSummary()
    with store.exclusive():
        here = {row["hash"]: row for row in store.runs()}
        owners = {Path(row["run_dir"]).name: row["hash"] for row in here.values()}
        chosen: list[tuple[dict[str, Any], list[tuple[PurePosixPath, Writer | None]]]] = []
        for row in origin.runs():
            name = row["name"]
            if row["status"] != "finished":
                summary.unfinished.append(name)
                continue
            if here.get(row["hash"], {}).get("status") == "finished":
                summary.kept.append(name)
                if _results(here[row["hash"]]) != _results(row):
                    summary.differing.append(name)
                continue
            entries = origin.files(name)
            if owners.get(name, row["hash"]) != row["hash"]:
                raise ConfigError(
                    f"{target / _RUNS / name} holds a run of another config in {target / STORE};"
                    f" merge {source} into another folder"
                )
            if row["hash"] not in here and (target / _RUNS / name).exists():
                raise InputError(
                    f"{target / _RUNS / name} exists but no run of {target / STORE} owns it; "
                    f"move it away first"
                )
            chosen.append((row | {"run_dir": str(target / _RUNS / name)}, entries))
        if chosen:
            (target / _RUNS).mkdir(parents=True, exist_ok=True)
            refuse_links(target / _RUNS, target, "runs folder")
        for row, entries in chosen:
            _replace_folder(entries, refuse_links(row["run_dir"], target, "run folder"))
            store.adopt(row, origin.epochs(row["hash"]), plots.get(row["sweep"], []))
            summary.merged.append(row["name"])
    return summary


def _results(row: dict[str, Any]) -> dict[str, Any]:
    """A finished row's final metrics without the device they ran on."""
    return {k: v for k, v in row["final"].items() if k != "device"}


def _open_source(source: Path, target: Path) -> MergeSource:
    """A run archive where ``source`` is a file other than a store, else a sweep folder."""
    if source.is_file() and source.name != STORE:
        return RunArchive.read(source)
    source_dir = sweep_folder(source, f"nothing to merge (nor is {source} a run archive)")
    if target.exists() and target.resolve() == source_dir.resolve():
        raise InputError(f"{source_dir} is the target itself: merge into another folder")
    return SweepFolder(source_dir, ResultStore(source_dir / STORE, read_only=True))


def _replace_folder(entries: list[tuple[PurePosixPath, Writer | None]], target: Path) -> None:
    """Write a run folder's ``entries`` (folders first) to ``target``, replacing what is
    there: the copy is made beside it under a hidden name and renamed into place, so a
    crash leaves the old folder, the new one, or (between the two renames) both under
    hidden names beside it; the run's row is written after, so the next merge replaces
    whatever it finds."""
    staging = target.with_name(f".{target.name}.merging-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        for relative, write in entries:
            if write is None:
                (staging / relative).mkdir()
            else:
                write(staging / relative)
        if target.exists():
            replaced = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:12]}")
            target.rename(replaced)
            staging.rename(target)
            shutil.rmtree(replaced)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
