"""The store's durable state (``connmeta serve --state-dir DIR``): one SQLite file.

``DIR/connmeta.sqlite3`` holds what a restarted sidecar needs to go on as the
same store: its incarnation, its revision, the page-token key, and the table
``changes``, one row per change (revision, id, the record version's bytes or
NULL for a deletion, and the revision of the row it supersedes). The rows at
or after ``floor`` are the history a watch can resume from; below it the
table keeps only each live id's latest version. Replaying the rows in order
rebuilds the records and the history's events (ADDED, MODIFIED, DELETED)
with their previous versions.

Writes: one transaction per store change (``Store._commit`` calls
``append`` before any listener runs, so before the report's ack is sent).
The history is trimmed with the store's own: ``append`` gets the store's
oldest retained revision, whatever bound (count or bytes) put it there.

Durability: WAL with ``synchronous=NORMAL``, checkpoints on a thread of
their own (their fsyncs never stall the event loop). A commit is in the OS page
cache when ``append`` returns, so a killed process (kill -9, OOM, a container
restart: what an emptyDir outlives) loses nothing; only the OS crashing or
the power failing may lose the last transactions, and those revisions may
already have been acked and watched. So the file records the kernel's boot
id: opened after a reboot, it keeps the records but starts a new incarnation
(revisions from the clock, no history, a new page-token key), and clients
relist instead of reading a history with a hole. Where no boot id is
available, every commit is fsynced (``synchronous=FULL``) instead.

A file that is not a connmeta state file (another format, another
application's database, a newer schema, a truncated or damaged file) is
refused with a StateError naming it, and never written to (nothing is, until
the file has been read whole: ``StateFile.begin``). SQLite may leave its empty
``-wal``/``-shm`` side files beside a refused file.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

from connmeta.records import Event, EventType, Record
from connmeta.store import Store

__all__ = ["FILE_NAME", "SCHEMA_VERSION", "StateError", "StateFile", "open_store"]

log = logging.getLogger("connmeta.state")

FILE_NAME: Final = "connmeta.sqlite3"
SCHEMA_VERSION: Final = 1
APPLICATION_ID: Final = 0x636D6D74  # "cmmt": PRAGMA application_id, the file's owner
_BOOT_ID: Final = Path("/proc/sys/kernel/random/boot_id")
_HEADER: Final = b"SQLite format 3\x00"

_SCHEMA: Final = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE changes (
    revision INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    data BLOB,
    replaces INTEGER
);
"""
_INSERT: Final = "INSERT INTO changes (revision, id, data, replaces) VALUES (?, ?, ?, ?)"
# A row leaving the history makes the row it replaced useless; a deletion
# leaving it is itself useless (the id is gone).
_DROP_REPLACED: Final = (
    "DELETE FROM changes WHERE revision IN "
    "(SELECT replaces FROM changes WHERE revision >= ? AND revision < ? AND replaces IS NOT NULL)"
)
_DROP_DELETIONS: Final = "DELETE FROM changes WHERE revision >= ? AND revision < ? AND data IS NULL"


class StateError(RuntimeError):
    """The state file cannot be used; the message names it and says why."""


