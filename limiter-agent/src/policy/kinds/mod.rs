//! The gateway kinds the agent reads as they are (see `POLICY.md`, "Accepted documents"):
//! each module deserialises its kind's YAML and normalises it into a [`super::Policy`] (or,
//! for envoyproxy/ratelimit configs, a [`super::model::RatelimitConfig`]), reporting errors
//! with the same file, line, column and field path as the native kind. Unknown fields are
//! warnings here, not errors: those APIs grow faster than this agent.

pub mod agentgateway;
mod document;
pub mod envoy_gateway;
pub mod gateway_extension;
pub mod kgateway;
pub mod ratelimit_config;
pub mod teg;

#[cfg(test)]
mod tests_descriptors;
#[cfg(test)]
mod tests_errors;
#[cfg(test)]
mod tests_gateways;
