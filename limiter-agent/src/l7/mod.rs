//! The L7 engine: decides HTTP requests and Envoy descriptor lists against the compiled
//! [`crate::plan::L7Plan`], with token buckets (gateway kinds) and fixed windows
//! (envoyproxy/ratelimit configs).
//!
//! Two entry points share the rules and the counters:
//! - [`Engine::should_rate_limit`]: the Envoy rate limit service protocol, with
//!   envoyproxy/ratelimit's matching — used by the RLS.
//! - [`Engine::check_request`]: an HTTP request's attributes, judged by every gateway-kind
//!   rule whose descriptor the request produces.
//!
//! # Matching descriptors
//!
//! A domain's rules form the tree envoyproxy/ratelimit builds from nested `descriptors`. Each
//! request entry picks, at its level: the exact `key` + `value`, else the first value pattern
//! for that key in config order (wildcards `foo*`, `/api/*/x`; address ranges of rules
//! compiled from `sourceCIDR`, honouring `invert`), else the key alone. No backtracking; the
//! rule must end exactly at the descriptor's last entry (depth rule). Gateway-kind rules
//! match over RLS the descriptor Envoy's actions send for them, i.e. their own entries
//! (`generic_key` = rule name, then `remote_address`, `header_match`, header values...), so
//! the same counters serve an HTTP check and an RLS call for the same client.
//!
//! Counters are per rule and per value of every entry that splits buckets (wildcard,
//! key-only, distinct address range); exact entries and shared ranges do not split.
//!
//! # Time
//!
//! Decisions take a monotonic `now: Instant`, so tests control time. Token buckets count in
//! nanoseconds since the engine's anchor instant. Fixed windows are aligned to unix time like
//! the reference service (a minute window starts at a whole unix minute): the engine takes a
//! wall-clock reading together with its anchor instant at creation ([`Engine::new`]) and
//! derives unix time as `anchor_unix + (now - anchor_instant)`. A wall-clock step after
//! creation (NTP) therefore does not move windows; the engine's windows drift from the wall
//! clock only as much as the monotonic clock does. [`Engine::with_clock`] sets the anchor
//! explicitly (tests, or to share one anchor with another component). Instants before the
//! anchor count as the anchor.
//!
//! Durations until reset are rounded up to whole seconds: Envoy sends and shows whole
//! seconds, and rounding up never tells a client to come back too early. For a token bucket,
//! "reset" is the time until the bucket is full again (all of `remaining` restored), as
//! Envoy's local rate limit reports its fill interval; one token comes back sooner
//! (`unit / requests`).
//!
//! # Charging
//!
//! - RLS (as envoyproxy/ratelimit): every matched descriptor is charged on its own; one
//!   descriptor over its limit does not stop the others from being charged. Fixed windows
//!   count over-limit hits too (the reference's INCRBY does). A token bucket never takes
//!   tokens for a refused charge.
//! - HTTP ([`Engine::check_request`]): all-or-nothing. Every applicable rule is checked and
//!   charged; if any non-shadow rule refuses, the charges taken from the others are given back
//!   (so a denied request costs nothing, and a client over a per-second limit does not also
//!   drain its per-minute one — the TEG "1/s and 20/min" example). A concurrent request may
//!   be refused during the instant between a charge and its refund; never the reverse (a
//!   refund never admits more than the limit).
//!
//! # Concurrency
//!
//! [`Engine`] is `Send + Sync`; decisions take `&self` from any number of threads. The plan
//! sits behind an `RwLock<Arc<..>>`; each thread keeps the `Arc` it used last and only
//! re-reads it when a generation counter says it was replaced, so a decision sees one plan,
//! whole, without writing to memory other threads read. Keyed counters are sharded, each
//! shard behind a mutex; a rule with a single token bucket (no value splits it, e.g. a
//! gateway-wide limit) keeps its state in one atomic word updated by compare-and-swap, like
//! the kernel. Either way one counter's decide and charge are atomic: no lost updates.
//! Different counters of one request are updated one after another, not as one transaction.
//!
//! # Memory
//!
//! At most [`EngineConfig::max_keys`] counters exist; when full, the least recently used is
//! evicted and, if it comes back, starts like a new key (full bucket / empty window), which
//! can over-admit one bucket depth for that key. A flood of random header values or addresses
//! only ever evicts, it never grows memory beyond the bound.
//!
//! # Measuring
//!
//! [`bench`] has a standard workload (`bench::run_http`, `bench::run_rls` over
//! `bench::bench_engine()`). A minimal loop of your own looks like this (time a longer one):
//!
//! ```
//! use std::net::{IpAddr, Ipv4Addr};
//! use std::time::Instant;
//!
//! use limiter_agent::l7::{Engine, EngineConfig, HttpRequest};
//! use limiter_agent::plan::l7::{Algorithm, Attribute, EntryMatch, EntryValue, L7Plan, L7Rule, Scope};
//! use limiter_agent::plan::{Limit, Unit};
//!
//! let rule = L7Rule {
//!     name: "default/per-user".into(),
//!     domain: "limiter".into(),
//!     entries: vec![
//!         EntryMatch { key: "generic_key".into(), attribute: Attribute::Fixed, value: EntryValue::Exact("default/per-user".into()) },
//!         EntryMatch { key: "x-user-id".into(), attribute: Attribute::Header("x-user-id".into()), value: EntryValue::Distinct },
//!     ],
//!     limit: Some(Limit { requests: 100, unit: Unit::Second, burst: 0 }),
//!     algorithm: Algorithm::TokenBucket,
//!     scope: Scope::Local,
//!     shadow: false,
//!     replaces: vec![],
//!     targets: vec![],
//!     ..L7Rule::default()
//! };
//! let engine = Engine::new(L7Plan { rules: vec![rule] }, EngineConfig::default());
//! let users = ["alice", "bob", "carol", "dave"];
//! let start = Instant::now();
//! let mut allowed = 0u64;
//! let n = 1_000;
//! for i in 0..n {
//!     let headers = [("x-user-id", users[i % users.len()])];
//!     let req = HttpRequest {
//!         remote: IpAddr::V4(Ipv4Addr::LOCALHOST),
//!         path: "/",
//!         method: "GET",
//!         headers: &headers,
//!         route: None,
//!         gateway: None,
//!     };
//!     allowed += u64::from(engine.check_request(&req, Instant::now()).allowed);
//! }
//! let per_second = n as f64 / start.elapsed().as_secs_f64();
//! assert!(allowed > 0 && per_second > 0.0);
//! ```

