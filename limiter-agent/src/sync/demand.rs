//! Shares of `global` kernel rules that follow each node's demand. Pure: no Redis, no BPF.
//!
//! Every sync period each node turns its kernel counters into a demand per global rule (what
//! the rule was offered, in tokens per second, smoothed: [`Smoother`]) and publishes it. Every
//! node then computes every node's share with [`split`] from the same published data, so no
//! node coordinates: shares computed from one view sum to the rule's limit.
//!
//! - Floor: the floors of all nodes together hold `floor` (a fraction) of the limit, in equal
//!   parts, so an idle node admits at once when traffic arrives and grows its share from the
//!   next period on. The rest goes in proportion to demand. Without any demand, equal parts.
//! - Smoothing: a rise in demand counts at once (traffic that moves to a node is followed in
//!   one period); a fall decays by half each period, so a node whose traffic pauses for a
//!   period does not hand its share away and have to win it back.

use std::{collections::BTreeMap, time::Instant};

use crate::{
    dataplane::Stats,
    plan::{CountKind, KernelPlan, Limit},
};

/// The part of a fallen demand kept each period.
pub const DECAY_KEEP: f64 = 0.5;

/// The default `floor`: 5% of each global limit, split equally among the nodes.
pub const DEFAULT_FLOOR: f64 = 0.05;

/// One node's demand: tokens per second offered to each global rule (by rule name).
pub type Demand = BTreeMap<String, f64>;

/// What one node read from Redis at a sync period: the live nodes and their demand.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    /// The node that read it.
    pub this_node: String,
    /// Live node ids, sorted, this one included.
    pub nodes: Vec<String>,
    /// Published demand by node id; a live node that has published nothing yet is absent
    /// (demand 0: it gets its floor).
    pub demand: BTreeMap<String, Demand>,
}

impl View {
    /// A view of `nodes` (this one added if missing) with `demand`; entries of nodes that
    /// are not live are dropped.
    pub fn new(this_node: &str, nodes: impl IntoIterator<Item = String>, mut demand: BTreeMap<String, Demand>) -> Self {
        let mut nodes: Vec<String> = nodes.into_iter().collect();
        nodes.push(this_node.to_owned());
        nodes.sort();
        nodes.dedup();
        demand.retain(|node, _| nodes.binary_search(node).is_ok());
        Self { this_node: this_node.to_owned(), nodes, demand }
    }

    /// Every node's demand for `rule`, in [`View::nodes`] order.
    pub fn weights(&self, rule: &str) -> Vec<f64> {
        self.nodes.iter().map(|n| self.demand.get(n).and_then(|d| d.get(rule)).copied().unwrap_or(0.0)).collect()
    }

    fn index(&self) -> usize {
        self.nodes.binary_search(&self.this_node).unwrap_or(0)
    }
}

/// Splits `total` among nodes of demand `weights`: a floor of `floor * total / n` each, the rest
/// in proportion to the weights (equal parts when no weight is positive). Integers summing to
/// exactly `total` (largest remainders, ties to the earlier node), the same on every node
/// that has the same weights in the same order. Negative, NaN and infinite weights count as 0.
pub fn split(total: u64, weights: &[f64], floor: f64) -> Vec<u64> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let weights: Vec<f64> = weights.iter().map(|w| if w.is_finite() && *w > 0.0 { *w } else { 0.0 }).collect();
    let sum: f64 = weights.iter().sum();
    let t = total as f64;
    let ideal: Vec<f64> = if sum > 0.0 && sum.is_finite() {
        let floor = if floor.is_finite() { floor.clamp(0.0, 1.0) } else { 0.0 };
        let each = t * floor / n as f64;
        let rest = t - t * floor;
        weights.iter().map(|w| each + rest * (w / sum)).collect()
    } else {
        vec![t / n as f64; n]
    };
    largest_remainder(total, &ideal)
}

