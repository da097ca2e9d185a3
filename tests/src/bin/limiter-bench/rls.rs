//! The rate limit service over gRPC: `ShouldRateLimit` calls per second on one server core,
//! decisions per server CPU-second, and call latency (p50/p99/p99.9), for the `local` and the
//! `redis` backend.
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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code as ProtoCode;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use limiter_agent::l7::{Engine, EngineConfig};
use limiter_agent::metrics::Metrics;
use limiter_agent::plan::L7Plan;
use limiter_agent::policy::{self, Document, PolicySet};
use limiter_agent::rls::redis::{RedisBackend, RedisConfig, RedisStatsSnapshot};
use limiter_agent::rls::{self, Backend, RateLimiter, RlsConfig};
use limiter_tests::redis::RedisServer;
use serde_json::{Value, json};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::{Config, median, sys};

/// The CPU the service runs on (its "one core").
pub const SERVER_CPU: usize = 1;
/// The CPU of the load client (and of redis-server).
pub const CLIENT_CPU: usize = 0;

/// Calls the service decides at once before answering `RESOURCE_EXHAUSTED`: far above the
/// client's concurrency, so no call of the bench is refused.
const MAX_IN_FLIGHT: usize = 1024;
/// Users that send far more than the rest (their calls are the over-limit ones).
const HEAVY_USERS: usize = 4;
/// Clients of the envoyproxy/ratelimit domain.
const API_CLIENTS: usize = 256;
/// The client of the ratelimit domain that is over its limit all day.
const ABUSER: &str = "abuser";

/// Domain `limiter` (gateway kinds): a per-user token bucket (one per `x-user-id`) and a
/// route-wide ceiling every call also charges; domain `bench-api` (an envoyproxy/ratelimit
/// config): a fixed window per client, and one client allowed a single call per day.
pub const POLICY_YAML: &str = "\
apiVersion: limiter.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: bench-rls}
spec:
  targetRefs:
    - {kind: HTTPRoute, name: bench-route}
  rateLimit:
    local:
      rules:
        - name: per-user
          clientSelectors: [{headers: [{name: x-user-id, type: Distinct}]}]
          limit: {requests: 50, unit: Second}
        - name: route-ceiling
          count: Requests
          limit: {requests: 1000000, unit: Second}
---
domain: bench-api
descriptors:
  - key: client_id
    rate_limit: {unit: second, requests_per_unit: 1000}
  - key: client_id
    value: abuser
    rate_limit: {unit: day, requests_per_unit: 1}
";

/// The rule names every descriptor of the mix must hit (checked on a probe call).
const PER_USER_RULE: &str = "bench-rls/per-user";
const CEILING_RULE: &str = "bench-rls/route-ceiling";

/// The L7 plan of [`POLICY_YAML`], through the agent's loader and compiler.
pub fn plan() -> Result<L7Plan> {
    let docs = match policy::load_file_str(Path::new("bench-rls.yaml"), POLICY_YAML) {
        Ok(d) => d,
        Err(e) => bail!("the bench's RLS policy does not load: {e}"),
    };
    let mut set = PolicySet::default();
    for doc in docs {
        match doc {
            Document::Policy(p) => set.policies.push(p),
            Document::RatelimitConfig(c) => set.ratelimit_configs.push(c),
        }
    }
    let compiled = match policy::compile(&set).into_result() {
        Ok(c) => c,
        Err(e) => bail!("the bench's RLS policy does not compile: {e}"),
    };
    for name in [PER_USER_RULE, CEILING_RULE] {
        if !compiled.l7.rules.iter().any(|r| r.name == name) {
            bail!("the bench's RLS policy has no L7 rule {name:?}; its rules: {:?}", rule_names(&compiled.l7));
        }
    }
    Ok(compiled.l7)
}

fn rule_names(plan: &L7Plan) -> Vec<&str> {
    plan.rules.iter().map(|r| r.name.as_str()).collect()
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries.iter().map(|(k, v)| Entry { key: (*k).to_owned(), value: (*v).to_owned() }).collect(),
        ..Default::default()
    }
}

/// What Envoy sends for a request of `user` on the bench route (domain `limiter`).
fn user_call(user: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: "limiter".into(),
        descriptors: vec![
            descriptor(&[("generic_key", PER_USER_RULE), ("x-user-id", user)]),
            descriptor(&[("generic_key", CEILING_RULE)]),
        ],
        hits_addend: 0,
    }
}

/// What Envoy sends for an API client under the envoyproxy/ratelimit config.
fn api_call(client: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: "bench-api".into(),
        descriptors: vec![descriptor(&[("client_id", client)])],
        hits_addend: 0,
    }
}

