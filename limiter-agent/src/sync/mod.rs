//! `rateLimit.global` kernel rules across nodes: membership in Redis, published demand, and
//! each node's share.
//!
//! The kernel cannot ask Redis per packet, so a global kernel rule is split: every agent that
//! shields interfaces (`run --iface ... --rls-backend redis`) keeps its node id in the sorted
//! set `<prefix>limiter:nodes`, scored by the time of its last heartbeat, and each heartbeat
//! (the sync period) publishes what its global rules were offered ([`exchange`]) and enforces
//! the share of each rule's limit that the published demand gives it ([`demand`]): a floor,
//! and the rest in proportion to demand. Every node computes every share with the same
//! function from the same data, so the shares of one view sum to the limit.
//!
//! Global rules keyed by source take no share: every node enforces their full per-source
//! limit, and their sources' counts are summed per fixed window instead ([`window`]).
//!
//! Choices, each visible in the logs:
//! - Heartbeat times are Redis server time (`TIME` inside the scripts), so node clocks need
//!   not agree; every node should run the same `--global-heartbeat` and
//!   `--global-share-floor`, since each one prunes members older than three of its own
//!   heartbeats and computes the floors with its own setting.
//! - Redis unreachable: the last shares stay in force (logged once, and once on recovery).
//!   Falling back to the full limit would hand every node the full rate, N times the limit in
//!   total. Members that stop beating leave the set after three heartbeats, so the survivors
//!   take over their share then.
//! - Redis unreachable at start: nothing is known yet, so the full limit on this node, with a
//!   warning, until the first sync answers.
//! - A new share rewrites the rule's bucket parameters in place
//!   ([`crate::dataplane::Dataplane::set_shares`]): the rule keeps its id, counters and
//!   buckets (a shared bucket keeps its tokens), so shares can move every period without
//!   handing out fresh bursts.

pub mod demand;
pub mod exchange;
pub mod window;

use std::time::Duration;

use log::{info, warn};
use tokio::sync::watch;

use crate::rls::redis::target::{Conn, Connector, RedisTarget, SocketType, TargetError, Timeouts, Topology};

use crate::plan::KernelPlan;

/// The sorted set of live nodes (after the `--redis-key-prefix`).
pub const NODES_KEY: &str = "limiter:nodes";

/// A member whose last heartbeat is older than this many heartbeats is dropped.
pub const STALE_HEARTBEATS: u32 = 3;

/// How many rules of `plan` are global with one bucket for all sources (shared by demand).
pub fn global_rules(plan: &KernelPlan) -> usize {
    plan.rules.iter().filter(|r| r.global_shared()).count()
}

/// How many rules of `plan` are global and keyed by source (summed per window, [`window`]).
pub fn global_per_source_rules(plan: &KernelPlan) -> usize {
    plan.rules.iter().filter(|r| r.global_per_source()).count()
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
    /// The full key of the published demand (prefix included, see [`exchange`]).
    pub demand_key: String,
    /// The `--redis-key-prefix`, which the keys of the per-source window counts start with
    /// (see [`window::keys`]).
    pub window_prefix: String,
    pub heartbeat: Duration,
}

impl MembershipConfig {
    pub fn new(node_id: String, key_prefix: &str, heartbeat: Duration) -> Self {
        Self {
            node_id,
            key: format!("{key_prefix}{NODES_KEY}"),
            demand_key: format!("{key_prefix}{}", exchange::DEMAND_KEY),
            window_prefix: key_prefix.to_owned(),
            heartbeat,
        }
    }

    /// Longest wait for one Redis round trip: a heartbeat, at most a second.
    fn timeout(&self) -> Duration {
        self.heartbeat.min(Duration::from_secs(1))
    }

    fn stale_ms(&self) -> u64 {
        u64::try_from(self.heartbeat.as_millis()).unwrap_or(u64::MAX / 4).saturating_mul(u64::from(STALE_HEARTBEATS))
    }
}

