//! Agent-side costs: policy parse+validate, compile and apply for generated policies of
//! growing size.
//!
//! Two shapes: a deny list of N CIDRs (one policy, one rule), and N rules (one policy per
//! rule, each protecting its own port with a per-source bucket). Rules are bounded by the
//! kernel's rule slots (`MAX_RULES` per policy set), so the rule shape stops below it.
//! Each phase is timed separately; apply goes into a freshly loaded program (load not
//! counted), exactly as `limiter-agent run` applies its first plan.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use limiter_agent::dataplane::{Dataplane, LoadOptions};
use limiter_agent::policy;
use serde_json::{Value, json};

use crate::{Config, median};

/// A policy denying `n` non-adjacent /30 networks (so the compiler cannot merge them) plus
/// one per-source rule.
pub fn cidr_policy(n: usize) -> String {
    let mut y = String::from(
        "apiVersion: limiter.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: bench-cidrs}\nspec:\n  targetRefs:\n    - {kind: Port, port: 8080, protocol: TCP}\n  deny:\n",
    );
    for i in 0..n as u32 {
        let a = u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0)) + i * 8;
        let _ = writeln!(y, "    - {}/30", std::net::Ipv4Addr::from(a));
    }
    y.push_str(
        "  rateLimit:\n    local:\n      rules:\n        - name: per-source\n          clientSelectors: [{sourceCIDR: {type: Distinct, value: 0.0.0.0/0}}]\n          count: Packets\n          limit: {requests: 100, unit: Second, burst: 50}\n",
    );
    y
}

/// `n` policies, each protecting its own port with one per-source rule.
pub fn rules_policy(n: usize) -> String {
    let mut y = String::new();
    for i in 0..n {
        let _ = write!(
            y,
            "---\napiVersion: limiter.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: bench-{i}}}\nspec:\n  targetRefs:\n    - {{kind: Port, port: {}, protocol: UDP}}\n  rateLimit:\n    local:\n      rules:\n        - name: per-source\n          clientSelectors: [{{sourceCIDR: {{type: Distinct, value: 0.0.0.0/0}}}}]\n          count: Packets\n          limit: {{requests: {}, unit: Second, burst: 10}}\n",
            10_000 + i,
            100 + i
        );
    }
    y
}

/// Generated YAML, the deny entries and the rules it must apply.
type Workload = (String, usize, usize);

struct Phases {
    parse: f64,
    compile: f64,
    apply: f64,
}

fn measure(text: &str, expect_cidrs: usize, expect_rules: usize) -> Result<Phases> {
    let mut dp = Dataplane::load(LoadOptions::default()).context("loading the XDP program")?;
    let t0 = Instant::now();
    let policies = match policy::load_str(Path::new("bench.yaml"), text) {
        Ok(p) => p,
        Err(e) => bail!("the generated policy does not parse: {e}"),
    };
    let t1 = Instant::now();
    let compiled = policy::compile(&policy::PolicySet { policies, ..Default::default() });
    let t2 = Instant::now();
    let applied = dp.apply(&compiled.plan).context("applying the generated policy")?;
    let t3 = Instant::now();
    if applied.deny != expect_cidrs || applied.rules != expect_rules {
        bail!(
            "the generated policy applied {} deny entries and {} rules, expected {expect_cidrs} and {expect_rules}",
            applied.deny,
            applied.rules
        );
    }
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
    Ok(Phases { parse: ms(t0, t1), compile: ms(t1, t2), apply: ms(t2, t3) })
}

pub fn run(cfg: &Config) -> Result<Value> {
    let mut rows = Vec::new();
    let max_rules = limiter_common::MAX_RULES as usize;
    for &n in &cfg.policy_sizes {
        let shapes: [(&str, Option<Workload>); 2] =
            [("deny CIDRs", Some((cidr_policy(n), n, 1))), ("rules", (n < max_rules).then(|| (rules_policy(n), 0, n)))];
        for (shape, input) in shapes {
            let Some((text, cidrs, rules)) = input else { continue };
            let mut parse = Vec::new();
            let mut compile = Vec::new();
            let mut apply = Vec::new();
            let mut total = Vec::new();
            for _ in 0..cfg.runs {
                let p = measure(&text, cidrs, rules)?;
                total.push(p.parse + p.compile + p.apply);
                parse.push(p.parse);
                compile.push(p.compile);
                apply.push(p.apply);
            }
            let row = json!({
                "shape": shape,
                "n": n,
                "yaml_bytes": text.len(),
                "parse_ms": median(&parse),
                "compile_ms": median(&compile),
                "apply_ms": median(&apply),
                "total_ms": median(&total),
                "total_ms_runs": total,
            });
            eprintln!(
                "agent: {n:>7} {shape:<10}: parse {:.2} ms, compile {:.2} ms, apply {:.2} ms",
                median(&parse),
                median(&compile),
                median(&apply)
            );
            rows.push(row);
        }
    }
    Ok(json!({ "policy": rows, "max_rules": max_rules, "l7": l7_engine(cfg) }))
}

/// L7 engine decisions per second, with `limiter_agent::l7::bench`'s standard workload
/// (a per-user bucket, a gateway-wide bucket, an envoyproxy/ratelimit fixed window; 1,000
/// users, every request allowed), on 1 and 2 threads, for HTTP checks and RLS requests.
fn l7_engine(cfg: &Config) -> Value {
    use limiter_agent::l7::bench::{bench_engine, run_http, run_rls};
    let per_thread: u64 = if cfg.smoke { 20_000 } else { 1_000_000 };
    let users = 1_000;
    let mut rows = Vec::new();
    for api in ["check_request (HTTP)", "should_rate_limit (RLS)"] {
        for threads in [1usize, 2] {
            let mut rates = Vec::new();
            for _ in 0..cfg.runs {
                // A fresh engine per run, so no run starts with the previous one's counters.
                let engine = bench_engine();
                let run = if api.starts_with("check") {
                    run_http(&engine, threads, per_thread, users)
                } else {
                    run_rls(&engine, threads, per_thread, users)
                };
                rates.push(run.per_second());
            }
            let total = median(&rates);
            eprintln!("agent: L7 {api} on {threads} thread(s): {:.0} decisions/s", total);
            rows.push(json!({
                "api": api,
                "threads": threads,
                "decisions_per_thread": per_thread,
                "per_second": total,
                "per_second_per_core": total / threads as f64,
                "per_second_runs": rates,
            }));
        }
    }
    json!({ "rows": rows, "users": users })
}
