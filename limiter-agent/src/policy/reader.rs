//! A positioned YAML tree ([`Node`]) and a reader over it ([`Reader`]), shared by the gateway
//! kinds of [`super::kinds`].
//!
//! Those kinds are read as a generic tree rather than through typed serde structs, so that
//! every problem is reported (serde stops at the first), unknown fields can become warnings,
//! and each report points at the line and column of the value. Each kind depends on this
//! module, none on another kind.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};

use super::error::{ErrorKind, FieldError, Pos};
use super::model::{At, Located};
use super::spec::{S, pos_of};

/// Any YAML value, every child keeping its position.
#[derive(Debug)]
pub(crate) enum Node {
    Null,
    Bool(bool),
    /// Wide enough for every `i64` and `u64` the YAML may hold.
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<S<Node>>),
    /// Entries in document order; keys rendered as strings.
    Map(Vec<(String, S<Node>)>),
}

impl Node {
    pub(crate) fn is_null(&self) -> bool {
        matches!(self, Node::Null)
    }

    fn type_name(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "a boolean",
            Node::Int(_) => "an integer",
            Node::Float(_) => "a number",
            Node::Str(_) => "a string",
            Node::Seq(_) => "a list",
            Node::Map(_) => "a mapping",
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<S<Node>>()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(Key(k)) = map.next_key::<Key>()? {
            entries.push((k, map.next_value::<S<Node>>()?));
        }
        Ok(Node::Map(entries))
    }
}

/// A mapping key: any scalar, as text.
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Node::deserialize(d)? {
            Node::Str(s) => Ok(Key(s)),
            Node::Int(i) => Ok(Key(i.to_string())),
            Node::Bool(b) => Ok(Key(b.to_string())),
            Node::Float(f) => Ok(Key(f.to_string())),
            Node::Null => Ok(Key("null".into())),
            other => Err(de::Error::custom(format!("a mapping key must be a scalar, found {}", other.type_name()))),
        }
    }
}

/// Reads [`Node`]s into model values, collecting errors and warnings instead of stopping.
#[derive(Default)]
pub(crate) struct Reader {
    pub(crate) errors: Vec<FieldError>,
    /// Unknown or not enforced fields: warnings naming the field.
    pub(crate) warnings: Vec<Located<String>>,
}

impl Reader {
    pub(crate) fn schema(&mut self, pos: Pos, field: &str, message: String) {
        self.errors.push(FieldError::new(pos, field, ErrorKind::Schema { message }));
    }

    fn wrong_type(&mut self, n: &S<Node>, field: &str, expected: &str) {
        self.schema(pos_of(n), field, format!("expected {expected}, found {}", n.value.type_name()));
    }

    /// `field` of the mapping `n` (written at `parent`) is absent.
    pub(crate) fn missing(&mut self, n: &S<Node>, parent: &str, field: &str) {
        self.schema(pos_of(n), parent, format!("missing field `{field}`"));
    }

    /// A field this agent does not read: a warning, not an error.
    pub(crate) fn unknown_field(&mut self, n: &S<Node>, field: &str) {
        self.warn(n, field, "unknown field, ignored");
    }

    pub(crate) fn warn(&mut self, n: &S<Node>, field: &str, what: &str) {
        self.warnings.push(Located { value: what.to_owned(), at: At::new(pos_of(n), field) });
    }

    pub(crate) fn map<'a>(&mut self, n: &'a S<Node>, field: &str) -> Option<&'a [(String, S<Node>)]> {
        match &n.value {
            Node::Map(entries) => Some(entries),
            _ => {
                self.wrong_type(n, field, "a mapping");
                None
            }
        }
    }

    /// A list; `null` reads as an empty one.
    pub(crate) fn seq<'a>(&mut self, n: &'a S<Node>, field: &str) -> Option<&'a [S<Node>]> {
        match &n.value {
            Node::Seq(items) => Some(items),
            Node::Null => Some(&[]),
            _ => {
                self.wrong_type(n, field, "a list");
                None
            }
        }
    }

    /// A scalar as text (YAML `value: 42` is the string `42`, as Go's YAML reads it into a
    /// string field).
    pub(crate) fn string(&mut self, n: &S<Node>, field: &str) -> Option<String> {
        match &n.value {
            Node::Str(s) => Some(s.clone()),
            Node::Int(i) => Some(i.to_string()),
            Node::Bool(b) => Some(b.to_string()),
            Node::Float(f) => Some(f.to_string()),
            _ => {
                self.wrong_type(n, field, "a string");
                None
            }
        }
    }

    /// Like [`Self::string`], but `null` is absent rather than an error.
    pub(crate) fn opt_string(&mut self, n: &S<Node>, field: &str) -> Option<String> {
        if n.value.is_null() { None } else { self.string(n, field) }
    }

    /// `null` is absent.
    pub(crate) fn opt_bool(&mut self, n: &S<Node>, field: &str) -> Option<bool> {
        match &n.value {
            Node::Bool(b) => Some(*b),
            Node::Null => None,
            _ => {
                self.wrong_type(n, field, "a boolean");
                None
            }
        }
    }

    /// An integer in `min..=max`.
    pub(crate) fn int_in(&mut self, n: &S<Node>, field: &str, min: i64, max: i64) -> Option<i64> {
        let Node::Int(v) = &n.value else {
            self.wrong_type(n, field, "an integer");
            return None;
        };
        let kind = if *v < i128::from(min) {
            ErrorKind::TooSmall { value: i64::try_from(*v).unwrap_or(i64::MIN), min }
        } else if *v > i128::from(max) {
            ErrorKind::TooLarge { value: i64::try_from(*v).unwrap_or(i64::MAX), max }
        } else {
            return i64::try_from(*v).ok();
        };
        self.errors.push(FieldError::new(pos_of(n), field, kind));
        None
    }
}
