//! The Redis backend of the rate limit service against a real `redis-server` the harness starts
//! on a free loopback port: the keys and TTLs envoyproxy/ratelimit writes, counts shared by two
//! agents ("nodes"), the over-limit negative cache, failOpen / failClosed while the server is
//! down, and recovery after it comes back.
//!
//! Rules are built as L7 plans by hand, so each test states exactly the descriptor it expects.
//! Time for the windows is a fixed `SystemTime` passed per request, so window boundaries never
//! move under a test; TTLs are real (Redis keeps them), and only bounded above and below.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use limiter_agent::l7::{Code, DescriptorEntry, Engine, EngineConfig, RequestDescriptor, RlsRequest, RlsResponse};
use limiter_agent::plan::l7::{Algorithm, Attribute, EntryMatch, EntryValue, L7Plan, L7Rule, Scope};
use limiter_agent::plan::{Limit, Unit};
use limiter_agent::rls::redis::{FailureMode, RedisBackend, RedisConfig};
use limiter_tests::redis::RedisServer;

/// 30 s into a minute (810 s into an hour): every window below is far from its edge.
const T: u64 = 1_700_000_010;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

/// A fixed-window rule in `domain` matching `entries` (key, value; value `None` = key only).
fn rule(domain: &str, name: &str, entries: &[(&str, Option<&str>)], limit: Option<(u64, Unit)>) -> L7Rule {
    L7Rule {
        name: name.to_owned(),
        domain: domain.to_owned(),
        entries: entries
            .iter()
            .map(|(key, value)| EntryMatch {
                key: (*key).to_owned(),
                attribute: Attribute::Descriptor,
                value: match value {
                    Some(v) => EntryValue::Exact((*v).to_owned()),
                    None => EntryValue::Distinct,
                },
            })
            .collect(),
        limit: limit.map(|(requests, unit)| Limit { requests, unit, burst: 0 }),
        algorithm: Algorithm::FixedWindow,
        scope: Scope::Global,
        shadow: false,
        replaces: Vec::new(),
        targets: Vec::new(),
        ..L7Rule::default()
    }
}

fn engine(rules: Vec<L7Rule>) -> Arc<Engine> {
    Arc::new(Engine::new(L7Plan { rules }, EngineConfig::default()))
}

fn descriptor(entries: &[(&str, &str)]) -> RequestDescriptor {
    RequestDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| DescriptorEntry { key: (*k).to_owned(), value: (*v).to_owned() })
            .collect(),
        hits_addend: None,
        limit: None,
    }
}

fn request(domain: &str, descriptors: Vec<RequestDescriptor>) -> RlsRequest {
    RlsRequest { domain: domain.to_owned(), descriptors, hits_addend: 0 }
}

async fn backend(server: &RedisServer, failure_mode: FailureMode) -> RedisBackend {
    let config = RedisConfig { failure_mode, negative_cache_capacity: 100_000, ..RedisConfig::default() };
    let backend = RedisBackend::connect(&server.url(), config).await.expect("valid redis url");
    assert!(backend.is_connected(), "backend did not connect to {}", server.url());
    backend
}

async fn decide(backend: &RedisBackend, engine: &Engine, req: &RlsRequest, now: SystemTime) -> RlsResponse {
    backend.should_rate_limit(engine, req, now).await.expect("valid request")
}

/// Codes of `n` identical requests in a row.
async fn codes(backend: &RedisBackend, engine: &Engine, req: &RlsRequest, now: SystemTime, n: usize) -> Vec<Code> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(decide(backend, engine, req, now).await.overall);
    }
    out
}

fn repeat(code: Code, n: usize) -> Vec<Code> {
    vec![code; n]
}

