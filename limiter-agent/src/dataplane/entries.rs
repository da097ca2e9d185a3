//! Turns a [`KernelPlan`] into the map entries of one policy set. Pure: no BPF here, so the
//! layout is unit-tested without root.

use std::collections::{BTreeMap, HashMap, HashSet};

use ipnet::IpNet;
use limiter_common::{
    Addr, BucketParams, COUNT_BYTES, COUNT_CONNECTIONS, COUNT_PACKETS, IPV4_MAPPED_PREFIX, KEY_BY_PORT, KEY_BY_SOURCE,
    LIST_KEY_SET_BITS, ListKey, ListValue, MAX_RULES, MAX_RULES_PER_PORT, PROTO_ANY, PROTO_TCP, PROTO_UDP, PortKey,
    PortRules, RULE_FLAG_GLOBAL_SOURCE, RULE_FLAG_INVERT, RULE_FLAG_SHADOW, RuleConfig, ipv4_mapped,
};

use crate::plan::{CountKind, KernelPlan, KernelRule, Protocol};

/// Why a plan cannot be loaded into the kernel maps.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("rule {rule}: rate {requests}/{unit} cannot be enforced (zero, or more than one per nanosecond)")]
    UnenforceableRate { rule: String, requests: u64, unit: String },
    #[error("rule {rule}: `invert` with {nets} source networks cannot be enforced in the kernel (use one network)")]
    InvertManyNets { rule: String, nets: usize },
    #[error("{what}: {count} rules apply to it, the kernel evaluates at most {MAX_RULES_PER_PORT}")]
    TooManyRulesForPort { what: String, count: usize },
    #[error("the plan needs {needed} rule slots, the kernel has {MAX_RULES}")]
    TooManyRules { needed: usize },
    #[error("more than {MAX_RULES} distinct rules over the agent's lifetime are live at once")]
    OutOfRuleIds,
}

/// Everything that defines a rule's buckets. Two rules with the same identity share bucket
/// state across reloads; any change here gives the rule fresh buckets.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleIdentity {
    name: String,
    count: CountKind,
    requests: u64,
    unit_ns: u64,
    burst: u64,
    key_flags: u8,
    nets: Vec<IpNet>,
    invert: bool,
    targets: Vec<(u16, u8)>,
}

impl RuleIdentity {
    /// A hash of every field, stable across agent builds (FNV-1a over a fixed encoding, not
    /// `std`'s randomly seeded hasher): the pinned record of rule ids is keyed by it, so the
    /// next agent recognises an unchanged rule.
    pub fn fingerprint(&self) -> u64 {
        let mut h = Fnv::default();
        h.bytes(self.name.as_bytes());
        h.bytes(&[
            0xff,
            match self.count {
                CountKind::Packets => 0,
                CountKind::Bytes => 1,
                CountKind::Connections => 2,
            },
            self.key_flags,
            u8::from(self.invert),
        ]);
        for v in [self.requests, self.unit_ns, self.burst] {
            h.bytes(&v.to_le_bytes());
        }
        for net in &self.nets {
            h.bytes(net.to_string().as_bytes());
            h.bytes(&[0]);
        }
        for (port, proto) in &self.targets {
            h.bytes(&port.to_le_bytes());
            h.bytes(&[*proto]);
        }
        h.0
    }

    pub fn of(rule: &KernelRule) -> Self {
        let mut targets: Vec<_> = rule.targets.iter().map(|t| (t.port, proto_number(t.protocol))).collect();
        targets.sort_unstable();
        Self {
            name: rule.name.clone(),
            count: rule.count,
            requests: rule.limit.requests,
            unit_ns: rule.limit.unit.as_ns(),
            burst: rule.limit.burst,
            key_flags: key_flags(rule),
            nets: rule.source.nets.clone(),
            invert: rule.source.invert,
            targets,
        }
    }
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The fingerprint of each of `plan`'s rules, in order.
pub fn fingerprints(plan: &KernelPlan) -> Vec<u64> {
    plan.rules.iter().map(|r| RuleIdentity::of(r).fingerprint()).collect()
}

/// An id's state in [`RuleIds`], as recorded in a pinned set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdState {
    /// Held by the live rule with this fingerprint.
    Live(u64),
    /// Retired by the last apply, purged once.
    Held,
    /// Purged twice: can be handed out.
    Free,
}

