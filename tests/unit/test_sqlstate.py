"""SQLSTATE classification: which failures are worth sending again."""

from __future__ import annotations

import psycopg
import psycopg_pool
import pytest
from psycopg import errors

from conveyor import DatabaseError, TransientDatabaseError
from conveyor.db.sqlstate import is_transient, sqlstate_of, to_database_error


def postgres_error(code: str, message: str = "boom") -> psycopg.Error:
    """An instance of the psycopg class PostgreSQL's `code` maps to."""
    error = errors.lookup(code)(message)
    assert error.sqlstate == code
    return error


@pytest.mark.parametrize(
    "code",
    [
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "08006",  # connection_failure
        "08003",  # connection_does_not_exist
        "57P01",  # admin_shutdown
        "57P03",  # cannot_connect_now
        "53300",  # too_many_connections
        "53100",  # disk_full
        "55P03",  # lock_not_available
    ],
)
def test_transient_sqlstates_are_retryable(code: str) -> None:
    assert is_transient(postgres_error(code))


@pytest.mark.parametrize(
    "code",
    [
        "23505",  # unique_violation
        "23514",  # check_violation
        "42601",  # syntax_error
        "42P01",  # undefined_table
        "22P02",  # invalid_text_representation
        "57014",  # query_canceled: a statement timeout repeats if retried
    ],
)
def test_permanent_sqlstates_are_not_retryable(code: str) -> None:
    assert not is_transient(postgres_error(code))


def test_connection_errors_without_sqlstate_are_transient() -> None:
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    closed = psycopg.InterfaceError("the connection is closed")
    assert sqlstate_of(lost) is None
    assert is_transient(lost)
    assert is_transient(closed)


def test_programming_errors_without_sqlstate_are_permanent() -> None:
    assert not is_transient(psycopg.ProgrammingError("query has 2 placeholders but 1 given"))


def test_os_level_connection_failures_are_transient() -> None:
    assert is_transient(ConnectionResetError("reset by peer"))
    assert is_transient(TimeoutError())


def test_pool_timeout_is_transient_but_a_closed_pool_is_not() -> None:
    assert is_transient(psycopg_pool.PoolTimeout("no connection in 10s"))
    assert not is_transient(psycopg_pool.PoolClosed("the pool is closed"))


def test_ordinary_exceptions_are_not_transient() -> None:
    assert not is_transient(ValueError("bad"))
    assert sqlstate_of(ValueError("bad")) is None


def test_to_database_error_keeps_purpose_and_sqlstate() -> None:
    error = to_database_error(
        "enqueue jobs", postgres_error("23505", "duplicate key"), exhausted=True
    )
    assert type(error) is DatabaseError
    assert error.purpose == "enqueue jobs"
    assert error.sqlstate == "23505"
    assert str(error) == "enqueue jobs failed [23505]: duplicate key"


def test_to_database_error_marks_exhausted_transient_failures() -> None:
    error = to_database_error("claim jobs", postgres_error("40P01", "deadlock"), exhausted=True)
    assert isinstance(error, TransientDatabaseError)
    assert error.sqlstate == "40P01"
    assert "claim jobs" in str(error)
    assert "[40P01]" in str(error)


def test_to_database_error_on_a_callers_connection_is_not_marked_transient() -> None:
    # Not retried (the caller owns the transaction), so not "exhausted" either.
    error = to_database_error("enqueue jobs", postgres_error("40001"), exhausted=False)
    assert type(error) is DatabaseError
    assert error.sqlstate == "40001"


def test_to_database_error_without_sqlstate_or_message() -> None:
    error = to_database_error("read clock", psycopg.OperationalError(), exhausted=True)
    assert isinstance(error, TransientDatabaseError)
    assert error.sqlstate is None
    assert str(error) == "read clock failed: OperationalError"


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("26000", 'prepared statement "_pg3_3" does not exist'),
        ("42P05", 'prepared statement "_pg3_0" already exists'),
    ],
)
def test_a_prepared_statement_lost_to_a_pooler_names_the_fix(code: str, message: str) -> None:
    error = to_database_error("claim jobs", postgres_error(code, message), exhausted=False)
    assert "prepare_threshold=None" in str(error)
    assert "max_prepared_statements" in str(error)


def test_a_missing_prepared_statement_of_the_users_own_gets_no_pooler_hint() -> None:
    error = postgres_error("26000", 'prepared statement "mine" does not exist')
    assert "pooler" not in str(to_database_error("run", error, exhausted=False))
