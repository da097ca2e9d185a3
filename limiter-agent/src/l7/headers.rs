//! `x-ratelimit-*` response headers, written the way Envoy's rate limit filter writes them
//! with `enable_x_ratelimit_headers: DRAFT_VERSION_03`:
//!
//! - `x-ratelimit-limit`: the limit of the most restrictive status (lowest remaining; the
//!   first one on ties), then one quota policy per status with a limit:
//!   `, {requests};w={window seconds}` plus `;name="{name}"` when the limit has a name.
//!   Example: `10, 10;w=60;name="default/per-user"`.
//! - `x-ratelimit-remaining`: the most restrictive status's remaining requests.
//! - `x-ratelimit-reset`: its whole seconds until reset (the engine rounds durations up to
//!   whole seconds, so Envoy's truncation to seconds shows the same number).

use std::fmt::Write as _;
use std::time::Duration;

use super::{DescriptorStatus, ReportedLimit, Verdict};
use crate::plan::Unit;

/// Window of a unit in seconds (`w=`); a sub-second interval is reported as 1 s.
fn window_seconds(unit: Unit) -> u64 {
    unit.as_ns().div_ceil(1_000_000_000).max(1)
}

/// The three header values for statuses given as (limit, remaining, reset).
fn headers<'a>(
    statuses: impl Iterator<Item = (&'a ReportedLimit, u32, Duration)> + Clone,
) -> Option<[(&'static str, String); 3]> {
    let mut tightest: Option<(&ReportedLimit, u32, Duration)> = None;
    let mut policies = String::new();
    for (limit, remaining, reset) in statuses {
        if tightest.is_none_or(|(_, r, _)| remaining < r) {
            tightest = Some((limit, remaining, reset));
        }
        let _ = write!(policies, ", {};w={}", limit.requests_per_unit, window_seconds(limit.unit));
        if !limit.name.is_empty() {
            let _ = write!(policies, ";name=\"{}\"", limit.name);
        }
    }
    let (limit, remaining, reset) = tightest?;
    Some([
        ("x-ratelimit-limit", format!("{}{policies}", limit.requests_per_unit)),
        ("x-ratelimit-remaining", remaining.to_string()),
        ("x-ratelimit-reset", reset.as_secs().to_string()),
    ])
}

/// `x-ratelimit-limit`, `x-ratelimit-remaining`, `x-ratelimit-reset` values for the most
/// restrictive status (IETF draft 03 as Envoy writes them: `10, 10;w=60;name="..."`).
/// `None` when no status carries a limit (nothing matched, or only `unlimited` rules).
pub fn ratelimit_headers(statuses: &[DescriptorStatus]) -> Option<[(&'static str, String); 3]> {
    headers(statuses.iter().filter_map(|s| s.limit.as_ref().map(|l| (l, s.limit_remaining, s.duration_until_reset))))
}

impl Verdict {
    /// The `x-ratelimit-*` headers of an HTTP decision, as [`ratelimit_headers`] writes them.
    pub fn ratelimit_headers(&self) -> Option<[(&'static str, String); 3]> {
        headers(self.statuses.iter().map(|s| (&s.limit, s.remaining, s.reset)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::Code;

    fn status(name: &str, rpu: u32, unit: Unit, remaining: u32, reset: u64) -> DescriptorStatus {
        DescriptorStatus {
            code: Code::Ok,
            limit: Some(ReportedLimit { name: name.into(), requests_per_unit: rpu, unit }),
            limit_remaining: remaining,
            duration_until_reset: Duration::from_secs(reset),
            rule: Some(name.into()),
            shadow_over_limit: false,
        }
    }

    #[test]
    fn one_limit() {
        let h = ratelimit_headers(&[status("rule", 10, Unit::Minute, 7, 42)]).unwrap();
        assert_eq!(h[0], ("x-ratelimit-limit", r#"10, 10;w=60;name="rule""#.to_string()));
        assert_eq!(h[1], ("x-ratelimit-remaining", "7".to_string()));
        assert_eq!(h[2], ("x-ratelimit-reset", "42".to_string()));
    }

    #[test]
    fn the_most_restrictive_status_leads_and_every_limit_is_listed() {
        let none = DescriptorStatus {
            code: Code::Ok,
            limit: None,
            limit_remaining: u32::MAX,
            duration_until_reset: Duration::ZERO,
            rule: Some("unlimited".into()),
            shadow_over_limit: false,
        };
        let h = ratelimit_headers(&[
            status("per-second", 1, Unit::Second, 1, 1),
            none,
            status("per-minute", 20, Unit::Minute, 0, 30),
            status("", 1000, Unit::Hour, 0, 3000),
        ])
        .unwrap();
        assert_eq!(h[0].1, r#"20, 1;w=1;name="per-second", 20;w=60;name="per-minute", 1000;w=3600"#);
        assert_eq!(h[1].1, "0");
        assert_eq!(h[2].1, "30");
    }

    #[test]
    fn no_limit_no_headers() {
        assert!(ratelimit_headers(&[]).is_none());
        let mut s = status("x", 1, Unit::Day, 1, 1);
        s.limit = None;
        assert!(ratelimit_headers(&[s]).is_none());
    }

    #[test]
    fn intervals_report_whole_seconds() {
        let h = ratelimit_headers(&[status("k", 5, Unit::Interval { ns: 10_000_000_000 }, 5, 10)]).unwrap();
        assert_eq!(h[0].1, r#"5, 5;w=10;name="k""#);
        let h = ratelimit_headers(&[status("k", 5, Unit::Interval { ns: 250_000_000 }, 5, 1)]).unwrap();
        assert_eq!(h[0].1, r#"5, 5;w=1;name="k""#);
    }
}
