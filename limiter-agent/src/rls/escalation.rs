//! Escalation from L7 to the kernel: a source the rate limit service keeps denying is put in
//! the XDP block list (policy `penalty: {overLimitEvents, within, block}`).
//!
//! # What counts
//! A *denial* is one `ShouldRateLimit` call answered with at least one `OVER_LIMIT` status of
//! a rule whose policy has a `penalty` (shadow-mode statuses never count: they answer OK).
//! Several denied rules of one policy in one call count once for that policy; rules of
//! different policies count for each. A source reaching `overLimitEvents` denials of one
//! policy within `within` gets a [`BlockOrder`] for that policy's `block`, and its count
//! starts again from zero.
//!
//! # Whose address
//! [`ClientAddress::RemoteAddress`] (default): the value of the `remote_address` descriptor
//! entry (Envoy's `remote_address` action, the downstream address as Envoy sees it) in any
//! descriptor of the call. [`ClientAddress::Header`] (`--client-ip-header x-forwarded-for
//! --trusted-hops N`): the value of the descriptor entry with that key, which Envoy sends
//! with a `request_headers` action (`header_name: x-forwarded-for`, `descriptor_key:
//! x-forwarded-for`); the address `N` places from the right of its comma-separated list is
//! the client (0: the last one, the address the nearest proxy appended; as Envoy's
//! `xff_num_trusted_hops`). A list shorter than that, or a value that is not an address,
//! escalates nothing: the proxy's address is never blocked in the client's place. IPv4-mapped
//! IPv6 addresses count as IPv4; IPv6 sources are counted per prefix (the kernel's
//! `--ipv6-source-prefix`), since the block list blocks that prefix.
//!
//! Allow-listed sources (policy `allow`) are never blocked. Without `--iface` there is no
//! XDP program, and the agent runs no escalation at all (it logs so once).
//!
//! # Counting within `within`, in bounded memory
//! Each (source, policy) keeps two fixed windows of length `within`: the current one and the
//! previous one. The denials "within the last `within`" are estimated as the current count
//! plus the previous count weighted by how much of the previous window still overlaps the
//! last `within` (the sliding-window estimate). It is exact for bursts inside one window and
//! never counts a denial older than `2 × within`. At most [`EscalationConfig::max_sources`]
//! pairs are tracked; when full, pairs idle for `2 × within` are purged (at most once per
//! second), then an arbitrary pair is evicted for the new one. A flood of denials from many
//! (or spoofed, through a header) addresses thus costs bounded memory; an evicted source
//! starts its count again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use log::{debug, warn};
use tokio::sync::mpsc;

use crate::l7::{Code, DescriptorEntry, RlsRequest, RlsResponse};
pub use crate::plan::PolicyPenalty;
use crate::plan::l7::keys;
use crate::policy::Compiled;

/// Where the client's address comes from in a `ShouldRateLimit` call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientAddress {
    /// The `remote_address` descriptor entry.
    RemoteAddress,
    /// The descriptor entry keyed by this header name (compared case-insensitively), holding
    /// a comma-separated address list such as `x-forwarded-for`; `trusted_hops` proxies
    /// appended their own entries after the client's.
    Header { name: String, trusted_hops: u32 },
}

impl ClientAddress {
    /// The client address of `req`, if it names one this setting trusts.
    pub fn of(&self, req: &RlsRequest) -> Option<IpAddr> {
        let entries = req.descriptors.iter().flat_map(|d| d.entries.iter());
        match self {
            ClientAddress::RemoteAddress => {
                let entry = entries.into_iter().find(|e| e.key == keys::REMOTE_ADDRESS)?;
                parse_addr(&entry.value)
            }
            ClientAddress::Header { name, trusted_hops } => {
                let entry: &DescriptorEntry = entries.into_iter().find(|e| e.key.eq_ignore_ascii_case(name))?;
                let hop = usize::try_from(*trusted_hops).ok()?;
                let value = entry.value.rsplit(',').nth(hop)?;
                parse_addr(value)
            }
        }
    }
}

/// Parses an address as Envoy writes it (`10.0.0.1`, `::1`, `[::1]`), canonical (IPv4-mapped
/// IPv6 becomes IPv4).
fn parse_addr(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let text = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(text);
    text.parse::<IpAddr>().ok().map(|a| a.to_canonical())
}

/// Everything escalation needs from a policy set; replaced on every reload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Penalties {
    pub policies: Vec<PolicyPenalty>,
    /// The set's allow list: never blocked.
    pub allow: Vec<IpNet>,
}

impl Penalties {
    /// The penalties of a compiled policy set and its allow list.
    pub fn of(compiled: &Compiled) -> Penalties {
        Penalties { policies: compiled.penalties.clone(), allow: compiled.plan.allow.iter().map(|e| e.net).collect() }
    }
}

