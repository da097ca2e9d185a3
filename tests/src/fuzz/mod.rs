//! Differential fuzzing of the XDP program against an independent parser.
//!
//! [`frames`] builds frames of every shape the program's parser knows and mutates them;
//! [`oracle`] reads each with the `etherparse` crate, saying what a correct data path must
//! see (source, protocol, destination port, fragment kind); [`model`] turns that reading into
//! the verdict the README's table gives under a fixed policy; [`check`] runs the frame through
//! the real program with `BPF_PROG_TEST_RUN` and compares verdict, reason counter, rule
//! counters and the program's own `PARSE_RECORD` with both.
//!
//! Used by `tests/tests/fuzz.rs` (a bounded count in CI) and by `limiter-fuzz`, which
//! `cargo xtask fuzz` runs for millions of frames and summarises in `bench/FUZZ.md`.

pub mod check;
pub mod frames;
pub mod model;
pub mod oracle;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use limiter_common::Addr;

use check::{Got, Program};
use frames::{Frame, Generator};
use model::{Expect, Model};
use oracle::Reading;

/// Frames judged between two clearings of the fragment table (program and model at once):
/// it keeps the table far below its capacity, so the kernel's LRU never evicts what the model
/// keeps. The program itself is loaded once (the verifier takes seconds); its drained buckets
/// stay drained and its unlimited ones never run out.
pub const CLEAR_FRAGMENTS_EVERY: u64 = 4096;

#[derive(Clone, Debug)]
pub struct Options {
    pub frames: u64,
    pub seed: u64,
    /// Disagreements kept in full (all are counted).
    pub keep: usize,
}

/// One frame where the program and the oracle disagree.
#[derive(Clone, Debug)]
pub struct Disagreement {
    pub index: u64,
    pub frame: Vec<u8>,
    pub shape: frames::Shape,
    pub reading: Reading,
    pub expect: Expect,
    pub got: Got,
    pub diffs: Vec<String>,
}

impl std::fmt::Display for Disagreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "frame #{} ({} bytes), shape {:?}", self.index, self.frame.len(), self.shape)?;
        writeln!(f, "  hex: {}", hex(&self.frame))?;
        writeln!(f, "  etherparse: {}", oracle::describe(&self.reading))?;
        writeln!(f, "  expected: {} ({})", if self.expect.drop { "drop" } else { "pass" }, self.expect.reason)?;
        writeln!(
            f,
            "  program: verdict {} counted as {:?}, record {:?}",
            self.got.verdict, self.got.reasons, self.got.record
        )?;
        for d in &self.diffs {
            writeln!(f, "  - {d}")?;
        }
        Ok(())
    }
}

/// Counts of one run.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub frames: u64,
    pub seed: u64,
    pub elapsed: Duration,
    /// (dimension, label) → frames.
    pub shapes: BTreeMap<(&'static str, &'static str), u64>,
    /// What etherparse read, by kind.
    pub readings: BTreeMap<String, u64>,
    /// Expected verdict reasons.
    pub reasons: BTreeMap<&'static str, u64>,
    pub disagreements: u64,
    /// Disagreements by shape label (every dimension), to see which shapes fail.
    pub failing_shapes: BTreeMap<(&'static str, &'static str), u64>,
    /// Disagreements by the first thing that differed.
    pub failing_kinds: BTreeMap<String, u64>,
    pub kept: Vec<Disagreement>,
    /// Whether the program wrote parse records (older programs do not).
    pub records: bool,
    /// Times the fragment tables were emptied.
    pub clears: u64,
}

fn dims(s: &frames::Shape) -> [(&'static str, &'static str); 5] {
    [("link", s.link), ("l3", s.l3), ("fragment", s.fragment), ("l4", s.l4), ("mutation", s.mutation)]
}

fn reading_kind(r: &Reading) -> String {
    match r {
        Reading::NotIp => "not IP".into(),
        Reading::Unparsed => "unparsed".into(),
        Reading::Ip(ip) => format!("IPv{}, l4 {:?}, fragment {:?}", ip.version, ip.l4, ip.fragment),
    }
}

