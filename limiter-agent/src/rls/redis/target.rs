//! Where Redis is and how to reach it: one server, a Sentinel group or a Cluster, over TCP,
//! TLS (rustls) or a unix socket, with a user and password, through `redis-rs`'s own support
//! for each topology (its Sentinel client finds the master, its Cluster client routes by slot
//! and follows MOVED/ASK).
//!
//! The address list follows envoyproxy/ratelimit's `REDIS_URL`: comma-separated nodes, and for
//! Sentinel the master's name first (`mymaster,host1:26379,host2:26379`). Each node is
//! `host:port`, a `redis://` / `rediss://` URL, or a socket path with `unix`. A password may sit
//! in a URL, but the agent's own flags and the environment are the better place, since a URL
//! is easily logged: [`RedisTarget`]'s `Display` never shows the password.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo,
    RedisFuture, TlsCertificates, TlsMode, Value,
};

/// How the Redis deployment is organised (the reference's `REDIS_TYPE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Topology {
    /// One server (or a proxy in front of several, such as twemproxy).
    #[default]
    Single,
    /// A master found through Sentinels; the first entry of the list is the master's name.
    Sentinel,
    /// Redis Cluster: any of the listed nodes gives the slot map.
    Cluster,
}

impl FromStr for Topology {
    type Err = String;

    /// The reference's spellings (`SINGLE`, `sentinel`, any case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "single" => Ok(Topology::Single),
            "sentinel" => Ok(Topology::Sentinel),
            "cluster" => Ok(Topology::Cluster),
            _ => Err(format!("unknown Redis type {s:?}: expected single, sentinel or cluster")),
        }
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Topology::Single => "single",
            Topology::Sentinel => "sentinel",
            Topology::Cluster => "cluster",
        })
    }
}

/// How node entries without a scheme are read (the reference's `REDIS_SOCKET_TYPE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SocketType {
    #[default]
    Tcp,
    Unix,
}

impl FromStr for SocketType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(SocketType::Tcp),
            "unix" => Ok(SocketType::Unix),
            _ => Err(format!("unknown socket type {s:?}: expected tcp or unix")),
        }
    }
}

/// A user (optional, Redis 6 ACL) and password.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Auth {
    pub username: Option<String>,
    pub password: String,
}

impl Auth {
    /// The reference's `REDIS_AUTH` form: `password`, or `user:password`.
    pub fn parse(text: &str) -> Auth {
        let text = text.trim_end_matches(['\r', '\n']);
        match text.split_once(':') {
            Some(("", password)) => Auth { username: None, password: password.to_owned() },
            Some((user, password)) => Auth { username: Some(user.to_owned()), password: password.to_owned() },
            None => Auth { username: None, password: text.to_owned() },
        }
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.username {
            Some(user) => write!(f, "{user}:<redacted>"),
            None => f.write_str("<redacted>"),
        }
    }
}

/// TLS settings: the CA that signed the servers' certificates (default: the system roots) and
/// an optional client certificate and key for mutual TLS. Paths; read at connect time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// One Redis deployment to count in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisTarget {
    pub topology: Topology,
    /// Sentinel only: the master's name.
    pub master_name: Option<String>,
    /// Servers (single: the first; cluster: seeds; sentinel: the sentinels).
    pub nodes: Vec<ConnectionAddr>,
    /// TLS to every node (set by `rediss://` or explicitly).
    pub tls: Option<TlsFiles>,
    /// Password for the Redis servers (not the sentinels).
    pub auth: Option<Auth>,
    /// Password for the sentinels, when they have one of their own.
    pub sentinel_auth: Option<Auth>,
    pub db: i64,
}

/// A target that cannot be used as written.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("Redis address list is empty")]
    Empty,
    #[error("Redis type sentinel needs the master's name first, then the sentinels (e.g. mymaster,10.0.0.1:26379)")]
    NoSentinels,
    #[error("invalid Redis node {node:?}: {reason}")]
    Node { node: String, reason: String },
    #[error("reading {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Client(#[from] redis::RedisError),
}

