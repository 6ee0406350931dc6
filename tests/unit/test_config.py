"""Config and WorkerConfig: validated once, the bad field named in the error."""

from __future__ import annotations

from datetime import timedelta

import pytest

from conveyor import Config, ConfigError, WorkerConfig
from conveyor.config import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_SCHEMA,
    ENV_DATABASE_URL,
    ENV_SCHEMA,
    ENV_SESSION_URL,
)


def test_config_defaults_are_valid() -> None:
    config = Config()
    assert config.schema == DEFAULT_SCHEMA
    assert config.max_payload_bytes == DEFAULT_MAX_PAYLOAD_BYTES
    assert config.database_url is None


# 50 characters at most: `<schema>.jobs` must fit PostgreSQL's 63-byte channel names.
LONGEST_SCHEMA = "a" * 50


@pytest.mark.parametrize("schema", ["conveyor", "other", "_private", "jobs_2", LONGEST_SCHEMA])
def test_config_accepts_plain_lower_case_schema_names(schema: str) -> None:
    assert Config(schema=schema).schema == schema


@pytest.mark.parametrize(
    "schema",
    [
        "",
        "x; drop",
        "x; DROP SCHEMA conveyor CASCADE; --",
        'conveyor"',
        "conveyor.jobs",
        "Conveyor",
        "1jobs",
        "my-schema",
        "with space",
        LONGEST_SCHEMA + "a",
        "a" * 64,
        "conveyor\n",
    ],
)
def test_config_rejects_unsafe_schema_names_naming_the_field(schema: str) -> None:
    with pytest.raises(ConfigError, match=r"Config\.schema"):
        Config(schema=schema)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_payload_bytes": 0}, "max_payload_bytes"),
        ({"max_payload_bytes": -1}, "max_payload_bytes"),
        ({"pool_size": 0}, "pool_size"),
        ({"pool_size": -3}, "pool_size"),
        ({"connect_timeout": timedelta(0)}, "connect_timeout"),
        ({"connect_timeout": timedelta(seconds=-1)}, "connect_timeout"),
        ({"statement_retries": -1}, "statement_retries"),
    ],
)
def test_config_rejects_invalid_values_naming_the_field(
    options: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError, match=rf"Config\.{field}"):
        Config(**options)  # type: ignore[arg-type]


def test_config_allows_zero_statement_retries() -> None:
    assert Config(statement_retries=0).statement_retries == 0


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.schema = "other"  # type: ignore[misc]


def test_config_with_database_url_returns_a_copy() -> None:
    config = Config(schema="other")
    moved = config.with_database_url("postgresql://db.example/app")
    assert moved.database_url == "postgresql://db.example/app"
    assert moved.schema == "other"
    assert config.database_url is None


def test_worker_config_defaults_are_valid() -> None:
    config = WorkerConfig()
    assert config.queues == ("default",)
    assert config.heartbeat_interval < config.lease_duration


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"queues": ()}, "queues"),
        ({"queues": ("default", "")}, "queues"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": -1}, "concurrency"),
        ({"flush_size": 0}, "flush_size"),
        ({"poll_interval": timedelta(0)}, "poll_interval"),
        ({"lease_duration": timedelta(seconds=-1)}, "lease_duration"),
        ({"heartbeat_interval": timedelta(0)}, "heartbeat_interval"),
        ({"flush_interval": timedelta(0)}, "flush_interval"),
        ({"shutdown_grace": timedelta(seconds=-1)}, "shutdown_grace"),
        ({"sync_threads": 0}, "sync_threads"),
    ],
)
def test_worker_config_rejects_invalid_values_naming_the_field(
    options: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError, match=rf"WorkerConfig\.{field}"):
        WorkerConfig(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("heartbeat_s", [30, 31, 120])
def test_worker_config_rejects_heartbeat_not_shorter_than_lease(heartbeat_s: int) -> None:
    with pytest.raises(ConfigError, match=r"WorkerConfig\.heartbeat_interval"):
        WorkerConfig(
            lease_duration=timedelta(seconds=30), heartbeat_interval=timedelta(seconds=heartbeat_s)
        )


def test_worker_config_allows_zero_shutdown_grace() -> None:
    assert WorkerConfig(shutdown_grace=timedelta(0)).shutdown_grace == timedelta(0)


def test_from_env_reads_url_schema_and_session_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DATABASE_URL, "postgresql://env.example:6432/jobs")
    monkeypatch.setenv(ENV_SCHEMA, "from_env")
    monkeypatch.setenv(ENV_SESSION_URL, "postgresql://env.example:5432/jobs")
    config = Config.from_env()
    assert config.database_url == "postgresql://env.example:6432/jobs"
    assert config.schema == "from_env"
    assert config.session_url == "postgresql://env.example:5432/jobs"


