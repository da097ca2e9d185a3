//! A real Envoy 1.40 (installed by `cargo xtask setup`) in front of a small HTTP backend, its
//! `envoy.filters.http.ratelimit` filter calling the agent's rate limit service in this process:
//! the gateway docs' curl loops, with the exact 200/429 sequence and the `x-ratelimit-*`
//! headers Envoy writes (`enable_x_ratelimit_headers: DRAFT_VERSION_03`).
//!
//! - The shipped `examples/envoy/envoy.yaml` runs as it stands (only its ports and cluster
//!   addresses are moved) against the shipped `examples/envoy/ratelimit.yaml`, loaded and
//!   compiled by the policy code: every scenario listed in that file's comments.
//! - Gateway kinds (domain `limiter`): a native `RateLimitPolicy` with a burst and Envoy
//!   Gateway's shipped per-user `BackendTrafficPolicy`, on routes carrying the `rate_limits`
//!   actions `limiter-agent explain` prints for them.
//! - The Redis backend through Envoy, and Envoy's own behaviour with the service gone.
//!
//! Time: the engine's clock is pinned with [`Engine::with_clock`]. Its anchor is set in the
//! future, and instants before the anchor count as the anchor, so the clock stands still at a
//! known unix time until then: no window rolls over and no bucket refills mid-scenario, and
//! `x-ratelimit-reset` is exact. Only the two-rule scenario lets it run on, by one second.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use limiter_agent::l7::{Engine, EngineConfig};
use limiter_agent::plan::L7Plan;
use limiter_tests::envoy::{
    Counting, Envoy, EnvoyConfig, HttpBackend, RateLimitService, Response, Route, envoy_binary, example_bootstrap, get,
    get_from,
};
use limiter_tests::redis::{RedisServer, free_port};
use serde_json::{Value, json};

/// 30 s into a unix minute: minute windows end in 30 s, second windows in 1 s.
const T: u64 = 1_700_000_010;

/// The domain of `examples/envoy/ratelimit.yaml`, as its Envoy sends it.
const DOCS: &str = "envoy-docs";

fn examples(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(rel)
}

/// The shipped Envoy examples (this test's and the `cargo xtask run` demo's) are valid Envoy
/// 1.40 configs as they stand.
#[test]
fn the_envoy_examples_validate() {
    for name in ["envoy.yaml", "demo-envoy.yaml"] {
        let path = examples("envoy").join(name);
        let out = Command::new(envoy_binary())
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(&path)
            .output()
            .expect("run envoy --mode validate");
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    }
}

/// The L7 plan of policy files, through the agent's own loader and compiler.
fn plan(paths: &[PathBuf]) -> L7Plan {
    let compiled = limiter_agent::policy::load_and_compile(paths).unwrap_or_else(|e| panic!("{paths:?}: {e}"));
    assert!(!compiled.l7.rules.is_empty(), "{paths:?} has no L7 rules");
    compiled.l7
}

/// An engine whose clock stands at unix time `unix` for the next hour.
fn frozen(plan: L7Plan, unix: u64) -> Engine {
    Engine::with_clock(plan, EngineConfig::default(), Instant::now() + Duration::from_secs(3600), secs(unix))
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Backend, Envoy and the rate limit service. Fields drop in order: Envoy first.
struct Stack {
    envoy: Envoy,
    rls: RateLimitService,
    backend: HttpBackend,
}

impl Stack {
    /// The shipped `examples/envoy/envoy.yaml` in front of a backend, pointed at a rate limit
    /// service for `engine` started once Envoy is ready (so an engine clock that starts
    /// running soon is not eaten by Envoy's start-up).
    fn example(engine: impl FnOnce() -> Engine, counting: Counting) -> Stack {
        let backend = HttpBackend::start().expect("HTTP backend");
        let rls_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().expect("free port")));
        let (port, admin_port) = (free_port().expect("free port"), free_port().expect("free port"));
        let text = std::fs::read_to_string(examples("envoy/envoy.yaml")).expect("read examples/envoy/envoy.yaml");
        let service = SocketAddr::from((Ipv4Addr::LOCALHOST, backend.port()));
        let bootstrap = example_bootstrap(&text, port, admin_port, &[("service", service), ("limiter_rls", rls_addr)])
            .expect("examples/envoy/envoy.yaml has the shape the test rewrites");
        let json = serde_json::to_string_pretty(&bootstrap).expect("bootstrap as JSON");
        let envoy = Envoy::start_bootstrap(&json, "json", port, admin_port).expect("envoy starts");
        let rls = RateLimitService::start(rls_addr, engine(), counting).expect("rate limit service");
        Stack { envoy, rls, backend }
    }

    /// A generated bootstrap (domain `limiter`) with `routes`, for the gateway kinds.
    fn gateway(engine: Engine, routes: Vec<Route>) -> Stack {
        let backend = HttpBackend::start().expect("HTTP backend");
        let rls = RateLimitService::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), engine, Counting::Local)
            .expect("rate limit service");
        let config =
            EnvoyConfig { rls: rls.addr(), domain: "limiter".into(), routes, failure_mode_deny: false, rls_tls: None };
        let envoy = Envoy::start(&config, &backend).expect("envoy starts");
        Stack { envoy, rls, backend }
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        get(self.envoy.port(), path, headers).unwrap_or_else(|e| panic!("GET {path}: {e:#}\n{}", self.envoy.log()))
    }

    /// `n` requests in a row, like `for i in $(seq n); do curl ...; done`, as [`line`]s.
    fn curl_loop(&self, n: usize, path: &str, headers: &[(&str, &str)]) -> Vec<String> {
        (0..n).map(|_| line(&self.get(path, headers))).collect()
    }

    /// Envoy's ratelimit filter counters for the route's cluster `service` (shipped example)
    /// or `backend` (generated bootstrap): `ok`, `over_limit`, `error`, `failure_mode_allowed`.
    fn envoy_stat(&self, cluster: &str, name: &str) -> u64 {
        self.envoy.stat(&format!("cluster.{cluster}.ratelimit.{name}")).expect("envoy admin /stats")
    }
}

