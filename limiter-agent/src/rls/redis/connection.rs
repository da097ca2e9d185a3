//! The backend's one multiplexed connection: installing it, dropping it when a round trip
//! fails, the pipeline of a request, and the background task that reconnects with backoff.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use log::{info, warn};
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;

use super::Inner;
use super::decision::{Step, window_seconds};

impl Inner {
    pub(super) fn is_connected(&self) -> bool {
        self.conn.read().map(|c| c.is_some()).unwrap_or(false)
    }

    pub(super) fn install(&self, conn: MultiplexedConnection) {
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
    pub(super) async fn round_trip(&self, steps: &[Step]) -> Result<Vec<i64>, ()> {
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
}

/// Reconnects with exponential backoff whenever woken with no live connection. Holds only a
/// `Weak` so dropping the last [`RedisBackend`](super::RedisBackend) ends it.
pub(super) async fn reconnect_task(inner: Weak<Inner>, wake: Arc<Notify>) {
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