#[test]
fn keys_ttls_and_statuses_are_the_reference_services() {
    let server = RedisServer::start().expect("redis-server");
    let rt = runtime();
    rt.block_on(async {
        let engine = engine(vec![
            rule("rl", "rl/database=users", &[("database", Some("users"))], Some((5, Unit::Minute))),
            rule("rl", "rl/a=1/b", &[("a", Some("1")), ("b", None)], Some((100, Unit::Hour))),
            rule("rl", "rl/per_second", &[("per_second", None)], Some((10, Unit::Second))),
            rule("rl", "rl/daily", &[("daily", None)], Some((1000, Unit::Day))),
        ]);
        let redis = backend(&server, FailureMode::FailOpen).await;

        let req = request("rl", vec![descriptor(&[("database", "users")])]);
        for expected_remaining in [4, 3, 2] {
            let response = decide(&redis, &engine, &req, at(T)).await;
            assert_eq!(response.overall, Code::Ok);
            let status = &response.statuses[0];
            assert_eq!(status.code, Code::Ok);
            assert_eq!(status.limit_remaining, expected_remaining);
            // 30 s into the minute: 30 s left, in whole seconds as the reference computes it.
            assert_eq!(status.duration_until_reset, Duration::from_secs(30));
            let limit = status.limit.as_ref().expect("a limit is reported");
            assert_eq!((limit.requests_per_unit, limit.unit), (5, Unit::Minute));
        }
        let minute_key = format!("rl_database_users_{}", T / 60 * 60);
        assert_eq!(server.keys("*").unwrap(), std::slice::from_ref(&minute_key));
        assert_eq!(server.get_int(&minute_key).unwrap(), Some(3));
        let ttl = server.ttl(&minute_key).unwrap();
        assert!((1..=60).contains(&ttl), "EXPIRE is the unit (60 s), TTL is {ttl}");

        // Several entries, each `key_value_`; key-only entries carry the request's value.
        let req = request(
            "rl",
            vec![
                descriptor(&[("a", "1"), ("b", "anything")]),
                descriptor(&[("per_second", "x")]),
                descriptor(&[("daily", "y")]),
            ],
        );
        assert_eq!(decide(&redis, &engine, &req, at(T)).await.overall, Code::Ok);
        let hour_key = format!("rl_a_1_b_anything_{}", T / 3600 * 3600);
        let second_key = format!("rl_per_second_x_{T}");
        let day_key = format!("rl_daily_y_{}", T / 86400 * 86400);
        let mut expected = vec![minute_key.clone(), hour_key.clone(), second_key.clone(), day_key.clone()];
        expected.sort();
        assert_eq!(server.keys("*").unwrap(), expected);
        for (key, unit_secs) in [(&hour_key, 3600), (&second_key, 1), (&day_key, 86400)] {
            assert_eq!(server.get_int(key).unwrap(), Some(1), "{key}");
            let ttl = server.ttl(key).unwrap();
            // A 1 s key may already have expired by the time we look (-2); it must never be
            // without expiry (-1) or longer than its unit.
            assert!(ttl <= unit_secs && ttl != -1, "{key}: TTL {ttl} for a {unit_secs} s unit");
        }

        // A request that matches nothing writes nothing.
        let before = server.keys("*").unwrap();
        let response =
            decide(&redis, &engine, &request("rl", vec![descriptor(&[("database", "orders")])]), at(T)).await;
        assert_eq!(response.overall, Code::Ok);
        assert!(response.statuses[0].limit.is_none());
        let response =
            decide(&redis, &engine, &request("unknown-domain", vec![descriptor(&[("database", "users")])]), at(T))
                .await;
        assert_eq!(response.overall, Code::Ok);
        assert_eq!(server.keys("*").unwrap(), before);

        // The reference's CACHE_KEY_PREFIX.
        let prefixed =
            RedisBackend::connect(&server.url(), RedisConfig { key_prefix: "pfx:".into(), ..RedisConfig::default() })
                .await
                .unwrap();
        decide(&prefixed, &engine, &request("rl", vec![descriptor(&[("database", "users")])]), at(T)).await;
        assert_eq!(server.get_int(&format!("pfx:{minute_key}")).unwrap(), Some(1));
    });
}

#[test]
fn the_next_window_starts_from_zero() {
    let server = RedisServer::start().expect("redis-server");
    runtime().block_on(async {
        let engine = engine(vec![rule("rl", "rl/k", &[("k", None)], Some((2, Unit::Minute)))]);
        let redis = backend(&server, FailureMode::FailOpen).await;
        let req = request("rl", vec![descriptor(&[("k", "v")])]);
        let expected = [Code::Ok, Code::Ok, Code::OverLimit];
        assert_eq!(codes(&redis, &engine, &req, at(T), 3).await, expected);
        assert_eq!(codes(&redis, &engine, &req, at(T + 60), 3).await, expected);
        assert_eq!(server.get_int(&format!("rl_k_v_{}", T / 60 * 60)).unwrap(), Some(3));
        assert_eq!(server.get_int(&format!("rl_k_v_{}", T / 60 * 60 + 60)).unwrap(), Some(3));
    });
}