pub mod bench;
mod counters;
mod headers;
mod http;
mod matching;
mod rls;

#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use counters::CounterStats;
pub use headers::ratelimit_headers;

pub use self::http::{HttpRequest, RuleStatus, Verdict};
pub(crate) use self::rls::overall_code;
pub use self::rls::{
    DescriptorEntry, DescriptorStatus, LimitOverride, Match, RequestDescriptor, RequestError, RlsRequest, RlsResponse,
    descriptor_key_prefix,
};

use self::counters::{Charge, Counters, Meter, Now, Outcome, decide_shared, refund_shared};
use self::matching::{CompiledPlan, CompiledRule, Value, key_rule_id, with_counter_key};
use crate::plan::Unit;
use crate::plan::l7::L7Plan;

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Upper bound on tracked (rule, key) counters across all rules; beyond it the least
    /// recently used idle ones are evicted. Default 100_000. 0 is treated as 1.
    pub max_keys: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { max_keys: 100_000 }
    }
}

/// Thread-safe (Send + Sync), shared as `Arc<Engine>`. Decisions take `&self`.
pub struct Engine {
    /// The plan in force. Decisions read it through a per-thread cache (see
    /// [`Engine::with_plan`]); only a cache miss takes the read lock.
    plan: RwLock<Arc<CompiledPlan>>,
    /// Bumped after every swap of `plan`: tells per-thread caches they are stale.
    generation: AtomicU64,
    /// Tells this engine's cache entries from other engines' (tests run several).
    id: u64,
    /// Serialises plan replacements (compiling happens outside the `plan` lock).
    replacing: Mutex<()>,
    counters: Counters,
    clock: Clock,
    /// Source of rule ids (counter namespaces).
    next_rule_id: AtomicU64,
}

/// Source of [`Engine::id`].
static NEXT_ENGINE_ID: AtomicU64 = AtomicU64::new(1);

/// A thread's copy of the plan of the engine it used last.
struct CachedPlan {
    engine: u64,
    generation: u64,
    plan: Arc<CompiledPlan>,
}

thread_local! {
    static PLAN_CACHE: RefCell<Option<CachedPlan>> = const { RefCell::new(None) };
}

/// The engine's two time bases, taken together once.
#[derive(Clone, Copy, Debug)]
struct Clock {
    anchor: Instant,
    /// Unix time at `anchor`, in nanoseconds.
    unix_ns_at_anchor: u64,
}

impl Clock {
    fn at(&self, now: Instant) -> Now {
        let mono_ns = u64::try_from(now.saturating_duration_since(self.anchor).as_nanos()).unwrap_or(u64::MAX);
        Now { mono_ns, wall_ns: self.unix_ns_at_anchor.saturating_add(mono_ns) }
    }
}

/// Decision code, as the RLS protocol's `Code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Ok,
    OverLimit,
}

/// The limit a status reports (`current_limit` of the RLS protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportedLimit {
    pub name: String,
    pub requests_per_unit: u32,
    pub unit: Unit,
}

impl Engine {
    /// An engine for `plan`, anchored at the current monotonic and wall-clock time.
    pub fn new(plan: L7Plan, config: EngineConfig) -> Engine {
        let anchor = Instant::now();
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Self::with_clock(plan, config, anchor, unix)
    }

