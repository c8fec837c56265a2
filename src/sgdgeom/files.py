"""Files: safe names, exclusive atomic writes, JSON lines and checkpoints, read and written
here and nowhere else. Files are input: a checkpoint is loaded so that it runs no code.

Everything sgdgeom writes goes through :func:`atomic_write_bytes` (or :func:`save_figure`,
which renders into memory first): the bytes go to a temporary file created exclusively,
with a random name, in the target's folder, and then replace the target in one rename. A
planted link is never followed, and a crash leaves either the old file or the new one.

Names that come from configs (an experiment's, a sweep's, a variant's) become one path
component through :func:`safe_name`, so no name writes outside the output folder. Every
checkpoint is read by :func:`load_checkpoint` with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sgdgeom.errors import CheckpointError, InputError

__all__ = [
    "NAME_LIMIT",
    "atomic_write_bytes",
    "inside",
    "load_checkpoint",
    "read_json",
    "read_jsonl",
    "refuse_links",
    "safe_name",
    "safe_names",
    "save_checkpoint",
    "save_figure",
    "write_jsonl",
]

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once, at import: the process's umask, for the files written

NAME_LIMIT = 96
"""The longest path component :func:`safe_name` makes (file systems allow 255 bytes)."""


def safe_name(name: str, limit: int = NAME_LIMIT) -> str:
    """``name`` as one harmless path component.

    Characters other than letters, digits and ``_ . = + -`` become ``-``; leading dots go,
    so that ``..`` and hidden names cannot arise; a name longer than ``limit`` keeps its
    start and ends with a hash of the whole. Distinct names may map to one component;
    callers that need uniqueness check it.

    Examples:
        >>> safe_name("../../x"), safe_name("/tmp/a b"), safe_name("fc1+fc2_R=0.1")
        ('--..-x', '-tmp-a-b', 'fc1+fc2_R=0.1')
        >>> len(safe_name("v" * 300))
        96
    """
    cleaned = re.sub(r"[^A-Za-z0-9_.=+-]", "-", name)
    cleaned = "-" + cleaned.lstrip(".") if cleaned.startswith(".") else cleaned
    cleaned = cleaned or "-"
    if len(cleaned) > limit:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        cleaned = f"{cleaned[: limit - 17]}-{digest}"
    return cleaned


def safe_names(names: Iterable[str], what: str = "names") -> dict[str, str]:
    """Each name's :func:`safe_name`, or an :class:`InputError` if two of them share one.

    Examples:
        >>> safe_names(["a b", "a-b"], "variants")
        Traceback (most recent call last):
        ...
        sgdgeom.errors.InputError: variants 'a b' and 'a-b' both become the folder 'a-b'; rename one
    """
    folders: dict[str, str] = {}
    owner: dict[str, str] = {}
    for name in names:
        folder = safe_name(name)
        if folder in owner and owner[folder] != name:
            raise InputError(
                f"{what} {owner[folder]!r} and {name!r} both become the folder {folder!r}; "
                f"rename one"
            )
        owner[folder] = name
        folders[name] = folder
    return folders


def inside(path: str | Path, root: str | Path, what: str = "file") -> Path:
    """``path`` resolved (links followed), or an :class:`InputError` if it leaves ``root``."""
    resolved = Path(root, path).resolve()
    if not resolved.is_relative_to(Path(root).resolve()):
        raise InputError(f"{what} {path} lies outside {root}; only files inside it are read")
    return resolved


def refuse_links(path: str | Path, root: str | Path, what: str = "folder") -> Path:
    """``path`` itself, or an :class:`InputError` if it or a folder between ``root`` and it
    is a symbolic link (writing through it would write outside ``root``)."""
    path, root = Path(path), Path(root)
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            raise InputError(
                f"{what} {current} is a symbolic link; sgdgeom writes only inside {root}, "
                f"never through a link: remove it"
            )
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file.

    The temporary file is created exclusively under a random name beside ``path``, so a
    file or link planted there is never opened; the final rename replaces a link at
    ``path`` itself, never its target.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; give the mode open() would give
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Render a matplotlib figure in memory, in the format of ``path``'s suffix, and write it
    with :func:`atomic_write_bytes`."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _finite_or_null(record: dict[str, Any]) -> dict[str, Any]:
    """A record for JSON: NaN and infinities (not JSON) become null."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write ``records`` as JSON lines, atomically (a NaN or infinity is written as null)."""
    text = "".join(json.dumps(_finite_or_null(r)) + "\n" for r in records)
    atomic_write_bytes(path, text.encode())


def _text(path: Path, what: str) -> str:
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist (or is not a regular file)")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{what} {path} cannot be read as text: {err}") from None


def read_json(path: str | Path, what: str = "file") -> dict[str, Any]:
    """A JSON file holding one object, or an :class:`InputError` naming it (missing, not a
    regular file, not JSON, nested beyond the parser, not an object)."""
    path = Path(path)
    try:
        value = json.loads(_text(path, what))
    except (ValueError, RecursionError):
        raise InputError(f"{what} {path} is not valid JSON") from None
    if not isinstance(value, dict):
        raise InputError(f"{what} {path} holds a {type(value).__name__}, not a JSON object")
    return value


def read_jsonl(path: str | Path, what: str = "metrics file") -> list[dict[str, Any]]:
    """Every record of a JSON-lines file, each a JSON object; a torn last line (a write cut
    short by a kill) is skipped, any other bad line is an :class:`InputError`."""
    path = Path(path)
    lines = _text(path, what).splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            if number == len(lines):
                continue
            raise InputError(f"{what} {path}: line {number} is not valid JSON") from None
        if not isinstance(record, dict):
            raise InputError(f"{what} {path}: line {number} is not a JSON object")
        records.append(record)
    return records


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write a checkpoint (tensors and plain data, as :func:`load_checkpoint` reads it),
    atomically: a crash leaves the previous checkpoint whole."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint's content, read with ``torch.load(weights_only=True)``: tensors and
    plain containers only, so a file carrying pickled code is refused, never run.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or holds other objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"unsupported GLOBAL (\S+)", str(err))
        if unsafe is None:
            raise CheckpointError(
                f"{path} is not a checkpoint, or is corrupt (it does not unpickle as tensors "
                f"and plain data); restore it or start the run again"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain data (the global "
            f"{unsafe.group(1)}), and sgdgeom loads checkpoints with weights_only=True, so it "
            f"was not loaded"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, IndexError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no detail'}); "
            f"restore it or start the run again"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state
