//! Kernel memory per tracked source: the `memlock:` figure the kernel reports for the
//! per-source bucket table (`/proc/self/fdinfo/<map fd>`, the same number `bpftool map show`
//! prints), read at several occupancies and capacities.
//!
//! The table is an LRU hash, which the kernel always preallocates (`BPF_F_NO_PREALLOC` is
//! refused for LRU maps), so its memory is fixed by its capacity at load time and does not
//! grow with the number of sources; the bench shows that by reading it empty and filled.

use anyhow::{Context as _, Result};
use limiter_agent::dataplane::{Dataplane, LoadOptions};
use limiter_agent::plan::KernelPlan;
use serde_json::{Value, json};

use crate::sys::{MapFdInfo, own_maps};
use crate::{Config, median, per_packet};

const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// The per-source bucket table: the only LRU hash with its key and value.
fn source_table(maps: &[MapFdInfo]) -> Result<&MapFdInfo> {
    let (key, value) = (size_of::<limiter_common::SourceBucketKey>(), size_of::<limiter_common::Bucket>());
    maps.iter()
        .find(|m| m.map_type == BPF_MAP_TYPE_LRU_HASH && m.key_size as usize == key && m.value_size as usize == value)
        .context("the per-source bucket table is not among this process's BPF map fds")
}

pub fn run(cfg: &Config) -> Result<Value> {
    let default_capacity = limiter_common::DEFAULT_SOURCE_ENTRIES;
    let small_capacity = if cfg.smoke { 4_096 } else { 65_536 };
    let mut rows = Vec::new();
    let mut program_total = Vec::new();
    for capacity in [small_capacity, default_capacity] {
        for &occupancy in cfg.memory_occupancies.iter().filter(|&&o| o <= capacity) {
            let mut memlock = Vec::new();
            for _ in 0..cfg.runs {
                let mut dp = Dataplane::load(LoadOptions { source_entries: capacity, ..Default::default() })
                    .context("loading the XDP program")?;
                dp.apply(&KernelPlan { rules: vec![per_packet::filler_rule()], ..Default::default() })?;
                per_packet::populate(&mut dp, occupancy)?;
                let maps = own_maps()?;
                let table = source_table(&maps)?;
                memlock.push(table.memlock as f64);
                if capacity == default_capacity && occupancy == cfg.memory_occupancies[0] {
                    program_total.push(maps.iter().map(|m| m.memlock as f64).sum::<f64>());
                }
                drop(dp);
            }
            let bytes = median(&memlock);
            eprintln!(
                "memory: capacity {capacity:>9}, occupancy {occupancy:>9}: {bytes} bytes memlock, {:.1} bytes per slot",
                bytes / f64::from(capacity)
            );
            rows.push(json!({
                "capacity": capacity,
                "occupancy": occupancy,
                "memlock_bytes": bytes,
                "bytes_per_slot": bytes / f64::from(capacity),
            }));
        }
    }
    let total = median(&program_total);
    eprintln!("memory: every map of a loaded program at default sizes: {total} bytes");
    Ok(json!({
        "rows": rows,
        "program_total_bytes": total,
        "default_capacity": default_capacity,
    }))
}
