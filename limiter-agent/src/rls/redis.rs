//! The Redis backend of the rate limit service: exact fixed windows shared by every node, with
//! the key layout of Envoy's reference service (envoyproxy/ratelimit), so both can count in one
//! Redis while a user migrates from one to the other.
//!
//! # What is written to Redis
//! For each request descriptor that hits a rule, one counter per window:
//!
//! ```text
//! {prefix}{domain}_{key1}_{value1}_{key2}_{value2}_..._{window_start}
//! ```
//!
//! `window_start` is the unix time in seconds rounded down to the rule's unit (1 for Second, 60
//! for Minute, 3600 for Hour, 86400 for Day), `prefix` is the reference service's
//! `CACHE_KEY_PREFIX` (empty by default). A request sends one pipeline, one round trip:
//! `INCRBY key hits` then `EXPIRE key unit_seconds` for each counted descriptor, as the reference
//! does (so a key lives at most one unit past its last hit; TTL is reset by every hit).
//!
//! A descriptor is over the limit when the counter *after* the increment exceeds the rule's
//! `requests` per unit; `limit_remaining` is `requests - counter` otherwise;
//! `duration_until_reset` is the whole seconds left in the window (`unit - now % unit`), the
//! same arithmetic as the reference, so Envoy's `x-ratelimit-*` headers agree across services.
//!
//! Only rules shared by every node go to Redis: envoyproxy/ratelimit configs and the gateway
//! kinds' `rateLimit.global` rules (scope global). A gateway kind's `rateLimit.local` rule
//! means "this node alone" and is decided by the in-process engine with its own algorithm
//! (token bucket and burst) even with this backend, as Envoy Gateway keeps local limits in each
//! proxy while only global ones reach the rate limit service's Redis.
//!
//! Every Redis rule is counted as a fixed window, also those written as token buckets: Redis
//! counts `requests` per unit window; `burst` does not apply (as with Envoy Gateway's global
//! limits, which run on the reference service). A unit that is not a whole number of seconds
//! (kgateway's `fillInterval: 250ms`) is rounded up to a whole second, the resolution of the
//! reference's keys.
//!
//! # Over-limit negative cache
//! Once a key is seen over its limit, later requests for it in the same window are answered
//! OVER_LIMIT from memory without touching Redis (the reference's `LOCAL_CACHE_SIZE_IN_BYTES`
//! cache). The entry expires when the window ends. Counts of those skipped requests are not
//! added to Redis, again like the reference: the window is already exhausted, and the next
//! window starts from zero either way.
//!
//! # When Redis is unreachable
//! The reference service answers a gRPC error when Redis fails, and Envoy then decides with its
//! `failure_mode_deny` (default `false`: the request passes; `true`: Envoy answers its
//! `status_on_error`, 500 by default). This backend makes the choice explicit instead, so the
//! behaviour does not depend on each gateway's setting:
//!
//! - [`FailureMode::FailOpen`] (default): descriptors that needed Redis are answered OK with no
//!   limit (Envoy sends no `x-ratelimit-*` headers for them). Availability over accuracy.
//! - [`FailureMode::FailClosed`]: they are answered OVER_LIMIT (Envoy answers 429), remaining 0,
//!   reset at the end of the current window. Shadow-mode rules still answer OK.
//!
//! Descriptors the negative cache already knows are over the limit stay OVER_LIMIT either way;
//! descriptors with no rule, `unlimited` or replaced rules never need Redis and are unaffected.
//! Each failed round trip counts one [`RedisStats::errors`] and drops the connection; a
//! background task reconnects with exponential backoff ([`RedisConfig::reconnect_backoff_min`]
//! doubling up to [`RedisConfig::reconnect_backoff_max`]) while requests keep getting the
//! failure-mode answer immediately instead of waiting on a dead server.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{info, warn};
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;