/// Stable rule ids. An id keys a rule's buckets and stats, so a rule that is unchanged by a
/// reload keeps its id (and its bucket state); a retired id is only reused after its buckets
/// were purged twice: by the apply that retired it and again by the next one (see
/// [`RuleIds::release`]).
#[derive(Clone, Debug, Default)]
pub struct RuleIds {
    /// By [`RuleIdentity::fingerprint`].
    live: HashMap<u64, u32>,
    /// Ids whose buckets were purged and can be handed out again.
    free: Vec<u32>,
    /// Ids retired by the last apply: purged once, not yet free.
    held: Vec<u32>,
    next: u32,
}

impl RuleIds {
    /// Ids for `plan`'s rules (same order), and the ids that the plan no longer uses.
    pub fn assign(&mut self, plan: &KernelPlan) -> Result<(Vec<u32>, Vec<u32>), PlanError> {
        let wanted = fingerprints(plan);
        let wanted_set: HashSet<&u64> = wanted.iter().collect();
        let retired: Vec<u32> =
            self.live.iter().filter(|(identity, _)| !wanted_set.contains(identity)).map(|(_, id)| *id).collect();
        let mut next_live = HashMap::new();
        let mut ids = Vec::with_capacity(wanted.len());
        for identity in wanted {
            let id = match self.live.get(&identity).or_else(|| next_live.get(&identity)) {
                Some(id) => *id,
                None => self.allocate(&retired)?,
            };
            next_live.insert(identity, id);
            ids.push(id);
        }
        self.live = next_live;
        Ok((ids, retired))
    }

    /// Every id handed out so far with its state: what a pinned set records.
    pub fn export(&self) -> (u32, Vec<(u32, IdState)>) {
        let mut out: Vec<(u32, IdState)> = self.live.iter().map(|(fp, id)| (*id, IdState::Live(*fp))).collect();
        out.extend(self.held.iter().map(|id| (*id, IdState::Held)));
        out.extend(self.free.iter().map(|id| (*id, IdState::Free)));
        out.sort_by_key(|(id, _)| *id);
        (self.next, out)
    }

    /// The ids a pinned set recorded ([`RuleIds::export`]). Ids below `next` that are not
    /// listed are taken as free.
    pub fn restore(next: u32, ids: &[(u32, IdState)]) -> Self {
        let mut out = Self { next: next.min(MAX_RULES), ..Self::default() };
        let mut seen = HashSet::new();
        for &(id, state) in ids.iter().filter(|(id, _)| *id < out.next) {
            seen.insert(id);
            match state {
                IdState::Live(fp) => {
                    out.live.insert(fp, id);
                }
                IdState::Held => out.held.push(id),
                IdState::Free => out.free.push(id),
            }
        }
        out.free.extend((0..out.next).filter(|id| !seen.contains(id)));
        out
    }

    /// The id of the live rule with this fingerprint.
    pub fn id_of(&self, fingerprint: u64) -> Option<u32> {
        self.live.get(&fingerprint).copied()
    }

    /// Ids retired by the previous apply that are still held back: the next apply purges
    /// their buckets again before [`RuleIds::release`] frees them.
    pub fn held(&self) -> &[u32] {
        &self.held
    }

    /// Called once the buckets of `retired` (and of [`RuleIds::held`]) were purged: frees the
    /// held ids and holds `retired` until the next apply.
    ///
    /// Why one more apply: a packet that read the old active set just before the flip is
    /// still judged by the retired rules, so its charge can recreate a bucket right after the
    /// purge. Handing the id to a new rule at once would let that rule inherit the old rule's
    /// state. Such a packet finishes within one program run (microseconds, with preemption
    /// off), long before the agent's next apply, whose purge removes whatever it left.
    pub fn release(&mut self, retired: &[u32]) {
        let ready = std::mem::replace(&mut self.held, retired.to_vec());
        self.free.extend(ready);
    }

