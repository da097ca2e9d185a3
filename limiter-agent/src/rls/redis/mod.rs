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
//! Off by default, as the reference's local cache (`--redis-local-cache-keys`). When on: once
//! a key is seen over its limit, later requests for it in the same window are answered
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

mod connection;
mod decision;
pub mod target;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};

use self::connection::{Link, Which, reconnect_task};
use self::target::{RedisTarget, SocketType, TargetError, Timeouts, Topology};

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
    /// Redis, which stays correct). 0 (the default, as the reference's
    /// `LOCAL_CACHE_SIZE_IN_BYTES`) turns the cache off: every hit is counted in Redis.
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
            negative_cache_capacity: 0,
        }
    }
}

/// Errors that stop the backend from being created at all (an unreachable server is not one:
/// the backend starts, answers by its [`FailureMode`] and keeps reconnecting).
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error("invalid Redis URL {url:?}: {source} (expected e.g. redis://127.0.0.1:6379/0)")]
    InvalidUrl { url: String, source: TargetError },
    #[error("Redis {target}: {source}")]
    Target { target: String, source: TargetError },
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
    config: RedisConfig,
    main: Link,
    /// The reference's `REDIS_PERSECOND`: second-unit limits count here when set.
    per_second: Option<Box<Link>>,
    /// Over-limit keys and the unix second their window ends.
    negative: Mutex<HashMap<String, u64>>,
    stats: RedisStats,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("redis", &self.inner.main.connector.describe())
            .field("per_second", &self.inner.per_second.as_ref().map(|l| l.connector.describe()))
            .field("connected", &self.inner.is_connected())
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The reconnect tasks hold only a Weak; waking them lets them see the backend is gone.
        self.main.wake.notify_one();
        if let Some(link) = &self.per_second {
            link.wake.notify_one();
        }
    }
}

impl RedisBackend {
    /// [`RedisBackend::connect_to`] one server at `url` (`redis://`, `rediss://`, `host:port`).
    pub async fn connect(url: &str, config: RedisConfig) -> Result<Self, RedisSetupError> {
        let target = RedisTarget::parse(Topology::Single, SocketType::Tcp, url)
            .map_err(|source| RedisSetupError::InvalidUrl { url: target::redact_url(url), source })?;
        Self::connect_to(&target, None, config).await
    }

    /// Creates the backend and tries to connect once to each Redis; if one is unreachable it
    /// still starts (answering by `config.failure_mode`) and reconnects in the background.
    /// Second-unit limits count in `per_second` when given. Must be called inside a tokio
    /// runtime.
    pub async fn connect_to(
        target: &RedisTarget,
        per_second: Option<&RedisTarget>,
        config: RedisConfig,
    ) -> Result<Self, RedisSetupError> {
        let timeouts = Timeouts { connect: config.connect_timeout, response: config.response_timeout };
        let link = |t: &RedisTarget| {
            t.connector(timeouts)
                .map(Link::new)
                .map_err(|source| RedisSetupError::Target { target: t.to_string(), source })
        };
        let inner = Arc::new(Inner {
            main: link(target)?,
            per_second: per_second.map(link).transpose()?.map(Box::new),
            config,
            negative: Mutex::new(HashMap::new()),
            stats: RedisStats::default(),
        });
        for which in [Which::Main, Which::PerSecond] {
            let Some(link) = inner.link(which) else { continue };
            let name = link.connector.describe();
            match link.connector.connect().await {
                Ok(conn) => {
                    info!("redis: connected to {name}");
                    link.install(conn);
                }
                Err(e) => {
                    inner.stats.errors.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        "redis: cannot connect to {name}: {e}; answering {} until it is reachable, retrying in the background",
                        inner.config.failure_mode
                    );
                }
            }
            tokio::spawn(reconnect_task(Arc::downgrade(&inner), which, Arc::clone(&link.wake)));
            if !link.is_connected() {
                link.wake.notify_one();
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_mode_spellings() {
        assert_eq!("failOpen".parse::<FailureMode>(), Ok(FailureMode::FailOpen));
        assert_eq!("failClosed".parse::<FailureMode>(), Ok(FailureMode::FailClosed));
        assert!("failclosed".parse::<FailureMode>().is_err());
        assert_eq!(FailureMode::FailClosed.to_string(), "failClosed");
        assert_eq!(FailureMode::default(), FailureMode::FailOpen);
    }
}