use crate::l7::RequestDescriptor;
use crate::l7::{Code, DescriptorStatus, Engine, Match, ReportedLimit, RequestError, RlsRequest, RlsResponse};
use crate::plan::Unit;
use crate::plan::l7::Scope;

/// What the backend answers for a descriptor it cannot count because Redis is unreachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FailureMode {
    /// Allow: OK with no limit (like Envoy's default `failure_mode_deny: false`).
    #[default]
    FailOpen,
    /// Deny: OVER_LIMIT, so Envoy answers 429.
    FailClosed,
}

impl fmt::Display for FailureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureMode::FailOpen => "failOpen",
            FailureMode::FailClosed => "failClosed",
        })
    }
}

impl FromStr for FailureMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "failOpen" | "fail-open" | "open" => Ok(FailureMode::FailOpen),
            "failClosed" | "fail-closed" | "closed" => Ok(FailureMode::FailClosed),
            other => Err(format!("unknown failure mode {other:?}: expected failOpen or failClosed")),
        }
    }
}

/// Settings of the Redis backend; [`Default`] gives the documented defaults.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    pub failure_mode: FailureMode,
    /// Prepended to every key (the reference service's `CACHE_KEY_PREFIX`, empty by default).
    pub key_prefix: String,
    /// Give up on a connection attempt after this long.
    pub connect_timeout: Duration,
    /// Give up on a round trip after this long; the request then gets the failure-mode answer.
    /// Envoy's own RLS timeout defaults to 20 ms, so waiting much longer only delays the
    /// answer Envoy has already stopped waiting for.
    pub response_timeout: Duration,
    /// First wait between reconnect attempts; doubles after each failure.
    pub reconnect_backoff_min: Duration,
    /// Longest wait between reconnect attempts.
    pub reconnect_backoff_max: Duration,
    /// Most keys the over-limit negative cache holds; when full, expired entries are purged
    /// and, if it is still full, new over-limit keys are simply not cached (they keep going to
    /// Redis, which stays correct).
    pub negative_cache_capacity: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            failure_mode: FailureMode::FailOpen,
            key_prefix: String::new(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_millis(200),
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(2),
            negative_cache_capacity: 100_000,
        }
    }
}

/// Errors that stop the backend from being created at all (an unreachable server is not one:
/// the backend starts, answers by its [`FailureMode`] and keeps reconnecting).
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error("invalid Redis URL {url:?}: {source} (expected e.g. redis://127.0.0.1:6379/0)")]
    InvalidUrl { url: String, source: redis::RedisError },
}

/// Counters of the backend, readable at any time (metrics export them).
#[derive(Debug, Default)]
pub struct RedisStats {
    /// Failed round trips and failed connection attempts.
    pub errors: AtomicU64,
    /// Pipelines sent to Redis (one per request that needed Redis).
    pub round_trips: AtomicU64,
    /// Descriptors answered OVER_LIMIT from the negative cache without asking Redis.
    pub negative_cache_hits: AtomicU64,
    /// Descriptors answered by the failure mode because Redis could not be asked.
    pub failure_mode_answers: AtomicU64,
    /// Successful connections after the first one.
    pub reconnects: AtomicU64,
}

/// A plain copy of [`RedisStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedisStatsSnapshot {
    pub errors: u64,
    pub round_trips: u64,
    pub negative_cache_hits: u64,
    pub failure_mode_answers: u64,
    pub reconnects: u64,
}

/// The Redis backend. Cheap to clone; every clone shares one connection, one negative cache and
/// one set of counters. The reconnect task ends when the last clone is dropped.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    url: String,
    config: RedisConfig,
    conn_config: AsyncConnectionConfig,
    /// The live connection, if any, with a generation number so that a request failing on an
    /// old connection does not throw away a newer one the reconnect task just made.
    conn: RwLock<Option<(u64, MultiplexedConnection)>>,
    /// Wakes the reconnect task (connection lost, or backend dropped).
    wake: Arc<Notify>,
    /// Set while the reconnect task owes a connection, so a burst of failing requests wakes it once.
    reconnecting: AtomicBool,
    /// Over-limit keys and the unix second their window ends.
    negative: Mutex<HashMap<String, u64>>,
    stats: RedisStats,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("url", &self.inner.url)
            .field("connected", &self.inner.is_connected())
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The reconnect task holds only a Weak; waking it lets it see the backend is gone.
        self.wake.notify_one();
    }
}

