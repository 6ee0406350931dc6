"""conveyor: a PostgreSQL-native durable job queue for Python.

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
    DatabaseError,
    InvalidArguments,
    InvalidJobOptions,
    JobNotFound,
    PayloadTooLarge,
    QueueFull,
    SchemaVersionError,
    TaskNotFound,
    TransientDatabaseError,
    WaitTimeout,
)
from conveyor.jobs import Job, JobState, KeyStats, QueueStats, WorkerInfo
from conveyor.outcomes import Cancel, Retry, Snooze
from conveyor.retry import ExponentialBackoff, FixedDelay, RetryPolicy
from conveyor.tasks import JobSpec, RateLimit, Task, TaskOptions
from conveyor.windows import ExecutionWindow
from conveyor.worker.worker import Worker

__all__ = [
    "App",
    "Cancel",
    "Config",
    "ConfigError",
    "ConveyorError",
    "DatabaseError",
    "ExecutionWindow",
    "ExponentialBackoff",
    "FixedDelay",
    "InvalidArguments",
    "InvalidJobOptions",
    "Job",
    "JobContext",
    "JobNotFound",
    "JobSpec",
    "JobState",
    "KeyStats",
    "PayloadTooLarge",
    "QueueFull",
    "QueueStats",
    "RateLimit",
    "Retry",
    "RetryPolicy",
    "SchemaVersionError",
    "Snooze",
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
