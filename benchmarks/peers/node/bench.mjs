// Node.js peers under the same scenarios as conveyor's benchmarks (benchmarks/peers).
//
//   node bench.mjs PEER SCENARIO DATABASE_URL [JSON_PARAMS]
//
// PEER: pgboss | graphile. SCENARIO: setup | enqueue | throughput | latency.
// Prints one JSON object: the scenario's numbers, in the keys the Python
// harness uses for every peer (see benchmarks/peers/common.py). The database
// must be fresh; `setup` installs the peer's schema into it.

import PgBoss from "pg-boss";
import { makeWorkerUtils, run, runMigrations } from "graphile-worker";

const [peer, scenario, url, rawParams] = process.argv.slice(2);
const params = rawParams ? JSON.parse(rawParams) : {};
const QUEUE = "bench_noop";
const POLL_MS = 10;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const now = () => performance.now() / 1000;

function percentile(values, fraction) {
  const ordered = [...values].sort((a, b) => a - b);
  const index = Math.min(ordered.length - 1, Math.max(0, Math.round(fraction * (ordered.length - 1))));
  return ordered[index];
}

async function until(check, what, timeoutS = 600) {
  const deadline = now() + timeoutS;
  while (!(await check())) {
    if (now() > deadline) throw new Error(`gave up waiting for ${what}`);
    await sleep(POLL_MS);
  }
}

function enqueueResult(single, timings, bulk, bulkS) {
  const total = timings.reduce((a, b) => a + b, 0);
  return {
    single_jobs_per_s: Math.round(single / total),
    single_p50_ms: +(percentile(timings, 0.5) * 1000).toFixed(3),
    single_p99_ms: +(percentile(timings, 0.99) * 1000).toFixed(3),
    bulk_jobs_per_s: Math.round(bulk / bulkS),
  };
}

function latencyResult(delaysS) {
  const ms = delaysS.map((d) => d * 1000);
  return {
    p50_ms: +percentile(ms, 0.5).toFixed(3),
    p99_ms: +percentile(ms, 0.99).toFixed(3),
    max_ms: +Math.max(...ms).toFixed(3),
  };
}

async function paced(count, ratePerS, send) {
  const interval = 1 / ratePerS;
  let next = now();
  for (let i = 0; i < count; i++) {
    await send(i);
    next += interval;
    await sleep(Math.max(0, (next - now()) * 1000));
  }
}

// -- pg-boss: polling workers that fetch a batch each; no LISTEN/NOTIFY -------------

const pgboss = {
  // Concurrency C as pg-boss expresses it: workers x batchSize jobs in flight.
  // Two workers of C/2 (like the pgqueuer adapter's batches); the polling
  // interval at its minimum (0.5 s), since a worker waits out the rest of it
  // after every batch.
  async open(options = {}) {
    const boss = new PgBoss({ connectionString: url, schedule: false, supervise: false, ...options });
    boss.on("error", (error) => console.error(error));
    await boss.start();
    return boss;
  },
  async setup() {
    const boss = await this.open();
    await boss.createQueue(QUEUE);
    await boss.stop({ graceful: false, wait: true });
    return {};
  },
  async enqueue({ single, bulk }) {
    const boss = await this.open({ max: 1 });
    const timings = [];
    for (let i = 0; i < single; i++) {
      const started = now();
      await boss.send(QUEUE, { i });
      timings.push(now() - started);
    }
    const started = now();
    const chunk = 5000;
    for (let i = 0; i < bulk; i += chunk) {
      const jobs = [];
      for (let j = i; j < Math.min(bulk, i + chunk); j++) jobs.push({ name: QUEUE, data: { i: j } });
      await boss.insert(jobs);
    }
    const bulkS = now() - started;
    await boss.stop({ graceful: false, wait: true });
    return enqueueResult(single, timings, bulk, bulkS);
  },
  async throughput({ jobs, concurrency }) {
    const boss = await this.open();
    for (let i = 0; i < jobs; i += 5000) {
      const batch = [];
      for (let j = i; j < Math.min(jobs, i + 5000); j++) batch.push({ name: QUEUE, data: { i: j } });
      await boss.insert(batch);
    }
    await boss.getDb().executeSql("ANALYZE pgboss.job");
    let ran = 0;
    let firstStart = null;
    const started = now();
    const batchSize = Math.max(1, Math.floor(concurrency / 2));
    for (let w = 0; w < Math.max(1, Math.floor(concurrency / batchSize)); w++) {
      await boss.work(QUEUE, { batchSize, pollingIntervalSeconds: 0.5 }, async (batch) => {
        firstStart ??= now();
        ran += batch.length;
      });
    }
    const db = boss.getDb();
    const count = async (sql) => Number((await db.executeSql(sql)).rows[0].n);
    await until(async () => ran >= jobs && (await count("SELECT count(*) AS n FROM pgboss.job WHERE state = 'completed'")) >= jobs, "pg-boss jobs");
    const seconds = now() - started;
    const span = (await db.executeSql(
      "SELECT extract(epoch FROM max(completed_on) - min(started_on)) AS s FROM pgboss.job WHERE state = 'completed'",
    )).rows[0].s;
    await boss.stop({ graceful: false, wait: true });
    return throughputResult(jobs, seconds, firstStart - started, Number(span));
  },
  async latency({ jobs, rate_per_s: rate }) {
    const boss = await this.open();
    const delays = [];
    const sentAt = new Map();
    await boss.work(QUEUE, { batchSize: 5, pollingIntervalSeconds: 0.5 }, async (batch) => {
      const at = now();
      for (const job of batch) delays.push(at - sentAt.get(job.data.i));
    });
    const sender = await this.open({ max: 1 });
    await paced(jobs, rate, async (i) => {
      sentAt.set(i, now());
      await sender.send(QUEUE, { i });
    });
    await until(async () => delays.length >= jobs, "pg-boss latency jobs");
    await sender.stop({ graceful: false, wait: true });
    await boss.stop({ graceful: false, wait: true });
    return latencyResult(delays);
  },
};

