//! `RateLimitPolicyDoc` (as written) → [`Policy`] (validated), collecting every error.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::error::{ErrorKind, FieldError, SourceRef};
use super::model::*;
use super::spec::*;
use crate::plan::{CountKind, Limit, PortTarget, Protocol, SynproxyMode, Unit};

impl TryFrom<RateLimitPolicyDoc> for Policy {
    type Error = Vec<FieldError>;

    fn try_from(doc: RateLimitPolicyDoc) -> Result<Self, Self::Error> {
        let mut v = Validator::default();
        let policy = v.policy(doc);
        if v.errors.is_empty() { Ok(policy) } else { Err(v.errors) }
    }
}

#[derive(Default)]
struct Validator {
    errors: Vec<FieldError>,
}

fn at<T>(s: &S<T>, field: impl Into<String>) -> At {
    At::new(pos_of(s), field)
}

impl Validator {
    fn err<T>(&mut self, s: &S<T>, field: impl Into<String>, kind: ErrorKind) {
        self.errors.push(FieldError::new(pos_of(s), field, kind));
    }

    fn policy(&mut self, doc: RateLimitPolicyDoc) -> Policy {
        let name = doc.metadata.name;
        self.name(&name, "metadata.name");
        let spec = doc.spec;
        let mode = match &spec.mode {
            None => Mode::Enforce,
            Some(m) => match m.value.to_ascii_lowercase().as_str() {
                "enforce" => Mode::Enforce,
                "shadow" => Mode::Shadow,
                _ => {
                    self.err(m, "spec.mode", unknown("mode", &m.value, "Enforce or Shadow"));
                    Mode::Enforce
                }
            },
        };
        let targets = spec
            .target_refs
            .iter()
            .enumerate()
            .filter_map(|(i, t)| self.target(t, format!("spec.targetRefs[{i}]")))
            .collect();
        let allow = self.cidrs(&spec.allow, "spec.allow");
        let deny = self.cidrs(&spec.deny, "spec.deny");
        let penalty = spec.penalty.as_ref().and_then(|p| self.penalty(p));
        let mut rules = Vec::new();
        let mut seen: HashMap<String, u64> = HashMap::new();
        if let Some(rl) = &spec.rate_limit {
            for (scope, list, key) in [(Scope::Local, &rl.local, "local"), (Scope::Global, &rl.global, "global")] {
                let Some(list) = list else { continue };
                for (i, r) in list.rules.iter().enumerate() {
                    let field = format!("spec.rateLimit.{key}.rules[{i}]");
                    let rname = &r.value.name;
                    if let Some(first_line) = seen.get(&rname.value) {
                        let kind = ErrorKind::DuplicateRule { name: rname.value.clone(), first_line: *first_line };
                        self.err(rname, format!("{field}.name"), kind);
                    } else {
                        seen.insert(rname.value.clone(), pos_of(rname).line);
                    }
                    if let Some(rule) = self.rule(r, scope, field) {
                        rules.push(rule);
                    }
                }
            }
        }
        Policy {
            kind: PolicyKind::RateLimitPolicy,
            name: name.value.clone(),
            namespace: doc.metadata.namespace.map(|n| n.value),
            source: SourceRef::default(),
            at: at(&name, "metadata.name"),
            mode,
            targets,
            allow,
            deny,
            penalty,
            rules,
            descriptor_actions: Vec::new(),
            not_enforced: Vec::new(),
        }
    }

    /// Policy and rule names become `policy/rule` and `policy/rule#guard` in metrics and logs.
    fn name(&mut self, name: &S<String>, field: &str) {
        if let Some(reason) = name_problem(&name.value) {
            self.err(name, field, ErrorKind::InvalidName { name: name.value.clone(), reason });
        }
    }

