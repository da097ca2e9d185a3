//! The rate limit service over gRPC: `ShouldRateLimit` calls per second on one server core,
//! decisions per server CPU-second, and call latency (p50/p99/p99.9), for the `local` backend,
//! the `redis` backend on one server and on a 3-master Redis Cluster, each at saturation
//! (closed loop) and, for Redis, at a fixed 1,000 calls/s (paced).
//!
//! - **Server**: `limiter_agent::rls::serve` (the agent's own gRPC server) in a tokio runtime
//!   with one worker thread, every runtime thread pinned to [`SERVER_CPU`]. Its CPU time is
//!   the scheduler's exact run time of those threads (`/proc/self/task/TID/schedstat`), read
//!   at the edges of the measured window.
//! - **Load client**: a real tonic client (`RateLimitServiceClient` over HTTP/2 `Channel`s) in
//!   a single-threaded runtime on a thread pinned to [`CLIENT_CPU`], closed loop: a fixed
//!   number of calls in flight spread over a few connections, each task sending its next call
//!   as soon as the previous one is answered. Latency is measured per call, from just before
//!   the call to the decoded response, into a preallocated per-task `Vec<u32>` of nanoseconds.
//! - **Redis**: a real `redis-server` on a free loopback port ([`limiter_tests::redis`]),
//!   its threads pinned to the client's CPU so that the server core only runs the service;
//!   emptied before every run, killed after the section. Its own CPU time (`INFO cpu`) is
//!   reported next to the service's.
//!
//! Every run starts a fresh service (fresh engine, fresh Redis backend and negative cache,
//! empty Redis), warms up, then measures for a fixed time. Figures are medians of the runs.

// One file per part of the bench: the policy and call mix it sends, the service under test,
// the load client; this file measures runs and reports them.
mod client;
mod mix;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use limiter_agent::plan::L7Plan;
use limiter_agent::rls::redis::target::{RedisTarget, SocketType, Topology};
use limiter_agent::rls::redis::{RedisBackend, RedisStatsSnapshot};
use limiter_tests::redis::RedisServer;
use limiter_tests::redis_topology::RedisCluster;
use serde_json::{Value, json};

use crate::{Config, median, sys};
use client::{MEASURE, STOP, WARMUP, start_client};
use mix::{API_CLIENTS, HEAVY_USERS, POLICY_YAML, api_call, call_mix, plan, user_call};
use server::{cpu_delta_s, start_server};

/// The CPU the service runs on (its "one core").
pub const SERVER_CPU: usize = 1;
/// The CPU of the load client (and of redis-server).
pub const CLIENT_CPU: usize = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BackendKind {
    Local,
    Redis,
}

impl BackendKind {
    fn name(self) -> &'static str {
        match self {
            BackendKind::Local => "local",
            BackendKind::Redis => "redis",
        }
    }
}
/// The Redis a run counts in: one server or a cluster (every node emptied, measured, pinned).
#[derive(Clone, Copy)]
enum Store<'a> {
    Single(&'a RedisServer),
    Cluster(&'a RedisCluster),
}

impl Store<'_> {
    fn servers(&self) -> Vec<&RedisServer> {
        match self {
            Store::Single(s) => vec![*s],
            Store::Cluster(c) => c.nodes.iter().collect(),
        }
    }

    fn target(&self) -> Result<RedisTarget> {
        Ok(match self {
            Store::Single(s) => RedisTarget::parse(Topology::Single, SocketType::Tcp, &s.url())?,
            Store::Cluster(c) => RedisTarget::parse(Topology::Cluster, SocketType::Tcp, &c.url_list())?,
        })
    }

    fn reset(&self) -> Result<()> {
        self.servers().iter().try_for_each(|s| s.reset())
    }

    fn cpu_s(&self) -> Result<f64> {
        self.servers().iter().map(|s| redis_cpu_s(s)).sum()
    }
}