    fn allocate(&mut self, retiring: &[u32]) -> Result<u32, PlanError> {
        if self.next < MAX_RULES {
            self.next += 1;
            return Ok(self.next - 1);
        }
        // Never hand out an id that is being retired in this same reload: its buckets still
        // hold the old rule's state until they are purged.
        let pos = self.free.iter().position(|id| !retiring.contains(id)).ok_or(PlanError::OutOfRuleIds)?;
        Ok(self.free.swap_remove(pos))
    }
}

/// The map entries of one policy set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetEntries {
    /// `(slot, config)`; the map index is `set * MAX_RULES + slot`.
    pub rules: Vec<(u32, RuleConfig)>,
    pub ports: Vec<(PortKey, PortRules)>,
    /// `(prefix_len, key, value)`: single hosts (`LIST_HOST_PREFIX`) go to the host hashes,
    /// the rest to the LPM tries.
    pub allow: Vec<(u32, ListKey, ListValue)>,
    pub deny: Vec<(u32, ListKey, ListValue)>,
    /// Rule id → rule name, for stats.
    pub names: BTreeMap<u32, String>,
}

impl SetEntries {
    /// `CONFIG_FLAG_NO_ALLOW[_HOSTS]` / `CONFIG_FLAG_NO_DENY[_HOSTS]` for this set: the
    /// program skips the probe of a map its active set leaves empty.
    pub fn list_flags(&self) -> u32 {
        use limiter_common::{
            CONFIG_FLAG_NO_ALLOW, CONFIG_FLAG_NO_ALLOW_HOSTS, CONFIG_FLAG_NO_DENY, CONFIG_FLAG_NO_DENY_HOSTS,
            LIST_HOST_PREFIX,
        };
        let flags = |list: &[(u32, ListKey, ListValue)], no_prefixes: u32, no_hosts: u32| {
            let hosts = list.iter().filter(|(p, _, _)| *p == LIST_HOST_PREFIX).count();
            (if hosts == list.len() { no_prefixes } else { 0 }) | if hosts == 0 { no_hosts } else { 0 }
        };
        flags(&self.allow, CONFIG_FLAG_NO_ALLOW, CONFIG_FLAG_NO_ALLOW_HOSTS)
            | flags(&self.deny, CONFIG_FLAG_NO_DENY, CONFIG_FLAG_NO_DENY_HOSTS)
    }
}

/// Lays out `plan` as the entries of policy set `set`, with rule ids from `ids`.
pub fn layout(plan: &KernelPlan, set: u8, ids: &[u32]) -> Result<SetEntries, PlanError> {
    let mut out = SetEntries::default();
    // Slots per rule (a rule with several source networks takes one slot per network).
    let mut any_port: Vec<(u8, u32)> = Vec::new();
    let mut by_port: BTreeMap<(u16, u8), Vec<(u8, u32)>> = BTreeMap::new();
    for (rule, &rule_id) in plan.rules.iter().zip(ids) {
        let config = rule_config(rule, rule_id)?;
        out.names.insert(rule_id, rule.name.clone());
        let nets: Vec<Option<IpNet>> = if rule.source.nets.is_empty() {
            vec![None]
        } else {
            if rule.source.invert && rule.source.nets.len() > 1 {
                return Err(PlanError::InvertManyNets { rule: rule.name.clone(), nets: rule.source.nets.len() });
            }
            dedup_nets(&rule.source.nets).into_iter().map(Some).collect()
        };
        for net in nets {
            let slot = out.rules.len() as u32;
            let mut config = config;
            if let Some(net) = net {
                let (addr, prefix) = mapped(net);
                config.source_net = addr;
                config.source_prefix = prefix;
            }
            out.rules.push((slot, config));
            let stage = stage(config.key_flags);
            if rule.targets.is_empty() {
                any_port.push((stage, slot));
            } else {
                for t in &rule.targets {
                    by_port.entry((t.port, proto_number(t.protocol))).or_default().push((stage, slot));
                }
            }
        }
    }
    if out.rules.len() > MAX_RULES as usize {
        return Err(PlanError::TooManyRules { needed: out.rules.len() });
    }
    // Each port's list also carries the any-port rules, so the program does one lookup.
    for ((port, protocol), mut slots) in by_port {
        slots.extend_from_slice(&any_port);
        let what = format!("port {port}/{}", if protocol == PROTO_TCP { "TCP" } else { "UDP" });
        out.ports.push((PortKey { port, protocol, set }, port_rules(slots, what)?));
    }
    if !any_port.is_empty() {
        out.ports.push((
            PortKey { port: 0, protocol: PROTO_ANY, set },
            port_rules(any_port, "traffic without a targeted port".to_owned())?,
        ));
    }
    for entry in &plan.allow {
        out.allow.push(list_entry(entry.net, set, 0));
    }
    for entry in &plan.deny {
        out.deny.push(list_entry(entry.net, set, 0));
    }
    Ok(out)
}

