//! Verdicts of the real XDP program, in the real kernel, on hand-built frames through
//! `BPF_PROG_TEST_RUN`: every parser path, every list and every bucket.
//!
//! `BPF_PROG_TEST_RUN` runs the program against the same maps live traffic would use, so each
//! test applies a plan through the agent's `Dataplane` exactly as `limiter-agent run` does and
//! then judges frames. Bucket tests use rates slow enough (per hour) that the real clock
//! cannot refill a token during the test; refill over time is covered by the bucket unit
//! tests (controlled time) and the traffic tests.
//!
//! Parser tests use a "probe" rule: 1 per hour on UDP/TCP port 9000 per source. The first
//! frame to port 9000 passes and the second is dropped, which proves the parser found both
//! the source address and the destination port through whatever headers the frame carries.

// One file per topic; the helpers below are shared by all of them.
mod buckets;
mod debug_log;
mod fragments;
mod lists;
mod malformed;
mod parsing;
mod record;
mod shapes;

use std::net::{Ipv4Addr, Ipv6Addr};

use limiter_agent::{
    dataplane::{Dataplane, LoadOptions},
    plan::{CountKind, KernelPlan, KernelRule, Limit, ListEntry, PortTarget, Protocol, SourceSelector, Unit},
};
use limiter_common::{XDP_DROP, XDP_PASS, reason};
use limiter_tests::{packet::Packet, require_root};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
const PROBE_PORT: u16 = 9000;

fn load(options: LoadOptions) -> Dataplane {
    require_root();
    Dataplane::load(options).expect("load the XDP program (verifier)")
}

fn rule(name: &str, count: CountKind, requests: u64, unit: Unit, burst: u64) -> KernelRule {
    KernelRule {
        name: format!("test/{name}"),
        targets: Vec::new(),
        source: SourceSelector::everyone(false),
        count,
        limit: Limit { requests, unit, burst },
        shadow: false,
        global: false,
    }
}

fn on_port(mut r: KernelRule, port: u16, protocol: Protocol) -> KernelRule {
    r.targets.push(PortTarget { port, protocol });
    r
}

fn per_source(mut r: KernelRule) -> KernelRule {
    r.source.distinct = true;
    r
}

fn with_rules(rules: Vec<KernelRule>) -> Dataplane {
    let mut dp = load(LoadOptions::default());
    dp.apply(&KernelPlan { rules, ..Default::default() }).expect("apply plan");
    dp
}

/// The probe: one packet per hour per source to port 9000, TCP and UDP.
fn probe() -> Dataplane {
    let probe = per_source(rule("probe", CountKind::Packets, 1, Unit::Hour, 0));
    let probe = on_port(on_port(probe, PROBE_PORT, Protocol::Udp), PROBE_PORT, Protocol::Tcp);
    with_rules(vec![probe])
}

/// The strict any-port rule: one packet per hour per source, whatever the protocol or port.
fn strict_any_port() -> KernelRule {
    per_source(rule("strict", CountKind::Packets, 1, Unit::Hour, 0))
}

fn verdict(dp: &mut Dataplane, frame: &[u8]) -> u32 {
    dp.test_run(frame).expect("BPF_PROG_TEST_RUN")
}

/// Runs `frame` once; returns its verdict and the one verdict reason it was counted under,
/// found by comparing the counters before and after.
fn judged(dp: &mut Dataplane, frame: &[u8]) -> (u32, u32) {
    let before = dp.stats().expect("read counters");
    let v = verdict(dp, frame);
    let after = dp.stats().expect("read counters");
    let counted: Vec<u32> =
        (0..reason::VERDICT_REASONS).filter(|&r| after.reason(r).packets != before.reason(r).packets).collect();
    let names: Vec<&str> = counted.iter().map(|&r| reason::name(r)).collect();
    assert_eq!(counted.len(), 1, "a frame is counted under exactly one verdict reason, not {names:?}");
    let why = counted[0];
    assert_eq!(after.reason(why).packets, before.reason(why).packets + 1, "{}", reason::name(why));
    assert_eq!(reason::is_drop(why), v == XDP_DROP, "verdict {v} but counted as {}", reason::name(why));
    (v, why)
}

