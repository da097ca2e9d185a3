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
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use log::{info, warn};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
    sync::Semaphore,
    task::JoinHandle,
};

use crate::dataplane::Dataplane;

mod rls_status;
mod snapshot;
pub use self::rls_status::*;
pub use self::snapshot::*;

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
mod tests;
