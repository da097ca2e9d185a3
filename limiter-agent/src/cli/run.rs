//! `limiter-agent run`: load the XDP program, apply the policy, attach, report, detach.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use limiter_common::{Counter, reason};
use log::{error, info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    control::{self, Control},
    dataplane::{AttachMode, Dataplane, LoadOptions, Stats},
    plan::KernelPlan,
    policy,
    watch::PolicyWatcher,
};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Interface to shield (repeatable). XDP is attached to each one.
    #[arg(long = "iface", required = true, value_name = "IF")]
    pub ifaces: Vec<String>,
    /// Policy file or directory (repeatable).
    #[arg(long = "policy", required = true, value_name = "FILE_OR_DIR")]
    pub policies: Vec<PathBuf>,
    /// native: driver mode only; generic: skb mode; auto: native, else generic.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub xdp_mode: AttachMode,
    /// How often to log a stats line (e.g. 500ms, 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub stats_interval: Duration,
    /// Capacity of the per-source bucket table.
    #[arg(long, default_value_t = limiter_common::DEFAULT_SOURCE_ENTRIES)]
    pub source_entries: u32,
    /// IPv6 sources are bucketed by this prefix length.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u8).range(1..=128))]
    pub ipv6_source_prefix: u8,
    /// Drop frames the parser cannot follow (default: pass them).
    #[arg(long)]
    pub drop_unparsed: bool,
    /// Log sampled debug records of kernel drops (the first per reason and CPU, then one in
    /// 1024).
    #[arg(long)]
    pub debug_log: bool,
    /// How often to look for policy changes (files, directories, ConfigMap volumes).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub watch_interval: Duration,
    /// Reload only on SIGHUP, never by watching the files.
    #[arg(long)]
    pub no_watch: bool,
    /// Local control socket `limiter-agent top` reads (created 0600, removed on exit).
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub control_socket: PathBuf,
}

/// Parses `500ms`, `10s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}`: expected a number followed by ms, s, m or h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    };
    if d.is_zero() {
        return Err(format!("`{s}`: must be more than zero"));
    }
    Ok(d)
}