    fn target(&mut self, t: &S<TargetRefSpec>, field: String) -> Option<Target> {
        let spec = &t.value;
        let kind = spec.kind.value.as_str();
        let before = self.errors.len();
        let result = match kind.to_ascii_lowercase().as_str() {
            "port" => {
                for (present, name) in [
                    (spec.name.is_some(), "name"),
                    (spec.namespace.is_some(), "namespace"),
                    (spec.section_name.is_some(), "sectionName"),
                ] {
                    if present {
                        self.err(t, &field, ErrorKind::TargetRefExtra { kind: "Port".into(), field: name });
                    }
                }
                let port = match &spec.port {
                    None => {
                        let kind = ErrorKind::TargetRefIncomplete { kind: "Port".into(), needs: "port" };
                        self.err(t, &field, kind);
                        None
                    }
                    Some(p) => self.int_in(p, format!("{field}.port"), 1, 65535).and_then(|p| u16::try_from(p).ok()),
                };
                let protocol = match &spec.protocol {
                    None => Some(Protocol::Tcp),
                    Some(p) => match p.value.to_ascii_lowercase().as_str() {
                        "tcp" => Some(Protocol::Tcp),
                        "udp" => Some(Protocol::Udp),
                        _ => {
                            self.err(p, format!("{field}.protocol"), unknown("protocol", &p.value, "TCP or UDP"));
                            None
                        }
                    },
                };
                match (port, protocol) {
                    (Some(port), Some(protocol)) => Some(TargetKind::Port(PortTarget { port, protocol })),
                    _ => None,
                }
            }
            "httproute" | "gateway" => {
                let route =
                    if kind.eq_ignore_ascii_case("gateway") { RouteKind::Gateway } else { RouteKind::HttpRoute };
                for (present, name) in [(spec.port.is_some(), "port"), (spec.protocol.is_some(), "protocol")] {
                    if present {
                        self.err(t, &field, ErrorKind::TargetRefExtra { kind: route.to_string(), field: name });
                    }
                }
                match &spec.name {
                    Some(n) if !n.value.is_empty() => Some(TargetKind::Route {
                        kind: route,
                        name: n.value.clone(),
                        namespace: spec.namespace.as_ref().map(|n| n.value.clone()),
                        section_name: spec.section_name.as_ref().map(|n| n.value.clone()),
                    }),
                    _ => {
                        let kind = ErrorKind::TargetRefIncomplete { kind: route.to_string(), needs: "a name" };
                        self.err(t, &field, kind);
                        None
                    }
                }
            }
            _ => {
                let kind = unknown("targetRef kind", &spec.kind.value, "Port, HTTPRoute or Gateway");
                self.err(&spec.kind, format!("{field}.kind"), kind);
                None
            }
        };
        let syn_proxy = spec.syn_proxy.as_ref().and_then(|s| self.syn_proxy(s, &format!("{field}.synProxy")));
        if let (Some(TargetKind::Port(pt)), Some(_)) = (&result, syn_proxy)
            && pt.protocol != Protocol::Tcp
        {
            let kind = ErrorKind::TargetRefExtra { kind: format!("{} Port", pt.protocol), field: "synProxy" };
            self.err(t, &field, kind);
        }
        if self.errors.len() > before {
            return None;
        }
        result.map(|kind| Target { kind, syn_proxy, at: at(t, field) })
    }

    /// `synProxy: {mode, threshold}`; `None` for `Off` (or an error).
    fn syn_proxy(&mut self, s: &S<SynProxySpec>, field: &str) -> Option<SynproxyMode> {
        let spec = &s.value;
        match spec.mode.value.to_ascii_lowercase().as_str() {
            "off" => None,
            "always" => {
                if let Some(t) = &spec.threshold {
                    let kind = ErrorKind::TargetRefExtra { kind: "synProxy mode Always".into(), field: "threshold" };
                    self.err(t, format!("{field}.threshold"), kind);
                }
                Some(SynproxyMode::Always)
            }
            "threshold" => match &spec.threshold {
                Some(t) => self.limit(t, &format!("{field}.threshold")).map(SynproxyMode::Threshold),
                None => {
                    let kind = ErrorKind::TargetRefIncomplete {
                        kind: "synProxy mode Threshold".into(),
                        needs: "threshold: {requests, unit, burst}",
                    };
                    self.err(s, field, kind);
                    None
                }
            },
            _ => {
                self.err(
                    &spec.mode,
                    format!("{field}.mode"),
                    unknown("synProxy mode", &spec.mode.value, "Always, Threshold or Off"),
                );
                None
            }
        }
    }

