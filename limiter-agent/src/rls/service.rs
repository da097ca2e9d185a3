//! The `RateLimitService` implementation: proto ↔ engine types, the backend call, metrics
//! and escalation. Mapping and errors are documented in the module docs of [`super`].

use std::collections::HashSet;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Instant, SystemTime};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit as ProtoUnit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code as ProtoCode, DescriptorStatus as ProtoStatus, RateLimit as ProtoLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
use tokio::sync::Semaphore;

use super::Backend;
use super::escalation::{Escalator, Penalties};
use crate::l7::{
    Code, DescriptorEntry, DescriptorStatus, Engine, LimitOverride, ReportedLimit, RequestDescriptor, RequestError,
    RlsRequest, RlsResponse,
};
use crate::metrics::{CODE_OK, CODE_OVER_LIMIT, DecisionLabels, Metrics, ReasonLabels, RuleLabels, UNKNOWN_DOMAIN};
use crate::plan::{L7Plan, Unit};

/// A request the service refuses with `INVALID_ARGUMENT`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("rate limit descriptor {descriptor}: hits_addend {value} is more than {max}")]
    HitsAddend { descriptor: usize, value: u64, max: u32 },
    #[error("rate limit descriptor {descriptor}: is_negative_hits is not supported")]
    NegativeHits { descriptor: usize },
    #[error("rate limit descriptor {descriptor}: limit override with unknown unit {unit}")]
    OverrideUnit { descriptor: usize, unit: i32 },
}

/// Converts a protocol request into the engine's, refusing what the service cannot answer.
/// Moves the strings, copies nothing.
pub fn request_from_proto(req: RateLimitRequest) -> Result<RlsRequest, InvalidRequest> {
    if req.domain.is_empty() {
        return Err(RequestError::EmptyDomain.into());
    }
    if req.descriptors.is_empty() {
        return Err(RequestError::NoDescriptors.into());
    }
    let mut descriptors = Vec::with_capacity(req.descriptors.len());
    for (index, d) in req.descriptors.into_iter().enumerate() {
        // A descriptor without entries, or with an empty key, matches nothing (answered OK),
        // as the reference service does.
        if d.is_negative_hits {
            return Err(InvalidRequest::NegativeHits { descriptor: index });
        }
        let limit = match d.limit {
            None => None,
            Some(l) => Some(LimitOverride {
                requests_per_unit: l.requests_per_unit,
                unit: override_unit(l.unit).ok_or(InvalidRequest::OverrideUnit { descriptor: index, unit: l.unit })?,
            }),
        };
        let hits_addend = match d.hits_addend {
            None => None,
            Some(v) => Some(u32::try_from(v.value).map_err(|_| InvalidRequest::HitsAddend {
                descriptor: index,
                value: v.value,
                max: u32::MAX,
            })?),
        };
        let entries = d.entries.into_iter().map(|e| DescriptorEntry { key: e.key, value: e.value }).collect();
        descriptors.push(RequestDescriptor { entries, hits_addend, limit });
    }
    Ok(RlsRequest { domain: req.domain, descriptors, hits_addend: req.hits_addend })
}

/// `envoy.type.v3.RateLimitUnit` of a limit override. The reference casts it into the
/// response's unit enum, so WEEK (7 there) is accepted too.
fn override_unit(unit: i32) -> Option<Unit> {
    Some(match unit {
        1 => Unit::Second,
        2 => Unit::Minute,
        3 => Unit::Hour,
        4 => Unit::Day,
        5 => Unit::Interval { ns: 30 * NS_PER_DAY },
        6 => Unit::Interval { ns: 365 * NS_PER_DAY },
        7 => Unit::Interval { ns: 7 * NS_PER_DAY },
        _ => return None,
    })
}

const NS_PER_DAY: u64 = 86_400_000_000_000;

