//! The listener map (`kind: ListenerMap`, `limiter.dev/v1alpha1`): which ports the gateways on
//! this node listen on and which gateways each HTTPRoute is attached to, so that policies
//! targeting a `Gateway` or an `HTTPRoute` can be enforced in the kernel too.
//!
//! ```yaml
//! apiVersion: limiter.dev/v1alpha1
//! kind: ListenerMap
//! metadata: {name: node-listeners}
//! spec:
//!   gateways:
//!     - name: eg
//!       namespace: default            # optional
//!       listeners: [{name: https, port: 443, protocol: HTTPS}, {port: 80}]
//!   routes:
//!     - {name: api, namespace: default, gateways: [eg]}   # or `infra/eg` in another namespace
//! ```
//!
//! The kernel sees ports, not gateways: this map is the agent's only source for them (it does
//! not watch the Kubernetes API), which is why it is a document of the policy set, carried by
//! the same files or ConfigMap, checked by `check` and reloaded with the policies.
//!
//! Matching follows the policies' targetRefs, which carry a namespace only when the policy
//! has one: names must be equal, namespaces only when both sides give one. A route's
//! `gateways` entry without a namespace means the route's own (a Gateway API `parentRef`
//! defaults to it). A `Gateway` target's `sectionName` selects the listener of that `name`.
//!
//! Strict like [`super::spec::RateLimitPolicyDoc`]: unknown fields are errors. Within the whole
//! set (every `ListenerMap` of it), map names are unique, a gateway or a route is listed once
//! (entries whose names are equal and whose namespaces could match are the same one), and a
//! route attaches only to gateways some map lists; [`check_set`] reports those, naming both
//! places.

use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;

use super::error::{ErrorKind, FieldError, Location, PolicyError, SourceRef};
use super::model::{At, Located};
use super::spec::{MetadataSpec, S, pos_of};
use crate::plan::{PortTarget, Protocol};

pub const KIND: &str = "ListenerMap";

/// A whole `ListenerMap` document, as written.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerMapDoc {
    pub api_version: S<String>,
    pub kind: S<String>,
    pub metadata: MetadataSpec,
    pub spec: ListenerMapSpec,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerMapSpec {
    #[serde(default)]
    pub gateways: Vec<S<GatewaySpec>>,
    #[serde(default)]
    pub routes: Vec<S<RouteSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    pub name: S<String>,
    #[serde(default)]
    pub namespace: Option<S<String>>,
    pub listeners: Vec<S<ListenerSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerSpec {
    /// The Gateway listener's name, for targetRefs with `sectionName`.
    #[serde(default)]
    pub name: Option<S<String>>,
    pub port: S<i64>,
    /// `TCP` (default) or `UDP`; Gateway API's `HTTP`, `HTTPS` and `TLS` mean TCP. Any case.
    #[serde(default)]
    pub protocol: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec {
    pub name: S<String>,
    #[serde(default)]
    pub namespace: Option<S<String>>,
    /// Gateway names (`eg`, or `namespace/eg`) the route is attached to.
    pub gateways: Vec<S<String>>,
}

/// A validated `ListenerMap`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerMap {
    pub name: String,
    /// File and document; set by the loader.
    pub source: SourceRef,
    /// Where `metadata.name` was written.
    pub at: At,
    pub gateways: Vec<MappedGateway>,
    pub routes: Vec<MappedRoute>,
}

/// `namespace/name`, or `name` alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ref {
    pub name: String,
    pub namespace: Option<String>,
}

impl Ref {
    /// Whether a target or entry `name` in `namespace` may be this one: names equal, and
    /// namespaces too when both are known.
    pub fn matches(&self, name: &str, namespace: Option<&str>) -> bool {
        self.name == name && (self.namespace.is_none() || namespace.is_none() || self.namespace.as_deref() == namespace)
    }
}

impl fmt::Display for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedGateway {
    pub id: Ref,
    pub listeners: Vec<Listener>,
    /// The entry (`spec.gateways[1]`).
    pub at: At,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub name: Option<String>,
    pub port: PortTarget,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedRoute {
    pub id: Ref,
    /// Namespaces filled in from the route's where the entry gave none.
    pub gateways: Vec<Located<Ref>>,
    /// The entry (`spec.routes[0]`).
    pub at: At,
}

impl TryFrom<ListenerMapDoc> for ListenerMap {
    type Error = Vec<FieldError>;

