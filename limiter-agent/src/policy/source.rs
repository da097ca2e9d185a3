//! Reading policy files: paths and directories → documents → [`Policy`] values.
//!
//! A file is split into its YAML documents with the event parser first; each document is then
//! deserialised on its own (so an error in one does not hide the others), from a copy of the
//! file in which every line before the document is blanked out. That keeps the line numbers of
//! the YAML crate's errors and spans equal to the file's.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::granit_parser::{Event, Parser};
use serde_saphyr::{MessageFormatter, UserMessageFormatter};

use super::error::{ErrorKind, FieldError, Location, PolicyError, PolicyErrors, Pos, SourceRef};
use super::kinds;
use super::listeners::{self, ListenerMap, ListenerMapDoc};
use super::model::{Policy, PolicySet, RatelimitConfig};
use super::spec::{API_VERSION, KIND, RateLimitPolicyDoc, TypeMeta, pos_of};

/// Loads every policy under `paths` into one set, or returns every error found.
///
/// A path is a file (read whatever its name) or a directory, whose `*.yaml` and `*.yml`
/// files are read in name order. Names starting with `.` are skipped, which covers dotfiles
/// and the `..data` / `..2024_…` entries of a mounted Kubernetes ConfigMap; symbolic links are
/// followed (the ConfigMap's visible files are links into `..data`). Subdirectories are not
/// descended into. Policy names must be unique across the whole set, and so must the
/// `ListenerMap`s' names and entries ([`listeners::check_set`]).
pub fn load_paths(paths: &[PathBuf]) -> Result<PolicySet, PolicyErrors> {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    for path in paths {
        match list_path(path) {
            Ok(mut found) => files.append(&mut found),
            Err(e) => errors.push(*e),
        }
    }
    let mut set = PolicySet::default();
    for file in &files {
        match fs::read_to_string(file) {
            Ok(text) => match load_file_set(file, &text) {
                Ok(found) if found.is_empty() => errors.push(empty_file(file)),
                Ok(found) => set.extend(found),
                Err(e) => errors.extend(e.0),
            },
            Err(e) => errors.push(io_error(file, &e)),
        }
    }
    check_unique_names(&set.policies, &mut errors);
    check_unique_domains(&set.ratelimit_configs, &mut errors);
    errors.extend(listeners::check_set(&set.listener_maps));
    if errors.is_empty() { Ok(set) } else { Err(PolicyErrors(errors)) }
}

/// One loaded YAML document.
#[derive(Clone, Debug, PartialEq, Eq)]
#[expect(clippy::large_enum_variant, reason = "a handful per file, moved once into the set; boxing buys nothing")]
pub enum Document {
    /// A document with `kind:` (native or a gateway kind).
    Policy(Policy),
    /// An envoyproxy/ratelimit config: no `kind`, a `domain`.
    RatelimitConfig(RatelimitConfig),
}

/// Loads the policies of one file's text; `file` only names it in errors. Ratelimit configs
/// in the text are ignored here (see [`load_file_str`]).
pub fn load_str(file: &Path, text: &str) -> Result<Vec<Policy>, PolicyErrors> {
    let docs = load_file_str(file, text)?;
    Ok(docs
        .into_iter()
        .filter_map(|d| match d {
            Document::Policy(p) => Some(p),
            Document::RatelimitConfig(_) => None,
        })
        .collect())
}

/// Loads the policies and ratelimit configs of one file's text; `file` only names it in
/// errors. `ListenerMap` documents are validated (their errors are returned) but left out:
/// [`load_file_set`] returns every kind.
pub fn load_file_str(file: &Path, text: &str) -> Result<Vec<Document>, PolicyErrors> {
    let docs = load_documents(file, text)?;
    Ok(docs
        .into_iter()
        .filter_map(|d| match d {
            Loaded::Policy(p) => Some(Document::Policy(p)),
            Loaded::RatelimitConfig(c) => Some(Document::RatelimitConfig(c)),
            Loaded::ListenerMap(_) => None,
        })
        .collect())
}

