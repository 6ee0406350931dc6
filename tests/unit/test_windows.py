"""Execution windows in Python: parsing, `contains` / `next_open` (same day, across
midnight, DST in Europe/Oslo), and the typed errors of tasks and enqueues."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from conveyor import App, Config, ConfigError, InvalidJobOptions, JobContext, JobSpec, Task
from conveyor.windows import ExecutionWindow, as_window

OSLO = ZoneInfo("Europe/Oslo")
LIMIT = 1_000


def offline_app() -> App:
    """An App that never connects: an enqueue that reached the database would fail
    with a connection error, so a typed validation error proves nothing was written."""
    return App(config=Config(database_url="postgresql://unit-tests-never-connect.invalid/x"))


def utc(day: int, hour: int, minute: int = 0, second: int = 0, month: int = 6) -> datetime:
    return datetime(2026, month, day, hour, minute, second, tzinfo=UTC)


# -- parsing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "start", "end", "tz"),
    [
        ("09:00-17:00", time(9), time(17), "UTC"),
        ("09:00-17:00 Europe/Oslo", time(9), time(17), "Europe/Oslo"),
        ("9:00-17:30 America/New_York", time(9), time(17, 30), "America/New_York"),
        ("22:00-06:00", time(22), time(6), "UTC"),
        ("0:00-1:05 UTC", time(0), time(1, 5), "UTC"),
        ("  08:15 - 23:59   Europe/Oslo ", time(8, 15), time(23, 59), "Europe/Oslo"),
    ],
)
def test_parse_accepts_valid_forms(text: str, start: time, end: time, tz: str) -> None:
    window = ExecutionWindow.parse(text)
    assert window == ExecutionWindow(start, end, tz)
    # The text form round-trips.
    assert ExecutionWindow.parse(str(window)) == window


def test_str_is_canonical() -> None:
    assert str(ExecutionWindow.parse("9:05-17:00")) == "09:05-17:00 UTC"
    assert str(ExecutionWindow.parse("22:00-06:00 Europe/Oslo")) == "22:00-06:00 Europe/Oslo"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("25:00-17:00", "hour must be in 0..23"),
        ("09:00-24:00", "hour must be in 0..23"),
        ("09:60-10:00", "minute must be in 0..59"),
        ("09:00-09:00", "give a real span"),
        ("09:00-17:00 Mars/Base", "time zone 'Mars/Base' is unknown"),
        ("nonsense", "must look like '09:00-17:00 Europe/Oslo'"),
        ("", "must look like"),
        ("09:00", "must look like"),
        ("09:00-17:00 Europe/Oslo extra", "must look like"),
        ("9-17", "must look like"),
    ],
)
def test_parse_refuses_invalid_text_naming_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        ExecutionWindow.parse(text)
    message = str(raised.value)
    assert problem in message
    # The error names the window (or its zone) the user wrote.
    assert (repr(text) in message) or ("Mars/Base" in message) or ("09:00:00" in message)


@pytest.mark.parametrize("value", [900, 9.5, b"09:00-17:00", ("09:00", "17:00"), None])
def test_parse_refuses_non_strings(value: Any) -> None:
    with pytest.raises(ConfigError, match="must look like"):
        ExecutionWindow.parse(value)


def test_constructor_refuses_aware_times_and_empty_spans() -> None:
    with pytest.raises(ConfigError, match="naive"):
        ExecutionWindow(time(9, tzinfo=UTC), time(17))
    with pytest.raises(ConfigError, match="real span"):
        ExecutionWindow(time(9), time(9))
    with pytest.raises(ConfigError, match="unknown"):
        ExecutionWindow(time(9), time(17), "Not/AZone")


def test_as_window_accepts_object_text_and_none() -> None:
    window = ExecutionWindow(time(9), time(17), "Europe/Oslo")
    assert as_window(window) is window
    assert as_window("09:00-17:00 Europe/Oslo") == window
    assert as_window(None) is None
    with pytest.raises(ConfigError):
        as_window("nonsense")


# -- contains / next_open: same day -----------------------------------------------

OFFICE = ExecutionWindow.parse("09:00-17:00")


@pytest.mark.parametrize(
    ("at", "inside", "opens"),
    [
        (utc(10, 8, 0), False, utc(10, 9)),  # before: later the same day
        (utc(10, 0, 0), False, utc(10, 9)),  # midnight: same day
        (utc(10, 8, 59, 59), False, utc(10, 9)),
        (utc(10, 9, 0), True, utc(10, 9)),  # start is inclusive
        (utc(10, 12, 30), True, utc(10, 12, 30)),  # inside: now
        (utc(10, 16, 59, 59), True, utc(10, 16, 59, 59)),
        (utc(10, 17, 0), False, utc(11, 9)),  # end is exclusive: next day
        (utc(10, 20, 0), False, utc(11, 9)),  # after: next day
        (utc(30, 23, 0), False, datetime(2026, 7, 1, 9, tzinfo=UTC)),  # month end
    ],
)
def test_same_day_window(at: datetime, inside: bool, opens: datetime) -> None:
    assert OFFICE.contains(at) is inside
    assert OFFICE.next_open(at) == opens
    assert OFFICE.contains(OFFICE.next_open(at))


def test_next_open_inside_returns_the_instant_itself() -> None:
    at = utc(10, 12, 30, 15) + timedelta(microseconds=7)
    assert OFFICE.next_open(at) == at


def test_contains_reads_any_aware_datetime_in_the_window_zone() -> None:
    # 08:30 in New York is 12:30 UTC: inside a UTC office window.
    at = datetime(2026, 6, 10, 8, 30, tzinfo=ZoneInfo("America/New_York"))
    assert OFFICE.contains(at)
    assert OFFICE.next_open(at) == at


# -- across midnight --------------------------------------------------------------

NIGHT = ExecutionWindow.parse("22:00-06:00")


@pytest.mark.parametrize(
    ("at", "inside", "opens"),
    [
        (utc(10, 22, 0), True, utc(10, 22)),  # start inclusive
        (utc(10, 23, 0), True, utc(10, 23)),
        (utc(11, 0, 0), True, utc(11, 0)),  # past midnight, still open
        (utc(11, 5, 59), True, utc(11, 5, 59)),
        (utc(11, 6, 0), False, utc(11, 22)),  # end exclusive: 22:00 the same day
        (utc(11, 12, 0), False, utc(11, 22)),
        (utc(11, 21, 59, 59), False, utc(11, 22)),
    ],
)
def test_window_across_midnight(at: datetime, inside: bool, opens: datetime) -> None:
    assert NIGHT.contains(at) is inside
    assert NIGHT.next_open(at) == opens


# -- DST in Europe/Oslo (2026: spring forward 03-29, fall back 10-25) -------------

OSLO_OFFICE = ExecutionWindow.parse("09:00-17:00 Europe/Oslo")


@pytest.mark.parametrize(
    ("at", "opens"),
    [
        # Winter (UTC+1): 09:00 is 08:00 UTC.
        (datetime(2026, 3, 28, 0, 0, tzinfo=UTC), datetime(2026, 3, 28, 8, tzinfo=UTC)),
        # Closed on the evening before the change: opens on the change day in summer time.
        (datetime(2026, 3, 28, 16, 0, tzinfo=UTC), datetime(2026, 3, 29, 7, tzinfo=UTC)),
        # Early on the change day, before the 02:00 -> 03:00 jump.
        (datetime(2026, 3, 29, 0, 30, tzinfo=UTC), datetime(2026, 3, 29, 7, tzinfo=UTC)),
        # Summer (UTC+2): 09:00 is 07:00 UTC.
        (datetime(2026, 3, 30, 0, 0, tzinfo=UTC), datetime(2026, 3, 30, 7, tzinfo=UTC)),
        (datetime(2026, 10, 24, 0, 0, tzinfo=UTC), datetime(2026, 10, 24, 7, tzinfo=UTC)),
        # Closed on the evening before the fall back: opens in winter time.
        (datetime(2026, 10, 24, 15, 0, tzinfo=UTC), datetime(2026, 10, 25, 8, tzinfo=UTC)),
        # Inside the repeated hour (02:30 CEST, then 02:30 CET).
        (datetime(2026, 10, 25, 0, 30, tzinfo=UTC), datetime(2026, 10, 25, 8, tzinfo=UTC)),
        (datetime(2026, 10, 25, 1, 30, tzinfo=UTC), datetime(2026, 10, 25, 8, tzinfo=UTC)),
        (datetime(2026, 10, 26, 0, 0, tzinfo=UTC), datetime(2026, 10, 26, 8, tzinfo=UTC)),
    ],
)
def test_dst_changes_move_the_opening_in_utc(at: datetime, opens: datetime) -> None:
    assert not OSLO_OFFICE.contains(at)
    opened = OSLO_OFFICE.next_open(at)
    assert opened == opens
    assert opened.astimezone(OSLO).time() == time(9)
    assert OSLO_OFFICE.contains(opened)
    assert not OSLO_OFFICE.contains(opened - timedelta(microseconds=1))


@pytest.mark.parametrize(
    ("at", "inside"),
    [
        (datetime(2026, 3, 28, 7, 30, tzinfo=UTC), False),  # 08:30 CET
        (datetime(2026, 3, 28, 15, 59, tzinfo=UTC), True),  # 16:59 CET
        (datetime(2026, 3, 28, 16, 0, tzinfo=UTC), False),  # 17:00 CET
        (datetime(2026, 3, 30, 7, 0, tzinfo=UTC), True),  # 09:00 CEST
        (datetime(2026, 3, 30, 15, 0, tzinfo=UTC), False),  # 17:00 CEST
        (datetime(2026, 10, 24, 14, 59, tzinfo=UTC), True),  # 16:59 CEST
        (datetime(2026, 10, 26, 7, 30, tzinfo=UTC), False),  # 08:30 CET
        (datetime(2026, 10, 26, 15, 59, tzinfo=UTC), True),  # 16:59 CET
    ],
)
def test_dst_contains_follows_local_time(at: datetime, inside: bool) -> None:
    assert OSLO_OFFICE.contains(at) is inside


# -- tasks and enqueues -------------------------------------------------------------


def test_task_keeps_its_window() -> None:
    app = offline_app()

    @app.task(name="office", window="09:00-17:00 Europe/Oslo")
    async def office(ctx: JobContext) -> None: ...

    @app.task(name="night", window=NIGHT)
    async def night(ctx: JobContext) -> None: ...

    @app.task(name="any")
    async def anytime(ctx: JobContext) -> None: ...

    assert office.options.window == OSLO_OFFICE
    assert night.options.window is NIGHT
    assert anytime.options.window is None
    encoded = office.job().encode(LIMIT)
    assert (encoded.window_start, encoded.window_end, encoded.window_tz) == (
        time(9),
        time(17),
        "Europe/Oslo",
    )
    unwindowed = anytime.job().encode(LIMIT)
    assert (unwindowed.window_start, unwindowed.window_end, unwindowed.window_tz) == (
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("window", "problem"),
    [
        ("25:00-17:00", "hour must be in 0..23"),
        ("09:60-10:00", "minute must be in 0..59"),
        ("09:00-09:00", "real span"),
        ("09:00-17:00 Mars/Base", "Mars/Base"),
        ("nonsense", "must look like"),
        (930, "must look like"),
    ],
)
def test_task_declared_with_an_invalid_window_is_a_config_error(window: Any, problem: str) -> None:
    app = offline_app()
    with pytest.raises(ConfigError) as raised:

        @app.task(name="bad", window=window)
        async def bad(ctx: JobContext) -> None: ...

    assert problem in str(raised.value)
    assert "bad" not in app.tasks


def office_task(app: App) -> Task:
    @app.task(name="office", window="09:00-17:00 Europe/Oslo")
    async def office(ctx: JobContext) -> None: ...

    return office


def test_per_enqueue_window_overrides_the_task_window() -> None:
    office = office_task(offline_app())
    encoded = office.configure(window="22:00-06:00 America/New_York").job().encode(LIMIT)
    assert (encoded.window_start, encoded.window_end, encoded.window_tz) == (
        time(22),
        time(6),
        "America/New_York",
    )
    cleared = office.configure(window=None).job().encode(LIMIT)
    assert (cleared.window_start, cleared.window_end, cleared.window_tz) == (None, None, None)
    as_object = office.configure(window=NIGHT).job().encode(LIMIT)
    assert (as_object.window_start, as_object.window_end, as_object.window_tz) == (
        time(22),
        time(6),
        "UTC",
    )


BAD_ENQUEUE_WINDOWS = [
    ("25:00-17:00", "hour must be in 0..23"),
    ("09:60-10:00", "minute must be in 0..59"),
    ("09:00-09:00", "real span"),
    ("09:00-17:00 Mars/Base", "Mars/Base"),
    ("nonsense", "must look like"),
    (17, "must look like"),
]


@pytest.mark.parametrize(("window", "problem"), BAD_ENQUEUE_WINDOWS)
async def test_bad_per_enqueue_window_is_invalid_job_options_before_any_io(
    window: Any, problem: str
) -> None:
    app = offline_app()
    office = office_task(app)
    with pytest.raises(InvalidJobOptions, match=problem):
        await office.configure(window=window).enqueue()
    with pytest.raises(InvalidJobOptions, match=problem):
        office.configure(window=window).enqueue_sync()
    with pytest.raises(InvalidJobOptions, match=problem):
        await app.enqueue("office", window=window)
    # One bad job refuses the whole batch.
    with pytest.raises(InvalidJobOptions, match=problem):
        await app.enqueue_many([office.job(), office.configure(window=window).job()])
    with pytest.raises(InvalidJobOptions, match=problem):
        JobSpec(task="office", window=window).encode(LIMIT)


# -- DST: a start time that is skipped or repeated -------------------------------------

# Windows whose start is a local time that is skipped (spring forward) or repeated
# (fall back) on a DST change day: Oslo changes at 02:00/03:00, New York at 02:00/01:00.
DST_EDGE_WINDOWS = [
    ExecutionWindow(time(2, 30), time(4), "Europe/Oslo"),
    ExecutionWindow(time(2, 15), time(2, 45), "Europe/Oslo"),
    ExecutionWindow(time(1, 30), time(3), "America/New_York"),
]
FALL_BACK_DAYS = (date(2026, 10, 24), date(2026, 10, 31))
"""The UTC days before Oslo (10-25) and New York (11-01) fall back."""
MINUTE = timedelta(minutes=1)


def first_openings(window: ExecutionWindow, start: datetime, minutes: int) -> list[datetime]:
    """For each minute from `start`: the first minute at or after it in which the window
    is open, by brute force over `contains` (which only converts an instant to local
    time, so it is right by construction). Windows start on whole minutes."""
    instants = [start + n * MINUTE for n in range(minutes)]
    openings = [instants[-1] + timedelta(days=1)] * minutes
    following = openings[-1]
    for n in range(minutes - 1, -1, -1):
        if window.contains(instants[n]):
            following = instants[n]
        openings[n] = following
    return openings


def wrong_openings(
    window: ExecutionWindow, day: date, next_open: dict[datetime, datetime]
) -> list[str]:
    """Check answers of a next_open (instant -> opening) for instants on a minute grid
    within two UTC days from `day` against the brute-force first opening."""
    start = datetime.combine(day, time(0), tzinfo=UTC)
    truth = first_openings(window, start, 3 * 24 * 60)
    wrong = []
    for n, expected in enumerate(truth[: 2 * 24 * 60]):
        at = start + n * MINUTE
        if at in next_open and next_open[at] != expected:
            wrong.append(
                f"{window} at {at:%m-%d %H:%M}Z: {next_open[at].astimezone(UTC):%m-%d %H:%M}Z,"
                f" first opening is {expected:%m-%d %H:%M}Z"
            )
    return wrong


def test_python_next_open_is_the_first_opening_when_the_start_time_repeats() -> None:
    """Fall back: the local start time happens twice. `next_open(at)` must be the first
    instant at or after `at` in which the window is open, never an instant before `at`.
    (Oslo, 2026-10-25: 02:30 is 00:30Z, then again 01:30Z.)"""
    wrong = []
    for window in DST_EDGE_WINDOWS:
        for day in FALL_BACK_DAYS:
            start = datetime.combine(day, time(0), tzinfo=UTC)
            answers = {
                at: window.next_open(at) for at in (start + n * MINUTE for n in range(2 * 24 * 60))
            }
            wrong += wrong_openings(window, day, answers)
    assert not wrong, f"{len(wrong)} wrong openings, e.g.:\n" + "\n".join(wrong[::10])


def test_python_next_open_never_goes_back_in_time_on_fall_back_night() -> None:
    window = DST_EDGE_WINDOWS[0]  # 02:30-04:00 Europe/Oslo
    at = datetime(2026, 10, 25, 1, 10, tzinfo=UTC)  # 02:10 CET, after the first 02:30 CEST
    assert not window.contains(at)
    assert window.next_open(at) >= at
    assert window.next_open(at) == datetime(2026, 10, 25, 1, 30, tzinfo=UTC)  # 02:30 CET


def test_next_open_is_the_clock_change_when_the_start_time_is_skipped() -> None:
    """Spring forward (documented): 02:30 does not exist in Oslo on 2026-03-29; at
    01:00Z the clock jumps from 02:00 to 03:00, inside 02:30-04:00: that is the opening."""
    window = DST_EDGE_WINDOWS[0]
    assert window.next_open(datetime(2026, 3, 29, 0, 0, tzinfo=UTC)) == datetime(
        2026, 3, 29, 1, 0, tzinfo=UTC
    )
