//! A read-only look at a pinned set: what `top` shows when no agent runs. It opens the
//! counters, the block list and the record from their pins, takes no lock and writes nothing.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use limiter_common::{Addr, BlockEntry, Bucket, Counter, RuleCounter, SourceBucketKey, names};

use super::{
    Result, Stats, count_blocked, map_err,
    pin::{
        self, LinkPin, META_PIN, RULE_IDS_PIN,
        meta::{Meta, MetaMaps, id_state},
    },
    read_stats, read_top,
};

/// A pinned set, seen from outside.
pub struct PinnedView {
    pub dir: PathBuf,
    /// `None` when the record is unreadable (another format).
    pub record: Option<Meta>,
    /// Whether an agent holds the directory.
    pub agent_running: bool,
    pub links: Vec<LinkPin>,
    stats: PerCpuArray<MapData, Counter>,
    rule_stats: PerCpuArray<MapData, RuleCounter>,
    dropped: PerCpuHashMap<MapData, Addr, Counter>,
    block: HashMap<MapData, Addr, BlockEntry>,
    sources: HashMap<MapData, SourceBucketKey, Bucket>,
    names: BTreeMap<u32, String>,
}

fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(dir: &Path, name: &'static str) -> Result<T> {
    let map = MapData::from_pin(dir.join(name)).and_then(Map::from_map_data).map_err(map_err(name, "opening the pin"))?;
    T::try_from(map).map_err(map_err(name, "opening the pin"))
}

impl PinnedView {
    /// The set pinned in `dir`; `None` when nothing is pinned there.
    pub fn open(dir: &Path) -> Result<Option<Self>> {
        let Some(agent_running) = pin::agent_running(dir) else { return Ok(None) };
        if !dir.join(names::STATS).exists() {
            return Ok(None);
        }
        let records = MetaMaps::open(&dir.join(META_PIN), &dir.join(RULE_IDS_PIN)).ok();
        let record = records.as_ref().and_then(|m| m.read().ok().flatten());
        let mut rule_names = BTreeMap::new();
        if let (Some(maps), Some(rec)) = (&records, &record) {
            for (id, e) in maps.ids(rec.rule_ids_next).unwrap_or_default() {
                if e.state == id_state::LIVE {
                    rule_names.insert(id, e.name());
                }
            }
        }
        Ok(Some(Self {
            dir: dir.to_owned(),
            record,
            agent_running,
            links: pin::links(dir)?,
            stats: open(dir, names::STATS)?,
            rule_stats: open(dir, names::RULE_STATS)?,
            dropped: open(dir, names::DROPPED_SOURCES)?,
            block: open(dir, names::BLOCK)?,
            sources: open(dir, names::SOURCE_BUCKETS)?,
            names: rule_names,
        }))
    }

    pub fn stats(&self) -> Result<Stats> {
        read_stats(&self.stats, &self.rule_stats, &self.names)
    }

    pub fn top_dropped_sources(&self, n: usize) -> Result<Vec<(IpAddr, Counter)>> {
        read_top(&self.dropped, n)
    }

    pub fn blocked_sources(&self) -> usize {
        count_blocked(&self.block)
    }

    /// Entries in the per-source bucket table (a walk: O(entries)) and its capacity.
    pub fn tracked_sources(&self) -> (usize, u32) {
        let capacity = aya::maps::MapInfo::from_pin(self.dir.join(names::SOURCE_BUCKETS)).map_or(0, |i| i.max_entries());
        (self.sources.keys().filter(|k| k.is_ok()).count(), capacity)
    }
}