/// One descriptor's plan for this request.
enum Step {
    /// Nothing to count: answer this status as is.
    Done(DescriptorStatus),
    /// Count in Redis (one INCRBY + EXPIRE in the request's pipeline).
    Count { key: String, hits: u32, limit: ReportedLimit, shadow: bool, window_end: u64, reset: Duration },
}

impl RedisBackend {
    /// Creates the backend and tries to connect once; if Redis is unreachable it still starts
    /// (answering by `config.failure_mode`) and reconnects in the background. Must be called
    /// inside a tokio runtime.
    pub async fn connect(url: &str, config: RedisConfig) -> Result<Self, RedisSetupError> {
        let client =
            redis::Client::open(url).map_err(|source| RedisSetupError::InvalidUrl { url: url.to_owned(), source })?;
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout));
        let inner = Arc::new(Inner {
            client,
            url: url.to_owned(),
            config,
            conn_config,
            conn: RwLock::new(None),
            wake: Arc::new(Notify::new()),
            reconnecting: AtomicBool::new(true),
            negative: Mutex::new(HashMap::new()),
            stats: RedisStats::default(),
        });
        match inner.client.get_multiplexed_async_connection_with_config(&inner.conn_config).await {
            Ok(conn) => {
                info!("redis: connected to {url}");
                inner.install(conn);
            }
            Err(e) => {
                inner.stats.errors.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "redis: cannot connect to {url}: {e}; answering {} until it is reachable, retrying in the background",
                    inner.config.failure_mode
                );
            }
        }
        tokio::spawn(reconnect_task(Arc::downgrade(&inner), Arc::clone(&inner.wake)));
        if !inner.is_connected() {
            inner.wake.notify_one();
        }
        Ok(Self { inner })
    }

    /// Whether a connection is currently up (false from a failed round trip until the
    /// reconnect task succeeds).
    pub fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }

    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    pub fn stats(&self) -> RedisStatsSnapshot {
        let s = &self.inner.stats;
        RedisStatsSnapshot {
            errors: s.errors.load(Ordering::Relaxed),
            round_trips: s.round_trips.load(Ordering::Relaxed),
            negative_cache_hits: s.negative_cache_hits.load(Ordering::Relaxed),
            failure_mode_answers: s.failure_mode_answers.load(Ordering::Relaxed),
            reconnects: s.reconnects.load(Ordering::Relaxed),
        }
    }

    /// Keys currently in the over-limit negative cache (expired ones included until purged).
    pub fn negative_cache_len(&self) -> usize {
        self.inner.negative.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Decides one `ShouldRateLimit` request: matching through [`Engine::lookup`] (the same
    /// rules, `replaces`, `unlimited`, shadow mode and `hits_addend` as the local engine),
    /// counting in Redis. `now` is wall-clock time: windows are aligned to the unix epoch so
    /// that every node and the reference service agree on them.
    pub async fn should_rate_limit(
        &self,
        engine: &Engine,
        req: &RlsRequest,
        now: SystemTime,
    ) -> Result<RlsResponse, RequestError> {
        validate(req)?;
        let unix_now = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let steps = self.plan(engine, req, unix_now);

        let counted = steps.iter().filter(|s| matches!(s, Step::Count { .. })).count();
        let replies = if counted == 0 { Ok(Vec::new()) } else { self.inner.round_trip(&steps).await };

        let mut statuses = Vec::with_capacity(steps.len());
        let mut replies = match replies {
            Ok(values) => Some(values.into_iter()),
            Err(()) => None,
        };
        for step in steps {
            statuses.push(match step {
                Step::Done(status) => status,
                Step::Count { key, hits: _, limit, shadow, window_end, reset } => {
                    match replies.as_mut().and_then(Iterator::next) {
                        Some(after) => self.inner.judge(key, after, limit, shadow, (unix_now, window_end), reset),
                        None => self.inner.failure_status(limit, shadow, reset),
                    }
                }
            });
        }
        let overall = if statuses.iter().any(|s| s.code == Code::OverLimit) { Code::OverLimit } else { Code::Ok };
        Ok(RlsResponse { overall, statuses })
    }

    /// Matches every descriptor and decides which ones need Redis.
    fn plan(&self, engine: &Engine, req: &RlsRequest, unix_now: u64) -> Vec<Step> {
        let matches: Vec<Option<Match>> =
            req.descriptors.iter().map(|d| engine.lookup(&req.domain, &d.entries)).collect();
        // `replaces` as envoyproxy/ratelimit applies it: a rule named in the `replaces` of any
        // rule matched by this request is dropped from this request.
        let replaced: Vec<&str> =
            matches.iter().flatten().flat_map(|m| m.rule.replaces.iter().map(String::as_str)).collect();
        let request_hits = req.hits_addend.max(1);

        let mut steps = Vec::with_capacity(matches.len());
        for (descriptor, found) in req.descriptors.iter().zip(&matches) {
            let Some(found) = found else {
                steps.push(Step::Done(no_limit_status(None, 0)));
                continue;
            };
            let rule = &found.rule;
            if replaced.contains(&rule.name.as_str()) {
                steps.push(Step::Done(no_limit_status(None, 0)));
                continue;
            }
            if rule.scope == Scope::Local {
                steps.push(Step::Done(decide_locally(engine, req, descriptor)));
                continue;
            }
            let Some(limit) = rule.limit else {
                // `unlimited`: OK, no limit, remaining reported as the reference does.
                steps.push(Step::Done(no_limit_status(Some(rule.name.clone()), u32::MAX)));
                continue;
            };
            let window = window_seconds(limit.unit);
            let window_start = unix_now / window * window;
            let window_end = window_start + window;
            let reset = Duration::from_secs(window_end - unix_now);
            let reported = ReportedLimit {
                name: rule.name.clone(),
                requests_per_unit: u32::try_from(limit.requests).unwrap_or(u32::MAX),
                unit: limit.unit,
            };
            let key = format!("{}{}{window_start}", self.inner.config.key_prefix, found.cache_key_prefix);
            if self.inner.negative_hit(&key, unix_now) {
                self.inner.stats.negative_cache_hits.fetch_add(1, Ordering::Relaxed);
                steps.push(Step::Done(over_limit_status(reported, rule.shadow, reset)));
                continue;
            }
            let hits = descriptor.hits_addend.unwrap_or(request_hits);
            steps.push(Step::Count { key, hits, limit: reported, shadow: rule.shadow, window_end, reset });
        }
        steps
    }
}

/// A node-local rule's answer from the in-process engine: the descriptor alone, as a request of
/// its own (`replaces` across the request was applied by the caller already).
fn decide_locally(engine: &Engine, req: &RlsRequest, descriptor: &RequestDescriptor) -> DescriptorStatus {
    let single =
        RlsRequest { domain: req.domain.clone(), descriptors: vec![descriptor.clone()], hits_addend: req.hits_addend };
    match engine.should_rate_limit(&single, std::time::Instant::now()) {
        Ok(mut resp) if !resp.statuses.is_empty() => resp.statuses.swap_remove(0),
        // The whole request was validated before planning; a descriptor of it cannot fail.
        _ => no_limit_status(None, 0),
    }
}

impl Inner {
    fn is_connected(&self) -> bool {
        self.conn.read().map(|c| c.is_some()).unwrap_or(false)
    }

    fn install(&self, conn: MultiplexedConnection) {
        if let Ok(mut slot) = self.conn.write() {
            let generation = slot.as_ref().map_or(0, |(g, _)| g + 1);
            *slot = Some((generation, conn));
        }
        self.reconnecting.store(false, Ordering::Release);
    }

    /// Drops the connection of `generation` (if it is still the current one) and wakes the
    /// reconnect task once.
    fn lost(&self, generation: u64) {
        if let Ok(mut slot) = self.conn.write()
            && slot.as_ref().is_some_and(|(g, _)| *g == generation)
        {
            *slot = None;
        }
        if !self.reconnecting.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// One pipeline for every `Step::Count`: INCRBY then EXPIRE per key. Returns the INCRBY
    /// replies in order, or `Err` after counting the error and dropping the connection.
    async fn round_trip(&self, steps: &[Step]) -> Result<Vec<i64>, ()> {
        let current = self.conn.read().ok().and_then(|c| c.clone());
        let Some((generation, mut conn)) = current else {
            return Err(());
        };
        let mut pipe = redis::pipe();
        for step in steps {
            if let Step::Count { key, hits, limit, .. } = step {
                pipe.cmd("INCRBY").arg(key).arg(*hits);
                pipe.cmd("EXPIRE").arg(key).arg(window_seconds(limit.unit)).ignore();
            }
        }
        self.stats.round_trips.fetch_add(1, Ordering::Relaxed);
        // The connection has its own response timeout; this outer one also bounds a write
        // stuck on a full socket buffer.
        let result = tokio::time::timeout(self.config.response_timeout, pipe.query_async::<Vec<i64>>(&mut conn)).await;
        match result {
            Ok(Ok(values)) => Ok(values),
            Ok(Err(e)) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                warn!("redis: round trip to {} failed: {e}; answering {}", self.url, self.config.failure_mode);
                self.lost(generation);
                Err(())
            }
            Err(_elapsed) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "redis: no answer from {} within {:?}; answering {}",
                    self.url, self.config.response_timeout, self.config.failure_mode
                );
                self.lost(generation);
                Err(())
            }
        }
    }

    /// Status of a counted descriptor from its counter after the increment.
    fn judge(
        &self,
        key: String,
        after: i64,
        limit: ReportedLimit,
        shadow: bool,
        (unix_now, window_end): (u64, u64),
        reset: Duration,
    ) -> DescriptorStatus {
        let allowed = i64::from(limit.requests_per_unit);
        if after > allowed {
            self.remember_over_limit(key, unix_now, window_end);
            return over_limit_status(limit, shadow, reset);
        }
        let remaining = u32::try_from(allowed - after.max(0)).unwrap_or(0);
        DescriptorStatus {
            code: Code::Ok,
            rule: Some(limit.name.clone()),
            limit: Some(limit),
            limit_remaining: remaining,
            duration_until_reset: reset,
            shadow_over_limit: false,
        }
    }

    fn failure_status(&self, limit: ReportedLimit, shadow: bool, reset: Duration) -> DescriptorStatus {
        self.stats.failure_mode_answers.fetch_add(1, Ordering::Relaxed);
        match self.config.failure_mode {
            FailureMode::FailOpen => no_limit_status(Some(limit.name), 0),
            FailureMode::FailClosed => over_limit_status(limit, shadow, reset),
        }
    }

    fn negative_hit(&self, key: &str, unix_now: u64) -> bool {
        let Ok(mut cache) = self.negative.lock() else { return false };
        match cache.get(key) {
            Some(&window_end) if window_end > unix_now => true,
            Some(_) => {
                cache.remove(key);
                false
            }
            None => false,
        }
    }

    fn remember_over_limit(&self, key: String, unix_now: u64, window_end: u64) {
        let Ok(mut cache) = self.negative.lock() else { return };
        if cache.len() >= self.config.negative_cache_capacity && !cache.contains_key(&key) {
            // Purge only when full: the purge walks the whole map, once per fill-up.
            cache.retain(|_, end| *end > unix_now);
            if cache.len() >= self.config.negative_cache_capacity {
                return;
            }
        }
        cache.insert(key, window_end);
    }
}

