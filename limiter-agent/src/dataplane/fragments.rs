//! The fragment table (`FRAGMENTS`) from userspace: only emptied, by tests and the fuzzer,
//! which need a known state without paying for a program reload (the verifier takes seconds).

use aya::maps::HashMap;
use limiter_common::{FragmentEntry, FragmentKey, names};

use super::{Dataplane, DataplaneError, Result, map_err};

impl Dataplane {
    /// Forgets every fragmented datagram the program remembers; returns how many there were.
    pub fn clear_fragments(&mut self) -> Result<usize> {
        let map = self.ebpf.map_mut(names::FRAGMENTS).ok_or(DataplaneError::MissingMap { name: names::FRAGMENTS })?;
        // An LRU hash in the kernel; aya's `HashMap` serves both kinds.
        let mut table: HashMap<_, FragmentKey, FragmentEntry> =
            HashMap::try_from(map).map_err(map_err(names::FRAGMENTS, "opening"))?;
        let keys: Vec<FragmentKey> = table.keys().filter_map(|k| k.ok()).collect();
        for k in &keys {
            // Gone already (evicted meanwhile) is as good as removed.
            let _ = table.remove(k);
        }
        Ok(keys.len())
    }
}