impl RedisTarget {
    /// Parses a comma-separated node list as the reference's `REDIS_URL`. Credentials and the
    /// database number in a URL are taken in (the first URL that has them wins).
    pub fn parse(topology: Topology, socket: SocketType, list: &str) -> Result<RedisTarget, TargetError> {
        let mut entries: Vec<&str> = list.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
        if entries.is_empty() {
            return Err(TargetError::Empty);
        }
        let master_name = if topology == Topology::Sentinel {
            let name = entries.remove(0);
            if entries.is_empty() || name.contains("://") {
                return Err(TargetError::NoSentinels);
            }
            Some(name.to_owned())
        } else {
            None
        };
        let mut target =
            RedisTarget { topology, master_name, nodes: Vec::new(), tls: None, auth: None, sentinel_auth: None, db: 0 };
        for entry in entries {
            let url = if entry.contains("://") {
                entry.to_owned()
            } else if socket == SocketType::Unix {
                format!("unix://{entry}")
            } else {
                format!("redis://{entry}")
            };
            let info = url
                .as_str()
                .into_connection_info()
                .map_err(|e| TargetError::Node { node: redact_url(entry), reason: e.to_string() })?;
            let settings = info.redis_settings();
            if target.auth.is_none()
                && let Some(password) = settings.password()
            {
                target.auth =
                    Some(Auth { username: settings.username().map(str::to_owned), password: password.to_owned() });
            }
            if settings.db() != 0 {
                target.db = settings.db();
            }
            if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) && target.tls.is_none() {
                target.tls = Some(TlsFiles::default());
            }
            target.nodes.push(match info.addr() {
                ConnectionAddr::TcpTls { host, port, .. } => ConnectionAddr::Tcp(host.clone(), *port),
                other => other.clone(),
            });
        }
        Ok(target)
    }

    /// Builds the clients (reads the TLS files); connecting is [`Connector::connect`].
    pub fn connector(&self, timeouts: Timeouts) -> Result<Connector, TargetError> {
        let certs = self.tls.as_ref().map(read_certs).transpose()?;
        let kind = match self.topology {
            Topology::Single => {
                let node = self.nodes.first().ok_or(TargetError::Empty)?;
                let info = self.node_info(node, self.auth.as_ref())?;
                let client = match &certs {
                    Some(certs) => Client::build_with_tls(info, certs.clone())?,
                    None => Client::open(info)?,
                };
                ConnectorKind::Single(client)
            }
            Topology::Cluster => {
                let nodes =
                    self.nodes.iter().map(|n| self.node_info(n, self.auth.as_ref())).collect::<Result<Vec<_>, _>>()?;
                let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                    .connection_timeout(timeouts.connect)
                    .response_timeout(timeouts.response)
                    // A dead master is retried a couple of times only: the caller answers by
                    // its failure mode within its own timeout anyway.
                    .retries(2)
                    .min_retry_wait(10)
                    .max_retry_wait(timeouts.response.as_millis().try_into().unwrap_or(u64::MAX));
                if let Some(auth) = &self.auth {
                    builder = builder.password(auth.password.clone());
                    if let Some(user) = &auth.username {
                        builder = builder.username(user.clone());
                    }
                }
                if let Some(certs) = certs {
                    builder = builder.tls(TlsMode::Secure).certs(certs);
                }
                ConnectorKind::Cluster(builder.build()?)
            }
            Topology::Sentinel => {
                let name = self.master_name.as_deref().ok_or(TargetError::NoSentinels)?;
                let sentinels: Vec<ConnectionAddr> = self.nodes.iter().map(|n| self.tls_addr(n)).collect();
                let mut builder = SentinelClientBuilder::new(sentinels, name, SentinelServerType::Master)?
                    .set_client_to_redis_db(self.db);
                if let Some(auth) = &self.auth {
                    builder = builder.set_client_to_redis_password(&auth.password);
                    if let Some(user) = &auth.username {
                        builder = builder.set_client_to_redis_username(user);
                    }
                }
                if let Some(auth) = &self.sentinel_auth {
                    builder = builder.set_client_to_sentinel_password(&auth.password);
                    if let Some(user) = &auth.username {
                        builder = builder.set_client_to_sentinel_username(user);
                    }
                }
                if let Some(certs) = certs {
                    builder = builder
                        .set_client_to_redis_tls_mode(TlsMode::Secure)
                        .set_client_to_redis_certificates(certs.clone())
                        .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                        .set_client_to_sentinel_certificates(certs);
                }
                ConnectorKind::Sentinel(Box::new(tokio::sync::Mutex::new(builder.build()?)))
            }
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeouts.connect))
            .set_response_timeout(Some(timeouts.response));
        Ok(Connector { kind, config, timeouts, described: self.to_string() })
    }

    fn tls_addr(&self, node: &ConnectionAddr) -> ConnectionAddr {
        match (node, &self.tls) {
            (ConnectionAddr::Tcp(host, port), Some(_)) => {
                ConnectionAddr::TcpTls { host: host.clone(), port: *port, insecure: false, tls_params: None }
            }
            (other, _) => other.clone(),
        }
    }

    fn node_info(&self, node: &ConnectionAddr, auth: Option<&Auth>) -> redis::RedisResult<redis::ConnectionInfo> {
        let mut settings = RedisConnectionInfo::default().set_db(self.db);
        if let Some(auth) = auth {
            settings = settings.set_password(&auth.password);
            if let Some(user) = &auth.username {
                settings = settings.set_username(user);
            }
        }
        Ok(self.tls_addr(node).into_connection_info()?.set_redis_settings(settings))
    }
}

