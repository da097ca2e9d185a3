//! The load client: tonic clients on one pinned thread, with the latency of every call. Closed
//! loop (each task sends its next call when the previous one is answered), or paced to a fixed
//! total rate (each task sends on its own schedule, and at once when it is behind).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code as ProtoCode;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::transport::Channel;

use super::CLIENT_CPU;
use crate::sys;

pub(super) const WARMUP: u8 = 0;
pub(super) const MEASURE: u8 = 1;
pub(super) const STOP: u8 = 2;

/// What one client task saw while measuring.
pub(super) struct TaskOut {
    pub(super) latencies_ns: Vec<u32>,
    pub(super) over_limit: u64,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    /// Paced calls sent more than a millisecond after their scheduled time (the client was
    /// behind: the rate was not held).
    pub(super) late: u64,
}

/// The load client: `concurrency` tasks over `connections` HTTP/2 connections, on one
/// pinned thread. Returns once `phase` turns [`STOP`].
pub(super) struct Client {
    pub(super) ready: mpsc::Receiver<Result<i32>>,
    pub(super) thread: std::thread::JoinHandle<Result<Vec<TaskOut>>>,
}

pub(super) fn start_client(
    addr: SocketAddr,
    calls: Arc<[RateLimitRequest]>,
    concurrency: usize,
    connections: usize,
    phase: Arc<AtomicU8>,
    expected_calls: usize,
    rate: Option<f64>,
) -> Result<Client> {
    // Each task's share of the total rate.
    let pace = rate.map(|r| Duration::from_secs_f64(concurrency.max(1) as f64 / r));
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
                        let task = client_task(client, Arc::clone(&calls), offset, Arc::clone(&phase), capacity, pace);
                        tokio::spawn(task)
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
    pace: Option<Duration>,
) -> TaskOut {
    let mut out =
        TaskOut { latencies_ns: Vec::with_capacity(capacity), over_limit: 0, errors: 0, first_error: None, late: 0 };
    // Tasks start spread over one period, not all at once.
    let mut due = tokio::time::Instant::now() + pace.map_or(Duration::ZERO, |p| p.mul_f64((next % 97) as f64 / 97.0));
    loop {
        if phase.load(Ordering::Relaxed) == STOP {
            return out;
        }
        if let Some(pace) = pace {
            tokio::time::sleep_until(due).await;
            if tokio::time::Instant::now() > due + Duration::from_millis(1) && phase.load(Ordering::Relaxed) == MEASURE
            {
                out.late += 1;
            }
            due += pace;
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
