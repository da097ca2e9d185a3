//! kgateway `GatewayExtension` (`gateway.kgateway.dev/v1alpha1`) of `type: RateLimit`: where a
//! `TrafficPolicy`'s `rateLimit.global.extensionRef` sends its descriptors, and how the gateway
//! behaves when the service does not answer.
//!
//! ```yaml
//! spec:
//!   type: RateLimit
//!   rateLimit:
//!     grpcService: {backendRef: {name: limiter, port: 8081}}
//!     domain: api-gateway
//!     failOpen: false        # kgateway's default: a request is denied if the service fails
//!     timeout: 100ms
//! ```
//!
//! Nothing here is enforced by the agent: these are the gateway's settings for calling it. They
//! are read (bad values are errors naming the field) and explained as notices: the Envoy
//! filter settings kgateway derives from them (`failure_mode_deny: !failOpen`, the filter's
//! `timeout`), and that `domain` must be the `domain` of the envoyproxy/ratelimit config holding
//! the limits. Other `type`s (`ExtAuth`, `ExtProc`) are reported as not this agent's.

use super::super::error::{ErrorKind, FieldError};
use super::super::model::{Policy, PolicyKind};
use super::super::source::deserialize;
use super::super::spec::{S, pos_of};
use super::super::validate::parse_duration;
use super::document::{finish, header};
use crate::policy::reader::{Node, Reader};

pub const API_VERSION: &str = "gateway.kgateway.dev/v1alpha1";

pub fn load(src: &str) -> Result<Policy, Vec<FieldError>> {
    let root: S<Node> = deserialize(src).map_err(|e| vec![e])?;
    let mut r = Reader::default();
    let header = header(&mut r, &root, API_VERSION, PolicyKind::GatewayExtension);
    if let Some(spec) = header.spec {
        read_spec(&mut r, spec);
    }
    finish(r, header.policy)
}

fn read_spec(r: &mut Reader, n: &S<Node>) {
    let Some(entries) = r.map(n, "spec") else { return };
    for (k, v) in entries {
        let f = format!("spec.{k}");
        match k.as_str() {
            "type" => match r.opt_string(v, &f) {
                Some(t) if t == "RateLimit" => {}
                Some(t) => r.warn(v, &f, &format!("a {t} extension: not a rate limit service, nothing for this agent")),
                None => {}
            },
            "rateLimit" => rate_limit(r, v, &f),
            "extAuth" | "extProc" => r.warn(v, &f, "not this agent's (the gateway calls another service)"),
            _ => r.unknown_field(v, &f),
        }
    }
}

fn rate_limit(r: &mut Reader, n: &S<Node>, field: &str) {
    let Some(entries) = r.map(n, field) else { return };
    let mut fail_open = false;
    let mut fail_open_at = None;
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "grpcService" => {
                let message = "read: point its backendRef at the agent's --rls-listen (gRPC \
                               envoy.service.ratelimit.v3, plaintext HTTP/2 unless --rls-tls-cert)";
                r.warn(v, &f, message);
            }
            "domain" => {
                if let Some(d) = r.string(v, &f) {
                    if d.is_empty() {
                        r.errors.push(FieldError::new(pos_of(v), f, ErrorKind::EmptyValue));
                    } else {
                        let message = format!(
                            "read: descriptors of the TrafficPolicies using this extension are answered by the \
                             envoyproxy/ratelimit config with `domain: {d}`"
                        );
                        r.warn(v, &f, &message);
                    }
                }
            }
            "failOpen" => {
                fail_open = r.opt_bool(v, &f).unwrap_or(false);
                fail_open_at = Some((v, f));
            }
            "timeout" => {
                if let Some(s) = r.string(v, &f) {
                    match parse_duration(&s) {
                        Some(d) => {
                            let message = format!(
                                "read: Envoy's rate limit filter waits {d:?} for an answer (its `timeout`); on \
                                 expiry the failOpen setting decides"
                            );
                            r.warn(v, &f, &message);
                        }
                        None => {
                            r.errors.push(FieldError::new(pos_of(v), f, ErrorKind::InvalidDuration { value: s }));
                        }
                    }
                }
            }
            _ => r.unknown_field(v, &f),
        }
    }
    let (at, f) = fail_open_at.map_or((n, field.to_owned()), |(v, f)| (v, f));
    let message = if fail_open {
        "read: failOpen true: Envoy's rate limit filter runs with failure_mode_deny: false, so requests pass \
         when this service cannot answer"
    } else {
        "read: failOpen false (kgateway's default): Envoy's rate limit filter runs with failure_mode_deny: true, \
         so requests are denied when this service cannot answer; keep the agent's --redis-failure-mode in line"
    };
    r.warn(at, &f, message);
}
