"""Run archives: the finished runs of a sweep in one small file that outlives the machine.

A sweep directory (its ``results.sqlite`` and run folders) lives on the machine that ran
it, and its checkpoints make it too large to commit. :func:`write_archive` packs its
finished runs into one xz-compressed JSON file: each run's store row, its epoch rows and
the files of its folder but the checkpoint (``config.yaml``, ``metrics.jsonl``,
``final.json``, ``test_correct.npy``, ...), byte for byte. ``sgdgeom merge ARCHIVE --into
DIR`` restores them on another machine (:class:`RunArchive` is the merge's source): a
sweep run there skips them as finished, and tables pair new runs with them image by image.

The file (version 1)::

    {"format": "sgdgeom-run-archive", "version": 1,
     "sweeps": {sweep: plots},
     "runs": [{"row": {column: value, ...},      # a store row but run_dir
               "epochs": [{"epoch": 1, ...}, ...],
               "files": {"final.json": {"text": "..."},
                         "test_correct.npy": {"base64": "..."}, ...}}, ...]}

An archive is input: it is read as JSON only, every row is checked to be a finished run
whose hash is its config's hash, and every file name to be a plain relative path.
"""

from __future__ import annotations

import base64
import binascii
import json
import lzma
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from sgdgeom.errors import InputError
from sgdgeom.experiments.config import config_hash, parse_config
from sgdgeom.experiments.store import RUN_COLUMNS, STORE, ResultStore, sweep_folder
from sgdgeom.files import atomic_write_bytes, safe_name
from sgdgeom.train import CHECKPOINT, FINAL

__all__ = ["ARCHIVE_LIMIT", "FORMAT", "RunArchive", "run_folder_files", "write_archive"]

FORMAT = "sgdgeom-run-archive"
VERSION = 1
ARCHIVE_LIMIT = 1 << 30
"""The most bytes an archive may hold uncompressed (1 GiB): a larger one is refused."""
_ROW_COLUMNS = RUN_COLUMNS - {"run_dir"}
"""A row's columns in an archive: the folder it names belongs to the machine that ran it."""

Writer = Callable[[Path], None]
"""Writes one file of a run folder to the path it is given."""


def run_folder_files(folder: Path) -> list[tuple[PurePosixPath, Writer | None]]:
    """The entries of a run folder to copy, folders before what they hold: ``(relative
    path, writer)``, writer None for a folder. Refused (:class:`InputError`): a link or
    anything but plain files and folders, a folder without ``final.json``."""
    if folder.is_symlink() or not folder.is_dir():
        raise InputError(f"{folder} is not a plain folder; only those are copied")
    if not (folder / FINAL).is_file():
        raise InputError(f"{folder} lacks {FINAL}, though its run is finished in the store")
    entries: list[tuple[PurePosixPath, Writer | None]] = []
    for path in sorted(folder.rglob("*")):  # a folder sorts before what it holds
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise InputError(f"{path} is not a plain file or folder; only those are copied")
        relative = PurePosixPath(path.relative_to(folder).as_posix())
        entries.append((relative, None if path.is_dir() else partial(_copy, path)))
    return entries


