"""The consent ledger: append-only events in PostgreSQL, with a durable local journal behind it.

``append`` tells the caller how durably an event was stored, and the dialog decides from that
whether it may record: only ``Durability.DATABASE`` (or ``JOURNAL`` where the operator allows
it) lets MixMonitor start.  A background task replays the journal into the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from consent_gate.core.events import ConsentEvent, utcnow
from consent_gate.ledger.journal import Journal, JournalError

log = structlog.get_logger(__name__)

# The migrations ship inside this package (wheel package data), never found through the checkout.
SQL_DIR = Path(str(resources.files(__package__ or "consent_gate.ledger") / "sql"))


class MigrationError(RuntimeError):
    """The ledger cannot be migrated by this version (e.g. a newer version already migrated it)."""

INSERT_COLUMNS = (
    "event_id", "consent_id", "call_id", "event", "purpose", "legal_basis", "language", "prompt_version",
    "digit", "caller_ref", "caller_number", "recording_id", "prompt_started_at", "decided_at", "occurred_at",
    "source", "via_journal", "detail",
)
INSERT_SQL = f"""
INSERT INTO consent_events ({", ".join(INSERT_COLUMNS)})
VALUES ({", ".join(f"${n}" for n in range(1, len(INSERT_COLUMNS)))}, ${len(INSERT_COLUMNS)}::jsonb)
ON CONFLICT (event_id) DO NOTHING
"""

# What PostgreSQL (or asyncpg, encoding a value) says about the event itself: storing it again
# gives the same answer, so the replay quarantines it.  Anything else (connection, timeout,
# privileges, a server shutting down) may pass later: the event stays pending.
REJECTED_EVENT = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
_ARGUMENT = re.compile(r"query argument \$(\d+)")


def rejection_reason(error: Exception) -> str:
    """Why the database refused an event, without the values (they may be caller data)."""
    parts = [type(error).__name__, f"SQLSTATE {getattr(error, 'sqlstate', None) or '?'}"]
    column = getattr(error, "column_name", None)
    if column is None and (match := _ARGUMENT.search(str(error))):  # asyncpg could not encode it
        index = int(match.group(1)) - 1
        column = INSERT_COLUMNS[index] if 0 <= index < len(INSERT_COLUMNS) else None
    if column:
        parts.append(f"column {column}")
    if constraint := getattr(error, "constraint_name", None):
        parts.append(f"constraint {constraint}")
    return ", ".join(parts)


def host_dsns(dsn: str) -> list[str]:
    """One single-host DSN per host of a multi-host ``postgresql://h1:p1,h2:p2/db?...`` URL, in
    order (user, database and parameters kept); any other DSN as it is."""
    parts = urllib.parse.urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres") or "," not in parts.netloc:
        return [dsn]
    userinfo, at, hosts = parts.netloc.rpartition("@")
    return [urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}"))
            for host in hosts.split(",") if host]


async def connect_first_writable(dsns: Sequence[str], timeout: float, **kwargs: Any) -> asyncpg.Connection:
    """Connect to every host at once and keep the first that takes the connection (with
    ``target_session_attrs=read-write`` in the DSN: the primary).  libpq and asyncpg try the hosts
    one after the other within one timeout, so a primary that went silent (a lost host, no
    connection reset) would use it all up and the promoted standby would never be tried."""
    tasks = [asyncio.ensure_future(asyncpg.connect(dsn, timeout=timeout, **kwargs)) for dsn in dsns]
    chosen: asyncpg.Connection | None = None
    error: BaseException | None = None
    try:
        pending = set(tasks)
        while pending and chosen is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:  # in host order among those that finished
                if task in done and chosen is None and not task.cancelled():
                    if task.exception() is None:
                        chosen = task.result()
                    else:
                        error = task.exception()
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is None and task.result() is not chosen:
                task.result().terminate()
    if chosen is None:
        raise error or OSError("no database host to connect to")
    return chosen


class Durability(StrEnum):
    DATABASE = "database"
    JOURNAL = "journal"
    LOST = "lost"


def _row(event: ConsentEvent, via_journal: bool) -> tuple[Any, ...]:
    return (
        event.event_id, event.consent_id, event.call_id, str(event.event), event.purpose,
        event.legal_basis, event.language, event.prompt_version, event.digit, event.caller_ref,
        event.caller_number, event.recording_id, event.prompt_started_at, event.decided_at,
        event.occurred_at, event.source, via_journal, json.dumps(event.detail),
    )


class Ledger:
    """Owns the asyncpg pool and the journal replayer; start() and close() bound their lifetime."""

    def __init__(
        self,
        dsn: str,
        journal: Journal,
        *,
        write_timeout: float = 2.0,
        replay_interval: float = 2.0,
        connect: Callable[..., Any] = asyncpg.create_pool,
    ) -> None:
        self.dsn = dsn
        self.journal = journal
        self.write_timeout = write_timeout
        self.replay_interval = replay_interval
        self._connect = connect
        self._hosts = host_dsns(dsn)
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._replayer: asyncio.Task[None] | None = None
        self._wake_replayer = asyncio.Event()
        self.degraded = False
        # Replay rounds that failed for a reason other than the database (journal I/O, a bug).
        self.replay_failures = 0

    async def start(self) -> None:
        """Never fails because the database is down: the journal takes over until it returns."""
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncio.TimeoutError):
            await self._get_pool()
        self._replayer = asyncio.create_task(self._replay_loop(), name="ledger-journal-replay")

    async def close(self) -> None:
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
            self._replayer = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 5)
            self._pool = None

    async def _get_pool(self) -> asyncpg.Pool:
        async with self._pool_lock:
            if self._pool is None:
                options: dict[str, Any] = {}
                if len(self._hosts) > 1:  # several hosts: follow the primary (docs/deployment.md)
                    options["connect"] = self._connect_any
                self._pool = await asyncio.wait_for(
                    self._connect(self.dsn, min_size=1, max_size=10, command_timeout=self.write_timeout, **options),
                    self.write_timeout,
                )
            return self._pool

    async def _connect_any(self, *_args: Any, **kwargs: Any) -> asyncpg.Connection:
        """The pool's connect for a multi-host DSN: every host at once, the first writable wins."""
        return await connect_first_writable(self._hosts, self.write_timeout, **kwargs)

    @contextlib.asynccontextmanager
    async def _connection(self) -> Any:
        """A pooled connection that is thrown away if anything but the event goes wrong on it: a
        connection to a primary that went silent would otherwise be handed out again and again,
        each time until the write timeout, and the pool would never reach the new primary."""
        pool = await self._get_pool()
        async with pool.acquire(timeout=self.write_timeout) as connection:
            try:
                yield connection
            except REJECTED_EVENT:
                raise
            except BaseException:  # a timeout, a cancellation (wait_for), a lost connection
                connection.terminate()
                raise

    async def _insert(self, events: Sequence[ConsentEvent], *, via_journal: bool) -> None:
        async with self._connection() as connection:
            async with connection.transaction():
                await connection.executemany(INSERT_SQL, [_row(event, via_journal) for event in events])

    async def append(self, event: ConsentEvent, *, use_journal: bool = True) -> Durability:
        """Store one event: the database if it answers in time, else the fsync'd journal."""
        try:
            await asyncio.wait_for(self._insert([event], via_journal=False), self.write_timeout)
            return Durability.DATABASE
        except asyncio.CancelledError:
            raise
        except Exception as error:  # any database failure sends the event to the journal
            # An event the database refuses says nothing about its health: the replay will
            # quarantine it, the other callers are still asked.
            if not isinstance(error, REJECTED_EVENT):
                self.degraded = True
            log.warning("ledger.database_write_failed", error=repr(error), event_id=str(event.event_id))
        if not use_journal:
            return Durability.LOST
        try:
            await asyncio.to_thread(self.journal.append, event)
        except JournalError as error:
            log.error("ledger.journal_write_failed", error=str(error), event_id=str(event.event_id))
            return Durability.LOST
        self._wake_replayer.set()
        return Durability.JOURNAL

    async def _replay_events(self, events: list[ConsentEvent]) -> dict[uuid.UUID, str]:
        """The journal's store: the batch in one transaction; if the database refuses it, each
        event on its own, so one bad event holds up no other.  Returns the refused ones."""
        try:
            await self._insert(events, via_journal=True)
            self.degraded = False
            return {}
        except REJECTED_EVENT as error:
            if len(events) == 1:
                self.degraded = False
                return {events[0].event_id: rejection_reason(error)}
        except Exception:
            self.degraded = True
            raise
        rejected: dict[uuid.UUID, str] = {}
        for event in events:
            try:
                await self._insert([event], via_journal=True)
            except REJECTED_EVENT as error:
                rejected[event.event_id] = rejection_reason(error)
            except Exception:
                self.degraded = True  # the batch stays pending; the events stored so far are known ids
                raise
        self.degraded = False
        return rejected

    async def _check_database(self) -> None:
        """Leave degraded mode only once the database answers; raises while it does not."""
        try:
            async with self._connection() as connection:
                await connection.fetchval("SELECT 1", timeout=self.write_timeout)
        except Exception:
            self.degraded = True
            raise
        self.degraded = False

    async def replay_journal(self) -> int:
        """Move journaled events into the database; returns how many were replayed.

        Lines that can never be stored go to the journal's quarantine (logged as
        ``journal.quarantined``); a database failure leaves them pending and raises.
        """
        if self.degraded:
            await self._check_database()
        count = await self.journal.drain(self._replay_events)
        if count:
            log.info("ledger.journal_replayed", events=count)
        return count

    async def _backlog(self) -> int | None:
        try:
            return await asyncio.to_thread(self.journal.backlog)
        except OSError:  # only for the log line: never what stops the replayer
            return None

    async def _replay_loop(self) -> None:
        """Never ends but by cancellation: every failure is logged and retried next round."""
        while True:
            self._wake_replayer.clear()  # an append during this round wakes the next one
            try:
                await self.replay_journal()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if self.degraded:  # the database failed (set where it was seen)
                    log.info("ledger.replay_deferred", error=repr(error), backlog=await self._backlog())
                else:
                    self.replay_failures += 1
                    log.error("ledger.replay_failed", error=repr(error), backlog=await self._backlog(),
                              exc_info=error)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake_replayer.wait(), self.replay_interval)

    async def history(self, *, call_id: str | None = None, consent_id: str | None = None) -> list[dict[str, Any]]:
        pool = await self._get_pool()
        rows = await pool.fetch(
            """SELECT seq, event_id, consent_id, call_id, event, purpose, legal_basis, language,
                      prompt_version, digit, caller_ref, recording_id, prompt_started_at, decided_at,
                      occurred_at, stored_at, source, via_journal, detail
                 FROM consent_events
                WHERE ($1::text IS NULL OR call_id = $1)
                  AND ($2::uuid IS NULL OR consent_id = $2)
                ORDER BY occurred_at, seq""",
            call_id, consent_id,
        )
        return [dict(row) for row in rows]


