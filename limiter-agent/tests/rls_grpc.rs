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
use limiter_agent::rls::escalation::{BlockOrder, EscalationConfig, Escalator, Penalties, PolicyPenalty};
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

/// The penalties of a set, as the run loop hands them to the escalator: each policy's
/// `penalty` over its compiled L7 rules, and the set's allow list.
fn penalties(set: &PolicySet, compiled: &Compiled) -> Penalties {
    let policies = set
        .policies
        .iter()
        .filter_map(|p| {
            let penalty = p.penalty.as_ref()?;
            let summary = compiled.summaries.iter().find(|s| s.policy == p.name)?;
            Some(PolicyPenalty {
                policy: p.name.clone(),
                over_limit_events: penalty.over_limit_events,
                within: penalty.within,
                block: penalty.block,
                rules: summary.l7_rules.clone(),
            })
        })
        .collect();
    let allow = set.policies.iter().flat_map(|p| p.allow.iter().map(|a| a.value)).collect();
    Penalties { policies, allow }
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
        }
    }
}

async fn start(plan: L7Plan) -> Server {
    start_with(frozen_engine(plan), Options::default()).await
}

async fn start_with(engine: Arc<Engine>, options: Options) -> Server {
    let metrics = Arc::new(Metrics::new());
    metrics.watch_engine(Arc::clone(&engine));
    let limiter = Arc::new(RateLimiter::new(
        engine,
        options.backend,
        Arc::clone(&metrics),
        options.escalation,
        options.max_in_flight,
    ));
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

// ---------------------------------------------------------------------------------------------
// 1. Domains

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_domain_selects_the_rule_set() {
    let mut rls = start(shop_and_api("domain")).await;
    // `k=exact` is a rule of `shop` only; the gateway kinds' domain and an unknown one answer
    // it OK without a limit, however often it is asked.
    for _ in 0..3 {
        for domain in ["limiter", "elsewhere"] {
            let resp = rls
                .ask(request(
                    domain,
                    vec![descriptor(&[("k", "exact")]), descriptor(&[("generic_key", "api/per-user"), ("x", "y")])],
                ))
                .await;
            assert_eq!(resp.overall_code, ProtoCode::Ok as i32, "{domain}");
            assert_eq!(resp.statuses.iter().map(seen).collect::<Vec<_>>(), [no_limit(0), no_limit(0)], "{domain}");
        }
    }
    // In `shop` the same descriptor has its limit of 1: the second call is over it, and the
    // overall code says so even beside a descriptor that is fine.
    let minute = reset_at_t(60);
    assert_eq!(seen(&rls.one("shop", &[("k", "exact")]).await), ok("shop/k=exact", 1, ProtoUnit::Minute, 0, minute));
    let resp = rls.ask(request("shop", vec![descriptor(&[("k", "other")]), descriptor(&[("k", "exact")])])).await;
    assert_eq!(resp.overall_code, ProtoCode::OverLimit as i32);
    assert_eq!(
        resp.statuses.iter().map(seen).collect::<Vec<_>>(),
        [ok("shop/k", 3, ProtoUnit::Minute, 2, minute), over("shop/k=exact", 1, ProtoUnit::Minute, minute)]
    );
    // And the other way round: a gateway rule's descriptor is limited in `limiter` only.
    let eve = [("generic_key", "api/per-user"), ("x-user-id", "eve")];
    assert_eq!(seen(&rls.one("shop", &eve).await), no_limit(0));
    assert_eq!(seen(&rls.one("limiter", &eve).await), ok("api/per-user", 3, ProtoUnit::Minute, 5, 20));
    rls.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Matching

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_is_envoyproxy_ratelimits() {
    let mut rls = start(shop_and_api("matching")).await;
    let minute = reset_at_t(60);
    let hour = reset_at_t(3600);
    let name = |s: &DescriptorStatus| s.current_limit.as_ref().map(|l| l.name.clone());

    // Exact beats the wildcards listed before it; the first wildcard in config order wins;
    // the key alone comes last.
    assert_eq!(name(&rls.one("shop", &[("k", "exact")]).await).as_deref(), Some("shop/k=exact"));
    assert_eq!(name(&rls.one("shop", &[("k", "exz")]).await).as_deref(), Some("shop/k=ex*"));
    assert_eq!(name(&rls.one("shop", &[("k", "ex")]).await).as_deref(), Some("shop/k=ex*"), "`*` matches nothing");
    assert_eq!(name(&rls.one("shop", &[("k", "eq")]).await).as_deref(), Some("shop/k=e*"));
    assert_eq!(name(&rls.one("shop", &[("k", "other")]).await).as_deref(), Some("shop/k"));
    // A wildcard in the middle of the value.
    assert_eq!(
        seen(&rls.one("shop", &[("path", "/api/v1/x")]).await),
        ok("shop/path=/api/*/x", 5, ProtoUnit::Hour, 4, hour)
    );
    assert_eq!(seen(&rls.one("shop", &[("path", "/api/v1/y")]).await), no_limit(0));
    // Wildcard and key-only rules count each value on its own: `exz` was charged above,
    // `exy` is fresh; `other` was charged once, `another` not.
    assert_eq!(seen(&rls.one("shop", &[("k", "exz")]).await), ok("shop/k=ex*", 2, ProtoUnit::Minute, 0, minute));
    assert_eq!(seen(&rls.one("shop", &[("k", "exy")]).await), ok("shop/k=ex*", 2, ProtoUnit::Minute, 1, minute));
    assert_eq!(seen(&rls.one("shop", &[("k", "another")]).await), ok("shop/k", 3, ProtoUnit::Minute, 2, minute));

    // Nested descriptors, and the depth rule: the request must end where the rule does.
    let anon = "shop/authenticated=false/remote_address";
    let nested = [("authenticated", "false"), ("remote_address", "192.0.2.1")];
    assert_eq!(seen(&rls.one("shop", &nested).await), ok(anon, 30, ProtoUnit::Minute, 29, minute));
    assert_eq!(seen(&rls.one("shop", &[("authenticated", "false")]).await), no_limit(0), "shorter than the rule");
    let longer = [("authenticated", "false"), ("remote_address", "192.0.2.1"), ("x", "1")];
    assert_eq!(seen(&rls.one("shop", &longer).await), no_limit(0), "longer than the rule");
    assert_eq!(seen(&rls.one("shop", &[("k", "exact"), ("k", "exact")]).await), no_limit(0), "longer than the rule");
    assert_eq!(seen(&rls.one("shop", &[("remote_address", "192.0.2.1")]).await), no_limit(0), "not a rule's prefix");
    // Neither the shorter nor the longer descriptor was charged to the nested rule.
    assert_eq!(seen(&rls.one("shop", &nested).await), ok(anon, 30, ProtoUnit::Minute, 28, minute));
    rls.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. unlimited, replaces, shadow_mode

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlimited_replaces_and_shadow_mode() {
    let mut rls = start(shop_and_api("special")).await;
    // `unlimited`: OK, no limit, remaining u32::MAX, every time.
    for _ in 0..40 {
        let s = rls.one("shop", &[("authenticated", "false"), ("remote_address", "10.0.0.5")]).await;
        assert_eq!(seen(&s), no_limit(u32::MAX));
    }
    // A neighbour is limited as usual.
    let anon = [("authenticated", "false"), ("remote_address", "10.0.0.6")];
    assert_eq!(
        seen(&rls.one("shop", &anon).await),
        ok("shop/authenticated=false/remote_address", 30, ProtoUnit::Minute, 29, reset_at_t(60))
    );

    // `replaces`: with the trial descriptor in the same call, the daily limit does not apply
    // and is not charged.
    let daily = [("client_id", "acme")];
    let trial = [("client_id", "acme"), ("plan", "trial")];
    let (day, hour) = (reset_at_t(86_400), reset_at_t(3600));
    for remaining in [99, 98] {
        let resp = rls.ask(request("shop", vec![descriptor(&daily), descriptor(&trial)])).await;
        assert_eq!(
            resp.statuses.iter().map(seen).collect::<Vec<_>>(),
            [no_limit(0), ok("trial-hourly", 100, ProtoUnit::Hour, remaining, hour)]
        );
    }
    // Alone, the daily limit applies, untouched by the calls above.
    assert_eq!(seen(&rls.one("shop", &daily).await), ok("client-daily", 5000, ProtoUnit::Day, 4999, day));

    // `shadow_mode`: over the limit of 2 but answered OK, with remaining 0, and counted.
    let shadow = [("tuning", "shadow")];
    let name = "shop/tuning=shadow";
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(seen(&rls.one("shop", &shadow).await));
    }
    let second = ProtoUnit::Second;
    assert_eq!(
        got,
        [ok(name, 2, second, 1, 1), ok(name, 2, second, 0, 1), ok(name, 2, second, 0, 1), ok(name, 2, second, 0, 1)]
    );
    let text = rls.metrics.render();
    assert_eq!(
        metric(&text, &format!("limiter_rls_shadow_over_limit_total{{domain=\"shop\",rule=\"{name}\"}}")),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, &format!("limiter_rls_decisions_total{{domain=\"shop\",rule=\"{name}\",code=\"OK\"}}")),
        Some(4.0),
        "{text}"
    );
    rls.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. hits_addend

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_addend_per_request_and_per_descriptor() {
    let mut rls = start(shop_and_api("hits")).await;
    let minute = reset_at_t(60);
    let name = "shop/hits";
    let mut ask = async |request_hits: u32, descriptor_hits: Option<u64>| {
        let mut d = descriptor(&[("hits", "a")]);
        d.hits_addend = descriptor_hits.map(|value| UInt64Value { value });
        let mut req = request("shop", vec![d]);
        req.hits_addend = request_hits;
        let resp = rls.ask(req).await;
        seen(&resp.statuses[0])
    };
    // 0 counts as 1, as in Envoy and the reference.
    assert_eq!(ask(0, None).await, ok(name, 5, ProtoUnit::Minute, 4, minute));
    assert_eq!(ask(2, None).await, ok(name, 5, ProtoUnit::Minute, 2, minute));
    // Per descriptor 0: check only, twice, nothing charged.
    assert_eq!(ask(2, Some(0)).await, ok(name, 5, ProtoUnit::Minute, 2, minute));
    assert_eq!(ask(2, Some(0)).await, ok(name, 5, ProtoUnit::Minute, 2, minute));
    // Per descriptor overrides the request's: 1 instead of 4.
    assert_eq!(ask(4, Some(1)).await, ok(name, 5, ProtoUnit::Minute, 1, minute));
    // 2 more is over the 1 left.
    assert_eq!(ask(1, Some(2)).await, over(name, 5, ProtoUnit::Minute, minute));

    // Two descriptors of one call: one overrides the request's hits, the other takes them.
    let mut first = descriptor(&[("hits", "b")]);
    first.hits_addend = Some(UInt64Value { value: 1 });
    let mut req = request("shop", vec![first, descriptor(&[("hits", "c")])]);
    req.hits_addend = 3;
    let resp = rls.ask(req).await;
    assert_eq!(
        resp.statuses.iter().map(seen).collect::<Vec<_>>(),
        [ok(name, 5, ProtoUnit::Minute, 4, minute), ok(name, 5, ProtoUnit::Minute, 2, minute)]
    );
    rls.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Status fields, counting down to the limit

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_count_down_with_exact_limits_and_resets() {
    let mut rls = start(shop_and_api("countdown")).await;
    let minute = reset_at_t(60);
    assert_eq!(minute, 30, "T is 30 s into a minute");
    let name = "shop/k";
    let mut got = Vec::new();
    for _ in 0..5 {
        let s = rls.one("shop", &[("k", "countdown")]).await;
        let limit = s.current_limit.as_ref().expect("current_limit on every limited status");
        assert_eq!((limit.requests_per_unit, limit.unit, limit.name.as_str()), (3, ProtoUnit::Minute as i32, name));
        got.push(seen(&s));
    }
    let m = ProtoUnit::Minute;
    assert_eq!(
        got,
        [
            ok(name, 3, m, 2, 30),
            ok(name, 3, m, 1, 30),
            ok(name, 3, m, 0, 30),
            over(name, 3, m, 30),
            over(name, 3, m, 30)
        ]
    );
    // Hour and day windows, aligned to unix time like the reference.
    assert_eq!(
        seen(&rls.one("shop", &[("path", "/api/z/x")]).await),
        ok("shop/path=/api/*/x", 5, ProtoUnit::Hour, 4, 3600 - 810)
    );
    assert_eq!(
        seen(&rls.one("shop", &[("client_id", "zed")]).await),
        ok("client-daily", 5000, ProtoUnit::Day, 4999, 86_400 - 80_010)
    );
    rls.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Gateway kinds

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_rules_count_per_user_in_token_buckets() {
    let mut rls = start(shop_and_api("gateway")).await;
    let name = "api/per-user";
    let user = |who: &'static str| descriptor(&[("generic_key", "api/per-user"), ("x-user-id", who)]);
    let m = ProtoUnit::Minute;
    // requests 3 per minute, burst 3: a depth of 6; every token comes back in 20 s, the
    // bucket is full again 20 s per token taken.
    let mut got = Vec::new();
    for _ in 0..7 {
        let resp = rls.ask(request("limiter", vec![user("alice")])).await;
        got.push(seen(&resp.statuses[0]));
    }
    assert_eq!(
        got,
        [
            ok(name, 3, m, 5, 20),
            ok(name, 3, m, 4, 40),
            ok(name, 3, m, 3, 60),
            ok(name, 3, m, 2, 80),
            ok(name, 3, m, 1, 100),
            ok(name, 3, m, 0, 120),
            over(name, 3, m, 120),
        ]
    );
    // Bob has his own bucket; alice stays refused beside him in one call.
    let resp = rls.ask(request("limiter", vec![user("bob"), user("alice")])).await;
    assert_eq!(resp.overall_code, ProtoCode::OverLimit as i32);
    assert_eq!(resp.statuses.iter().map(seen).collect::<Vec<_>>(), [ok(name, 3, m, 5, 20), over(name, 3, m, 120)]);
    // Without the generic_key the rule is not selected (its descriptor starts with it).
    assert_eq!(seen(&rls.one("limiter", &[("x-user-id", "alice")]).await), no_limit(0));

    // The sourceCIDR rule: per client address.
    let ip = |addr: &'static str| [("generic_key", "api/per-ip"), ("remote_address", addr)];
    let h = ProtoUnit::Hour;
    assert_eq!(seen(&rls.one("limiter", &ip("192.0.2.7")).await), ok("api/per-ip", 2, h, 1, 1800));
    assert_eq!(seen(&rls.one("limiter", &ip("192.0.2.7")).await), ok("api/per-ip", 2, h, 0, 3600));
    assert_eq!(seen(&rls.one("limiter", &ip("192.0.2.7")).await), over("api/per-ip", 2, h, 3600));
    assert_eq!(seen(&rls.one("limiter", &ip("192.0.2.8")).await), ok("api/per-ip", 2, h, 1, 1800));
    // A value that is not an address is outside every range.
    assert_eq!(seen(&rls.one("limiter", &ip("not-an-address")).await), no_limit(0));
    rls.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_calls_get_invalid_argument_naming_the_problem() {
    let engine = frozen_engine(shop_and_api("errors"));
    let mut rls = start_with(engine, Options { max_request_bytes: 1024, ..Options::default() }).await;
    // Every good call asks for a fresh value of the key-only rule (limit 3): remaining 2.
    let good = |i: usize| request("shop", vec![descriptor(&[("k", &format!("fine-{i}"))])]);
    let minute = reset_at_t(60);
    let with = |edit: fn(&mut RateLimitDescriptor)| {
        let mut d = descriptor(&[("k", "v")]);
        edit(&mut d);
        request("shop", vec![descriptor(&[("k", "ok")]), d])
    };
    let cases: Vec<(&str, RateLimitRequest, &str)> = vec![
        ("empty domain", request("", vec![descriptor(&[("k", "v")])]), "rate limit domain must not be empty"),
        ("no descriptors", request("shop", vec![]), "rate limit descriptor list must not be empty"),
        ("descriptor without entries", with(|d| d.entries.clear()), "rate limit descriptor 1 has no entries"),
        (
            "empty key",
            with(|d| d.entries.push(Entry { key: String::new(), value: "x".into() })),
            "rate limit descriptor 1 entry 1 has an empty key",
        ),
        (
            "hits_addend beyond u32",
            with(|d| d.hits_addend = Some(UInt64Value { value: u64::from(u32::MAX) + 1 })),
            "rate limit descriptor 1: hits_addend 4294967296 is more than 4294967295",
        ),
        (
            "is_negative_hits",
            with(|d| d.is_negative_hits = true),
            "rate limit descriptor 1: is_negative_hits is not supported",
        ),
        (
            "limit override",
            with(|d| d.limit = Some(RateLimitOverride { requests_per_unit: 9, unit: ProtoUnit::Minute as i32 })),
            "rate limit descriptor 1: per-descriptor limit overrides are not supported",
        ),
    ];
    let refused = cases.len();
    for (i, (what, req, message)) in cases.into_iter().enumerate() {
        let status = rls.call(req).await.expect_err(what);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains(message), "{what}: {:?} does not say {message:?}", status.message());
        // The server keeps answering.
        let s = rls.ask(good(i)).await;
        assert_eq!(seen(&s.statuses[0]), ok("shop/k", 3, ProtoUnit::Minute, 2, minute), "{what}");
    }
    // The good descriptor beside each bad one was never charged.
    assert_eq!(seen(&rls.one("shop", &[("k", "ok")]).await), ok("shop/k", 3, ProtoUnit::Minute, 2, minute));
    // u32::MAX itself is accepted (and is far over the limit).
    let edge = with(|d| d.hits_addend = Some(UInt64Value { value: u64::from(u32::MAX) }));
    assert_eq!(rls.ask(edge).await.overall_code, ProtoCode::OverLimit as i32);

    // Bigger than max_request_bytes: tonic refuses it before the service sees it.
    let big = "v".repeat(2048);
    let status = rls.call(request("shop", vec![descriptor(&[("k", &big)])])).await.expect_err("oversized");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("the limit is: 1024 bytes"), "{:?}", status.message());
    let s = rls.ask(good(100)).await;
    assert_eq!(seen(&s.statuses[0]), ok("shop/k", 3, ProtoUnit::Minute, 2, minute));

    let text = rls.metrics.render();
    let errors = metric(&text, "limiter_rls_request_errors_total{reason=\"invalid_argument\"}");
    assert_eq!(errors, Some(refused as f64), "{text}");
    rls.stop().await;
}

/// A stand-in Redis on a loopback port: it answers the client's connection handshake (`+OK`
/// to each command) and then holds the first counting pipeline (`INCRBY`) unanswered, telling
/// the test that it arrived. `release` closes the connection and the listener.
struct StuckRedis {
    url: String,
    counting: oneshot::Receiver<()>,
    release: oneshot::Sender<()>,
}

impl StuckRedis {
    async fn start() -> StuckRedis {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind stand-in redis");
        let url = format!("redis://{}/0", listener.local_addr().expect("bound"));
        let (counting_tx, counting) = oneshot::channel();
        let (release, release_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("the backend connects");
            // Nobody else may connect: a reconnect after release is refused.
            drop(listener);
            let mut counting_tx = Some(counting_tx);
            tokio::select! {
                () = serve_resp(stream, &mut counting_tx) => {}
                _ = release_rx => {}
            }
        });
        StuckRedis { url, counting, release }
    }
}

/// Reads RESP commands; answers `+OK` until an `INCRBY` arrives, then answers nothing more.
async fn serve_resp(mut stream: TcpStream, counting: &mut Option<oneshot::Sender<()>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some((command, used)) = parse_command(&buf) {
            buf.drain(..used);
            if command.eq_ignore_ascii_case("INCRBY") || command.eq_ignore_ascii_case("EXPIRE") {
                if let Some(tx) = counting.take() {
                    let _ = tx.send(());
                }
            } else if counting.is_some() {
                stream.write_all(b"+OK\r\n").await.expect("reply to the handshake");
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                // Keep the held call pending until released (the select drops us then).
                std::future::pending::<()>().await;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One complete RESP array of bulk strings at the start of `buf`: its first element (the
/// command name) and the bytes it takes.
fn parse_command(buf: &[u8]) -> Option<(String, usize)> {
    fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = buf.get(at..)?.windows(2).position(|w| w == b"\r\n")? + at;
        Some((&buf[at..end], end + 2))
    }
    let (head, mut at) = line(buf, 0)?;
    let n: usize = std::str::from_utf8(head.strip_prefix(b"*")?).ok()?.parse().ok()?;
    let mut name = None;
    for _ in 0..n {
        let (len, start) = line(buf, at)?;
        let len: usize = std::str::from_utf8(len.strip_prefix(b"$")?).ok()?.parse().ok()?;
        let end = start + len;
        if buf.len() < end + 2 {
            return None;
        }
        name.get_or_insert_with(|| String::from_utf8_lossy(&buf[start..end]).into_owned());
        at = end + 2;
    }
    Some((name?, at))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_beyond_max_in_flight_is_resource_exhausted() {
    let redis = StuckRedis::start().await;
    let config = RedisConfig {
        failure_mode: FailureMode::FailOpen,
        connect_timeout: Duration::from_secs(3600),
        response_timeout: Duration::from_secs(3600),
        ..RedisConfig::default()
    };
    let backend = RedisBackend::connect(&redis.url, config).await.expect("valid url");
    assert!(backend.is_connected(), "the stand-in answered the handshake");
    let options = Options {
        backend: Backend::Redis(backend),
        max_in_flight: 1,
        timeout: Duration::from_secs(3600),
        ..Options::default()
    };
    let mut rls = start_with(frozen_engine(shop_and_api("overload")), options).await;

    // The first call waits on the stand-in's INCRBY reply, holding the only permit.
    let mut first_client = rls.client.clone();
    let first = tokio::spawn(async move {
        first_client.should_rate_limit(request("shop", vec![descriptor(&[("k", "held")])])).await
    });
    within(redis.counting).await.expect("the first call reached redis");

    let status = rls.call(request("shop", vec![descriptor(&[("k", "second")])])).await.expect_err("overloaded");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("too many calls in flight"), "{:?}", status.message());
    // A descriptor that needs no Redis is refused too: the limit is on calls, not on Redis.
    let status = rls.call(request("nowhere", vec![descriptor(&[("k", "v")])])).await.expect_err("overloaded");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

    // Redis goes away: the held call gets the failure-mode answer (fail open: OK, no limit)...
    redis.release.send(()).expect("stand-in running");
    let answered = within(first).await.expect("first call task").expect("first call answered");
    assert_eq!(answered.into_inner().statuses.iter().map(seen).collect::<Vec<_>>(), [no_limit(0)]);
    // ...and the permit is back.
    let resp = rls.ask(request("shop", vec![descriptor(&[("k", "after")])])).await;
    assert_eq!(resp.overall_code, ProtoCode::Ok as i32);
    let text = rls.metrics.render();
    assert_eq!(metric(&text, "limiter_rls_request_errors_total{reason=\"overloaded\"}"), Some(2.0), "{text}");
    rls.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Health and shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_serves_until_shutdown_then_the_server_ends() {
    assert_eq!(RateLimitServiceServer::<RateLimiter>::NAME, SERVICE);
    let rls = start(shop_and_api("health")).await;
    let mut health = HealthClient::new(channel(rls.addr).await);
    for service in ["", SERVICE] {
        let resp = within(health.check(HealthCheckRequest { service: service.into() })).await.expect("check");
        assert_eq!(resp.into_inner().status, ServingStatus::Serving as i32, "{service:?}");
    }
    let status =
        within(health.check(HealthCheckRequest { service: "no.such.Service".into() })).await.expect_err("unknown");
    assert_eq!(status.code(), tonic::Code::NotFound);

    // A watcher sees the service go NOT_SERVING when shutdown fires.
    let mut watch =
        within(health.watch(HealthCheckRequest { service: SERVICE.into() })).await.expect("watch").into_inner();
    let first = within(watch.message()).await.expect("watch stream").expect("a first status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    rls.shutdown.send(true).expect("server task holds the receiver");
    let next = within(watch.message()).await.expect("watch stream").expect("a status change");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // Graceful shutdown waits for open calls, the watch included: end it, and the task ends.
    drop(watch);
    drop(health);
    drop(rls.client);
    within(rls.task).await.expect("server task panicked").expect("server ended cleanly");

    // Nothing listens any more.
    assert!(TcpStream::connect(rls.addr).await.is_err(), "{} still accepts", rls.addr);
}

/// A client that keeps a health `Watch` open does not keep the server alive past the drain
/// timeout: its connection is closed and the serve task ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_watch_stream_does_not_hold_shutdown_past_the_drain_timeout() {
    let options = Options { drain_timeout: Duration::from_millis(200), ..Options::default() };
    let rls = start_with(frozen_engine(shop_and_api("drain")), options).await;
    let mut health = HealthClient::new(channel(rls.addr).await);
    let mut watch =
        within(health.watch(HealthCheckRequest { service: SERVICE.into() })).await.expect("watch").into_inner();
    let first = within(watch.message()).await.expect("watch stream").expect("a first status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    rls.shutdown.send(true).expect("server task holds the receiver");
    // The watch stays open on this side; the server must end anyway.
    within(rls.task).await.expect("server task panicked").expect("server ended cleanly");
    assert!(TcpStream::connect(rls.addr).await.is_err(), "{} still accepts", rls.addr);
    drop(watch);
}

// ---------------------------------------------------------------------------------------------
// 9. Metrics

/// GET /metrics over plain HTTP/1.1; returns the body.
async fn scrape(addr: SocketAddr) -> String {
    let mut stream = within(TcpStream::connect(addr)).await.expect("connect to metrics");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: limiter\r\nConnection: close\r\n\r\n").await.expect("send");
    let mut raw = Vec::new();
    within(stream.read_to_end(&mut raw)).await.expect("read scrape");
    let text = String::from_utf8(raw).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length: ")).expect("content-length").parse().expect("number");
    assert_eq!(body.len(), length);
    body.to_owned()
}

/// The value of the sample written exactly as `series` (name and labels).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_decisions_errors_and_durations() {
    let mut rls = start(shop_and_api("metrics")).await;
    let (shutdown_metrics, metrics_rx) = watch::channel(false);
    let (metrics_addr, metrics_task) =
        limiter_agent::metrics::serve(SocketAddr::from(([127, 0, 0, 1], 0)), Arc::clone(&rls.metrics), metrics_rx)
            .await
            .expect("metrics serve");

    for _ in 0..3 {
        rls.one("shop", &[("k", "exact")]).await; // 1 OK, then 2 OVER_LIMIT
    }
    rls.ask(request("elsewhere", vec![descriptor(&[("k", "exact")]), descriptor(&[("a", "b")])])).await;
    rls.one("shop", &[("nothing", "here")]).await;
    rls.one("limiter", &[("generic_key", "api/per-user"), ("x-user-id", "carol")]).await;
    rls.call(request("shop", vec![])).await.expect_err("no descriptors");
    let decided = 6.0;

    let text = scrape(metrics_addr).await;
    let decisions = |domain: &str, rule: &str, code: &str| {
        metric(&text, &format!("limiter_rls_decisions_total{{domain=\"{domain}\",rule=\"{rule}\",code=\"{code}\"}}"))
    };
    assert_eq!(decisions("shop", "shop/k=exact", "OK"), Some(1.0), "{text}");
    assert_eq!(decisions("shop", "shop/k=exact", "OVER_LIMIT"), Some(2.0), "{text}");
    assert_eq!(decisions("_unknown_", "", "OK"), Some(2.0), "{text}");
    assert_eq!(decisions("elsewhere", "", "OK"), None, "unknown domains are not labels: {text}");
    assert_eq!(decisions("shop", "", "OK"), Some(1.0), "{text}");
    assert_eq!(decisions("limiter", "api/per-user", "OK"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "limiter_rls_request_errors_total{reason=\"invalid_argument\"}"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "limiter_rls_decision_duration_seconds_count"), Some(decided), "{text}");
    let inf = metric(&text, "limiter_rls_decision_duration_seconds_bucket{le=\"+Inf\"}");
    assert_eq!(inf, Some(decided), "{text}");
    // Keyed counters: carol's bucket and the `k=exact` window.
    assert_eq!(metric(&text, "limiter_l7_tracked_keys"), Some(2.0), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");

    shutdown_metrics.send(true).expect("metrics task holds the receiver");
    within(metrics_task).await.expect("metrics task ended");
    rls.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 10. Escalation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_denials_escalate_to_a_block_order() {
    let (set, compiled) = load("escalation", &[("api.yaml", API), ("shop.yaml", SHOP)]);
    let penalties = penalties(&set, &compiled);
    assert_eq!(penalties.policies.len(), 1, "{penalties:?}");
    assert_eq!(penalties.policies[0].rules, ["api/per-user", "api/per-ip"]);
    let (orders_tx, mut orders) = mpsc::channel::<BlockOrder>(16);
    let escalator = Arc::new(Escalator::new(EscalationConfig::default(), penalties, orders_tx));
    let options = Options { escalation: Some(escalator), ..Options::default() };
    let mut rls = start_with(frozen_engine(compiled.l7), options).await;

    let call =
        |addr: &str| request("limiter", vec![descriptor(&[("generic_key", "api/per-ip"), ("remote_address", addr)])]);
    // 2 admitted, then denials; the 3rd denial gives the order, not the 2nd.
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(rls.ask(call("192.0.2.7")).await.overall_code);
        assert!(orders.try_recv().is_err(), "no order before the 3rd denial");
    }
    let (allowed, denied) = (ProtoCode::Ok as i32, ProtoCode::OverLimit as i32);
    assert_eq!(codes, [allowed, allowed, denied, denied]);
    assert_eq!(rls.ask(call("192.0.2.7")).await.overall_code, ProtoCode::OverLimit as i32);
    let order = orders.try_recv().expect("a block order after the 3rd denial");
    assert_eq!(order.addr, "192.0.2.7".parse::<IpAddr>().expect("address"));
    assert_eq!((order.policy.as_str(), order.duration, order.denials), ("api", Duration::from_secs(60), 3));
    assert_eq!(order.within, Duration::from_secs(3600));

    // Denials of a header rule count for the same policy, for the address in the call.
    let user = |who: &str, addr: &str| {
        request(
            "limiter",
            vec![
                descriptor(&[("generic_key", "api/per-user"), ("x-user-id", who)]),
                descriptor(&[("remote_address", addr)]),
            ],
        )
    };
    // dave's bucket holds 6: calls 7 and 8 are the 1st and 2nd denials, call 9 the 3rd.
    for call in 1..=9 {
        let resp = rls.ask(user("dave", "198.51.100.9")).await;
        let expected = if call <= 6 { allowed } else { denied };
        assert_eq!(resp.overall_code, expected, "call {call}");
        if call < 9 {
            assert!(orders.try_recv().is_err(), "no order after call {call}");
        }
    }
    assert_eq!(orders.try_recv().expect("order").addr, "198.51.100.9".parse::<IpAddr>().expect("address"));

    // An allow-listed source is denied as often, and never ordered blocked.
    let mut denials = 0;
    for _ in 0..10 {
        if rls.ask(call("10.1.2.3")).await.overall_code == ProtoCode::OverLimit as i32 {
            denials += 1;
        }
    }
    assert_eq!(denials, 8);
    assert!(orders.try_recv().is_err(), "an allow-listed source is never blocked");
    // Nor is a call that names no address.
    for _ in 0..5 {
        rls.ask(request("limiter", vec![descriptor(&[("generic_key", "api/per-user"), ("x-user-id", "dave")])])).await;
    }
    assert!(orders.try_recv().is_err());
    rls.stop().await;
}

#[test]
fn the_yaml_compiles_to_the_rules_the_tests_name() {
    let plan = shop_and_api("names");
    let names: HashMap<&str, &str> = plan.rules.iter().map(|r| (r.name.as_str(), r.domain.as_str())).collect();
    for (name, domain) in [
        ("shop/k=ex*", "shop"),
        ("shop/k=e*", "shop"),
        ("shop/k=exact", "shop"),
        ("shop/k", "shop"),
        ("shop/path=/api/*/x", "shop"),
        ("shop/authenticated=false/remote_address", "shop"),
        ("shop/authenticated=false/remote_address=10.0.0.5", "shop"),
        ("client-daily", "shop"),
        ("trial-hourly", "shop"),
        ("shop/tuning=shadow", "shop"),
        ("shop/hits", "shop"),
        ("api/per-user", "limiter"),
        ("api/per-ip", "limiter"),
    ] {
        assert_eq!(names.get(name), Some(&domain), "{name} in {names:?}");
    }
    assert_eq!(names.len(), 13, "{names:?}");
}
