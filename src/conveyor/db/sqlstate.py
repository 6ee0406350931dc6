"""SQLSTATE classification, in one place.

A failure is *transient* when the same statement may succeed if sent again:
the connection broke, the server is restarting or overloaded, or a concurrent
transaction won a lock or serialization race. Everything else is a bug or bad
data, and becomes a typed `DatabaseError` carrying the statement's purpose.
"""

from __future__ import annotations

import psycopg
import psycopg_pool

from conveyor.errors import DatabaseError, TransientDatabaseError

# Whole SQLSTATE classes where every code is transient.
_TRANSIENT_CLASSES = frozenset(
    {
        "08",  # connection exception (08000, 08003, 08006, 08001, 08004, 08007, 08P01)
        "53",  # insufficient resources: disk full, out of memory, too many connections
        "57",  # operator intervention: admin/crash shutdown, cannot connect now
        "58",  # system error: I/O error from the server's OS
    }
)

# Individual codes from otherwise permanent classes.
_TRANSIENT_CODES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "40003",  # statement_completion_unknown
        "55P03",  # lock_not_available (lock_timeout, NOWAIT)
        "55006",  # object_in_use
        "25P03",  # idle_in_transaction_session_timeout: the session was ended
        "25P04",  # transaction_timeout (PostgreSQL 17)
        "XX000",  # internal_error: seen on failovers mid-statement
    }
)

# A prepared statement of ours missing, or one of that name already there: a
# transaction-mode pooler sharing server sessions between clients that prepare
# statements (psycopg names them `_pg3_N`).
_PREPARED_STATEMENT_CODES = frozenset({"26000", "42P05"})
POOLER_HINT = (
    "a pooler seems to share server sessions between clients that prepare statements: "
    "set Config(prepare_threshold=None), or use PgBouncer >= 1.21 with max_prepared_statements"
)

# 57014 is query_canceled: a statement_timeout we asked for, or a cancel request.
# It is in class 57 but retrying a statement that timed out usually times out
# again, so it surfaces at once.
_PERMANENT_CODES = frozenset({"57014"})


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a psycopg error, or None when the failure has none."""
    if isinstance(exc, psycopg.Error):
        return exc.sqlstate
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether sending the same statement again may succeed."""
    if isinstance(exc, psycopg_pool.PoolTimeout | psycopg_pool.PoolClosed):
        return isinstance(exc, psycopg_pool.PoolTimeout)
    if not isinstance(exc, psycopg.Error):
        return isinstance(exc, ConnectionError | TimeoutError)
    code = exc.sqlstate
    if code is None:
        # No SQLSTATE: the client lost the connection (OperationalError) or
        # the connection is already closed (InterfaceError).
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    if code in _PERMANENT_CODES:
        return False
    return code in _TRANSIENT_CODES or code[:2] in _TRANSIENT_CLASSES


def surely_not_applied(exc: BaseException) -> bool:
    """Whether a failed autocommit statement certainly changed nothing.

    The server reporting an error (any SQLSTATE but 40003, "completion
    unknown") means the statement's transaction rolled back. A lost connection
    says nothing about whether the commit happened.
    """
    code = sqlstate_of(exc)
    return code is not None and code != "40003"


def to_database_error(purpose: str, exc: BaseException, *, exhausted: bool) -> DatabaseError:
    """Wrap `exc` in the typed error for `purpose`.

    `exhausted` says that a transient failure was retried as often as allowed.
    """
    message = str(exc).strip() or type(exc).__name__
    code = sqlstate_of(exc)
    if code in _PREPARED_STATEMENT_CODES and '"_pg3_' in message:
        message = f"{message} ({POOLER_HINT})"
    if exhausted and is_transient(exc):
        return TransientDatabaseError(purpose, message, code)
    return DatabaseError(purpose, message, code)
