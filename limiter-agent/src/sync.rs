//! `rateLimit.global` kernel rules across nodes: membership in Redis and each node's share.
//!
//! The kernel cannot ask Redis per packet, so a global kernel rule is split instead: every
//! agent that shields interfaces (`run --iface ... --rls-backend redis`) keeps its node id in
//! the sorted set `<prefix>limiter:nodes`, scored by the time of its last heartbeat, and
//! enforces `1/N` of the rule's limit, N being the members seen within the last
//! [`STALE_HEARTBEATS`] heartbeats. Traffic spread evenly over the nodes then meets the global
//! limit; traffic that all lands on one node meets its share only (the price of never asking
//! Redis in the data path).
//!
//! Choices, each visible in the logs:
//! - Heartbeat times are Redis server time (`TIME` inside the script), so node clocks need not
//!   agree; every node should run the same `--global-heartbeat`, since each one prunes
//!   members older than three of its own heartbeats.
//! - Redis unreachable: the last known N stays in force (logged once, and once on recovery).
//!   Falling back to N = 1 would silently hand every node the full rate, N times the limit in
//!   total. Members that stop beating leave the set after three heartbeats, so the survivors
//!   grow their share then.
//! - Redis unreachable at start: nothing is known yet, so N = 1 (the full limit on this node)
//!   with a warning, until the first heartbeat answers.
//! - A change of N re-applies the plan through [`crate::dataplane::Dataplane::apply`]: the
//!   changed rules start with a full bucket, so every membership change hands out one fresh
//!   burst per node. The plan is re-applied only when N actually changes.

use std::time::Duration;

use log::{info, warn};
use tokio::sync::watch;

use crate::rls::redis::target::{Conn, Connector, RedisTarget, SocketType, TargetError, Timeouts, Topology};

use crate::plan::{KernelPlan, Limit};

/// The sorted set of live nodes (after the `--redis-key-prefix`).
pub const NODES_KEY: &str = "limiter:nodes";

/// A member whose last heartbeat is older than this many heartbeats is dropped.
pub const STALE_HEARTBEATS: u32 = 3;

/// `value / nodes`, rounded up; `nodes` 0 counts as 1 (this node is always one of them).
pub fn share(value: u64, nodes: u64) -> u64 {
    value.div_ceil(nodes.max(1))
}

/// One node's share of a global limit: requests rounded up and at least 1 (a rule never
/// becomes "drop everything"), burst rounded up.
pub fn limit_share(limit: Limit, nodes: u64) -> Limit {
    Limit { requests: share(limit.requests, nodes).max(1), burst: share(limit.burst, nodes), ..limit }
}

/// `plan` with every global rule's limit replaced by this node's share among `nodes`.
pub fn shared_plan(plan: &KernelPlan, nodes: u64) -> KernelPlan {
    let mut plan = plan.clone();
    for rule in plan.rules.iter_mut().filter(|r| r.global) {
        rule.limit = limit_share(rule.limit, nodes);
    }
    plan
}

/// How many rules of `plan` are global.
pub fn global_rules(plan: &KernelPlan) -> usize {
    plan.rules.iter().filter(|r| r.global).count()
}

/// `1 node`, `3 nodes`.
pub fn nodes_text(n: u64) -> String {
    if n == 1 { "1 node".to_owned() } else { format!("{n} nodes") }
}

/// The default `--node-id`: hostname and pid (a restarted agent is a new member; the old
/// entry leaves with its `ZREM` at shutdown, or after three heartbeats after a crash).
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned());
    format!("{host}-{}", std::process::id())
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("invalid Redis URL {url}: {source}")]
    InvalidUrl { url: String, source: TargetError },
}

/// Membership settings.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    pub node_id: String,
    /// The full key of the node set (prefix included).
    pub key: String,
    pub heartbeat: Duration,
}

impl MembershipConfig {
    pub fn new(node_id: String, key_prefix: &str, heartbeat: Duration) -> Self {
        Self { node_id, key: format!("{key_prefix}{NODES_KEY}"), heartbeat }
    }

    /// Longest wait for one Redis round trip: a heartbeat, at most a second.
    fn timeout(&self) -> Duration {
        self.heartbeat.min(Duration::from_secs(1))
    }

    fn stale_ms(&self) -> u64 {
        u64::try_from(self.heartbeat.as_millis()).unwrap_or(u64::MAX / 4).saturating_mul(u64::from(STALE_HEARTBEATS))
    }
}

/// Registers the caller, prunes stale members and counts the rest, in one atomic round trip on
/// Redis's clock. KEYS[1]: the set; ARGV[1]: node id; ARGV[2]: staleness in ms.
const HEARTBEAT_SCRIPT: &str = "\
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2])))
return redis.call('ZCARD', KEYS[1])";

/// This node's membership: one small connection of its own, apart from the rate limit
/// service's backend.
pub struct Membership {
    connector: Connector,
    url: String,
    conn: Option<Conn>,
    config: MembershipConfig,
    /// Whether the last heartbeat failed (so failures and recovery are logged once each).
    failing: bool,
}

impl Membership {
    /// Membership in the single Redis at `url`.
    pub fn new(url: &str, config: MembershipConfig) -> Result<Self, SyncError> {
        let target = RedisTarget::parse(Topology::Single, SocketType::Tcp, url)
            .map_err(|source| SyncError::InvalidUrl { url: crate::rls::redis::target::redact_url(url), source })?;
        Self::with_target(&target, config)
    }