/// What curl -i shows of a response that matters here: status and the three headers.
fn line(r: &Response) -> String {
    let h = |name| r.header(name).unwrap_or("-");
    format!(
        "{} limit={} remaining={} reset={}",
        r.status,
        h("x-ratelimit-limit"),
        h("x-ratelimit-remaining"),
        h("x-ratelimit-reset")
    )
}

/// The expected [`line`]: `limit` is the whole `x-ratelimit-limit` value.
fn expect(status: u16, limit: &str, remaining: u32, reset: u32) -> String {
    format!("{status} limit={limit} remaining={remaining} reset={reset}")
}

/// A response no rule limited: no `x-ratelimit-*` headers.
fn unlimited() -> String {
    "200 limit=- remaining=- reset=-".to_owned()
}

/// `x-ratelimit-limit` for one limit, as DRAFT_VERSION_03 writes it: the limit, then its
/// quota policy `LIMIT;w=WINDOW_SECONDS;name="NAME"` (no `name` when the limit has none: an
/// unnamed envoyproxy/ratelimit limit, answered with an empty name as the reference does).
fn one_limit(requests: u32, window: u32, name: &str) -> String {
    if name.is_empty() {
        format!("{requests}, {requests};w={window}")
    } else {
        format!("{requests}, {requests};w={window};name=\"{name}\"")
    }
}

/// A fixed window's curl loop: `allowed` 200s counting `remaining` down from `limit - 1`, then
/// `denied` 429s at 0, every one with the same limit header and reset.
fn window_sequence(limit: u32, header: &str, reset: u32, allowed: u32, denied: u32) -> Vec<String> {
    let mut lines: Vec<String> = (1..=allowed).map(|i| expect(200, header, limit - i, reset)).collect();
    lines.extend((0..denied).map(|_| expect(429, header, 0, reset)));
    lines
}

fn ratelimit_example() -> L7Plan {
    plan(&[examples("envoy/ratelimit.yaml")])
}

