//! The one-line view `top` prints each interval when its output is not a terminal (a log, a
//! pipe, the demo): what passed, what was dropped and by which rule, and what the rate limit
//! service answered, short enough to read as a stream.

use super::{
    rates::Rates,
    render::{duration, si},
};
use crate::control::{Snapshot, Verdict};

/// Rules and reasons named after `dropped`, at most.
const NAMED_DROPS: usize = 3;

/// `up 12s | passed 130/s | dropped 2.0k/s: demo/strangers 1.9k/s, deny_list 40/s | rls: 10 ok/s, 140 over limit/s`
pub fn render_line(now: &Snapshot, rates: &Rates) -> String {
    let mut parts = Vec::new();
    if let Some(alone) = &now.unattended {
        parts.push(format!("NO AGENT RUNNING: shield pinned in {} runs alone", alone.pin_dir));
    }
    parts.push(format!("up {}", duration(now.uptime_s)));
    if now.has_kernel() {
        parts.push(format!("passed {}/s", si(rates.passed.packets_per_s)));
        // Bucket drops are told by the rule that ran out; the others (deny and block lists,
        // unparsed) by their reason.
        let mut drops: Vec<(&str, f64)> = rates
            .rules
            .iter()
            .filter(|r| r.dropped.packets_per_s > 0.0)
            .map(|r| (r.name.as_str(), r.dropped.packets_per_s))
            .chain(
                rates
                    .reasons
                    .iter()
                    .filter(|r| r.verdict == Verdict::Drop && !r.reason.ends_with("_bucket"))
                    .map(|r| (r.reason.as_str(), r.packets_per_s)),
            )
            .collect();
        drops.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut named: Vec<String> =
            drops.iter().take(NAMED_DROPS).map(|(name, per_s)| format!("{name} {}/s", si(*per_s))).collect();
        if drops.len() > NAMED_DROPS {
            named.push(format!("{} more", drops.len() - NAMED_DROPS));
        }
        let dropped = si(rates.dropped.packets_per_s);
        parts.push(if named.is_empty() {
            format!("dropped {dropped}/s")
        } else {
            format!("dropped {dropped}/s: {}", named.join(", "))
        });
        let shadow: f64 = rates.rules.iter().map(|r| r.shadow_dropped_packets_per_s).sum();
        if shadow > 0.0 {
            parts.push(format!("shadow would drop {}/s", si(shadow)));
        }
    } else {
        parts.push("no XDP program".to_owned());
    }
    if now.rls.serving {
        let r = &rates.rls;
        let mut rls = format!("rls: {} ok/s, {} over limit/s", si(r.ok_per_s), si(r.over_limit_per_s));
        if r.request_errors_per_s > 0.0 {
            rls.push_str(&format!(", {} refused/s", si(r.request_errors_per_s)));
        }
        if r.escalations_per_s > 0.0 {
            rls.push_str(&format!(", {} escalated/s", si(r.escalations_per_s)));
        }
        parts.push(rls);
    }
    parts.join(" | ")
}