/// Penalties indexed for lookups by rule name.
#[derive(Debug, Default)]
struct Indexed {
    penalties: Penalties,
    /// Rule name → index in `penalties.policies`.
    by_rule: HashMap<String, usize>,
}

impl Indexed {
    fn new(penalties: Penalties) -> Indexed {
        let mut by_rule = HashMap::new();
        for (i, p) in penalties.policies.iter().enumerate() {
            for rule in &p.rules {
                by_rule.insert(rule.clone(), i);
            }
        }
        Indexed { penalties, by_rule }
    }
}

/// A source to put in the XDP block list, sent to the run loop that owns the data path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockOrder {
    pub addr: IpAddr,
    pub duration: Duration,
    pub policy: String,
    /// Denials counted within `within` when the order was given.
    pub denials: u32,
    pub within: Duration,
}

/// Escalation settings.
#[derive(Clone, Debug)]
pub struct EscalationConfig {
    pub client_address: ClientAddress,
    /// Most (source, policy) pairs tracked at once.
    pub max_sources: usize,
    /// IPv6 sources are counted per prefix of this length (the kernel's block-list key).
    pub ipv6_prefix: u8,
}

impl Default for EscalationConfig {
    fn default() -> Self {
        Self { client_address: ClientAddress::RemoteAddress, max_sources: 100_000, ipv6_prefix: 64 }
    }
}

/// Counts denials per source and gives [`BlockOrder`]s. Thread-safe; only denied calls of
/// rules with a penalty touch its lock.
#[derive(Debug)]
pub struct Escalator {
    config: EscalationConfig,
    rules: RwLock<Arc<Indexed>>,
    tracker: Mutex<Tracker>,
    orders: mpsc::Sender<BlockOrder>,
}

#[derive(Debug, Default)]
struct Tracker {
    counts: HashMap<(IpAddr, usize), Windows>,
    last_purge: Option<Instant>,
}

/// Two consecutive fixed windows of one (source, policy).
#[derive(Clone, Copy, Debug)]
struct Windows {
    start: Instant,
    current: u32,
    previous: u32,
}

impl Windows {
    /// Records one denial at `now`; returns the estimated denials within the last `within`.
    fn record(&mut self, now: Instant, within: Duration) -> u32 {
        let within = within.max(Duration::from_millis(1));
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= within * 2 {
            *self = Windows { start: now, current: 0, previous: 0 };
        } else if elapsed >= within {
            *self = Windows { start: self.start + within, current: 0, previous: self.current };
        }
        self.current = self.current.saturating_add(1);
        let into_current = now.saturating_duration_since(self.start).as_secs_f64() / within.as_secs_f64();
        let overlap = (1.0 - into_current).clamp(0.0, 1.0);
        // Rounded down: a partly overlapping denial does not tip the count.
        let estimate = f64::from(self.previous).mul_add(overlap, f64::from(self.current));
        estimate as u32
    }

    fn idle(&self, now: Instant, within: Duration) -> bool {
        now.saturating_duration_since(self.start) >= within * 2
    }
}

impl Escalator {
    /// An escalator sending its orders on `orders` (the run loop applies them).
    pub fn new(config: EscalationConfig, penalties: Penalties, orders: mpsc::Sender<BlockOrder>) -> Escalator {
        Escalator {
            config,
            rules: RwLock::new(Arc::new(Indexed::new(penalties))),
            tracker: Mutex::new(Tracker::default()),
            orders,
        }
    }

    pub fn config(&self) -> &EscalationConfig {
        &self.config
    }