/// Reconnects with exponential backoff whenever woken with no live connection. Holds only a
/// `Weak` so dropping the last [`RedisBackend`] ends it.
async fn reconnect_task(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let mut backoff = match inner.upgrade() {
            Some(inner) => inner.config.reconnect_backoff_min,
            None => return,
        };
        loop {
            let Some(strong) = inner.upgrade() else { return };
            if strong.is_connected() {
                strong.reconnecting.store(false, Ordering::Release);
                break;
            }
            match strong.client.get_multiplexed_async_connection_with_config(&strong.conn_config).await {
                Ok(conn) => {
                    strong.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    info!("redis: reconnected to {}", strong.url);
                    strong.install(conn);
                    break;
                }
                Err(e) => {
                    strong.stats.errors.fetch_add(1, Ordering::Relaxed);
                    log::debug!("redis: reconnect to {} failed: {e}; next try in {backoff:?}", strong.url);
                    let max = strong.config.reconnect_backoff_max;
                    drop(strong);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max);
                }
            }
        }
    }
}

/// Whole seconds of one window: the reference's unit divider, and at least one second for
/// custom intervals (the resolution of its keys).
fn window_seconds(unit: Unit) -> u64 {
    match unit {
        Unit::Second => 1,
        Unit::Minute => 60,
        Unit::Hour => 3_600,
        Unit::Day => 86_400,
        Unit::Interval { ns } => ns.div_ceil(1_000_000_000).max(1),
    }
}

