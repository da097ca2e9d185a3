//! Control socket tests: snapshots built from counters and round-tripped as JSON, the `rls`
//! section read from the metrics, error answers, and a real socket's life (stale files
//! replaced, live ones refused, removal on drop).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use limiter_common::{Counter, RuleCounter, reason};

use super::*;
use crate::dataplane::Stats;
use crate::metrics::{CODE_OK, CODE_OVER_LIMIT, Metrics};
use crate::rls::{Backend, RateLimiter};

fn stats() -> Stats {
    let mut reasons = vec![Counter::default(); reason::COUNT as usize];
    reasons[reason::PASS_CONFORMING as usize] = Counter { packets: 10, bytes: 1000 };
    reasons[reason::DROP_SOURCE_BUCKET as usize] = Counter { packets: 4, bytes: 400 };
    reasons[reason::EVENT_NON_FIRST_FRAGMENT as usize] = Counter { packets: 1, bytes: 60 };
    let rc = RuleCounter {
        passed: Counter { packets: 10, bytes: 1000 },
        dropped: Counter { packets: 4, bytes: 400 },
        ..Default::default()
    };
    Stats { reasons, rules: BTreeMap::from([("p/r".to_owned(), rc)]) }
}

#[test]
fn snapshot_lists_every_reason_with_its_verdict_and_round_trips_as_json() {
    let top = [("10.0.0.7".parse().unwrap(), Counter { packets: 4, bytes: 400 })];
    let meta = Meta {
        time_unix_ms: 1_700_000_000_000,
        uptime_s: 3,
        interfaces: vec![Interface { name: "eth0".into(), mode: "native".into() }],
        policy: PolicyStatus { rules: 1, last_reload_ok: true, ..Default::default() },
        sources: SourceTable { tracked: 1, capacity: 1024, sampled_at_unix_ms: 1_700_000_000_000 },
        rls: RlsStatus::default(),
    };
    let snap = Snapshot::build(Some((&stats(), &top)), meta);
    assert_eq!(snap.reasons.len(), reason::COUNT as usize);
    let unparsed: Vec<Verdict> = snap.reasons.iter().filter(|r| r.reason == "unparsed").map(|r| r.verdict).collect();
    assert_eq!(unparsed, [Verdict::Pass, Verdict::Drop]);
    assert_eq!(snap.reasons[reason::EVENT_NON_FIRST_FRAGMENT as usize].verdict, Verdict::Event);
    assert_eq!(snap.total(Verdict::Drop), (4, 400));
    assert_eq!(snap.total(Verdict::Pass), (10, 1000));
    assert_eq!(snap.rules[0].dropped_packets, 4);

    let json = serde_json::to_string(&snap).unwrap();
    assert!(json.contains(r#""reason":"source_bucket","verdict":"drop","packets":4"#), "{json}");
    assert!(json.contains(r#""source":"10.0.0.7""#), "{json}");
    assert!(!json.contains('\n'));
    assert_eq!(parse_answer(Path::new("x"), &json).unwrap(), snap);
}

fn rls_source(metrics: &Arc<Metrics>, serving: Option<SocketAddr>) -> RlsSource {
    use crate::l7::{Engine, EngineConfig};
    let engine = Arc::new(Engine::new(crate::plan::L7Plan::default(), EngineConfig { max_keys: 500 }));
    let limiter = Arc::new(RateLimiter::new(engine, Backend::Local, Arc::clone(metrics), None, 8));
    RlsSource { limiter, backend: Backend::Local, metrics: Arc::clone(metrics), serving, l7_max_keys: 500 }
}

#[test]
fn rls_section_reads_the_metrics_sorted_with_totals() {
    use crate::metrics::{DecisionLabels, PolicyLabels, ReasonLabels, RuleLabels};
    let metrics = Arc::new(Metrics::new());
    let d = |rule: &str, code| DecisionLabels { domain: "shop".into(), rule: rule.into(), code };
    for _ in 0..3 {
        metrics.rls_decisions.inc(&d("shop/b", CODE_OK));
    }
    metrics.rls_decisions.inc(&d("shop/b", CODE_OVER_LIMIT));
    metrics.rls_decisions.inc(&d("shop/a", CODE_OK));
    metrics.rls_shadow_over_limit.inc(&RuleLabels { domain: "shop".into(), rule: "shop/a".into() });
    metrics.rls_request_errors.inc(&ReasonLabels { reason: "overloaded" });
    metrics.rls_request_errors.inc(&ReasonLabels { reason: "invalid_argument" });
    metrics.escalations.inc(&PolicyLabels { policy: "esc".into() });

    let listen: SocketAddr = "127.0.0.1:8081".parse().unwrap();
    let rls = rls_source(&metrics, Some(listen)).read();
    let decided: Vec<(&str, &str, u64)> =
        rls.decisions.iter().map(|d| (d.rule.as_str(), d.code.as_str(), d.descriptors)).collect();
    assert_eq!(decided, [("shop/a", "OK", 1), ("shop/b", "OK", 3), ("shop/b", "OVER_LIMIT", 1)]);
    assert_eq!((rls.ok(), rls.over_limit()), (4, 1));
    assert_eq!(rls.shadow_over_limit_total(), 1);
    assert_eq!(rls.request_errors[0].reason, "invalid_argument");
    assert_eq!(rls.request_errors_total(), 2);
    assert_eq!(rls.escalations_total(), 1);
    assert!(rls.serving && !rls.escalation);
    assert_eq!((rls.backend.as_str(), rls.redis.is_none()), ("local", true));
    assert_eq!((rls.l7_rules, rls.l7_tracked_keys, rls.l7_max_keys), (0, 0, 500));

    // Without an XDP program the kernel sections are empty; the JSON names the fields.
    let snap = Snapshot::build(None, Meta { rls, ..Default::default() });
    assert!(!snap.has_kernel() && snap.reasons.is_empty() && snap.rules.is_empty());
    let json = serde_json::to_string(&snap).unwrap();
    assert!(json.contains(r#""rls":{"serving":true,"listen":"127.0.0.1:8081","backend":"local""#), "{json}");
    assert!(json.contains(r#"{"domain":"shop","rule":"shop/b","code":"OVER_LIMIT","descriptors":1}"#), "{json}");
    assert!(json.contains(r#""escalations":[{"policy":"esc","sources":1}]"#), "{json}");
    assert_eq!(parse_answer(Path::new("x"), &json).unwrap(), snap);

    let idle = rls_source(&metrics, None).read();
    assert!(!idle.serving && idle.listen.is_none());
}

#[test]
fn a_snapshot_without_the_rls_section_still_parses() {
    let mut v = serde_json::to_value(Snapshot { version: "old".into(), ..Default::default() }).unwrap();
    v.as_object_mut().unwrap().remove("rls");
    let snap = parse_answer(Path::new("x"), &v.to_string()).unwrap();
    assert_eq!(snap.rls, RlsStatus::default());
}

#[test]
fn an_error_answer_is_reported_as_such() {
    let e = parse_answer(Path::new("/s"), r#"{"error":"unknown request"}"#).unwrap_err();
    assert!(e.to_string().contains("unknown request"), "{e}");
    assert!(parse_answer(Path::new("/s"), "").is_err());
}

#[tokio::test]
async fn socket_answers_snapshots_replaces_stale_files_refuses_live_ones_and_cleans_up() {
    let dir = std::env::temp_dir().join(format!("limiter-control-{}", std::process::id()));
    let path = dir.join("sub/agent.sock");
    // A stale socket (bound, then its listener gone) is replaced.
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let control = Control::bind(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(matches!(Control::bind(&path), Err(ControlError::InUse { .. })));

    let snap = Snapshot { version: "x".into(), time_unix_ms: 42, ..Default::default() };
    control.publish(snap.clone());
    let p = path.clone();
    let got = tokio::task::spawn_blocking(move || fetch(&p)).await.unwrap().unwrap();
    assert_eq!(got, snap);

    let mut raw = UnixStream::connect(&path).await.unwrap();
    raw.write_all(b"bogus\n").await.unwrap();
    let mut text = String::new();
    raw.read_to_string(&mut text).await.unwrap();
    assert!(text.contains("unknown request"), "{text}");

    drop(control);
    assert!(!path.exists(), "socket removed on drop");
    let e = fetch(&path).unwrap_err();
    assert!(e.to_string().contains("is limiter-agent running?"), "{e}");

    std::fs::write(&path, "not a socket").unwrap();
    assert!(matches!(Control::bind(&path), Err(ControlError::NotASocket { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}