/// `cluster 127.0.0.1:7000,127.0.0.1:7001 tls auth=user:<redacted> db=0`: what the logs show.
impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.topology)?;
        if let Some(name) = &self.master_name {
            write!(f, " master {name} via")?;
        }
        let nodes: Vec<String> = self.nodes.iter().map(ToString::to_string).collect();
        write!(f, " {}", nodes.join(","))?;
        if let Some(tls) = &self.tls {
            f.write_str(" tls")?;
            if let Some(ca) = &tls.ca {
                write!(f, " ca={}", ca.display())?;
            }
            if let Some(cert) = &tls.client_cert {
                write!(f, " client-cert={}", cert.display())?;
            }
        }
        if let Some(auth) = &self.auth {
            write!(f, " auth={auth:?}")?;
        }
        if let Some(auth) = &self.sentinel_auth {
            write!(f, " sentinel-auth={auth:?}")?;
        }
        if self.db != 0 {
            write!(f, " db={}", self.db)?;
        }
        Ok(())
    }
}

/// `redis://user:secret@host` -> `redis://user:<redacted>@host`, for error messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let Some((creds, host)) = rest.rsplit_once('@') else { return url.to_owned() };
    match creds.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => format!("{scheme}://<redacted>@{host}"),
    }
}

fn read_certs(files: &TlsFiles) -> Result<TlsCertificates, TargetError> {
    let read = |what, path: &PathBuf| {
        std::fs::read(path).map_err(|source| TargetError::Read { what, path: path.clone(), source })
    };
    let root_cert = files.ca.as_ref().map(|p| read("Redis TLS CA file", p)).transpose()?;
    let client_tls = match (&files.client_cert, &files.client_key) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read("Redis TLS client certificate", cert)?,
            client_key: read("Redis TLS client key", key)?,
        }),
        _ => None,
    };
    Ok(TlsCertificates { client_tls, root_cert })
}

/// Connection timeouts.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

#[expect(clippy::large_enum_variant, reason = "one per Redis, built once at start: its size never matters")]
enum ConnectorKind {
    Single(Client),
    Cluster(redis::cluster::ClusterClient),
    /// Asks the sentinels for the master at every connect, so a reconnect after a failover
    /// lands on the new master. (The client needs `&mut` to ask.)
    Sentinel(Box<tokio::sync::Mutex<SentinelClient>>),
}

/// Makes connections to one [`RedisTarget`].
pub struct Connector {
    kind: ConnectorKind,
    config: AsyncConnectionConfig,
    timeouts: Timeouts,
    described: String,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.described)
    }
}

impl Connector {
    /// What the logs call this target (no secrets).
    pub fn describe(&self) -> &str {
        &self.described
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, ConnectorKind::Cluster(_))
    }

    /// One connection: the server, the master the sentinels name now, or the cluster (all
    /// masters, routed by slot). Bounded by a few connect timeouts in all (a sentinel lookup
    /// is several round trips).
    pub async fn connect(&self) -> redis::RedisResult<Conn> {
        let limit = self.timeouts.connect * 3;
        let attempt = async {
            match &self.kind {
                ConnectorKind::Single(client) => {
                    client.get_multiplexed_async_connection_with_config(&self.config).await.map(Conn::Plain)
                }
                ConnectorKind::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
                ConnectorKind::Sentinel(client) => {
                    client.lock().await.get_async_connection_with_config(&self.config).await.map(Conn::Plain)
                }
            }
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(result) => result,
            Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {limit:?}"),
            ))),
        }
    }
}