/// `used_cpu_sys + used_cpu_user` of redis-server from `INFO cpu`, seconds.
fn redis_cpu_s(server: &RedisServer) -> Result<f64> {
    let info = server.command(&["INFO", "cpu"])?.as_text().context("INFO cpu reply is not text")?;
    let field = |name: &str| -> Result<f64> {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':')?.parse::<f64>().ok())
            .with_context(|| format!("INFO cpu has no {name}"))
    };
    Ok(field("used_cpu_sys")? + field("used_cpu_user")?)
}

/// Pins every thread of redis-server (pid from `INFO server`) to [`CLIENT_CPU`].
fn pin_redis(server: &RedisServer) -> Result<()> {
    let info = server.command(&["INFO", "server"])?.as_text().context("INFO server reply is not text")?;
    let pid: i32 = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("process_id:")?.parse().ok())
        .context("INFO server has no process_id")?;
    let tasks =
        std::fs::read_dir(format!("/proc/{pid}/task")).with_context(|| format!("listing threads of pid {pid}"))?;
    for task in tasks {
        let Ok(task) = task else { continue };
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) else { continue };
        sys::pin_thread_to_cpu(tid, CLIENT_CPU).with_context(|| format!("pinning redis-server thread {tid}"))?;
    }
    Ok(())
}

/// Sizes of one run.
#[derive(Clone, Copy)]
struct Load {
    warmup: Duration,
    seconds: Duration,
    concurrency: usize,
    connections: usize,
    /// Total calls per second, paced; `None`: closed loop (saturation).
    rate: Option<f64>,
}

/// One measured run of one backend.
fn measure(
    plan: &L7Plan,
    kind: BackendKind,
    redis: Option<Store<'_>>,
    calls: &Arc<[RateLimitRequest]>,
    load: &Load,
    expected_calls: usize,
) -> Result<Value> {
    if let Some(r) = redis {
        r.reset().context("emptying redis before the run")?;
    }
    let server = start_server(plan, kind, redis.map(|r| r.target()).transpose()?)?;
    probe(server.addr, kind)?;
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let client = start_client(
        server.addr,
        Arc::clone(calls),
        load.concurrency,
        load.connections,
        Arc::clone(&phase),
        expected_calls,
        load.rate,
    )?;
    let client_tid = match client.ready.recv() {
        Ok(Ok(tid)) => tid,
        Ok(Err(e)) => return Err(e.context("the load client did not start")),
        Err(_) => bail!("the load client ended before it started"),
    };
    std::thread::sleep(load.warmup);

    let server_before = server.cpu_ns();
    let client_before = sys::thread_run_ns(client_tid).context("reading the client thread's run time")?;
    let redis_before = redis.map(|r| r.cpu_s()).transpose()?;
    let stats_before = server.redis.as_ref().map(RedisBackend::stats);
    let t0 = Instant::now();
    phase.store(MEASURE, Ordering::Relaxed);
    std::thread::sleep(load.seconds);
    // Read before the stop: a client told to stop may exit, and its schedstat with it.
    let client_after = sys::thread_run_ns(client_tid).context("reading the client thread's run time")?;
    phase.store(STOP, Ordering::Relaxed);
    let wall = t0.elapsed().as_secs_f64();
    let server_after = server.cpu_ns();
    let redis_after = redis.map(|r| r.cpu_s()).transpose()?;
    let stats_after = server.redis.as_ref().map(RedisBackend::stats);

    let outs = match client.thread.join() {
        Ok(r) => r?,
        Err(_) => bail!("the load client panicked"),
    };
    server.stop()?;

    let errors: u64 = outs.iter().map(|o| o.errors).sum();
    if errors > 0 {
        let first = outs.iter().find_map(|o| o.first_error.clone()).unwrap_or_default();
        bail!("{errors} calls to the {} backend failed (first: {first}); the figures would be wrong", kind.name());
    }
    let over_limit: u64 = outs.iter().map(|o| o.over_limit).sum();
    let late: u64 = outs.iter().map(|o| o.late).sum();
    let mut latencies: Vec<u32> = Vec::with_capacity(outs.iter().map(|o| o.latencies_ns.len()).sum());
    for o in &outs {
        latencies.extend_from_slice(&o.latencies_ns);
    }
    if latencies.is_empty() {
        bail!("no call to the {} backend completed in {wall:.2} s", kind.name());
    }
    latencies.sort_unstable();
    let n = latencies.len();
    let pct = |p: f64| f64::from(latencies[((n - 1) as f64 * p).round() as usize]) / 1e3;
    let server_cpu = cpu_delta_s(&server_before, &server_after);
    let client_cpu = client_after.saturating_sub(client_before) as f64 / 1e9;
    let mut row = json!({
        "calls": n,
        "seconds": wall,
        "calls_per_second": n as f64 / wall,
        "server_cpu_s": server_cpu,
        "server_core_busy": server_cpu / wall,
        "decisions_per_cpu_second": n as f64 / server_cpu,
        "server_cpu_us_per_call": server_cpu * 1e6 / n as f64,
        "client_cpu_us_per_call": client_cpu * 1e6 / n as f64,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
        "max_us": f64::from(latencies[n - 1]) / 1e3,
        "over_limit_share": over_limit as f64 / n as f64,
        "late_calls": late,
    });
    if let (Some(b), Some(a), Some(rb), Some(ra)) = (stats_before, stats_after, redis_before, redis_after) {
        let d = |f: fn(&RedisStatsSnapshot) -> u64| f(&a).saturating_sub(f(&b));
        row["redis"] = json!({
            "round_trips_per_call": d(|s| s.round_trips) as f64 / n as f64,
            "negative_cache_hits_per_call": d(|s| s.negative_cache_hits) as f64 / n as f64,
            "redis_cpu_us_per_call": (ra - rb) * 1e6 / n as f64,
        });
        // Zero in a healthy run: kept apart from the figures.
        row["checks"] = json!({
            "redis_errors": d(|s| s.errors),
            "failure_mode_answers": d(|s| s.failure_mode_answers),
        });
    }
    Ok(row)
}

