//! The benchmark's smoke run: `limiter-bench --smoke` (every section at toy sizes) must
//! produce every figure, each a positive finite number. Nothing here judges a timing: the
//! point is that `cargo xtask bench` cannot rot unnoticed.

use std::process::Command;

use limiter_tests::require_root;
use serde_json::Value;

/// Keys whose values are labels, settings, signed per-run errors, a component that is
/// legitimately zero (deferred softirq work), health counters that are zero in a good run (the
/// RLS section's `checks`: Redis errors, failure-mode answers), or RLS shares of over-limit
/// traffic, which a toy-sized run on a busy machine may not reach (checked as finite and >= 0
/// below), rather than figures.
const NOT_FIGURES: [&str; 14] = [
    "machine",
    "config",
    "signed_error_pct_runs",
    "nft_ruleset",
    "ksoftirqd_s",
    "checks",
    "over_limit_share",
    "negative_cache_hits_per_call",
    // Per-source inserts that failed on the new-source path: zero in a good run.
    "insert_failures",
    // Charges refused after six lost compare-and-swaps with both CPUs on one bucket: rare.
    "contended_refusals",
    // Counts that are rightly 0 on some rows: no per-source entry for a list hit, no call
    // behind the fixed-rate schedule.
    "tracked",
    "late_calls",
    // The source-varying harness's own cost, the difference of two timings: about 2 ns, so a
    // noisy run may put it at or just below zero.
    "harness_ns",
    // The RLS client's fixed call rate: null for the saturation rows, which have none.
    "rate",
];

/// Every number under `v`, with its path, skipping [`NOT_FIGURES`].
fn numbers<'a>(v: &'a Value, path: String, out: &mut Vec<(String, &'a Value)>) {
    match v {
        Value::Object(map) => {
            for (k, x) in map {
                if !NOT_FIGURES.contains(&k.as_str()) {
                    numbers(x, format!("{path}.{k}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                numbers(x, format!("{path}[{i}]"), out);
            }
        }
        Value::Number(_) | Value::Null => out.push((path, v)),
        _ => {}
    }
}

#[test]
fn smoke_bench_produces_every_figure() {
    require_root();
    let dir = std::env::temp_dir().join(format!("limiter-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("results.json");
    let status =
        Command::new(env!("CARGO_BIN_EXE_limiter-bench")).arg("--smoke").arg("--out").arg(&out).status().unwrap();
    assert!(status.success(), "limiter-bench --smoke failed: {status}");
    let results: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    // Every section is there, with the rows the report expects.
    let rows = |section: &str| results[section]["rows"].as_array().map(Vec::len).unwrap_or(0);
    let occupancies = results["config"]["occupancies"].as_array().map(Vec::len).unwrap_or(0);
    assert!(occupancies >= 2, "the smoke run measures several occupancies");
    assert_eq!(rows("per_packet"), 8 * occupancies, "8 check/path scenarios at each occupancy");
    assert_eq!(rows("flood"), 4, "no filter, limiter native and generic, nftables");
    assert_eq!(rows("nic"), 5, "NIC-like: no filter, limiter, nftables, iptables, xdp-filter");
    let pp = &results["per_packet"];
    let lists = results["config"]["list_sizes"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(pp["lists"].as_array().map(Vec::len), Some(4 * lists), "allow and deny, hosts and prefixes, each size");
    let peer = pp["peer"]["rows"].as_array().expect("xdp-filter rows");
    assert!(peer.iter().any(|r| r["path"] == "matched") && peer.iter().any(|r| r["path"] == "unmatched"));
    assert_eq!(
        pp["peer"]["limiter_beside"].as_array().map(Vec::len),
        Some(2),
        "deny hit and per-source pass beside it"
    );
    assert!(pp["new_source"]["cpu_ns"].as_f64().is_some(), "the new-source path is timed");
    assert!(pp["two_cpus"]["both_cpu_ns"].as_f64().is_some(), "the shared bucket is timed from both CPUs");
    assert_eq!(rows("accuracy"), 2, "one and two senders");
    assert!(rows("memory") >= 2);
    assert!(results["agent"]["policy"].as_array().map(Vec::len).unwrap_or(0) >= 4);
    let l7 = results["agent"]["l7"]["rows"].as_array().expect("L7 engine rows");
    assert_eq!(l7.len(), 4, "HTTP and RLS on 1 and 2 threads");
    for row in l7 {
        let rate = row["per_second_per_core"].as_f64().unwrap_or(f64::NAN);
        assert!(rate.is_finite() && rate > 0.0, "L7 decisions/s must be a positive number: {row}");
    }
    let rls = results["rls"]["rows"].as_array().expect("RLS rows");
    let backends: Vec<&str> = rls.iter().filter_map(|r| r["backend"].as_str()).collect();
    assert_eq!(
        backends,
        ["local", "redis", "redis-cluster", "redis @ 1,000/s", "redis-cluster @ 1,000/s"],
        "the RLS section measures both backends at saturation, and Redis and the 3-master cluster at a fixed rate"
    );
    for row in rls {
        for figure in ["calls_per_second", "decisions_per_cpu_second", "p50_us", "p99_us", "p999_us"] {
            let x = row[figure].as_f64().unwrap_or(f64::NAN);
            assert!(x.is_finite() && x > 0.0, "RLS {figure} must be a positive number: {row}");
        }
        let share = row["over_limit_share"].as_f64().unwrap_or(f64::NAN);
        assert!((0.0..=1.0).contains(&share), "RLS over-limit share must be a fraction: {row}");
        let runs = row["runs_detail"].as_array().map(Vec::len).unwrap_or(0);
        assert_eq!(runs as u64, results["config"]["runs"].as_u64().unwrap(), "every RLS run is kept: {row}");
    }
    let redis = &rls[1]["redis"];
    for figure in ["round_trips_per_call", "redis_cpu_us_per_call"] {
        let x = redis[figure].as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x > 0.0, "RLS redis {figure} must be a positive number: {redis}");
    }
    let hits = redis["negative_cache_hits_per_call"].as_f64().unwrap_or(f64::NAN);
    assert!(hits.is_finite() && hits >= 0.0, "RLS negative cache hits per call: {redis}");
    for check in ["allow hit", "deny hit", "per-port bucket", "per-source bucket", "per-(source, port) bucket"] {
        assert!(
            results["per_packet"]["rows"].as_array().unwrap().iter().any(|r| r["check"] == check),
            "per-packet cost of {check} is missing"
        );
    }

    // Every figure is a positive finite number.
    let mut all = Vec::new();
    numbers(&results, String::new(), &mut all);
    assert!(all.len() > 100, "only {} figures found", all.len());
    for (path, v) in all {
        let x = v.as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x > 0.0, "{path} = {v} is not a positive finite number");
    }
}
