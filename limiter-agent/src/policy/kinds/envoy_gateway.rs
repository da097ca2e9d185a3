//! `BackendTrafficPolicy`: not read yet.

use super::super::error::{ErrorKind, FieldError, Pos};
use super::super::model::Policy;

pub fn load(_src: &str) -> Result<Policy, Vec<FieldError>> {
    Err(vec![FieldError::new(
        Pos::default(),
        "kind",
        ErrorKind::UnsupportedKind { kind: "BackendTrafficPolicy".into() },
    )])
}