/// The call sequence the client tasks walk through (each from its own offset, wrapping):
/// of every 16 calls, 12 in domain `limiter` (11 from regular users, visited round-robin
/// with a stride so each gets an even share, 1 from one of [`HEAVY_USERS`]), 4 in domain
/// `bench-api` (3 from its regular clients, 1 from [`ABUSER`] every fourth time, so 1 in 64
/// calls is the abuser's).
pub fn call_mix(users: usize) -> Vec<RateLimitRequest> {
    let users = users.max(1);
    let len = (users * 2).max(4096).next_multiple_of(64);
    let (mut regular, mut heavy, mut api) = (0usize, 0usize, 0usize);
    (0..len)
        .map(|i| match i % 16 {
            0..=10 => {
                regular += 1;
                user_call(&format!("user-{:05}", (regular * 97) % users))
            }
            11 => {
                heavy += 1;
                user_call(&format!("heavy-{}", heavy % HEAVY_USERS))
            }
            15 if (i / 16) % 4 == 0 => api_call(ABUSER),
            _ => {
                api += 1;
                api_call(&format!("client-{:03}", (api * 31) % API_CLIENTS))
            }
        })
        .collect()
}

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

/// The running service of one run, as the measuring thread sees it.
struct Server {
    addr: SocketAddr,
    /// Threads of the server's runtime (worker, blocking pool, the thread driving it).
    tids: Arc<Mutex<Vec<i32>>>,
    redis: Option<RedisBackend>,
    shutdown: watch::Sender<bool>,
    thread: std::thread::JoinHandle<Result<()>>,
}

/// Starts the service on its own pinned thread with a one-worker runtime.
fn start_server(plan: &L7Plan, kind: BackendKind, redis_url: Option<&str>) -> Result<Server> {
    let plan = plan.clone();
    let redis_url = redis_url.map(str::to_owned);
    let tids = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(SocketAddr, Option<RedisBackend>)>>();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let thread_tids = Arc::clone(&tids);
    let thread = std::thread::Builder::new()
        .name("rls-server".into())
        .spawn(move || -> Result<()> {
            // Threads inherit the affinity of the thread that creates them: every runtime
            // thread below runs on SERVER_CPU.
            sys::pin_to_cpu(SERVER_CPU)?;
            record_tid(&thread_tids);
            let start_tids = Arc::clone(&thread_tids);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("rls-server-rt")
                .on_thread_start(move || record_tid(&start_tids))
                .enable_all()
                .build()
                .context("building the service's tokio runtime")?;
            runtime.block_on(async move {
                let started = async {
                    let engine = Arc::new(Engine::new(plan, EngineConfig::default()));
                    let (backend, redis) = match (kind, redis_url) {
                        (BackendKind::Redis, Some(url)) => {
                            let redis = RedisBackend::connect(&url, RedisConfig::default())
                                .await
                                .with_context(|| format!("creating the Redis backend for {url}"))?;
                            if !redis.is_connected() {
                                bail!("the Redis backend did not connect to {url}");
                            }
                            (Backend::Redis(redis.clone()), Some(redis))
                        }
                        (BackendKind::Redis, None) => bail!("the redis backend needs a server URL"),
                        (BackendKind::Local, _) => (Backend::Local, None),
                    };
                    let limiter =
                        Arc::new(RateLimiter::new(engine, backend, Arc::new(Metrics::new()), None, MAX_IN_FLIGHT));
                    let config = RlsConfig { listen: SocketAddr::from(([127, 0, 0, 1], 0)), ..RlsConfig::default() };
                    let running = rls::serve(&config, limiter, shutdown_rx).await.context("starting the service")?;
                    Ok((running, redis))
                };
                let (running, redis) = match started.await {
                    Ok(s) => s,
                    Err(e) => {
                        let text = format!("{e:#}");
                        let _ = ready_tx.send(Err(e));
                        bail!("{text}");
                    }
                };
                let _ = ready_tx.send(Ok((running.addr, redis)));
                match tokio::time::timeout(Duration::from_secs(10), running.task).await {
                    Ok(Ok(Ok(()))) => Ok(()),
                    Ok(Ok(Err(e))) => bail!("the service failed: {e}"),
                    Ok(Err(e)) => bail!("the service's task panicked: {e}"),
                    Err(_) => bail!("the service did not stop within 10 s of its shutdown signal"),
                }
            })
        })
        .context("spawning the service's thread")?;
    let (addr, redis) = match ready_rx.recv() {
        Ok(Ok(ready)) => ready,
        Ok(Err(e)) => return Err(e.context("the service did not start")),
        Err(_) => {
            let err = match thread.join() {
                Ok(Err(e)) => e,
                _ => anyhow::anyhow!("the service's thread ended without a word"),
            };
            return Err(err.context("the service did not start"));
        }
    };
    Ok(Server { addr, tids, redis, shutdown, thread })
}