    fn cidrs(&mut self, list: &[S<String>], field: &str) -> Vec<Located<IpNet>> {
        list.iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let f = format!("{field}[{i}]");
                self.cidr(c, &f).map(|net| Located { value: net, at: at(c, f) })
            })
            .collect()
    }

    fn cidr(&mut self, c: &S<String>, field: &str) -> Option<IpNet> {
        match parse_cidr(&c.value) {
            Ok(net) => Some(net),
            Err(reason) => {
                self.err(c, field, ErrorKind::InvalidCidr { value: c.value.clone(), reason });
                None
            }
        }
    }

    fn int_in(&mut self, v: &S<i64>, field: String, min: i64, max: i64) -> Option<i64> {
        if v.value < min {
            self.err(v, field, ErrorKind::TooSmall { value: v.value, min });
            None
        } else if v.value > max {
            self.err(v, field, ErrorKind::TooLarge { value: v.value, max });
            None
        } else {
            Some(v.value)
        }
    }

    fn penalty(&mut self, p: &S<PenaltySpec>) -> Option<Penalty> {
        let spec = &p.value;
        let events = self.int_in(&spec.over_limit_events, "spec.penalty.overLimitEvents".into(), 1, u32::MAX.into());
        let within = self.duration(&spec.within, "spec.penalty.within");
        let block = self.duration(&spec.block, "spec.penalty.block");
        Some(Penalty {
            over_limit_events: u32::try_from(events?).ok()?,
            within: within?,
            block: block?,
            at: at(p, "spec.penalty"),
        })
    }

    fn duration(&mut self, d: &S<String>, field: &str) -> Option<Duration> {
        match parse_duration(&d.value) {
            Some(v) => Some(v),
            None => {
                self.err(d, field, ErrorKind::InvalidDuration { value: d.value.clone() });
                None
            }
        }
    }

    fn rule(&mut self, r: &S<RuleSpec>, scope: Scope, field: String) -> Option<Rule> {
        let before = self.errors.len();
        let spec = &r.value;
        self.name(&spec.name, &format!("{field}.name"));
        let mut selectors = Vec::new();
        for (i, s) in spec.client_selectors.iter().enumerate() {
            let sf = format!("{field}.clientSelectors[{i}]");
            if let Some(sel) = self.selector(s, &sf) {
                selectors.push(sel);
            }
        }
        // From the spec, not `selectors`: a selector rejected for another reason still has headers.
        let has_headers = spec.client_selectors.iter().any(|s| s.value.headers.as_ref().is_some_and(|h| !h.is_empty()));
        let count = match &spec.count {
            None if has_headers => Some(Count::Requests),
            None => Some(Count::Kernel(CountKind::Packets)),
            Some(c) => {
                let parsed = match c.value.to_ascii_lowercase().as_str() {
                    "packets" => Some(Count::Kernel(CountKind::Packets)),
                    "bytes" => Some(Count::Kernel(CountKind::Bytes)),
                    "connections" => Some(Count::Kernel(CountKind::Connections)),
                    "requests" => Some(Count::Requests),
                    _ => {
                        let kind = unknown("count", &c.value, "Packets, Bytes, Connections or Requests");
                        self.err(c, format!("{field}.count"), kind);
                        None
                    }
                };
                if let Some(Count::Kernel(k)) = parsed
                    && has_headers
                {
                    self.err(c, format!("{field}.count"), ErrorKind::HeaderCount { count: k.to_string() });
                }
                parsed
            }
        };
        let limit = self.limit(&spec.limit, &format!("{field}.limit"));
        let kernel_guard = match &spec.kernel_guard {
            None => true,
            Some(g) => match g.value.to_ascii_lowercase().as_str() {
                "on" | "true" => true,
                "off" | "false" => false,
                _ => {
                    self.err(g, format!("{field}.kernelGuard"), unknown("kernelGuard", &g.value, "On or Off"));
                    true
                }
            },
        };
        if self.errors.len() > before {
            return None;
        }
        Some(Rule {
            name: spec.name.value.clone(),
            scope,
            selectors,
            count: count?,
            limit: limit?,
            kernel_guard,
            cost: Default::default(),
            at: at(r, field),
        })
    }

    fn selector(&mut self, s: &S<ClientSelectorSpec>, field: &str) -> Option<ClientSelector> {
        let spec = &s.value;
        if spec.source_cidr.is_none() && spec.headers.is_none() {
            self.err(s, field, ErrorKind::EmptySelector);
            return None;
        }
        let before = self.errors.len();
        let source = spec.source_cidr.as_ref().and_then(|c| {
            let f = format!("{field}.sourceCIDR");
            let distinct = self.match_type(c.type_.as_ref(), &f);
            let net = self.cidr(&c.value, &format!("{f}.value"));
            Some(SourceCidr { net: net?, distinct: distinct?, invert: c.invert.as_ref().is_some_and(|i| i.value) })
        });
        let mut headers = Vec::new();
        if let Some(list) = &spec.headers {
            if list.is_empty() {
                self.err(s, format!("{field}.headers"), ErrorKind::EmptyHeaders);
            }
            for (i, h) in list.iter().enumerate() {
                let f = format!("{field}.headers[{i}]");
                if h.name.value.trim().is_empty() {
                    let kind = ErrorKind::InvalidName { name: h.name.value.clone(), reason: "must not be empty" };
                    self.err(&h.name, format!("{f}.name"), kind);
                }
                let distinct = self.match_type(h.type_.as_ref(), &f);
                if distinct == Some(false) && h.value.is_none() {
                    self.err(&h.name, &f, ErrorKind::HeaderValueMissing);
                }
                if let Some(distinct) = distinct {
                    headers.push(HeaderMatch {
                        name: h.name.value.clone(),
                        distinct,
                        value: h.value.as_ref().map(|v| v.value.clone()),
                        invert: h.invert.as_ref().is_some_and(|i| i.value),
                    });
                }
            }
        }
        if self.errors.len() > before {
            return None;
        }
        Some(ClientSelector { source, headers, http: Vec::new() })
    }

    /// `type: Exact | Distinct` (default Exact) → `Some(distinct)`.
    fn match_type(&mut self, t: Option<&S<String>>, field: &str) -> Option<bool> {
        let Some(t) = t else { return Some(false) };
        match t.value.to_ascii_lowercase().as_str() {
            "exact" => Some(false),
            "distinct" => Some(true),
            _ => {
                self.err(t, format!("{field}.type"), unknown("type", &t.value, "Exact or Distinct"));
                None
            }
        }
    }

    fn limit(&mut self, l: &S<LimitSpec>, field: &str) -> Option<Limit> {
        let spec = &l.value;
        let requests = self.int_in(&spec.requests, format!("{field}.requests"), 1, i64::MAX);
        let unit = match parse_unit(&spec.unit.value) {
            Some(u) => Some(u),
            None => {
                let kind = ErrorKind::UnknownUnit { value: spec.unit.value.clone() };
                self.err(&spec.unit, format!("{field}.unit"), kind);
                None
            }
        };
        let burst = match &spec.burst {
            None => Some(0),
            Some(b) => self.int_in(b, format!("{field}.burst"), 0, i64::MAX),
        };
        Some(Limit { requests: u64::try_from(requests?).ok()?, unit: unit?, burst: u64::try_from(burst?).ok()? })
    }
}

