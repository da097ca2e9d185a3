//! Tetrate Enterprise Gateway `RateLimitFilter` (`gateway.envoyproxy.io/v1alpha1`, the Envoy
//! Gateway 0.x kind TEG ships).
//!
//! ```yaml
//! spec:
//!   type: Global
//!   global:
//!     rules:
//!       - clientSelectors: [{headers: [{name: x-user-id, type: Distinct}]}]
//!         limit: {requests: 20, unit: Minute}
//! ```
//!
//! Rules read exactly as a `BackendTrafficPolicy`'s ([`super::envoy_gateway`]): unnamed rules
//! become `rule-0`, `rule-1`, ...; several rules all apply, the first exhausted one denies.
//! The filter has no `targetRefs`: HTTPRoutes attach it as an `ExtensionRef` filter, so its
//! targets are empty here and it applies wherever a route references it (the gateway decides
//! which requests reach the rate limit service with its name). Other `spec` fields are
//! warnings.

use super::super::error::FieldError;
use super::super::model::{Policy, PolicyKind};
use super::super::source::deserialize;
use super::super::spec::S;
use super::document::{finish, header};
use super::envoy_gateway::{API_VERSION, Rules, rate_limit};
use crate::policy::reader::{Node, Reader};

pub fn load(src: &str) -> Result<Policy, Vec<FieldError>> {
    let root: S<Node> = deserialize(src).map_err(|e| vec![e])?;
    let mut r = Reader::default();
    let header = header(&mut r, &root, API_VERSION, PolicyKind::RateLimitFilter);
    let mut rules = Rules::default();
    if let Some(spec) = header.spec {
        rate_limit(&mut r, spec, "spec", &mut rules);
    }
    let policy = header.policy.map(|mut p| {
        rules.apply_shadow_mode(&mut r, &mut p.mode);
        Policy { rules: rules.out, ..p }
    });
    finish(r, policy)
}