    /// Membership in any Redis deployment (the rate limit service's own).
    pub fn with_target(target: &RedisTarget, config: MembershipConfig) -> Result<Self, SyncError> {
        let timeouts = Timeouts { connect: config.timeout(), response: config.timeout() };
        let connector =
            target.connector(timeouts).map_err(|source| SyncError::InvalidUrl { url: target.to_string(), source })?;
        Ok(Self { url: target.to_string(), connector, conn: None, config, failing: false })
    }

    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    async fn connection(&mut self) -> redis::RedisResult<Conn> {
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        let conn = self.connector.connect().await?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// One heartbeat: the number of live nodes, this one included.
    pub async fn beat(&mut self) -> redis::RedisResult<u64> {
        let mut conn = self.connection().await?;
        let result = redis::cmd("EVAL")
            .arg(HEARTBEAT_SCRIPT)
            .arg(1)
            .arg(&self.config.key)
            .arg(&self.config.node_id)
            .arg(self.config.stale_ms())
            .query_async::<u64>(&mut conn)
            .await;
        if result.is_err() {
            // Reconnect on the next beat rather than reuse a connection in an unknown state.
            self.conn = None;
        }
        result
    }

    /// [`Membership::beat`] that logs the first failure and the recovery, and returns `None`
    /// while Redis does not answer.
    pub async fn beat_logged(&mut self) -> Option<u64> {
        match self.beat().await {
            Ok(n) => {
                if self.failing {
                    info!("sync: redis {} reachable again: {} live", self.url, nodes_text(n));
                    self.failing = false;
                }
                Some(n.max(1))
            }
            Err(e) => {
                if !self.failing {
                    warn!(
                        "sync: heartbeat to redis {} failed: {e}; keeping the last known node count for global kernel rules until it answers",
                        self.url
                    );
                    self.failing = true;
                }
                None
            }
        }
    }

    /// Leaves the set (`ZREM`), so the other nodes grow their share at their next heartbeat.
    pub async fn leave(&mut self) -> redis::RedisResult<()> {
        let mut conn = self.connection().await?;
        redis::cmd("ZREM").arg(&self.config.key).arg(&self.config.node_id).query_async::<i64>(&mut conn).await?;
        Ok(())
    }

    /// Heartbeats every `heartbeat` and publishes N on `nodes` when it changes, until
    /// `shutdown` turns true; then leaves the set.
    pub async fn run(mut self, nodes: watch::Sender<u64>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.config.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Some(n) = self.beat_logged().await {
                        nodes.send_if_modified(|old| std::mem::replace(old, n) != n);
                    }
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
        match self.leave().await {
            Ok(()) => info!("sync: left the node set {} as {}", self.config.key, self.config.node_id),
            Err(e) => warn!(
                "sync: leaving the node set failed: {e}; the other nodes drop {} after {STALE_HEARTBEATS} heartbeats",
                self.config.node_id
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{CountKind, KernelRule, SourceSelector, Unit};

    fn limit(requests: u64, burst: u64) -> Limit {
        Limit { requests, unit: Unit::Hour, burst }
    }

    #[test]
    fn share_rounds_up_and_treats_zero_nodes_as_one() {
        assert_eq!(share(20, 2), 10);
        assert_eq!(share(21, 2), 11);
        assert_eq!(share(1, 3), 1);
        assert_eq!(share(0, 3), 0);
        assert_eq!(share(7, 0), 7);
        assert_eq!(share(7, 1), 7);
        assert_eq!(share(u64::MAX, 1), u64::MAX);
        assert_eq!(share(u64::MAX, 2), u64::MAX / 2 + 1);
        assert_eq!(share(u64::MAX, u64::MAX), 1);
        assert_eq!(share(5, u64::MAX), 1);
    }

    #[test]
    fn limit_share_keeps_at_least_one_request_and_the_unit() {
        assert_eq!(limit_share(limit(20, 5), 2), limit(10, 3));
        assert_eq!(limit_share(limit(20, 0), 3), limit(7, 0));
        assert_eq!(limit_share(limit(2, 1), 10), limit(1, 1));
        assert_eq!(limit_share(limit(20, 5), 0), limit(20, 5));
        assert_eq!(limit_share(limit(u64::MAX, u64::MAX), 1), limit(u64::MAX, u64::MAX));
        let interval = Limit { requests: 9, unit: Unit::Interval { ns: 10 }, burst: 0 };
        assert_eq!(limit_share(interval, 4), Limit { requests: 3, ..interval });
    }

    #[test]
    fn shared_plan_changes_global_rules_only() {
        let rule = |name: &str, global| KernelRule {
            name: name.into(),
            targets: Vec::new(),
            source: SourceSelector::everyone(false),
            count: CountKind::Packets,
            limit: limit(20, 4),
            shadow: false,
            global,
        };
        let plan = KernelPlan { rules: vec![rule("p/local", false), rule("p/global", true)], ..Default::default() };
        let shared = shared_plan(&plan, 4);
        assert_eq!(shared.rules[0], plan.rules[0]);
        assert_eq!(shared.rules[1].limit, limit(5, 1));
        assert_eq!(shared_plan(&plan, 1), plan);
        assert_eq!(global_rules(&plan), 1);
    }

    #[test]
    fn node_text_and_default_id() {
        assert_eq!(nodes_text(1), "1 node");
        assert_eq!(nodes_text(2), "2 nodes");
        assert!(default_node_id().ends_with(&format!("-{}", std::process::id())));
    }

    #[test]
    fn staleness_is_three_heartbeats() {
        let c = MembershipConfig::new("n".into(), "pfx:", Duration::from_secs(2));
        assert_eq!(c.key, "pfx:limiter:nodes");
        assert_eq!(c.stale_ms(), 6000);
        assert_eq!(c.timeout(), Duration::from_secs(1));
    }
}
