//! Thin wrappers over the few kernel interfaces the bench reads directly (besides `bpf(2)`,
//! in `bpf.rs`): `/proc/<pid>/fdinfo` of BPF map fds (kernel memory), scheduler run times,
//! thread CPU time and CPU affinity.

use std::io;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

/// One BPF map fd of this process as `/proc/self/fdinfo` describes it.
#[derive(Clone, Debug, Default)]
pub struct MapFdInfo {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u64,
    pub memlock: u64,
    pub map_id: u32,
}

/// Every BPF map fd this process holds (deduplicated by map id).
pub fn own_maps() -> Result<Vec<MapFdInfo>> {
    let mut out: Vec<MapFdInfo> = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fdinfo").context("reading /proc/self/fdinfo")? {
        let Ok(entry) = entry else { continue };
        // An fd may close between readdir and read: skip it.
        let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
        if !text.contains("map_type:") {
            continue;
        }
        let mut info = MapFdInfo::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once(':') else { continue };
            let v = v.trim();
            match k {
                "map_type" => info.map_type = v.parse().unwrap_or_default(),
                "key_size" => info.key_size = v.parse().unwrap_or_default(),
                "value_size" => info.value_size = v.parse().unwrap_or_default(),
                "max_entries" => info.max_entries = v.parse().unwrap_or_default(),
                "map_flags" => info.map_flags = u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or_default(),
                "memlock" => info.memlock = v.parse().unwrap_or_default(),
                "map_id" => info.map_id = v.parse().unwrap_or_default(),
                _ => {}
            }
        }
        if !out.iter().any(|m| m.map_id == info.map_id) {
            out.push(info);
        }
    }
    Ok(out)
}

/// Total run time of every `ksoftirqd/N` kernel thread, in nanoseconds, from
/// `/proc/<pid>/schedstat` (the scheduler's exact count, not tick-sampled).
pub fn ksoftirqd_ns() -> Result<u64> {
    let mut total = 0;
    let mut found = 0;
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else { continue };
        if !comm.starts_with("ksoftirqd/") {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("schedstat")) else { continue };
        total += stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        found += 1;
    }
    if found == 0 {
        bail!("no ksoftirqd threads in /proc (is /proc/<pid>/schedstat available?)");
    }
    Ok(total)
}

/// CPU time (user + system) the calling thread has used.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    pin_thread_to_cpu(0, cpu)
}

/// Pins thread `tid` (0: the calling thread) to one CPU.
pub fn pin_thread_to_cpu(tid: i32, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!("cannot pin to CPU {cpu}: {}", io::Error::last_os_error());
    }
    Ok(())
}

/// Run time of thread `tid` of this process, in nanoseconds, from
/// `/proc/self/task/TID/schedstat` (the scheduler's exact count, readable from any thread);
/// `None` if the thread is gone.
pub fn thread_run_ns(tid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

/// Kernel release, CPU model and online CPUs, for the report header.
pub fn machine() -> serde_json::Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .unwrap_or(0);
    serde_json::json!({ "kernel": kernel, "cpu_model": model, "cores": cores, "memory_kib": mem })
}