#[test]
fn two_nodes_share_one_count() {
    let server = RedisServer::start().expect("redis-server");
    runtime().block_on(async {
        // Two agents: separate engines, separate connections, one Redis.
        let rules = vec![rule("rl", "rl/user", &[("user", None)], Some((10, Unit::Minute)))];
        let (engine_a, engine_b) = (engine(rules.clone()), engine(rules));
        let node_a = backend(&server, FailureMode::FailOpen).await;
        let node_b = backend(&server, FailureMode::FailOpen).await;
        let req = request("rl", vec![descriptor(&[("user", "alice")])]);
        let mut seen = Vec::new();
        for i in 0..20 {
            let (node, engine) = if i % 2 == 0 { (&node_a, &engine_a) } else { (&node_b, &engine_b) };
            seen.push(decide(node, engine, &req, at(T)).await.overall);
        }
        let mut expected = repeat(Code::Ok, 10);
        expected.extend(repeat(Code::OverLimit, 10));
        assert_eq!(seen, expected, "10 per minute across both nodes");
        assert!(node_a.stats().round_trips > 0 && node_b.stats().round_trips > 0);
    });
}

#[test]
fn over_limit_keys_skip_redis_until_their_window_ends() {
    let server = RedisServer::start().expect("redis-server");
    runtime().block_on(async {
        let engine = engine(vec![rule("rl", "rl/k", &[("k", None)], Some((3, Unit::Minute)))]);
        let redis = backend(&server, FailureMode::FailOpen).await;
        server.reset().unwrap();
        let req = request("rl", vec![descriptor(&[("k", "v")])]);

        let mut expected = repeat(Code::Ok, 3);
        expected.push(Code::OverLimit);
        assert_eq!(codes(&redis, &engine, &req, at(T), 4).await, expected);
        assert_eq!(server.command_calls("incrby").unwrap(), 4);
        assert_eq!(redis.stats().negative_cache_hits, 0);

        // Known over the limit: answered from memory, Redis untouched.
        assert_eq!(codes(&redis, &engine, &req, at(T + 5), 10).await, repeat(Code::OverLimit, 10));
        assert_eq!(server.command_calls("incrby").unwrap(), 4, "negative-cached requests must not reach Redis");
        assert_eq!(redis.stats().negative_cache_hits, 10);
        let response = decide(&redis, &engine, &req, at(T + 5)).await;
        assert_eq!(response.statuses[0].limit_remaining, 0);
        assert_eq!(response.statuses[0].duration_until_reset, Duration::from_secs(25));

        // A different value has its own key and is not affected.
        let other = request("rl", vec![descriptor(&[("k", "w")])]);
        assert_eq!(decide(&redis, &engine, &other, at(T + 5)).await.overall, Code::Ok);
        assert_eq!(server.command_calls("incrby").unwrap(), 5);

        // The window ended: back to Redis, counting from zero.
        assert_eq!(decide(&redis, &engine, &req, at(T + 30)).await.overall, Code::Ok);
        assert_eq!(server.command_calls("incrby").unwrap(), 6);
    });
}