/// Loads every document of one file's text as a set; `file` only names it in errors. The
/// set-level checks of [`load_paths`] (unique names, listener map references) are not made.
pub fn load_file_set(file: &Path, text: &str) -> Result<PolicySet, PolicyErrors> {
    let mut set = PolicySet::default();
    for doc in load_documents(file, text)? {
        match doc {
            Loaded::Policy(p) => set.policies.push(p),
            Loaded::RatelimitConfig(c) => set.ratelimit_configs.push(c),
            Loaded::ListenerMap(m) => set.listener_maps.push(m),
        }
    }
    Ok(set)
}

/// One loaded document of any kind. [`Document`] predates listener maps and is matched
/// exhaustively outside this crate, so the loader keeps its own enum.
#[expect(clippy::large_enum_variant, reason = "a handful per file, moved once into the set; boxing buys nothing")]
enum Loaded {
    Policy(Policy),
    RatelimitConfig(RatelimitConfig),
    ListenerMap(ListenerMap),
}

fn load_documents(file: &Path, text: &str) -> Result<Vec<Loaded>, PolicyErrors> {
    let split = split_documents(text);
    // The document a syntax error broke in is not counted as having content.
    let documents = split.docs.iter().filter(|d| d.has_content).count() + usize::from(split.syntax.is_some());
    let multi = documents > 1;
    let mut errors = Vec::new();
    let mut policies = Vec::new();
    for doc in split.docs.iter().filter(|d| d.has_content) {
        let source = SourceRef { file: file.to_owned(), document: multi.then_some(doc.index) };
        let padded = padded_document(text, doc.start_byte, doc.end_byte, doc.start_line);
        match load_document(&padded) {
            Ok(Some(Loaded::Policy(mut p))) => {
                p.source = source;
                policies.push(Loaded::Policy(p));
            }
            Ok(Some(Loaded::RatelimitConfig(mut c))) => {
                c.source = source;
                policies.push(Loaded::RatelimitConfig(c));
            }
            Ok(Some(Loaded::ListenerMap(mut m))) => {
                m.source = source;
                policies.push(Loaded::ListenerMap(m));
            }
            Ok(None) => {}
            Err(errs) => errors.extend(errs.into_iter().map(|e| e.located(&source))),
        }
    }
    if let Some((index, pos, message)) = split.syntax {
        let source = SourceRef { file: file.to_owned(), document: multi.then_some(index) };
        errors.push(FieldError::new(pos, "", ErrorKind::Syntax { message }).located(&source));
    }
    if errors.is_empty() { Ok(policies) } else { Err(PolicyErrors(errors)) }
}

/// Policy names are the prefix of kernel rule names, so they must be unique in a set.
fn check_unique_names(policies: &[Policy], errors: &mut Vec<PolicyError>) {
    let mut first: HashMap<&str, Location> = HashMap::new();
    for p in policies {
        let here = p.location(&p.at);
        if let Some(prev) = first.get(p.name.as_str()) {
            errors.push(PolicyError {
                location: here,
                field: "metadata.name".into(),
                kind: ErrorKind::DuplicatePolicy { name: p.name.clone(), first: prev.to_string() },
            });
        } else {
            first.insert(&p.name, here);
        }
    }
}

/// One config per domain, as envoyproxy/ratelimit loads them (without its merge option): two
/// would give one descriptor two limits.
fn check_unique_domains(configs: &[RatelimitConfig], errors: &mut Vec<PolicyError>) {
    let mut first: HashMap<&str, Location> = HashMap::new();
    for c in configs {
        let here = c.source.at(c.at.pos);
        if let Some(prev) = first.get(c.domain.as_str()) {
            errors.push(PolicyError {
                location: here,
                field: "domain".into(),
                kind: ErrorKind::DuplicateDomain { domain: c.domain.clone(), first: prev.to_string() },
            });
        } else {
            first.insert(&c.domain, here);
        }
    }
}

/// A policy file with no document: envoyproxy/ratelimit refuses an empty config file ("config
/// file cannot have empty domain"), and an empty file in a policy directory is more likely a
/// failed write than an intent, so it is an error rather than nothing to enforce.
fn empty_file(path: &Path) -> PolicyError {
    let message = "the file holds no document (an empty ratelimit config has no domain)".to_owned();
    PolicyError {
        location: Location { file: path.to_owned(), document: None, pos: Pos::new(1, 1) },
        field: String::new(),
        kind: ErrorKind::Schema { message },
    }
}

