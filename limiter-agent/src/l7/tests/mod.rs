//! Engine tests with controlled time: every `Instant` is the test's base plus a `Duration`,
//! and the wall clock is anchored at a known unix time, so windows and buckets are exact.

mod http;
mod rls;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::plan::Limit;
use crate::plan::l7::{Algorithm, Attribute, DEFAULT_DOMAIN, EntryMatch, EntryValue, L7Rule, L7Target, Scope, keys};

/// Unix time at the base instant: a whole minute (1_700_000_040 = 28_333_334 × 60).
const UNIX_AT_BASE: u64 = 1_700_000_040;

/// A test clock: `at(secs)` and `at_ns(ns)` after a fixed base.
struct Clock {
    base: Instant,
}

impl Clock {
    fn at(&self, secs: u64) -> Instant {
        self.base + Duration::from_secs(secs)
    }
    fn at_ns(&self, ns: u64) -> Instant {
        self.base + Duration::from_nanos(ns)
    }
}

fn engine_with(rules: Vec<L7Rule>, max_keys: usize, unix_at_base: Duration) -> (Engine, Clock) {
    let base = Instant::now();
    let engine = Engine::with_clock(L7Plan { rules }, EngineConfig { max_keys }, base, unix_at_base);
    (engine, Clock { base })
}

fn engine(rules: Vec<L7Rule>) -> (Engine, Clock) {
    engine_with(rules, 100_000, Duration::from_secs(UNIX_AT_BASE))
}

fn limit(requests: u64, unit: Unit, burst: u64) -> Option<Limit> {
    Some(Limit { requests, unit, burst })
}

/// A gateway-kind rule (token bucket, default domain).
fn gateway_rule(name: &str, entries: Vec<EntryMatch>, limit: Option<Limit>) -> L7Rule {
    L7Rule {
        name: name.into(),
        domain: DEFAULT_DOMAIN.into(),
        entries,
        limit,
        algorithm: Algorithm::TokenBucket,
        scope: Scope::Local,
        shadow: false,
        replaces: Vec::new(),
        targets: Vec::new(),
        ..L7Rule::default()
    }
}

/// The `generic_key` entry that selects a gateway rule.
fn generic(name: &str) -> EntryMatch {
    EntryMatch { key: keys::GENERIC_KEY.into(), attribute: Attribute::Fixed, value: EntryValue::Exact(name.into()) }
}

/// A bucket per distinct value of a request header.
fn per_header(name: &str) -> EntryMatch {
    EntryMatch { key: name.into(), attribute: Attribute::Header(name.into()), value: EntryValue::Distinct }
}

/// An envoyproxy/ratelimit rule (fixed window) for `domain` with entries `(key, value)`:
/// value `""` is key-only, a value with `*` a wildcard, anything else exact.
fn rls_rule(name: &str, domain: &str, entries: &[(&str, &str)], limit: Option<Limit>) -> L7Rule {
    let entries = entries
        .iter()
        .map(|&(key, value)| EntryMatch {
            key: key.into(),
            attribute: Attribute::Descriptor,
            value: if value.is_empty() {
                EntryValue::Distinct
            } else if value.contains('*') {
                EntryValue::Wildcard(value.into())
            } else {
                EntryValue::Exact(value.into())
            },
        })
        .collect();
    L7Rule {
        name: name.into(),
        domain: domain.into(),
        entries,
        limit,
        algorithm: Algorithm::FixedWindow,
        scope: Scope::Local,
        shadow: false,
        replaces: Vec::new(),
        targets: Vec::new(),
        ..L7Rule::default()
    }
}

fn descriptor(entries: &[(&str, &str)]) -> RequestDescriptor {
    RequestDescriptor {
        entries: entries.iter().map(|&(k, v)| DescriptorEntry { key: k.into(), value: v.into() }).collect(),
        hits_addend: None,
        limit: None,
    }
}

fn rls(domain: &str, descriptors: Vec<RequestDescriptor>) -> RlsRequest {
    RlsRequest { domain: domain.into(), descriptors, hits_addend: 0 }
}

/// An HTTP request from 192.0.2.1 to `GET /` with `headers`.
fn http<'a>(headers: &'a [(&'a str, &'a str)]) -> HttpRequest<'a> {
    HttpRequest { remote: IpAddr::from([192, 0, 2, 1]), path: "/", method: "GET", headers, route: None, gateway: None }
}

/// Sends `n` requests at `now`; returns how many were allowed.
fn allowed(engine: &Engine, req: &HttpRequest<'_>, now: Instant, n: usize) -> usize {
    (0..n).filter(|_| engine.check_request(req, now).allowed).count()
}

#[test]
fn engine_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Engine>();
    check::<Arc<Engine>>();
}
