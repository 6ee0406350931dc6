"""Pipeline declarations: the DAG is validated up front (unknown steps, cycles, duplicates,
bad names) and an invalid declaration registers nothing; `start` rejects bad input before
any I/O."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor import (
    App,
    Config,
    ConfigError,
    InvalidArguments,
    InvalidJobOptions,
    InvalidPipeline,
    JobContext,
    PayloadTooLarge,
    RunFailure,
    Step,
)


def offline_app(**config: Any) -> App:
    """An App that never connects: nothing here reaches a database."""
    return App(
        config=Config(database_url="postgresql://unit-tests-never-connect.invalid/x", **config)
    )


async def a(ctx: JobContext) -> int:
    return 1


async def b(ctx: JobContext) -> int:
    return 2


async def c(ctx: JobContext) -> int:
    return 3


def d(ctx: JobContext) -> int:
    return 4


async def cleanup(ctx: JobContext, failure: RunFailure) -> None:
    return None


def test_default_dependency_is_the_step_declared_before() -> None:
    app = offline_app()
    pipe = app.pipeline("linear", steps=[Step(func=a), Step(func=b), Step(func=c)])
    assert pipe.steps == ["a", "b", "c"]
    assert pipe.depends_on("a") == ()
    assert pipe.depends_on("b") == ("a",)
    assert pipe.depends_on("c") == ("b",)
    assert set(app.tasks) == {"linear:a", "linear:b", "linear:c"}
    assert app.pipelines["linear"] is pipe


def test_decorators_declare_roots_and_dags() -> None:
    app = offline_app()
    pipe = app.pipeline("dag")
    pipe.step()(a)
    pipe.step(depends_on=["a"])(b)
    pipe.step(depends_on=[])(c)
    pipe.step(depends_on=["b", "c", "b"])(d)
    pipe.on_failure()(cleanup)
    assert pipe.depends_on("c") == ()
    assert pipe.depends_on("d") == ("b", "c")
    steps = {"dag:a", "dag:b", "dag:c", "dag:d"}
    assert set(app.tasks) >= steps
    (cleanup_task,) = set(app.tasks) - steps
    assert cleanup_task.startswith("dag:") and cleanup_task.endswith("on_failure")


def test_step_takes_its_function_positionally_as_documented() -> None:
    """`Step`'s own docstring (and the pipeline brief) show `Step(fetch, depends_on=[...])`."""
    app = offline_app()
    make_step: Any = Step
    pipe = app.pipeline("positional", steps=[make_step(a), make_step(b, depends_on=["a"])])
    assert pipe.steps == ["a", "b"]


def test_step_name_overrides_function_name() -> None:
    app = offline_app()
    pipe = app.pipeline("named", steps=[Step(func=a, name="first"), Step(func=a, name="again")])
    assert pipe.steps == ["first", "again"]
    assert pipe.depends_on("again") == ("first",)


def test_list_form_steps_may_depend_on_steps_listed_later() -> None:
    app = offline_app()
    pipe = app.pipeline(
        "forward", steps=[Step(func=b, depends_on=["a"]), Step(func=a, depends_on=[])]
    )
    assert pipe.depends_on("b") == ("a",)


def test_unknown_dependency_is_refused_and_nothing_registered() -> None:
    app = offline_app()
    with pytest.raises(InvalidPipeline, match="unknown"):
        app.pipeline("bad", steps=[Step(func=a), Step(func=b, depends_on=["nope"])])
    assert app.tasks == {}
    assert app.pipelines == {}


def test_decorator_dependency_on_a_step_not_declared_yet_is_refused() -> None:
    app = offline_app()
    pipe = app.pipeline("later")
    pipe.step()(a)
    with pytest.raises(InvalidPipeline, match="unknown"):
        pipe.step(depends_on=["c"])(b)
    assert pipe.steps == ["a"]
    assert set(app.tasks) == {"later:a"}


def test_cycle_with_forward_references_is_refused_and_nothing_registered() -> None:
    app = offline_app()
    with pytest.raises(InvalidPipeline, match="cycle"):
        app.pipeline("loop", steps=[Step(func=a, depends_on=["b"]), Step(func=b, depends_on=["a"])])
    assert app.tasks == {}
    assert app.pipelines == {}


def test_longer_cycle_and_self_dependency_are_refused() -> None:
    app = offline_app()
    with pytest.raises(InvalidPipeline, match="cycle"):
        app.pipeline(
            "three",
            steps=[
                Step(func=a, depends_on=["c"]),
                Step(func=b, depends_on=["a"]),
                Step(func=c, depends_on=["b"]),
            ],
        )
    with pytest.raises(InvalidPipeline, match="cycle"):
        app.pipeline("self", steps=[Step(func=a, depends_on=["a"])])
    assert app.tasks == {}


def test_depends_on_as_a_bare_string_is_refused() -> None:
    app = offline_app()
    with pytest.raises(InvalidPipeline, match="list"):
        app.pipeline("str", steps=[Step(func=a), Step(func=b, depends_on="a")])
    assert app.tasks == {}