async def migrate(dsn: str, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply sql/NNN_*.sql files not applied yet, each in its own transaction; returns the new ones.

    Refuses (MigrationError) a ledger that holds a migration this version does not ship.
    """
    files = sorted(sql_dir.glob("[0-9][0-9][0-9]_*.sql"))
    if not files:
        raise FileNotFoundError(f"no migrations found in {sql_dir}")
    connection = await asyncpg.connect(dsn, timeout=10)
    applied: list[str] = []
    try:
        # Two migrators at once (two tests, two hosts) must not both apply a file.
        await connection.execute("SELECT pg_advisory_lock(724165)")
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["version"] for row in await connection.fetch("SELECT version FROM schema_migrations")}
        unknown = sorted(done - {path.name for path in files})
        if unknown:
            # A newer consent-gate migrated this ledger: applying our older files around its
            # changes would be a downgrade nobody tested.
            raise MigrationError(
                f"the ledger has migrations this consent-gate does not know: {', '.join(unknown)} "
                f"(its newest is {files[-1].name}); it was migrated by a newer version: "
                "install that version (or newer) instead of downgrading"
            )
        for path in files:
            if path.name in done:
                continue
            async with connection.transaction():
                await connection.execute(path.read_text())
                await connection.execute("INSERT INTO schema_migrations (version) VALUES ($1)", path.name)
            applied.append(path.name)
            log.info("ledger.migration_applied", version=path.name, at=utcnow().isoformat())
    finally:
        with contextlib.suppress(Exception):
            await connection.execute("SELECT pg_advisory_unlock(724165)")
        await connection.close()
    return applied
