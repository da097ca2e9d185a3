//! The limiter agent: compiles rate-limit policies and drives the XDP data path.
//!
//! - [`policy`]: reads policy documents, validates them with file/line/field errors, and
//!   compiles them into a [`plan::KernelPlan`].
//! - [`dataplane`]: loads and attaches the XDP program and owns its maps.
//! - [`plan`]: the compiled plan both of them speak.
//! - [`l7`]: the L7 engine: token buckets and fixed windows for HTTP requests and descriptors.
//! - [`rls`]: the Envoy rate limit service over gRPC, backed by [`l7`] (and Redis).
//! - [`sync`]: node membership in Redis and each node's share of `global` kernel rules.
//! - [`synproxy`]: the nftables half of the SYN proxy (netfilter SYNPROXY finishes the
//!   handshakes the XDP program answered with cookies).

pub mod cli;
pub mod control;
pub mod dataplane;
pub mod l7;
pub mod metrics;
pub mod plan;
pub mod policy;
pub mod rls;
pub mod sync;
pub mod synproxy;
pub mod watch;
