use std::time::Duration;

use super::*;
use crate::plan::{KernelRule, SourceSelector, Unit};

fn view(this: &str, demand: &[(&str, f64)]) -> View {
    let nodes = demand.iter().map(|(n, _)| (*n).to_owned());
    let demand = demand.iter().map(|(n, d)| ((*n).to_owned(), Demand::from([("r".to_owned(), *d)]))).collect();
    View::new(this, nodes, demand)
}

/// Rule "r"'s cumulative count `n`, under fingerprint 1.
fn one(n: u64) -> BTreeMap<String, Offered> {
    BTreeMap::from([("r".to_owned(), Offered { fingerprint: 1, count: n })])
}

#[test]
fn split_sums_to_the_total_whatever_the_weights() {
    for total in [0, 1, 2, 7, 20, 100, 1_000_003, u64::from(u32::MAX), 1 << 60] {
        for weights in [&[1.0, 1.0][..], &[0.0, 0.0, 0.0], &[3.0, 1.0, 0.0], &[1e-9, 1e12], &[f64::NAN, -5.0, 2.0]] {
            let s = split(total, weights, DEFAULT_FLOOR);
            assert_eq!(s.iter().sum::<u64>(), total, "total {total}, weights {weights:?}: {s:?}");
        }
    }
    assert!(split(10, &[], 0.05).is_empty());
}

#[test]
fn split_is_proportional_above_the_floor() {
    // 1000 with a 10% floor over 2 nodes: 50 each, then 900 as 3:1.
    assert_eq!(split(1000, &[300.0, 100.0], 0.10), [725, 275]);
    // No floor: pure proportion.
    assert_eq!(split(1000, &[300.0, 100.0], 0.0), [750, 250]);
    // No demand anywhere: equal parts (the static split).
    assert_eq!(split(30, &[0.0, 0.0, 0.0], 0.05), [10, 10, 10]);
    // Rounding: the largest remainders get the units, ties to the earlier node.
    assert_eq!(split(10, &[1.0, 1.0, 1.0], 0.0), [4, 3, 3]);
}

#[test]
fn an_idle_node_keeps_its_floor_and_the_busy_one_gets_the_rest() {
    // 5% of 400 held by the floors of 2 nodes: 10 each.
    assert_eq!(split(400, &[0.0, 5000.0], DEFAULT_FLOOR), [10, 390]);
    // Three nodes: the floors of the two idle ones hold 2/3 of 5%.
    let s = split(300, &[0.0, 1.0, 0.0], DEFAULT_FLOOR);
    assert_eq!(s, [5, 290, 5]);
    // Whatever the other's demand, a node keeps its floor.
    assert_eq!(split(400, &[1e-6, 1e15], DEFAULT_FLOOR), [10, 390]);
    // A floor of 100%: equal parts whatever the demand.
    assert_eq!(split(400, &[0.0, 5000.0], 1.0), [200, 200]);
}

#[test]
fn every_node_computes_the_same_shares_from_the_same_view() {
    let demand = [("node-a", 30.0), ("node-b", 10.0), ("node-c", 0.0)];
    let limit = Limit { requests: 101, unit: Unit::Second, burst: 11 };
    let shares: Vec<Limit> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|this| share_of(limit, "r", &view(this, &demand), DEFAULT_FLOOR))
        .collect();
    assert_eq!(shares.iter().map(|l| l.requests).sum::<u64>(), 101);
    assert_eq!(shares.iter().map(|l| l.burst).sum::<u64>(), 11);
    assert!(shares[0].requests > shares[1].requests && shares[1].requests > shares[2].requests, "{shares:?}");
    assert!(shares[2].requests >= 1, "the idle node keeps its floor: {shares:?}");
    assert!(shares.iter().all(|l| l.unit == Unit::Second));
}

#[test]
fn a_share_is_never_zero_requests() {
    let limit = Limit { requests: 2, unit: Unit::Hour, burst: 0 };
    let v = view("c", &[("a", 100.0), ("b", 100.0), ("c", 0.0)]);
    assert_eq!(share_of(limit, "r", &v, DEFAULT_FLOOR).requests, 1);
}

