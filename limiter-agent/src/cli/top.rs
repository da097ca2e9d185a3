//! `limiter-agent top`: a live view of a running agent, read from its control socket.
//!
//! Rates come from two snapshots: the counter deltas divided by the time between the agent's
//! reads (`time_unix_ms`), not by how long this client slept; the kernel's packets and the
//! rate limit service's answers alike. On a terminal each frame
//! clears the screen and redraws (plain ANSI, works over SSH); piped, frames are printed one
//! after the other.

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::run::parse_duration,
    control::{self, RlsStatus, Snapshot, Verdict},
    metrics::{CODE_OK, CODE_OVER_LIMIT},
};

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// The agent's control socket (`limiter-agent run --control-socket`).
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Time between two snapshots (e.g. 500ms, 1s, 5s).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Print one view (rates over one interval) and exit.
    #[arg(long)]
    pub once: bool,
    /// JSON instead of text: the snapshot plus `rates`, one line per interval.
    #[arg(long)]
    pub json: bool,
}

/// Per-second rates between two snapshots.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Seconds between the two snapshots' counter reads (0: no newer snapshot; rates are 0).
    pub interval_s: f64,
    pub passed: Rate,
    pub dropped: Rate,
    /// Reasons that moved, in index order.
    pub reasons: Vec<ReasonRate>,
    pub rules: Vec<RuleRate>,
    /// Sources of the newer snapshot's top list; `None` when the older one cannot tell
    /// (the source was outside its truncated list).
    pub top_sources: Vec<SourceRate>,
    pub rls: RlsRates,
}

