//! Global per-source kernel rules across nodes: per-source counts summed in Redis per fixed
//! window, and the sources every node holds once a window's total is over the limit.
//!
//! A `rateLimit.global` rule keyed by source (`sourceCIDR` of `type: Distinct`) takes no
//! demand share: each node enforces the rule's full per-source limit in its own buckets, and
//! the program counts what each source was admitted (`GLOBAL_SOURCE_COUNTS`). Each sync
//! period this node adds the growth of those counts since its last read to a Redis hash per
//! rule, and reads back the sources whose total in the current window is over the limit.
//! Every node, also one that saw none of a source's traffic, then puts the source in its
//! block list until the window ends ([`crate::dataplane::Dataplane::hold`]).
//!
//! - Windows are fixed windows of the rule's unit on Redis's clock (`TIME` inside the script),
//!   as envoyproxy/ratelimit counts them: window `floor(now / unit)`. Node clocks need not
//!   agree; a hold lasts the time Redis says is left of the window.
//! - One hash per rule, `<prefix>limiter:window:{<rule>}`, a field per source (with the port
//!   when the rule keys by port) and `#window`, the window it counts; the over-limit sources
//!   of that window in `<prefix>limiter:window:{<rule>}:over`. The window comes from Redis's
//!   clock inside the script, so a key per window could not be named in `KEYS` beforehand,
//!   which Redis Cluster requires; both keys carry the rule as hash tag, so they share a slot.
//!   The script starts the hash afresh when the window moves on, and both keys expire a
//!   second after their window ends.
//! - The window limit is the rule's `requests + burst` (what one node's full bucket admits at
//!   once); a source whose total is above it is over.
//! - A count that arrives in Redis after its window ended counts in the window it arrives in.
//! - Redis unreachable: every node keeps enforcing the per-source limit locally; the counts
//!   of the outage are not sent later (they would land in a later window). Logged once, and
//!   once on recovery.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    time::Duration,
};

use limiter_common::SourceBucketKey;
use log::{info, warn};

use super::Membership;
use crate::{
    dataplane::SourceCount,
    plan::{CountKind, KernelPlan, Protocol},
};

/// The per-rule hashes (after the `--redis-key-prefix`; the rule name in braces follows).
pub const WINDOW_KEY: &str = "limiter:window:";

/// How long the keys outlive their window, in ms.
const KEY_GRACE_MS: u64 = 1000;

/// KEYS[1]: the rule's counts; KEYS[2]: its over-limit sources. ARGV[1]: the window length in
/// ms; ARGV[2]: the window limit; ARGV[3]: grace in ms; then field, delta pairs. Returns the
/// window number, the ms left of it, and `[field, total, ...]` of the sources over the limit.
const WINDOW_SCRIPT: &str = "\
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local unit = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local window = math.floor(now / unit)
local ends = (window + 1) * unit
local w = string.format('%d', window)
if redis.call('HGET', KEYS[1], '#window') ~= w then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[1], '#window', w)
end
for i = 4, #ARGV, 2 do
  local total = redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  if total > limit then
    redis.call('HSET', KEYS[2], ARGV[i], total)
  end
end
local ttl = ends - now + tonumber(ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl)
local over = redis.call('HGETALL', KEYS[2])
if #over > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return {window, ends - now, over}";

/// A global per-source rule as the window sums see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowRule {
    /// `policy/rule`: the same name on every node.
    pub name: String,
    /// The window length (the rule's unit), ms, at least 1.
    pub unit_ms: u64,
    /// Tokens a source may be admitted across nodes in one window: `requests + burst`.
    pub limit: u64,
    /// Packets, bytes or connections, for logs.
    pub count: CountKind,
}

/// The global per-source rules of `plan` (shadow rules count nothing, so hold nothing).
pub fn window_rules(plan: &KernelPlan) -> Vec<WindowRule> {
    plan.rules
        .iter()
        .filter(|r| r.global_per_source() && !r.shadow)
        .map(|r| WindowRule {
            name: r.name.clone(),
            unit_ms: (r.limit.unit.as_ns() / 1_000_000).max(1),
            limit: r.limit.requests.saturating_add(r.limit.burst),
            count: r.count,
        })
        .collect()
}

/// The hash field of a source: its address, and the port when the rule keys by port.
pub fn field(c: &SourceCount) -> String {
    match (c.port, c.protocol) {
        (0, 0) => c.source.to_string(),
        (port, protocol) => {
            let proto = match protocol {
                limiter_common::PROTO_TCP => Protocol::Tcp.to_string(),
                limiter_common::PROTO_UDP => Protocol::Udp.to_string(),
                other => other.to_string(),
            };
            format!("{} {port}/{proto}", c.source)
        }
    }
}

/// The source a hash field names (see [`field`]).
pub fn field_source(field: &str) -> Option<IpAddr> {
    field.split(' ').next()?.parse().ok()
}

/// The growth of the kernel's cumulative counts between readings.
#[derive(Debug, Default)]
pub struct Deltas {
    /// The counts of the last reading; `None` before the first.
    last: Option<HashMap<SourceBucketKey, u64>>,
}