/// Registers the caller, prunes stale members and lists the rest, in one atomic round trip on
/// Redis's clock. KEYS[1]: the set; ARGV[1]: node id; ARGV[2]: staleness in ms.
const HEARTBEAT_SCRIPT: &str = "\
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2])))
return redis.call('ZRANGE', KEYS[1], 0, -1)";

/// This node's membership: one small connection of its own, apart from the rate limit
/// service's backend.
pub struct Membership {
    connector: Connector,
    url: String,
    conn: Option<Conn>,
    config: MembershipConfig,
    /// Whether the last heartbeat failed (so failures and recovery are logged once each).
    failing: bool,
    /// Whether the last window count failed (logged once each way, like the heartbeat).
    window_failing: bool,
    unreadable: exchange::Unreadable,
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
        Ok(Self {
            url: target.to_string(),
            connector,
            conn: None,
            config,
            failing: false,
            window_failing: false,
            unreadable: exchange::Unreadable::new(),
        })
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
        self.beat_members().await.map(|m| m.len() as u64)
    }

    /// One heartbeat: the ids of the live nodes, this one included.
    pub async fn beat_members(&mut self) -> redis::RedisResult<Vec<String>> {
        let mut conn = self.connection().await?;
        let result = redis::cmd("EVAL")
            .arg(HEARTBEAT_SCRIPT)
            .arg(1)
            .arg(&self.config.key)
            .arg(&self.config.node_id)
            .arg(self.config.stale_ms())
            .query_async::<Vec<String>>(&mut conn)
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
        self.beat_members_logged().await.map(|m| (m.len() as u64).max(1))
    }

    /// [`Membership::beat_members`] that logs the first failure and the recovery, and returns
    /// `None` while Redis does not answer.
    pub async fn beat_members_logged(&mut self) -> Option<Vec<String>> {
        match self.beat_members().await {
            Ok(members) => {
                if self.failing {
                    info!("sync: redis {} reachable again: {} live", self.url, nodes_text(members.len() as u64));
                    self.failing = false;
                }
                Some(members)
            }
            Err(e) => {
                if !self.failing {
                    warn!(
                        "sync: heartbeat to redis {} failed: {e}; keeping the last known shares of global kernel rules until it answers",
                        self.url
                    );
                    self.failing = true;
                }
                None
            }
        }
    }

    /// Leaves the set (`ZREM`), so the other nodes grow their share at their next heartbeat.
    /// Leaves the node set at shutdown, saying how it went.
    async fn leave_logged(&mut self) {
        match self.leave().await {
            Ok(()) => info!("sync: left the node set {} as {}", self.config.key, self.config.node_id),
            Err(e) => warn!(
                "sync: leaving the node set failed: {e}; the other nodes drop {} after {STALE_HEARTBEATS} heartbeats",
                self.config.node_id
            ),
        }
    }

    pub async fn leave(&mut self) -> redis::RedisResult<()> {
        let mut conn = self.connection().await?;
        redis::cmd("ZREM").arg(&self.config.key).arg(&self.config.node_id).query_async::<i64>(&mut conn).await?;
        redis::cmd("HDEL").arg(&self.config.demand_key).arg(&self.config.node_id).query_async::<i64>(&mut conn).await?;
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
        self.leave_logged().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{CountKind, KernelRule, Limit, SourceSelector, Unit};

    #[test]
    fn global_rules_are_counted() {
        let rule = |name: &str, global| KernelRule {
            name: name.into(),
            targets: Vec::new(),
            source: SourceSelector::everyone(false),
            count: CountKind::Packets,
            limit: Limit { requests: 20, unit: Unit::Hour, burst: 4 },
            shadow: false,
            global,
        };
        let mut per_source = rule("p/per-source", true);
        per_source.source.distinct = true;
        let plan = KernelPlan {
            rules: vec![rule("p/local", false), rule("p/global", true), per_source],
            ..Default::default()
        };
        assert_eq!(global_rules(&plan), 1);
        assert_eq!(global_per_source_rules(&plan), 1);
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
        assert_eq!(c.demand_key, "pfx:limiter:demand");
        assert_eq!(c.timeout(), Duration::from_secs(1));
    }
}