/// The rate limit service's answers per second.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RlsRates {
    /// Descriptors answered OK / OVER_LIMIT, over every rule.
    pub ok_per_s: f64,
    pub over_limit_per_s: f64,
    /// Descriptors shadow rules would have denied.
    pub shadow_over_limit_per_s: f64,
    /// Calls refused with a gRPC error.
    pub request_errors_per_s: f64,
    /// Sources put in the XDP block list.
    pub escalations_per_s: f64,
    /// Every (domain, rule) of the newer snapshot, sorted.
    pub rules: Vec<RlsRuleRate>,
    /// Every refusal reason of the newer snapshot.
    pub request_errors: Vec<RlsErrorRate>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RlsRuleRate {
    pub domain: String,
    /// Empty: descriptors no rule matched.
    pub rule: String,
    pub ok_per_s: f64,
    pub over_limit_per_s: f64,
    pub shadow_over_limit_per_s: f64,
    /// Cumulative OVER_LIMIT answers (from the newer snapshot).
    pub over_limit_total: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RlsErrorRate {
    pub reason: String,
    pub requests_per_s: f64,
}

impl RlsRates {
    /// `secs`: time between the two reads, `None` when the counters are not comparable
    /// (rates are 0).
    fn between(before: &RlsStatus, now: &RlsStatus, secs: Option<f64>) -> Self {
        let per_s = |a: u64, b: u64| secs.map_or(0.0, |secs| b.saturating_sub(a) as f64 / secs);
        let totals = |f: fn(&RlsStatus) -> u64| per_s(f(before), f(now));

        /// (domain, rule) -> [OK, OVER_LIMIT, shadow over limit].
        fn by_rule(r: &RlsStatus) -> BTreeMap<(&str, &str), [u64; 3]> {
            let mut m: BTreeMap<(&str, &str), [u64; 3]> = BTreeMap::new();
            for d in &r.decisions {
                let slot = match d.code.as_str() {
                    CODE_OK => 0,
                    CODE_OVER_LIMIT => 1,
                    _ => continue,
                };
                m.entry((d.domain.as_str(), d.rule.as_str())).or_default()[slot] += d.descriptors;
            }
            for s in &r.shadow_over_limit {
                m.entry((s.domain.as_str(), s.rule.as_str())).or_default()[2] += s.descriptors;
            }
            m
        }
        let (prev, cur) = (by_rule(before), by_rule(now));
        let rules = cur
            .iter()
            .map(|(&(domain, rule), c)| {
                let p = prev.get(&(domain, rule)).copied().unwrap_or_default();
                RlsRuleRate {
                    domain: domain.to_owned(),
                    rule: rule.to_owned(),
                    ok_per_s: per_s(p[0], c[0]),
                    over_limit_per_s: per_s(p[1], c[1]),
                    shadow_over_limit_per_s: per_s(p[2], c[2]),
                    over_limit_total: c[1],
                }
            })
            .collect();
        let request_errors = now
            .request_errors
            .iter()
            .map(|e| {
                let p = before.request_errors.iter().find(|p| p.reason == e.reason).map_or(0, |p| p.requests);
                RlsErrorRate { reason: e.reason.clone(), requests_per_s: per_s(p, e.requests) }
            })
            .collect();
        Self {
            ok_per_s: totals(RlsStatus::ok),
            over_limit_per_s: totals(RlsStatus::over_limit),
            shadow_over_limit_per_s: totals(RlsStatus::shadow_over_limit_total),
            request_errors_per_s: totals(RlsStatus::request_errors_total),
            escalations_per_s: totals(RlsStatus::escalations_total),
            rules,
            request_errors,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Rate {
    pub packets_per_s: f64,
    pub bytes_per_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReasonRate {
    pub reason: String,
    pub verdict: Verdict,
    pub packets_per_s: f64,
    pub bytes_per_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleRate {
    pub name: String,
    pub passed: Rate,
    pub dropped: Rate,
    pub shadow_dropped_packets_per_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SourceRate {
    pub source: IpAddr,
    pub dropped_packets_per_s: Option<f64>,
}

/// What `--json` prints: the newer snapshot with the rates since the older one.
#[derive(Serialize)]
struct JsonView<'a> {
    #[serde(flatten)]
    snapshot: &'a Snapshot,
    rates: &'a Rates,
}

impl Rates {
    pub fn between(before: &Snapshot, now: &Snapshot) -> Self {
        let secs = now.time_unix_ms.saturating_sub(before.time_unix_ms) as f64 / 1000.0;
        // Counters restart with the agent: a fresh agent's counters are not deltas.
        let comparable = secs > 0.0 && now.uptime_s >= before.uptime_s;
        let per_s = |a: u64, b: u64| {
            if comparable { b.saturating_sub(a) as f64 / secs } else { 0.0 }
        };
        let rate = |a: (u64, u64), b: (u64, u64)| Rate { packets_per_s: per_s(a.0, b.0), bytes_per_s: per_s(a.1, b.1) };

        let reasons = now
            .reasons
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let prev = before.reasons.get(i).filter(|p| p.reason == r.reason);
                let (pp, pb) = prev.map_or((0, 0), |p| (p.packets, p.bytes));
                ReasonRate {
                    reason: r.reason.clone(),
                    verdict: r.verdict,
                    packets_per_s: per_s(pp, r.packets),
                    bytes_per_s: per_s(pb, r.bytes),
                }
            })
            .filter(|r| r.packets_per_s > 0.0)
            .collect();
        let prev_rules: BTreeMap<&str, &control::RuleCount> =
            before.rules.iter().map(|r| (r.name.as_str(), r)).collect();
        let rules = now
            .rules
            .iter()
            .map(|r| {
                let p = prev_rules.get(r.name.as_str());
                let p = |f: fn(&control::RuleCount) -> u64| p.map_or(0, |p| f(p));
                RuleRate {
                    name: r.name.clone(),
                    passed: Rate {
                        packets_per_s: per_s(p(|x| x.passed_packets), r.passed_packets),
                        bytes_per_s: per_s(p(|x| x.passed_bytes), r.passed_bytes),
                    },
                    dropped: Rate {
                        packets_per_s: per_s(p(|x| x.dropped_packets), r.dropped_packets),
                        bytes_per_s: per_s(p(|x| x.dropped_bytes), r.dropped_bytes),
                    },
                    shadow_dropped_packets_per_s: per_s(p(|x| x.shadow_dropped_packets), r.shadow_dropped_packets),
                }
            })
            .collect();
        let complete = before.top_sources.len() < control::TOP_SOURCES;
        let top_sources = now
            .top_sources
            .iter()
            .map(|s| {
                let prev = before.top_sources.iter().find(|p| p.source == s.source).map(|p| p.dropped_packets);
                let prev = prev.or(complete.then_some(0));
                SourceRate { source: s.source, dropped_packets_per_s: prev.map(|p| per_s(p, s.dropped_packets)) }
            })
            .collect();
        Self {
            interval_s: if comparable { secs } else { 0.0 },
            passed: rate(before.total(Verdict::Pass), now.total(Verdict::Pass)),
            dropped: rate(before.total(Verdict::Drop), now.total(Verdict::Drop)),
            reasons,
            rules,
            top_sources,
            rls: RlsRates::between(&before.rls, &now.rls, comparable.then_some(secs)),
        }
    }
}

pub fn run(args: TopArgs) -> anyhow::Result<()> {
    let first = control::fetch(&args.socket)?;
    if args.once {
        std::thread::sleep(args.interval);
        let now = fetch_newer(&args.socket, &first)?;
        print_view(&args, &first, &now, false)?;
        return Ok(());
    }
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the tokio runtime")?;
    runtime.block_on(live(args, first))
}

async fn live(args: TopArgs, mut last: Snapshot) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let redraw = !args.json && std::io::stdout().is_terminal();
    // Hides the cursor while redrawing; shows it again however this function ends.
    let _cursor = redraw.then(Cursor::hide);
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => {}
        }
        match control::fetch(&args.socket) {
            Ok(now) => {
                print_view(&args, &last, &now, redraw)?;
                last = now;
            }
            // The agent may be restarting: say so and keep trying.
            Err(e) if args.json => eprintln!("limiter-agent top: {e}"),
            Err(e) => {
                let mut out = std::io::stdout().lock();
                if redraw {
                    write!(out, "\x1b[H\x1b[2J")?;
                }
                writeln!(out, "limiter-agent top: {e}\n(retrying every {:?}; Ctrl-C to quit)", args.interval)?;
                out.flush()?;
            }
        }
    }
    Ok(())
}

struct Cursor;

impl Cursor {
    fn hide() -> Self {
        print!("\x1b[?25l");
        Self
    }
}

impl Drop for Cursor {
    fn drop(&mut self) {
        println!("\x1b[?25h");
        let _ = std::io::stdout().flush();
    }
}

/// Fetches until the agent has published a snapshot newer than `before` (it refreshes about
/// once a second), for at most three seconds.
fn fetch_newer(socket: &Path, before: &Snapshot) -> anyhow::Result<Snapshot> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = control::fetch(socket)?;
        if now.time_unix_ms != before.time_unix_ms || Instant::now() >= deadline {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn print_view(args: &TopArgs, before: &Snapshot, now: &Snapshot, redraw: bool) -> anyhow::Result<()> {
    let rates = Rates::between(before, now);
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&JsonView { snapshot: now, rates: &rates })?)?;
    } else {
        if redraw {
            write!(out, "\x1b[H\x1b[2J")?;
        }
        write!(out, "{}", render(now, &rates, &args.socket))?;
        if !redraw && !args.once {
            writeln!(out)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The text view.
pub fn render(now: &Snapshot, rates: &Rates, socket: &Path) -> String {
    let mut s = String::new();
    let ifaces: Vec<String> = now.interfaces.iter().map(|i| format!("{} ({})", i.name, i.mode)).collect();
    let p = &now.policy;
    s.push_str(&format!(
        "limiter-agent {} on {} | up {} | {}\n",
        now.version,
        if ifaces.is_empty() { "no XDP program (rate limit service only)".to_owned() } else { ifaces.join(", ") },
        duration(now.uptime_s),
        socket.display()
    ));
    if now.has_kernel() {
        s.push_str(&format!(
            "policy: {} rules, {} allow, {} deny | reloads {} applied, {} rejected\n",
            p.rules, p.allow, p.deny, p.reloads_applied, p.reloads_rejected,
        ));
    } else {
        s.push_str(&format!(
            "policy: {} L7 rules | reloads {} applied, {} rejected\n",
            now.rls.l7_rules, p.reloads_applied, p.reloads_rejected,
        ));
    }
    if !p.last_reload_ok {
        s.push_str("LAST RELOAD REJECTED: the previous policy is in force\n");
    }
    if now.has_kernel() {
        render_kernel(&mut s, now, rates);
    }
    render_rls(&mut s, &now.rls, &rates.rls, rates.interval_s);
    s
}

fn render_kernel(s: &mut String, now: &Snapshot, rates: &Rates) {
    let (tp, tb) = now.total(Verdict::Pass);
    let (dp, db) = now.total(Verdict::Drop);
    s.push_str(&format!(
        "\n{:<10} {:>12} {:>12} {:>14} {:>12}\n",
        "", "packets/s", "bytes/s", "total packets", "total bytes"
    ));
    for (label, r, p, b) in [("passed", rates.passed, tp, tb), ("dropped", rates.dropped, dp, db)] {
        s.push_str(&format!(
            "{label:<10} {:>12} {:>12} {:>14} {:>12}\n",
            si(r.packets_per_s),
            bytes(r.bytes_per_s),
            si(p as f64),
            bytes(b as f64)
        ));
    }

    s.push_str(&format!("\nby reason (last {:.1}s)\n", rates.interval_s));
    if rates.reasons.is_empty() {
        s.push_str("  (no packets)\n");
    }
    for r in &rates.reasons {
        s.push_str(&format!(
            "  {:<6} {:<22} {:>10}/s {:>10}/s\n",
            r.verdict.as_str(),
            r.reason,
            si(r.packets_per_s),
            bytes(r.bytes_per_s)
        ));
    }

    s.push_str("\nby rule                                  passed/s   dropped/s  total dropped\n");
    if rates.rules.is_empty() {
        s.push_str("  (no rules)\n");
    }
    for (r, total) in rates.rules.iter().zip(&now.rules) {
        let shadow = if r.shadow_dropped_packets_per_s > 0.0 {
            format!("  (+{}/s shadow)", si(r.shadow_dropped_packets_per_s))
        } else {
            String::new()
        };
        s.push_str(&format!(
            "  {:<36} {:>10} {:>11} {:>14}{shadow}\n",
            truncate(&r.name, 36),
            si(r.passed.packets_per_s),
            si(r.dropped.packets_per_s),
            si(total.dropped_packets as f64)
        ));
    }

    s.push_str("\ntop limited sources                      dropped/s  total dropped\n");
    if now.top_sources.is_empty() {
        s.push_str("  (none)\n");
    }
    for (src, r) in now.top_sources.iter().zip(&rates.top_sources) {
        s.push_str(&format!(
            "  {:<36} {:>10} {:>14}\n",
            src.source.to_string(),
            r.dropped_packets_per_s.map_or_else(|| "?".to_owned(), si),
            si(src.dropped_packets as f64)
        ));
    }

    let t = &now.sources;
    let pct = if t.capacity == 0 { 0.0 } else { t.tracked as f64 * 100.0 / t.capacity as f64 };
    let age = now.time_unix_ms.saturating_sub(t.sampled_at_unix_ms) as f64 / 1000.0;
    s.push_str(&format!(
        "\nsource table: {} of {} tracked ({pct:.1}%), sampled {age:.0}s ago\n",
        t.tracked, t.capacity
    ));
}

/// The rate limit service's part of the view (80 columns).
fn render_rls(s: &mut String, rls: &RlsStatus, rates: &RlsRates, interval_s: f64) {
    let Some(listen) = rls.listen.filter(|_| rls.serving) else {
        s.push_str("\nrate limit service: not serving (--no-rls)\n");
        return;
    };
    s.push_str(&format!(
        "\nrate limit service on {listen} | backend {} | {} L7 rules (last {interval_s:.1}s)\n",
        rls.backend, rls.l7_rules
    ));
    s.push_str(&format!(
        "  descriptors/s: {} ok, {} over limit, {} shadow over limit\n",
        si(rates.ok_per_s),
        si(rates.over_limit_per_s),
        si(rates.shadow_over_limit_per_s)
    ));
    let totals: Vec<String> = rls.request_errors.iter().map(|e| format!("{} {}", e.reason, e.requests)).collect();
    s.push_str(&format!(
        "  refused calls: {}/s{}\n",
        si(rates.request_errors_per_s),
        if totals.is_empty() { String::new() } else { format!(" (total: {})", totals.join(", ")) }
    ));
    if let Some(redis) = &rls.redis {
        s.push_str(&format!(
            "  redis: {} | {} errors, {} answered by {}\n",
            if redis.connected {
                "connected".to_owned()
            } else {
                format!("UNREACHABLE, answering {}", redis.failure_mode)
            },
            redis.errors,
            redis.failure_mode_answers,
            redis.failure_mode
        ));
    }
    let pct = if rls.l7_max_keys == 0 { 0.0 } else { rls.l7_tracked_keys as f64 * 100.0 / rls.l7_max_keys as f64 };
    s.push_str(&format!("  L7 keys: {} of {} tracked ({pct:.1}%)\n", rls.l7_tracked_keys, rls.l7_max_keys));
    if rls.escalation {
        let by: Vec<String> = rls.escalations.iter().map(|e| format!("{} {}", e.policy, e.sources)).collect();
        s.push_str(&format!(
            "  sources escalated to XDP: {}{}; blocked now: {}\n",
            rls.escalations_total(),
            if by.is_empty() { String::new() } else { format!(" ({})", by.join(", ")) },
            rls.blocked_now
        ));
    } else {
        s.push_str("  sources escalated to XDP: off (needs --iface)\n");
    }

    s.push_str(&format!(
        "\n{:<34} {:>8} {:>12} {:>11} {:>9}\n",
        "by L7 rule", "ok/s", "over limit/s", "total over", "shadow/s"
    ));
    if rates.rules.is_empty() {
        s.push_str("  (no answers yet)\n");
    }
    for r in &rates.rules {
        let name = if r.rule.is_empty() { format!("(no rule) {}", r.domain) } else { r.rule.clone() };
        s.push_str(&format!(
            "  {:<32} {:>8} {:>12} {:>11} {:>9}\n",
            truncate(&name, 32),
            si(r.ok_per_s),
            si(r.over_limit_per_s),
            si(r.over_limit_total as f64),
            si(r.shadow_over_limit_per_s)
        ));
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `950`, `12.3k`, `4.56M`.
fn si(x: f64) -> String {
    match x {
        x if x < 1000.0 => format!("{x:.0}"),
        x if x < 1e6 => format!("{:.1}k", x / 1e3),
        x if x < 1e9 => format!("{:.2}M", x / 1e6),
        x => format!("{:.2}G", x / 1e9),
    }
}

fn bytes(x: f64) -> String {
    match x {
        x if x < 1024.0 => format!("{x:.0}B"),
        x if x < 1024.0 * 1024.0 => format!("{:.1}KiB", x / 1024.0),
        x if x < 1024.0 * 1024.0 * 1024.0 => format!("{:.1}MiB", x / 1024.0 / 1024.0),
        x => format!("{:.2}GiB", x / 1024.0 / 1024.0 / 1024.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{
        DecisionCount, EscalationCount, ReasonCount, RedisStatus, RequestErrorCount, RuleCount, ShadowCount,
        SourceCount, SourceTable,
    };

    fn snap(ms: u64, dropped: u64, src: u64) -> Snapshot {
        Snapshot {
            version: "0".into(),
            time_unix_ms: ms,
            uptime_s: ms / 1000,
            reasons: vec![
                ReasonCount { reason: "conforming".into(), verdict: Verdict::Pass, packets: 100, bytes: 10_000 },
                ReasonCount {
                    reason: "source_bucket".into(),
                    verdict: Verdict::Drop,
                    packets: dropped,
                    bytes: dropped * 60,
                },
            ],
            rules: vec![RuleCount { name: "demo/per-source".into(), dropped_packets: dropped, ..Default::default() }],
            top_sources: vec![SourceCount {
                source: "10.0.0.9".parse().unwrap(),
                dropped_packets: src,
                dropped_bytes: 0,
            }],
            sources: SourceTable { tracked: 5, capacity: 100, sampled_at_unix_ms: ms },
            ..Default::default()
        }
    }

    #[test]
    fn rates_are_deltas_over_the_agents_read_times() {
        let r = Rates::between(&snap(10_000, 100, 50), &snap(12_000, 500, 250));
        assert_eq!(r.interval_s, 2.0);
        assert_eq!(r.dropped.packets_per_s, 200.0);
        assert_eq!(r.dropped.bytes_per_s, 12_000.0);
        assert_eq!(r.passed.packets_per_s, 0.0);
        assert_eq!(r.reasons.len(), 1, "only reasons that moved");
        assert_eq!(r.reasons[0].reason, "source_bucket");
        assert_eq!(r.rules[0].dropped.packets_per_s, 200.0);
        assert_eq!(r.top_sources[0].dropped_packets_per_s, Some(100.0));
        let text = render(&snap(12_000, 500, 250), &r, Path::new("/s"));
        assert!(text.contains("source_bucket"), "{text}");
        assert!(text.contains("10.0.0.9"), "{text}");
        assert!(text.contains("5 of 100 tracked (5.0%)"), "{text}");
    }

    #[test]
    fn same_snapshot_or_restarted_agent_gives_zero_rates_not_garbage() {
        let a = snap(10_000, 100, 50);
        assert_eq!(Rates::between(&a, &a).dropped.packets_per_s, 0.0);
        let restarted = Snapshot { uptime_s: 0, ..snap(11_000, 5, 5) };
        let r = Rates::between(&a, &restarted);
        assert_eq!(r.interval_s, 0.0);
        assert_eq!(r.dropped.packets_per_s, 0.0);
    }

    #[test]
    fn json_view_has_the_snapshot_fields_and_rates() {
        let (a, b) = (snap(10_000, 100, 50), snap(11_000, 200, 60));
        let rates = Rates::between(&a, &b);
        let v: serde_json::Value = serde_json::to_value(JsonView { snapshot: &b, rates: &rates }).unwrap();
        assert_eq!(v["rules"][0]["dropped_packets"], 200);
        assert_eq!(v["sources"]["capacity"], 100);
        assert_eq!(v["rates"]["dropped"]["packets_per_s"], 100.0);
        assert_eq!(v["rls"]["serving"], false);
        assert_eq!(v["rates"]["rls"]["over_limit_per_s"], 0.0);
    }

    fn rls(ok: u64, over: u64, shadow: u64, errors: u64) -> RlsStatus {
        let d = |rule: &str, code: &str, n| DecisionCount {
            domain: "limiter".into(),
            rule: rule.into(),
            code: code.into(),
            descriptors: n,
        };
        RlsStatus {
            blocked_now: 1,
            serving: true,
            listen: Some("127.0.0.1:8081".parse().unwrap()),
            backend: "redis".into(),
            redis: Some(RedisStatus {
                connected: false,
                failure_mode: "failOpen".into(),
                errors: 7,
                failure_mode_answers: 3,
            }),
            l7_rules: 2,
            l7_tracked_keys: 25,
            l7_max_keys: 100,
            decisions: vec![
                d("", "OK", 4),
                d("web/a-rule-with-a-name-far-too-long-for-its-column", "OK", ok),
                d("web/a-rule-with-a-name-far-too-long-for-its-column", "OVER_LIMIT", over),
            ],
            shadow_over_limit: vec![ShadowCount {
                domain: "limiter".into(),
                rule: "web/shadow".into(),
                descriptors: shadow,
            }],
            request_errors: vec![RequestErrorCount { reason: "overloaded".into(), requests: errors }],
            escalation: true,
            escalations: vec![EscalationCount { policy: "web".into(), sources: 1 }],
        }
    }

    #[test]
    fn rls_rates_split_ok_and_over_limit_by_rule_with_shadow_and_errors() {
        let before = Snapshot { rls: rls(10, 2, 0, 1), ..snap(10_000, 100, 50) };
        let now = Snapshot { rls: rls(30, 12, 4, 5), ..snap(12_000, 100, 50) };
        let r = Rates::between(&before, &now).rls;
        assert_eq!((r.ok_per_s, r.over_limit_per_s, r.shadow_over_limit_per_s), (10.0, 5.0, 2.0));
        assert_eq!((r.request_errors_per_s, r.escalations_per_s), (2.0, 0.0));
        let rules: Vec<(&str, f64, f64, f64, u64)> = r
            .rules
            .iter()
            .map(|x| (x.rule.as_str(), x.ok_per_s, x.over_limit_per_s, x.shadow_over_limit_per_s, x.over_limit_total))
            .collect();
        assert_eq!(
            rules,
            [
                ("", 0.0, 0.0, 0.0, 0),
                ("web/a-rule-with-a-name-far-too-long-for-its-column", 10.0, 5.0, 0.0, 12),
                ("web/shadow", 0.0, 0.0, 2.0, 0),
            ]
        );
        assert_eq!(r.request_errors, [RlsErrorRate { reason: "overloaded".into(), requests_per_s: 2.0 }]);

        // A rule or reason new since the older snapshot counts from zero; a restart gives 0.
        let fresh = Snapshot { rls: RlsStatus::default(), ..snap(10_000, 100, 50) };
        assert_eq!(Rates::between(&fresh, &now).rls.over_limit_per_s, 6.0);
        let restarted = Snapshot { uptime_s: 0, ..now.clone() };
        assert_eq!(Rates::between(&before, &restarted).rls.ok_per_s, 0.0);
    }

    #[test]
    fn rls_view_names_rules_redis_state_and_escalations_in_80_columns() {
        let before = Snapshot { rls: rls(10, 2, 0, 1), ..snap(10_000, 100, 50) };
        let now = Snapshot {
            interfaces: vec![control::Interface { name: "eth0".into(), mode: "native".into() }],
            rls: rls(30, 12, 4, 5),
            ..snap(12_000, 100, 50)
        };
        let text = render(&now, &Rates::between(&before, &now), Path::new("/run/limiter/agent.sock"));
        for line in text.lines() {
            assert!(line.chars().count() <= 80, "wider than 80 columns: {line:?}\n{text}");
        }
        for want in [
            "rate limit service on 127.0.0.1:8081 | backend redis | 2 L7 rules",
            "descriptors/s: 10 ok, 5 over limit, 2 shadow over limit",
            "refused calls: 2/s (total: overloaded 5)",
            "redis: UNREACHABLE, answering failOpen | 7 errors, 3 answered by failOpen",
            "L7 keys: 25 of 100 tracked (25.0%)",
            "sources escalated to XDP: 1 (web 1)",
            "(no rule) limiter",
            "web/a-rule-with-a-name-far-too-…",
            "demo/per-source",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        let row = text.lines().find(|l| l.contains("web/a-rule")).unwrap();
        assert_eq!(row.split_whitespace().skip(1).collect::<Vec<_>>(), ["10", "5", "12", "0"], "{row}");
    }

    #[test]
    fn without_xdp_the_view_says_so_and_shows_only_the_rate_limit_service() {
        let rls_only = |ms| Snapshot {
            version: "0".into(),
            time_unix_ms: ms,
            uptime_s: ms / 1000,
            rls: RlsStatus { escalation: false, ..rls(ms / 1000, 0, 0, 0) },
            ..Default::default()
        };
        let (a, b) = (rls_only(10_000), rls_only(11_000));
        let text = render(&b, &Rates::between(&a, &b), Path::new("/s"));
        assert!(text.contains("no XDP program (rate limit service only)"), "{text}");
        assert!(text.contains("policy: 2 L7 rules"), "{text}");
        assert!(text.contains("sources escalated to XDP: off (needs --iface)"), "{text}");
        assert!(text.contains("descriptors/s: 1 ok"), "{text}");
        assert!(!text.contains("by reason") && !text.contains("source table"), "{text}");

        let not_serving = Snapshot { rls: RlsStatus::default(), ..snap(11_000, 1, 1) };
        let text = render(&not_serving, &Rates::default(), Path::new("/s"));
        assert!(text.contains("rate limit service: not serving (--no-rls)"), "{text}");
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(si(950.0), "950");
        assert_eq!(si(12_345.0), "12.3k");
        assert_eq!(bytes(2048.0), "2.0KiB");
        assert_eq!(duration(3725), "1h02m");
    }
}