impl Deltas {
    /// What each source was admitted since the last reading, by rule name then field; only
    /// growth, no zeros. The first reading only sets the base: the counts may be older than
    /// this agent (a pinned program it adopted), and were reported by the agent before it, if
    /// any. An entry that is new or smaller than before (evicted and made again) counts
    /// from 0.
    pub fn observe(&mut self, counts: &[SourceCount]) -> BTreeMap<String, BTreeMap<String, u64>> {
        let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let now: HashMap<SourceBucketKey, u64> = counts.iter().map(|c| (c.key, c.count)).collect();
        if let Some(last) = &self.last {
            for c in counts {
                let before = last.get(&c.key).copied().filter(|b| *b <= c.count).unwrap_or(0);
                let delta = c.count - before;
                if delta > 0 {
                    *out.entry(c.rule.clone()).or_default().entry(field(c)).or_default() += delta;
                }
            }
        }
        self.last = Some(now);
        out
    }
}

/// A source over a rule's window limit, as Redis reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub rule: String,
    pub source: IpAddr,
    /// The hash field (the source, with the port when the rule keys by port).
    pub field: String,
    /// Its total across nodes in the window when it went over.
    pub total: u64,
    pub limit: u64,
    pub count: CountKind,
    /// What is left of the window: how long the hold lasts.
    pub remaining: Duration,
    /// The first report of this source in this window on this node (to log and count once).
    pub first: bool,
}

/// What one rule's script call answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowAnswer {
    pub window: i64,
    pub remaining_ms: u64,
    /// `(field, total)` of the sources over the limit.
    pub over: Vec<(String, u64)>,
}

/// Which sources this node already reported, per rule: the window and its fields.
#[derive(Debug, Default)]
pub struct Reported {
    seen: BTreeMap<String, (i64, BTreeSet<String>)>,
}

impl Reported {
    /// The holds of `answer` for `rule`, each marked `first` when this node had not reported
    /// it in this window. Fields that name no address are left out.
    pub fn holds(&mut self, rule: &WindowRule, answer: &WindowAnswer) -> Vec<Held> {
        let seen = self.seen.entry(rule.name.clone()).or_insert_with(|| (answer.window, BTreeSet::new()));
        if seen.0 != answer.window {
            *seen = (answer.window, BTreeSet::new());
        }
        answer
            .over
            .iter()
            .filter_map(|(field, total)| {
                let source = field_source(field)?;
                Some(Held {
                    rule: rule.name.clone(),
                    source,
                    field: field.clone(),
                    total: *total,
                    limit: rule.limit,
                    count: rule.count,
                    remaining: Duration::from_millis(answer.remaining_ms),
                    first: seen.1.insert(field.clone()),
                })
            })
            .collect()
    }

    /// Forgets rules no longer in force.
    pub fn retain(&mut self, rules: &[WindowRule]) {
        self.seen.retain(|name, _| rules.iter().any(|r| &r.name == name));
    }
}

/// The keys of `rule`'s counts and over-limit sources under `prefix`.
pub fn keys(prefix: &str, rule: &str) -> (String, String) {
    let counts = format!("{prefix}{WINDOW_KEY}{{{rule}}}");
    let over = format!("{counts}:over");
    (counts, over)
}

impl Membership {
    /// Adds `deltas` (field → tokens) to `rule`'s count of the current window and returns the
    /// sources over its limit in that window.
    pub async fn add_window(
        &mut self,
        rule: &WindowRule,
        deltas: Option<&BTreeMap<String, u64>>,
    ) -> redis::RedisResult<WindowAnswer> {
        let (counts, over) = keys(&self.config.window_prefix, &rule.name);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(WINDOW_SCRIPT).arg(2).arg(counts).arg(over).arg(rule.unit_ms).arg(rule.limit).arg(KEY_GRACE_MS);
        for (field, delta) in deltas.into_iter().flatten() {
            cmd.arg(field).arg(*delta);
        }
        let mut conn = self.connection().await?;
        let result = cmd.query_async::<(i64, i64, Vec<String>)>(&mut conn).await;
        let (window, remaining, flat) = match result {
            Ok(r) => r,
            Err(e) => {
                self.conn = None;
                return Err(e);
            }
        };
        let over = flat.chunks_exact(2).filter_map(|p| Some((p[0].clone(), p[1].parse().ok()?))).collect();
        Ok(WindowAnswer { window, remaining_ms: u64::try_from(remaining).unwrap_or(0), over })
    }
}

impl Membership {
    /// One sync period of the global per-source rules: adds the growth of `counts` since the
    /// last reading to each rule's window in Redis and returns the sources over a limit. A
    /// failure is logged once (and the recovery once); the growth it did not send is dropped.
    pub async fn sync_windows(
        &mut self,
        rules: &[WindowRule],
        counts: &[SourceCount],
        deltas: &mut Deltas,
        reported: &mut Reported,
    ) -> Vec<Held> {
        if rules.is_empty() {
            return Vec::new();
        }
        let grown = deltas.observe(counts);
        reported.retain(rules);
        let mut held = Vec::new();
        for rule in rules {
            match self.add_window(rule, grown.get(&rule.name)).await {
                Ok(answer) => {
                    if self.window_failing {
                        info!("sync: counting sources of global per-source rules in redis again");
                        self.window_failing = false;
                    }
                    held.extend(reported.holds(rule, &answer));
                }
                Err(e) => {
                    if !self.window_failing {
                        warn!(
                            "sync: counting sources of global per-source rules in redis {} failed: {e}; each node holds every source to the per-source limit on its own until it answers",
                            self.url
                        );
                        self.window_failing = true;
                    }
                    break;
                }
            }
        }
        held
    }
}

#[cfg(test)]
#[path = "window_tests.rs"]
mod tests;
