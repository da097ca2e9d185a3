//! Prometheus metrics of the agent, served as text on `GET /metrics` (`limiter-agent run
//! --metrics-listen 127.0.0.1:9091`).
//!
//! One [`Metrics`] value owns the registry and a typed handle for each metric; the rate limit
//! service, the run loop and the Redis backend update them, [`serve`] answers scrapes. The
//! text is the OpenMetrics flavour of the Prometheus text format that `prometheus-client`
//! writes (Prometheus reads it; counters are exposed with the `_total` suffix).
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `limiter_rls_decisions_total` | `domain`, `rule`, `code` | one per descriptor answered (`code` `OK`/`OVER_LIMIT`; `rule` empty when no rule matched) |
//! | `limiter_rls_shadow_over_limit_total` | `domain`, `rule` | descriptors a shadow-mode rule would have denied (answered OK) |
//! | `limiter_rls_request_errors_total` | `reason` | requests refused with a gRPC error (`invalid_argument`, `overloaded`, `permission_denied`; requests over the size limit are refused by tonic before the service sees them and are not counted) |
//! | `limiter_rls_decision_duration_seconds` | | time to decide one `ShouldRateLimit` call (histogram) |
//! | `limiter_rls_redis_errors_total` | | failed Redis round trips and connection attempts (0 with the local backend) |
//! | `limiter_rls_redis_failure_mode_answers_total` | | descriptors answered by `failureMode` because Redis was unreachable |
//! | `limiter_rls_redis_reconnects_total` | | connections remade after a loss (a Sentinel failover, a Cluster or server restart) |
//! | `limiter_policy_reloads_total` | `outcome` | reloads `applied` and `rejected` (the last good policy stays) |
//! | `limiter_escalations_total` | `policy` | sources put in the XDP block list by a policy's `penalty` |
//! | `limiter_global_source_holds_total` | `rule` | sources blocked until the window ends, over a global per-source rule's limit across nodes (once per source per window) |
//! | `limiter_l7_tracked_keys` | | keyed L7 counters held (bounded by `--l7-max-keys`) |
//!
//! Label values are bounded: `rule` and `policy` come from the plan; `domain` is the
//! request's domain only when the plan has rules for it, else `_unknown_` (Envoy sends any
//! domain it is configured with; an unbounded label would let a client grow memory).
//!
//! The labelled counters the control socket's snapshot shows (`limiter-agent top`) are
//! [`CounterFamily`]s, which can be read back: prometheus-client 0.25's `Family` can only be
//! encoded, not iterated.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use log::{info, warn};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::l7::Engine;
use crate::rls::redis::RedisBackend;

/// The `domain` label of requests for a domain the plan has no rules for.
pub const UNKNOWN_DOMAIN: &str = "_unknown_";
/// The `code` labels of `limiter_rls_decisions_total`.
pub const CODE_OK: &str = "OK";
pub const CODE_OVER_LIMIT: &str = "OVER_LIMIT";

/// Scrapes answered at once; more connections are closed unanswered.
const MAX_SCRAPERS: usize = 8;
/// A scraper gets this long to send its request head and read the answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub domain: String,
    pub rule: String,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub domain: String,
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KernelRuleLabels {
    pub rule: String,
}

/// A labelled counter that can be read back as well as scraped: the `Family` that is
/// registered, plus the label sets it holds (prometheus-client 0.25 cannot list them). The
/// label sets are as bounded as the family's own (see the module docs).
#[derive(Debug)]
pub struct CounterFamily<L> {
    family: Family<L, Counter>,
    labels: Mutex<HashSet<L>>,
}

impl<L: Clone + Hash + Eq> Default for CounterFamily<L> {
    fn default() -> Self {
        Self { family: Family::default(), labels: Mutex::new(HashSet::new()) }
    }
}

impl<L: Clone + Hash + Eq> CounterFamily<L> {
    /// Adds one to the counter of `labels`.
    pub fn inc(&self, labels: &L) {
        if let Some(counter) = self.family.get(labels) {
            counter.inc();
            return;
        }
        // First use of this label set: note it before the family has it, so that a reader
        // never sees a counter it cannot list (inserting twice is harmless).
        self.labels.lock().unwrap_or_else(PoisonError::into_inner).insert(labels.clone());
        self.family.get_or_create(labels).inc();
    }

    /// The counter of `labels` (0 if it was never incremented).
    pub fn get(&self, labels: &L) -> u64 {
        self.family.get(labels).map_or(0, |c| c.get())
    }

    /// Every label set with its count, in no particular order.
    pub fn values(&self) -> Vec<(L, u64)> {
        let labels: Vec<L> = self.labels.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect();
        // One family read at a time: holding two of its guards at once can deadlock.
        labels
            .into_iter()
            .map(|l| {
                let n = self.get(&l);
                (l, n)
            })
            .collect()
    }