/// `/total`: 120 requests at 100 a minute give 100 × 200 then 20 × 429.
#[test]
fn one_hundred_twenty_requests_at_one_hundred_a_minute() {
    let stack = Stack::example(|| frozen(ratelimit_example(), T), Counting::Local);
    let got = stack.curl_loop(120, "/total", &[]);
    let header = one_limit(100, 60, "");
    assert_eq!(got[0], r#"200 limit=100, 100;w=60 remaining=99 reset=30"#);
    assert_eq!(got, window_sequence(100, &header, 30, 100, 20));

    let last = stack.get("/total", &[]);
    assert_eq!(last.header("x-envoy-ratelimited"), Some("true"), "Envoy marks its own 429s: {:?}", last.headers);
    assert_eq!(stack.backend.requests(), 100, "only the allowed requests reach the backend");
    assert_eq!(stack.envoy_stat("service", "over_limit"), 21);
    assert_eq!(stack.envoy_stat("service", "ok"), 100);
    assert_eq!(stack.envoy_stat("service", "error"), 0, "{}", stack.envoy.log());
    let rule = [("domain", DOCS), ("rule", "envoy-docs/generic_key=total")];
    assert_eq!(stack.rls.counter("limiter_rls_decisions_total", &[rule[0], rule[1], ("code", "OVER_LIMIT")]), 21);
    assert_eq!(stack.rls.counter("limiter_rls_decisions_total", &[rule[0], rule[1], ("code", "OK")]), 100);
}

/// `/users`: alice and bob get 3 a minute each, independently; a request without the
/// header sends no descriptor and is not limited.
#[test]
fn alice_and_bob_get_three_a_minute_each() {
    let stack = Stack::example(|| frozen(ratelimit_example(), T), Counting::Local);
    let header = one_limit(3, 60, "");
    let expected = window_sequence(3, &header, 30, 3, 2);
    assert_eq!(stack.curl_loop(5, "/users", &[("x-user-id", "alice")]), expected, "alice");
    assert_eq!(stack.curl_loop(5, "/users", &[("x-user-id", "bob")]), expected, "bob, after alice ran out");
    assert_eq!(stack.curl_loop(4, "/users", &[]), vec![unlimited(); 4], "no x-user-id, no descriptor");
    // Envoy called the service only for the ten requests with the header.
    let calls = stack.envoy_stat("service", "ok") + stack.envoy_stat("service", "over_limit");
    assert_eq!(calls, 10);
    assert_eq!(stack.backend.requests(), 3 + 3 + 4);
}

/// `/anon`: requests without x-user-id share 10 a minute; an identified user has 100 of
/// their own, also once the anonymous ones ran out.
#[test]
fn anonymous_requests_share_ten_identified_users_get_a_hundred() {
    let stack = Stack::example(|| frozen(ratelimit_example(), T), Counting::Local);
    let anonymous = one_limit(10, 60, "");
    assert_eq!(stack.curl_loop(12, "/anon", &[]), window_sequence(10, &anonymous, 30, 10, 2), "anonymous");

    let identified = one_limit(100, 60, "");
    let carol = stack.curl_loop(12, "/anon", &[("x-user-id", "carol")]);
    assert_eq!(carol, window_sequence(100, &identified, 30, 12, 0), "carol");
    let dave = stack.curl_loop(2, "/anon", &[("x-user-id", "dave")]);
    assert_eq!(dave, window_sequence(100, &identified, 30, 2, 0), "dave counts on his own");
    assert_eq!(stack.curl_loop(1, "/anon", &[]), [expect(429, &anonymous, 0, 30)], "anonymous still out");
}

/// `/two`: 1 a second and 20 a minute on one route; whichever runs out first denies. In one
/// second the per-second rule denies from the 2nd request on, while every request (denied ones
/// too, as the reference service counts) fills the minute; in the next second the
/// per-second rule would allow, and the minute rule denies.
#[test]
fn two_rules_on_one_route_whichever_runs_out_first_denies() {
    // The clock stands at T until `run_from`, then runs: the second T lasts until
    // `run_from + 1 s`, so the first 20 requests have seconds to spare.
    let run_from = std::cell::Cell::new(Instant::now());
    let stack = Stack::example(
        || {
            run_from.set(Instant::now() + Duration::from_secs(3));
            Engine::with_clock(ratelimit_example(), EngineConfig::default(), run_from.get(), secs(T))
        },
        Counting::Local,
    );
    let header = "1, 1;w=1, 20;w=60";
    // Envoy reports the status with the least remaining, the first one on a tie: the
    // per-second rule, whose window ends in 1 s.
    let mut expected = vec![expect(200, header, 0, 1)];
    expected.extend((2..=20).map(|_| expect(429, header, 0, 1)));
    assert_eq!(stack.curl_loop(20, "/two", &[]), expected, "second T");

    // Second T + 1: the per-second rule has room again, the minute is used up.
    let next_second = run_from.get() + Duration::from_millis(1050);
    std::thread::sleep(next_second.saturating_duration_since(Instant::now()));
    assert_eq!(stack.curl_loop(1, "/two", &[]), [expect(429, header, 0, 1)], "second T + 1");

    // Which rule said no: the service's decision counters per rule.
    let over = |rule| stack.rls.counter("limiter_rls_decisions_total", &[("rule", rule), ("code", "OVER_LIMIT")]);
    assert_eq!(over("envoy-docs/generic_key=two-per-second"), 19);
    assert_eq!(over("envoy-docs/generic_key=two-per-minute"), 1);
    assert_eq!(stack.backend.requests(), 1);
}

/// `/shadow`: a shadow-mode rule of 5 a minute never denies; the agent counts what it would
/// have denied.
#[test]
fn shadow_mode_never_denies_and_counts_what_it_would_have() {
    let stack = Stack::example(|| frozen(ratelimit_example(), T), Counting::Local);
    let header = one_limit(5, 60, "");
    let mut expected: Vec<String> = (1..=5).map(|i| expect(200, &header, 5 - i, 30)).collect();
    // Over the limit: still 200, remaining 0.
    expected.extend((0..5).map(|_| expect(200, &header, 0, 30)));
    assert_eq!(stack.curl_loop(10, "/shadow", &[]), expected);
    assert_eq!(stack.backend.requests(), 10);
    assert_eq!(stack.envoy_stat("service", "over_limit"), 0);
    let shadow = [("domain", DOCS), ("rule", "envoy-docs/generic_key=shadow")];
    assert_eq!(stack.rls.counter("limiter_rls_shadow_over_limit_total", &shadow), 5, "{}", stack.rls.metrics());
}

/// The Envoy `rate_limits` of every L7 rule of `paths`, as `limiter-agent explain --json`
/// prints them: one list per domain and targets.
fn explained_rate_limits(paths: &[PathBuf]) -> Vec<(String, Value)> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = limiter_agent::cli::explain::report(paths, true, &mut out, &mut err).expect("explain runs");
    assert_eq!(code, std::process::ExitCode::SUCCESS, "{}", String::from_utf8_lossy(&err));
    let explained: Value = serde_json::from_slice(&out).expect("explain --json prints JSON");
    let groups = explained["rate_limits"].as_array().expect("rate_limits");
    groups
        .iter()
        .map(|g| {
            let lists = g["rate_limits"].as_array().expect("descriptors");
            let rate_limits = lists.iter().map(|d| json!({"actions": d["actions"]})).collect();
            (g["domain"].as_str().expect("domain").to_owned(), Value::Array(rate_limits))
        })
        .collect()
}