/// Shared buckets first (a spoofed flood is held there before it can create per-source
/// state), then per-source, then per-(source, port): the data path order of DESIGN.md.
fn stage(key_flags: u8) -> u8 {
    match (key_flags & KEY_BY_SOURCE != 0, key_flags & KEY_BY_PORT != 0) {
        (false, _) => 0,
        (true, false) => 1,
        (true, true) => 2,
    }
}

fn port_rules(mut slots: Vec<(u8, u32)>, what: String) -> Result<PortRules, PlanError> {
    if slots.len() > MAX_RULES_PER_PORT {
        return Err(PlanError::TooManyRulesForPort { what, count: slots.len() });
    }
    // Stable: policy order is kept within a stage.
    slots.sort_by_key(|(stage, _)| *stage);
    let mut rules = PortRules { len: slots.len() as u32, ..Default::default() };
    for (i, (_, slot)) in slots.into_iter().enumerate() {
        rules.slots[i] = slot;
    }
    Ok(rules)
}

fn key_flags(rule: &KernelRule) -> u8 {
    let mut flags = 0;
    if rule.source.distinct {
        flags |= KEY_BY_SOURCE;
    }
    if !rule.targets.is_empty() {
        flags |= KEY_BY_PORT;
    }
    flags
}

fn rule_config(rule: &KernelRule, rule_id: u32) -> Result<RuleConfig, PlanError> {
    let limit = rule.limit;
    let unenforceable = || PlanError::UnenforceableRate {
        rule: rule.name.clone(),
        requests: limit.requests,
        unit: limit.unit.to_string(),
    };
    let (bucket, count) = match rule.count {
        CountKind::Bytes => (BucketParams::for_bytes(limit.requests, limit.unit.as_ns(), limit.burst), COUNT_BYTES),
        CountKind::Packets => {
            (BucketParams::for_packets(limit.requests, limit.unit.as_ns(), limit.burst), COUNT_PACKETS)
        }
        CountKind::Connections => {
            (BucketParams::for_packets(limit.requests, limit.unit.as_ns(), limit.burst), COUNT_CONNECTIONS)
        }
    };
    let mut flags = 0;
    if rule.shadow {
        flags |= RULE_FLAG_SHADOW;
    }
    if rule.source.invert {
        flags |= RULE_FLAG_INVERT;
    }
    // A shadow rule never drops, so its sources are never held either: not counted.
    if rule.global_per_source() && !rule.shadow {
        flags |= RULE_FLAG_GLOBAL_SOURCE;
    }
    Ok(RuleConfig {
        bucket: bucket.ok_or_else(unenforceable)?,
        source_net: [0; 16],
        source_prefix: 0,
        rule_id,
        key_flags: key_flags(rule),
        count,
        flags,
        _pad: [0; 5],
    })
}