/// Why a policy or rule name cannot be used, if it cannot: names become `policy/rule` and
/// `policy/rule#guard` in metrics and logs.
pub(super) fn name_problem(n: &str) -> Option<&'static str> {
    if n.is_empty() {
        Some("must not be empty")
    } else if n.contains(['/', '#']) {
        Some("must not contain '/' or '#' (they separate policy, rule and guard)")
    } else if n.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not contain whitespace")
    } else {
        None
    }
}

fn unknown(what: &'static str, value: &str, expected: &'static str) -> ErrorKind {
    ErrorKind::UnknownValue { what, value: value.to_owned(), expected }
}

/// `Second | Minute | Hour | Day`, any case, with or without a trailing `s`.
pub fn parse_unit(s: &str) -> Option<Unit> {
    let lower = s.trim().to_ascii_lowercase();
    let singular = lower.strip_suffix('s').unwrap_or(&lower);
    match singular {
        "second" => Some(Unit::Second),
        "minute" => Some(Unit::Minute),
        "hour" => Some(Unit::Hour),
        "day" => Some(Unit::Day),
        _ => None,
    }
}

/// A CIDR (`10.0.0.0/8`, `fd00::/8`) or a bare address (`/32` or `/128`). Host bits must be
/// zero: `10.0.0.1/8` is most likely a typo, and silently truncating it would widen the match.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    let net: IpNet = s.parse().map_err(|_| "not an IPv4 or IPv6 address or CIDR".to_owned())?;
    if net.trunc() != net {
        return Err(format!("host bits set (did you mean {}?)", net.trunc()));
    }
    Ok(net)
}

/// Go-style durations: one or more `<integer><unit>` with units `ms`, `s`, `m`, `h`, `d`
/// (`500ms`, `10s`, `1h30m`). Zero is rejected.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let ms_per: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total.checked_add(Duration::from_millis(n.checked_mul(ms_per)?))?;
    }
    (!total.is_zero()).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_any_case_and_plural() {
        for (s, u) in [
            ("Second", Unit::Second),
            ("seconds", Unit::Second),
            ("SECOND", Unit::Second),
            ("Minutes", Unit::Minute),
            ("minute", Unit::Minute),
            ("Hours", Unit::Hour),
            ("hour", Unit::Hour),
            ("Day", Unit::Day),
            ("days", Unit::Day),
        ] {
            assert_eq!(parse_unit(s), Some(u), "{s}");
        }
        for bad in ["Minuets", "", "s", "secondss", "ms", "week"] {
            assert_eq!(parse_unit(bad), None, "{bad}");
        }
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.0.0.0/8"), Ok("10.0.0.0/8".parse().unwrap()));
        assert_eq!(parse_cidr("192.0.2.7"), Ok("192.0.2.7/32".parse().unwrap()));
        assert_eq!(parse_cidr("fd00::/8"), Ok("fd00::/8".parse().unwrap()));
        assert_eq!(parse_cidr("2001:db8::1"), Ok("2001:db8::1/128".parse().unwrap()));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("300.1.1.1").is_err());
        assert!(parse_cidr("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        for bad in ["", "10", "s", "0s", "10x", "-1s", "1.5s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