#[test]
fn stale_and_unknown_entries_drop_out_of_the_view() {
    // Node "gone" published demand but is no longer live (its heartbeat went stale): its
    // demand is ignored and its share goes to the live nodes.
    let demand = BTreeMap::from([
        ("a".to_owned(), Demand::from([("r".to_owned(), 100.0)])),
        ("gone".to_owned(), Demand::from([("r".to_owned(), 1e9)])),
    ]);
    let v = View::new("a", ["b".to_owned()], demand);
    assert_eq!(v.nodes, ["a", "b"]);
    assert!(!v.demand.contains_key("gone"));
    assert_eq!(v.weights("r"), [100.0, 0.0]);
    // A live node that has published nothing yet (just joined) gets its floor.
    let limit = Limit { requests: 400, unit: Unit::Second, burst: 0 };
    assert_eq!(share_of(limit, "r", &v, DEFAULT_FLOOR).requests, 390);
    let v_b = View::new("b", ["a".to_owned()], v.demand.clone());
    assert_eq!(share_of(limit, "r", &v_b, DEFAULT_FLOOR).requests, 10);
    // This node is always in its own view, even when the node list missed it.
    let alone = View::new("x", Vec::new(), BTreeMap::new());
    assert_eq!(alone.nodes, ["x"]);
    assert_eq!(share_of(limit, "r", &alone, DEFAULT_FLOOR), limit);
}

#[test]
fn views_one_period_apart_can_sum_above_the_limit_but_not_where_the_traffic_is() {
    // Traffic moves from a to b. Each node reads the other's demand one period late, so the
    // shares handed out can sum above the limit. But a, which lost its traffic, cannot use its
    // share, and b, where the traffic is, never gets more than the limit less a's floor.
    let limit = 1000u64;
    let (mut da, mut db) = (5000.0, 0.0);
    let mut sums = Vec::new();
    for _ in 0..6 {
        let (old_a, old_b) = (da, db);
        da = smooth(da, 0.0);
        db = smooth(db, 5000.0);
        let a_sees = split(limit, &[da, old_b], DEFAULT_FLOOR)[0];
        let b_sees = split(limit, &[old_a, db], DEFAULT_FLOOR)[1];
        assert!(b_sees <= limit - 25, "b's share {b_sees}");
        sums.push(a_sees + b_sees);
    }
    assert!(sums[0] > limit, "the first period after the move: {sums:?}");
    assert!(sums[5] <= limit + limit / 10, "views converge as a's demand decays: {sums:?}");
}

#[test]
fn a_shift_is_followed_within_four_periods() {
    // All of the traffic moves from node a to node b. b's demand counts at once; a's halves
    // each period. (In the agents, add up to two periods: the first full reading after the
    // move, and the other nodes reading it.)
    let limit = 1000u64;
    let mut smoothers = [Smoother::default(), Smoother::default()];
    let start = Instant::now();
    let mut counts = [0u64, 0u64];
    let mut at = start;
    let period = Duration::from_millis(500);
    let step = |smoothers: &mut [Smoother; 2], counts: &mut [u64; 2], at: &mut Instant, rates: [u64; 2]| {
        *at += period;
        counts[0] += rates[0] / 2;
        counts[1] += rates[1] / 2;
        let d: Vec<f64> =
            (0..2).map(|i| smoothers[i].observe(*at, &one(counts[i])).get("r").copied().unwrap_or(0.0)).collect();
        split(limit, &d, DEFAULT_FLOOR)
    };
    step(&mut smoothers, &mut counts, &mut at, [0, 0]);
    for _ in 0..10 {
        step(&mut smoothers, &mut counts, &mut at, [4000, 0]);
    }
    assert_eq!(step(&mut smoothers, &mut counts, &mut at, [4000, 0]), [975, 25]);
    let mut b_share = Vec::new();
    for _ in 0..4 {
        b_share.push(step(&mut smoothers, &mut counts, &mut at, [0, 4000])[1]);
    }
    // Period 1: b's demand equals a's decayed one; then a's keeps halving.
    assert_eq!(b_share[0], 658, "{b_share:?}");
    assert!(b_share.windows(2).all(|w| w[1] > w[0]), "{b_share:?}");
    assert!(b_share[3] >= 900, "90% of the limit within 4 periods: {b_share:?}");
}