def test_duplicate_step_names_are_refused_and_nothing_registered() -> None:
    app = offline_app()
    with pytest.raises(InvalidPipeline, match="duplicate"):
        app.pipeline("dup", steps=[Step(func=a), Step(func=b, name="a")])
    assert app.tasks == {}
    pipe = app.pipeline("dup2")
    pipe.step()(a)
    with pytest.raises(InvalidPipeline, match="duplicate"):
        pipe.step()(a)
    assert pipe.steps == ["a"]


def test_duplicate_pipeline_name_is_refused() -> None:
    app = offline_app()
    first = app.pipeline("twice", steps=[Step(func=a)])
    with pytest.raises(InvalidPipeline, match="already"):
        app.pipeline("twice", steps=[Step(func=b)])
    assert app.pipelines["twice"] is first
    assert set(app.tasks) == {"twice:a"}


def test_step_colliding_with_an_existing_task_is_refused() -> None:
    app = offline_app()
    app.task(name="clash:a")(a)
    with pytest.raises(InvalidPipeline, match="already registered"):
        app.pipeline("clash", steps=[Step(func=b), Step(func=a)])
    assert set(app.tasks) == {"clash:a"}
    assert app.tasks["clash:a"].func is a
    assert "clash" not in app.pipelines


@pytest.mark.parametrize("name", ["", "a:b", "nul\x00", "x" * 101, 42])
def test_bad_pipeline_names_are_refused(name: Any) -> None:
    app = offline_app()
    with pytest.raises(InvalidPipeline):
        app.pipeline(name, steps=[Step(func=a)])
    assert app.tasks == {}
    assert app.pipelines == {}


@pytest.mark.parametrize("name", ["a:b", "nul\x00", "x" * 101])
def test_bad_step_names_are_refused_and_nothing_registered(name: str) -> None:
    app = offline_app()
    with pytest.raises(InvalidPipeline):
        app.pipeline("steps", steps=[Step(func=a), Step(func=b, name=name)])
    assert app.tasks == {}
    pipe = app.pipeline("deco")
    with pytest.raises(InvalidPipeline):
        pipe.step(name=name)(a)
    assert app.tasks == {}


def test_second_on_failure_is_refused() -> None:
    app = offline_app()
    pipe = app.pipeline("cleanups", steps=[Step(func=a)], on_failure=cleanup)
    before = dict(app.tasks)
    with pytest.raises(InvalidPipeline, match="on_failure"):
        pipe.on_failure()(cleanup)
    assert app.tasks == before
    assert len(before) == 2


def test_invalid_step_options_register_nothing() -> None:
    app = offline_app()
    with pytest.raises(ConfigError):
        app.pipeline("opts", steps=[Step(func=a), Step(func=b, max_attempts=0)])
    with pytest.raises(InvalidPipeline):
        app.pipeline("opts2", steps=[Step(func=a, timeout=True)])
    assert app.tasks == {}


def test_step_named_on_failure_and_a_cleanup_never_half_register() -> None:
    """A step called `on_failure` next to a cleanup must either get a task of its own
    distinct from the cleanup's, or fail the declaration as a whole (no step, no
    pipeline left registered)."""
    app = offline_app()
    try:
        pipe = app.pipeline(
            "collide", steps=[Step(func=a), Step(func=b, name="on_failure")], on_failure=cleanup
        )
    except InvalidPipeline:
        assert app.tasks == {}
        assert app.pipelines == {}
    else:
        assert pipe.steps == ["a", "on_failure"]
        assert len(app.tasks) == 3
        assert app.tasks["collide:on_failure"].func is b


def test_cleanup_whose_task_name_is_taken_registers_nothing() -> None:
    scratch = offline_app()
    scratch.pipeline("p", steps=[Step(func=a)], on_failure=cleanup)
    (cleanup_name,) = set(scratch.tasks) - {"p:a"}
    app = offline_app()
    app.task(name=cleanup_name)(d)
    with pytest.raises(InvalidPipeline):
        app.pipeline("p", steps=[Step(func=a)], on_failure=cleanup)
    assert set(app.tasks) == {cleanup_name}
    assert app.tasks[cleanup_name].func is d
    assert app.pipelines == {}


def test_invalid_pipeline_is_a_config_error() -> None:
    assert issubclass(InvalidPipeline, ConfigError)


async def test_start_rejects_bad_input_before_any_io() -> None:
    app = offline_app(max_payload_bytes=1_000)
    pipe = app.pipeline("inputs", steps=[Step(func=a)])
    with pytest.raises(InvalidArguments):
        await pipe.start(None, metadata=["not", "a", "mapping"])  # type: ignore[arg-type]
    for key in ["", "nul\x00", "k" * 10_000, 7]:
        with pytest.raises(InvalidJobOptions):
            await pipe.start(None, key=key)  # type: ignore[arg-type]
    with pytest.raises(PayloadTooLarge):
        await pipe.start("x" * 2_000)
    with pytest.raises(PayloadTooLarge):
        await pipe.start(None, metadata={"big": "y" * 2_000})
    with pytest.raises(InvalidArguments):
        await pipe.start(object())
    with pytest.raises(InvalidJobOptions):
        pipe.start_sync(None, key="")


async def test_start_of_a_pipeline_without_steps_is_refused() -> None:
    app = offline_app()
    pipe = app.pipeline("empty")
    with pytest.raises(InvalidPipeline, match="no steps"):
        await pipe.start({})
