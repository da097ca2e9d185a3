//! Conformance of the rate limit service over gRPC: `ShouldRateLimit` and `grpc.health.v1`
//! served by [`limiter_agent::rls::serve`] on a loopback port and called by tonic clients, the
//! way Envoy's `envoy.filters.http.ratelimit` calls it.
//!
//! Plans come from YAML files written to a temporary directory and read by the policy loader
//! and compiler, so the rules are the ones users write: an envoyproxy/ratelimit config (domain
//! `shop`) and a native `RateLimitPolicy` (domain `limiter`).
//!
//! Time: the engines are anchored an hour in the future ([`frozen_engine`]). The engine counts
//! instants before its anchor as the anchor, so for the whole test the clock reads exactly
//! [`T`]: windows, remaining counts and resets are exact values, whatever the machine's speed.
//! No test sleeps or measures time; the timeouts below only keep a broken server from hanging
//! the test binary.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{Entry, RateLimitOverride};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit as ProtoUnit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code as ProtoCode, DescriptorStatus};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use limiter_agent::l7::{Engine, EngineConfig};
use limiter_agent::metrics::Metrics;
use limiter_agent::plan::L7Plan;
use limiter_agent::policy::{Compiled, PolicySet};
use limiter_agent::rls::escalation::{BlockOrder, EscalationConfig, Escalator, Penalties};
use limiter_agent::rls::redis::{FailureMode, RedisBackend, RedisConfig};
use limiter_agent::rls::{Backend, RateLimiter, RlsConfig, Running};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::server::NamedService as _;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

/// The frozen clock: 30 s into a minute, 810 s into an hour, 80 010 s into a day.
const T: u64 = 1_700_000_010;
/// Longest any single await may take before the test gives up (a hang guard, not a timing
/// assertion: every call here is answered in microseconds).
const HANG: Duration = Duration::from_secs(30);
const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";

