"""conveyor: a PostgreSQL-native durable job queue and pipeline engine for Python.

```python
from conveyor import App

app = App()

@app.task(max_attempts=3)
async def add(ctx, a: int, b: int) -> int:
    return a + b

job = await add.enqueue(a=1, b=2)
done = await app.wait(job.id, timeout=10)
```

Run workers with `conveyor worker myproject.tasks:app --concurrency 10`.
"""

from conveyor.app import App
from conveyor.config import Config, WorkerConfig
from conveyor.context import JobContext
from conveyor.errors import (
    ConfigError,
    ConveyorError,
    CounterLimitExceeded,
    DatabaseError,
    InvalidArguments,
    InvalidJobOptions,
    InvalidPipeline,
    JobNotFound,
    LeaseLost,
    NotInRun,
    PayloadTooLarge,
    QueueFull,
    RunNotFound,
    RunNotRetryable,
    SchemaVersionError,
    TaskNotFound,
    TransientDatabaseError,
    WaitTimeout,
)
from conveyor.jobs import Job, JobState, KeyStats, QueueStats, WorkerInfo
from conveyor.outcomes import Cancel, Fail, Retry, Snooze
from conveyor.partitions import PartitionInfo
from conveyor.pipeline import Pipeline, Step
from conveyor.retry import ExponentialBackoff, FixedDelay, RetryPolicy
from conveyor.run_context import RunContext
from conveyor.runs import Run, RunFailure, RunState, RunStep, StepState
from conveyor.tasks import JobSpec, RateLimit, Task, TaskOptions
from conveyor.windows import ExecutionWindow
from conveyor.worker.worker import Worker

__all__ = [
    "App",
    "Cancel",
    "Config",
    "ConfigError",
    "ConveyorError",
    "CounterLimitExceeded",
    "DatabaseError",
    "ExecutionWindow",
    "ExponentialBackoff",
    "Fail",
    "FixedDelay",
    "InvalidArguments",
    "InvalidJobOptions",
    "InvalidPipeline",
    "Job",
    "JobContext",
    "JobNotFound",
    "JobSpec",
    "JobState",
    "KeyStats",
    "LeaseLost",
    "NotInRun",
    "PartitionInfo",
    "PayloadTooLarge",
    "Pipeline",
    "QueueFull",
    "QueueStats",
    "RateLimit",
    "Retry",
    "RetryPolicy",
    "Run",
    "RunContext",
    "RunFailure",
    "RunNotFound",
    "RunNotRetryable",
    "RunState",
    "RunStep",
    "SchemaVersionError",
    "Snooze",
    "Step",
    "StepState",
    "Task",
    "TaskNotFound",
    "TaskOptions",
    "TransientDatabaseError",
    "WaitTimeout",
    "Worker",
    "WorkerConfig",
    "WorkerInfo",
]

__version__ = "0.1.0"
