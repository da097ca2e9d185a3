//! The local control socket: a Unix domain socket (default [`DEFAULT_SOCKET`], mode 0600)
//! that answers `snapshot\n` with one line of JSON ([`Snapshot`]) and closes.
//! `limiter-agent top` is its client.
//!
//! The run loop owns the [`Dataplane`] and calls [`Control::refresh`] on its ticks; a tokio
//! task answers clients from the last snapshot, so a client never reads a kernel map and
//! many clients cost the data path nothing. The per-source table walk
//! ([`Dataplane::tracked_sources`], O(entries)) is sampled at most every
//! [`TRACKED_SAMPLE_EVERY`].
//!
//! The `rls` section ([`RlsStatus`]) is read from the rate limit service's [`Metrics`] and
//! backend ([`RlsSource`]). Without an XDP program (no `--iface`: the rate limit service
//! only) the kernel sections are empty and `interfaces` is empty.

use std::{
    io::{self, Read as _, Write as _},
    net::IpAddr,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use limiter_common::reason;
use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
    sync::Semaphore,
    task::JoinHandle,
};

use crate::dataplane::{Dataplane, Stats};

mod rls_status;
pub use self::rls_status::*;

/// Where `limiter-agent run` listens and `limiter-agent top` connects unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/limiter/agent.sock";
/// How many of the most-dropped sources a snapshot lists.
pub const TOP_SOURCES: usize = 10;
/// The per-source table is walked at most this often.
pub const TRACKED_SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// The one request the socket understands.
pub const REQUEST_SNAPSHOT: &str = "snapshot";

/// A client gets this long to send its request line and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Clients answered at once; more are turned away (closed without an answer).
const MAX_CLIENTS: usize = 16;
/// Longest request line read.
const MAX_REQUEST: u64 = 256;

/// What the agent is doing, as of `time_unix_ms`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Agent version.
    pub version: String,
    /// When the counters were read (milliseconds since the Unix epoch).
    pub time_unix_ms: u64,
    /// Seconds since the agent started.
    pub uptime_s: u64,
    pub interfaces: Vec<Interface>,
    pub policy: PolicyStatus,
    /// Every counter of `STATS`, in index order: the verdict reasons, then the side events.
    pub reasons: Vec<ReasonCount>,
    pub rules: Vec<RuleCount>,
    /// The sources with the most dropped packets, most first (at most [`TOP_SOURCES`]).
    pub top_sources: Vec<SourceCount>,
    pub sources: SourceTable,
    /// The rate limit service (absent from agents older than this field: all zero).
    #[serde(default)]
    pub rls: RlsStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    /// `native` or `generic`.
    pub mode: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// Kernel rules, allow and deny entries of the policy in force.
    pub rules: usize,
    pub allow: usize,
    pub deny: usize,
    /// False while the last reload attempt was rejected (the previous policy stays in force).
    pub last_reload_ok: bool,
    pub reloads_applied: u64,
    pub reloads_rejected: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    #[default]
    Pass,
    Drop,
    /// A side event, counted besides the packet's verdict.
    Event,
}