    fn try_from(doc: ListenerMapDoc) -> Result<Self, Self::Error> {
        let mut errors = Vec::new();
        let name = &doc.metadata.name;
        non_empty(name, "metadata.name", &mut errors);
        let gateways = doc
            .spec
            .gateways
            .iter()
            .enumerate()
            .filter_map(|(i, g)| gateway(g, &format!("spec.gateways[{i}]"), &mut errors))
            .collect();
        let routes = doc
            .spec
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| route(r, &format!("spec.routes[{i}]"), &mut errors))
            .collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(ListenerMap {
            name: name.value.clone(),
            source: SourceRef::default(),
            at: At::new(pos_of(name), "metadata.name"),
            gateways,
            routes,
        })
    }
}

fn non_empty(s: &S<String>, field: &str, errors: &mut Vec<FieldError>) -> bool {
    let problem = if s.value.trim().is_empty() {
        Some("must not be empty")
    } else if s.value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not contain whitespace")
    } else {
        None
    };
    if let Some(reason) = problem {
        errors.push(FieldError::new(pos_of(s), field, ErrorKind::InvalidName { name: s.value.clone(), reason }));
    }
    problem.is_none()
}

fn namespace(ns: Option<&S<String>>, field: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    let ns = ns?;
    non_empty(ns, &format!("{field}.namespace"), errors);
    Some(ns.value.clone())
}