/// Merges nested and adjacent networks, so no packet is charged twice by the same rule.
fn dedup_nets(nets: &[IpNet]) -> Vec<IpNet> {
    IpNet::aggregate(&nets.to_vec())
}

pub fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    }
}

/// The address (IPv4-mapped for IPv4) and prefix length in the 128-bit space.
pub fn mapped(net: IpNet) -> (Addr, u32) {
    match net {
        IpNet::V4(n) => (ipv4_mapped(n.network().octets()), IPV4_MAPPED_PREFIX + u32::from(n.prefix_len())),
        IpNet::V6(n) => (n.network().octets(), u32::from(n.prefix_len())),
    }
}

pub fn list_entry(net: IpNet, set: u8, rule_id: u32) -> (u32, ListKey, ListValue) {
    let (addr, prefix) = mapped(net);
    (LIST_KEY_SET_BITS + prefix, ListKey { set_be: u32::from(set).to_be(), addr }, ListValue { rule_id })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Limit, PortTarget, SourceSelector, Unit};

    fn rule(name: &str, distinct: bool, ports: &[u16]) -> KernelRule {
        KernelRule {
            name: name.into(),
            targets: ports.iter().map(|&port| PortTarget { port, protocol: Protocol::Tcp }).collect(),
            source: SourceSelector::everyone(distinct),
            count: CountKind::Packets,
            limit: Limit { requests: 10, unit: Unit::Second, burst: 5 },
            shadow: false,
            global: false,
        }
    }

    #[test]
    fn port_lists_put_shared_buckets_first_and_merge_any_port_rules() {
        let plan = KernelPlan {
            rules: vec![
                rule("p/per-source-port", true, &[80]),
                rule("p/ceiling", false, &[80]),
                rule("p/per-source", true, &[]),
            ],
            ..Default::default()
        };
        let mut ids = RuleIds::default();
        let (ids, _) = ids.assign(&plan).unwrap();
        let e = layout(&plan, 1, &ids).unwrap();
        assert_eq!(e.rules.len(), 3);
        let (key, list) = e.ports.iter().find(|(k, _)| k.port == 80).unwrap();
        assert_eq!(*key, PortKey { port: 80, protocol: PROTO_TCP, set: 1 });
        // ceiling (slot 1, shared), per-source (slot 2, any port), per-source-port (slot 0).
        assert_eq!(&list.slots[..list.len as usize], &[1, 2, 0]);
        let (_, any) = e.ports.iter().find(|(k, _)| k.protocol == PROTO_ANY).unwrap();
        assert_eq!(&any.slots[..any.len as usize], &[2]);
        assert_eq!(e.rules[0].1.key_flags, KEY_BY_SOURCE | KEY_BY_PORT);
        assert_eq!(e.rules[1].1.key_flags, KEY_BY_PORT);
        assert_eq!(e.rules[2].1.key_flags, KEY_BY_SOURCE);
    }

    #[test]
    fn unchanged_rules_keep_their_ids_and_changed_ones_get_new_ids() {
        let mut ids = RuleIds::default();
        let a = rule("p/a", true, &[80]);
        let b = rule("p/b", false, &[]);
        let plan = KernelPlan { rules: vec![a.clone(), b.clone()], ..Default::default() };
        let (first, retired) = ids.assign(&plan).unwrap();
        assert!(retired.is_empty());
        let mut b2 = b.clone();
        b2.limit.requests = 20;
        let plan2 = KernelPlan { rules: vec![b2, a], ..Default::default() };
        let (second, retired) = ids.assign(&plan2).unwrap();
        assert_eq!(second[1], first[0], "unchanged rule keeps its id");
        assert_ne!(second[0], first[1], "changed rule gets a fresh id");
        assert_eq!(retired, vec![first[1]]);
    }

    #[test]
    fn ids_are_reused_only_one_apply_after_release() {
        let mut ids = RuleIds { next: MAX_RULES, ..Default::default() };
        let plan = KernelPlan { rules: vec![rule("p/a", true, &[])], ..Default::default() };
        assert_eq!(ids.assign(&plan), Err(PlanError::OutOfRuleIds));
        ids.release(&[7]);
        assert_eq!(ids.held(), &[7]);
        assert_eq!(ids.assign(&plan), Err(PlanError::OutOfRuleIds), "held for one more apply");
        ids.release(&[]);
        assert!(ids.held().is_empty());
        assert_eq!(ids.assign(&plan).unwrap().0, vec![7]);
    }

    #[test]
    fn exported_ids_restore_so_unchanged_rules_keep_their_ids_in_the_next_agent() {
        let (a, b) = (rule("p/a", true, &[80]), rule("p/b", false, &[]));
        let mut ids = RuleIds::default();
        let (first, _) = ids.assign(&KernelPlan { rules: vec![a.clone(), b.clone()], ..Default::default() }).unwrap();
        let (next, exported) = ids.export();
        let mut restored = RuleIds::restore(next, &exported);
        let mut b2 = b;
        b2.limit.requests += 1;
        let (second, retired) =
            restored.assign(&KernelPlan { rules: vec![b2, a.clone()], ..Default::default() }).unwrap();
        assert_eq!(second[1], first[0], "the unchanged rule keeps its id across agents");
        assert!(!first.contains(&second[0]), "the changed rule gets a fresh id");
        assert_eq!(retired, vec![first[1]]);
        // The fingerprint is a fixed function of the rule, not of the process.
        assert_eq!(RuleIdentity::of(&a).fingerprint(), RuleIdentity::of(&a.clone()).fingerprint());
        assert_eq!(restored.id_of(RuleIdentity::of(&a).fingerprint()), Some(first[0]));
    }

    #[test]
    fn lists_carry_the_set_in_their_leading_bits() {
        let net: IpNet = "192.0.2.0/24".parse().unwrap();
        let (prefix, key, _) = list_entry(net, 1, 0);
        assert_eq!(prefix, 32 + 96 + 24);
        assert_eq!(key.set_be, 1u32.to_be());
        assert_eq!(&key.addr[10..], &[0xff, 0xff, 192, 0, 2, 0]);
        let (prefix, _, _) = list_entry("fd00::/8".parse().unwrap(), 0, 0);
        assert_eq!(prefix, 32 + 8);
    }

    #[test]
    fn several_networks_take_one_slot_each_and_nested_ones_are_merged() {
        let mut r = rule("p/a", true, &[]);
        r.source.nets =
            vec!["10.0.0.0/8".parse().unwrap(), "10.1.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()];
        let plan = KernelPlan { rules: vec![r.clone()], ..Default::default() };
        let e = layout(&plan, 0, &[3]).unwrap();
        assert_eq!(e.rules.len(), 2);
        assert!(e.rules.iter().all(|(_, c)| c.rule_id == 3));
        r.source.invert = true;
        let plan = KernelPlan { rules: vec![r], ..Default::default() };
        assert!(matches!(layout(&plan, 0, &[3]), Err(PlanError::InvertManyNets { .. })));
    }

    #[test]
    fn too_many_rules_on_one_port_is_an_error() {
        let rules = (0..=MAX_RULES_PER_PORT).map(|i| rule(&format!("p/r{i}"), false, &[443])).collect();
        let plan = KernelPlan { rules, ..Default::default() };
        let ids: Vec<u32> = (0..=MAX_RULES_PER_PORT as u32).collect();
        assert!(matches!(layout(&plan, 0, &ids), Err(PlanError::TooManyRulesForPort { .. })));
    }

    #[test]
    fn unenforceable_rates_are_errors() {
        let mut r = rule("p/a", true, &[]);
        r.limit.requests = 0;
        let plan = KernelPlan { rules: vec![r], ..Default::default() };
        assert!(matches!(layout(&plan, 0, &[0]), Err(PlanError::UnenforceableRate { .. })));
    }
}