impl Verdict {
    pub fn of(r: u32) -> Self {
        if r >= reason::VERDICT_REASONS {
            Self::Event
        } else if reason::is_drop(r) {
            Self::Drop
        } else {
            Self::Pass
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Drop => "drop",
            Self::Event => "event",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCount {
    /// `limiter_common::reason::name` (the same label the metrics use).
    pub reason: String,
    pub verdict: Verdict,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCount {
    /// `policy/rule`.
    pub name: String,
    pub passed_packets: u64,
    pub passed_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    pub shadow_dropped_packets: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCount {
    /// The source address (IPv6: its source prefix's first address).
    pub source: IpAddr,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

/// Occupancy of the per-source bucket table, sampled (see [`TRACKED_SAMPLE_EVERY`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceTable {
    pub tracked: u64,
    pub capacity: u64,
    pub sampled_at_unix_ms: u64,
}

/// Reload outcomes the run loop keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reloads {
    pub applied: u64,
    pub rejected: u64,
    pub last_ok: bool,
}

impl Default for Reloads {
    fn default() -> Self {
        Self { applied: 0, rejected: 0, last_ok: true }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("creating the control socket directory {dir}: {source}")]
    Dir { dir: PathBuf, source: io::Error },
    #[error(
        "another limiter-agent is listening on {path}: stop it, or give this one another \
         --control-socket"
    )]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket: remove it, or pass another --control-socket")]
    NotASocket { path: PathBuf },
    #[error("control socket {path}: {action}: {source}")]
    Io { path: PathBuf, action: &'static str, source: io::Error },
    #[error(
        "cannot connect to {path}: {source}: is limiter-agent running? it listens on {path} \
         (set with `limiter-agent run --control-socket PATH`, read with `top --socket PATH`)"
    )]
    NotRunning { path: PathBuf, source: io::Error },
    #[error("the agent at {path} answered something that is not a snapshot: {detail}")]
    BadAnswer { path: PathBuf, detail: String },
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> ControlError {
    let path = path.to_owned();
    move |source| ControlError::Io { path, action, source }
}

/// The agent's side of the control socket. Dropping it stops answering and removes the
/// socket file (unless another agent has replaced it since).
pub struct Control {
    path: PathBuf,
    /// (device, inode) of the socket file this agent created.
    identity: (u64, u64),
    shared: Arc<Mutex<Arc<Snapshot>>>,
    task: JoinHandle<()>,
    started: Instant,
    interfaces: Vec<Interface>,
    sources: SourceTable,
    sampled: Option<Instant>,
    refresh_failing: bool,
}

impl Control {
    /// Listens on `path` (mode 0600; the directory is created 0755 if missing) and starts
    /// answering from an empty snapshot. A socket file left by a crashed agent is replaced;
    /// a live agent's is not. Must be called inside a tokio runtime.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|source| ControlError::Dir { dir: dir.to_owned(), source })?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ControlError::NotASocket { path: path.to_owned() });
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(ControlError::InUse { path: path.to_owned() });
                }
                Err(_) => info!(
                    "replacing the stale control socket {} (left by an agent that did not stop cleanly)",
                    path.display()
                ),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path, "inspecting")(e)),
        }
        // Bind a private name, restrict it, then rename it into place: the socket is never
        // reachable at `path` with looser permissions, and a stale file is replaced atomically.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&tmp, "removing a leftover")(e)),
        }
        let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(io_err(&tmp, "binding"))?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(&tmp, "setting mode 0600"))
            .and_then(|()| std::fs::rename(&tmp, path).map_err(io_err(path, "moving into place")));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let meta = std::fs::symlink_metadata(path).map_err(io_err(path, "inspecting"))?;
        listener.set_nonblocking(true).map_err(io_err(path, "setting non-blocking"))?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(io_err(path, "registering with tokio"))?;
        let shared = Arc::new(Mutex::new(Arc::new(Snapshot::default())));
        let task = tokio::spawn(serve(listener, Arc::clone(&shared)));
        Ok(Self {
            path: path.to_owned(),
            identity: (meta.dev(), meta.ino()),
            shared,
            task,
            started: Instant::now(),
            interfaces: Vec::new(),
            sources: SourceTable::default(),
            sampled: None,
            refresh_failing: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records an interface the program is attached to (`mode`: as `Dataplane::attach` says).
    pub fn attached(&mut self, iface: &str, mode: &str) {
        self.interfaces.push(Interface { name: iface.to_owned(), mode: mode.to_owned() });
    }

    /// Reads the counters and publishes a new snapshot. Call it on every stats tick and about
    /// once a second; failures are logged (once until the next success) and the last good
    /// snapshot keeps being served. `dp`: `None` without an XDP program (the kernel sections
    /// stay empty).
    pub fn refresh(&mut self, dp: Option<&Dataplane>, reloads: Reloads, rls: RlsStatus) {
        let now_ms = unix_ms(SystemTime::now());
        let mut policy = PolicyStatus {
            last_reload_ok: reloads.last_ok,
            reloads_applied: reloads.applied,
            reloads_rejected: reloads.rejected,
            ..PolicyStatus::default()
        };
        let mut rls = rls;
        let kernel = match dp {
            None => None,
            Some(dp) => {
                rls.blocked_now = dp.blocked_sources() as u64;
                let read = dp.stats().and_then(|stats| dp.top_dropped_sources(TOP_SOURCES).map(|top| (stats, top)));
                let read = match read {
                    Ok(x) => x,
                    Err(e) => {
                        if !self.refresh_failing {
                            warn!("control socket: reading counters for the snapshot: {e}");
                        }
                        self.refresh_failing = true;
                        return;
                    }
                };
                if self.sampled.is_none_or(|at| at.elapsed() >= TRACKED_SAMPLE_EVERY) {
                    self.sources = SourceTable {
                        tracked: dp.tracked_sources() as u64,
                        capacity: u64::from(dp.source_capacity()),
                        sampled_at_unix_ms: now_ms,
                    };
                    self.sampled = Some(Instant::now());
                }
                if let Some(plan) = dp.current_plan() {
                    policy = PolicyStatus {
                        rules: plan.rules.len(),
                        allow: plan.allow.len(),
                        deny: plan.deny.len(),
                        ..policy
                    };
                }
                Some(read)
            }
        };
        self.refresh_failing = false;
        let meta = Meta {
            time_unix_ms: now_ms,
            uptime_s: self.started.elapsed().as_secs(),
            interfaces: self.interfaces.clone(),
            policy,
            sources: self.sources.clone(),
            rls,
        };
        let snapshot = Snapshot::build(kernel.as_ref().map(|(stats, top)| (stats, top.as_slice())), meta);
        self.publish(snapshot);
    }

    /// Replaces the snapshot clients get.
    pub fn publish(&self, snapshot: Snapshot) {
        *self.shared.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(snapshot);
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.task.abort();
        // Remove only the file this agent created: a newer agent may own `path` by now.
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            match std::fs::remove_file(&self.path) {
                Ok(()) => info!("removed the control socket {}", self.path.display()),
                Err(e) => warn!("removing the control socket {}: {e}", self.path.display()),
            }
        }
    }
}

