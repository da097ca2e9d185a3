//! Property tests for the policy loader: whatever bytes a policy file holds, loading it either
//! succeeds or returns errors that point inside the file; it never panics, and a set that
//! loads also compiles without panicking.
//!
//! Inputs are mutations of the real examples (every file under `examples/`, so new kinds are
//! covered as their examples land) plus text built from YAML's structural tokens. The case
//! count is bounded so the suite stays fast in CI; raise it locally with
//! `PROPTEST_CASES=100000 cargo test -p limiter-agent --test policy_fuzz`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use limiter_agent::policy::{self, Document, PolicySet};
use proptest::prelude::*;
use proptest::test_runner::Config;

/// Text of every example policy (valid and invalid), loaded once.
fn seeds() -> &'static [String] {
    static SEEDS: OnceLock<Vec<String>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut files = Vec::new();
        collect_yaml(&root, &mut files);
        files.sort();
        assert!(files.len() >= 10, "expected the example policies under {}", root.display());
        files.iter().map(|f| std::fs::read_to_string(f).expect("example readable")).collect()
    })
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() {
            collect_yaml(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

/// Pieces that stress the YAML parser and the schema: structure, anchors, tags, numbers at
/// the edges of every integer type, CIDRs, durations, units, and non-ASCII text.
const TOKENS: &[&str] = &[
    ":",
    ": ",
    "- ",
    "-",
    "{",
    "}",
    "[",
    "]",
    ",",
    "\"",
    "'",
    "\n",
    "\n  ",
    "\n    - ",
    "\t",
    "#",
    "---\n",
    "...\n",
    "&a ",
    "*a",
    "<<: *a",
    "!!str ",
    "!!int ",
    "!custom ",
    "|\n  ",
    ">\n  ",
    "? ",
    "null",
    "~",
    "true",
    "yes",
    "0",
    "-1",
    "1",
    "3",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "1e400",
    "0x10",
    "1.5",
    ".inf",
    "0.0.0.0/0",
    "10.0.0.0/33",
    "::/0",
    "fd00::/129",
    "10.1.2.3",
    "1s",
    "0s",
    "-5s",
    "1h30m",
    "99999999999h",
    "Second",
    "Minuets",
    "Distinct",
    "Exact",
    "Connections",
    "Requests",
    "kind",
    "apiVersion",
    "metadata",
    "spec",
    "rateLimit",
    "rules",
    "limit",
    "requests",
    "unit",
    "burst",
    "clientSelectors",
    "headers",
    "sourceCIDR",
    "name",
    "value",
    "type",
    "invert",
    "domain",
    "descriptors",
    "key",
    "rate_limit",
    "requests_per_unit",
    "unlimited",
    "shadow_mode",
    "replaces",
    "tokenBucket",
    "maxTokens",
    "fillInterval",
    "traffic",
    "local",
    "global",
    "targetRefs",
    "é",
    "名前",
    "\u{feff}",
    "\u{0}",
    "\r\n",
    " ",
];

#[derive(Clone, Debug)]
enum Mutation {
    /// Insert a token at a fraction of the text.
    Insert { at: f64, token: usize },
    /// Delete a run of characters.
    Delete { at: f64, len: usize },
    /// Replace everything after the first `:` of a line with a token.
    ReplaceValue { line: f64, token: usize },
    /// Duplicate a line (duplicate keys, duplicate rules).
    DuplicateLine { line: f64 },
    /// Cut the text short.
    Truncate { at: f64 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let token = 0..TOKENS.len();
    prop_oneof![
        (0.0..1.0, token.clone()).prop_map(|(at, token)| Mutation::Insert { at, token }),
        (0.0..1.0, 1usize..40).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (0.0..1.0, token).prop_map(|(line, token)| Mutation::ReplaceValue { line, token }),
        (0.0..1.0).prop_map(|line| Mutation::DuplicateLine { line }),
        (0.0..1.0).prop_map(|at| Mutation::Truncate { at }),
    ]
}

/// The char boundary nearest below `fraction` of `text`.
fn boundary(text: &str, fraction: f64) -> usize {
    let mut i = ((text.len() as f64) * fraction) as usize;
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(text: &mut String, m: &Mutation) {
    match *m {
        Mutation::Insert { at, token } => {
            let i = boundary(text, at);
            text.insert_str(i, TOKENS[token]);
        }
        Mutation::Delete { at, len } => {
            let start = boundary(text, at);
            let end = text[start..].char_indices().nth(len).map_or(text.len(), |(i, _)| start + i);
            text.replace_range(start..end, "");
        }
        Mutation::ReplaceValue { line, token } => {
            let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
            if lines.is_empty() {
                return;
            }
            let n = (((lines.len() as f64) * line) as usize).min(lines.len() - 1);
            if let Some(colon) = lines[n].find(':') {
                lines[n].truncate(colon + 1);
                lines[n].push(' ');
                lines[n].push_str(TOKENS[token]);
            }
            *text = lines.join("\n");
        }
        Mutation::DuplicateLine { line } => {
            let mut lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                return;
            }
            let n = (((lines.len() as f64) * line) as usize).min(lines.len() - 1);
            lines.insert(n, lines[n]);
            *text = lines.join("\n");
        }
        Mutation::Truncate { at } => {
            let i = boundary(text, at);
            text.truncate(i);
        }
    }
}

/// Loads `text` as one file and checks the loader's promises; returns whether it loaded.
fn check_load(text: &str) -> bool {
    let file = Path::new("fuzz/policy.yaml");
    match policy::load_file_str(file, text) {
        Ok(docs) => {
            let mut set = PolicySet::default();
            for d in docs {
                match d {
                    Document::Policy(p) => set.policies.push(p),
                    Document::RatelimitConfig(c) => set.ratelimit_configs.push(c),
                }
            }
            // Compiling a loaded set must not panic either; its notices point into the file.
            let compiled = policy::compile(&set);
            let lines = text.lines().count() as u64 + 1;
            for n in &compiled.notices {
                assert!(n.location.pos.line <= lines, "notice past the end of the file: {n}");
            }
            true
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "an Err must carry at least one error");
            // Errors count lines from 1; a file of N lines can end on line N + 1.
            let lines = text.lines().count() as u64 + 1;
            for e in errors.iter() {
                assert_eq!(e.location.file, file, "error names another file: {e}");
                assert!(e.location.pos.line <= lines, "error past the end of the file ({lines} lines): {e}");
                assert!(!e.to_string().is_empty());
            }
            false
        }
    }
}

fn config() -> Config {
    // Bounded for CI; PROPTEST_CASES overrides. No failure files written into the repo.
    Config { cases: 768, failure_persistence: None, ..Config::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_examples_never_panic(seed in any::<prop::sample::Index>(), mutations in prop::collection::vec(mutation(), 1..6)) {
        let seeds = seeds();
        let mut text = seeds[seed.index(seeds.len())].clone();
        for m in &mutations {
            apply(&mut text, m);
        }
        check_load(&text);
    }

    #[test]
    fn token_soup_never_panics(tokens in prop::collection::vec(0..TOKENS.len(), 0..80)) {
        let text: String = tokens.iter().map(|&t| TOKENS[t]).collect();
        check_load(&text);
    }
}

/// The seeds themselves behave as their directories say: valid examples load, the invalid
/// ones do not. Guards the fuzz input: if the examples stopped loading, the mutations would
/// only ever exercise the error paths.
#[test]
fn valid_examples_load_and_invalid_ones_fail() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files = Vec::new();
    collect_yaml(&root, &mut files);
    let mut loaded = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        // Envoy bootstraps (examples/envoy) sit beside the policies they query; not policies.
        if text.lines().any(|l| l.starts_with("static_resources:")) {
            continue;
        }
        let invalid = f.components().any(|c| c.as_os_str() == "invalid");
        let ok = check_load(&text);
        assert_eq!(ok, !invalid, "{}: loaded = {ok}", f.display());
        loaded += usize::from(ok);
    }
    assert!(loaded >= 3, "only {loaded} example files loaded");
}
