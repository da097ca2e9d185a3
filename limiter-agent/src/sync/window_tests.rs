use std::net::Ipv4Addr;

use limiter_common::{PROTO_UDP, ipv4_mapped};

use super::*;
use crate::plan::{KernelRule, Limit, PortTarget, SourceSelector, Unit};

fn count(rule_id: u32, ip: [u8; 4], port: u16, n: u64) -> SourceCount {
    let protocol = if port == 0 { 0 } else { PROTO_UDP };
    SourceCount {
        rule: format!("p/r{rule_id}"),
        source: IpAddr::from(Ipv4Addr::from(ip)),
        port,
        protocol,
        key: SourceBucketKey { rule_id, port, protocol, _pad: 0, addr: ipv4_mapped(ip) },
        count: n,
    }
}

#[test]
fn the_first_reading_is_the_base_then_only_growth_counts() {
    let mut d = Deltas::default();
    assert!(d.observe(&[count(1, [10, 0, 0, 1], 0, 500)]).is_empty(), "older counts are not sent again");
    let grown = d.observe(&[count(1, [10, 0, 0, 1], 0, 520), count(1, [10, 0, 0, 2], 0, 7)]);
    assert_eq!(grown["p/r1"]["10.0.0.1"], 20);
    assert_eq!(grown["p/r1"]["10.0.0.2"], 7, "a new source counts from 0");
    // Unchanged: nothing to send, not even a zero.
    let grown = d.observe(&[count(1, [10, 0, 0, 1], 0, 520), count(1, [10, 0, 0, 2], 0, 7)]);
    assert!(grown.is_empty(), "{grown:?}");
    // Evicted and made again: smaller than before, so counted from 0.
    let grown = d.observe(&[count(1, [10, 0, 0, 1], 0, 3)]);
    assert_eq!(grown["p/r1"]["10.0.0.1"], 3);
    // Gone from the table, then back: from 0 again.
    assert!(d.observe(&[]).is_empty());
    let grown = d.observe(&[count(1, [10, 0, 0, 1], 0, 4)]);
    assert_eq!(grown["p/r1"]["10.0.0.1"], 4);
}

#[test]
fn fields_name_the_source_and_the_port_when_the_rule_keys_by_port() {
    let by_source = count(1, [10, 0, 0, 1], 0, 1);
    let by_port = count(2, [10, 0, 0, 1], 53, 1);
    assert_eq!(field(&by_source), "10.0.0.1");
    assert_eq!(field(&by_port), "10.0.0.1 53/UDP");
    assert_eq!(field_source("10.0.0.1 53/UDP"), Some(IpAddr::from([10, 0, 0, 1])));
    assert_eq!(field_source("2001:db8::"), "2001:db8::".parse().ok());
    assert_eq!(field_source("#window"), None);
    // Two ports of one rule are two fields of its hash.
    let mut d = Deltas::default();
    d.observe(&[]);
    let grown = d.observe(&[count(2, [10, 0, 0, 1], 53, 5), count(2, [10, 0, 0, 1], 0, 6)]);
    assert_eq!(grown["p/r2"].len(), 2);
}

fn rule() -> WindowRule {
    WindowRule { name: "p/r".into(), unit_ms: 1000, limit: 20, count: CountKind::Packets }
}

fn answer(window: i64, over: &[(&str, u64)]) -> WindowAnswer {
    WindowAnswer { window, remaining_ms: 400, over: over.iter().map(|(f, t)| ((*f).to_owned(), *t)).collect() }
}

#[test]
fn a_source_over_the_limit_is_first_once_per_window() {
    let mut r = Reported::default();
    let held = r.holds(&rule(), &answer(7, &[("10.0.0.1", 25)]));
    assert_eq!(held.len(), 1);
    let h = &held[0];
    assert!(h.first);
    assert_eq!((h.source, h.total, h.limit), (IpAddr::from([10, 0, 0, 1]), 25, 20));
    assert_eq!(h.remaining, Duration::from_millis(400));
    // Reported again in the same window (every period): held again, not first.
    let held = r.holds(&rule(), &answer(7, &[("10.0.0.1", 31), ("10.0.0.2", 21)]));
    assert_eq!(held.iter().map(|h| h.first).collect::<Vec<_>>(), [false, true]);
    // The next window: first again.
    let held = r.holds(&rule(), &answer(8, &[("10.0.0.1", 21)]));
    assert!(held[0].first);
    // A field that names no address is left out.
    assert!(r.holds(&rule(), &answer(8, &[("junk", 99)])).is_empty());
}

#[test]
fn only_global_per_source_rules_count_in_windows() {
    let base = KernelRule {
        name: "p/shared".into(),
        targets: vec![PortTarget { port: 53, protocol: Protocol::Udp }],
        source: SourceSelector::everyone(false),
        count: CountKind::Packets,
        limit: Limit { requests: 20, unit: Unit::Second, burst: 5 },
        shadow: false,
        global: true,
    };
    let mut per_source = base.clone();
    per_source.name = "p/per-source".into();
    per_source.source.distinct = true;
    let mut local = per_source.clone();
    local.name = "p/local".into();
    local.global = false;
    let mut shadow = per_source.clone();
    shadow.name = "p/shadow".into();
    shadow.shadow = true;
    let mut minute = per_source.clone();
    minute.name = "p/minute".into();
    minute.limit.unit = Unit::Minute;
    let plan = KernelPlan { rules: vec![base, per_source, local, shadow, minute], ..Default::default() };
    let rules = window_rules(&plan);
    assert_eq!(rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["p/per-source", "p/minute"]);
    assert_eq!((rules[0].unit_ms, rules[0].limit), (1000, 25), "the window limit is requests + burst");
    assert_eq!(rules[1].unit_ms, 60_000);
    // And they take no demand share; the shared one does.
    let view = crate::sync::demand::View::new("a", ["a".to_owned(), "b".to_owned()], Default::default());
    let shares = crate::sync::demand::shares(&plan, &view, 0.05);
    assert_eq!(shares.keys().collect::<Vec<_>>(), ["p/shared"]);
}

#[test]
fn both_keys_of_a_rule_share_a_cluster_slot() {
    let (counts, over) = keys("pfx:", "p/r");
    assert_eq!(counts, "pfx:limiter:window:{p/r}");
    assert_eq!(over, "pfx:limiter:window:{p/r}:over");
}