impl Server {
    fn cpu_ns(&self) -> HashMap<i32, u64> {
        let tids = self.tids.lock().map(|t| t.clone()).unwrap_or_default();
        tids.into_iter().filter_map(|tid| Some((tid, sys::thread_run_ns(tid)?))).collect()
    }

    fn stop(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        match self.thread.join() {
            Ok(r) => r,
            Err(_) => bail!("the service's thread panicked"),
        }
    }
}

fn record_tid(tids: &Mutex<Vec<i32>>) {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    if let Ok(mut t) = tids.lock() {
        t.push(tid);
    }
}

/// CPU used between two snapshots of per-thread run time: threads present in both count
/// their difference, threads that appeared in between count whole (a thread that exited in
/// between is lost, which only the idle blocking pool could do).
fn cpu_delta_s(before: &HashMap<i32, u64>, after: &HashMap<i32, u64>) -> f64 {
    let ns: u64 = after.iter().map(|(tid, a)| a.saturating_sub(before.get(tid).copied().unwrap_or(0))).sum();
    ns as f64 / 1e9
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// What one client task saw while measuring.
struct TaskOut {
    latencies_ns: Vec<u32>,
    over_limit: u64,
    errors: u64,
    first_error: Option<String>,
}

/// The load client: `concurrency` tasks over `connections` HTTP/2 connections, on one
/// pinned thread. Returns once `phase` turns [`STOP`].
struct Client {
    ready: mpsc::Receiver<Result<i32>>,
    thread: std::thread::JoinHandle<Result<Vec<TaskOut>>>,
}

fn start_client(
    addr: SocketAddr,
    calls: Arc<[RateLimitRequest]>,
    concurrency: usize,
    connections: usize,
    phase: Arc<AtomicU8>,
    expected_calls: usize,
) -> Result<Client> {
    let (ready_tx, ready) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("rls-client".into())
        .spawn(move || -> Result<Vec<TaskOut>> {
            let setup = || -> Result<tokio::runtime::Runtime> {
                sys::pin_to_cpu(CLIENT_CPU)?;
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building the client runtime")
            };
            let runtime = match setup() {
                Ok(r) => r,
                Err(e) => {
                    let text = format!("{e:#}");
                    let _ = ready_tx.send(Err(e));
                    bail!("{text}");
                }
            };
            runtime.block_on(async move {
                let connect = async {
                    let mut channels = Vec::with_capacity(connections);
                    for _ in 0..connections.max(1) {
                        let channel = Channel::from_shared(format!("http://{addr}"))
                            .context("the service's URI")?
                            .tcp_nodelay(true)
                            .connect()
                            .await
                            .with_context(|| format!("connecting to the service on {addr}"))?;
                        channels.push(channel);
                    }
                    Ok::<_, anyhow::Error>(channels)
                };
                let channels = match connect.await {
                    Ok(c) => c,
                    Err(e) => {
                        let text = format!("{e:#}");
                        let _ = ready_tx.send(Err(e));
                        bail!("{text}");
                    }
                };
                // Room for every call of the measured window, so the vectors do not grow in it.
                let capacity = expected_calls / concurrency.max(1) + 1024;
                let tasks: Vec<_> = (0..concurrency.max(1))
                    .map(|t| {
                        let client = RateLimitServiceClient::new(channels[t % channels.len()].clone());
                        let offset = t * calls.len() / concurrency.max(1);
                        tokio::spawn(client_task(client, Arc::clone(&calls), offset, Arc::clone(&phase), capacity))
                    })
                    .collect();
                // SAFETY: gettid has no preconditions.
                let _ = ready_tx.send(Ok(unsafe { libc::gettid() }));
                let mut outs = Vec::with_capacity(tasks.len());
                for task in tasks {
                    outs.push(task.await.context("a client task panicked")?);
                }
                Ok(outs)
            })
        })
        .context("spawning the client thread")?;
    Ok(Client { ready, thread })
}

async fn client_task(
    mut client: RateLimitServiceClient<Channel>,
    calls: Arc<[RateLimitRequest]>,
    mut next: usize,
    phase: Arc<AtomicU8>,
    capacity: usize,
) -> TaskOut {
    let mut out = TaskOut { latencies_ns: Vec::with_capacity(capacity), over_limit: 0, errors: 0, first_error: None };
    loop {
        if phase.load(Ordering::Relaxed) == STOP {
            return out;
        }
        let request = calls[next % calls.len()].clone();
        next += 1;
        let started = Instant::now();
        let result = client.should_rate_limit(request).await;
        let elapsed = started.elapsed();
        // A call counts if it completes inside the measured window.
        if phase.load(Ordering::Relaxed) != MEASURE {
            continue;
        }
        match result {
            Ok(response) => {
                let response: RateLimitResponse = response.into_inner();
                out.over_limit += u64::from(response.overall_code == ProtoCode::OverLimit as i32);
                out.latencies_ns.push(u32::try_from(elapsed.as_nanos()).unwrap_or(u32::MAX));
            }
            Err(status) => {
                out.errors += 1;
                if out.first_error.is_none() {
                    out.first_error = Some(format!("{}: {}", status.code(), status.message()));
                }
            }
        }
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
struct Load {
    warmup: Duration,
    seconds: Duration,
    concurrency: usize,
    connections: usize,
}

/// One measured run of one backend.
fn measure(
    plan: &L7Plan,
    kind: BackendKind,
    redis: Option<&RedisServer>,
    calls: &Arc<[RateLimitRequest]>,
    load: &Load,
    expected_calls: usize,
) -> Result<Value> {
    if let Some(r) = redis {
        r.reset().context("emptying redis before the run")?;
    }
    let server = start_server(plan, kind, redis.map(RedisServer::url).as_deref())?;
    probe(server.addr, kind)?;
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let client = start_client(
        server.addr,
        Arc::clone(calls),
        load.concurrency,
        load.connections,
        Arc::clone(&phase),
        expected_calls,
    )?;
    let client_tid = match client.ready.recv() {
        Ok(Ok(tid)) => tid,
        Ok(Err(e)) => return Err(e.context("the load client did not start")),
        Err(_) => bail!("the load client ended before it started"),
    };
    std::thread::sleep(load.warmup);

    let server_before = server.cpu_ns();
    let client_before = sys::thread_run_ns(client_tid).context("reading the client thread's run time")?;
    let redis_before = redis.map(redis_cpu_s).transpose()?;
    let stats_before = server.redis.as_ref().map(RedisBackend::stats);
    let t0 = Instant::now();
    phase.store(MEASURE, Ordering::Relaxed);
    std::thread::sleep(load.seconds);
    phase.store(STOP, Ordering::Relaxed);
    let wall = t0.elapsed().as_secs_f64();
    let server_after = server.cpu_ns();
    let client_after = sys::thread_run_ns(client_tid).context("reading the client thread's run time")?;
    let redis_after = redis.map(redis_cpu_s).transpose()?;
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
    };
    // Enough room for 200,000 calls/s over the window.
    let expected_calls = (200_000.0 * cfg.rls_seconds) as usize;
    let redis = RedisServer::start().context("starting redis-server for the redis backend")?;
    pin_redis(&redis)?;

    let mut rows = Vec::new();
    for kind in [BackendKind::Local, BackendKind::Redis] {
        let mut runs = Vec::new();
        for _ in 0..cfg.runs {
            let server_redis = (kind == BackendKind::Redis).then_some(&redis);
            runs.push(measure(&plan, kind, server_redis, &calls, &load, expected_calls)?);
        }
        let med = |key: &str| median(&runs.iter().map(|r| r[key].as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>());
        let mut row = json!({
            "backend": kind.name(),
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
            "rls: {:<5}: {:.0} calls/s, {:.0} per server CPU-second (core {:.0}% busy), p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, {:.1}% over limit",
            kind.name(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_compiles_to_the_rules_the_mix_names() {
        let plan = plan().unwrap();
        assert!(rule_names(&plan).contains(&PER_USER_RULE));
        assert!(plan.rules.iter().any(|r| r.domain == "bench-api"));
    }

    #[test]
    fn the_mix_has_its_shares() {
        let calls = call_mix(4096);
        let n = calls.len() as f64;
        let share = |f: &dyn Fn(&RateLimitRequest) -> bool| calls.iter().filter(|c| f(c)).count() as f64 / n;
        let value = |c: &RateLimitRequest| c.descriptors[0].entries.last().map(|e| e.value.clone()).unwrap_or_default();
        assert_eq!(share(&|c| c.domain == "limiter"), 12.0 / 16.0);
        assert_eq!(share(&|c| value(c).starts_with("heavy-")), 1.0 / 16.0);
        assert_eq!(share(&|c| value(c) == ABUSER), 1.0 / 64.0);
    }
}