@dataclass
class RunArchive:
    """The finished runs of an archive file, checked; read with :meth:`read`. It answers
    what :func:`~sgdgeom.experiments.merge.merge_store` asks of a source: :meth:`runs`,
    :meth:`epochs`, :meth:`sweeps` and :meth:`files`."""

    path: Path
    _sweeps: dict[str, list[dict[str, Any]]]
    _runs: list[dict[str, Any]]

    @classmethod
    def read(cls, path: str | Path) -> RunArchive:
        """Read and check the archive at ``path``; an :class:`InputError` names what is
        wrong (not xz, not JSON, another format, a row, an epoch or a file name).

        Examples:
            >>> import tempfile, os
            >>> bad = os.path.join(tempfile.mkdtemp(), "runs.json.xz")
            >>> _ = open(bad, "wb").write(b"not xz")
            >>> RunArchive.read(bad)
            Traceback (most recent call last):
            ...
            sgdgeom.errors.InputError: run archive .../runs.json.xz is not xz-compressed ...
        """
        path = Path(path)
        data = _json_document(path)
        where = f"run archive {path}"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"{where} is not an sgdgeom run archive (no format {FORMAT!r})")
        if data.get("version") != VERSION:
            raise InputError(
                f"{where} has version {data.get('version')!r}; this sgdgeom reads version {VERSION}"
            )
        if set(data) != {"format", "version", "sweeps", "runs"}:
            raise InputError(
                f"{where}: keys {sorted(data)}, expected format, version, sweeps, runs"
            )
        sweeps, runs = data["sweeps"], data["runs"]
        if not isinstance(sweeps, dict) or not all(
            isinstance(p, list) and all(isinstance(f, dict) for f in p) for p in sweeps.values()
        ):
            raise InputError(f"{where}: sweeps is not a mapping of sweep names to figures")
        if not isinstance(runs, list):
            raise InputError(f"{where}: runs is not a list")
        checked = [
            _checked_run(run, f"{where}: run {i}", set(sweeps)) for i, run in enumerate(runs)
        ]
        hashes = [run["row"]["hash"] for run in checked]
        names = [run["row"]["name"] for run in checked]
        for what, values in (("hash", hashes), ("name", names)):
            if len(set(values)) != len(values):
                raise InputError(f"{where}: two runs share a {what}")
        return cls(path, sweeps, checked)

    def runs(self) -> list[dict[str, Any]]:
        """The run rows (all finished), without ``run_dir``."""
        return [dict(run["row"]) for run in self._runs]

    def epochs(self, run_hash: str) -> list[dict[str, Any]]:
        """One run's epoch rows."""
        return next(run["epochs"] for run in self._runs if run["row"]["hash"] == run_hash)

    def sweeps(self) -> dict[str, list[dict[str, Any]]]:
        """The sweeps of the runs, each with the figures it asks for."""
        return dict(self._sweeps)

    def files(self, name: str) -> list[tuple[PurePosixPath, Writer | None]]:
        """The entries of run ``name``'s folder as :func:`run_folder_files` gives them."""
        files = next(run["files"] for run in self._runs if run["row"]["name"] == name)
        entries: dict[PurePosixPath, Writer | None] = {}
        for relative, content in sorted(files.items()):
            path = PurePosixPath(relative)
            for parent in reversed(path.parents[:-1]):
                entries.setdefault(parent, None)
            entries[path] = partial(_write, content)
        return sorted(entries.items())


def write_archive(source: str | Path, out: str | Path) -> list[str]:
    """Write the finished runs of the sweep directory ``source`` (or its
    ``results.sqlite``) to the archive file ``out`` (xz-compressed JSON, written
    atomically); the names of the runs archived. The checkpoint and hidden files are left
    out; a link in a run folder is refused.

    Examples:
        >>> write_archive("nowhere", "runs.json.xz")
        Traceback (most recent call last):
        ...
        sgdgeom.errors.SgdgeomError: no result store at nowhere/results.sqlite: nothing to archive
    """
    source_dir = sweep_folder(source, "nothing to archive")
    store = ResultStore(source_dir / STORE, read_only=True)
    runs: list[dict[str, Any]] = []
    for row in store.runs():
        if row["status"] != "finished":
            continue
        folder = source_dir / "runs" / row["name"]
        files = {}
        for relative, writer in run_folder_files(folder):
            hidden = any(part.startswith(".") for part in relative.parts)
            if writer is None or hidden or relative == PurePosixPath(CHECKPOINT):
                continue
            files[str(relative)] = _encode((folder / relative).read_bytes())
        runs.append(
            {
                "row": {c: row[c] for c in sorted(_ROW_COLUMNS)},
                "epochs": store.epochs(row["hash"]),
                "files": files,
            }
        )
    used = {run["row"]["sweep"] for run in runs}
    document = {
        "format": FORMAT,
        "version": VERSION,
        "sweeps": {name: plots for name, plots in store.sweeps().items() if name in used},
        "runs": runs,
    }
    text = json.dumps(document, separators=(",", ":")).encode()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, lzma.compress(text))
    return [run["row"]["name"] for run in runs]


def _copy(source: Path, dest: Path) -> None:
    shutil.copyfile(source, dest)


def _write(data: bytes, dest: Path) -> None:
    dest.write_bytes(data)


