//! Rate-limit policies: read, validate, compile.
//!
//! - [`load_paths`] reads native `RateLimitPolicy` documents (`limiter.dev/v1alpha1`, see
//!   `POLICY.md`), the gateway kinds ([`kinds`]) and [`ListenerMap`]s (where the node's
//!   gateways listen, [`listeners`]) from files and directories and validates them into a
//!   [`PolicySet`], or
//!   returns [`PolicyErrors`]: every error found, each naming file, document, line, column
//!   and field path (format in [`error`]).
//! - [`compile`] turns a set into one plan: the [`crate::plan::KernelPlan`] the XDP program
//!   enforces and the [`crate::plan::L7Plan`] the L7 engine / rate limit service answers,
//!   plus [`Notice`]s for everything accepted but not (fully) enforced and set-level errors;
//!   [`load_and_compile`] does both steps and returns every error of either.
//!
//! YAML is read with `serde-saphyr` (maintained, panic-free, YAML 1.2): its `Spanned<T>`
//! keeps the line and column of values, so errors found after deserialisation (a bad CIDR,
//! a duplicate name) still point at the right place.

pub mod compile;
pub mod error;
pub mod kinds;
pub mod listeners;
pub mod model;
pub mod reader;
pub mod source;
pub mod spec;
pub mod validate;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_listeners;

pub use compile::{Compiled, Notice, NoticeKind, PolicySummary, compile, load_and_compile};
pub use error::{ErrorKind, Location, PolicyError, PolicyErrors, Pos, SourceRef};
pub use listeners::ListenerMap;
pub use model::{Policy, PolicyKind, PolicySet};
pub use source::{Document, load_file_set, load_file_str, load_paths, load_str};