fn io_error(path: &Path, e: &std::io::Error) -> PolicyError {
    PolicyError {
        location: Location { file: path.to_owned(), document: None, pos: Pos::default() },
        field: String::new(),
        kind: ErrorKind::Io { message: e.to_string() },
    }
}

fn list_path(path: &Path) -> Result<Vec<PathBuf>, Box<PolicyError>> {
    let meta = fs::metadata(path).map_err(|e| Box::new(io_error(path, &e)))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(|e| Box::new(io_error(path, &e)))? {
        let entry = entry.map_err(|e| Box::new(io_error(path, &e)))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let p = entry.path();
        // fs::metadata follows symlinks: ConfigMap files are links into `..data/`.
        match fs::metadata(&p) {
            Ok(m) if m.is_file() => files.push(p),
            Ok(_) => {}
            Err(e) => return Err(Box::new(io_error(&p, &e))),
        }
    }
    files.sort();
    Ok(files)
}

struct DocSpan {
    /// 1-based, counting every document of the file.
    index: usize,
    start_line: u64,
    start_byte: usize,
    end_byte: usize,
    /// False for an empty document (`---` followed by nothing, or only comments).
    has_content: bool,
}

struct Split {
    docs: Vec<DocSpan>,
    /// The syntax error that stopped parsing: document index, position, message.
    syntax: Option<(usize, Pos, String)>,
}

/// Finds where each document starts (as whole lines) with the event parser.
fn split_documents(text: &str) -> Split {
    let line_starts: Vec<usize> = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
    let byte_of_line = |line: usize| line_starts.get(line.saturating_sub(1)).copied().unwrap_or(text.len());
    let mut docs: Vec<DocSpan> = Vec::new();
    let mut syntax = None;
    let mut in_doc = false;
    for ev in Parser::new_from_str(text) {
        match ev {
            Ok((Event::DocumentStart(..), span)) => {
                let line = span.start.line();
                let start_byte = byte_of_line(line);
                if let Some(prev) = docs.last_mut() {
                    prev.end_byte = start_byte;
                }
                docs.push(DocSpan {
                    index: docs.len() + 1,
                    start_line: line as u64,
                    start_byte,
                    end_byte: text.len(),
                    has_content: false,
                });
                in_doc = true;
            }
            Ok((Event::DocumentEnd, _)) => in_doc = false,
            // Positive list: other events (comments, with granit-parser's `comments` feature)
            // do not make a document non-empty.
            Ok((Event::Scalar(value, ..), _)) if !value.is_empty() => mark_content(&mut docs),
            Ok((Event::MappingStart(..) | Event::SequenceStart(..) | Event::Alias(..), _)) => mark_content(&mut docs),
            Ok(_) => {}
            Err(e) => {
                let m = e.marker();
                let index = if in_doc { docs.len() } else { docs.len() + 1 };
                // Parsing stops here: the document it broke in is reported, not loaded.
                if in_doc && let Some(d) = docs.last_mut() {
                    d.has_content = false;
                }
                let pos = Pos::new(m.line() as u64, m.col() as u64 + 1);
                syntax = Some((index, pos, e.info().to_owned()));
                break;
            }
        }
    }
    Split { docs, syntax }
}

fn mark_content(docs: &mut [DocSpan]) {
    if let Some(d) = docs.last_mut() {
        d.has_content = true;
    }
}

/// The document's lines, preceded by as many empty lines as the file had before it.
fn padded_document(text: &str, start: usize, end: usize, start_line: u64) -> String {
    let body = text.get(start..end).unwrap_or_default();
    let blank = usize::try_from(start_line.saturating_sub(1)).unwrap_or(0);
    let mut s = String::with_capacity(blank + body.len());
    s.extend(std::iter::repeat_n('\n', blank));
    s.push_str(body);
    s
}