/// Runs `frame` twice against a fresh probe and returns both verdicts.
fn probe_twice(frame: &[u8]) -> (u32, u32, Dataplane) {
    let mut dp = probe();
    let first = verdict(&mut dp, frame);
    let second = verdict(&mut dp, frame);
    (first, second, dp)
}

fn assert_parsed_to_probe(frame: &[u8], what: &str) {
    let (first, second, dp) = probe_twice(frame);
    assert_eq!((first, second), (XDP_PASS, XDP_DROP), "{what}: the parser must reach the port");
    let stats = dp.stats().unwrap();
    assert_eq!(stats.reason(reason::DROP_SOURCE_PORT_BUCKET).packets, 1, "{what}");
    assert_eq!(stats.rules["test/probe"].dropped.packets, 1, "{what}");
}

fn assert_unparsed(frame: &[u8], what: &str) {
    let (first, second, dp) = probe_twice(frame);
    assert_eq!((first, second), (XDP_PASS, XDP_PASS), "{what}: unparsed frames pass by default");
    assert_eq!(dp.stats().unwrap().reason(reason::PASS_UNPARSED).packets, 2, "{what}: counted as unparsed");
    // With the drop verdict configured, the same frame is dropped.
    let mut dp = load(LoadOptions { drop_unparsed: true, ..Default::default() });
    assert_eq!(verdict(&mut dp, frame), XDP_DROP, "{what}: with drop_unparsed");
    assert_eq!(dp.stats().unwrap().reason(reason::DROP_UNPARSED).packets, 1, "{what}");
}

fn udp4() -> Packet {
    Packet::eth().ipv4(CLIENT, SERVER).udp(40000, PROBE_PORT).payload(b"limiter")
}

fn udp6() -> Packet {
    Packet::eth().ipv6(CLIENT6, SERVER6).udp(40000, PROBE_PORT).payload(b"limiter")
}
/// The lists judge `frame` (sent by [`CLIENT`] or [`CLIENT6`]) whatever follows its source:
/// denied, it is dropped as denied; allowed, it passes; on neither list it gets `otherwise`
/// (a verdict reason) under the probe rule and a strict any-port rule.
fn assert_lists_judge(frame: &[u8], otherwise: u32, what: &str) {
    let lists = |allow: &[&str], deny: &[&str]| {
        let mut dp = load(LoadOptions::default());
        let probe = per_source(rule("probe", CountKind::Packets, 1, Unit::Hour, 0));
        let probe = on_port(on_port(probe, PROBE_PORT, Protocol::Udp), PROBE_PORT, Protocol::Tcp);
        dp.apply(&plan_with_lists(allow, deny, vec![probe, strict_any_port()])).expect("apply plan");
        dp
    };
    let sources = ["10.1.0.2/32", "fd00:1::2/128"];
    let mut dp = lists(&[], &sources);
    assert_eq!(judged(&mut dp, frame), (XDP_DROP, reason::DROP_DENY_LIST), "{what}: a denied source");
    let mut dp = lists(&sources, &["0.0.0.0/0", "::/0"]);
    for _ in 0..3 {
        assert_eq!(judged(&mut dp, frame), (XDP_PASS, reason::PASS_ALLOW_LIST), "{what}: an allowed source");
    }
    let mut dp = lists(&[], &[]);
    let (_, why) = judged(&mut dp, frame);
    assert_eq!(reason::name(why), reason::name(otherwise), "{what}: a source on no list");
}

fn plan_with_lists(allow: &[&str], deny: &[&str], rules: Vec<KernelRule>) -> KernelPlan {
    let entries =
        |nets: &[&str]| nets.iter().map(|n| ListEntry { net: n.parse().unwrap(), policy: "test".into() }).collect();
    KernelPlan { allow: entries(allow), deny: entries(deny), rules, synproxy: Vec::new() }
}