#[test]
fn hits_addend_unlimited_replaces_and_shadow_over_redis() {
    let server = RedisServer::start().expect("redis-server");
    runtime().block_on(async {
        let mut shadow = rule("rl", "rl/shadow", &[("shadow", None)], Some((1, Unit::Minute)));
        shadow.shadow = true;
        let mut specific = rule("rl", "rl/user=vip", &[("user", Some("vip"))], Some((50, Unit::Minute)));
        specific.replaces = vec!["rl/generic".to_owned()];
        let engine = engine(vec![
            rule("rl", "rl/k", &[("k", None)], Some((10, Unit::Minute))),
            rule("rl", "rl/free", &[("free", None)], None),
            shadow,
            specific,
            rule("rl", "rl/generic", &[("generic", None)], Some((1, Unit::Minute))),
        ]);
        let redis = backend(&server, FailureMode::FailOpen).await;
        let window = T / 60 * 60;

        // Request-wide hits_addend.
        let mut req = request("rl", vec![descriptor(&[("k", "a")])]);
        req.hits_addend = 4;
        let response = decide(&redis, &engine, &req, at(T)).await;
        assert_eq!(response.statuses[0].limit_remaining, 6);
        assert_eq!(server.get_int(&format!("rl_k_a_{window}")).unwrap(), Some(4));

        // Per-descriptor hits_addend wins; 0 checks without counting.
        let mut check_only = descriptor(&[("k", "a")]);
        check_only.hits_addend = Some(0);
        let response = decide(&redis, &engine, &request("rl", vec![check_only]), at(T)).await;
        assert_eq!((response.overall, response.statuses[0].limit_remaining), (Code::Ok, 6));
        assert_eq!(server.get_int(&format!("rl_k_a_{window}")).unwrap(), Some(4));
        let mut seven = descriptor(&[("k", "a")]);
        seven.hits_addend = Some(7);
        let response = decide(&redis, &engine, &request("rl", vec![seven]), at(T)).await;
        assert_eq!(response.overall, Code::OverLimit, "4 + 7 > 10");

        // Unlimited: OK, no limit, nothing written.
        let response = decide(&redis, &engine, &request("rl", vec![descriptor(&[("free", "x")])]), at(T)).await;
        assert_eq!(response.overall, Code::Ok);
        assert!(response.statuses[0].limit.is_none());
        assert!(server.keys("rl_free_*").unwrap().is_empty());

        // Shadow: counted, over the limit, still OK.
        let req = request("rl", vec![descriptor(&[("shadow", "s")])]);
        let first = decide(&redis, &engine, &req, at(T)).await;
        let second = decide(&redis, &engine, &req, at(T)).await;
        assert!(!first.statuses[0].shadow_over_limit);
        assert_eq!(second.overall, Code::Ok);
        assert!(second.statuses[0].shadow_over_limit, "shadow rule is over its limit of 1");
        assert_eq!(server.get_int(&format!("rl_shadow_s_{window}")).unwrap(), Some(2));

        // `replaces`: with both matched, the replaced rule is neither counted nor enforced.
        let both = request("rl", vec![descriptor(&[("user", "vip")]), descriptor(&[("generic", "g")])]);
        let replaced = codes(&redis, &engine, &both, at(T), 3).await;
        assert_eq!(replaced, repeat(Code::Ok, 3));
        assert!(server.keys("rl_generic_*").unwrap().is_empty());
        assert_eq!(server.get_int(&format!("rl_user_vip_{window}")).unwrap(), Some(3));
        // Alone, it applies.
        let alone = request("rl", vec![descriptor(&[("generic", "g")])]);
        assert_eq!(codes(&redis, &engine, &alone, at(T), 2).await, [Code::Ok, Code::OverLimit]);
    });
}

