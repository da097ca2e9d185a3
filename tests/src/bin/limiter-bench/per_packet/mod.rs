//! Per-packet cost through `BPF_PROG_TEST_RUN`, over many sources, against a trivial XDP
//! program (the floor) and Debian's `xdp-filter` (a real peer), all in one run.
//!
//! One `BPF_PROG_TEST_RUN` call repeats one frame, so on its own it would time one cache-hot
//! bucket. Every figure here is therefore taken behind a harness ([`crate::bpf::Cycler`]) that
//! gives each run its own source address (`K` distinct sources, cycled) and tail-calls the
//! program under test. The same harness in front of the trivial program is timed back to
//! back, and its cost minus the trivial program's own is subtracted, so a figure is the cost
//! of the program under test alone:
//!
//! `cost = CPU(harness -> program) - CPU(harness -> trivial) + CPU(trivial)`
//!
//! Every measured call is checked: the verdict, and the program's own counters must show the
//! intended path for every one of the runs.
//!
//! Groups: the checks over 1 / 10,000 / 1,000,000 sources (`checks`), allow and deny lists of
//! 1 / 1,000 / 100,000 exact hosts or prefixes (`lists`), the new-source path with the
//! per-source table full (`new_source`), xdp-filter's matched and unmatched paths on the same
//! frames (`peer`), and one shared bucket hit from both CPUs at once (`two_cpus`).

mod cpus;
mod limiter;
mod peer;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use limiter_agent::dataplane::Dataplane;
use limiter_agent::plan::{CountKind, KernelRule, Limit, PortTarget, Protocol, SourceSelector, Unit};
use limiter_common::XDP_PASS;
use limiter_tests::packet::Packet;
use serde_json::{Value, json};

use crate::bpf::{Cycler, TrivialXdp};
use crate::sys::thread_cpu_time;
use crate::{Config, median};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);
const FILLER_PORT: u16 = 7000;
/// The measured frames' destination port.
pub const PORT: u16 = 9000;

/// Which sources the harness cycles through: `base + (i mod count) * stride`.
#[derive(Clone, Copy, Debug)]
pub struct Sources {
    pub base: Ipv4Addr,
    pub count: u32,
    pub stride: u32,
}

impl Sources {
    pub fn new(base: Ipv4Addr, count: u32) -> Self {
        Self { base, count, stride: 1 }
    }
    pub fn nth(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base).wrapping_add(i.wrapping_mul(self.stride)))
    }
}

/// A 64-byte UDP frame to [`PORT`] (its source is rewritten by the harness).
pub fn frame(src: Ipv4Addr, port: u16) -> Vec<u8> {
    Packet::eth().ipv4(src, SERVER).udp(40000, port).payload(&[0u8; 18]).build()
}

/// Runs `test_run` with `repeat` and with `2 * repeat`; returns the verdict, the kernel's
/// mean duration of the longer call, and the CPU time per run of the difference between the
/// two calls, which cancels the fixed cost of a `BPF_PROG_TEST_RUN` call (for XDP with a
/// repeat above 1 the kernel flips a static key around the loop: some 100 µs per call).
fn timed(repeat: u32, mut test_run: impl FnMut(u32) -> Result<(u32, Duration)>) -> Result<(u32, f64, f64)> {
    // A preemption or interrupt inside the shorter call can make the difference meaningless
    // (zero or negative) for a cheap program; such a pair is measured again, at most 5 times.
    for _ in 0..5 {
        let t0 = thread_cpu_time();
        let (v1, _) = test_run(repeat)?;
        let t1 = thread_cpu_time();
        let (v2, dur) = test_run(2 * repeat)?;
        let t2 = thread_cpu_time();
        ensure!(v1 == v2, "verdict changed between runs: {v1} then {v2}");
        let short = (t1 - t0).as_nanos() as f64;
        let long = (t2 - t1).as_nanos() as f64;
        if long > short {
            return Ok((v2, dur.as_nanos() as f64, (long - short) / f64::from(repeat)));
        }
    }
    bail!(
        "CPU time of {} runs was not above that of {repeat} runs five times in a row: the machine is too busy to measure",
        2 * repeat
    )
}

/// What a program under test must show for every run.
pub struct Expect<'a> {
    pub what: String,
    pub verdict: u32,
    /// Runs the program itself counted on the intended path so far.
    pub counted: Box<dyn FnMut() -> Result<u64> + 'a>,
}

/// One figure: medians of the per-run estimates, and the runs.
#[derive(Debug, Default)]
pub struct Measured {
    /// Estimated CPU ns per run of the program alone (see the module doc).
    pub cpu_ns: f64,
    /// The same from the kernel's own (whole-nanosecond) mean durations.
    pub kernel_ns: f64,
    /// CPU ns per run of the trivial program alone.
    pub trivial_cpu_ns: f64,
    /// CPU ns per run the harness adds (harness -> trivial, minus trivial alone).
    pub harness_ns: f64,
    /// `cpu_ns / trivial_cpu_ns`, per run, then the median.
    pub ratio: f64,
    pub cpu_ns_runs: Vec<f64>,
}

