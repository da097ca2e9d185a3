//! `limiter-agent explain PATH...`: the compiled plan as a table, and the Envoy `rate_limits`
//! actions a gateway needs so that the descriptors it sends match the L7 rules.
//!
//! The table has one row per kernel rule, derived kernel guard and L7 rule: name, layer
//! (`kernel`, `kernel guard`, `L7`), key (how counters are split: per source, per header,
//! shared, per descriptor entry), what is counted, rate, burst, scope, mode, RLS domain and
//! targets. Then, per RLS domain and targets, a YAML document with the route's `rate_limits`
//! (see `policy::compile` for the descriptor each gateway-kind rule expects). Entries of an
//! envoyproxy/ratelimit config that no policy says the origin of are printed with the action
//! most gateways use for that key and a comment saying it is assumed.
//!
//! With a `ListenerMap` in the set, a list of the `Gateway` / `HTTPRoute` targets it resolved
//! follows the table: policy, target, ports, and the map entries used.
//!
//! `--json` prints the same as one JSON object: `{"rules": [...], "rate_limits": [...],
//! "listeners": [...], "warnings": [...]}`.

mod actions;
mod table;
#[cfg(test)]
mod tests;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;

use self::actions::{Group, action_groups};
use self::table::{ListenerRow, Row, listener_rows, rows, write_listeners, write_table};
use super::check;

/// Show what each rule becomes, where it is enforced, and the gateway config it needs.
#[derive(Debug, Clone, clap::Args)]
pub struct ExplainArgs {
    /// Policy files, or directories of `*.yaml` / `*.yml` files; all of them form one set.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// One JSON object on stdout instead of the table and YAML.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    report(&args.paths, args.json, &mut stdout.lock(), &mut stderr.lock())
}

/// [`run`] with the output streams given, for tests. Errors and warnings go to `err` as
/// `check` prints them; exit code 1 on any error.
pub fn report(paths: &[PathBuf], json: bool, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<ExitCode> {
    // In JSON mode the warnings are part of the object; stderr stays for errors.
    let mut sink = Vec::new();
    let warnings_to: &mut dyn Write = if json { &mut sink } else { err };
    let Some(compiled) = check::load(paths, warnings_to)? else {
        if json {
            err.write_all(&sink)?;
        }
        return Ok(ExitCode::FAILURE);
    };
    let rows = rows(&compiled);
    let groups = action_groups(&compiled.l7.rules);
    if json {
        let object = json!({
            "rules": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
            "rate_limits": groups.iter().map(Group::to_json).collect::<Vec<_>>(),
            "listeners": listener_rows(&compiled).iter().map(ListenerRow::to_json).collect::<Vec<_>>(),
            "warnings": compiled.notices.iter().map(ToString::to_string).collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&object)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    write_table(out, &rows)?;
    if compiled.plan.rules.iter().any(|r| r.source.distinct) {
        writeln!(out, "\nIPv6 sources are counted per --ipv6-source-prefix (default /64).")?;
    }
    write_listeners(out, &listener_rows(&compiled))?;
    if !groups.is_empty() {
        writeln!(
            out,
            "\n# Envoy rate_limits for the L7 rules: put each list in the route (or virtual host) named,\n\
             # with the HTTP filter envoy.filters.http.ratelimit pointed at this agent in the domain named."
        )?;
        for g in &groups {
            g.write_yaml(out)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