#[test]
fn smoothing_rises_at_once_and_decays_by_half() {
    assert_eq!(smooth(10.0, 100.0), 100.0);
    assert_eq!(smooth(100.0, 0.0), 50.0);
    assert_eq!(smooth(100.0, 50.0), 75.0);
    let mut s = Smoother::default();
    let t0 = Instant::now();
    let counts = one;
    assert!(s.observe(t0, &counts(100)).is_empty(), "the first reading gives no rate");
    assert_eq!(s.observe(t0 + Duration::from_secs(2), &counts(300))["r"], 100.0);
    assert_eq!(s.observe(t0 + Duration::from_secs(3), &counts(500))["r"], 200.0);
    // A reload re-created the rule (another fingerprint): its count starts from zero, even
    // when it happens to be above the old one's.
    let recreated = BTreeMap::from([("r".to_owned(), Offered { fingerprint: 2, count: 550 })]);
    assert_eq!(s.observe(t0 + Duration::from_secs(4), &recreated)["r"], 550.0);
    let recreated = BTreeMap::from([("r".to_owned(), Offered { fingerprint: 2, count: 560 })]);
    assert_eq!(s.observe(t0 + Duration::from_secs(5), &recreated)["r"], 280.0);
    // Same instant twice: nothing changes.
    assert_eq!(s.observe(t0 + Duration::from_secs(5), &recreated)["r"], 280.0);
    assert_eq!(s.demand()["r"], 280.0);
}

#[test]
fn offered_counts_every_judged_packet_of_global_rules() {
    use limiter_common::{Counter, RuleCounter};
    let rule = |name: &str, count, global| KernelRule {
        name: name.into(),
        targets: Vec::new(),
        source: SourceSelector::everyone(false),
        count,
        limit: Limit { requests: 10, unit: Unit::Second, burst: 0 },
        shadow: false,
        global,
    };
    let plan = KernelPlan {
        rules: vec![
            rule("p/pk", CountKind::Packets, true),
            rule("p/by", CountKind::Bytes, true),
            rule("p/local", CountKind::Packets, false),
        ],
        ..Default::default()
    };
    let c = |packets, bytes| Counter { packets, bytes };
    let rc = RuleCounter { passed: c(3, 300), dropped: c(4, 400), shadow_dropped: c(1, 100) };
    let mut stats = Stats::default();
    for name in ["p/pk", "p/by", "p/local"] {
        stats.rules.insert(name.into(), rc);
    }
    let o = offered(&plan, &stats);
    let counts: Vec<(&str, u64)> = o.iter().map(|(n, o)| (n.as_str(), o.count)).collect();
    assert_eq!(counts, [("p/by", 800), ("p/pk", 8)]);
    let fps = crate::dataplane::fingerprints(&plan);
    assert_eq!(o["p/pk"].fingerprint, fps[0]);
    assert_eq!(o["p/by"].fingerprint, fps[1]);
}

#[test]
fn shares_cover_global_rules_only() {
    let mut local = KernelRule {
        name: "p/local".into(),
        targets: Vec::new(),
        source: SourceSelector::everyone(false),
        count: CountKind::Packets,
        limit: Limit { requests: 10, unit: Unit::Second, burst: 0 },
        shadow: false,
        global: false,
    };
    let mut global = local.clone();
    global.name = "p/global".into();
    global.global = true;
    local.limit.requests = 99;
    let plan = KernelPlan { rules: vec![local, global], ..Default::default() };
    let v = view("a", &[("a", 0.0), ("b", 0.0)]);
    let s = shares(&plan, &v, DEFAULT_FLOOR);
    assert_eq!(s.keys().collect::<Vec<_>>(), ["p/global"]);
    assert_eq!(s["p/global"].requests, 5);
}