#[test]
fn failure_modes_while_redis_is_down_and_recovery_after_restart() {
    let mut server = RedisServer::start().expect("redis-server");
    runtime().block_on(async {
        let mut shadow = rule("rl", "rl/shadow", &[("shadow", None)], Some((5, Unit::Minute)));
        shadow.shadow = true;
        let engine = engine(vec![
            rule("rl", "rl/k", &[("k", None)], Some((5, Unit::Minute))),
            rule("rl", "rl/tiny", &[("tiny", None)], Some((1, Unit::Minute))),
            shadow,
        ]);
        let open = backend(&server, FailureMode::FailOpen).await;
        let closed = backend(&server, FailureMode::FailClosed).await;
        let req = request("rl", vec![descriptor(&[("k", "v")])]);
        assert_eq!(decide(&open, &engine, &req, at(T)).await.overall, Code::Ok);
        assert_eq!(decide(&closed, &engine, &req, at(T)).await.overall, Code::Ok);
        // Put one key over its limit in `closed`'s negative cache before the outage.
        let tiny = request("rl", vec![descriptor(&[("tiny", "t")])]);
        assert_eq!(codes(&closed, &engine, &tiny, at(T), 2).await, [Code::Ok, Code::OverLimit]);
        let errors_before = (open.stats().errors, closed.stats().errors);

        server.stop().unwrap();

        // failOpen: allowed, no limit reported.
        for _ in 0..3 {
            let response = decide(&open, &engine, &req, at(T)).await;
            assert_eq!(response.overall, Code::Ok);
            assert!(response.statuses[0].limit.is_none(), "failOpen reports no limit");
        }
        // failClosed: denied with the rule's limit, remaining 0, reset at the window's end.
        for _ in 0..3 {
            let response = decide(&closed, &engine, &req, at(T)).await;
            assert_eq!(response.overall, Code::OverLimit);
            let status = &response.statuses[0];
            assert_eq!(status.limit.as_ref().map(|l| l.requests_per_unit), Some(5));
            assert_eq!((status.limit_remaining, status.duration_until_reset), (0, Duration::from_secs(30)));
        }
        // Shadow rules never deny, not even failing closed.
        let shadow_req = request("rl", vec![descriptor(&[("shadow", "s")])]);
        assert_eq!(decide(&closed, &engine, &shadow_req, at(T)).await.overall, Code::Ok);
        // A descriptor no rule matches needs no Redis: OK either way.
        let unmatched = request("rl", vec![descriptor(&[("nothing", "here")])]);
        assert_eq!(decide(&closed, &engine, &unmatched, at(T)).await.overall, Code::Ok);
        // The negative cache still knows `tiny` is over its limit: denied without Redis.
        assert_eq!(decide(&closed, &engine, &tiny, at(T)).await.overall, Code::OverLimit);

        assert!(open.stats().errors > errors_before.0, "Redis errors are counted");
        assert!(closed.stats().errors > errors_before.1, "Redis errors are counted");
        assert!(open.stats().failure_mode_answers >= 3 && closed.stats().failure_mode_answers >= 3);

        server.restart().unwrap();
        // Bounded wait for the background reconnect (backoff is at most 2 s).
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(open.is_connected() && closed.is_connected()) {
            assert!(Instant::now() < deadline, "backends did not reconnect after the restart");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(open.stats().reconnects >= 1 && closed.stats().reconnects >= 1);

        // Counting again, from zero (the restarted server is empty).
        let response = decide(&closed, &engine, &req, at(T)).await;
        assert_eq!((response.overall, response.statuses[0].limit_remaining), (Code::Ok, 4));
        let response = decide(&open, &engine, &req, at(T)).await;
        assert_eq!((response.overall, response.statuses[0].limit_remaining), (Code::Ok, 3));
        assert_eq!(server.get_int(&format!("rl_k_v_{}", T / 60 * 60)).unwrap(), Some(2));
    });
}

#[test]
fn a_backend_started_while_redis_is_down_answers_by_its_failure_mode_then_connects() {
    let mut server = RedisServer::start().expect("redis-server");
    server.stop().unwrap();
    runtime().block_on(async {
        let engine = engine(vec![rule("rl", "rl/k", &[("k", None)], Some((5, Unit::Minute)))]);
        let config = RedisConfig {
            failure_mode: FailureMode::FailClosed,
            negative_cache_capacity: 100_000,
            ..RedisConfig::default()
        };
        let redis = RedisBackend::connect(&server.url(), config).await.expect("a valid URL is enough to start");
        assert!(!redis.is_connected());
        let req = request("rl", vec![descriptor(&[("k", "v")])]);
        assert_eq!(decide(&redis, &engine, &req, at(T)).await.overall, Code::OverLimit);

        server.restart().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !redis.is_connected() {
            assert!(Instant::now() < deadline, "backend did not connect once Redis came up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(decide(&redis, &engine, &req, at(T)).await.overall, Code::Ok);

        let bad = RedisBackend::connect("not a url", RedisConfig::default()).await;
        assert!(bad.is_err(), "an invalid URL is an error at start");
    });
}

/// The shipped `examples/envoy/ratelimit.yaml`, loaded and compiled by the policy code, counted in
/// Redis with the descriptors `examples/envoy/envoy.yaml` makes Envoy send: the gateway docs'
/// curl-loop sequences, per scenario (the same ones tests/tests/envoy.rs runs through Envoy).
#[test]
fn the_envoy_example_scenarios_over_redis() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/envoy/ratelimit.yaml");
    let set = limiter_agent::policy::load_paths(&[path]).expect("examples/envoy/ratelimit.yaml loads");
    let rules =
        set.ratelimit_configs.iter().flat_map(limiter_agent::policy::kinds::ratelimit_config::compile).collect();
    let engine = engine(rules);
    let server = RedisServer::start().expect("redis-server");
    runtime().block_on(async {
        let redis = backend(&server, FailureMode::FailClosed).await;
        let one = |key: &str, value: &str| request("envoy-docs", vec![descriptor(&[(key, value)])]);

        // 120 requests at 100/min.
        let mut expected = repeat(Code::Ok, 100);
        expected.extend(repeat(Code::OverLimit, 20));
        assert_eq!(codes(&redis, &engine, &one("generic_key", "total"), at(T), 120).await, expected);

        // alice and bob, 3 a minute each.
        for user in ["alice", "bob"] {
            let got = codes(&redis, &engine, &one("x-user-id", user), at(T), 5).await;
            assert_eq!(got, [Code::Ok, Code::Ok, Code::Ok, Code::OverLimit, Code::OverLimit], "{user}");
        }

        // Anonymous share 10; an identified user still has 100.
        let mut expected = repeat(Code::Ok, 10);
        expected.extend(repeat(Code::OverLimit, 2));
        assert_eq!(codes(&redis, &engine, &one("header_match", "anonymous"), at(T), 12).await, expected);
        assert_eq!(codes(&redis, &engine, &one("identified-user", "carol"), at(T), 12).await, repeat(Code::Ok, 12));

        // Two rules on one request: 1/s and 20/min, every descriptor counted.
        let two = request(
            "envoy-docs",
            vec![descriptor(&[("generic_key", "two-per-second")]), descriptor(&[("generic_key", "two-per-minute")])],
        );
        let mut seen = codes(&redis, &engine, &two, at(T), 2).await;
        for s in 1..=19 {
            seen.push(decide(&redis, &engine, &two, at(T + s)).await.overall);
        }
        let mut expected = vec![Code::Ok, Code::OverLimit];
        expected.extend(repeat(Code::Ok, 18));
        expected.push(Code::OverLimit);
        assert_eq!(seen, expected);

        // Shadow: never denied, but known to be over.
        let shadow = one("generic_key", "shadow");
        assert_eq!(codes(&redis, &engine, &shadow, at(T), 10).await, repeat(Code::Ok, 10));
        assert!(decide(&redis, &engine, &shadow, at(T)).await.statuses[0].shadow_over_limit);

        // The counters carry the reference service's names.
        let window = T / 60 * 60;
        assert_eq!(server.get_int(&format!("envoy-docs_x-user-id_alice_{window}")).unwrap(), Some(4));
        assert_eq!(server.get_int(&format!("envoy-docs_generic_key_total_{window}")).unwrap(), Some(101));
    });
}

/// A gateway kind's `rateLimit.local` rule stays on this node even with the Redis backend: the
/// in-process token bucket (burst included) decides it and Redis never sees it, while the
/// global rule beside it in the same request is counted in Redis.
#[test]
fn local_rules_are_decided_in_process_and_global_ones_in_redis() {
    let server = RedisServer::start().expect("redis-server");
    let rt = runtime();
    let mut local = rule("limiter", "p/local", &[("generic_key", Some("p/local"))], Some((3, Unit::Hour)));
    local.scope = Scope::Local;
    local.algorithm = Algorithm::TokenBucket;
    local.limit = Some(Limit { requests: 3, unit: Unit::Hour, burst: 3 });
    let global = rule("limiter", "p/global", &[("generic_key", Some("p/global"))], Some((100, Unit::Hour)));
    let engine = engine(vec![local, global]);
    rt.block_on(async {
        let backend = backend(&server, FailureMode::FailOpen).await;
        let req = request("limiter", vec![descriptor(&[("generic_key", "p/local")])]);
        // 3 per hour with a burst of 3: six at once, then denied (a token takes 20 minutes).
        let mut expected = repeat(Code::Ok, 6);
        expected.push(Code::OverLimit);
        assert_eq!(codes(&backend, &engine, &req, at(T), 7).await, expected);
        assert_eq!(server.keys("*").expect("KEYS"), Vec::<String>::new(), "a local rule wrote to Redis");
        assert_eq!(server.command_calls("incrby").expect("INFO"), 0);

        let both = request(
            "limiter",
            vec![descriptor(&[("generic_key", "p/global")]), descriptor(&[("generic_key", "p/local")])],
        );
        let resp = decide(&backend, &engine, &both, at(T)).await;
        assert_eq!(resp.statuses[0].code, Code::Ok);
        assert_eq!(resp.statuses[0].limit_remaining, 99);
        assert_eq!(resp.statuses[1].code, Code::OverLimit, "the local bucket is still empty");
        assert_eq!(resp.overall, Code::OverLimit);
        let keys = server.keys("*").expect("KEYS");
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(keys[0].starts_with("limiter_generic_key_p/global_"), "{keys:?}");
    });
}
