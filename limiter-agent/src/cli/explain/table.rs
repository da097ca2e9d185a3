//! The plan as a table (one row per kernel rule, kernel guard and L7 rule), and the list of
//! `Gateway` / `HTTPRoute` targets a `ListenerMap` resolved.

use std::io::Write;

use serde_json::{Map, Value, json};

use crate::plan::{Algorithm, KernelRule, L7Rule, L7Target};
use crate::policy::Compiled;
use crate::policy::compile::{entry_key_text, range_text};
use crate::policy::listeners::ports_text;

/// One line of the table.
#[derive(Debug)]
pub(super) struct Row {
    rule: String,
    layer: &'static str,
    key: String,
    counts: String,
    rate: String,
    burst: String,
    scope: String,
    mode: &'static str,
    domain: String,
    targets: String,
}

const HEADER: [&str; 10] = ["RULE", "LAYER", "KEY", "COUNTS", "RATE", "BURST", "SCOPE", "MODE", "DOMAIN", "TARGETS"];

impl Row {
    fn cells(&self) -> [&str; 10] {
        [
            &self.rule,
            self.layer,
            &self.key,
            &self.counts,
            &self.rate,
            &self.burst,
            &self.scope,
            self.mode,
            &self.domain,
            &self.targets,
        ]
    }

    pub(super) fn to_json(&self) -> Value {
        let mut m = Map::new();
        for (name, cell) in HEADER.iter().zip(self.cells()) {
            m.insert(name.to_ascii_lowercase(), Value::String(cell.to_owned()));
        }
        Value::Object(m)
    }
}

pub(super) fn rows(c: &Compiled) -> Vec<Row> {
    let mut rows: Vec<Row> = c.plan.rules.iter().map(kernel_row).collect();
    rows.extend(c.l7.rules.iter().map(l7_row));
    rows
}

fn mode(shadow: bool) -> &'static str {
    if shadow { "shadow" } else { "enforce" }
}

fn kernel_row(r: &KernelRule) -> Row {
    let range = range_text(&r.source.nets, r.source.invert);
    let key = match (r.source.distinct, range.is_empty()) {
        (true, _) => format!("per source{range}"),
        (false, true) => "shared".to_owned(),
        (false, false) => format!("shared by sources{range}"),
    };
    let targets = if r.targets.is_empty() { "all ports".to_owned() } else { ports_text(&r.targets) };
    Row {
        rule: r.name.clone(),
        layer: if r.name.ends_with("#guard") { "kernel guard" } else { "kernel" },
        key,
        counts: r.count.to_string().to_ascii_lowercase(),
        rate: format!("{}/{}", r.limit.requests, r.limit.unit),
        burst: r.limit.burst.to_string(),
        // Kernel buckets live on this node whatever the rule's block.
        scope: "local".to_owned(),
        mode: mode(r.shadow),
        domain: "-".to_owned(),
        targets,
    }
}

fn l7_row(r: &L7Rule) -> Row {
    let (counts, burst) = match (r.algorithm, r.limit) {
        (Algorithm::TokenBucket, Some(l)) => ("requests, token bucket", l.burst.to_string()),
        (Algorithm::TokenBucket, None) => ("requests, token bucket", "-".to_owned()),
        (Algorithm::FixedWindow, _) => ("requests, fixed window", "-".to_owned()),
    };
    Row {
        rule: r.name.clone(),
        layer: "L7",
        key: entry_key_text(r),
        counts: counts.to_owned(),
        rate: r.limit.map_or_else(|| "unlimited".to_owned(), |l| format!("{}/{}", l.requests, l.unit)),
        burst,
        scope: r.scope.to_string(),
        mode: mode(r.shadow),
        domain: r.domain.clone(),
        targets: targets_text(&r.targets),
    }
}

pub(super) fn targets_text(targets: &[L7Target]) -> String {
    if targets.is_empty() {
        return "all requests".to_owned();
    }
    let t: Vec<String> = targets
        .iter()
        .map(|t| match t {
            L7Target::Route(n) => format!("HTTPRoute {n}"),
            L7Target::Gateway(n) => format!("Gateway {n}"),
        })
        .collect();
    t.join(",")
}

pub(super) fn write_table(out: &mut dyn Write, rows: &[Row]) -> std::io::Result<()> {
    if rows.is_empty() {
        return writeln!(out, "no rules");
    }
    let mut widths = HEADER.map(str::len);
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r.cells()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: [&str; 10]| -> std::io::Result<()> {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  "));
            }
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(out, HEADER)?;
    for r in rows {
        line(out, r.cells())?;
    }
    Ok(())
}

/// A policy's `Gateway` / `HTTPRoute` target that a `ListenerMap` resolved to ports.
#[derive(Debug)]
pub(super) struct ListenerRow {
    policy: String,
    target: String,
    ports: String,
    via: String,
}

impl ListenerRow {
    pub(super) fn to_json(&self) -> Value {
        json!({ "policy": self.policy, "target": self.target, "ports": self.ports, "via": self.via })
    }
}

pub(super) fn listener_rows(c: &Compiled) -> Vec<ListenerRow> {
    c.summaries
        .iter()
        .flat_map(|s| {
            s.resolved.iter().map(|r| ListenerRow {
                policy: s.policy.clone(),
                target: r.target.clone(),
                ports: ports_text(&r.ports),
                via: r.via.clone(),
            })
        })
        .collect()
}

/// The resolved targets, and why route-level rules count a whole port in the kernel.
pub(super) fn write_listeners(out: &mut dyn Write, rows: &[ListenerRow]) -> std::io::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(out, "\nTargets resolved by the listener map (kernel rules and guards of the policy cover these ports):")?;
    let width = |f: fn(&ListenerRow) -> &str| rows.iter().map(|r| f(r).chars().count()).max().unwrap_or(0);
    let (wp, wt, wo) = (width(|r| &r.policy), width(|r| &r.target), width(|r| &r.ports));
    for r in rows {
        writeln!(out, "  {:<wp$}  {:<wt$}  {:<wo$}  via {}", r.policy, r.target, r.ports, r.via)?;
    }
    if rows.iter().any(|r| r.target.starts_with("HTTPRoute ")) {
        writeln!(
            out,
            "The kernel cannot tell routes apart on a port: an HTTPRoute's kernel rules count all traffic to its\n\
             gateway's ports, next to the gateway's own (every matching rule applies, the first exhausted drops);\n\
             a route's rules win over its gateway's at L7 only."
        )?;
    }
    Ok(())
}
