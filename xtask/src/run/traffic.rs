//! The demo's traffic: a tiny HTTP service and its clients, each a thread moved into its
//! network namespace with `setns(2)` (a thread's namespace is its own; threads it starts
//! inherit it). Every loop is bounded by a stop flag and socket timeouts, and
//! [`Workers`] stops and joins them when dropped.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// A client request must be answered within this, or it counts as failed (a dropped SYN is
/// retransmitted only after a second, so a limited connection fails).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// What one request got.
pub enum Outcome {
    /// `200`, with the `x-ratelimit-*` headers Envoy added.
    Ok(String),
    /// `429` from Envoy's rate limit filter, with its `x-ratelimit-*` headers.
    Limited(String),
    /// No answer in time: the connection was cut (its SYNs dropped in XDP) or it failed.
    Failed,
}

/// Requests answered 200, answered 429, and failed, for one client; and the rate-limit
/// headers of the latest 200 and 429.
#[derive(Default)]
pub struct Tally {
    pub ok: AtomicU64,
    pub limited: AtomicU64,
    pub failed: AtomicU64,
    last_ok_headers: Mutex<String>,
    last_limited_headers: Mutex<String>,
}

/// (200s, 429s, failed).
pub type Counts = (u64, u64, u64);

impl Tally {
    pub fn get(&self) -> Counts {
        (self.ok.load(Ordering::Relaxed), self.limited.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }

    /// The `x-ratelimit-*` headers of the latest 200 and of the latest 429 (empty if none).
    pub fn headers(&self) -> (String, String) {
        let read = |m: &Mutex<String>| m.lock().map(|s| s.clone()).unwrap_or_default();
        (read(&self.last_ok_headers), read(&self.last_limited_headers))
    }

    fn record(&self, outcome: Outcome) {
        let (counter, headers) = match outcome {
            Outcome::Ok(h) => (&self.ok, Some((&self.last_ok_headers, h))),
            Outcome::Limited(h) => (&self.limited, Some((&self.last_limited_headers, h))),
            Outcome::Failed => (&self.failed, None),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some((slot, h)) = headers
            && !h.is_empty()
            && let Ok(mut slot) = slot.lock()
        {
            *slot = h;
        }
    }
}

/// Background threads sharing one stop flag; dropping it stops and joins them.
#[derive(Default)]
pub struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<(String, Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Workers {
    /// Runs `body(stop)` in a thread inside netns `ns`, until `stop` is set (by
    /// [`Self::stop_one`] or on drop). Fails if the thread cannot enter the namespace or
    /// `body` fails to start (`body` signals readiness by returning from `setup`).
    pub fn spawn<S, B>(&mut self, name: &str, ns: &str, setup: S, body: B) -> Result<()>
    where
        S: FnOnce() -> Result<B::Ready> + Send + 'static,
        B: Body,
    {
        let stop_all = Arc::clone(&self.stop);
        let stop_one = Arc::new(AtomicBool::new(false));
        let stop_me = Arc::clone(&stop_one);
        let ns_owned = ns.to_owned();
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let ready = enter_netns(&ns_owned).and_then(|()| setup());
                match ready {
                    Ok(ready) => {
                        let _ = tx.send(Ok(()));
                        let stopped = || stop_all.load(Ordering::Relaxed) || stop_me.load(Ordering::Relaxed);
                        body.run(ready, &stopped);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .with_context(|| format!("cannot start the {name} thread"))?;
        self.threads.push((name.to_owned(), stop_one, handle));
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.context(format!("{name} did not start in netns {ns}"))),
            Err(_) => bail!("{name} did not start in netns {ns} within 5s"),
        }
    }

    /// Stops one thread by name and waits for it.
    pub fn stop_one(&mut self, name: &str) {
        if let Some(i) = self.threads.iter().position(|(n, _, _)| n == name) {
            let (_, stop, handle) = self.threads.remove(i);
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for (_, _, handle) in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// What a worker thread runs once its setup succeeded.
pub trait Body: Send + 'static {
    type Ready: Send + 'static;
    fn run(self, ready: Self::Ready, stopped: &dyn Fn() -> bool);
}

/// Moves the calling thread into the network namespace `ip netns` calls `ns`.
fn enter_netns(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("cannot open {path}: does netns {ns} exist?"))?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET changes only this thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setns into {ns}"));
    }
    Ok(())
}

/// The HTTP service: answers any request with `200 OK`, one short-lived thread per
/// connection (each bounded by a read timeout).
pub struct HttpServer {
    pub served: Arc<AtomicU64>,
}

impl HttpServer {
    pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
        let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        listener.set_nonblocking(true).context("cannot make the listener non-blocking")?;
        Ok(listener)
    }
}

impl Body for HttpServer {
    type Ready = TcpListener;
    fn run(self, listener: TcpListener, stopped: &dyn Fn() -> bool) {
        while !stopped() {
            match listener.accept() {
                Ok((stream, _)) => {
                    let served = Arc::clone(&self.served);
                    std::thread::spawn(move || {
                        if serve_one(stream).is_ok() {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

fn serve_one(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut buf = [0u8; 1024];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf[len..])?;
        if n == 0 || len + n == buf.len() {
            break;
        }
        len += n;
    }
    let body = "hello from the demo service in ld-srv\n";
    let reply = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes())
}

/// One `GET /` within [`REQUEST_TIMEOUT`]: its status and rate-limit headers.
fn http_get(to: SocketAddr) -> Outcome {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let Ok(mut stream) = TcpStream::connect_timeout(&to, REQUEST_TIMEOUT) else {
        return Outcome::Failed;
    };
    let mut reply = Vec::new();
    let result = (|| -> std::io::Result<()> {
        stream.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")?;
        let mut buf = [0u8; 512];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            stream.set_read_timeout(Some(left))?;
            match stream.read(&mut buf)? {
                0 => return Ok(()),
                n if reply.len() < 4096 => reply.extend_from_slice(&buf[..n]),
                _ => return Ok(()),
            }
        }
    })();
    if result.is_err() {
        return Outcome::Failed;
    }
    let text = String::from_utf8_lossy(&reply);
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let headers: Vec<&str> = lines
        .take_while(|l| !l.is_empty())
        .filter(|l| l.get(..12).is_some_and(|p| p.eq_ignore_ascii_case("x-ratelimit-")))
        .collect();
    let headers = headers.join("; ");
    match status.split(' ').nth(1) {
        Some("200") => Outcome::Ok(headers),
        Some("429") => Outcome::Limited(headers),
        _ => Outcome::Failed,
    }
}

/// A client sending `per_second` requests a second to `to`, each in its own thread so a
/// limited (hanging) request does not slow the others; at most `max_in_flight` at once.
pub struct Client {
    pub to: SocketAddr,
    pub per_second: u32,
    pub max_in_flight: u64,
    pub tally: Arc<Tally>,
}

impl Body for Client {
    type Ready = ();
    fn run(self, (): (), stopped: &dyn Fn() -> bool) {
        let step = Duration::from_secs(1) / self.per_second.max(1);
        let in_flight = Arc::new(AtomicU64::new(0));
        let mut next = Instant::now();
        while !stopped() {
            if in_flight.load(Ordering::Relaxed) < self.max_in_flight {
                in_flight.fetch_add(1, Ordering::Relaxed);
                let (to, tally, in_flight) = (self.to, Arc::clone(&self.tally), Arc::clone(&in_flight));
                std::thread::spawn(move || {
                    tally.record(http_get(to));
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
            next += step;
            match next.checked_duration_since(Instant::now()) {
                Some(wait) => std::thread::sleep(wait),
                // Behind schedule (a slow machine): catch up from now rather than burst.
                None => next = Instant::now(),
            }
        }
        // Let the last requests finish (each is bounded by REQUEST_TIMEOUT).
        let deadline = Instant::now() + REQUEST_TIMEOUT + Duration::from_millis(500);
        while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether Envoy's admin endpoint at `admin` in netns `ns` answers `GET /ready` with 200 (it
/// does once its listeners and clusters are initialised).
pub fn envoy_ready(ns: &str, admin: SocketAddr) -> Result<bool> {
    let ns = ns.to_owned();
    let probe = std::thread::spawn(move || -> Result<bool> {
        enter_netns(&ns)?;
        let Ok(mut stream) = TcpStream::connect_timeout(&admin, REQUEST_TIMEOUT) else { return Ok(false) };
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        // HTTP/1.1: Envoy answers HTTP/1.0 with 426 unless told to accept it.
        stream.write_all(b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        Ok(answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"))
    });
    probe.join().map_err(|_| anyhow::anyhow!("the Envoy readiness probe thread panicked"))?
}
