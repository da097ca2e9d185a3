//! Real Redis topologies for the tests, on free loopback ports, stopped on drop: a Redis
//! Cluster of N masters (`redis-server --cluster-enabled yes` and `redis-cli --cluster create`)
//! and a Sentinel group (a master, a replica, three sentinels) that can fail over.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::redis::{RedisServer, Reply, command_at, free_port};

/// How long a topology gets to become ready (cluster state ok, sentinels agreeing).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A Redis Cluster of masters only, every slot assigned.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` cluster-mode servers and joins them with `redis-cli --cluster create`,
    /// then waits until every node reports `cluster_state:ok`.
    pub fn start(masters: usize) -> Result<RedisCluster> {
        assert!(
            crate::has_tool("redis-cli"),
            "needs `redis-cli` on PATH: run `cargo xtask setup` (Debian redis-tools)"
        );
        let mut nodes = Vec::new();
        for _ in 0..masters {
            // The bus port defaults to port + 10000, which may be taken, or past 65535 for a
            // high ephemeral port: give it a free one of its own.
            let bus = free_port()?.to_string();
            let args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                .into_iter()
                .chain(["--cluster-node-timeout", "2000", "--cluster-port", &bus])
                .map(str::to_owned)
                .collect::<Vec<_>>();
            nodes.push(RedisServer::start_with(|_, _| args, None)?);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .context("running redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_ok()?;
        Ok(cluster)
    }

    /// Waits until every running node says `cluster_state:ok`.
    pub fn wait_ok(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ok = self.nodes.iter().filter(|n| n.is_running()).all(|n| {
                n.command(&["CLUSTER", "INFO"])
                    .ok()
                    .and_then(|r| r.as_text())
                    .is_some_and(|t| t.contains("cluster_state:ok"))
            });
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the cluster did not reach cluster_state:ok within {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `127.0.0.1:p1,127.0.0.1:p2,...`, the reference's REDIS_URL for a cluster.
    pub fn url_list(&self) -> String {
        self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect::<Vec<_>>().join(",")
    }

    /// The node that holds `key`'s slot (by `CLUSTER KEYSLOT` and `CLUSTER SLOTS`).
    pub fn node_of(&self, key: &str) -> Result<&RedisServer> {
        let first = self.nodes.first().context("empty cluster")?;
        let slot = first.command(&["CLUSTER", "KEYSLOT", key])?.as_int().context("KEYSLOT reply")?;
        let Reply::Array(Some(ranges)) = first.command(&["CLUSTER", "SLOTS"])? else { bail!("CLUSTER SLOTS reply") };
        for range in ranges {
            let Reply::Array(Some(fields)) = range else { continue };
            let (Some(lo), Some(hi)) = (fields.first().and_then(Reply::as_int), fields.get(1).and_then(Reply::as_int))
            else {
                continue;
            };
            if (lo..=hi).contains(&slot)
                && let Some(Reply::Array(Some(master))) = fields.get(2)
                && let Some(port) = master.get(1).and_then(Reply::as_int)
            {
                return self.nodes.iter().find(|n| i64::from(n.port()) == port).context("slot owner not ours");
            }
        }
        bail!("no node holds slot {slot}")
    }

    /// Every key on every node, sorted.
    pub fn keys(&self, pattern: &str) -> Result<Vec<String>> {
        let mut all = Vec::new();
        for node in &self.nodes {
            all.extend(node.keys(pattern)?);
        }
        all.sort();
        Ok(all)
    }
}

/// A `redis-server --sentinel` child, killed on drop.
pub struct Sentinel {
    pub port: u16,
    child: Child,
    dir: std::path::PathBuf,
}

impl Sentinel {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn command(&self, args: &[&str]) -> Result<Reply> {
        command_at(self.addr(), args)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A master, one replica and three sentinels watching it under the name [`SentinelGroup::NAME`].
pub struct SentinelGroup {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<Sentinel>,
}

impl SentinelGroup {
    pub const NAME: &'static str = "mymaster";

    pub fn start() -> Result<SentinelGroup> {
        let master = RedisServer::start()?;
        let master_port = master.port();
        let replica = RedisServer::start_with(
            |_, _| vec!["--replicaof".into(), "127.0.0.1".into(), master_port.to_string()],
            None,
        )?;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(start_sentinel(master_port)?);
        }
        let group = SentinelGroup { master, replica, sentinels };
        // Ready when the replica is in sync and every sentinel knows the replica and the others.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let synced = group
                .replica
                .command(&["INFO", "replication"])
                .ok()
                .and_then(|r| r.as_text())
                .is_some_and(|t| t.contains("master_link_status:up"));
            let known = group.sentinels.iter().all(|s| {
                s.command(&["SENTINEL", "MASTER", Self::NAME]).ok().is_some_and(|r| {
                    let f = r.as_strings();
                    let field = |name: &str| f.iter().position(|x| x == name).and_then(|i| f.get(i + 1)).cloned();
                    field("num-slaves").as_deref() == Some("1") && field("num-other-sentinels").as_deref() == Some("2")
                })
            });
            if synced && known {
                return Ok(group);
            }
            if Instant::now() > deadline {
                bail!("the sentinel group was not ready within {READY_TIMEOUT:?} (replica synced: {synced})");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `mymaster,127.0.0.1:s1,127.0.0.1:s2,127.0.0.1:s3`, the reference's REDIS_URL for
    /// Sentinel.
    pub fn url_list(&self) -> String {
        let mut parts = vec![Self::NAME.to_owned()];
        parts.extend(self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)));
        parts.join(",")
    }

    /// The port the sentinels name as master now.
    pub fn master_port(&self) -> Result<u16> {
        let reply = self.sentinels[0].command(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::NAME])?;
        reply.as_strings().get(1).and_then(|p| p.parse().ok()).context("GET-MASTER-ADDR-BY-NAME reply")
    }

    /// `SENTINEL FAILOVER` and waits until the sentinels name the replica as master and it
    /// accepts writes.
    pub fn failover(&self) -> Result<()> {
        let reply = self.sentinels[0].command(&["SENTINEL", "FAILOVER", Self::NAME])?;
        if let Reply::Error(e) = reply {
            bail!("SENTINEL FAILOVER: {e}");
        }
        self.wait_promoted()
    }

    /// Waits until the sentinels name the replica as master and it says it is one (after
    /// [`Self::failover`], or after the master was killed).
    pub fn wait_promoted(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let promoted = self.master_port().ok() == Some(self.replica.port())
                && self
                    .replica
                    .command(&["ROLE"])
                    .ok()
                    .and_then(|r| r.as_strings().first().cloned())
                    .is_some_and(|role| role == "master");
            if promoted {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no failover within {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn start_sentinel(master_port: u16) -> Result<Sentinel> {
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("limiter-sentinel-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Sentinel rewrites its config file, so each gets its own, writable.
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {name} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 3000\n",
            dir.display(),
            name = SentinelGroup::NAME
        ),
    )
    .context("writing sentinel.conf")?;
    let child = Command::new("redis-server")
        .arg(&conf)
        .args(["--sentinel", "--loglevel", "warning"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting redis-server --sentinel")?;
    let sentinel = Sentinel { port, child, dir };
    let deadline = Instant::now() + READY_TIMEOUT;
    while !matches!(sentinel.command(&["PING"]), Ok(Reply::Status(ref s)) if s == "PONG") {
        if Instant::now() > deadline {
            bail!("sentinel on port {port} did not answer PING");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(sentinel)
}
