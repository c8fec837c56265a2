"""The result store: one SQLite file (the standard library's ``sqlite3``) per sweep directory.

Tables:

- ``sweeps``: one row per sweep, with the figures it asks for.
- ``runs``: one row per run, keyed by its config hash — the sweep, the run's name and
  labels (the grid values that define it), the config, the status (``pending``,
  ``running``, ``finished``, ``failed``, ``interrupted``), timestamps, the number of
  attempts, the epoch a resumed attempt started from, the final and best metrics, and the
  error of a failed run.
- ``epochs``: one row per (run, epoch) with that epoch's metrics.

Writes are single transactions (``BEGIN IMMEDIATE``) in WAL mode with a long busy
timeout, so several worker processes may write at once. An epoch row is keyed by
(run, epoch): a resumed run that repeats an epoch replaces its row, and the rows of
epochs after the resumed checkpoint are dropped when the attempt starts, so nothing is
duplicated. Plots and reports read the store only.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sgdgeom.errors import ConfigError, SgdgeomError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a second sweep is not refused there
    fcntl = None  # type: ignore[assignment]

__all__ = ["RUN_COLUMNS", "STORE", "ResultStore", "sweep_folder"]

STORE = "results.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    name TEXT PRIMARY KEY,
    plots TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    hash TEXT PRIMARY KEY,
    sweep TEXT NOT NULL,
    name TEXT NOT NULL,
    labels TEXT NOT NULL,
    config TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    resumed_from INTEGER,
    final TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS epochs (
    hash TEXT NOT NULL REFERENCES runs(hash),
    epoch INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (hash, epoch)
);
"""

_JSON_COLUMNS = ("labels", "config", "final")
RUN_COLUMNS = frozenset(
    {
        "hash",
        "sweep",
        "name",
        "labels",
        "config",
        "run_dir",
        "status",
        "created",
        "started",
        "finished",
        "attempts",
        "resumed_from",
        "final",
        "error",
    }
)
"""The columns of a run's row."""
_COLUMNS = {
    "sweeps": {"name", "plots"},
    "runs": set(RUN_COLUMNS),
    "epochs": {"hash", "epoch", "metrics"},
}
STATUSES = ("pending", "running", "finished", "failed", "interrupted")


def sweep_folder(source: str | Path, purpose: str) -> Path:
    """The sweep directory that ``source`` names (the directory or its ``results.sqlite``),
    or an :class:`SgdgeomError` saying there is no store there, ``purpose`` ("nothing to
    merge") appended."""
    source = Path(source)
    folder = source.parent if source.name == STORE else source
    if not (folder / STORE).is_file():
        raise SgdgeomError(f"no result store at {folder / STORE}: {purpose}")
    return folder