/// A live connection of either kind; both speak [`ConnectionLike`], so commands and pipelines
/// run on it unchanged (a Cluster pipeline must stay within one slot: see
/// [`Conn::is_cluster`]).
#[derive(Clone)]
pub enum Conn {
    Plain(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Plain(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The hash slot of `key` (CRC16 of the key or of its `{hash tag}`, mod 16384), to split a
/// pipeline per slot on a Cluster.
/// (The Cluster specification's algorithm; redis-rs keeps its own copy private.)
pub fn slot(key: &str) -> u16 {
    let key = key.as_bytes();
    // A non-empty `{tag}` is hashed instead of the whole key.
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16_xmodem(hashed) % 16_384
}

/// CRC-16/XMODEM (polynomial 0x1021, initial 0), the Cluster's key hash.
fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_url_forms_parse() {
        let t = RedisTarget::parse(Topology::Single, SocketType::Tcp, "localhost:6379").expect("parses");
        assert_eq!(t.nodes, vec![ConnectionAddr::Tcp("localhost".into(), 6379)]);
        assert_eq!(t.auth, None);
        let t = RedisTarget::parse(Topology::Cluster, SocketType::Tcp, "a:7000, b:7001,c:7002").expect("parses");
        assert_eq!(t.nodes.len(), 3);
        let t = RedisTarget::parse(Topology::Sentinel, SocketType::Tcp, "mymaster,s1:26379,s2:26379").expect("parses");
        assert_eq!(t.master_name.as_deref(), Some("mymaster"));
        assert_eq!(t.nodes.len(), 2);
        assert!(matches!(
            RedisTarget::parse(Topology::Sentinel, SocketType::Tcp, "s1:26379"),
            Err(TargetError::NoSentinels)
        ));
        assert!(matches!(RedisTarget::parse(Topology::Single, SocketType::Tcp, " , "), Err(TargetError::Empty)));
        let t = RedisTarget::parse(Topology::Single, SocketType::Unix, "/run/redis.sock").expect("parses");
        assert_eq!(t.nodes, vec![ConnectionAddr::Unix("/run/redis.sock".into())]);
    }

    #[test]
    fn url_credentials_are_taken_and_never_shown() {
        let t = RedisTarget::parse(Topology::Single, SocketType::Tcp, "rediss://bob:s3cret@h:6380/2").expect("parses");
        assert_eq!(t.auth, Some(Auth { username: Some("bob".into()), password: "s3cret".into() }));
        assert_eq!(t.db, 2);
        assert_eq!(t.tls, Some(TlsFiles::default()));
        let shown = t.to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("bob:<redacted>"), "{shown}");
        assert_eq!(redact_url("redis://bob:s3cret@h:1"), "redis://bob:<redacted>@h:1");
        assert_eq!(redact_url("redis://:s3cret@h:1"), "redis://:<redacted>@h:1");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn auth_forms_of_the_reference() {
        assert_eq!(Auth::parse("pw"), Auth { username: None, password: "pw".into() });
        assert_eq!(Auth::parse("u:p:w\n"), Auth { username: Some("u".into()), password: "p:w".into() });
        assert_eq!(Auth::parse(":pw"), Auth { username: None, password: "pw".into() });
        assert_eq!(format!("{:?}", Auth::parse("u:pw")), "u:<redacted>");
    }

    #[test]
    fn topology_spellings() {
        assert_eq!("SINGLE".parse::<Topology>(), Ok(Topology::Single));
        assert_eq!("Sentinel".parse::<Topology>(), Ok(Topology::Sentinel));
        assert_eq!("cluster".parse::<Topology>(), Ok(Topology::Cluster));
        assert!("ring".parse::<Topology>().is_err());
        assert_eq!("UNIX".parse::<SocketType>(), Ok(SocketType::Unix));
    }

    #[test]
    fn slots_follow_hash_tags() {
        assert_eq!(slot("{user1}a"), slot("{user1}b"));
        // Values from the Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{}foo"), slot("{}foo"));
        assert_ne!(slot("{}foo"), slot("foo"));
    }
}