fn proto_code(code: Code) -> i32 {
    match code {
        Code::Ok => ProtoCode::Ok as i32,
        Code::OverLimit => ProtoCode::OverLimit as i32,
    }
}

/// The protocol's unit and requests per unit for a limit. Units the protocol has map as
/// they are (week, month and year are the reference's 7, 30 and 365 days); another interval
/// becomes the same rate in the smallest unit at least as long (rounded down, at least 1).
fn proto_limit(limit: &ReportedLimit) -> (ProtoUnit, u32) {
    let rpu = limit.requests_per_unit;
    match limit.unit {
        Unit::Second => (ProtoUnit::Second, rpu),
        Unit::Minute => (ProtoUnit::Minute, rpu),
        Unit::Hour => (ProtoUnit::Hour, rpu),
        Unit::Day => (ProtoUnit::Day, rpu),
        Unit::Interval { ns } if ns == 7 * NS_PER_DAY => (ProtoUnit::Week, rpu),
        Unit::Interval { ns } if ns == 30 * NS_PER_DAY => (ProtoUnit::Month, rpu),
        Unit::Interval { ns } if ns == 365 * NS_PER_DAY => (ProtoUnit::Year, rpu),
        Unit::Interval { ns } => {
            let units = [
                (ProtoUnit::Second, Unit::Second),
                (ProtoUnit::Minute, Unit::Minute),
                (ProtoUnit::Hour, Unit::Hour),
                (ProtoUnit::Day, Unit::Day),
            ];
            let ns = ns.max(1);
            let (proto, unit) = units.into_iter().find(|(_, u)| u.as_ns() >= ns).unwrap_or(units[3]);
            let scaled = u128::from(rpu) * u128::from(unit.as_ns()) / u128::from(ns);
            (proto, u32::try_from(scaled).unwrap_or(u32::MAX).max(u32::from(rpu > 0)))
        }
    }
}

fn proto_status(s: &DescriptorStatus) -> ProtoStatus {
    let current_limit = s.limit.as_ref().map(|l| {
        let (unit, requests_per_unit) = proto_limit(l);
        ProtoLimit { name: l.name.clone(), requests_per_unit, unit: unit as i32 }
    });
    let duration_until_reset = s.limit.as_ref().map(|_| ProtoDuration {
        seconds: i64::try_from(s.duration_until_reset.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    });
    ProtoStatus {
        code: proto_code(s.code),
        current_limit,
        limit_remaining: s.limit_remaining,
        duration_until_reset,
        ..Default::default()
    }
}

/// The protocol response for an engine response.
pub fn response_to_proto(resp: &RlsResponse) -> RateLimitResponse {
    RateLimitResponse {
        overall_code: proto_code(resp.overall),
        statuses: resp.statuses.iter().map(proto_status).collect(),
        ..Default::default()
    }
}

/// The service: decides calls with the engine or Redis, records metrics, feeds escalation.
pub struct RateLimiter {
    engine: Arc<Engine>,
    backend: Backend,
    metrics: Arc<Metrics>,
    escalation: Option<Arc<Escalator>>,
    /// Domains of the plan in force (metric labels only).
    domains: RwLock<Arc<HashSet<String>>>,
    in_flight: Semaphore,
    /// Networks callers may connect from; empty = whoever can reach the port. Callers are
    /// trusted with the client address they name (escalation blocks it), so a service
    /// reachable beyond the gateways should list them.
    allowed_callers: Vec<ipnet::IpNet>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").field("backend", &self.backend).finish_non_exhaustive()
    }
}

impl RateLimiter {
    pub fn new(
        engine: Arc<Engine>,
        backend: Backend,
        metrics: Arc<Metrics>,
        escalation: Option<Arc<Escalator>>,
        max_in_flight: usize,
    ) -> RateLimiter {
        let domains = RwLock::new(Arc::new(super::plan_domains(&engine.plan())));
        RateLimiter {
            engine,
            backend,
            metrics,
            escalation,
            domains,
            in_flight: Semaphore::new(max_in_flight.max(1)),
            allowed_callers: Vec::new(),
        }
    }

