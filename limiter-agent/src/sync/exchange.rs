//! Publishing this node's demand and reading every node's, once per sync period.
//!
//! The demand lives in one Redis hash, `<prefix>limiter:demand`: a field per node whose value is
//! the Redis time of its last publication and its demand (JSON, tokens per second per global
//! rule). One script, on one key (so it also runs on a Redis Cluster), writes this node's
//! field, deletes the fields older than [`super::STALE_HEARTBEATS`] periods (a node that
//! stopped publishing vanishes with them), renews the hash's own TTL (when every node is
//! gone, so is the hash, after [`KEY_TTL_MS`] or three periods, whichever is longer) and
//! returns the rest. The node set
//! (`<prefix>limiter:nodes`) says which nodes are live; the hash says what they want.
//!
//! Nothing here is on the packet path: the agent's main loop sends the counters over a watch
//! channel and gets views back the same way; the XDP program reads only the shares the main
//! loop writes into its maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use log::{debug, info, warn};
use tokio::sync::{mpsc, watch};

use super::{
    Membership,
    demand::{Demand, Offered, Smoother, View},
    nodes_text,
    window::{Deltas, Held, Reported, WindowRule},
};
use crate::dataplane::SourceCount;

/// The hash of published demand (after the `--redis-key-prefix`).
pub const DEMAND_KEY: &str = "limiter:demand";

/// The demand hash's own TTL (at least): garbage collection once every node is gone. Dead
/// nodes leave through the staleness of their field, much sooner.
pub const KEY_TTL_MS: u64 = 60_000;

/// KEYS[1]: the demand hash; ARGV[1]: node id; ARGV[2]: its demand (JSON); ARGV[3]:
/// staleness in ms; ARGV[4]: the hash's TTL in ms. Returns `[node, demand, node, demand, ...]` of the fresh fields.
const EXCHANGE_SCRIPT: &str = "\
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stale = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d ', now) .. ARGV[2])
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local v = all[i + 1]
  local sp = string.find(v, ' ', 1, true)
  local at = sp and tonumber(string.sub(v, 1, sp - 1))
  if at == nil or at < now - stale then
    redis.call('HDEL', KEYS[1], all[i])
  else
    table.insert(out, all[i])
    table.insert(out, string.sub(v, sp + 1))
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return out";

/// Cumulative offered counts of the global rules, read from the kernel at one instant.
#[derive(Clone, Debug, Default)]
pub struct Reading {
    pub at: Option<Instant>,
    pub counts: BTreeMap<String, Offered>,
    /// The global per-source rules in force ([`super::window`]).
    pub windows: Vec<WindowRule>,
    /// Their sources' cumulative admitted counts.
    pub sources: Vec<SourceCount>,
}

impl Membership {
    /// Publishes `demand` and returns every live node's published demand, by node id.
    /// Entries that do not parse are left out (logged once per node).
    pub async fn exchange(&mut self, demand: &Demand) -> redis::RedisResult<BTreeMap<String, Demand>> {
        let json = serde_json::to_string(demand).unwrap_or_else(|_| "{}".to_owned());
        let mut conn = self.connection().await?;
        let result = redis::cmd("EVAL")
            .arg(EXCHANGE_SCRIPT)
            .arg(1)
            .arg(&self.config.demand_key)
            .arg(&self.config.node_id)
            .arg(json)
            .arg(self.config.stale_ms())
            .arg(self.config.stale_ms().max(KEY_TTL_MS))
            .query_async::<Vec<String>>(&mut conn)
            .await;
        let flat = match result {
            Ok(flat) => flat,
            Err(e) => {
                self.conn = None;
                return Err(e);
            }
        };
        let mut out = BTreeMap::new();
        for pair in flat.chunks_exact(2) {
            match serde_json::from_str::<Demand>(&pair[1]) {
                Ok(d) => {
                    out.insert(pair[0].clone(), d);
                }
                Err(e) => {
                    if self.unreadable.insert(pair[0].clone()) {
                        warn!(
                            "sync: node {}'s demand in {} is unreadable ({e}); it counts as no demand",
                            pair[0], self.config.demand_key
                        );
                    }
                }
            }
        }
        Ok(out)
    }

    /// One sync period: a heartbeat and an exchange of `demand`. `None` while Redis does not
    /// answer (logged once by the heartbeat).
    pub async fn sync_once(&mut self, demand: &Demand) -> Option<View> {
        let members = self.beat_members_logged().await?;
        match self.exchange(demand).await {
            Ok(published) => Some(View::new(&self.config.node_id, members, published)),
            Err(e) => {
                debug!("sync: exchanging demand through {}: {e}", self.config.demand_key);
                None
            }
        }
    }

    /// Follows this node's counters: at each new reading, the demand it makes is published
    /// and the view that comes back is sent on `views`, and the growth of the per-source
    /// counts goes to the window sums, whose over-limit sources are sent on `holds`; until
    /// `shutdown`, then leaves the node set and the demand hash. Readings that arrive while a
    /// round trip is under way are folded into the next one (the watch channel keeps the
    /// latest; the counts are cumulative, so nothing is lost).
    pub async fn run_shares(
        mut self,
        mut readings: watch::Receiver<Reading>,
        views: watch::Sender<Option<Arc<View>>>,
        holds: mpsc::UnboundedSender<Vec<Held>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut smoother = Smoother::default();
        let (mut deltas, mut reported) = (Deltas::default(), Reported::default());
        let mut nodes = views.borrow().as_ref().map_or(1, |v| v.nodes.len());
        loop {
            tokio::select! {
                changed = readings.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let reading = readings.borrow_and_update().clone();
                    if let Some(at) = reading.at {
                        smoother.observe(at, &reading.counts);
                    }
                    if let Some(view) = self.sync_once(smoother.demand()).await {
                        if view.nodes.len() != nodes {
                            info!("sync: {} live (was {nodes})", nodes_text(view.nodes.len() as u64));
                            nodes = view.nodes.len();
                        }
                        views.send_replace(Some(Arc::new(view)));
                    }
                    let held = self.sync_windows(&reading.windows, &reading.sources, &mut deltas, &mut reported).await;
                    if !held.is_empty() && holds.send(held).is_err() {
                        break;
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

/// Node ids whose published demand did not parse (each logged once).
pub(super) type Unreadable = BTreeSet<String>;
