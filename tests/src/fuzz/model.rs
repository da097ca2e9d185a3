//! The policy the fuzzer applies, and the verdict a correct data path gives each reading
//! under it: the README's verdict table written as code, independent of the program.
//!
//! The policy makes verdicts informative and free of timing: lists for two source classes,
//! rules whose buckets are drained before the run (1 per hour, so nothing refills during it)
//! and rules too large to run out. Every verdict then depends only on what the frame is,
//! plus the fragment table (first fragments leave their port for the later ones), which the
//! model keeps as the program does.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use limiter_agent::plan::{
    CountKind, KernelPlan, KernelRule, Limit, ListEntry, PortTarget, Protocol, SourceSelector, Unit,
};
use limiter_common::Addr;

use super::frames::{CLASS_ALLOW, CLASS_ANY_DROP, CLASS_ANY_PASS, CLASS_DENY, PORT_CONN, PORT_DROP, PORT_PASS};
use super::oracle::{Frag, Ip, L4, Reading};

const TCP: u8 = 6;
const UDP: u8 = 17;

/// One rule of the fuzz policy, as the model sees it.
struct Rule {
    name: &'static str,
    /// (port, protocol) targets; empty: every port.
    ports: Vec<(u16, u8)>,
    /// Source networks; empty: everyone.
    nets: Vec<IpNet>,
    distinct: bool,
    connections: bool,
    /// The bucket is empty for the whole run: every packet it counts is refused.
    drained: bool,
}

fn class_nets(class: u8) -> Vec<IpNet> {
    vec![
        IpNet::new(IpAddr::V4(Ipv4Addr::new(10, 9, class, 0)), 24).expect("valid prefix"),
        IpNet::new(IpAddr::V6(Ipv6Addr::new(0xfd09, u16::from(class), 0, 0, 0, 0, 0, 0)), 64).expect("valid prefix"),
    ]
}

fn rules() -> Vec<Rule> {
    let both = |port| vec![(port, TCP), (port, UDP)];
    vec![
        Rule {
            name: "fuzz/port-drop",
            ports: both(PORT_DROP),
            nets: vec![],
            distinct: false,
            connections: false,
            drained: true,
        },
        Rule {
            name: "fuzz/port-pass",
            ports: both(PORT_PASS),
            nets: vec![],
            distinct: true,
            connections: false,
            drained: false,
        },
        Rule {
            name: "fuzz/conn",
            ports: both(PORT_CONN),
            nets: vec![],
            distinct: false,
            connections: true,
            drained: false,
        },
        Rule {
            name: "fuzz/any-drop",
            ports: vec![],
            nets: class_nets(CLASS_ANY_DROP),
            distinct: false,
            connections: false,
            drained: true,
        },
        Rule {
            name: "fuzz/any-pass",
            ports: vec![],
            nets: class_nets(CLASS_ANY_PASS),
            distinct: true,
            connections: false,
            drained: false,
        },
    ]
}

/// The plan the program runs under.
pub fn plan() -> KernelPlan {
    let entry = |net: IpNet| ListEntry { net, policy: "fuzz".into() };
    let kernel_rules = rules()
        .into_iter()
        .map(|r| {
            let (requests, unit) = if r.drained { (1, Unit::Hour) } else { (1_000_000_000, Unit::Second) };
            KernelRule {
                name: r.name.into(),
                targets: r
                    .ports
                    .iter()
                    .map(|&(port, p)| PortTarget {
                        port,
                        protocol: if p == TCP { Protocol::Tcp } else { Protocol::Udp },
                    })
                    .collect(),
                source: SourceSelector { nets: r.nets.clone(), distinct: r.distinct, invert: false },
                count: if r.connections { CountKind::Connections } else { CountKind::Packets },
                limit: Limit { requests, unit, burst: if r.drained { 0 } else { requests } },
                shadow: false,
                global: false,
            }
        })
        .collect();
    KernelPlan {
        allow: class_nets(CLASS_ALLOW).into_iter().map(entry).collect(),
        deny: class_nets(CLASS_DENY).into_iter().map(entry).collect(),
        rules: kernel_rules,
        synproxy: Vec::new(),
    }
}