fn gateway(g: &S<GatewaySpec>, field: &str, errors: &mut Vec<FieldError>) -> Option<MappedGateway> {
    let before = errors.len();
    let spec = &g.value;
    non_empty(&spec.name, &format!("{field}.name"), errors);
    let ns = namespace(spec.namespace.as_ref(), field, errors);
    if spec.listeners.is_empty() {
        // A gateway without listeners would resolve its policies to no port at all, which
        // reads as "not in the kernel" while looking mapped.
        errors.push(FieldError::new(pos_of(g), format!("{field}.listeners"), ErrorKind::EmptyValue));
    }
    let mut names: HashMap<&str, u64> = HashMap::new();
    let mut listeners = Vec::new();
    for (i, l) in spec.listeners.iter().enumerate() {
        let lf = format!("{field}.listeners[{i}]");
        let name = l.value.name.as_ref().filter(|n| non_empty(n, &format!("{lf}.name"), errors));
        if let Some(n) = name {
            // sectionName picks one listener: two of one name would make it ambiguous.
            if let Some(first_line) = names.get(n.value.as_str()) {
                let kind = ErrorKind::DuplicateRule { name: n.value.clone(), first_line: *first_line };
                errors.push(FieldError::new(pos_of(n), format!("{lf}.name"), kind));
            } else {
                names.insert(&n.value, pos_of(n).line);
            }
        }
        if let Some(port) = listener_port(&l.value, &lf, errors) {
            listeners.push(Listener { name: name.map(|n| n.value.clone()), port });
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(MappedGateway {
        id: Ref { name: spec.name.value.clone(), namespace: ns },
        listeners,
        at: At::new(pos_of(g), field),
    })
}

fn listener_port(l: &ListenerSpec, field: &str, errors: &mut Vec<FieldError>) -> Option<PortTarget> {
    let p = &l.port;
    let port = if p.value < 1 {
        errors.push(FieldError::new(
            pos_of(p),
            format!("{field}.port"),
            ErrorKind::TooSmall { value: p.value, min: 1 },
        ));
        None
    } else {
        match u16::try_from(p.value) {
            Ok(port) => Some(port),
            Err(_) => {
                let kind = ErrorKind::TooLarge { value: p.value, max: 65535 };
                errors.push(FieldError::new(pos_of(p), format!("{field}.port"), kind));
                None
            }
        }
    };
    let protocol = match &l.protocol {
        None => Some(Protocol::Tcp),
        Some(s) => match s.value.to_ascii_lowercase().as_str() {
            // Gateway API listener protocols: HTTP, HTTPS and TLS run over TCP.
            "tcp" | "http" | "https" | "tls" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            _ => {
                let kind = ErrorKind::UnknownValue {
                    what: "protocol",
                    value: s.value.clone(),
                    expected: "TCP, UDP, HTTP, HTTPS or TLS",
                };
                errors.push(FieldError::new(pos_of(s), format!("{field}.protocol"), kind));
                None
            }
        },
    };
    Some(PortTarget { port: port?, protocol: protocol? })
}

fn route(r: &S<RouteSpec>, field: &str, errors: &mut Vec<FieldError>) -> Option<MappedRoute> {
    let before = errors.len();
    let spec = &r.value;
    non_empty(&spec.name, &format!("{field}.name"), errors);
    let ns = namespace(spec.namespace.as_ref(), field, errors);
    if spec.gateways.is_empty() {
        errors.push(FieldError::new(pos_of(r), format!("{field}.gateways"), ErrorKind::EmptyValue));
    }
    let mut gateways = Vec::new();
    for (i, g) in spec.gateways.iter().enumerate() {
        let gf = format!("{field}.gateways[{i}]");
        let (gns, gname) = match g.value.split_once('/') {
            Some((n, name)) => (Some(n), name),
            None => (None, g.value.as_str()),
        };
        let bad = [gns.unwrap_or("x"), gname].iter().any(|part| part.trim().is_empty() || part.contains('/'));
        if bad || g.value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            let reason = "expected a gateway name, or namespace/name";
            errors.push(FieldError::new(pos_of(g), gf, ErrorKind::InvalidName { name: g.value.clone(), reason }));
            continue;
        }
        let namespace = gns.map(str::to_owned).or_else(|| ns.clone());
        gateways.push(Located { value: Ref { name: gname.to_owned(), namespace }, at: At::new(pos_of(g), gf) });
    }
    if errors.len() > before {
        return None;
    }
    Some(MappedRoute {
        id: Ref { name: spec.name.value.clone(), namespace: ns },
        gateways,
        at: At::new(pos_of(r), field),
    })
}

/// Set-level checks over every `ListenerMap` of a set: unique map names, each gateway and route
/// listed once, every route's gateways listed. Each error names both places where it can.
pub fn check_set(maps: &[ListenerMap]) -> Vec<PolicyError> {
    let mut errors = Vec::new();
    let mut names: HashMap<&str, Location> = HashMap::new();
    for m in maps {
        let here = m.source.at(m.at.pos);
        match names.get(m.name.as_str()) {
            Some(first) => errors.push(PolicyError {
                location: here,
                field: m.at.field.clone(),
                kind: ErrorKind::DuplicateListenerMap { name: m.name.clone(), first: first.to_string() },
            }),
            None => {
                names.insert(&m.name, here);
            }
        }
    }
    let gateways: Vec<(&ListenerMap, &Ref, &At)> =
        maps.iter().flat_map(|m| m.gateways.iter().map(move |g| (m, &g.id, &g.at))).collect();
    let routes: Vec<(&ListenerMap, &Ref, &At)> =
        maps.iter().flat_map(|m| m.routes.iter().map(move |r| (m, &r.id, &r.at))).collect();
    duplicates("gateway", &gateways, &mut errors);
    duplicates("route", &routes, &mut errors);
    for m in maps {
        for r in &m.routes {
            for g in &r.gateways {
                let known = gateways.iter().any(|(_, id, _)| id.matches(&g.value.name, g.value.namespace.as_deref()));
                if !known {
                    errors.push(PolicyError {
                        location: m.source.at(g.at.pos),
                        field: g.at.field.clone(),
                        kind: ErrorKind::UnknownGateway { route: r.id.to_string(), gateway: g.value.to_string() },
                    });
                }
            }
        }
    }
    errors
}

/// Entries that could match the same target: each later one is an error naming the first.
fn duplicates(what: &'static str, entries: &[(&ListenerMap, &Ref, &At)], errors: &mut Vec<PolicyError>) {
    for (i, (m, id, at)) in entries.iter().enumerate() {
        let first = entries[..i].iter().find(|(_, other, _)| other.matches(&id.name, id.namespace.as_deref()));
        if let Some((fm, _, fat)) = first {
            errors.push(PolicyError {
                location: m.source.at(at.pos),
                field: at.field.clone(),
                kind: ErrorKind::DuplicateMapped {
                    what,
                    name: id.to_string(),
                    first: fm.source.at(fat.pos).to_string(),
                },
            });
        }
    }
}

/// What a `Gateway` or `HTTPRoute` target resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The ports, in map order without repeats, and through what (`ListenerMap m`, or
    /// `gateway default/eg of ListenerMap m`).
    Ports { ports: Vec<PortTarget>, via: String },
    /// No map lists it.
    Unmapped,
    /// A `Gateway` target's `sectionName` names no listener of the mapped gateway.
    NoListener { gateway: String, section: String, map: String },
}

