//! Thin wrappers over the few kernel interfaces the bench reads directly: the `bpf(2)`
//! syscall (to load the trivial baseline program and run it through `BPF_PROG_TEST_RUN`),
//! `/proc/<pid>/fdinfo` of BPF map fds (kernel memory), `/proc/stat` (softirq time), thread
//! CPU time and CPU affinity.

use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`; the kernel requires
/// every byte past the fields it knows to be zero, which `Default` guarantees.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_PROG_TEST_RUN` (the `test` member).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised repr(C) bpf_attr prefix and its size is passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// The smallest XDP program: `r0 = XDP_PASS; exit`. Built from raw instructions, so the
/// baseline needs no toolchain and has nothing in it but the kernel's own per-run overhead.
pub struct TrivialXdp {
    fd: OwnedFd,
}

impl TrivialXdp {
    pub fn load() -> Result<Self> {
        // struct bpf_insn: u8 code, u8 dst:4|src:4, i16 off, i32 imm (little endian).
        let insns: [u64; 2] = [
            // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 2 (XDP_PASS)
            0xb7 | (2u64 << 32),
            // BPF_JMP | BPF_EXIT
            0x95,
        ];
        let license = b"GPL\0";
        let mut name = [0u8; 16];
        name[..11].copy_from_slice(b"trivial_xdp");
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            ..Default::default()
        };
        let fd = bpf(BPF_PROG_LOAD, &mut attr).context("BPF_PROG_LOAD of the trivial XDP program (are you root?)")?;
        // SAFETY: the kernel returned a new fd that nobody else owns.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd as i32) } })
    }

    /// Runs the program `repeat` times on `frame`; returns (verdict, kernel mean ns per run).
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let mut attr = TestRunAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat,
            ..Default::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN of the trivial XDP program")?;
        Ok((attr.retval, Duration::from_nanos(u64::from(attr.duration))))
    }
}

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