/// What the program must do with one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    /// The verdict reason's metric name (`limiter_common::reason::name`).
    pub reason: &'static str,
    pub drop: bool,
    /// For a drop by a bucket: the rules any of which may be the one that refused (the
    /// drained ones that apply; which runs first is the program's order).
    pub refused_by: Vec<&'static str>,
    /// For a pass by the rules: every rule that counted the packet.
    pub passed: Vec<&'static str>,
    /// A later fragment judged by its first fragment's port (the `non_first_fragment` event).
    pub later_judged: bool,
}

impl Expect {
    fn plain(reason: &'static str, drop: bool) -> Self {
        Expect { reason, drop, refused_by: Vec::new(), passed: Vec::new(), later_judged: false }
    }
}

/// A fragmented datagram as reassembly identifies it: source, destination, id, protocol.
type DatagramKey = (Addr, Addr, u32, u8);

struct Datagram {
    port: Option<(u16, u8)>,
    dropped: bool,
}

/// The verdict model, with the fragment table the verdicts of later fragments depend on.
pub struct Model {
    rules: Vec<Rule>,
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    fragments: HashMap<DatagramKey, Datagram>,
}

impl Default for Model {
    fn default() -> Self {
        Self::new()
    }
}

impl Model {
    pub fn new() -> Self {
        Model {
            rules: rules(),
            allow: class_nets(CLASS_ALLOW),
            deny: class_nets(CLASS_DENY),
            fragments: HashMap::new(),
        }
    }

    /// Forgets the fragment table (the program was reloaded).
    pub fn reset(&mut self) {
        self.fragments.clear();
    }

    pub fn fragments_tracked(&self) -> usize {
        self.fragments.len()
    }

    /// The expected verdict for `reading`; updates the fragment table as the program must.
    pub fn expect(&mut self, reading: &Reading) -> Expect {
        let ip = match reading {
            Reading::NotIp => return Expect::plain("not_ip", false),
            // The default unparsed verdict is pass (the fuzzer loads with the default).
            Reading::Unparsed => return Expect::plain("unparsed", false),
            Reading::Ip(ip) => ip,
        };
        let src = to_ip(&ip.src);
        if self.allow.iter().any(|n| n.contains(&src)) {
            return Expect::plain("allow_list", false);
        }
        if self.deny.iter().any(|n| n.contains(&src)) {
            return Expect::plain("deny_list", true);
        }
        // The source is known but the rest is not: dropped after the lists (README).
        if ip.l4 == L4::Chain {
            return Expect::plain("header_chain", true);
        }
        if ip.l4 == L4::Truncated && (ip.protocol == TCP || ip.protocol == UDP) {
            return Expect::plain("l4_truncated", true);
        }
        let port = ip.dst_port.map(|p| (p, ip.protocol));
        match ip.fragment {
            Frag::None => self.judge_rules(ip, &src, port, false),
            Frag::First => {
                let e = self.judge_rules(ip, &src, port, false);
                let key = (ip.src, ip.dst, ip.frag_id, ip.frag_protocol);
                self.fragments.insert(key, Datagram { port, dropped: e.drop });
                e
            }
            Frag::Later => {
                let key = (ip.src, ip.dst, ip.frag_id, ip.frag_protocol);
                let Some(d) = self.fragments.get(&key) else { return Expect::plain("fragment_unknown", true) };
                if d.dropped {
                    return Expect::plain("fragment_of_dropped", true);
                }
                let port = d.port;
                let mut e = self.judge_rules(ip, &src, port, true);
                e.later_judged = true;
                if e.drop
                    && let Some(d) = self.fragments.get_mut(&key)
                {
                    d.dropped = true;
                }
                e
            }
        }
    }