/// Resolves targets through the set's maps (after [`check_set`], so each target matches at
/// most one entry unless the target leaves out the namespace).
#[derive(Clone, Copy, Debug)]
pub struct ListenerIndex<'a> {
    pub maps: &'a [ListenerMap],
}

impl<'a> ListenerIndex<'a> {
    fn gateways(&self, name: &str, namespace: Option<&str>) -> Vec<(&'a ListenerMap, &'a MappedGateway)> {
        self.maps
            .iter()
            .flat_map(|m| m.gateways.iter().map(move |g| (m, g)))
            .filter(|(_, g)| g.id.matches(name, namespace))
            .collect()
    }

    /// A `Gateway` target: the ports of its listeners (only the one named `section`, if given).
    pub fn gateway(&self, name: &str, namespace: Option<&str>, section: Option<&str>) -> Resolution {
        let found = self.gateways(name, namespace);
        if found.is_empty() {
            return Resolution::Unmapped;
        }
        let mut ports = Vec::new();
        let mut via = Vec::new();
        for (m, g) in &found {
            let before = ports.len();
            for l in &g.listeners {
                if section.is_none_or(|s| l.name.as_deref() == Some(s)) {
                    push_new(&mut ports, l.port);
                }
            }
            if ports.len() > before || section.is_none() {
                via.push(format!("ListenerMap {}", m.name));
            }
        }
        match (section, ports.is_empty()) {
            (Some(section), true) => {
                let (m, g) = found[0];
                Resolution::NoListener { gateway: g.id.to_string(), section: section.to_owned(), map: m.name.clone() }
            }
            _ => Resolution::Ports { ports, via: dedup_join(via) },
        }
    }

    /// An `HTTPRoute` target: the ports of every gateway it is attached to.
    pub fn route(&self, name: &str, namespace: Option<&str>) -> Resolution {
        let found: Vec<(&ListenerMap, &MappedRoute)> = self
            .maps
            .iter()
            .flat_map(|m| m.routes.iter().map(move |r| (m, r)))
            .filter(|(_, r)| r.id.matches(name, namespace))
            .collect();
        if found.is_empty() {
            return Resolution::Unmapped;
        }
        let mut ports = Vec::new();
        let mut via = Vec::new();
        for (_, r) in found {
            for g in &r.gateways {
                for (gm, gw) in self.gateways(&g.value.name, g.value.namespace.as_deref()) {
                    for l in &gw.listeners {
                        push_new(&mut ports, l.port);
                    }
                    via.push(format!("gateway {} of ListenerMap {}", gw.id, gm.name));
                }
            }
        }
        Resolution::Ports { ports, via: dedup_join(via) }
    }
}

fn push_new(ports: &mut Vec<PortTarget>, p: PortTarget) {
    if !ports.contains(&p) {
        ports.push(p);
    }
}

fn dedup_join(mut v: Vec<String>) -> String {
    let mut seen = Vec::new();
    v.retain(|s| {
        let new = !seen.contains(s);
        if new {
            seen.push(s.clone());
        }
        new
    });
    v.join(", ")
}

/// `443/TCP,80/TCP`, as `explain` prints kernel targets.
pub fn ports_text(ports: &[PortTarget]) -> String {
    ports.iter().map(|p| format!("{}/{}", p.port, p.protocol)).collect::<Vec<_>>().join(",")
}