/// A temporary policy file, removed on drop.
struct PolicyFile(PathBuf);

impl PolicyFile {
    fn new(name: &str, text: &str) -> PolicyFile {
        let dir = std::env::temp_dir().join(format!("limiter-envoy-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write policy");
        PolicyFile(path)
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const BURST_POLICY: &str = "\
apiVersion: limiter.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: burst}
spec:
  rateLimit:
    local:
      rules:
        - name: per-client
          clientSelectors: [{sourceCIDR: {type: Distinct, value: 0.0.0.0/0}}]
          count: Requests
          limit: {requests: 3, unit: Second, burst: 3}
";

/// Burst: a native rule of 3 a second with a burst of 3 per client is a token bucket 6 deep,
/// so a client's loop gets 6 × 200 then 429 (the clock stands still: nothing refills); another
/// client address has a bucket of its own. Envoy's route carries the actions `explain` prints.
#[test]
fn a_native_rule_with_a_burst_allows_six_then_denies() {
    let policy = PolicyFile::new("burst.yaml", BURST_POLICY);
    let paths = [policy.0.clone()];
    let groups = explained_rate_limits(&paths);
    assert_eq!(groups.len(), 1, "{groups:?}");
    let (domain, rate_limits) = &groups[0];
    assert_eq!(domain, "limiter");
    assert_eq!(
        rate_limits,
        &json!([{"actions": [{"generic_key": {"descriptor_value": "burst/per-client"}}, {"remote_address": {}}]}])
    );
    let routes = vec![Route { prefix: "/".into(), rate_limits: rate_limits.clone() }];
    let stack = Stack::gateway(frozen(plan(&paths), T), routes);

    // The reported limit is the rate (3 a second), so `remaining` can be above it. Reset is
    // the time until the bucket is full again: a token per 1/3 s, in whole seconds up.
    let header = one_limit(3, 1, "burst/per-client");
    let mut expected: Vec<String> =
        (1..=6u32).map(|taken| expect(200, &header, 6 - taken, taken.div_ceil(3))).collect();
    expected.extend((0..2).map(|_| expect(429, &header, 0, 2)));
    let from = |ip: Ipv4Addr| -> Vec<String> {
        (0..8).map(|_| line(&get_from(ip, stack.envoy.port(), "/api", &[]).expect("GET /api"))).collect()
    };
    assert_eq!(from(Ipv4Addr::LOCALHOST), expected, "client 127.0.0.1");
    assert_eq!(from(Ipv4Addr::new(127, 0, 0, 2)), expected, "client 127.0.0.2 has its own bucket");
    assert_eq!(stack.backend.requests(), 12);
    assert_eq!(stack.envoy_stat("backend", "over_limit"), 4);
}

/// Envoy Gateway's shipped per-user `BackendTrafficPolicy` (x-user-id `Distinct`, 3 an hour)
/// through the actions `explain` prints: alice and bob count independently.
#[test]
fn an_envoy_gateway_per_user_rule_counts_alice_and_bob_apart() {
    let paths = [examples("gateways/envoy-gateway/distinct-users.yaml")];
    let groups = explained_rate_limits(&paths);
    assert_eq!(groups.len(), 1, "{groups:?}");
    let (domain, rate_limits) = &groups[0];
    assert_eq!(domain, "limiter");
    let routes = vec![Route { prefix: "/".into(), rate_limits: rate_limits.clone() }];
    let stack = Stack::gateway(frozen(plan(&paths), T), routes);

    // A token per 20 minutes: reset grows by 1200 s per request taken.
    let header = one_limit(3, 3600, "eg-distinct-users/rule-0");
    let mut expected: Vec<String> = (1..=3u32).map(|taken| expect(200, &header, 3 - taken, 1200 * taken)).collect();
    expected.push(expect(429, &header, 0, 3600));
    for user in ["alice", "bob"] {
        assert_eq!(stack.curl_loop(4, "/get", &[("x-user-id", user)]), expected, "{user}");
    }
    assert_eq!(stack.curl_loop(2, "/get", &[]), vec![unlimited(); 2], "no x-user-id, no descriptor");
    assert_eq!(stack.backend.requests(), 3 + 3 + 2);
}

/// The Redis backend through Envoy: `/total` gives 100 × 200 then 20 × 429 with the same headers
/// as local counting, and the count sits in Redis under the reference service's key. Redis
/// windows follow the wall clock, so the scenario starts early enough in a minute to end in it.
#[test]
fn over_redis_envoy_gets_the_same_answers() {
    let redis = RedisServer::start().expect("redis-server");
    let stack =
        Stack::example(|| Engine::new(ratelimit_example(), EngineConfig::default()), Counting::Redis(redis.url()));
    let unix_now = || SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    // Not an assertion on time: with less than 15 s left in this minute, wait for the next.
    if 60 - unix_now() % 60 < 15 {
        std::thread::sleep(secs(60 - unix_now() % 60));
    }
    let window = unix_now() / 60 * 60;
    let responses: Vec<Response> = (0..120).map(|_| stack.get("/total", &[])).collect();

    // Reset counts down with the wall clock; the rest is exact.
    let header = one_limit(100, 60, "");
    let resets: Vec<u32> =
        responses.iter().map(|r| r.header("x-ratelimit-reset").and_then(|v| v.parse().ok()).unwrap_or(0)).collect();
    assert!(resets.iter().all(|r| (1..=60).contains(r)), "{resets:?}");
    let got: Vec<String> = responses.iter().map(line).collect();
    let expected: Vec<String> = (1..=120u32)
        .zip(&resets)
        .map(|(i, &reset)| if i <= 100 { expect(200, &header, 100 - i, reset) } else { expect(429, &header, 0, reset) })
        .collect();
    assert_eq!(got, expected);
    // 120: every hit is counted, over the limit or not, as the reference service does with its
    // local cache off (its default; `--redis-local-cache-keys` turns ours on).
    assert_eq!(redis.get_int(&format!("envoy-docs_generic_key_total_{window}")).unwrap(), Some(120));
    assert_eq!(stack.backend.requests(), 100);
}

/// Envoy without the agent: with the service stopped, the shipped `failure_mode_deny: false`
/// lets every request through, without `x-ratelimit-*` headers, and Envoy counts the errors.
#[test]
fn with_the_service_stopped_envoy_lets_requests_through() {
    let mut stack = Stack::example(|| frozen(ratelimit_example(), T), Counting::Local);
    let header = one_limit(3, 60, "");
    let alice = [("x-user-id", "alice")];
    assert_eq!(stack.curl_loop(4, "/users", &alice), window_sequence(3, &header, 30, 3, 1), "agent running");

    stack.rls.stop();
    assert_eq!(stack.curl_loop(3, "/users", &alice), vec![unlimited(); 3], "agent stopped");
    assert_eq!(stack.envoy_stat("service", "error"), 3);
    assert_eq!(stack.envoy_stat("service", "failure_mode_allowed"), 3);
    assert_eq!(stack.backend.requests(), 3 + 3);
}