/// The checks the local engine makes before matching, so both backends reject the same
/// requests with the same errors.
fn validate(req: &RlsRequest) -> Result<(), RequestError> {
    if req.domain.is_empty() {
        return Err(RequestError::EmptyDomain);
    }
    if req.descriptors.is_empty() {
        return Err(RequestError::NoDescriptors);
    }
    if let Some(index) = req.descriptors.iter().position(|d| d.entries.is_empty()) {
        return Err(RequestError::EmptyDescriptor { index });
    }
    Ok(())
}

fn no_limit_status(rule: Option<String>, remaining: u32) -> DescriptorStatus {
    DescriptorStatus {
        code: Code::Ok,
        limit: None,
        limit_remaining: remaining,
        duration_until_reset: Duration::ZERO,
        rule,
        shadow_over_limit: false,
    }
}

fn over_limit_status(limit: ReportedLimit, shadow: bool, reset: Duration) -> DescriptorStatus {
    DescriptorStatus {
        code: if shadow { Code::Ok } else { Code::OverLimit },
        rule: Some(limit.name.clone()),
        limit: Some(limit),
        limit_remaining: 0,
        duration_until_reset: reset,
        shadow_over_limit: shadow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_lengths_match_the_reference_dividers() {
        assert_eq!(window_seconds(Unit::Second), 1);
        assert_eq!(window_seconds(Unit::Minute), 60);
        assert_eq!(window_seconds(Unit::Hour), 3600);
        assert_eq!(window_seconds(Unit::Day), 86400);
        assert_eq!(window_seconds(Unit::Interval { ns: 250_000_000 }), 1);
        assert_eq!(window_seconds(Unit::Interval { ns: 10_000_000_000 }), 10);
        assert_eq!(window_seconds(Unit::Interval { ns: 10_500_000_000 }), 11);
    }

    #[test]
    fn failure_mode_spellings() {
        assert_eq!("failOpen".parse::<FailureMode>(), Ok(FailureMode::FailOpen));
        assert_eq!("failClosed".parse::<FailureMode>(), Ok(FailureMode::FailClosed));
        assert!("failclosed".parse::<FailureMode>().is_err());
        assert_eq!(FailureMode::FailClosed.to_string(), "failClosed");
        assert_eq!(FailureMode::default(), FailureMode::FailOpen);
    }
}
