//! The service under test, on its own pinned thread and runtime, and the CPU time its threads
//! use.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use limiter_agent::l7::{Engine, EngineConfig};
use limiter_agent::metrics::Metrics;
use limiter_agent::plan::L7Plan;
use limiter_agent::rls::redis::target::RedisTarget;
use limiter_agent::rls::redis::{RedisBackend, RedisConfig};
use limiter_agent::rls::{self, Backend, RateLimiter, RlsConfig};
use tokio::sync::watch;

use super::{BackendKind, SERVER_CPU};
use crate::sys;

/// Calls the service decides at once before answering `RESOURCE_EXHAUSTED`: far above the
/// client's concurrency, so no call of the bench is refused.
const MAX_IN_FLIGHT: usize = 1024;

/// The running service of one run, as the measuring thread sees it.
pub(super) struct Server {
    pub(super) addr: SocketAddr,
    /// Threads of the server's runtime (worker, blocking pool, the thread driving it).
    tids: Arc<Mutex<Vec<i32>>>,
    pub(super) redis: Option<RedisBackend>,
    shutdown: watch::Sender<bool>,
    thread: std::thread::JoinHandle<Result<()>>,
}

/// Starts the service on its own pinned thread with a one-worker runtime.
pub(super) fn start_server(plan: &L7Plan, kind: BackendKind, redis: Option<RedisTarget>) -> Result<Server> {
    let plan = plan.clone();
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
                    let (backend, redis) = match (kind, redis) {
                        (BackendKind::Redis, Some(target)) => {
                            let redis = RedisBackend::connect_to(&target, None, RedisConfig::default())
                                .await
                                .with_context(|| format!("creating the Redis backend for {target}"))?;
                            if !redis.is_connected() {
                                bail!("the Redis backend did not connect to {target}");
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
    pub(super) fn cpu_ns(&self) -> HashMap<i32, u64> {
        let tids = self.tids.lock().map(|t| t.clone()).unwrap_or_default();
        tids.into_iter().filter_map(|tid| Some((tid, sys::thread_run_ns(tid)?))).collect()
    }

    pub(super) fn stop(self) -> Result<()> {
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
pub(super) fn cpu_delta_s(before: &HashMap<i32, u64>, after: &HashMap<i32, u64>) -> f64 {
    let ns: u64 = after.iter().map(|(tid, a)| a.saturating_sub(before.get(tid).copied().unwrap_or(0))).sum();
    ns as f64 / 1e9
}