def boot_id() -> str:
    """The kernel's id of this boot ("" where there is none): changes on every reboot."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _exit_on_failure(path: Path, error: sqlite3.Error) -> NoReturn:
    # The store already holds the change; going on would publish revisions the
    # file lacks, and a restart would issue them again with other contents.
    # Crash-only: the restarted sidecar resumes from what the file holds.
    log.critical("cannot write the state file %s (%s): exiting", path, error)
    os._exit(70)


class StateFile:
    """An open state file: what it holds, and the Journal that keeps it current."""

    def __init__(
        self,
        path: Path,
        connection: sqlite3.Connection,
        *,
        on_failure: Callable[[Path, sqlite3.Error], None] = _exit_on_failure,
    ) -> None:
        self.path = path
        self._db = connection
        self._on_failure = on_failure
        self._checkpoints: _Checkpointer | None = None
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        try:
            self.incarnation: str = meta["incarnation"]
            self.revision: int = meta["revision"]
            self._floor: int = meta["floor"]
            self.token_key: bytes = meta["token_key"]
            self._boot_id: str = meta["boot_id"]
        except KeyError as missing:
            raise StateError(f"state file {path} is damaged: its meta lacks {missing}") from None
        if not (
            isinstance(self.incarnation, str)
            and isinstance(self.revision, int)
            and isinstance(self._floor, int)
            and isinstance(self.token_key, bytes)
            and isinstance(self._boot_id, str)
        ):
            raise StateError(f"state file {path} is damaged: its meta table has wrong types")

    # -- opening ----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        incarnation: str,
        revision: int,
        boot: str | None = None,
        on_failure: Callable[[Path, sqlite3.Error], None] = _exit_on_failure,
    ) -> StateFile:
        """Open ``DIR/connmeta.sqlite3``, creating it for a new store if absent.

        ``incarnation``, ``revision`` and ``boot`` (the boot id, by default
        the kernel's) are a new store's, written only when the file is
        created. StateError if the file exists and is not a usable connmeta
        state file; nothing is written to an existing one before ``begin``.
        """
        path = Path(directory) / FILE_NAME
        boot = boot_id() if boot is None else boot
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StateError(f"cannot create the state directory {directory}: {error}") from None
        if not path.exists():
            _create(path, incarnation, revision, boot)
        _check_header(path)
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            raise StateError(f"cannot open the state file {path}: {error}") from None
        try:
            # A refused file must stay as it was: no checkpoint of its WAL into it.
            db.setconfig(sqlite3.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, True)
            _check_contents(path, db)
            state = cls(path, db, on_failure=on_failure)
        except sqlite3.Error as error:
            db.close()
            raise StateError(f"state file {path} is damaged: {error}") from None
        except BaseException:
            db.close()
            raise
        return state

    def begin(self, incarnation: str, revision: int, boot: str) -> bool:
        """Start writing (once the file is loaded); False if its history is void.

        After a reboot since the file was last written the records stay under
        ``incarnation`` from ``revision`` (a new store's), with no history.
        """
        db = self._db
        db.setconfig(sqlite3.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, False)
        sync = "NORMAL" if boot else "FULL"
        db.execute(f"PRAGMA synchronous = {sync}")
        # Checkpoints (copying the WAL into the file, and its fsyncs) run on a
        # thread of their own, off the event loop; the main connection
        # checkpoints only if that thread falls far behind (64 MiB of WAL).
        db.execute("PRAGMA wal_autocheckpoint = 16384")
        self._checkpoints = _Checkpointer(self.path, sync)
        self._checkpoints.start()
        kept = True
        if boot and self._boot_id != boot:
            if self._boot_id:
                self._new_incarnation(incarnation, revision, boot)
                kept = False
            else:  # written with every commit fsynced: nothing was lost
                _set_meta(db, boot_id=boot)
                self._boot_id = boot
        return kept

    def _new_incarnation(self, incarnation: str, revision: int, boot: str) -> None:
        """After a reboot: the last commits may be lost, so this is another history."""
        log.warning(
            "state file %s was last written before the machine rebooted: keeping its "
            "records under a new incarnation (watchers and page tokens start over)",
            self.path,
        )
        revision = max(revision, self.revision + 1)
        key = secrets.token_bytes(32)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            self._trim(revision + 1)
            _set_meta(db, incarnation=incarnation, revision=revision, token_key=key, boot_id=boot)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.incarnation, self.revision, self.token_key, self._boot_id = (
            incarnation,
            revision,
            key,
            boot,
        )

    # -- loading ----------------------------------------------------------------

    def load(self) -> tuple[list[Record], list[Event]]:
        """The current records and the history's events, oldest first."""
        current: dict[str, Record] = {}
        events: list[Event] = []
        floor = self._floor
        rows = self._db.execute("SELECT revision, id, data FROM changes ORDER BY revision")
        try:
            for revision, id, data in rows:
                prev = current.get(id)
                if data is None:
                    if prev is None:
                        self._damaged(f"revision {revision} deletes {id!r}, which is absent")
                    del current[id]
                    if revision >= floor:
                        events.append(Event(revision, EventType.DELETED, prev, prev))
                    continue
                try:
                    record = Record.from_data(data)
                    valid = record.id == id and _revision_of(data) == revision
                except (ValueError, IndexError) as error:
                    self._damaged(f"revision {revision} holds no valid record ({error})")
                if not valid:
                    self._damaged(f"revision {revision} holds another revision or id")
                current[id] = record
                if revision >= floor:
                    kind = EventType.ADDED if prev is None else EventType.MODIFIED
                    events.append(Event(revision, kind, record, prev))
        except sqlite3.Error as error:
            self._damaged(str(error))
        if events and events[-1].revision > self.revision:
            self._damaged(f"revision {events[-1].revision} is above the saved {self.revision}")
        return list(current.values()), events

    def _damaged(self, why: str) -> NoReturn:
        raise StateError(f"state file {self.path} is damaged: {why}")

    # -- writing: the store's Journal ---------------------------------------------

    def append(self, events: Sequence[Event], oldest_revision: int) -> None:
        """Write one change in one transaction; drop history the store no longer keeps."""
        rows: list[tuple[int, str, bytes | None, int | None]] = []
        for event in events:
            type, record, prev = event.type, event.record, event.prev
            if type is EventType.DELETED:
                rows.append((event.revision, record.id, None, _revision_of(record.data)))
            else:
                replaces = _revision_of(prev.data) if prev is not None else None
                rows.append((event.revision, record.id, record.data, replaces))
        revision = events[-1].revision
        db = self._db
        try:
            db.execute("BEGIN")
            db.executemany(_INSERT, rows)
            db.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (revision,))
            if oldest_revision + 1 > self._floor:
                self._trim(oldest_revision + 1)
            db.execute("COMMIT")
        except sqlite3.Error as error:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            self._on_failure(self.path, error)
            return
        self.revision = revision

    def _trim(self, floor: int) -> None:
        """Move the history's start to ``floor``; the rows before it become one per live id."""
        old = self._floor
        db = self._db
        db.execute(_DROP_REPLACED, (old, floor))
        db.execute(_DROP_DELETIONS, (old, floor))
        db.execute("UPDATE meta SET value = ? WHERE key = 'floor'", (floor,))
        self._floor = floor

    def close(self) -> None:
        """Checkpoint the WAL into the file and close it."""
        if self._checkpoints is not None:
            self._checkpoints.stop()
        self._db.close()


def _revision_of(data: bytes) -> int:
    """Record.revision, in half the time: the ingest path pays it per change."""
    # The metadata is the record's first field (tag, then its length), and the
    # revision the metadata's first (tag 0x08, then the varint).
    pos = 1
    while data[pos] > 0x7F:
        pos += 1
    pos += 2
    value = shift = 0
    while True:
        b = data[pos]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value
        shift += 7
        pos += 1


class _Checkpointer(threading.Thread):
    """Copies the WAL into the database file every ``interval`` seconds.

    SQLite releases the GIL while it works, and a passive checkpoint never
    blocks the writer: the copy and its fsyncs cost the event loop nothing.
    """

    def __init__(self, path: Path, sync: str, interval: float = 1.0) -> None:
        super().__init__(name="connmeta-checkpoint", daemon=True)
        self._path = path
        self._sync = sync
        self._interval = interval
        self._stopping = threading.Event()

    def run(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA synchronous = {self._sync}")
            while not self._stopping.wait(self._interval):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as error:  # the writer's next commit says more
                    log.warning("checkpoint of %s failed: %s", self._path, error)
        finally:
            db.close()

    def stop(self) -> None:
        self._stopping.set()
        self.join()


def open_store(
    directory: str | os.PathLike[str],
    *,
    boot: str | None = None,
    on_failure: Callable[[Path, sqlite3.Error], None] = _exit_on_failure,
    **options: Any,
) -> tuple[Store, StateFile]:
    """The store saved in ``directory`` (a new one if there is none), writing to it.

    ``options`` are Store's (history_size, retention, clock).
    """
    # A new store's identity, for a new file or a new incarnation after a reboot.
    fresh = Store(**options)
    boot = boot_id() if boot is None else boot
    started = time.perf_counter()
    state = StateFile.open(
        directory,
        incarnation=fresh.incarnation,
        revision=fresh.revision,
        boot=boot,
        on_failure=on_failure,
    )
    # Loading makes millions of objects and no garbage: with the collector on,
    # its full passes over everything loaded so far made the load superlinear
    # (bench/scale_bench.py: 63 µs a record at 10k, 101 at 1M).
    collecting = gc.isenabled()
    gc.disable()
    try:
        try:
            records, history = state.load()
        except BaseException:
            state.close()
            raise
        if not state.begin(fresh.incarnation, fresh.revision, boot):
            history = []
        store = Store.restored(
            records,
            history,
            incarnation=state.incarnation,
            revision=state.revision,
            journal=state,
            **options,
        )
    finally:
        if collecting:
            gc.enable()
    log.info(
        "state %s: %d records, %d history events, revision %d, incarnation %s (%.2f s)",
        state.path,
        len(records),
        len(history),
        state.revision,
        state.incarnation,
        time.perf_counter() - started,
    )
    return store, state


# -- file checks and creation ---------------------------------------------------------


def _check_header(path: Path) -> None:
    """Refuse another format before SQLite touches the file (it would not write, but
    a WAL-mode open creates side files next to it)."""
    try:
        with path.open("rb") as f:
            header = f.read(100)
    except OSError as error:
        raise StateError(f"cannot read the state file {path}: {error}") from None
    if len(header) < 100 or not header.startswith(_HEADER):
        raise StateError(f"{path} is not a connmeta state file (not an SQLite database)")
    application_id = int.from_bytes(header[68:72], "big")
    if application_id != APPLICATION_ID:
        raise StateError(
            f"{path} is not a connmeta state file (an SQLite database of another "
            f"application: application_id {application_id:#x})"
        )
    version = int.from_bytes(header[60:64], "big")
    if version > SCHEMA_VERSION:
        raise StateError(
            f"state file {path} has schema version {version}, newer than this connmeta "
            f"understands ({SCHEMA_VERSION}): run a newer connmeta or another --state-dir"
        )
    if version < 1:
        raise StateError(f"state file {path} is damaged: schema version {version}")


def _check_contents(path: Path, db: sqlite3.Connection) -> None:
    problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        raise StateError(f"state file {path} is damaged: {'; '.join(problems)}")
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    if not {"meta", "changes"} <= tables:
        raise StateError(f"state file {path} is damaged: tables {sorted(tables)}")


def _set_meta(db: sqlite3.Connection, **values: object) -> None:
    db.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        values.items(),
    )


def _create(path: Path, incarnation: str, revision: int, boot: str) -> None:
    """A new state file, complete or absent: written aside, then renamed into place."""
    new = path.with_name(path.name + ".new")
    new.unlink(missing_ok=True)  # ours, from a creation that was interrupted
    try:
        db = sqlite3.connect(new, isolation_level=None)
        try:
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.executescript(_SCHEMA)
            _set_meta(
                db,
                incarnation=incarnation,
                revision=revision,
                floor=revision + 1,
                token_key=secrets.token_bytes(32),
                boot_id=boot,
            )
            db.execute("PRAGMA journal_mode = WAL")
        finally:
            db.close()
        fd = os.open(new, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(new, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, sqlite3.Error) as error:
        raise StateError(f"cannot create the state file {path}: {error}") from None
