//! Running frames through the real program and comparing what it did with the oracle and
//! the verdict model.

use limiter_agent::dataplane::{Dataplane, LoadOptions, Stats};
use limiter_common::{PARSE_KIND_IP, PARSE_KIND_NOT_IP, PARSE_KIND_UNPARSED, ParseRecord, XDP_DROP, XDP_PASS, reason};

use super::model::{self, Expect};
use super::oracle::{L4, Reading};

/// What the program did with one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Got {
    pub verdict: u32,
    /// Names of the verdict reasons whose counters moved (exactly one when all is well).
    pub reasons: Vec<&'static str>,
    /// Rules whose dropped counter moved.
    pub refused_by: Vec<String>,
    /// Rules whose passed counter moved.
    pub passed: Vec<String>,
    pub later_judged: bool,
    pub record: Option<ParseRecord>,
}

/// The program under test, loaded with the fuzz policy and drained buckets.
pub struct Program {
    dp: Dataplane,
    /// Counters and parse records after the last frame: the next frame's "before", so each
    /// frame costs one read of each.
    stats: Stats,
    records_seen: Vec<ParseRecord>,
    /// Whether the program writes `PARSE_RECORD` (false only for programs older than it).
    pub records: bool,
}

impl Program {
    pub fn load() -> anyhow::Result<Self> {
        // A small per-source table: the fuzz policy's per-source rules never run out, so
        // evictions cannot change a verdict, and a small table loads fast.
        let options = LoadOptions { source_entries: 4096, record_parse: true, ..Default::default() };
        let mut dp = Dataplane::load(options)?;
        dp.apply(&model::plan())?;
        for frame in model::drain_frames() {
            let first = dp.test_run(&frame)?;
            let second = dp.test_run(&frame)?;
            anyhow::ensure!(
                (first, second) == (XDP_PASS, XDP_DROP),
                "draining a 1-per-hour bucket: verdicts {first} then {second}, expected pass then drop"
            );
        }
        let (_, record) = dp.test_run_recorded(&model::drain_frames()[0])?;
        Ok(Program { stats: dp.stats()?, records_seen: dp.parse_records()?, dp, records: record.is_some() })
    }

    /// Empties the program's fragment table (the model forgets its own at the same time).
    pub fn forget_fragments(&mut self) -> anyhow::Result<()> {
        self.dp.clear_fragments()?;
        Ok(())
    }

    pub fn run(&mut self, frame: &[u8]) -> anyhow::Result<Got> {
        let verdict = self.dp.test_run(frame)?;
        let stats = self.dp.stats()?;
        let records = self.dp.parse_records()?;
        // The slot of the CPU that ran the frame is the one whose sequence number moved.
        let record = records.iter().zip(&self.records_seen).find(|(a, b)| a.seq != b.seq).map(|(a, _)| *a);
        let got = got(verdict, record, &self.stats, &stats);
        self.stats = stats;
        self.records_seen = records;
        Ok(got)
    }
}

fn got(verdict: u32, record: Option<ParseRecord>, before: &Stats, after: &Stats) -> Got {
    let reasons = (0..reason::VERDICT_REASONS)
        .filter(|&r| after.reason(r).packets != before.reason(r).packets)
        .map(reason::name)
        .collect();
    let moved = |pick: fn(&limiter_common::RuleCounter) -> u64| -> Vec<String> {
        after
            .rules
            .iter()
            .filter(|(name, c)| before.rules.get(*name).map_or(0, pick) != pick(c))
            .map(|(name, _)| name.clone())
            .collect()
    };
    Got {
        verdict,
        reasons,
        refused_by: moved(|c| c.dropped.packets),
        passed: moved(|c| c.passed.packets),
        later_judged: after.reason(reason::EVENT_NON_FIRST_FRAGMENT).packets
            != before.reason(reason::EVENT_NON_FIRST_FRAGMENT).packets,
        record,
    }
}

/// Every way `got` differs from `expect` and `reading`; empty when they agree.
pub fn compare(reading: &Reading, expect: &Expect, got: &Got, records: bool) -> Vec<String> {
    let mut diffs = Vec::new();
    let verdict = if expect.drop { XDP_DROP } else { XDP_PASS };
    if got.verdict != verdict {
        diffs.push(format!("verdict {} (expected {})", name(got.verdict), name(verdict)));
    }
    if got.reasons != [expect.reason] {
        diffs.push(format!("counted as {:?} (expected [{:?}])", got.reasons, expect.reason));
    }
    if got.later_judged != expect.later_judged {
        diffs.push(format!("non_first_fragment event {} (expected {})", got.later_judged, expect.later_judged));
    }
    if expect.reason == "shared_bucket" {
        if got.refused_by.len() != 1 || !expect.refused_by.iter().any(|r| *r == got.refused_by[0]) {
            diffs.push(format!("refused by {:?} (expected one of {:?})", got.refused_by, expect.refused_by));
        }
    } else if !got.refused_by.is_empty() {
        diffs.push(format!("refused by {:?} (expected no rule)", got.refused_by));
    }
    // On a drop, rules that ran before the refusing one counted a pass (then were refunded):
    // that depends on the program's rule order, so passes are compared on passes only.
    if !expect.drop {
        let mut want: Vec<String> = expect.passed.iter().map(|s| s.to_string()).collect();
        want.sort();
        if got.passed != want {
            diffs.push(format!("counted by rules {:?} (expected {want:?})", got.passed));
        }
    }
    if records {
        match &got.record {
            None => diffs.push("no PARSE_RECORD written".into()),
            Some(r) => diffs.extend(compare_record(reading, r)),
        }
    }
    diffs
}

fn compare_record(reading: &Reading, r: &ParseRecord) -> Vec<String> {
    let mut diffs = Vec::new();
    let ip = match reading {
        Reading::NotIp | Reading::Unparsed => {
            let kind = if *reading == Reading::NotIp { PARSE_KIND_NOT_IP } else { PARSE_KIND_UNPARSED };
            if r.kind != kind {
                diffs.push(format!("record kind {} (expected {})", r.kind, kind));
            }
            return diffs;
        }
        Reading::Ip(ip) => ip,
    };
    if r.kind != PARSE_KIND_IP {
        diffs.push(format!("record kind {} (expected {PARSE_KIND_IP}: a source)", r.kind));
        return diffs;
    }
    let mut field = |what: &str, got: String, want: String| {
        if got != want {
            diffs.push(format!("record {what} {got} (expected {want})"));
        }
    };
    field("source", super::addr_string(&r.src), super::addr_string(&ip.src));
    field("IP version", r.ip_version.to_string(), ip.version.to_string());
    field("fragment", r.fragment.to_string(), (ip.fragment as u8).to_string());
    field("l4", r.l4.to_string(), (ip.l4 as u8).to_string());
    // Where a chain cannot be followed, the header the walk stopped at is the program's
    // business (the next header it could not read, or the one past the bound).
    if ip.l4 != L4::Chain {
        field("protocol", r.protocol.to_string(), ip.protocol.to_string());
    }
    let port = (r.has_port != 0).then_some(r.dst_port);
    field("dst port", format!("{port:?}"), format!("{:?}", ip.dst_port));
    diffs
}

fn name(verdict: u32) -> &'static str {
    match verdict {
        XDP_PASS => "pass",
        XDP_DROP => "drop",
        _ => "other",
    }
}