    /// An engine whose fixed windows take `anchor` to be `unix_time_at_anchor` after the unix
    /// epoch (see the module docs on time).
    pub fn with_clock(plan: L7Plan, config: EngineConfig, anchor: Instant, unix_time_at_anchor: Duration) -> Engine {
        let next_rule_id = AtomicU64::new(1);
        let compiled = CompiledPlan::new(plan, None, &next_rule_id);
        Engine {
            plan: RwLock::new(Arc::new(compiled)),
            generation: AtomicU64::new(0),
            id: NEXT_ENGINE_ID.fetch_add(1, Ordering::Relaxed),
            replacing: Mutex::new(()),
            counters: Counters::new(config.max_keys),
            clock: Clock {
                anchor,
                unix_ns_at_anchor: u64::try_from(unix_time_at_anchor.as_nanos()).unwrap_or(u64::MAX),
            },
            next_rule_id,
        }
    }

    fn current(&self) -> RwLockReadGuard<'_, Arc<CompiledPlan>> {
        self.plan.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the plan in force, whole.
    ///
    /// Each thread keeps the last plan it used with the generation it had; while the
    /// generation has not moved, a decision only *reads* the shared generation word, so
    /// threads deciding at once do not bounce a lock's or an `Arc` count's cache line between
    /// cores. The cost: a superseded plan stays in memory until every thread that used it
    /// decides once more (or exits). Ordering: the generation is bumped after the swap
    /// (Release) and read before the plan (Acquire), so a cached plan is never older than
    /// the generation it is filed under.
    fn with_plan<R>(&self, f: impl FnOnce(&CompiledPlan) -> R) -> R {
        let generation = self.generation.load(Ordering::Acquire);
        PLAN_CACHE.with(|cell| {
            // Decisions never nest; should one ever, it takes the lock instead of panicking.
            let Ok(mut cache) = cell.try_borrow_mut() else { return f(&self.current()) };
            let fresh = cache.as_ref().is_some_and(|c| c.engine == self.id && c.generation == generation);
            if !fresh {
                *cache = Some(CachedPlan { engine: self.id, generation, plan: self.current().clone() });
            }
            match cache.as_ref() {
                Some(cached) => f(&cached.plan),
                None => f(&self.current()),
            }
        })
    }

    /// Decides `hits` on the counter of `rule` for a descriptor with `values`.
    fn charge<'v>(
        &self,
        rule: &CompiledRule,
        meter: &Meter,
        values: impl Iterator<Item = Value<'v>>,
        now: Now,
        hits: u64,
        charge: Charge,
    ) -> Outcome {
        match &rule.shared {
            Some(tat) => decide_shared(tat, meter, now, hits, charge),
            None => with_counter_key(rule, values, |key| {
                self.counters.update(key, |state| meter.decide(state, now, hits, charge))
            }),
        }
    }

    /// Gives back a charge made by [`Engine::charge`].
    fn refund<'v>(
        &self,
        rule: &CompiledRule,
        meter: &Meter,
        values: impl Iterator<Item = Value<'v>>,
        now: Now,
        hits: u64,
    ) {
        match &rule.shared {
            Some(tat) => refund_shared(tat, meter, now, hits),
            None => with_counter_key(rule, values, |key| {
                self.counters.update_existing(key, |state| meter.refund(state, now, hits))
            }),
        }
    }

    /// Atomically swaps the rule set: a decision sees the old plan or the new one, never a
    /// mix. Counters of rules whose name AND parameters (entries, limit, algorithm, scope)
    /// are unchanged keep their state; others start fresh, and the counters of rules that
    /// left (or changed) are freed.
    pub fn replace_plan(&self, plan: L7Plan) {
        let _one_at_a_time = self.replacing.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = self.current().clone();
        let compiled = Arc::new(CompiledPlan::new(plan, Some(&previous), &self.next_rule_id));
        let mut live: std::collections::HashSet<u64> = compiled.rules.iter().map(|r| r.id).collect();
        live.insert(matching::OVERRIDE_RULE_ID);
        *self.plan.write().unwrap_or_else(PoisonError::into_inner) = compiled;
        self.generation.fetch_add(1, Ordering::Release);
        // A decision still running on the old plan may re-create a counter of a dropped rule
        // after this sweep; it is unreachable and ages out through LRU eviction.
        self.counters.remove_where(|key| !live.contains(&key_rule_id(key)));
    }

    /// The plan in force.
    pub fn plan(&self) -> Arc<L7Plan> {
        self.current().plan.clone()
    }

    /// Number of tracked keyed counters (for metrics and the bounded-memory test): the ones
    /// bounded by `max_keys`. Single-bucket rules hold one word each in the plan and are not
    /// counted here.
    pub fn tracked_keys(&self) -> usize {
        self.counters.stats().tracked
    }

    /// Counter occupancy and evictions (for metrics).
    pub fn counter_stats(&self) -> CounterStats {
        self.counters.stats()
    }
}

fn saturate_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn whole_seconds_up(ns: u64) -> Duration {
    Duration::from_secs(ns.div_ceil(1_000_000_000))
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}