    /// Refuses calls from outside `nets` with PERMISSION_DENIED (empty: anyone who can connect).
    pub fn with_allowed_callers(mut self, nets: Vec<ipnet::IpNet>) -> RateLimiter {
        self.allowed_callers = nets;
        self
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn escalation(&self) -> Option<&Arc<Escalator>> {
        self.escalation.as_ref()
    }

    /// Takes a new policy set's L7 part (rules and penalties). The engine swaps its rules
    /// atomically; penalties follow right after (a call decided in between meets the new
    /// rules with the old penalties).
    pub fn replace(&self, l7: L7Plan, penalties: Penalties) {
        let domains = Arc::new(super::plan_domains(&l7));
        self.engine.replace_plan(l7);
        *self.domains.write().unwrap_or_else(PoisonError::into_inner) = domains;
        if let Some(escalation) = &self.escalation {
            escalation.replace(penalties);
        }
    }

    /// Decides one call: backend, metrics, escalation.
    pub async fn decide(&self, req: &RlsRequest) -> Result<RlsResponse, RequestError> {
        let started = Instant::now();
        let resp = match &self.backend {
            Backend::Local => self.engine.should_rate_limit(req, started)?,
            Backend::Redis(redis) => redis.should_rate_limit(&self.engine, req, SystemTime::now()).await?,
        };
        self.metrics.rls_decision_seconds.observe(started.elapsed().as_secs_f64());
        self.record(req, &resp);
        if let Some(escalation) = &self.escalation {
            escalation.observe(req, &resp, started);
        }
        Ok(resp)
    }

    fn record(&self, req: &RlsRequest, resp: &RlsResponse) {
        let known = self.domains.read().unwrap_or_else(PoisonError::into_inner).contains(&req.domain);
        let domain = if known { req.domain.as_str() } else { UNKNOWN_DOMAIN };
        for status in &resp.statuses {
            let rule = status.rule.as_deref().unwrap_or("");
            let code = match status.code {
                Code::Ok => CODE_OK,
                Code::OverLimit => CODE_OVER_LIMIT,
            };
            let labels = DecisionLabels { domain: domain.to_owned(), rule: rule.to_owned(), code };
            self.metrics.rls_decisions.inc(&labels);
            if status.shadow_over_limit {
                let labels = RuleLabels { domain: domain.to_owned(), rule: rule.to_owned() };
                self.metrics.rls_shadow_over_limit.inc(&labels);
            }
        }
    }

    fn refuse(&self, reason: &'static str, status: tonic::Status) -> tonic::Status {
        self.metrics.rls_request_errors.inc(&ReasonLabels { reason });
        status
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimiter {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        if !self.allowed_callers.is_empty() {
            // The peer of the TCP connection, canonical so IPv4 callers on a dual-stack
            // socket match IPv4 networks. No address (not TCP) is refused too.
            let peer = request.remote_addr().map(|a| a.ip().to_canonical());
            if !peer.is_some_and(|ip| self.allowed_callers.iter().any(|n| n.contains(&ip))) {
                let who = peer.map_or_else(|| "an unknown peer".to_owned(), |ip| ip.to_string());
                let status = tonic::Status::permission_denied(format!(
                    "rate limit service: calls from {who} are not allowed (--rls-allow-callers)"
                ));
                return Err(self.refuse("permission_denied", status));
            }
        }
        let Ok(_permit) = self.in_flight.try_acquire() else {
            let status = tonic::Status::resource_exhausted("rate limit service overloaded: too many calls in flight");
            return Err(self.refuse("overloaded", status));
        };
        let req = request_from_proto(request.into_inner())
            .map_err(|e| self.refuse("invalid_argument", tonic::Status::invalid_argument(e.to_string())))?;
        let resp = self
            .decide(&req)
            .await
            .map_err(|e| self.refuse("invalid_argument", tonic::Status::invalid_argument(e.to_string())))?;
        Ok(tonic::Response::new(response_to_proto(&resp)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::google::protobuf::UInt64Value;

    use super::*;

    fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries.iter().map(|(k, v)| Entry { key: (*k).into(), value: (*v).into() }).collect(),
            ..Default::default()
        }
    }

    fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
        RateLimitRequest { domain: domain.into(), descriptors, hits_addend: 0 }
    }

    #[test]
    fn malformed_requests_are_named() {
        let ok = descriptor(&[("k", "v")]);
        let err = |r| request_from_proto(r).unwrap_err().to_string();
        assert_eq!(err(request("", vec![ok.clone()])), "rate limit domain must not be empty");
        assert_eq!(err(request("d", vec![])), "rate limit descriptor list must not be empty");
        // Matches nothing, answered OK (as the reference), not refused.
        assert!(request_from_proto(request("d", vec![ok.clone(), descriptor(&[]), descriptor(&[("", "x")])])).is_ok());
        let mut huge = ok.clone();
        huge.hits_addend = Some(UInt64Value { value: 1 << 40 });
        assert!(err(request("d", vec![huge])).contains("hits_addend 1099511627776 is more than 4294967295"));
        let mut negative = ok.clone();
        negative.is_negative_hits = true;
        assert!(err(request("d", vec![negative])).contains("is_negative_hits is not supported"));
        let mut fine = ok;
        fine.hits_addend = Some(UInt64Value { value: 0 });
        let converted = request_from_proto(request("d", vec![fine])).unwrap();
        assert_eq!(converted.descriptors[0].hits_addend, Some(0));
    }

    #[test]
    fn statuses_carry_limit_remaining_and_reset() {
        let resp = RlsResponse {
            overall: Code::OverLimit,
            statuses: vec![
                DescriptorStatus {
                    code: Code::OverLimit,
                    limit: Some(ReportedLimit { name: "p/r".into(), requests_per_unit: 10, unit: Unit::Minute }),
                    limit_remaining: 0,
                    duration_until_reset: Duration::from_secs(42),
                    rule: Some("p/r".into()),
                    shadow_over_limit: false,
                },
                DescriptorStatus {
                    code: Code::Ok,
                    limit: None,
                    limit_remaining: 0,
                    duration_until_reset: Duration::ZERO,
                    rule: None,
                    shadow_over_limit: false,
                },
            ],
        };
        let p = response_to_proto(&resp);
        assert_eq!(p.overall_code, ProtoCode::OverLimit as i32);
        let limit = p.statuses[0].current_limit.as_ref().unwrap();
        assert_eq!((limit.name.as_str(), limit.requests_per_unit, limit.unit), ("p/r", 10, ProtoUnit::Minute as i32));
        assert_eq!(p.statuses[0].duration_until_reset.as_ref().map(|d| d.seconds), Some(42));
        assert_eq!(p.statuses[1].code, ProtoCode::Ok as i32);
        assert!(p.statuses[1].current_limit.is_none() && p.statuses[1].duration_until_reset.is_none());
    }

    #[test]
    fn intervals_are_reported_as_the_same_rate_in_a_protocol_unit() {
        let limit =
            |rpu, ns| ReportedLimit { name: String::new(), requests_per_unit: rpu, unit: Unit::Interval { ns } };
        assert_eq!(proto_limit(&limit(5, 10_000_000_000)), (ProtoUnit::Minute, 30));
        assert_eq!(proto_limit(&limit(10, 250_000_000)), (ProtoUnit::Second, 40));
        assert_eq!(proto_limit(&limit(3, 90_000_000_000)), (ProtoUnit::Hour, 120));
        assert_eq!(proto_limit(&limit(1, 3 * 86_400_000_000_000)), (ProtoUnit::Day, 1));
    }
}