def _encode(data: bytes) -> dict[str, str]:
    """A file's bytes as JSON: ``{"text": ...}`` where they are UTF-8, else base64."""
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def _json_document(path: Path) -> Any:
    """The JSON document xz-compressed in ``path``, at most :data:`ARCHIVE_LIMIT` bytes
    uncompressed."""
    where = f"run archive {path}"
    if not path.is_file():
        raise InputError(f"{where} does not exist (or is not a regular file)")
    try:
        with lzma.open(path, "rb") as handle:
            raw = handle.read(ARCHIVE_LIMIT + 1)
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise InputError(
            f"{where} is not xz-compressed (write one with sgdgeom archive): {err}"
        ) from None
    if len(raw) > ARCHIVE_LIMIT:
        raise InputError(f"{where} holds more than {ARCHIVE_LIMIT} bytes uncompressed")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise InputError(f"{where} is not JSON: {err}") from None


def _checked_run(run: Any, where: str, sweeps: set[str]) -> dict[str, Any]:
    """One archived run, checked; its files decoded to bytes."""
    if not isinstance(run, dict) or set(run) != {"row", "epochs", "files"}:
        raise InputError(f"{where} is not an object with row, epochs and files")
    row, epochs, files = run["row"], run["epochs"], run["files"]
    if not isinstance(row, dict) or set(row) != _ROW_COLUMNS:
        raise InputError(f"{where}: row's columns are not {sorted(_ROW_COLUMNS)}")
    kinds: dict[str, tuple[type, ...]] = {
        "hash": (str,),
        "sweep": (str,),
        "name": (str,),
        "status": (str,),
        "labels": (dict,),
        "config": (dict,),
        "final": (dict,),
        "created": (int, float),
        "started": (int, float, type(None)),
        "finished": (int, float, type(None)),
        "attempts": (int,),
        "resumed_from": (int, type(None)),
        "error": (str, type(None)),
    }
    for column, kind in kinds.items():
        if not isinstance(row[column], kind) or isinstance(row[column], bool):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kind)
            raise InputError(f"{where}: {column} is not {names}")
    where = f"{where} ({row['name']!r})"
    if row["status"] != "finished":
        raise InputError(f"{where} is {row['status']}; an archive holds finished runs only")
    if row["sweep"] not in sweeps:
        raise InputError(f"{where}: its sweep {row['sweep']!r} is not among the archive's")
    if safe_name(row["name"]) != row["name"]:
        raise InputError(f"{where}: the run name is not a folder name")
    if config_hash(parse_config(row["config"], source=where)) != row["hash"]:
        raise InputError(f"{where}: hash {row['hash']!r} is not its config's hash")
    if (
        not isinstance(epochs, list)
        or not all(isinstance(e, dict) and isinstance(e.get("epoch"), int) for e in epochs)
        or len({e["epoch"] for e in epochs}) != len(epochs)
    ):
        raise InputError(f"{where}: epochs is not a list of metrics with distinct epochs")
    if not isinstance(files, dict) or FINAL not in files:
        raise InputError(f"{where}: files lacks {FINAL}")
    decoded = {}
    for name, content in files.items():
        path = PurePosixPath(name)
        plain = str(path) == name and all(safe_name(part) == part for part in path.parts)
        if not plain or name == CHECKPOINT:
            raise InputError(f"{where}: file {name!r} is not a plain relative path")
        decoded[name] = _decoded(content, f"{where}: file {name!r}")
    folders = {str(parent) for name in decoded for parent in PurePosixPath(name).parents}
    if clash := sorted(folders & set(decoded)):
        raise InputError(f"{where}: {clash[0]!r} is both a file and a folder")
    return {"row": row, "epochs": epochs, "files": decoded}


def _decoded(content: Any, where: str) -> bytes:
    if isinstance(content, dict) and set(content) == {"text"} and isinstance(content["text"], str):
        return content["text"].encode("utf-8")
    if (
        isinstance(content, dict)
        and set(content) == {"base64"}
        and isinstance(content["base64"], str)
    ):
        try:
            return base64.b64decode(content["base64"], validate=True)
        except binascii.Error:
            raise InputError(f"{where} is not valid base64") from None
    raise InputError(f"{where} is not {{'text': ...}} or {{'base64': ...}}")
