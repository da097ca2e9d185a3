//! What every Kubernetes-style gateway policy has around its rules, shared by Envoy Gateway,
//! TEG, agentgateway and kgateway: the document header (`apiVersion`, `kind`, `metadata`,
//! `spec`), Gateway API `targetRefs`, and [`finish`].

use crate::policy::error::{ErrorKind, FieldError};
use crate::policy::model::{At, Mode, Policy, PolicyKind, RouteKind, Rule, Target, TargetKind};
use crate::policy::reader::{Node, Reader};
use crate::policy::spec::{S, pos_of};
use crate::policy::validate::name_problem;

/// `apiVersion`, `kind`, `metadata` and `spec` of a gateway document.
pub(in crate::policy::kinds) struct Header<'a> {
    /// The policy with name, namespace and kind set; `None` when `metadata` is broken.
    pub policy: Option<Policy>,
    /// `None` when absent (reported) or not a mapping.
    pub spec: Option<&'a S<Node>>,
}

/// Reads the top level of a Kubernetes-style document. `status` and metadata other than
/// `name` and `namespace` are ignored without a warning: `kubectl get -o yaml` output carries
/// them and they never change what is enforced.
pub(in crate::policy::kinds) fn header<'a>(
    r: &mut Reader,
    root: &'a S<Node>,
    api_version: &'static str,
    kind: PolicyKind,
) -> Header<'a> {
    let mut out = Header { policy: None, spec: None };
    let Some(entries) = r.map(root, "") else { return out };
    let mut metadata = None;
    for (k, v) in entries {
        match k.as_str() {
            "apiVersion" => {
                if let Some(api) = r.string(v, "apiVersion")
                    && api != api_version
                {
                    let err = ErrorKind::UnknownValue { what: "apiVersion", value: api, expected: api_version };
                    r.errors.push(FieldError::new(pos_of(v), "apiVersion", err));
                }
            }
            "kind" | "status" => {}
            "metadata" => metadata = Some(v),
            "spec" => out.spec = Some(v),
            _ => r.unknown_field(v, k),
        }
    }
    if out.spec.is_none() {
        r.missing(root, "", "spec");
    }
    let Some(metadata) = metadata else {
        r.missing(root, "", "metadata");
        return out;
    };
    let Some(entries) = r.map(metadata, "metadata") else { return out };
    let mut name = None;
    let mut namespace = None;
    for (k, v) in entries {
        match k.as_str() {
            "name" => name = r.string(v, "metadata.name").map(|n| (n, v)),
            "namespace" => namespace = r.opt_string(v, "metadata.namespace"),
            _ => {}
        }
    }
    let Some((name, at)) = name else {
        if !entries.iter().any(|(k, _)| k == "name") {
            r.missing(metadata, "metadata", "name");
        }
        return out;
    };
    if let Some(reason) = name_problem(&name) {
        let err = ErrorKind::InvalidName { name: name.clone(), reason };
        r.errors.push(FieldError::new(pos_of(at), "metadata.name", err));
    }
    out.policy = Some(Policy {
        kind,
        name,
        namespace,
        source: Default::default(),
        at: At::new(pos_of(at), "metadata.name"),
        mode: Mode::Enforce,
        targets: Vec::new(),
        allow: Vec::new(),
        deny: Vec::new(),
        penalty: None,
        rules: Vec::new(),
        descriptor_actions: Vec::new(),
        not_enforced: Vec::new(),
    });
    out
}

/// Gateway API policy target references.
#[derive(Default)]
pub(in crate::policy::kinds) struct Targets {
    pub out: Vec<Target>,
    /// A reference to a kind the gateway accepts but this agent does not resolve was skipped.
    pub dropped: bool,
}

/// Gateway API kinds the gateways accept as policy targets that this agent cannot map to
/// ports. A reference to one is reported and skipped, not an error: the policy is valid for
/// its gateway, and rejecting it would reject every other policy of the set with it.
pub(in crate::policy::kinds) const UNRESOLVED_TARGET_KINDS: &[&str] =
    &["GRPCRoute", "TCPRoute", "UDPRoute", "TLSRoute", "ListenerSet", "XListenerSet", "Service", "AgentgatewayBackend"];

