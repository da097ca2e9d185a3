//! The layout of the maps an agent pins, and the stamp that says whether a pinned set can be
//! adopted as it is.
//!
//! A pinned set outlives the agent that made it (see DESIGN.md, "Lifecycle"), so the next
//! agent must know whether the maps it finds hold the bytes it expects. [`SHARED_MAPS`] lists
//! every map the kernel program shares with the agent, with its key and value types;
//! [`LAYOUT_STAMP`] is a hash over that list (names, map types, sizes and alignments of every
//! key and value type, capacities, flags) and [`LAYOUT_REVISION`]. A change to any shared type
//! changes the stamp by itself; a map added to the program without being listed here fails the
//! agent's test that compares this list with the maps in the compiled object
//! (`limiter-agent`, `dataplane::pin::tests`). Bump [`LAYOUT_REVISION`] when the *meaning*
//! of bytes changes without their size (a field reused, a flag renumbered).

use core::mem::{align_of, size_of};

use crate::{
    Addr, BLOCK_ENTRIES, BlockEntry, Bucket, Config, Counter, DEFAULT_SOURCE_ENTRIES, DROPPED_SOURCE_ENTRIES,
    FRAGMENT_ENTRIES, FragmentEntry, FragmentKey, GLOBAL_SOURCE_ENTRIES, LIST_ENTRIES, ListKey, ListValue, MAX_RULES,
    PortKey, PortRules, RuleConfig, RuleCounter, SHARED_BUCKET_ENTRIES, STATS_ENTRIES, SharedBucketKey,
    SourceBucketKey, names,
    synproxy::{self, SynproxyPort},
};

/// Bumped by hand when the meaning of shared bytes changes while their sizes do not.
pub const LAYOUT_REVISION: u32 = 1;

/// `bpf_map_type` values of the maps listed here (`include/uapi/linux/bpf.h`).
pub mod map_type {
    pub const HASH: u32 = 1;
    pub const ARRAY: u32 = 2;
    pub const PROG_ARRAY: u32 = 3;
    pub const PERCPU_ARRAY: u32 = 6;
    pub const LRU_HASH: u32 = 9;
    pub const LRU_PERCPU_HASH: u32 = 10;
    pub const LPM_TRIE: u32 = 11;
}

/// `BPF_F_NO_PREALLOC`: entries are allocated on insert.
pub const MAP_F_NO_PREALLOC: u32 = 1;

/// One shared map as the program declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: u32,
    pub key_size: u32,
    pub key_align: u32,
    pub value_size: u32,
    pub value_align: u32,
    /// As compiled; `SOURCE_BUCKETS` is resized at load (`--source-entries`).
    pub max_entries: u32,
    pub flags: u32,
}

/// The key of an LPM trie as the kernel stores it: the prefix length, then the data.
#[repr(C)]
pub struct LpmKey<K> {
    pub prefix_len: u32,
    pub data: K,
}

macro_rules! spec {
    ($name:expr, $map_type:expr, $key:ty, $value:ty, $max:expr, $flags:expr) => {
        MapSpec {
            name: $name,
            map_type: $map_type,
            key_size: size_of::<$key>() as u32,
            key_align: align_of::<$key>() as u32,
            value_size: size_of::<$value>() as u32,
            value_align: align_of::<$value>() as u32,
            max_entries: $max,
            flags: $flags,
        }
    };
}