    /// Takes the penalties of a new policy set. Counts start again when they changed (policy
    /// indexes change); an unchanged set keeps them.
    pub fn replace(&self, penalties: Penalties) {
        if self.rules.read().unwrap_or_else(PoisonError::into_inner).penalties == penalties {
            return;
        }
        let indexed = Arc::new(Indexed::new(penalties));
        *self.rules.write().unwrap_or_else(PoisonError::into_inner) = indexed;
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner).counts.clear();
    }

    /// Whether any rule of the plan in force has a penalty.
    pub fn active(&self) -> bool {
        !self.rules.read().unwrap_or_else(PoisonError::into_inner).by_rule.is_empty()
    }

    /// Counts the denials of one answered call and sends the block orders they earn.
    pub fn observe(&self, req: &RlsRequest, resp: &RlsResponse, now: Instant) {
        if resp.overall != Code::OverLimit {
            return;
        }
        let rules = Arc::clone(&self.rules.read().unwrap_or_else(PoisonError::into_inner));
        if rules.by_rule.is_empty() {
            return;
        }
        // The policies denied in this call, each once (a call has few descriptors).
        let mut denied: Vec<usize> = Vec::new();
        for status in resp.statuses.iter().filter(|s| s.code == Code::OverLimit) {
            if let Some(&i) = status.rule.as_ref().and_then(|r| rules.by_rule.get(r))
                && !denied.contains(&i)
            {
                denied.push(i);
            }
        }
        if denied.is_empty() {
            return;
        }
        let Some(addr) = self.config.client_address.of(req) else {
            debug!("escalation: a denied call names no client address ({:?}); not counted", self.config.client_address);
            return;
        };
        if rules.penalties.allow.iter().any(|net| net.contains(&addr)) {
            return;
        }
        let key_addr = self.counting_key(addr);
        for i in denied {
            let penalty = &rules.penalties.policies[i];
            let denials = self.record(key_addr, i, penalty, now);
            if denials < penalty.over_limit_events {
                continue;
            }
            let order = BlockOrder {
                addr,
                duration: penalty.block,
                policy: penalty.policy.clone(),
                denials,
                within: penalty.within,
            };
            if let Err(e) = self.orders.try_send(order) {
                warn!("escalation: block order for {addr} (policy {}) not delivered: {e}", penalty.policy);
            }
        }
    }

    /// Records a denial; returns the estimate, and forgets the pair once it reaches the
    /// threshold (the caller blocks it).
    fn record(&self, addr: IpAddr, policy: usize, penalty: &PolicyPenalty, now: Instant) -> u32 {
        let mut tracker = self.tracker.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (addr, policy);
        if !tracker.counts.contains_key(&key) && tracker.counts.len() >= self.config.max_sources.max(1) {
            self.make_room(&mut tracker, now);
        }
        let windows = tracker.counts.entry(key).or_insert(Windows { start: now, current: 0, previous: 0 });
        let estimate = windows.record(now, penalty.within);
        if estimate >= penalty.over_limit_events {
            tracker.counts.remove(&key);
        }
        estimate
    }

    /// Frees one slot: purge idle pairs (at most once a second), else evict any one.
    fn make_room(&self, tracker: &mut Tracker, now: Instant) {
        if tracker.last_purge.is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1)) {
            tracker.last_purge = Some(now);
            let rules = Arc::clone(&self.rules.read().unwrap_or_else(PoisonError::into_inner));
            let within_of = |i: usize| rules.penalties.policies.get(i).map_or(Duration::ZERO, |p| p.within);
            tracker.counts.retain(|(_, i), w| !w.idle(now, within_of(*i)));
        }
        if tracker.counts.len() >= self.config.max_sources.max(1)
            && let Some(&victim) = tracker.counts.keys().next()
        {
            tracker.counts.remove(&victim);
        }
    }

    /// Drops pairs idle for `2 × within` (call it now and then, e.g. on the stats tick).
    pub fn sweep(&self, now: Instant) {
        let rules = Arc::clone(&self.rules.read().unwrap_or_else(PoisonError::into_inner));
        let within_of = |i: usize| rules.penalties.policies.get(i).map_or(Duration::ZERO, |p| p.within);
        let mut tracker = self.tracker.lock().unwrap_or_else(PoisonError::into_inner);
        tracker.counts.retain(|(_, i), w| !w.idle(now, within_of(*i)));
    }

    /// (source, policy) pairs tracked now (for tests of the memory bound).
    pub fn tracked(&self) -> usize {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner).counts.len()
    }

    /// IPv6 addresses count per prefix, as the kernel blocks them.
    fn counting_key(&self, addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(_) => addr,
            IpAddr::V6(v6) => {
                let prefix = u32::from(self.config.ipv6_prefix.min(128));
                let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
                IpAddr::V6((u128::from_be_bytes(v6.octets()) & mask).into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::{DescriptorStatus, ReportedLimit, RequestDescriptor};
    use crate::plan::Unit;

    fn request(entries: &[(&str, &str)]) -> RlsRequest {
        RlsRequest {
            domain: "limiter".into(),
            descriptors: vec![RequestDescriptor {
                entries: entries
                    .iter()
                    .map(|(k, v)| DescriptorEntry { key: (*k).into(), value: (*v).into() })
                    .collect(),
                hits_addend: None,
                limit: None,
            }],
            hits_addend: 1,
        }
    }

    fn denied(rule: &str) -> RlsResponse {
        RlsResponse {
            overall: Code::OverLimit,
            statuses: vec![DescriptorStatus {
                code: Code::OverLimit,
                limit: Some(ReportedLimit { name: rule.into(), requests_per_unit: 1, unit: Unit::Minute }),
                limit_remaining: 0,
                duration_until_reset: Duration::from_secs(60),
                rule: Some(rule.into()),
                shadow_over_limit: false,
            }],
        }
    }

    fn penalties(events: u32, allow: &[&str]) -> Penalties {
        Penalties {
            policies: vec![PolicyPenalty {
                policy: "p".into(),
                over_limit_events: events,
                within: Duration::from_secs(10),
                block: Duration::from_secs(30),
                rules: vec!["p/r".into()],
            }],
            allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn client_address_from_remote_address_or_a_header_with_trusted_hops() {
        let req = request(&[("generic_key", "p/r"), ("remote_address", "10.0.0.7")]);
        assert_eq!(ClientAddress::RemoteAddress.of(&req), Some("10.0.0.7".parse().unwrap()));
        let mapped = request(&[("remote_address", "::ffff:10.0.0.8")]);
        assert_eq!(ClientAddress::RemoteAddress.of(&mapped), Some("10.0.0.8".parse().unwrap()));
        let xff = request(&[("X-Forwarded-For", "203.0.113.9, 198.51.100.2,10.0.0.1")]);
        let header = |hops| ClientAddress::Header { name: "x-forwarded-for".into(), trusted_hops: hops };
        assert_eq!(header(0).of(&xff), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(header(1).of(&xff), Some("198.51.100.2".parse().unwrap()));
        assert_eq!(header(2).of(&xff), Some("203.0.113.9".parse().unwrap()));
        assert_eq!(header(3).of(&xff), None, "fewer hops than trusted: nobody");
        assert_eq!(header(0).of(&request(&[("x-forwarded-for", "garbage")])), None);
        assert_eq!(ClientAddress::RemoteAddress.of(&xff), None);
    }

    #[test]
    fn n_denials_within_the_window_give_one_block_order() {
        let (tx, mut rx) = mpsc::channel(8);
        let esc = Escalator::new(EscalationConfig::default(), penalties(3, &[]), tx);
        let req = request(&[("remote_address", "10.0.0.7")]);
        let t0 = Instant::now();
        esc.observe(&req, &denied("p/r"), t0);
        esc.observe(&req, &denied("p/r"), t0 + Duration::from_secs(1));
        assert!(rx.try_recv().is_err());
        // A rule without penalty and an allowed answer count nothing.
        esc.observe(&req, &denied("other/r"), t0 + Duration::from_secs(2));
        assert!(rx.try_recv().is_err());
        esc.observe(&req, &denied("p/r"), t0 + Duration::from_secs(2));
        let order = rx.try_recv().expect("third denial within 10s blocks");
        assert_eq!(order.addr, "10.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!((order.duration, order.policy.as_str(), order.denials), (Duration::from_secs(30), "p", 3));
        assert_eq!(esc.tracked(), 0, "a blocked source starts again from zero");
    }

    #[test]
    fn denials_spread_wider_than_the_window_do_not_block() {
        let (tx, mut rx) = mpsc::channel(8);
        let esc = Escalator::new(EscalationConfig::default(), penalties(3, &[]), tx);
        let req = request(&[("remote_address", "10.0.0.7")]);
        let t0 = Instant::now();
        for i in 0..10 {
            esc.observe(&req, &denied("p/r"), t0 + Duration::from_secs(25 * i));
        }
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn allow_listed_sources_are_never_blocked() {
        let (tx, mut rx) = mpsc::channel(8);
        let esc = Escalator::new(EscalationConfig::default(), penalties(1, &["10.0.0.0/8"]), tx);
        let t0 = Instant::now();
        esc.observe(&request(&[("remote_address", "10.0.0.7")]), &denied("p/r"), t0);
        assert!(rx.try_recv().is_err());
        esc.observe(&request(&[("remote_address", "192.0.2.1")]), &denied("p/r"), t0);
        assert_eq!(rx.try_recv().unwrap().addr, "192.0.2.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn memory_is_bounded_under_a_flood_of_sources() {
        let (tx, _rx) = mpsc::channel(8);
        let config = EscalationConfig { max_sources: 100, ..Default::default() };
        let esc = Escalator::new(config, penalties(1000, &[]), tx);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let addr = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            esc.observe(&request(&[("remote_address", &addr)]), &denied("p/r"), t0);
            assert!(esc.tracked() <= 100);
        }
        assert_eq!(esc.tracked(), 100);
        esc.sweep(t0 + Duration::from_secs(20));
        assert_eq!(esc.tracked(), 0);
    }

    #[test]
    fn ipv6_sources_count_per_prefix() {
        let (tx, mut rx) = mpsc::channel(8);
        let esc = Escalator::new(EscalationConfig::default(), penalties(2, &[]), tx);
        let t0 = Instant::now();
        esc.observe(&request(&[("remote_address", "2001:db8::1")]), &denied("p/r"), t0);
        esc.observe(&request(&[("remote_address", "2001:db8::2")]), &denied("p/r"), t0);
        assert_eq!(rx.try_recv().unwrap().addr, "2001:db8::2".parse::<IpAddr>().unwrap());
    }
}
