//! The backend's connections: one [`Link`] per Redis deployment (the main one, and the
//! per-second one of `REDIS_PERSECOND`), each with its one multiplexed connection (a Cluster
//! connection reaches every master), dropped when a round trip fails and remade by a
//! background task with backoff; and the pipeline of a request, split per Redis and, on a
//! Cluster, per hash slot (a pipeline may not cross slots there).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};

use log::{info, warn};
use redis::RedisResult;
use tokio::sync::Notify;

use super::Inner;
use super::decision::{Step, window_seconds};
use super::target::{Conn, Connector, slot};
use crate::plan::Unit;

/// One Redis deployment: how to connect, the live connection and its reconnect state.
pub(super) struct Link {
    pub(super) connector: Connector,
    /// The live connection, if any, with a generation number so that a request failing on an
    /// old connection does not throw away a newer one the reconnect task just made.
    conn: RwLock<Option<(u64, Conn)>>,
    /// Wakes the reconnect task (connection lost, or backend dropped).
    pub(super) wake: Arc<Notify>,
    /// Set while the reconnect task owes a connection, so a burst of failing requests wakes it once.
    reconnecting: AtomicBool,
}

/// Which link a reconnect task serves.
#[derive(Clone, Copy, Debug)]
pub(super) enum Which {
    Main,
    PerSecond,
}

impl Link {
    pub(super) fn new(connector: Connector) -> Link {
        Link { connector, conn: RwLock::new(None), wake: Arc::new(Notify::new()), reconnecting: AtomicBool::new(true) }
    }

    pub(super) fn is_connected(&self) -> bool {
        self.conn.read().map(|c| c.is_some()).unwrap_or(false)
    }

    pub(super) fn install(&self, conn: Conn) {
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
}

/// One counter to bump: key, hits, TTL in seconds.
type Count<'a> = (&'a str, u32, u64);

impl Inner {
    pub(super) fn link(&self, which: Which) -> Option<&Link> {
        match which {
            Which::Main => Some(&self.main),
            Which::PerSecond => self.per_second.as_deref(),
        }
    }

    /// Every link is up.
    pub(super) fn is_connected(&self) -> bool {
        self.main.is_connected() && self.per_second.as_ref().is_none_or(|l| l.is_connected())
    }

    /// INCRBY then EXPIRE for every `Step::Count`, on the per-second Redis for second-unit
    /// limits when there is one. Returns the INCRBY replies in step order, or `Err` when a
    /// Redis failed (after counting the error and dropping that connection): the whole request
    /// then gets the failure-mode answer, as the reference answers an error for it.
    pub(super) async fn round_trip(&self, steps: &[Step]) -> Result<Vec<i64>, ()> {
        let counts: Vec<(Count<'_>, bool)> = steps
            .iter()
            .filter_map(|step| match step {
                Step::Count { key, hits, limit, .. } => Some((
                    (key.as_str(), *hits, window_seconds(limit.unit)),
                    self.per_second.is_some() && limit.unit == Unit::Second,
                )),
                Step::Done(_) => None,
            })
            .collect();
        let (second, main): (Vec<_>, Vec<_>) = (0..counts.len()).partition(|&i| counts[i].1);
        let pick = |idx: &[usize]| idx.iter().map(|&i| counts[i].0).collect::<Vec<_>>();
        let (main_counts, second_counts) = (pick(&main), pick(&second));
        let (main_replies, second_replies) = tokio::join!(self.link_round_trip(&self.main, &main_counts), async {
            match &self.per_second {
                Some(link) if !second_counts.is_empty() => self.link_round_trip(link, &second_counts).await,
                _ => Ok(Vec::new()),
            }
        });
        let mut out = vec![0; counts.len()];
        for (idx, replies) in [(main, main_replies?), (second, second_replies?)] {
            for (i, v) in idx.into_iter().zip(replies) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    async fn link_round_trip(&self, link: &Link, counts: &[Count<'_>]) -> Result<Vec<i64>, ()> {
        if counts.is_empty() {
            return Ok(Vec::new());
        }
        let current = link.conn.read().ok().and_then(|c| c.clone());
        let Some((generation, conn)) = current else {
            return Err(());
        };
        self.stats.round_trips.fetch_add(1, Ordering::Relaxed);
        // The connection has its own response timeout; this outer one also bounds a write
        // stuck on a full socket buffer, a Cluster redirect chain and its retries.
        let result = tokio::time::timeout(self.config.response_timeout, query_counts(conn, counts)).await;
        let failure = match result {
            Ok(Ok(values)) if values.len() == counts.len() => return Ok(values),
            Ok(Ok(values)) => format!("{} replies to {} counts", values.len(), counts.len()),
            Ok(Err(e)) => e.to_string(),
            Err(_elapsed) => format!("no answer within {:?}", self.config.response_timeout),
        };
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        warn!(
            "redis: round trip to {} failed: {failure}; answering {}",
            link.connector.describe(),
            self.config.failure_mode
        );
        link.lost(generation);
        Err(())
    }
}

/// The INCRBY replies of `counts`: one pipeline on a single server; on a Cluster one pipeline
/// per hash slot, all sent at once (so a request costs one round trip to each master it
/// touches, in parallel).
async fn query_counts(mut conn: Conn, counts: &[Count<'_>]) -> RedisResult<Vec<i64>> {
    let pipeline = |idx: &mut dyn Iterator<Item = &Count<'_>>| {
        let mut pipe = redis::pipe();
        for (key, hits, ttl) in idx {
            pipe.cmd("INCRBY").arg(*key).arg(*hits);
            pipe.cmd("EXPIRE").arg(*key).arg(*ttl).ignore();
        }
        pipe
    };
    if !conn.is_cluster() {
        return pipeline(&mut counts.iter()).query_async::<Vec<i64>>(&mut conn).await;
    }
    let mut by_slot: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
    for (i, (key, _, _)) in counts.iter().enumerate() {
        by_slot.entry(slot(key)).or_default().push(i);
    }
    let queries = by_slot.into_values().map(|idx| {
        let pipe = pipeline(&mut idx.iter().map(|&i| &counts[i]));
        let mut conn = conn.clone();
        async move { pipe.query_async::<Vec<i64>>(&mut conn).await.map(|values| (idx, values)) }
    });
    let mut out = vec![0; counts.len()];
    for (idx, values) in futures_util::future::try_join_all(queries).await? {
        for (i, v) in idx.into_iter().zip(values) {
            out[i] = v;
        }
    }
    Ok(out)
}

/// Reconnects one link with exponential backoff whenever woken with no live connection. Holds
/// only a `Weak` so dropping the last [`RedisBackend`](super::RedisBackend) ends it.
pub(super) async fn reconnect_task(inner: Weak<Inner>, which: Which, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let mut backoff = match inner.upgrade() {
            Some(inner) => inner.config.reconnect_backoff_min,
            None => return,
        };
        loop {
            let Some(strong) = inner.upgrade() else { return };
            let Some(link) = strong.link(which) else { return };
            if link.is_connected() {
                link.reconnecting.store(false, Ordering::Release);
                break;
            }
            match link.connector.connect().await {
                Ok(conn) => {
                    strong.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    info!("redis: reconnected to {}", link.connector.describe());
                    link.install(conn);
                    break;
                }
                Err(e) => {
                    strong.stats.errors.fetch_add(1, Ordering::Relaxed);
                    log::debug!(
                        "redis: reconnect to {} failed: {e}; next try in {backoff:?}",
                        link.connector.describe()
                    );
                    let max = strong.config.reconnect_backoff_max;
                    drop(strong);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max);
                }
            }
        }
    }
}
