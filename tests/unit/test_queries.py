"""Named queries: parsing `-- name:` files and swapping in the configured schema."""

from __future__ import annotations

import re

import pytest

from conveyor.db.queries import Queries, parse_queries, schema_qualify, strip_comments

TWO_QUERIES = """\
-- A file comment that belongs to no query.

-- name: job_first
-- Why the first query exists.
SELECT 1;

-- name: job_second
SELECT 2
FROM t;
"""


def test_parse_queries_splits_on_name_headers() -> None:
    queries = parse_queries(TWO_QUERIES)
    assert list(queries) == ["job_first", "job_second"]
    assert queries["job_first"] == "-- Why the first query exists.\nSELECT 1;"
    assert queries["job_second"] == "SELECT 2\nFROM t;"


def test_parse_queries_ignores_the_preamble_and_tolerates_header_spacing() -> None:
    queries = parse_queries("-- preamble\n--name:a\nSELECT 1;\n--   name:   b  \nSELECT 2;\n")
    assert queries == {"a": "SELECT 1;", "b": "SELECT 2;"}


def test_parse_queries_of_a_file_without_headers_is_empty() -> None:
    assert parse_queries("SELECT 1;\n") == {}


def test_parse_queries_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="duplicate query name 'job_first'"):
        parse_queries(TWO_QUERIES + "\n-- name: job_first\nSELECT 3;\n")


def test_schema_qualify_replaces_every_conveyor_prefix() -> None:
    text = "SELECT conveyor.now() FROM conveyor.jobs JOIN conveyor.clock ON true"
    assert schema_qualify(text, "other") == (
        'SELECT "other".now() FROM "other".jobs JOIN "other".clock ON true'
    )


def test_schema_qualify_replaces_the_prefix_inside_regclass_literals() -> None:
    text = "SELECT nextval('conveyor.lease_token_seq')"
    assert schema_qualify(text, "other") == """SELECT nextval('"other".lease_token_seq')"""


def test_schema_qualify_leaves_the_clock_setting_and_lookalikes_alone() -> None:
    text = (
        "current_setting('conveyor_clock.fake_now', true), "
        "myconveyor.jobs, conveyor_x.y, conveyor.Upper"
    )
    assert schema_qualify(text, "other") == text


def test_every_named_query_loads_for_the_default_schema() -> None:
    queries = Queries("conveyor")
    names = queries.names()
    assert names == sorted(names)
    expected = {
        "clock_now",
        "clock_set",
        "clock_advance",
        "job_insert_many",
        "job_claim_many",
        "job_finish_many",
        "lease_extend_many",
        "job_get",
        "job_get_many",
        "job_count_by_queue_state",
        "job_list",
        "job_count_due",
    }
    assert expected <= set(names)
    for name in names:
        statement = queries[name]
        assert isinstance(statement, bytes)
        assert statement.strip(), name
        # Under psycopg's cache limit for query conversion (MAX_CACHED_STATEMENT_LENGTH).
        assert len(statement) <= 4096, name
        assert b"--" not in statement, name


def test_every_named_query_is_qualified_with_another_schema() -> None:
    queries = Queries("other")
    originals = Queries("conveyor")
    qualified = re.compile(r"\bconveyor\.[a-z_]")
    for name in queries.names():
        text = queries[name].decode()
        # Schema-qualified names are lower case; 'conveyor.LeaseExpired' is an error type.
        assert not qualified.search(text), name
        if qualified.search(originals[name].decode()):
            assert '"other".' in text, name


def test_unknown_query_name_raises_key_error() -> None:
    with pytest.raises(KeyError):
        Queries("conveyor")["no_such_query"]


def test_strip_comments_drops_comments_and_blank_lines_but_keeps_quoted_text() -> None:
    text = """\
-- leading comment
SELECT '-- not a comment', 'it''s -- still text' -- trailing comment

    , "odd--name" AS x, $q$ -- dollar quoted $q$, $$--$$
FROM t; -- end
"""
    assert strip_comments(text) == (
        "SELECT '-- not a comment', 'it''s -- still text'\n"
        '    , "odd--name" AS x, $q$ -- dollar quoted $q$, $$--$$\n'
        "FROM t;"
    )