/// Every map the program and the agent share, so every map a pinned set holds. Maps private
/// to the program (scratch space) are not listed: each program load gets its own.
pub const SHARED_MAPS: &[MapSpec] = &[
    spec!(names::CONFIG, map_type::ARRAY, u32, Config, 1, 0),
    spec!(names::ALLOW, map_type::LPM_TRIE, LpmKey<ListKey>, ListValue, LIST_ENTRIES, MAP_F_NO_PREALLOC),
    spec!(names::DENY, map_type::LPM_TRIE, LpmKey<ListKey>, ListValue, LIST_ENTRIES, MAP_F_NO_PREALLOC),
    spec!(names::ALLOW_HOSTS, map_type::HASH, LpmKey<ListKey>, ListValue, LIST_ENTRIES, MAP_F_NO_PREALLOC),
    spec!(names::DENY_HOSTS, map_type::HASH, LpmKey<ListKey>, ListValue, LIST_ENTRIES, MAP_F_NO_PREALLOC),
    spec!(names::BLOCK, map_type::HASH, Addr, BlockEntry, BLOCK_ENTRIES, MAP_F_NO_PREALLOC),
    spec!(names::PORT_RULES, map_type::HASH, PortKey, PortRules, 4 * 65_536, MAP_F_NO_PREALLOC),
    spec!(names::RULES, map_type::ARRAY, u32, RuleConfig, 2 * MAX_RULES, 0),
    spec!(names::SHARED_BUCKETS, map_type::HASH, SharedBucketKey, Bucket, SHARED_BUCKET_ENTRIES, 0),
    spec!(names::SOURCE_BUCKETS, map_type::LRU_HASH, SourceBucketKey, Bucket, DEFAULT_SOURCE_ENTRIES, 0),
    spec!(names::STATS, map_type::PERCPU_ARRAY, u32, Counter, STATS_ENTRIES, 0),
    spec!(names::RULE_STATS, map_type::PERCPU_ARRAY, u32, RuleCounter, MAX_RULES, 0),
    spec!(names::DROPPED_SOURCES, map_type::LRU_PERCPU_HASH, Addr, Counter, DROPPED_SOURCE_ENTRIES, 0),
    // Admitted tokens of global per-source rules: the agent reports their growth to Redis.
    spec!(names::GLOBAL_SOURCE_COUNTS, map_type::LRU_PERCPU_HASH, SourceBucketKey, u64, GLOBAL_SOURCE_ENTRIES, 0),
    // Kept across a restart so the later fragments of a datagram in flight are still judged
    // by the rules of the port its first fragment carried.
    spec!(names::FRAGMENTS, map_type::LRU_HASH, FragmentKey, FragmentEntry, FRAGMENT_ENTRIES, 0),
    // The SYN proxy's ports and counters; its tail-call table is shared so that entries
    // survive the agent (a program array is emptied when its last user reference goes).
    spec!(synproxy::names::SYNPROXY_PORTS, map_type::HASH, PortKey, SynproxyPort, 4 * 65_536, MAP_F_NO_PREALLOC),
    spec!(synproxy::names::SYNPROXY_METERS, map_type::ARRAY, u32, Bucket, 65_536, 0),
    spec!(synproxy::names::SYNPROXY_STATS, map_type::PERCPU_ARRAY, u32, Counter, synproxy::event::COUNT, 0),
    spec!(synproxy::names::PROGRAMS, map_type::PROG_ARRAY, u32, u32, synproxy::PROGRAMS_ENTRIES, 0),
];

/// The layout stamp of this build: see the module documentation.
pub const LAYOUT_STAMP: u64 = stamp(SHARED_MAPS, LAYOUT_REVISION);

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

const fn fnv_bytes(mut h: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(FNV_PRIME);
        i += 1;
    }
    h
}

const fn fnv_u32(h: u64, v: u32) -> u64 {
    fnv_bytes(h, &v.to_le_bytes())
}

/// FNV-1a over the revision and every field of every spec, in order.
pub const fn stamp(maps: &[MapSpec], revision: u32) -> u64 {
    let mut h = fnv_u32(FNV_OFFSET, revision);
    let mut i = 0;
    while i < maps.len() {
        let m = &maps[i];
        h = fnv_bytes(h, m.name.as_bytes());
        h = fnv_bytes(h, &[0]);
        h = fnv_u32(h, m.map_type);
        h = fnv_u32(h, m.key_size);
        h = fnv_u32(h, m.key_align);
        h = fnv_u32(h, m.value_size);
        h = fnv_u32(h, m.value_align);
        h = fnv_u32(h, m.max_entries);
        h = fnv_u32(h, m.flags);
        i += 1;
    }
    h
}

/// The spec of the shared map called `name`.
pub fn shared_map(name: &str) -> Option<&'static MapSpec> {
    SHARED_MAPS.iter().find(|m| m.name == name)
}

const _: () = assert!(size_of::<LpmKey<ListKey>>() == 24);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_moves_with_any_size_capacity_name_or_revision() {
        let base = stamp(SHARED_MAPS, LAYOUT_REVISION);
        assert_eq!(base, LAYOUT_STAMP);
        assert_ne!(stamp(SHARED_MAPS, LAYOUT_REVISION + 1), base);
        let mut maps = [SHARED_MAPS[0]; 1];
        let one = stamp(&maps, 1);
        maps[0].value_size += 8;
        assert_ne!(stamp(&maps, 1), one);
        maps[0] = SHARED_MAPS[0];
        maps[0].max_entries += 1;
        assert_ne!(stamp(&maps, 1), one);
        maps[0] = SHARED_MAPS[0];
        maps[0].name = "CONFIG2";
        assert_ne!(stamp(&maps, 1), one);
    }

    #[test]
    fn every_shared_map_is_listed_once() {
        for (i, m) in SHARED_MAPS.iter().enumerate() {
            assert!(SHARED_MAPS[i + 1..].iter().all(|o| o.name != m.name), "{} listed twice", m.name);
        }
    }
}
