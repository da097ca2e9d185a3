//! The benchmark's smoke run: `limiter-bench --smoke` (every section at toy sizes) must
//! produce every figure, each a positive finite number. Nothing here judges a timing: the
//! point is that `cargo xtask bench` cannot rot unnoticed.

use std::process::Command;

use limiter_tests::require_root;
use serde_json::Value;

/// Keys whose values are labels, settings, signed per-run errors, or a component that is
/// legitimately zero (deferred softirq work), rather than figures.
const NOT_FIGURES: [&str; 5] = ["machine", "config", "signed_error_pct_runs", "nft_ruleset", "ksoftirqd_s"];

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
    assert_eq!(rows("accuracy"), 2, "one and two senders");
    assert!(rows("memory") >= 2);
    assert!(results["agent"]["policy"].as_array().map(Vec::len).unwrap_or(0) >= 4);
    let l7 = results["agent"]["l7"]["rows"].as_array().expect("L7 engine rows");
    assert_eq!(l7.len(), 4, "HTTP and RLS on 1 and 2 threads");
    for row in l7 {
        let rate = row["per_second_per_core"].as_f64().unwrap_or(f64::NAN);
        assert!(rate.is_finite() && rate > 0.0, "L7 decisions/s must be a positive number: {row}");
    }
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