/// An envoyproxy/ratelimit config as its users write it.
const SHOP: &str = r#"
domain: shop
descriptors:
  # Wildcards in config order, an exact value, then the key alone.
  - key: k
    value: ex*
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: k
    value: e*
    rate_limit: {unit: minute, requests_per_unit: 4}
  - key: k
    value: exact
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: k
    rate_limit: {unit: minute, requests_per_unit: 3}
  # A wildcard in the middle.
  - key: path
    value: /api/*/x
    rate_limit: {unit: hour, requests_per_unit: 5}
  # Nested: anonymous clients per address, one address unlimited.
  - key: authenticated
    value: "false"
    descriptors:
      - key: remote_address
        rate_limit: {unit: minute, requests_per_unit: 30}
      - key: remote_address
        value: 10.0.0.5
        rate_limit: {unlimited: true}
  # A trial plan's limit replaces the client's daily one when both apply.
  - key: client_id
    rate_limit: {name: client-daily, unit: day, requests_per_unit: 5000}
    descriptors:
      - key: plan
        value: trial
        rate_limit:
          name: trial-hourly
          unit: hour
          requests_per_unit: 100
          replaces: [{name: client-daily}]
  - key: tuning
    value: shadow
    shadow_mode: true
    rate_limit: {unit: second, requests_per_unit: 2}
  - key: hits
    rate_limit: {unit: minute, requests_per_unit: 5}
"#;

/// A native policy: a per-user header rule, a per-address rule, an allow list and a penalty.
const API: &str = r#"
apiVersion: limiter.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: api}
spec:
  allow: [10.0.0.0/8]
  penalty: {overLimitEvents: 3, within: 1h, block: 60s}
  rateLimit:
    local:
      rules:
        - name: per-user
          clientSelectors: [{headers: [{name: x-user-id, type: Distinct}]}]
          limit: {requests: 3, unit: Minute, burst: 3}
        - name: per-ip
          clientSelectors: [{sourceCIDR: {type: Distinct, value: 0.0.0.0/0}}]
          count: Requests
          limit: {requests: 2, unit: Hour}
"#;

// ---------------------------------------------------------------------------------------------
// Policies from files

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("limiter-rls-grpc-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write policy file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loads and compiles policy files as `limiter-agent run --policy` does.
fn load(tag: &str, files: &[(&str, &str)]) -> (PolicySet, Compiled) {
    let dir = TempDir::new(tag);
    let paths: Vec<PathBuf> = files.iter().map(|(name, text)| dir.write(name, text)).collect();
    let set = limiter_agent::policy::load_paths(&paths).unwrap_or_else(|e| panic!("policies load: {e}"));
    let compiled = limiter_agent::policy::compile(&set).into_result().unwrap_or_else(|e| panic!("compile: {e}"));
    (set, compiled)
}

fn shop_and_api(tag: &str) -> L7Plan {
    load(tag, &[("shop.yaml", SHOP), ("api.yaml", API)]).1.l7
}

/// An engine whose clock reads [`T`] for the next hour (see the module docs).
fn frozen_engine(plan: L7Plan) -> Arc<Engine> {
    let anchor = Instant::now() + Duration::from_secs(3600);
    Arc::new(Engine::with_clock(plan, EngineConfig::default(), anchor, Duration::from_secs(T)))
}

// ---------------------------------------------------------------------------------------------
// The server and its clients

struct Server {
    addr: SocketAddr,
    client: RateLimitServiceClient<Channel>,
    metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

struct Options {
    backend: Backend,
    escalation: Option<Arc<Escalator>>,
    max_in_flight: usize,
    max_request_bytes: usize,
    timeout: Duration,
    drain_timeout: Duration,
    allowed_callers: Vec<ipnet::IpNet>,
}

impl Default for Options {
    fn default() -> Self {
        let defaults = RlsConfig::default();
        Options {
            backend: Backend::Local,
            escalation: None,
            max_in_flight: defaults.max_in_flight,
            max_request_bytes: defaults.max_request_bytes,
            timeout: defaults.timeout,
            drain_timeout: defaults.drain_timeout,
            allowed_callers: Vec::new(),
        }
    }
}

async fn start(plan: L7Plan) -> Server {
    start_with(frozen_engine(plan), Options::default()).await
}

async fn start_with(engine: Arc<Engine>, options: Options) -> Server {
    let metrics = Arc::new(Metrics::new());
    metrics.watch_engine(Arc::clone(&engine));
    let limiter = Arc::new(
        RateLimiter::new(engine, options.backend, Arc::clone(&metrics), options.escalation, options.max_in_flight)
            .with_allowed_callers(options.allowed_callers),
    );
    let config = RlsConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        max_request_bytes: options.max_request_bytes,
        max_in_flight: options.max_in_flight,
        timeout: options.timeout,
        drain_timeout: options.drain_timeout,
        ..RlsConfig::default()
    };
    let (shutdown, shutdown_rx) = watch::channel(false);
    let Running { addr, task } = limiter_agent::rls::serve(&config, limiter, shutdown_rx).await.expect("serve");
    assert_ne!(addr.port(), 0, "serve reports the bound port");
    let client = RateLimitServiceClient::new(channel(addr).await);
    Server { addr, client, metrics, shutdown, task }
}

async fn channel(addr: SocketAddr) -> Channel {
    let endpoint = Channel::from_shared(format!("http://{addr}")).expect("endpoint");
    within(endpoint.connect()).await.expect("connect to the rate limit service")
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(HANG, f).await.expect("the rate limit service did not answer (hang guard)")
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries.iter().map(|(k, v)| Entry { key: (*k).into(), value: (*v).into() }).collect(),
        ..Default::default()
    }
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest { domain: domain.into(), descriptors, hits_addend: 0 }
}

impl Server {
    async fn call(&mut self, req: RateLimitRequest) -> Result<RateLimitResponse, tonic::Status> {
        within(self.client.should_rate_limit(req)).await.map(tonic::Response::into_inner)
    }

    async fn ask(&mut self, req: RateLimitRequest) -> RateLimitResponse {
        self.call(req).await.unwrap_or_else(|s| panic!("ShouldRateLimit failed: {s:?}"))
    }

    /// The one status of a one-descriptor request.
    async fn one(&mut self, domain: &str, entries: &[(&str, &str)]) -> DescriptorStatus {
        let resp = self.ask(request(domain, vec![descriptor(entries)])).await;
        assert_eq!(resp.statuses.len(), 1, "{resp:?}");
        let status = resp.statuses.into_iter().next().expect("one status");
        // overall_code follows the single status.
        assert_eq!(resp.overall_code, status.code);
        status
    }

    /// Stops the server and waits for its task to end.
    async fn stop(self) {
        self.shutdown.send(true).expect("server task holds the receiver");
        drop(self.client);
        let ended = within(self.task).await.expect("server task panicked");
        ended.expect("server ended with an error");
    }
}

/// A status as a comparable tuple: (code, limit name, requests_per_unit, unit, remaining,
/// reset seconds). No limit reads as ("", 0, Unknown) and no reset as -1.
type Seen = (ProtoCode, String, u32, ProtoUnit, u32, i64);

fn seen(s: &DescriptorStatus) -> Seen {
    let (name, rpu, unit) = match &s.current_limit {
        Some(l) => (l.name.clone(), l.requests_per_unit, ProtoUnit::try_from(l.unit).expect("known unit")),
        None => (String::new(), 0, ProtoUnit::Unknown),
    };
    let reset = s.duration_until_reset.as_ref().map_or(-1, |d| {
        assert_eq!(d.nanos, 0, "whole seconds");
        d.seconds
    });
    (ProtoCode::try_from(s.code).expect("known code"), name, rpu, unit, s.limit_remaining, reset)
}

fn ok(name: &str, rpu: u32, unit: ProtoUnit, remaining: u32, reset: i64) -> Seen {
    (ProtoCode::Ok, name.into(), rpu, unit, remaining, reset)
}

fn over(name: &str, rpu: u32, unit: ProtoUnit, reset: i64) -> Seen {
    (ProtoCode::OverLimit, name.into(), rpu, unit, 0, reset)
}

/// OK with no limit: no rule matched (remaining 0) or the rule is `unlimited` (u32::MAX).
fn no_limit(remaining: u32) -> Seen {
    (ProtoCode::Ok, String::new(), 0, ProtoUnit::Unknown, remaining, -1)
}

/// Seconds left in the window of `unit` at [`T`].
fn reset_at_t(unit_secs: u64) -> i64 {
    i64::try_from(unit_secs - T % unit_secs).expect("small")
}

/// The value of the sample written exactly as `series` (name and labels).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

mod decisions;
mod errors;
mod service;