    /// Sum over every label set.
    pub fn total(&self) -> u64 {
        self.values().iter().map(|(_, n)| n).sum()
    }
}

/// Every metric of the agent. Shared as `Arc<Metrics>`; updates take `&self`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub rls_decisions: CounterFamily<DecisionLabels>,
    pub rls_shadow_over_limit: CounterFamily<RuleLabels>,
    pub rls_request_errors: CounterFamily<ReasonLabels>,
    pub rls_decision_seconds: Histogram,
    pub policy_reloads: Family<OutcomeLabels, Counter>,
    pub escalations: CounterFamily<PolicyLabels>,
    /// Live nodes in this node's last view of the node set (global kernel rules).
    pub global_nodes: Gauge,
    /// This node's share of each global kernel rule, in requests per the rule's unit.
    pub global_shares: Family<KernelRuleLabels, Gauge>,
    /// Sources held (blocked on this node for the rest of a window) because their total
    /// across nodes went over a global per-source rule's limit; once per source per window.
    pub global_source_holds: CounterFamily<KernelRuleLabels>,
    sources: Arc<Sources>,
}

/// Values read at scrape time from the components that count them themselves.
#[derive(Debug, Default)]
struct Sources {
    redis: Mutex<Option<RedisBackend>>,
    engine: Mutex<Option<Arc<Engine>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let rls_decisions = CounterFamily::<DecisionLabels>::default();
        registry.register(
            "limiter_rls_decisions",
            "Rate limit service descriptors answered, by domain, rule and code",
            rls_decisions.family.clone(),
        );
        let rls_shadow_over_limit = CounterFamily::<RuleLabels>::default();
        registry.register(
            "limiter_rls_shadow_over_limit",
            "Descriptors a shadow-mode rule would have denied (answered OK)",
            rls_shadow_over_limit.family.clone(),
        );
        let rls_request_errors = CounterFamily::<ReasonLabels>::default();
        registry.register(
            "limiter_rls_request_errors",
            "ShouldRateLimit calls refused with a gRPC error, by reason",
            rls_request_errors.family.clone(),
        );
        // 5 us .. ~84 ms: local decisions take microseconds, Redis ones a round trip.
        let rls_decision_seconds = Histogram::new(exponential_buckets(5e-6, 2.0, 15));
        registry.register_with_unit(
            "limiter_rls_decision_duration",
            "Time to decide one ShouldRateLimit call",
            prometheus_client::registry::Unit::Seconds,
            rls_decision_seconds.clone(),
        );
        let policy_reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "limiter_policy_reloads",
            "Policy reloads, applied or rejected (a rejected set leaves the last good one in force)",
            policy_reloads.clone(),
        );
        let escalations = CounterFamily::<PolicyLabels>::default();
        registry.register(
            "limiter_escalations",
            "Sources put in the XDP block list by a policy's penalty",
            escalations.family.clone(),
        );
        let global_nodes = Gauge::default();
        registry.register(
            "limiter_global_nodes",
            "Live nodes sharing the global kernel rules, in this node's last view (1 alone)",
            global_nodes.clone(),
        );
        let global_source_holds = CounterFamily::<KernelRuleLabels>::default();
        registry.register(
            "limiter_global_source_holds",
            "Sources blocked until the window ends because their total across nodes went over a global per-source rule's limit",
            global_source_holds.family.clone(),
        );
        let global_shares = Family::<KernelRuleLabels, Gauge>::default();
        registry.register(
            "limiter_global_share_requests",
            "This node's share of each global kernel rule's limit, in requests per the rule's unit",
            global_shares.clone(),
        );
        let sources = Arc::new(Sources::default());
        registry.register_collector(Box::new(Arc::clone(&sources)));
        Metrics {
            registry,
            rls_decisions,
            rls_shadow_over_limit,
            rls_request_errors,
            rls_decision_seconds,
            policy_reloads,
            escalations,
            global_nodes,
            global_shares,
            global_source_holds,
            sources,
        }
    }

    /// Exports the Redis backend's own counters (errors, failure-mode answers) on every scrape.
    pub fn watch_redis(&self, backend: RedisBackend) {
        *self.sources.redis.lock().unwrap_or_else(PoisonError::into_inner) = Some(backend);
    }

    /// Exports the L7 engine's counter occupancy on every scrape.
    pub fn watch_engine(&self, engine: Arc<Engine>) {
        *self.sources.engine.lock().unwrap_or_else(PoisonError::into_inner) = Some(engine);
    }

    /// Exports the shares of global kernel rules in force and the live nodes they follow.
    pub fn global_shares(&self, nodes: u64, shares: &std::collections::BTreeMap<String, crate::plan::Limit>) {
        self.global_nodes.set(i64::try_from(nodes).unwrap_or(i64::MAX));
        // Rules a reload removed must not linger: rebuilt whole (a handful of rules).
        self.global_shares.clear();
        for (rule, limit) in shares {
            let requests = i64::try_from(limit.requests).unwrap_or(i64::MAX);
            self.global_shares.get_or_create(&KernelRuleLabels { rule: rule.clone() }).set(requests);
        }
    }

    pub fn reload(&self, applied: bool) {
        let outcome = if applied { "applied" } else { "rejected" };
        self.policy_reloads.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            // Only a formatter error, which writing to a String never returns.
            let _ = writeln!(text, "# encoding failed: {e}");
        }
        text
    }
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let redis = self.redis.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(RedisBackend::stats);
        let redis = redis.unwrap_or_default();
        let counters = [
            ("limiter_rls_redis_errors", "Failed Redis round trips and connection attempts", redis.errors),
            (
                "limiter_rls_redis_failure_mode_answers",
                "Descriptors answered by failureMode because Redis was unreachable",
                redis.failure_mode_answers,
            ),
            (
                "limiter_rls_redis_reconnects",
                "Redis connections remade after a loss (failover, restart)",
                redis.reconnects,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let tracked = self.engine.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|e| e.tracked_keys());
        let gauge = ConstGauge::new(i64::try_from(tracked.unwrap_or(0)).unwrap_or(i64::MAX));
        gauge.encode(encoder.encode_descriptor(
            "limiter_l7_tracked_keys",
            "Keyed L7 counters held (bounded by --l7-max-keys)",
            None,
            gauge.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Errors starting the metrics endpoint.
#[derive(Debug, thiserror::Error)]
#[error("binding the metrics endpoint to {addr}: {source}")]
pub struct ServeError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr` (port 0 picks a free one) and answers `GET /metrics` until `shutdown` turns
/// true. Returns the bound address and the server task.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), ServeError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| ServeError { addr, source })?;
    let bound = listener.local_addr().map_err(|source| ServeError { addr, source })?;
    info!("metrics listening on http://{bound}/metrics");
    let task = tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(MAX_SCRAPERS));
        loop {
            tokio::select! {
                // The guard `wait_for` returns must not live across the other arm's await.
                () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        // Busy: close at once rather than queue (a scraper retries).
                        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else { continue };
                        let metrics = Arc::clone(&metrics);
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(SCRAPE_TIMEOUT, answer(stream, &metrics)).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        warn!("metrics: accept failed: {e}");
                        // E.g. out of file descriptors: do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    });
    Ok((bound, task))
}

/// Reads one request head and answers it; the connection closes after the answer.
async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST_HEAD {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large\n",
            )
            .await;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    match (method, path) {
        (b"GET", b"/metrics") => {
            let body = metrics.render();
            respond(&mut stream, "200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", &body).await
        }
        (b"GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "try GET /metrics\n").await,
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "only GET /metrics\n").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_family_with_labels() {
        let m = Metrics::new();
        m.rls_decisions.inc(&DecisionLabels { domain: "d".into(), rule: "d/k".into(), code: "OK" });
        m.reload(true);
        m.reload(false);
        m.rls_decision_seconds.observe(0.00002);
        let text = m.render();
        assert!(text.contains("limiter_rls_decisions_total{domain=\"d\",rule=\"d/k\",code=\"OK\"} 1"), "{text}");
        assert!(text.contains("limiter_policy_reloads_total{outcome=\"applied\"} 1"), "{text}");
        assert!(text.contains("limiter_policy_reloads_total{outcome=\"rejected\"} 1"), "{text}");
        assert!(text.contains("limiter_rls_decision_duration_seconds_count 1"), "{text}");
        assert!(text.contains("limiter_rls_redis_errors_total 0"), "{text}");
        assert!(text.contains("limiter_l7_tracked_keys 0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn counter_families_read_back_what_they_export() {
        let m = Metrics::new();
        let ok = DecisionLabels { domain: "d".into(), rule: "d/k".into(), code: "OK" };
        let over = DecisionLabels { code: "OVER_LIMIT", ..ok.clone() };
        for _ in 0..3 {
            m.rls_decisions.inc(&ok);
        }
        m.rls_decisions.inc(&over);
        let mut values = m.rls_decisions.values();
        values.sort_by_key(|(l, _)| l.code);
        assert_eq!(values, [(ok.clone(), 3), (over, 1)]);
        assert_eq!(m.rls_decisions.get(&ok), 3);
        assert_eq!(m.rls_decisions.total(), 4);
        assert_eq!(m.escalations.total(), 0);
        let text = m.render();
        assert!(
            text.contains("limiter_rls_decisions_total{domain=\"d\",rule=\"d/k\",code=\"OVER_LIMIT\"} 1"),
            "{text}"
        );
    }
}