    /// The rules of `port` (plus the any-port rules), or the any-port rules alone.
    fn judge_rules(&self, ip: &Ip, src: &IpAddr, port: Option<(u16, u8)>, later: bool) -> Expect {
        let port_listed = port.is_some_and(|p| self.rules.iter().any(|r| r.ports.contains(&p)));
        let applies = |r: &&Rule| {
            let on_port =
                if r.ports.is_empty() { true } else { port_listed && port.is_some_and(|p| r.ports.contains(&p)) };
            let source = r.nets.is_empty() || r.nets.iter().any(|n| n.contains(src));
            // Connections: TCP SYN without ACK, UDP datagrams; a later fragment is never a
            // new connection.
            let counted = !r.connections || (!later && ((ip.protocol == TCP && ip.tcp_syn) || ip.protocol == UDP));
            on_port && source && counted
        };
        let counting: Vec<&Rule> = self.rules.iter().filter(applies).collect();
        let refused_by: Vec<&'static str> = counting.iter().filter(|r| r.drained).map(|r| r.name).collect();
        if !refused_by.is_empty() {
            // Every drained rule of this policy is a shared one.
            debug_assert!(counting.iter().filter(|r| r.drained).all(|r| !r.distinct));
            return Expect { reason: "shared_bucket", drop: true, refused_by, passed: Vec::new(), later_judged: false };
        }
        if counting.is_empty() {
            return Expect::plain("no_rule", false);
        }
        Expect {
            reason: "conforming",
            drop: false,
            refused_by,
            passed: counting.iter().map(|r| r.name).collect(),
            later_judged: false,
        }
    }
}

/// The frames that drain the buckets of the drained rules: each is sent twice and must be
/// dropped the second time. Built with the harness's own packet builder.
pub fn drain_frames() -> Vec<Vec<u8>> {
    use crate::packet::Packet;
    let neutral = Ipv4Addr::new(10, 9, super::frames::CLASS_NEUTRAL, 99);
    let any_drop = Ipv4Addr::new(10, 9, CLASS_ANY_DROP, 99);
    vec![
        Packet::eth().ipv4(neutral, super::frames::DST4).udp(1000, PORT_DROP).build(),
        Packet::eth().ipv4(neutral, super::frames::DST4).tcp(1000, PORT_DROP).ack().build(),
        Packet::eth().ipv4(any_drop, super::frames::DST4).udp(1000, 7).build(),
    ]
}

pub fn to_ip(a: &Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::oracle::read;
    use crate::packet::Packet;

    #[test]
    fn the_model_follows_the_policy() {
        let mut m = Model::new();
        let from =
            |class: u8, port: u16| read(&Packet::eth().ipv4([10, 9, class, 2], [10, 9, 0, 1]).udp(5, port).build());
        assert_eq!(m.expect(&from(CLASS_ALLOW, PORT_DROP)).reason, "allow_list");
        assert_eq!(m.expect(&from(CLASS_DENY, 80)).reason, "deny_list");
        assert_eq!(m.expect(&from(5, PORT_DROP)).refused_by, vec!["fuzz/port-drop"]);
        assert_eq!(m.expect(&from(5, PORT_PASS)).passed, vec!["fuzz/port-pass"]);
        assert_eq!(m.expect(&from(5, 80)).reason, "no_rule");
        let e = m.expect(&from(CLASS_ANY_PASS, PORT_CONN));
        assert_eq!(e.passed, vec!["fuzz/conn", "fuzz/any-pass"]);
        assert_eq!(m.expect(&from(CLASS_ANY_DROP, PORT_PASS)).refused_by, vec!["fuzz/any-drop"]);
        // A TCP ACK is no new connection.
        let ack = read(&Packet::eth().ipv4([10, 9, 5, 2], [10, 9, 0, 1]).tcp(5, PORT_CONN).ack().build());
        assert_eq!(m.expect(&ack).reason, "no_rule");
        // Later fragments follow their first fragment.
        let first = Packet::eth().ipv4([10, 9, 5, 2], [10, 9, 0, 1]).ip_id(7).mf().udp(5, PORT_DROP).build();
        let later = Packet::eth().ipv4([10, 9, 5, 2], [10, 9, 0, 1]).ip_id(7).frag_offset(3).protocol(17).build();
        assert_eq!(m.expect(&read(&later)).reason, "fragment_unknown");
        assert_eq!(m.expect(&read(&first)).reason, "shared_bucket");
        assert_eq!(m.expect(&read(&later)).reason, "fragment_of_dropped");
    }
}