/// One call per kind of descriptor before measuring: each descriptor must be answered with
/// the limit of the rule it is meant for, so a typo in the mix cannot turn the bench into a
/// measurement of "no rule matched".
fn probe(addr: SocketAddr, kind: BackendKind) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("probe runtime")?;
    runtime.block_on(async {
        let mut client = RateLimitServiceClient::connect(format!("http://{addr}"))
            .await
            .with_context(|| format!("connecting to the service on {addr}"))?;
        // Requests per unit of the rule each descriptor must reach (see POLICY_YAML).
        let probes = [(user_call("probe-user"), vec![50, 1_000_000]), (api_call("probe-client"), vec![1000])];
        for (request, limits) in probes {
            let response = client
                .should_rate_limit(request.clone())
                .await
                .with_context(|| format!("probe call to the {} backend", kind.name()))?
                .into_inner();
            let got: Vec<Option<u32>> =
                response.statuses.iter().map(|s| s.current_limit.as_ref().map(|l| l.requests_per_unit)).collect();
            let want: Vec<Option<u32>> = limits.into_iter().map(Some).collect();
            if got != want {
                bail!("probe {request:?} got limits {got:?}, expected {want:?}: the mix does not reach its rules");
            }
        }
        Ok(())
    })
}

pub fn run(cfg: &Config) -> Result<Value> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if cores < 2 {
        bail!(
            "the rls section pins the service and its client to CPUs {SERVER_CPU} and {CLIENT_CPU}: needs 2 CPUs, found {cores}"
        );
    }
    let plan = plan()?;
    let calls: Arc<[RateLimitRequest]> = call_mix(cfg.rls_users).into();
    let load = Load {
        warmup: Duration::from_secs_f64(cfg.rls_warmup_seconds),
        seconds: Duration::from_secs_f64(cfg.rls_seconds),
        concurrency: cfg.rls_concurrency,
        connections: cfg.rls_connections,
        rate: None,
    };
    // Enough room for 200,000 calls/s over the window.
    let expected_calls = (200_000.0 * cfg.rls_seconds) as usize;
    let redis = RedisServer::start().context("starting redis-server for the redis backend")?;
    pin_redis(&redis)?;
    let cluster = RedisCluster::start(3).context("starting a 3-master Redis Cluster for the redis backend")?;
    for node in &cluster.nodes {
        pin_redis(node)?;
    }

    let mut rows = Vec::new();
    // (row label, backend, Redis, paced rate): saturation first, then the fixed 1,000 calls/s
    // the reference's published Redis Cluster p99 (4.96 ms, envoyproxy/ratelimit#1041) is at.
    let cases: [(&str, BackendKind, Option<Store<'_>>, Option<f64>); 5] = [
        ("local", BackendKind::Local, None, None),
        ("redis", BackendKind::Redis, Some(Store::Single(&redis)), None),
        ("redis-cluster", BackendKind::Redis, Some(Store::Cluster(&cluster)), None),
        ("redis @ 1,000/s", BackendKind::Redis, Some(Store::Single(&redis)), Some(1000.0)),
        ("redis-cluster @ 1,000/s", BackendKind::Redis, Some(Store::Cluster(&cluster)), Some(1000.0)),
    ];
    for (label, kind, store, rate) in cases {
        let load = Load { rate, ..load };
        let mut runs = Vec::new();
        for _ in 0..cfg.runs {
            runs.push(measure(&plan, kind, store, &calls, &load, expected_calls)?);
        }
        let med = |key: &str| median(&runs.iter().map(|r| r[key].as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>());
        let mut row = json!({
            "backend": label,
            "rate": rate,
            "late_calls": runs.iter().map(|r| r["late_calls"].as_u64().unwrap_or(0)).sum::<u64>(),
            "runs": runs.len(),
            "calls_per_second": med("calls_per_second"),
            "decisions_per_cpu_second": med("decisions_per_cpu_second"),
            "server_core_busy": med("server_core_busy"),
            "server_cpu_us_per_call": med("server_cpu_us_per_call"),
            "client_cpu_us_per_call": med("client_cpu_us_per_call"),
            "p50_us": med("p50_us"),
            "p99_us": med("p99_us"),
            "p999_us": med("p999_us"),
            "over_limit_share": med("over_limit_share"),
        });
        if kind == BackendKind::Redis {
            let med_redis = |key: &str| {
                median(&runs.iter().map(|r| r["redis"][key].as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>())
            };
            row["redis"] = json!({
                "round_trips_per_call": med_redis("round_trips_per_call"),
                "negative_cache_hits_per_call": med_redis("negative_cache_hits_per_call"),
                "redis_cpu_us_per_call": med_redis("redis_cpu_us_per_call"),
            });
        }
        eprintln!(
            "rls: {:<23}: {:.0} calls/s, {:.0} per server CPU-second (core {:.0}% busy), p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, {:.1}% over limit",
            label,
            med("calls_per_second"),
            med("decisions_per_cpu_second"),
            med("server_core_busy") * 100.0,
            med("p50_us"),
            med("p99_us"),
            med("p999_us"),
            med("over_limit_share") * 100.0
        );
        row["runs_detail"] = Value::Array(runs);
        rows.push(row);
    }
    drop(redis);
    drop(cluster);
    Ok(json!({
        "rows": rows,
        // Settings, not figures (the smoke test skips `config` objects).
        "config": {
            "seconds": cfg.rls_seconds,
            "warmup_seconds": cfg.rls_warmup_seconds,
            "concurrency": cfg.rls_concurrency,
            "connections": cfg.rls_connections,
            "users": cfg.rls_users,
            "heavy_users": HEAVY_USERS,
            "api_clients": API_CLIENTS,
            "distinct_calls": calls.len(),
            "server_cpu": SERVER_CPU,
            "client_cpu": CLIENT_CPU,
        },
        "policy_yaml": POLICY_YAML,
    }))
}
