"""Merging the finished runs of one sweep directory into another.

A sweep run elsewhere (on a GPU machine lent for a while, on a second computer) fills a
store of its own. :func:`merge_store` brings its finished runs into another sweep
directory under the same config hashes (a hash depends on the config only, not on the
device or the folder), so that they join the runs made there: tables, plots and paired
comparisons then read one store. Each run brings its row, its epoch rows and its folder
``runs/NAME`` (``config.yaml``, ``metrics.jsonl``, ``final.json``, ``test_correct.npy``,
its checkpoint if one was kept).

- A run finished in both stores is kept as it is.
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
from pathlib import Path
from typing import Any

from sgdgeom.errors import ConfigError, InputError, SgdgeomError
from sgdgeom.experiments.store import STORE, ResultStore
from sgdgeom.files import refuse_links, safe_name

__all__ = ["MergeSummary", "merge_store"]

_RUNS = "runs"


@dataclass
class MergeSummary:
    """The run names of a merge: ``merged`` (copied in), ``kept`` (already finished in the
    target) and ``unfinished`` (not finished in the source, left out)."""

    merged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)


def merge_store(source: str | Path, into: str | Path) -> MergeSummary:
    """Copy the finished runs of the sweep directory ``source`` (or its ``results.sqlite``)
    into the sweep directory ``into`` (created if missing); see the module's rules.

    Examples:
        >>> merge_store("nowhere", "anywhere")
        Traceback (most recent call last):
        ...
        sgdgeom.errors.SgdgeomError: no result store at nowhere/results.sqlite: nothing to merge
    """
    source = Path(source)
    source_dir = source.parent if source.name == STORE else source
    if not (source_dir / STORE).is_file():
        raise SgdgeomError(f"no result store at {source_dir / STORE}: nothing to merge")
    target = Path(into)
    if target.exists() and target.resolve() == source_dir.resolve():
        raise InputError(f"{source_dir} is the target itself: merge into another folder")
    origin = ResultStore(source_dir / STORE, read_only=True)
    plots = origin.sweeps()
    store = ResultStore(target / STORE)
    summary = MergeSummary()
    with store.exclusive():
        here = {row["hash"]: row for row in store.runs()}
        owners = {Path(row["run_dir"]).name: row["hash"] for row in here.values()}
        chosen: list[tuple[dict[str, Any], Path]] = []
        for row in origin.runs():
            name = row["name"]
            if row["status"] != "finished":
                summary.unfinished.append(name)
                continue
            if here.get(row["hash"], {}).get("status") == "finished":
                summary.kept.append(name)
                continue
            folder = _checked_source_folder(source_dir, name)
            if owners.get(name, row["hash"]) != row["hash"]:
                raise ConfigError(
                    f"{target / _RUNS / name} holds a run of another config in {target / STORE};"
                    f" merge {source_dir} into another folder"
                )
            if row["hash"] not in here and (target / _RUNS / name).exists():
                raise InputError(
                    f"{target / _RUNS / name} exists but no run of {target / STORE} owns it; "
                    f"move it away first"
                )
            chosen.append((row | {"run_dir": str(target / _RUNS / name)}, folder))
        if chosen:
            (target / _RUNS).mkdir(parents=True, exist_ok=True)
            refuse_links(target / _RUNS, target, "runs folder")
        for row, folder in chosen:
            _replace_folder(folder, refuse_links(row["run_dir"], target, "run folder"))
            store.adopt(row, origin.epochs(row["hash"]), plots.get(row["sweep"], []))
            summary.merged.append(row["name"])
    return summary


def _checked_source_folder(source_dir: Path, name: str) -> Path:
    """``source_dir/runs/name``, checked to be a plain folder of plain files and folders
    holding the run's ``final.json``."""
    if safe_name(name) != name:
        raise InputError(f"{source_dir / STORE}: run name {name!r} is not a folder name")
    folder = source_dir / _RUNS / name
    refuse_links(folder, source_dir, "source run folder")
    if not (folder / "final.json").is_file():
        raise InputError(f"{folder} lacks final.json, though its run is finished in the store")
    for path in folder.rglob("*"):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise InputError(f"{path} is not a plain file or folder; only those are copied")
    return folder


def _replace_folder(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target``, replacing what is there: the copy is made beside it
    under a hidden name and renamed into place, so a crash leaves the old folder, the new
    one, or (between the two renames) both under hidden names beside it; the run's row
    is written after, so the next merge replaces whatever it finds."""
    staging = target.with_name(f".{target.name}.merging-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        for path in sorted(source.rglob("*")):  # a folder sorts before what it holds
            copy = staging / path.relative_to(source)
            if path.is_dir():
                copy.mkdir()
            else:
                shutil.copyfile(path, copy)
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
