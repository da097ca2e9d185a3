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

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{Map, Value, json};

use super::check;
use crate::plan::l7::keys;
use crate::plan::{Algorithm, Attribute, EntryValue, KernelRule, L7Rule, L7Target};
use crate::policy::Compiled;
use crate::policy::compile::{entry_key_text, range_text};
use crate::policy::listeners::ports_text;

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

/// One line of the table.
#[derive(Debug)]
struct Row {
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

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        for (name, cell) in HEADER.iter().zip(self.cells()) {
            m.insert(name.to_ascii_lowercase(), Value::String(cell.to_owned()));
        }
        Value::Object(m)
    }
}

fn rows(c: &Compiled) -> Vec<Row> {
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

fn targets_text(targets: &[L7Target]) -> String {
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

fn write_table(out: &mut dyn Write, rows: &[Row]) -> std::io::Result<()> {
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
struct ListenerRow {
    policy: String,
    target: String,
    ports: String,
    via: String,
}

impl ListenerRow {
    fn to_json(&self) -> Value {
        json!({ "policy": self.policy, "target": self.target, "ports": self.ports, "via": self.via })
    }
}

fn listener_rows(c: &Compiled) -> Vec<ListenerRow> {
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
fn write_listeners(out: &mut dyn Write, rows: &[ListenerRow]) -> std::io::Result<()> {
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

/// One Envoy action producing one descriptor entry, with a note when its source is assumed.
#[derive(Debug, Clone, PartialEq)]
struct Action {
    action: Value,
    note: Option<String>,
}

/// The `rate_limits` entry for one descriptor: its actions and the rules it serves.
#[derive(Debug)]
struct Descriptor {
    actions: Vec<Action>,
    rules: Vec<String>,
}

/// The `rate_limits` of one domain and set of targets.
#[derive(Debug)]
struct Group {
    domain: String,
    targets: Vec<L7Target>,
    descriptors: Vec<Descriptor>,
}

fn action_groups(rules: &[L7Rule]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for r in rules {
        let actions: Vec<Action> = r.entries.iter().map(entry_action).collect();
        if actions.is_empty() {
            continue;
        }
        let pos = groups.iter().position(|g| g.domain == r.domain && g.targets == r.targets);
        let group = match pos {
            Some(i) => &mut groups[i],
            None => {
                groups.push(Group { domain: r.domain.clone(), targets: r.targets.clone(), descriptors: Vec::new() });
                let last = groups.len() - 1;
                &mut groups[last]
            }
        };
        // Rules reached by the same descriptor (e.g. a key-only limit and an exact override)
        // share one `rate_limits` entry.
        match group.descriptors.iter_mut().find(|d| d.actions == actions) {
            Some(d) => d.rules.push(r.name.clone()),
            None => group.descriptors.push(Descriptor { actions, rules: vec![r.name.clone()] }),
        }
    }
    groups
}

fn entry_action(e: &crate::plan::EntryMatch) -> Action {
    let exact = match &e.value {
        EntryValue::Exact(v) => Some(v.as_str()),
        _ => None,
    };
    let known = |action: Value| Action { action, note: None };
    let key_if = |m: &mut Map<String, Value>, default: &str| {
        if e.key != default {
            m.insert("descriptor_key".into(), json!(e.key));
        }
    };
    match &e.attribute {
        Attribute::Fixed => {
            let mut m = Map::new();
            key_if(&mut m, keys::GENERIC_KEY);
            match exact {
                Some(v) => {
                    m.insert("descriptor_value".into(), json!(v));
                    known(json!({ "generic_key": m }))
                }
                None => {
                    m.insert("descriptor_value".into(), json!("..."));
                    Action {
                        action: json!({ "generic_key": m }),
                        note: Some(format!("any constant value of {}", e.key)),
                    }
                }
            }
        }
        Attribute::RemoteAddress => known(json!({ "remote_address": {} })),
        Attribute::Header(name) => {
            known(json!({ "request_headers": { "header_name": name, "descriptor_key": e.key } }))
        }
        Attribute::Path => known(json!({ "request_headers": { "header_name": ":path", "descriptor_key": e.key } })),
        Attribute::Method => known(json!({ "request_headers": { "header_name": ":method", "descriptor_key": e.key } })),
        Attribute::HeaderEquals { name, value } | Attribute::HeaderNotEquals { name, value } => {
            let mut m = Map::new();
            key_if(&mut m, keys::HEADER_MATCH);
            m.insert("descriptor_value".into(), json!(exact.unwrap_or_default()));
            if matches!(e.attribute, Attribute::HeaderNotEquals { .. }) {
                m.insert("expect_match".into(), json!(false));
            }
            m.insert("headers".into(), json!([{ "name": name, "string_match": { "exact": value } }]));
            known(json!({ "header_value_match": m }))
        }
        Attribute::HeaderAbsent(name) => {
            let mut m = Map::new();
            key_if(&mut m, keys::HEADER_MATCH);
            m.insert("descriptor_value".into(), json!(exact.unwrap_or_default()));
            m.insert("expect_match".into(), json!(false));
            m.insert("headers".into(), json!([{ "name": name, "present_match": true }]));
            known(json!({ "header_value_match": m }))
        }
        // An envoyproxy/ratelimit config entry whose origin no policy gave: the usual action
        // for its key.
        Attribute::Descriptor => match (e.key.as_str(), exact) {
            (keys::REMOTE_ADDRESS, _) => known(json!({ "remote_address": {} })),
            (_, Some(v)) => {
                let mut m = Map::new();
                key_if(&mut m, keys::GENERIC_KEY);
                m.insert("descriptor_value".into(), json!(v));
                known(json!({ "generic_key": m }))
            }
            (keys::PATH, None) => Action {
                action: json!({ "request_headers": { "header_name": ":path", "descriptor_key": e.key } }),
                note: Some("assumed: the request path".into()),
            },
            (key, None) => Action {
                action: json!({ "request_headers": { "header_name": key, "descriptor_key": key } }),
                note: Some(format!("assumed: the value of header {key}; any action sending key {key} will do")),
            },
        },
    }
}

impl Group {
    fn to_json(&self) -> Value {
        json!({
            "domain": self.domain,
            "targets": targets_text(&self.targets),
            "rate_limits": self.descriptors.iter().map(|d| json!({
                "rules": d.rules,
                "actions": d.actions.iter().map(|a| a.action.clone()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }

    fn write_yaml(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "---")?;
        writeln!(out, "# domain: {}; {}", self.domain, targets_text(&self.targets))?;
        writeln!(out, "rate_limits:")?;
        for d in &self.descriptors {
            writeln!(out, "  # {}", d.rules.join(", "))?;
            writeln!(out, "  - actions:")?;
            for a in &d.actions {
                let note = a.note.as_ref().map(|n| format!("  # {n}")).unwrap_or_default();
                writeln!(out, "      - {}{note}", flow(&a.action))?;
            }
        }
        Ok(())
    }
}

/// A JSON value as a YAML flow node: keys bare (they are Envoy field names), strings
/// double-quoted (JSON's escapes are YAML's), so the output is valid YAML whatever a value
/// holds.
fn flow(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let items: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {}", flow(v))).collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(flow).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::path::Path;
    use std::time::Instant;

    use super::*;
    use crate::l7::{DescriptorEntry, Engine, EngineConfig, HttpRequest, RequestDescriptor, RlsRequest};
    use crate::plan::L7Plan;
    use crate::policy::load_and_compile;

    /// What Envoy's actions send for a request (its `rate_limits` semantics): the descriptor,
    /// or `None` when an action produces nothing (a missing `request_headers` header, a
    /// `header_value_match` whose outcome is not `expect_match`).
    fn envoy_descriptor(
        actions: &[Action],
        remote: IpAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Option<Vec<DescriptorEntry>> {
        let header =
            |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| (*v).to_owned());
        let text = |v: &Value, field: &str| v.get(field).and_then(Value::as_str).map(str::to_owned);
        let mut entries = Vec::new();
        for a in actions {
            let (kind, body) = a.action.as_object().and_then(|m| m.iter().next()).expect("one action per object");
            let (key, value) = match kind.as_str() {
                "generic_key" => (
                    text(body, "descriptor_key").unwrap_or_else(|| "generic_key".into()),
                    text(body, "descriptor_value")?,
                ),
                "remote_address" => ("remote_address".to_owned(), remote.to_string()),
                "request_headers" => {
                    let name = text(body, "header_name")?;
                    let value = if name == ":path" { Some(path.to_owned()) } else { header(&name) };
                    (text(body, "descriptor_key")?, value?)
                }
                "header_value_match" => {
                    let condition = &body["headers"][0];
                    let name = text(condition, "name")?;
                    let matched = match condition.get("string_match") {
                        Some(m) => header(&name).as_deref() == m["exact"].as_str(),
                        None => header(&name).is_some(),
                    };
                    let expect = body.get("expect_match").and_then(Value::as_bool).unwrap_or(true);
                    if matched != expect {
                        return None;
                    }
                    (
                        text(body, "descriptor_key").unwrap_or_else(|| "header_match".into()),
                        text(body, "descriptor_value")?,
                    )
                }
                other => panic!("unexpected action {other}"),
            };
            entries.push(DescriptorEntry { key, value });
        }
        Some(entries)
    }

    /// For every L7 rule whose entries all have an HTTP source, and a spread of requests: the
    /// rule applies to the request over HTTP exactly when the `rate_limits` actions `explain`
    /// prints make Envoy send a descriptor the engine answers with that rule. That is, the
    /// printed gateway config and the plan agree.
    #[test]
    fn printed_actions_send_the_descriptors_the_plan_expects() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let paths: Vec<PathBuf> =
            ["policies", "gateways/envoy-gateway", "gateways/teg", "gateways/agentgateway", "gateways/kgateway"]
                .iter()
                .map(|d| root.join(d))
                .collect();
        let compiled = load_and_compile(&paths).unwrap_or_else(|e| panic!("{e}"));
        let remotes: [IpAddr; 4] =
            ["192.168.1.1", "10.1.2.3", "203.0.113.9", "2001:db8::1"].map(|s| s.parse().unwrap());
        let header_sets: [&[(&str, &str)]; 5] = [
            &[],
            &[("x-user-id", "alice")],
            &[("x-user-id", "one")],
            &[("X-User-ID", "bob"), ("x-plan", "gold")],
            &[("x-plan", "silver")],
        ];
        let now = Instant::now();
        let mut checked = 0;
        for rule in compiled.l7.rules.iter().filter(|r| r.limit.is_some()) {
            if rule.entries.iter().any(|e| e.attribute == Attribute::Descriptor) {
                continue;
            }
            let actions: Vec<Action> = rule.entries.iter().map(entry_action).collect();
            assert!(actions.iter().all(|a| a.note.is_none()), "{}: every action known", rule.name);
            // The rule alone, untargeted: HTTP tells whether its descriptor is produced.
            let alone = L7Rule { targets: Vec::new(), ..rule.clone() };
            let engine = Engine::new(L7Plan { rules: vec![alone] }, EngineConfig::default());
            let mut applied = 0;
            for remote in remotes {
                for headers in header_sets {
                    let req =
                        HttpRequest { remote, path: "/api/v1/x", method: "GET", headers, route: None, gateway: None };
                    let over_http = !engine.check_request(&req, now).statuses.is_empty();
                    let over_rls = envoy_descriptor(&actions, remote, "/api/v1/x", headers).is_some_and(|entries| {
                        let request = RlsRequest {
                            domain: rule.domain.clone(),
                            descriptors: vec![RequestDescriptor { entries, hits_addend: Some(0) }],
                            hits_addend: 1,
                        };
                        let response = engine.should_rate_limit(&request, now).expect("valid request");
                        response.statuses[0].rule.as_deref() == Some(rule.name.as_str())
                    });
                    assert_eq!(over_http, over_rls, "{} for {remote} {headers:?}", rule.name);
                    applied += usize::from(over_http);
                }
            }
            assert!(applied > 0, "{}: no request variant selects it; add one", rule.name);
            checked += 1;
        }
        assert!(checked >= 15, "only {checked} rules checked");
    }

    #[test]
    fn resolved_targets_follow_the_table_and_the_guards_cover_their_ports() {
        let gateways = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gateways");
        let paths = [gateways.join("listeners.yaml"), gateways.join("envoy-gateway")];
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(report(&paths, false, &mut out, &mut err).unwrap(), ExitCode::SUCCESS);
        let out = String::from_utf8(out).unwrap();
        let guard =
            out.lines().find(|l| l.starts_with("eg-source-ip/rule-0#guard ")).unwrap_or_else(|| panic!("{out}"));
        assert!(guard.contains(" kernel guard ") && guard.ends_with(" 80/TCP,443/TCP"), "{guard}");
        assert!(out.contains("\nTargets resolved by the listener map"), "{out}");
        let listed =
            out.lines().find(|l| l.trim_start().starts_with("eg-source-ip ")).unwrap_or_else(|| panic!("{out}"));
        let cells: Vec<&str> = listed.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
        assert_eq!(cells, ["eg-source-ip", "Gateway eg", "80/TCP,443/TCP", "via ListenerMap node-listeners"]);
        assert!(out.contains("The kernel cannot tell routes apart on a port"), "{out}");

        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(report(&paths, true, &mut out, &mut err).unwrap(), ExitCode::SUCCESS);
        let v: Value = serde_json::from_slice(&out).unwrap();
        let listeners = v["listeners"].as_array().unwrap();
        assert_eq!(listeners.len(), 6, "{listeners:#?}");
        assert_eq!(
            listeners[0],
            json!({"policy": "eg-anonymous", "target": "HTTPRoute http-ratelimit", "ports": "80/TCP,443/TCP", "via": "gateway default/eg of ListenerMap node-listeners"})
        );
    }

    #[test]
    fn yaml_flow_quotes_every_string() {
        let v = json!({"generic_key": {"descriptor_value": "a: b # c"}, "n": [true, 1]});
        assert_eq!(flow(&v), "{generic_key: {descriptor_value: \"a: b # c\"}, n: [true, 1]}");
    }

    #[test]
    fn table_and_actions_for_the_native_examples() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = report(&[root], false, &mut out, &mut err).unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        let out = String::from_utf8(out).unwrap();
        let row = |rule: &str| -> Vec<String> {
            let line = out.lines().find(|l| l.starts_with(&format!("{rule} "))).unwrap_or_else(|| panic!("{out}"));
            line.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect()
        };
        assert_eq!(
            row("task-api/per-client#guard"),
            [
                "task-api/per-client#guard",
                "kernel guard",
                "per source (IPv4)",
                "connections",
                "50/Second",
                "10",
                "local",
                "enforce",
                "-",
                "8080/TCP"
            ]
        );
        assert_eq!(
            row("task-api/anonymous"),
            [
                "task-api/anonymous",
                "L7",
                "shared, without header x-user-id",
                "requests, token bucket",
                "10/Minute",
                "0",
                "local",
                "enforce",
                "limiter",
                "HTTPRoute task-api-route"
            ]
        );
        assert_eq!(row("task-api-trial/tighter-ceiling")[7], "shadow");
        assert!(out.contains(
            "      - {header_value_match: {descriptor_value: \"no x-user-id\", expect_match: false, headers: [{name: \"x-user-id\", present_match: true}]}}\n"
        ), "{out}");
        assert!(out.contains("# domain: limiter; HTTPRoute task-api-route\nrate_limits:\n  # task-api/per-user\n  - actions:\n      - {generic_key: {descriptor_value: \"task-api/per-user\"}}\n"), "{out}");
    }
}