// -- graphile-worker: LISTEN/NOTIFY, one job per concurrency slot -------------------

const graphile = {
  async setup() {
    await runMigrations({ connectionString: url });
    return {};
  },
  async addJobs(utils, count, offset = 0) {
    // graphile-worker's own bulk entry point (add_jobs), as an application would call it.
    await utils.withPgClient((client) =>
      client.query(
        "SELECT graphile_worker.add_jobs(array(SELECT json_populate_record(null::graphile_worker.job_spec, " +
          "json_build_object('identifier', 'noop', 'payload', json_build_object('i', i))) " +
          "FROM generate_series($1::int, $2::int) AS i))",
        [offset, offset + count - 1],
      ),
    );
  },
  async enqueue({ single, bulk }) {
    const utils = await makeWorkerUtils({ connectionString: url });
    const timings = [];
    for (let i = 0; i < single; i++) {
      const started = now();
      await utils.addJob("noop", { i });
      timings.push(now() - started);
    }
    const started = now();
    for (let i = 0; i < bulk; i += 5000) await this.addJobs(utils, Math.min(5000, bulk - i), i);
    const bulkS = now() - started;
    await utils.release();
    return enqueueResult(single, timings, bulk, bulkS);
  },
  async throughput({ jobs, concurrency }) {
    const utils = await makeWorkerUtils({ connectionString: url });
    for (let i = 0; i < jobs; i += 5000) await this.addJobs(utils, Math.min(5000, jobs - i), i);
    await utils.withPgClient((client) => client.query("ANALYZE graphile_worker._private_jobs"));
    let ran = 0;
    let firstStart = null;
    const started = now();
    const runner = await run({
      connectionString: url,
      concurrency,
      noHandleSignals: true,
      pollInterval: 1000,
      logger: quietLogger(),
      taskList: {
        noop: async () => {
          firstStart ??= now();
          ran += 1;
        },
      },
    });
    // Finished jobs are deleted: done when the table is empty.
    const remaining = async () =>
      utils.withPgClient(async (client) =>
        Number((await client.query("SELECT count(*) AS n FROM graphile_worker._private_jobs")).rows[0].n),
      );
    await until(async () => ran >= jobs && (await remaining()) === 0, "graphile-worker jobs");
    const seconds = now() - started;
    await runner.stop();
    await utils.release();
    // No finish times are kept: the span is first start to the empty table, on this clock.
    return throughputResult(jobs, seconds, firstStart - started, seconds - (firstStart - started));
  },
  async latency({ jobs, rate_per_s: rate }) {
    const utils = await makeWorkerUtils({ connectionString: url });
    const delays = [];
    const sentAt = new Map();
    const runner = await run({
      connectionString: url,
      concurrency: 10,
      noHandleSignals: true,
      pollInterval: 1000,
      logger: quietLogger(),
      taskList: {
        noop: async (payload) => {
          delays.push(now() - sentAt.get(payload.i));
        },
      },
    });
    await sleep(500); // let it LISTEN
    await paced(jobs, rate, async (i) => {
      sentAt.set(i, now());
      await utils.addJob("noop", { i });
    });
    await until(async () => delays.length >= jobs, "graphile-worker latency jobs");
    await runner.stop();
    await utils.release();
    return latencyResult(delays);
  },
};

function quietLogger() {
  // graphile-worker logs every job at info; keep errors only.
  return {
    scope: () => quietLogger(),
    error: (message) => console.error(message),
    warn: () => {},
    info: () => {},
    debug: () => {},
  };
}

function throughputResult(jobs, seconds, startupS, spanS) {
  const result = {
    jobs_per_s: Math.round(jobs / seconds),
    seconds: +seconds.toFixed(3),
    startup_s: +startupS.toFixed(3),
  };
  if (spanS) Object.assign(result, { span_jobs_per_s: Math.round(jobs / spanS), span_seconds: +spanS.toFixed(3) });
  return result;
}

const peers = { pgboss, graphile };
const result = await peers[peer][scenario](params);
process.stdout.write(JSON.stringify(result) + "\n");
process.exit(0);