/// Rounds `ideal` (summing to about `total`) to integers summing to exactly `total`.
fn largest_remainder(total: u64, ideal: &[f64]) -> Vec<u64> {
    let mut out: Vec<u64> = ideal.iter().map(|x| x.max(0.0).floor() as u64).collect();
    let mut order: Vec<usize> = (0..ideal.len()).collect();
    // Largest fractional part first; ties to the earlier node, so every node agrees.
    order.sort_by(|&a, &b| {
        let (fa, fb) = (ideal[a] - ideal[a].floor(), ideal[b] - ideal[b].floor());
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    let mut assigned: u64 = out.iter().fold(0u64, |s, x| s.saturating_add(*x));
    // Float error on huge totals can leave a little over or under: settle it one unit at a
    // time in the same order.
    let mut i = 0;
    while assigned < total {
        out[order[i % order.len()]] += 1;
        assigned += 1;
        i += 1;
    }
    while assigned > total {
        let at = order[order.len() - 1 - (i % order.len())];
        if out[at] > 0 {
            out[at] -= 1;
            assigned -= 1;
        }
        i += 1;
    }
    out
}

/// This node's share of `limit` for `rule` in `view`: requests and burst split by the same
/// weights; requests at least 1 (a rule never becomes "drop everything").
pub fn share_of(limit: Limit, rule: &str, view: &View, floor: f64) -> Limit {
    let weights = view.weights(rule);
    let i = view.index();
    let requests = split(limit.requests, &weights, floor).get(i).copied().unwrap_or(limit.requests);
    let burst = split(limit.burst, &weights, floor).get(i).copied().unwrap_or(limit.burst);
    Limit { requests: requests.max(1), burst, ..limit }
}

/// This node's share of every global rule of `plan`, by rule name.
pub fn shares(plan: &KernelPlan, view: &View, floor: f64) -> BTreeMap<String, Limit> {
    plan.rules
        .iter()
        .filter(|r| r.global_shared())
        .map(|r| (r.name.clone(), share_of(r.limit, &r.name, view, floor)))
        .collect()
}

/// A global rule's cumulative offered count, and which rule counted it: the rule's
/// fingerprint (a reload that changes the rule gives it fresh counters, so counts of two
/// fingerprints do not subtract).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offered {
    pub fingerprint: u64,
    pub count: u64,
}

/// What each global rule of `plan` was offered so far on this node (its counters: passed,
/// dropped and shadow-dropped, in packets, or in bytes for `count: Bytes`).
pub fn offered(plan: &KernelPlan, stats: &Stats) -> BTreeMap<String, Offered> {
    let fingerprints = crate::dataplane::fingerprints(plan);
    plan.rules
        .iter()
        .zip(fingerprints)
        .filter(|(r, _)| r.global_shared())
        .filter_map(|(r, fingerprint)| {
            let c = stats.rules.get(&r.name)?;
            let total = match r.count {
                CountKind::Bytes => c.passed.bytes + c.dropped.bytes + c.shadow_dropped.bytes,
                CountKind::Packets | CountKind::Connections => {
                    c.passed.packets + c.dropped.packets + c.shadow_dropped.packets
                }
            };
            Some((r.name.clone(), Offered { fingerprint, count: total }))
        })
        .collect()
}

/// Turns counter readings into smoothed demand (see the module docs).
#[derive(Debug, Default)]
pub struct Smoother {
    last: Option<(Instant, BTreeMap<String, Offered>)>,
    demand: Demand,
}

impl Smoother {
    /// The demand after a reading of the cumulative counts `counts` taken at `at`. The first
    /// reading gives no rate yet (demand 0); a rule re-created by a reload (another
    /// fingerprint) counts from 0.
    pub fn observe(&mut self, at: Instant, counts: &BTreeMap<String, Offered>) -> &Demand {
        if let Some((then, before)) = &self.last {
            let secs = at.saturating_duration_since(*then).as_secs_f64();
            if secs > 0.0 {
                let mut next = Demand::new();
                for (rule, now) in counts {
                    let prev = before.get(rule).filter(|p| p.fingerprint == now.fingerprint).map_or(0, |p| p.count);
                    let delta = now.count.saturating_sub(prev);
                    let rate = delta as f64 / secs;
                    next.insert(rule.clone(), smooth(self.demand.get(rule).copied().unwrap_or(0.0), rate));
                }
                self.demand = next;
            }
        }
        self.last = Some((at, counts.clone()));
        &self.demand
    }

    pub fn demand(&self) -> &Demand {
        &self.demand
    }
}

/// A rise counts at once, a fall keeps [`DECAY_KEEP`] of the previous demand.
pub fn smooth(previous: f64, rate: f64) -> f64 {
    if rate >= previous { rate } else { previous * DECAY_KEEP + rate * (1.0 - DECAY_KEEP) }
}

#[cfg(test)]
#[path = "demand_tests.rs"]
mod tests;