def test_from_env_without_variables_gives_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_DATABASE_URL, ENV_SCHEMA, ENV_SESSION_URL):
        monkeypatch.delenv(name, raising=False)
    assert Config.from_env() == Config()


def test_from_env_treats_empty_variables_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_DATABASE_URL, ENV_SCHEMA, ENV_SESSION_URL):
        monkeypatch.setenv(name, "")
    assert Config.from_env() == Config()


def test_from_env_overrides_win_and_none_overrides_are_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_DATABASE_URL, "postgresql://env.example/jobs")
    monkeypatch.setenv(ENV_SCHEMA, "from_env")
    config = Config.from_env(schema="explicit", database_url=None, pool_size=7)
    assert config.schema == "explicit"
    assert config.database_url == "postgresql://env.example/jobs"
    assert config.pool_size == 7


def test_from_env_validates_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_SCHEMA, "x; drop")
    with pytest.raises(ConfigError, match=r"Config\.schema"):
        Config.from_env()


def test_connections_keep_the_url_options_and_turn_jit_off() -> None:
    from conveyor.db.connect import connection_kwargs

    plain = connection_kwargs(Config(), conninfo="postgresql://u@h/db")
    assert plain["options"] == "-c jit=off"
    own = connection_kwargs(Config(), conninfo="postgresql://u@h/db?options=-c%20search_path%3Dapp")
    assert own["options"] == "-c search_path=app -c jit=off"


def test_connections_parse_json_with_a_shortcut_for_empty_values() -> None:
    import psycopg
    from psycopg.adapt import AdaptersMap
    from psycopg.pq import Format

    from conveyor.db.connect import connection_kwargs, use_fast_json

    assert "context" not in connection_kwargs(Config())  # psycopg's global adapters
    adapters = AdaptersMap(psycopg.adapters)
    use_fast_json(adapters)
    jsonb = adapters.types["jsonb"].oid
    loader = adapters.get_loader(jsonb, Format.TEXT)
    assert loader is not None
    load = loader(jsonb).load
    first, second = load(b"{}"), load(b"{}")
    first["changed"] = True
    assert second == {} and first is not second  # a new object every time
    assert load(b"[]") == [] and load(memoryview(b"[]")) == []
    assert load(b'{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}
    assert load(b'"{}"') == "{}"


def test_an_application_json_loader_is_kept_without_the_shortcut() -> None:
    import json

    import psycopg
    from psycopg.adapt import AdaptersMap
    from psycopg.pq import Format
    from psycopg.types.json import set_json_loads

    from conveyor.db.connect import use_fast_json

    def decimal_floats(data: bytes) -> object:
        return json.loads(data, parse_float=str)

    adapters = AdaptersMap(psycopg.adapters)
    set_json_loads(decimal_floats, adapters)  # the application's choice, e.g. orjson
    use_fast_json(adapters)
    jsonb = adapters.types["jsonb"].oid
    loader = adapters.get_loader(jsonb, Format.TEXT)
    assert loader is not None
    assert loader(jsonb).load(b'{"x": 1.5}') == {"x": "1.5"}