impl Measured {
    pub fn json(&self) -> Value {
        json!({
            "cpu_ns": self.cpu_ns,
            "kernel_ns": self.kernel_ns,
            "trivial_cpu_ns": self.trivial_cpu_ns,
            "harness_ns": self.harness_ns,
            "ratio": self.ratio,
            "cpu_ns_runs": self.cpu_ns_runs,
        })
    }
}

/// Times program `target` behind a harness cycling over `sources`, alternating with the same
/// harness in front of `trivial`, and `trivial` alone, `cfg.runs` times. The caller warms up.
pub fn measure(
    cfg: &Config,
    trivial: &TrivialXdp,
    target: &Cycler,
    sources: Sources,
    mut expect: Expect<'_>,
) -> Result<Measured> {
    let floor = Cycler::new(trivial.fd(), sources.base, sources.count, sources.stride)?;
    let f = frame(sources.base, PORT);
    let (mut cpu, mut kernel, mut triv, mut harness, mut ratio) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..cfg.runs {
        let (tv, t_kernel, t_cpu) = timed(cfg.repeat, |n| trivial.test_run(&f, n))?;
        ensure!(tv == XDP_PASS, "the trivial program returned {tv}");
        let (fv, f_kernel, f_cpu) = timed(cfg.repeat, |n| floor.test_run(&f, n))?;
        ensure!(fv == XDP_PASS, "the harness in front of the trivial program returned {fv}");
        let before = (expect.counted)()?;
        let (v, kernel_ns, cpu_ns) = timed(cfg.repeat, |n| target.test_run(&f, n))?;
        let counted = (expect.counted)()? - before;
        if v != expect.verdict || counted == 0 || counted % (3 * u64::from(cfg.repeat)) != 0 {
            bail!(
                "{}: expected verdict {} for all {} runs of a measurement, got verdict {v} and {counted} runs on that path",
                expect.what,
                expect.verdict,
                3 * cfg.repeat,
            );
        }
        let one = cpu_ns - f_cpu + t_cpu;
        cpu.push(one);
        kernel.push(kernel_ns - f_kernel + t_kernel);
        triv.push(t_cpu);
        harness.push(f_cpu - t_cpu);
        ratio.push(one / t_cpu);
    }
    Ok(Measured {
        cpu_ns: median(&cpu),
        kernel_ns: median(&kernel),
        trivial_cpu_ns: median(&triv),
        harness_ns: median(&harness),
        ratio: median(&ratio),
        cpu_ns_runs: cpu,
    })
}

/// Warms a program up behind its harness: `runs` runs starting at source 0, then the counter
/// is put back to 0 so the measurement starts where the warm-up did.
pub fn warm_up(target: &Cycler, runs: u32) -> Result<()> {
    let f = frame(Ipv4Addr::UNSPECIFIED, PORT);
    target.set_next(0)?;
    let mut left = runs;
    while left > 0 {
        let n = left.min(1 << 20);
        target.test_run(&f, n).context("warming up")?;
        left -= n;
    }
    target.set_next(0)
}

/// Never exhausted: one token per nanosecond, and a burst far beyond any run.
pub fn unlimited() -> Limit {
    Limit { requests: 1_000_000_000, unit: Unit::Second, burst: 1_000_000_000_000 }
}

/// A bucket per source and port on UDP 7000 that is never exhausted: what the memory
/// section fills the per-source table with.
pub fn filler_rule() -> KernelRule {
    KernelRule {
        name: "bench/filler".into(),
        targets: vec![PortTarget { port: FILLER_PORT, protocol: Protocol::Udp }],
        source: SourceSelector::everyone(true),
        count: CountKind::Packets,
        limit: unlimited(),
        shadow: false,
        global: false,
    }
}

/// Runs one frame per filler source through the program behind a harness, so `count`
/// (rule, source, port) entries exist in the per-source table. Sources are 10.0.0.1 upwards.
pub fn populate(dp: &mut Dataplane, count: u32) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let cycler = Cycler::new(dp.program_fd()?, Ipv4Addr::new(10, 0, 0, 1), count, 1)?;
    let f = frame(Ipv4Addr::new(10, 0, 0, 1), FILLER_PORT);
    let (verdict, _) = cycler.test_run(&f, count).context("populating the per-source table")?;
    ensure!(verdict == XDP_PASS, "a filler packet was dropped");
    Ok(())
}

pub fn run(cfg: &Config, trivial: &TrivialXdp) -> Result<Value> {
    let checks = limiter::checks(cfg, trivial)?;
    let lists = limiter::lists(cfg, trivial)?;
    let new_source = limiter::new_source(cfg, trivial)?;
    let peer = peer::run(cfg, trivial)?;
    let two_cpus = cpus::run(cfg)?;
    Ok(json!({
        "repeat": cfg.repeat,
        "runs": cfg.runs,
        "rows": checks,
        "lists": lists,
        "new_source": new_source,
        "peer": peer,
        "two_cpus": two_cpus,
    }))
}