class ResultStore:
    """A SQLite result store at ``path`` (created with its tables if missing).

    The object holds only the path; each call opens its own connection, so a store can be
    handed to worker processes.

    Examples:
        >>> import tempfile, os
        >>> store = ResultStore(os.path.join(tempfile.mkdtemp(), "results.sqlite"))
        >>> store.register("demo", [{"hash": "h1", "name": "a", "labels": {"seed": 0},
        ...                           "config": {}, "run_dir": "runs/a"}])
        >>> store.start("h1", resumed_from=0)
        >>> store.record_epoch("h1", {"epoch": 1, "test_acc": 0.5})
        >>> store.finish("h1", {"final_test_acc": 0.5})
        >>> [(r["name"], r["status"]) for r in store.runs("demo")]
        [('a', 'finished')]
        >>> store.epochs("h1")
        [{'epoch': 1, 'test_acc': 0.5}]
    """

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        try:
            if not read_only:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self._connect() as db:
                    db.executescript(_SCHEMA)
            with self._connect() as db:
                self._check_schema(db)
        except sqlite3.DatabaseError as err:
            raise self._unusable(err) from None

    def _unusable(self, problem: object) -> SgdgeomError:
        return SgdgeomError(f"{self.path} is not a usable result store: {problem}")

    def _check_schema(self, db: sqlite3.Connection) -> None:
        """Every table is a table with the columns this version reads (an older store, or
        a view in a table's place, is refused here rather than failing in a query)."""
        kinds = dict(db.execute("SELECT name, type FROM sqlite_master").fetchall())
        for table, columns in _COLUMNS.items():
            if kinds.get(table) != "table":
                raise self._unusable(f"{table} is not a table (it is {kinds.get(table, 'absent')})")
            have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            missing = sorted(columns - have)
            if missing:
                raise self._unusable(
                    f"table {table} lacks {', '.join(missing)} (an older sgdgeom wrote it? "
                    f"run the sweep into a new --out)"
                )

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the store's lock file (``results.sqlite.lock``) while a sweep runs: a second
        sweep on the same store is refused with a message instead of training every run
        twice. The lock goes with its process, so a killed sweep leaves none behind."""
        lock = self.path.with_name(f"{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise SgdgeomError(
                        f"another sweep (pid {holder}) is running on {self.path.parent}; wait "
                        f"for it to end, or choose another --out"
                    ) from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection (read-only: opened with ``mode=ro``, nothing written, not even the
        journal mode); an SQLite error inside becomes a one-line :class:`SgdgeomError`."""
        try:
            if self.read_only:  # no writer (no -wal file): immutable, so no -shm is made
                writer = self.path.with_name(f"{self.path.name}-wal").exists()
                query = "mode=ro" if writer else "mode=ro&immutable=1"
                db = sqlite3.connect(f"{self.path.resolve().as_uri()}?{query}", uri=True)
            else:
                db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        except sqlite3.DatabaseError as err:
            raise self._unusable(err) from None
        try:
            if not self.read_only:
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=120000")
            yield db
        except sqlite3.DatabaseError as err:
            if "full" not in str(err):
                raise self._unusable(err) from None
            raise SgdgeomError(
                f"the result store {self.path} failed: {err}; free some space, then run the "
                f"sweep again to resume it"
            ) from None
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ------------------------------------------------------------------ writes

    def register(
        self, sweep: str, runs: Sequence[dict[str, Any]], plots: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Add runs (``hash``, ``name``, ``labels``, ``config``, ``run_dir``) as pending;
        runs already in the store keep their rows. ``plots`` are the sweep's figures.

        A run whose folder already holds a run of another config (an edited sweep run
        again into the same folder) is refused: its checkpoint and files would be taken
        for the other run's.
        """
        now = time.time()
        with self._transaction() as db:
            held = dict(db.execute("SELECT run_dir, hash FROM runs").fetchall())
            for run in runs:
                other = held.get(str(run["run_dir"]))
                if other is not None and other != run["hash"]:
                    raise ConfigError(
                        f"{run['run_dir']} already holds a run of another config in "
                        f"{self.path} (was the sweep edited, or run with --set?); run it "
                        f"into another --out"
                    )
            db.execute(
                "INSERT OR REPLACE INTO sweeps (name, plots) VALUES (?, ?)",
                (sweep, json.dumps(list(plots))),
            )
            db.executemany(
                "INSERT OR IGNORE INTO runs (hash, sweep, name, labels, config, run_dir, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        run["hash"],
                        sweep,
                        run["name"],
                        json.dumps(run["labels"]),
                        json.dumps(run["config"]),
                        str(run["run_dir"]),
                        now,
                    )
                    for run in runs
                ],
            )

    def start(self, run_hash: str, resumed_from: int) -> None:
        """Mark an attempt as running from epoch ``resumed_from`` (0 = from scratch) and drop
        the epoch rows after it: they were never confirmed by a checkpoint."""
        with self._transaction() as db:
            db.execute(
                "UPDATE runs SET status='running', started=?, attempts=attempts+1, "
                "resumed_from=?, error=NULL WHERE hash=?",
                (time.time(), resumed_from, run_hash),
            )
            db.execute("DELETE FROM epochs WHERE hash=? AND epoch>?", (run_hash, resumed_from))

    def record_epoch(self, run_hash: str, metrics: dict[str, Any]) -> None:
        """Store one epoch's metrics (its ``epoch`` key numbers the row)."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO epochs (hash, epoch, metrics) VALUES (?, ?, ?)",
                (run_hash, int(metrics["epoch"]), json.dumps(metrics)),
            )

    def finish(self, run_hash: str, final: dict[str, Any]) -> None:
        """Mark a run finished with its final and best metrics."""
        with self._transaction() as db:
            db.execute(
                "UPDATE runs SET status='finished', finished=?, final=? WHERE hash=?",
                (time.time(), json.dumps(final), run_hash),
            )

    def fail(self, run_hash: str, error: str) -> None:
        """Mark a run failed with a one-line reason (it is tried again on the next run)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE runs SET status='failed', finished=?, error=? WHERE hash=?",
                (time.time(), error, run_hash),
            )

    def interrupt(self, run_hashes: Sequence[str]) -> None:
        """Mark those of the runs that are running as interrupted (a Ctrl-C stopped the
        sweep): not failed, and resumed from their checkpoint by the next run."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE runs SET status='interrupted' WHERE hash=? AND status='running'",
                [(h,) for h in run_hashes],
            )

    def adopt(
        self, row: dict[str, Any], epochs: Sequence[dict[str, Any]], plots: Sequence[dict[str, Any]]
    ) -> None:
        """Take in a run finished in another store, in one transaction: its ``row`` (as
        :meth:`runs` returns it, ``run_dir`` already pointing into this store's folder)
        and its ``epochs``, replacing this store's row and epochs of the same hash; its
        sweep's row is added with ``plots`` where this store lacks it."""
        if row["status"] != "finished":
            raise SgdgeomError(f"run {row['name']!r} is {row['status']}, not finished")
        columns = sorted(_COLUMNS["runs"])
        values = [json.dumps(row[c]) if c in _JSON_COLUMNS else row[c] for c in columns]
        updates = ", ".join(f"{c}=excluded.{c}" for c in columns if c != "hash")
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO sweeps (name, plots) VALUES (?, ?)",
                (row["sweep"], json.dumps(list(plots))),
            )
            db.execute(  # an upsert: a row already here keeps its place in the order
                f"INSERT INTO runs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
                f" ON CONFLICT(hash) DO UPDATE SET {updates}",
                values,
            )
            db.execute("DELETE FROM epochs WHERE hash=?", (row["hash"],))
            db.executemany(
                "INSERT INTO epochs (hash, epoch, metrics) VALUES (?, ?, ?)",
                [(row["hash"], int(m["epoch"]), json.dumps(m)) for m in epochs],
            )

    # ------------------------------------------------------------------ reads

    def runs(self, sweep: str | None = None) -> list[dict[str, Any]]:
        """The run rows (JSON columns decoded), in the order they were registered; a row
        whose values are not what a sweep writes is refused, naming it."""
        query = "SELECT * FROM runs" + (" WHERE sweep=?" if sweep is not None else "")
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(query + " ORDER BY rowid", () if sweep is None else (sweep,))
            return [self._run_row(dict(row)) for row in rows]

    def _run_row(self, record: dict[str, Any]) -> dict[str, Any]:
        where = f"run {str(record.get('hash'))[:16]!r}"
        for column in _JSON_COLUMNS:
            if record[column] is not None or column != "final":
                record[column] = self._json(record[column], f"{where}: {column}", dict)
        for column in ("hash", "sweep", "name", "run_dir", "status"):
            if not isinstance(record[column], str):
                raise self._unusable(f"{where}: {column} is not text")
        if record["status"] not in STATUSES:
            raise self._unusable(f"{where}: status {record['status']!r} is not one of {STATUSES}")
        if record["status"] == "finished" and record["final"] is None:
            raise self._unusable(f"{where}: finished without final metrics")
        return record

    def _json(self, text: Any, where: str, kind: type) -> Any:
        """A JSON column's value, checked to be a ``kind`` (dict or list)."""
        try:
            value = json.loads(text) if isinstance(text, str) else None
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, kind):
            raise self._unusable(f"{where} is not a JSON {kind.__name__}")
        return value

    def sweeps(self) -> dict[str, list[dict[str, Any]]]:
        """The sweeps in the store, each with the figures it asks for."""
        with self._connect() as db:
            rows = db.execute("SELECT name, plots FROM sweeps ORDER BY rowid").fetchall()
        out = {}
        for name, plots in rows:
            figures = self._json(plots, f"sweep {name!r}: plots", list)
            if not isinstance(name, str) or not all(isinstance(f, dict) for f in figures):
                raise self._unusable(f"sweep {name!r}: plots is not a list of figures")
            out[name] = figures
        return out

    def epochs(self, run_hash: str) -> list[dict[str, Any]]:
        """One run's epoch metrics, in epoch order."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT epoch, metrics FROM epochs WHERE hash=? ORDER BY epoch", (run_hash,)
            ).fetchall()
        out = []
        for epoch, text in rows:
            metrics = self._json(text, f"run {run_hash[:16]!r} epoch {epoch}: metrics", dict)
            if metrics.get("epoch") != epoch:
                raise self._unusable(f"run {run_hash[:16]!r} epoch {epoch}: metrics of another")
            out.append(metrics)
        return out