/// The parts of a snapshot that do not come from the counters.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    pub time_unix_ms: u64,
    pub uptime_s: u64,
    pub interfaces: Vec<Interface>,
    pub policy: PolicyStatus,
    pub sources: SourceTable,
    pub rls: RlsStatus,
}

impl Snapshot {
    /// Assembles a snapshot from counters read out of the data path (`None`: no XDP program;
    /// the kernel sections are empty).
    pub fn build(kernel: Option<(&Stats, &[(IpAddr, limiter_common::Counter)])>, meta: Meta) -> Self {
        let Some((stats, top)) = kernel else {
            return Self {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                time_unix_ms: meta.time_unix_ms,
                uptime_s: meta.uptime_s,
                interfaces: meta.interfaces,
                policy: meta.policy,
                sources: meta.sources,
                rls: meta.rls,
                ..Self::default()
            };
        };
        let reasons = (0..reason::COUNT)
            .map(|r| {
                let c = stats.reason(r);
                ReasonCount {
                    reason: reason::name(r).to_owned(),
                    verdict: Verdict::of(r),
                    packets: c.packets,
                    bytes: c.bytes,
                }
            })
            .collect();
        let rules = stats
            .rules
            .iter()
            .map(|(name, c)| RuleCount {
                name: name.clone(),
                passed_packets: c.passed.packets,
                passed_bytes: c.passed.bytes,
                dropped_packets: c.dropped.packets,
                dropped_bytes: c.dropped.bytes,
                shadow_dropped_packets: c.shadow_dropped.packets,
            })
            .collect();
        let top_sources = top
            .iter()
            .map(|(source, c)| SourceCount { source: *source, dropped_packets: c.packets, dropped_bytes: c.bytes })
            .collect();
        Self {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            time_unix_ms: meta.time_unix_ms,
            uptime_s: meta.uptime_s,
            interfaces: meta.interfaces,
            policy: meta.policy,
            reasons,
            rules,
            top_sources,
            sources: meta.sources,
            rls: meta.rls,
        }
    }

    /// Whether the agent runs the XDP program (else it serves the rate limit service only):
    /// a kernel snapshot always lists every reason.
    pub fn has_kernel(&self) -> bool {
        !self.interfaces.is_empty() || !self.reasons.is_empty()
    }

    /// Packets and bytes over every reason with this verdict.
    pub fn total(&self, verdict: Verdict) -> (u64, u64) {
        self.reasons.iter().filter(|r| r.verdict == verdict).fold((0, 0), |(p, b), r| (p + r.packets, b + r.bytes))
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

async fn serve(listener: tokio::net::UnixListener, shared: Arc<Mutex<Arc<Snapshot>>>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Turned away: the client sees the connection close without an answer.
                let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                    continue;
                };
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    // A client that stalls is cut off; nothing else waits for it.
                    let _ = tokio::time::timeout(CLIENT_TIMEOUT, answer(stream, shared)).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!("control socket: accepting a client: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(stream: UnixStream, shared: Arc<Mutex<Arc<Snapshot>>>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST)).read_line(&mut line).await?;
    let reply = match line.trim() {
        REQUEST_SNAPSHOT => {
            let snapshot = Arc::clone(&shared.lock().unwrap_or_else(PoisonError::into_inner));
            serde_json::to_string(&*snapshot).map_err(io::Error::other)?
        }
        other => serde_json::json!({ "error": format!("unknown request {other:?}: the only request is `{REQUEST_SNAPSHOT}`") })
            .to_string(),
    };
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await
}

/// Client side: asks the agent listening on `path` for a snapshot (blocking, bounded by
/// timeouts).
pub fn fetch(path: &Path) -> Result<Snapshot, ControlError> {
    let mut stream = std::os::unix::net::UnixStream::connect(path)
        .map_err(|source| ControlError::NotRunning { path: path.to_owned(), source })?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io_err(path, "setting a timeout"))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io_err(path, "setting a timeout"))?;
    stream.write_all(format!("{REQUEST_SNAPSHOT}\n").as_bytes()).map_err(io_err(path, "sending the request"))?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(io_err(path, "reading the answer"))?;
    parse_answer(path, &text)
}

fn parse_answer(path: &Path, text: &str) -> Result<Snapshot, ControlError> {
    let bad = |detail: String| ControlError::BadAnswer { path: path.to_owned(), detail };
    if text.trim().is_empty() {
        return Err(bad("an empty answer (too many clients at once?)".into()));
    }
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(text)
        && let Some(err) = map.get("error")
    {
        return Err(bad(format!("error {err}")));
    }
    serde_json::from_str(text).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    use limiter_common::{Counter, RuleCounter};

    use super::*;
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
        let unparsed: Vec<Verdict> =
            snap.reasons.iter().filter(|r| r.reason == "unparsed").map(|r| r.verdict).collect();
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
}