/// Runs `opts.frames` frames from `opts.seed` through the real program.
pub fn run(opts: &Options, mut progress: impl FnMut(&Summary)) -> anyhow::Result<Summary> {
    let start = Instant::now();
    let mut summary = Summary { seed: opts.seed, ..Default::default() };
    let mut model = Model::new();
    let mut program: Option<Program> = None;
    for (index, Frame { bytes, shape }) in Generator::new(opts.seed).take(opts.frames as usize).enumerate() {
        let index = index as u64;
        let p = match program.as_mut() {
            Some(p) => p,
            None => {
                let p = Program::load()?;
                summary.records = p.records;
                program.insert(p)
            }
        };
        if index.is_multiple_of(CLEAR_FRAGMENTS_EVERY) {
            p.forget_fragments()?;
            model.reset();
            summary.clears += 1;
        }
        let reading = oracle::read(&bytes);
        let expect = model.expect(&reading);
        let got = p.run(&bytes)?;
        let diffs = check::compare(&reading, &expect, &got, p.records);

        summary.frames += 1;
        for d in dims(&shape) {
            *summary.shapes.entry(d).or_default() += 1;
        }
        *summary.readings.entry(reading_kind(&reading)).or_default() += 1;
        *summary.reasons.entry(expect.reason).or_default() += 1;
        if !diffs.is_empty() {
            summary.disagreements += 1;
            for d in dims(&shape) {
                *summary.failing_shapes.entry(d).or_default() += 1;
            }
            let kind = diffs[0].split(" (").next().unwrap_or_default().to_string();
            *summary.failing_kinds.entry(kind).or_default() += 1;
            if summary.kept.len() < opts.keep {
                summary.kept.push(Disagreement { index, frame: bytes, shape, reading, expect, got, diffs });
            }
        }
        if index % 100_000 == 99_999 {
            summary.elapsed = start.elapsed();
            progress(&summary);
        }
    }
    drop(program);
    summary.elapsed = start.elapsed();
    Ok(summary)
}

impl Summary {
    /// The Markdown summary that `cargo xtask fuzz` writes (README quotes its head).
    pub fn markdown(&self, command: &str) -> String {
        let mut s = String::new();
        let rate = self.frames as f64 / self.elapsed.as_secs_f64().max(1e-9);
        let _ = writeln!(s, "# Differential fuzzing: the XDP program against etherparse\n");
        let _ = writeln!(s, "Written by `{command}`.\n");
        let _ = writeln!(s, "| frames | seed | disagreements | time | frames/s |");
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            s,
            "| {} | {} | **{}** | {:.1} s | {:.0} |\n",
            self.frames,
            self.seed,
            self.disagreements,
            self.elapsed.as_secs_f64(),
            rate,
        );
        let _ = writeln!(
            s,
            "Each frame ran once through the real program (`BPF_PROG_TEST_RUN`); its verdict, \
             verdict reason, rule counters and parse record{} were compared with what etherparse \
             read and the README's verdict table says.\n",
            if self.records { "" } else { " (not available in this program)" }
        );
        let _ = writeln!(s, "## Shapes generated\n");
        let _ = writeln!(s, "| dimension | shape | frames | disagreements |");
        let _ = writeln!(s, "|---|---|---:|---:|");
        for (k, n) in &self.shapes {
            let bad = self.failing_shapes.get(k).copied().unwrap_or(0);
            let _ = writeln!(s, "| {} | {} | {} | {} |", k.0, k.1, n, bad);
        }
        let _ = writeln!(s, "\n## What etherparse read\n");
        let _ = writeln!(s, "| reading | frames |");
        let _ = writeln!(s, "|---|---:|");
        for (k, n) in &self.readings {
            let _ = writeln!(s, "| {k} | {n} |");
        }
        let _ = writeln!(s, "\n## Expected verdict reasons\n");
        let _ = writeln!(s, "| reason | frames |");
        let _ = writeln!(s, "|---|---:|");
        for (k, n) in &self.reasons {
            let _ = writeln!(s, "| {k} | {n} |");
        }
        if self.disagreements > 0 {
            let _ = writeln!(s, "\n## Disagreements by first difference\n");
            let _ = writeln!(s, "| difference | frames |");
            let _ = writeln!(s, "|---|---:|");
            for (k, n) in &self.failing_kinds {
                let _ = writeln!(s, "| {k} | {n} |");
            }
            let _ = writeln!(s, "\n## First disagreements\n\n```");
            for d in &self.kept {
                let _ = writeln!(s, "{d}");
            }
            let _ = writeln!(s, "```");
        }
        s
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn addr_string(a: &Addr) -> String {
    match model::to_ip(a) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => v6.to_string(),
    }
}
