//! Reading the counters, for the agent's [`Dataplane`](super::Dataplane) and for a read-only
//! look at a pinned set ([`PinnedView`]): what `top` shows when no agent runs. The view opens
//! the counters, the block list and the record from their pins, takes no lock and writes
//! nothing.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use limiter_common::{Addr, BlockEntry, Bucket, Counter, RuleCounter, STATS_ENTRIES, SourceBucketKey, names, reason};

use super::{
    Result, addr_to_ip, boot_time_ns, map_err,
    pin::{
        self, LinkPin, META_PIN, RULE_IDS_PIN,
        meta::{Meta, MetaMaps, id_state},
    },
};

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Indexed by `limiter_common::reason::*`.
    pub reasons: Vec<Counter>,
    /// Per rule name, for the rules of the applied plan.
    pub rules: BTreeMap<String, RuleCounter>,
}

impl Stats {
    pub fn reason(&self, r: u32) -> Counter {
        self.reasons.get(r as usize).copied().unwrap_or_default()
    }

    /// Packets and bytes passed, over all pass reasons.
    pub fn passed(&self) -> Counter {
        self.sum(|r| !reason::is_drop(r))
    }

    /// Packets and bytes dropped, over all drop reasons.
    pub fn dropped(&self) -> Counter {
        self.sum(reason::is_drop)
    }

    fn sum(&self, pick: impl Fn(u32) -> bool) -> Counter {
        let mut c = Counter::default();
        for r in (0..reason::VERDICT_REASONS).filter(|&r| pick(r)) {
            let x = self.reason(r);
            c.packets += x.packets;
            c.bytes += x.bytes;
        }
        c
    }
}

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
    let map =
        MapData::from_pin(dir.join(name)).and_then(Map::from_map_data).map_err(map_err(name, "opening the pin"))?;
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
        let capacity =
            aya::maps::MapInfo::from_pin(self.dir.join(names::SOURCE_BUCKETS)).map_or(0, |i| i.max_entries());
        (self.sources.keys().filter(|k| k.is_ok()).count(), capacity)
    }
}

/// Counters summed over CPUs, rules named by `names` (id → name).
pub(super) fn read_stats(
    stats_map: &PerCpuArray<MapData, Counter>,
    rule_stats: &PerCpuArray<MapData, RuleCounter>,
    names: &BTreeMap<u32, String>,
) -> Result<Stats> {
    let mut stats = Stats::default();
    for r in 0..STATS_ENTRIES {
        let per_cpu = stats_map.get(&r, 0).map_err(map_err(names::STATS, "reading"))?;
        let mut c = Counter::default();
        for v in per_cpu.iter() {
            add(&mut c, v);
        }
        stats.reasons.push(c);
    }
    for (id, name) in names {
        let per_cpu = rule_stats.get(id, 0).map_err(map_err(names::RULE_STATS, "reading"))?;
        let mut c = RuleCounter::default();
        for v in per_cpu.iter() {
            add(&mut c.passed, &v.passed);
            add(&mut c.dropped, &v.dropped);
            add(&mut c.shadow_dropped, &v.shadow_dropped);
        }
        stats.rules.insert(name.clone(), c);
    }
    Ok(stats)
}

/// Block-list entries that have not expired.
pub(super) fn count_blocked(block: &HashMap<MapData, Addr, BlockEntry>) -> usize {
    let now = boot_time_ns();
    block.iter().filter_map(|e| e.ok()).filter(|(_, v)| v.expires_at_ns > now).count()
}

/// The `n` sources with the most dropped packets.
pub(super) fn read_top(dropped: &PerCpuHashMap<MapData, Addr, Counter>, n: usize) -> Result<Vec<(IpAddr, Counter)>> {
    let mut all: Vec<(IpAddr, Counter)> = Vec::new();
    for entry in dropped.iter() {
        let (addr, per_cpu) = entry.map_err(map_err(names::DROPPED_SOURCES, "reading"))?;
        let mut c = Counter::default();
        for v in per_cpu.iter() {
            add(&mut c, v);
        }
        all.push((addr_to_ip(&addr), c));
    }
    all.sort_by(|a, b| b.1.packets.cmp(&a.1.packets).then(a.0.cmp(&b.0)));
    all.truncate(n);
    Ok(all)
}

fn add(into: &mut Counter, from: &Counter) {
    into.packets += from.packets;
    into.bytes += from.bytes;
}