/// A policy whose every target was skipped (or that only has `targetSelectors`) would,
/// without targets, apply everywhere: wider than written. Its rules are reported and dropped.
pub(in crate::policy::kinds) fn drop_rules_without_targets(r: &mut Reader, spec: &S<Node>, rules: &mut Vec<Rule>) {
    if rules.is_empty() {
        return;
    }
    let names: Vec<&str> = rules.iter().map(|rule| rule.name.as_str()).collect();
    let what = format!(
        "not enforced: no target this agent can resolve (Gateway or HTTPRoute), so rules {} are dropped",
        names.join(", ")
    );
    r.warn(spec, "spec", &what);
    rules.clear();
}

impl Targets {
    pub fn list(&mut self, r: &mut Reader, n: &S<Node>, field: &str, namespace: Option<&str>) {
        let Some(items) = r.seq(n, field) else { return };
        for (i, item) in items.iter().enumerate() {
            self.one(r, item, &format!("{field}[{i}]"), namespace);
        }
    }

    /// `{group?, kind: Gateway | HTTPRoute, name, sectionName?}`. Other kinds are errors, not
    /// warnings: dropping the reference could leave the policy with none, i.e. everywhere.
    pub fn one(&mut self, r: &mut Reader, n: &S<Node>, field: &str, namespace: Option<&str>) {
        let Some(entries) = r.map(n, field) else { return };
        let (mut kind, mut name, mut section) = (None, None, None);
        for (k, v) in entries {
            let f = format!("{field}.{k}");
            match k.as_str() {
                "group" => {
                    r.opt_string(v, &f);
                }
                "kind" => kind = r.string(v, &f).map(|s| (s, v)),
                "name" => name = r.string(v, &f),
                "sectionName" => section = r.opt_string(v, &f),
                _ => r.unknown_field(v, &f),
            }
        }
        let route = match &kind {
            None => {
                r.missing(n, field, "kind");
                None
            }
            Some((k, _)) if k.eq_ignore_ascii_case("httproute") => Some(RouteKind::HttpRoute),
            Some((k, _)) if k.eq_ignore_ascii_case("gateway") => Some(RouteKind::Gateway),
            Some((k, v)) if UNRESOLVED_TARGET_KINDS.iter().any(|u| u.eq_ignore_ascii_case(k)) => {
                r.warn(
                    v,
                    &format!("{field}.kind"),
                    &format!("not enforced: {k} targets are not resolved by this agent"),
                );
                self.dropped = true;
                return;
            }
            Some((k, v)) => {
                let err = ErrorKind::UnknownValue {
                    what: "targetRef kind",
                    value: k.clone(),
                    expected: "Gateway or HTTPRoute",
                };
                r.errors.push(FieldError::new(pos_of(v), format!("{field}.kind"), err));
                None
            }
        };
        let name = match name {
            Some(n) if !n.is_empty() => Some(n),
            Some(_) => {
                r.errors.push(FieldError::new(pos_of(n), format!("{field}.name"), ErrorKind::EmptyValue));
                None
            }
            None => {
                r.missing(n, field, "name");
                None
            }
        };
        if let (Some(kind), Some(name)) = (route, name) {
            let kind = TargetKind::Route { kind, name, namespace: namespace.map(str::to_owned), section_name: section };
            self.out.push(Target { kind, syn_proxy: None, at: At::new(pos_of(n), field) });
        }
    }
}

/// The policy, its warnings attached, or every error found.
pub(in crate::policy::kinds) fn finish(r: Reader, policy: Option<Policy>) -> Result<Policy, Vec<FieldError>> {
    match policy {
        Some(p) if r.errors.is_empty() => Ok(Policy { not_enforced: r.warnings, ..p }),
        _ => Err(r.errors),
    }
}