/// Loads and compiles the policy set; logs every notice. Errors carry file/line/field.
pub fn load_plan(paths: &[PathBuf]) -> anyhow::Result<KernelPlan> {
    let set = policy::load_paths(paths).map_err(|errors| anyhow::anyhow!("{errors}"))?;
    // Set-level errors (e.g. duplicate L7 rule names) reject the set like load errors.
    let compiled = policy::compile(&set).into_result().map_err(|errors| anyhow::anyhow!("{errors}"))?;
    for notice in &compiled.notices {
        warn!("{notice}");
    }
    Ok(compiled.plan)
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let plan = load_plan(&args.policies).context("the policy has errors; nothing was attached")?;
    let mut control =
        Control::bind(&args.control_socket).context("opening the control socket; nothing was attached")?;
    let options = LoadOptions {
        source_entries: args.source_entries,
        ipv6_source_prefix: args.ipv6_source_prefix,
        drop_unparsed: args.drop_unparsed,
        debug_log: args.debug_log,
    };
    let mut dp = Dataplane::load(options).context("loading the XDP program")?;
    let applied = dp.apply(&plan).context("applying the policy to the kernel maps")?;
    info!(
        "policy applied: {} kernel rules ({} slots, {} port lists), {} allow and {} deny entries",
        applied.rules, applied.rule_slots, applied.port_lists, applied.allow, applied.deny
    );
    for iface in &args.ifaces {
        let mode = dp.attach(iface, args.xdp_mode).with_context(|| {
            format!("attaching to {iface}: check the name with `ip link`, or try --xdp-mode generic")
        })?;
        info!("attached to {iface} in {mode} mode");
        control.attached(iface, mode);
    }

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut watcher = PolicyWatcher::new(&args.policies);
    let mut watch_tick = tokio::time::interval(args.watch_interval);
    watch_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reloads = ReloadCounts::default();
    let mut tick = tokio::time::interval(args.stats_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = dp.stats().context("reading counters")?;
    let mut last_at = Instant::now();
    let mut control_tick = tokio::time::interval(Duration::from_secs(1));
    control_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigint.recv() => { info!("SIGINT: detaching"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: detaching"); break; }
            _ = sighup.recv() => {
                watcher.mark_applied();
                reloads.record(reload(&mut dp, &args.policies, "SIGHUP"));
            }
            _ = watch_tick.tick(), if !args.no_watch => {
                if watcher.poll() {
                    reloads.record(reload(&mut dp, &args.policies, "policy files changed"));
                }
            }
            _ = control_tick.tick() => control.refresh(&dp, reloads.control()),
            _ = tick.tick() => {
                control.refresh(&dp, reloads.control());
                dp.flush_log();
                if let Err(e) = dp.expire_blocks() {
                    warn!("expiring block-list entries: {e}");
                }
                match dp.stats() {
                    Ok(now) => {
                        let elapsed = last_at.elapsed();
                        info!("{}", stats_line(&last, &now, elapsed));
                        last = now;
                        last_at = Instant::now();
                    }
                    Err(e) => warn!("reading counters: {e}"),
                }
            }
        }
    }
    dp.log_summary();
    let stats = dp.stats().ok();
    drop(dp);
    drop(control);
    info!("detached from {}", args.ifaces.join(", "));
    if let Some(stats) = stats {
        for (name, c) in &stats.rules {
            info!(
                "rule {name}: passed {} dropped {} shadow-dropped {} packets",
                c.passed.packets, c.dropped.packets, c.shadow_dropped.packets
            );
        }
    }
    Ok(())
}

/// Reloads that succeeded and that were rejected since start (logged with each reload).
#[derive(Debug, Default)]
struct ReloadCounts {
    applied: u64,
    rejected: u64,
    last_rejected: bool,
}

impl ReloadCounts {
    fn record(&mut self, outcome: Option<bool>) {
        match outcome {
            Some(true) => {
                self.applied += 1;
                self.last_rejected = false;
            }
            Some(false) => {
                self.rejected += 1;
                self.last_rejected = true;
                warn!("policy reloads rejected since start: {}", self.rejected);
            }
            None => {}
        }
    }
}

impl ReloadCounts {
    fn control(&self) -> control::Reloads {
        control::Reloads { applied: self.applied, rejected: self.rejected, last_ok: !self.last_rejected }
    }
}

/// Re-reads the policy; a policy with any error is rejected whole and the running one stays.
/// `Some(true)`: applied; `Some(false)`: rejected; `None`: nothing changed.
fn reload(dp: &mut Dataplane, paths: &[PathBuf], why: &str) -> Option<bool> {
    match load_plan(paths) {
        Ok(plan) if dp.current_plan() == Some(&plan) => {
            info!("{why}: policy unchanged");
            None
        }
        Ok(plan) => match dp.apply(&plan) {
            Ok(a) => {
                info!("{why}: policy reloaded: {} kernel rules, {} kept their bucket state", a.rules, a.kept);
                Some(true)
            }
            Err(e) => {
                error!("{why}: reload rejected, the previous policy stays in force: {e}");
                Some(false)
            }
        },
        Err(e) => {
            error!("{why}: reload rejected, the previous policy stays in force:\n{e:#}");
            Some(false)
        }
    }
}

fn delta(a: Counter, b: Counter) -> Counter {
    Counter { packets: b.packets.saturating_sub(a.packets), bytes: b.bytes.saturating_sub(a.bytes) }
}

/// One line per interval: rates passed and dropped, then drops by reason and by rule.
pub fn stats_line(before: &Stats, now: &Stats, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let passed = delta(before.passed(), now.passed());
    let dropped = delta(before.dropped(), now.dropped());
    let mut line = format!(
        "stats: passed {} pkts ({:.0}/s), dropped {} pkts ({:.0}/s)",
        passed.packets,
        passed.packets as f64 / secs,
        dropped.packets,
        dropped.packets as f64 / secs
    );
    let reasons: Vec<String> = (reason::DROP_UNPARSED..reason::VERDICT_REASONS)
        .filter_map(|r| {
            let d = delta(before.reason(r), now.reason(r)).packets;
            (d > 0).then(|| format!("{}={d}", reason::name(r)))
        })
        .collect();
    if !reasons.is_empty() {
        line.push_str(&format!(" [by reason: {}]", reasons.join(" ")));
    }
    let rules: Vec<String> = now
        .rules
        .iter()
        .filter_map(|(name, c)| {
            let prev = before.rules.get(name).copied().unwrap_or_default();
            let d = delta(prev.dropped, c.dropped).packets;
            let s = delta(prev.shadow_dropped, c.shadow_dropped).packets;
            match (d, s) {
                (0, 0) => None,
                (d, 0) => Some(format!("{name}={d}")),
                (d, s) => Some(format!("{name}={d}(+{s} shadow)")),
            }
        })
        .collect();
    if !rules.is_empty() {
        line.push_str(&format!(" [by rule: {}]", rules.join(" ")));
    }
    line
}

/// Refuses to start without root, with a hint, rather than failing deep in a syscall.
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("limiter-agent run needs root (CAP_BPF and CAP_NET_ADMIN): rerun with sudo");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn stats_line_reports_deltas_by_reason_and_rule() {
        let mut a = Stats { reasons: vec![Counter::default(); reason::COUNT as usize], ..Default::default() };
        let mut b = a.clone();
        b.reasons[reason::PASS_CONFORMING as usize] = Counter { packets: 10, bytes: 1000 };
        b.reasons[reason::DROP_SHARED_BUCKET as usize] = Counter { packets: 4, bytes: 400 };
        a.rules.insert("p/r".into(), Default::default());
        let mut rc = limiter_common::RuleCounter::default();
        rc.dropped.packets = 4;
        b.rules.insert("p/r".into(), rc);
        let line = stats_line(&a, &b, Duration::from_secs(2));
        assert_eq!(
            line,
            "stats: passed 10 pkts (5/s), dropped 4 pkts (2/s) [by reason: shared_bucket=4] [by rule: p/r=4]"
        );
    }
}
