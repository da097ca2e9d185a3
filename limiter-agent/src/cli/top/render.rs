//! The text view of `top`: a header, the kernel's part, the rate limit service's part, and
//! short number formats that keep it within 80 columns.

use std::path::Path;

use super::rates::{Rates, RlsRates};
use crate::control::{RlsStatus, Snapshot, Verdict};

/// The text view.
pub fn render(now: &Snapshot, rates: &Rates, socket: &Path) -> String {
    let mut s = String::new();
    let ifaces: Vec<String> = now.interfaces.iter().map(|i| format!("{} ({})", i.name, i.mode)).collect();
    let p = &now.policy;
    if let Some(u) = &now.unattended {
        let now_s = now.time_unix_ms / 1000;
        let last = if u.agent_stopped_unix_s == 0 {
            format!("its last agent (pid {}) did not stop cleanly", u.last_agent_pid)
        } else {
            format!(
                "its last agent (pid {}) stopped {} ago",
                u.last_agent_pid,
                duration(now_s.saturating_sub(u.agent_stopped_unix_s))
            )
        };
        s.push_str(&format!(
            "NO AGENT RUNNING: the shield pinned in {} {} ago still runs on {}\npolicy of the last agent: {} | {} blocked | {last}\n(counters read from the pins; `limiter-agent run` adopts it, `limiter-agent detach` removes it)\n",
            u.pin_dir,
            duration(now_s.saturating_sub(u.pinned_at_unix_s)),
            if ifaces.is_empty() { "no interface".to_owned() } else { ifaces.join(", ") },
            u.policy,
            u.blocked_now,
        ));
        render_kernel(&mut s, now, rates);
        return s;
    }
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

pub(super) fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `950`, `12.3k`, `4.56M`.
pub(super) fn si(x: f64) -> String {
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

    #[test]
    fn numbers_are_short() {
        assert_eq!(si(950.0), "950");
        assert_eq!(si(12_345.0), "12.3k");
        assert_eq!(bytes(2048.0), "2.0KiB");
        assert_eq!(duration(3725), "1h02m");
    }
}
