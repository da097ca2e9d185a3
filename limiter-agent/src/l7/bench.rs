//! A standard workload for measuring the engine's decisions per second (used by the bench;
//! the test suite runs it only as a tiny smoke test, never asserting a time).
//!
//! The plan has the shapes real policies have: a per-user token bucket (a keyed counter per
//! `x-user-id`), a gateway-wide token bucket (one lock-free bucket every request charges) and
//! an envoyproxy/ratelimit key-only fixed window. Limits are high enough that requests are
//! allowed: the measurement is of decisions, not of refusals.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Code, DescriptorEntry, Engine, EngineConfig, HttpRequest, RequestDescriptor, RlsRequest};
use crate::plan::l7::{Algorithm, Attribute, DEFAULT_DOMAIN, EntryMatch, EntryValue, L7Plan, L7Rule, Scope, keys};
use crate::plan::{Limit, Unit};

/// The RLS domain of the workload's envoyproxy/ratelimit rule.
pub const BENCH_DOMAIN: &str = "bench";

/// What one run measured.
#[derive(Clone, Copy, Debug)]
pub struct BenchRun {
    pub threads: usize,
    /// Decisions made, all threads together.
    pub decisions: u64,
    /// Of which allowed (OK).
    pub allowed: u64,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

impl BenchRun {
    pub fn per_second(&self) -> f64 {
        self.decisions as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

fn rule(name: &str, domain: &str, entries: Vec<EntryMatch>, requests: u64, algorithm: Algorithm) -> L7Rule {
    L7Rule {
        name: name.into(),
        domain: domain.into(),
        entries,
        limit: Some(Limit { requests, unit: Unit::Second, burst: 0 }),
        algorithm,
        scope: Scope::Local,
        shadow: false,
        replaces: Vec::new(),
        targets: Vec::new(),
        ..L7Rule::default()
    }
}

/// The workload's plan.
pub fn bench_plan() -> L7Plan {
    let generic = |name: &str| EntryMatch {
        key: keys::GENERIC_KEY.into(),
        attribute: Attribute::Fixed,
        value: EntryValue::Exact(name.into()),
    };
    let per_user = EntryMatch {
        key: "x-user-id".into(),
        attribute: Attribute::Header("x-user-id".into()),
        value: EntryValue::Distinct,
    };
    let user_key = EntryMatch { key: "user".into(), attribute: Attribute::Descriptor, value: EntryValue::Distinct };
    L7Plan {
        rules: vec![
            rule(
                "bench/per-user",
                DEFAULT_DOMAIN,
                vec![generic("bench/per-user"), per_user],
                1_000_000,
                Algorithm::TokenBucket,
            ),
            rule("bench/global", DEFAULT_DOMAIN, vec![generic("bench/global")], 1_000_000_000, Algorithm::TokenBucket),
            rule("bench/user", BENCH_DOMAIN, vec![user_key], 1_000_000_000, Algorithm::FixedWindow),
        ],
    }
}

/// An engine on [`bench_plan`].
pub fn bench_engine() -> Arc<Engine> {
    Arc::new(Engine::new(bench_plan(), EngineConfig::default()))
}

fn user_names(users: usize) -> Arc<[String]> {
    (0..users.max(1)).map(|i| format!("user-{i:08}")).collect()
}

/// Runs `decisions_per_thread` HTTP decisions ([`Engine::check_request`]) on each of
/// `threads` threads, users taken round-robin from `users` distinct `x-user-id` values.
pub fn run_http(engine: &Arc<Engine>, threads: usize, decisions_per_thread: u64, users: usize) -> BenchRun {
    let names = user_names(users);
    run(threads, decisions_per_thread, |t, n| {
        let mut allowed = 0;
        for i in 0..n {
            let user = &names[(i as usize).wrapping_mul(7).wrapping_add(t) % names.len()];
            let headers = [("x-user-id", user.as_str())];
            let req = HttpRequest {
                remote: IpAddr::V4(Ipv4Addr::LOCALHOST),
                path: "/",
                method: "GET",
                headers: &headers,
                route: None,
                gateway: None,
            };
            allowed += u64::from(engine.check_request(&req, Instant::now()).allowed);
        }
        allowed
    })
}

/// Runs `decisions_per_thread` RLS decisions ([`Engine::should_rate_limit`], one descriptor
/// each) on each of `threads` threads, over `users` distinct values.
pub fn run_rls(engine: &Arc<Engine>, threads: usize, decisions_per_thread: u64, users: usize) -> BenchRun {
    let names = user_names(users);
    run(threads, decisions_per_thread, |t, n| {
        let mut req = RlsRequest {
            domain: BENCH_DOMAIN.into(),
            descriptors: vec![RequestDescriptor {
                entries: vec![DescriptorEntry { key: "user".into(), value: String::new() }],
                hits_addend: None,
                limit: None,
            }],
            hits_addend: 1,
        };
        let mut allowed = 0;
        for i in 0..n {
            let user = &names[(i as usize).wrapping_mul(7).wrapping_add(t) % names.len()];
            let value = &mut req.descriptors[0].entries[0].value;
            value.clear();
            value.push_str(user);
            if let Ok(resp) = engine.should_rate_limit(&req, Instant::now()) {
                allowed += u64::from(resp.overall == Code::Ok);
            }
        }
        allowed
    })
}

fn run(threads: usize, per_thread: u64, work: impl Fn(usize, u64) -> u64 + Sync) -> BenchRun {
    let threads = threads.max(1);
    let start = Instant::now();
    let allowed = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn({
                    let work = &work;
                    move || work(t, per_thread)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    BenchRun { threads, decisions: per_thread * threads as u64, allowed, elapsed: start.elapsed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoke() {
        let engine = bench_engine();
        let http = run_http(&engine, 2, 50, 10);
        assert_eq!((http.decisions, http.allowed), (100, 100));
        let rls = run_rls(&engine, 2, 50, 10);
        assert_eq!((rls.decisions, rls.allowed), (100, 100));
        // 10 per-user buckets and 10 window counters, nothing else.
        assert_eq!(engine.tracked_keys(), 20);
        assert!(rls.per_second() > 0.0);
    }
}
