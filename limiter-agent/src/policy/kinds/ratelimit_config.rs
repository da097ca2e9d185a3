//! envoyproxy/ratelimit configs: not read yet.

use super::super::error::{ErrorKind, FieldError, Pos};
use super::super::model::RatelimitConfig;

pub fn load(_src: &str) -> Result<RatelimitConfig, Vec<FieldError>> {
    Err(vec![FieldError::new(Pos::default(), "domain", ErrorKind::UnsupportedKind { kind: "ratelimit config".into() })])
}