/// One document: `Ok(None)` when it is empty. Dispatches on `kind` (and `apiVersion`); a
/// document without `kind` but with `domain` is an envoyproxy/ratelimit config.
fn load_document(src: &str) -> Result<Option<Loaded>, Vec<FieldError>> {
    let meta: Option<TypeMeta> = deserialize(src).map_err(|e| vec![e])?;
    let Some(meta) = meta else { return Ok(None) };
    if meta.kind.is_none() && meta.domain.is_some() {
        return kinds::ratelimit_config::load(src).map(|c| Some(Loaded::RatelimitConfig(c)));
    }
    let kind = meta.kind.ok_or_else(|| vec![missing(src, "kind")])?;
    let native = match kind.value.as_str() {
        KIND => KIND,
        listeners::KIND => listeners::KIND,
        _ => "",
    };
    if native.is_empty() {
        let loaded = match kind.value.as_str() {
            "BackendTrafficPolicy" => kinds::envoy_gateway::load(src),
            "RateLimitFilter" => kinds::teg::load(src),
            "TrafficPolicy" => kinds::kgateway::load(src),
            "AgentgatewayPolicy" => kinds::agentgateway::load(src),
            "GatewayExtension" => kinds::gateway_extension::load(src),
            _ => {
                let err = ErrorKind::UnsupportedKind { kind: kind.value.clone() };
                return Err(vec![FieldError::new(pos_of(&kind), "kind", err)]);
            }
        };
        return loaded.map(|p| Some(Loaded::Policy(p)));
    }
    let api = meta.api_version.ok_or_else(|| vec![missing(src, "apiVersion")])?;
    if api.value != API_VERSION {
        let err = ErrorKind::UnsupportedApiVersion { api_version: api.value.clone(), kind: native };
        return Err(vec![FieldError::new(pos_of(&api), "apiVersion", err)]);
    }
    if native == listeners::KIND {
        let doc: ListenerMapDoc = deserialize(src).map_err(|e| vec![e])?;
        return ListenerMap::try_from(doc).map(|m| Some(Loaded::ListenerMap(m)));
    }
    let doc: RateLimitPolicyDoc = deserialize(src).map_err(|e| vec![e])?;
    Policy::try_from(doc).map(|p| Some(Loaded::Policy(p)))
}

/// `kind` or `apiVersion` is absent: point at the document's first line.
pub(super) fn missing(src: &str, field: &str) -> FieldError {
    let line = src.chars().take_while(|c| *c == '\n').count() as u64 + 1;
    FieldError::new(Pos::new(line, 1), "", ErrorKind::Schema { message: format!("missing field `{field}`") })
}

/// Deserialises with serde-saphyr, tracking the field path of the first error.
pub(super) fn deserialize<'de, T: Deserialize<'de>>(src: &'de str) -> Result<T, FieldError> {
    let mut track = serde_path_to_error::Track::new();
    let result = serde_saphyr::with_deserializer_from_str(src, |de| {
        T::deserialize(serde_path_to_error::Deserializer::new(de, &mut track))
    });
    result.map_err(|e| {
        let pos = e.location().map(|l| Pos::new(l.line(), l.column())).unwrap_or_default();
        let mut message = UserMessageFormatter.format_message(e.without_snippet()).into_owned();
        if let Some(ty) = message.strip_prefix("invalid ")
            && matches!(ty, "i64" | "u64" | "i32" | "u32" | "u16")
        {
            message = "expected an integer".to_owned();
        }
        FieldError::new(pos, field_path(&track.path()), ErrorKind::Schema { message })
    })
}

/// Renders a serde path as `spec.rules[2].limit`, dropping the `value` segments that
/// `Spanned<T>` adds (it deserialises as a struct with a `value` field). The policy's own
/// `value` fields (`sourceCIDR.value`, `headers[i].value`) are kept: they follow `sourceCIDR`
/// or a `headers` element, which are never `Spanned` themselves.
fn field_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let segs: Vec<&Segment> = path.iter().collect();
    let mut out = String::new();
    for (i, seg) in segs.iter().enumerate() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if key == "value" && !is_own_value_field(&segs[..i]) {
                    continue;
                }
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

fn is_own_value_field(before: &[&serde_path_to_error::Segment]) -> bool {
    use serde_path_to_error::Segment;
    match before {
        [.., Segment::Map { key }] => key == "sourceCIDR",
        [.., Segment::Map { key }, Segment::Seq { .. }] => key == "headers",
        _ => false,
    }
}
