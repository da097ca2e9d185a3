//! The `run` command line: what to shield and how ([`RunArgs`]), and the rate limit service,
//! its backend, escalation and metrics ([`RlsArgs`]).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use super::redis_args::RedisArgs;
use crate::{
    control,
    dataplane::{AttachMode, pin},
    rls::{RlsConfig, redis::FailureMode},
};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Interface to shield (repeatable). XDP is attached to each one. Without any, only the
    /// rate limit service and metrics run (no kernel program, no root needed).
    #[arg(long = "iface", value_name = "IF")]
    pub ifaces: Vec<String>,
    /// Policy file or directory (repeatable).
    #[arg(long = "policy", required = true, value_name = "FILE_OR_DIR")]
    pub policies: Vec<PathBuf>,
    /// native: driver mode only; generic: skb mode; auto: native, else generic.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub xdp_mode: AttachMode,
    /// How often to log a stats line (e.g. 500ms, 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub stats_interval: Duration,
    /// Capacity of the per-source bucket table.
    #[arg(long, default_value_t = limiter_common::DEFAULT_SOURCE_ENTRIES)]
    pub source_entries: u32,
    /// IPv6 sources are bucketed by this prefix length.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u8).range(1..=128))]
    pub ipv6_source_prefix: u8,
    /// Drop frames the parser cannot follow (default: pass them).
    #[arg(long)]
    pub drop_unparsed: bool,
    /// Log sampled debug records of kernel drops (the first per reason and CPU, then one in
    /// 1024).
    #[arg(long)]
    pub debug_log: bool,
    /// How often to look for policy changes (files, directories, ConfigMap volumes).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub watch_interval: Duration,
    /// Reload only on SIGHUP, never by watching the files.
    #[arg(long)]
    pub no_watch: bool,
    /// Local control socket `limiter-agent top` reads (created 0600, removed on exit).
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub control_socket: PathBuf,
    /// bpffs directory where the program, its XDP links and every map are pinned, so the
    /// shield outlives this process. An agent that starts adopts what it finds there; one
    /// agent per directory.
    #[arg(long, value_name = "DIR", default_value = pin::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// On SIGINT/SIGTERM, detach from every interface and remove the pins (by default the
    /// program stays attached and pinned; `limiter-agent detach` removes it).
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Tests only: perturbs the layout stamp, so this agent takes a pinned set of its own
    /// layout for an incompatible one (exercises the upgrade path).
    #[arg(long, hide = true, default_value_t = 0)]
    pub layout_salt: u64,
    #[command(flatten)]
    pub rls: RlsArgs,
}

/// The rate limit service, its backend, escalation and metrics.
#[derive(Debug, clap::Args)]
pub struct RlsArgs {
    /// Address of the Envoy rate limit service (gRPC `envoy.service.ratelimit.v3` and
    /// `grpc.health.v1`). Loopback by default: expose it beyond the node on purpose only.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8081")]
    pub rls_listen: SocketAddr,
    /// Do not serve the rate limit service (kernel rules only).
    #[arg(long)]
    pub no_rls: bool,
    /// Networks the rate limit service accepts calls from (repeatable; default: whoever can
    /// reach --rls-listen). A caller names the client address escalation blocks, so when the
    /// service listens beyond loopback, list the gateways here.
    #[arg(long = "rls-allow-callers", value_name = "CIDR")]
    pub rls_allow_callers: Vec<ipnet::IpNet>,
    /// PEM certificate chain the rate limit service presents: serve gRPC over TLS (needs
    /// --rls-tls-key). Envoy's rate limit cluster then needs a TLS transport socket.
    #[arg(long, value_name = "PATH", requires = "rls_tls_key")]
    pub rls_tls_cert: Option<PathBuf>,
    /// PEM private key of --rls-tls-cert.
    #[arg(long, value_name = "PATH", requires = "rls_tls_cert")]
    pub rls_tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): only callers presenting a client certificate signed by one of
    /// them can connect (mutual TLS; needs --rls-tls-cert). The way to trust gateways beyond
    /// loopback, since a caller names the client address escalation blocks.
    #[arg(long, value_name = "PATH", requires = "rls_tls_cert")]
    pub rls_tls_client_ca: Option<PathBuf>,
    /// Where the counts of `global` L7 rules and envoyproxy/ratelimit configs live: `local`
    /// (this process, per node) or `redis` (shared by every node, the reference service's
    /// keys). `local` L7 rules are always counted in this process. [env: BACKEND_TYPE=redis;
    /// default local]
    #[arg(long, value_enum)]
    pub rls_backend: Option<BackendKind>,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Answer for descriptors that need Redis while it is unreachable: failOpen (OK, no
    /// limit) or failClosed (OVER_LIMIT).
    #[arg(long, value_name = "MODE", default_value = "failOpen", value_parser = parse_failure_mode)]
    pub redis_failure_mode: FailureMode,
    /// Longest wait for one Redis round trip before the failure mode answers.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    pub redis_timeout: Duration,
    /// Keys the over-limit cache may hold (the reference's LOCAL_CACHE_SIZE_IN_BYTES): a key
    /// over its limit is then answered from memory for the rest of its window, without
    /// counting in Redis. 0 (default, as the reference): off, every hit is counted.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub redis_local_cache_keys: usize,
    /// With --iface and --rls-backend redis: this node's member id in the Redis node set that
    /// splits `global` kernel rules (default: hostname-pid). Unique per node.
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// The sync period of `global` kernel rules: how often this node renews its membership
    /// and publishes its demand (and gets its new shares); a member silent for three
    /// heartbeats is gone. Use the same value on every node.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub global_heartbeat: Duration,
    /// The part of each `global` kernel rule's limit held back as floors, split equally among
    /// the live nodes, so an idle node admits at once when traffic arrives (`5%`); the rest
    /// follows demand. Use the same value on every node.
    #[arg(long, value_name = "PERCENT", default_value = "5%", value_parser = parse_percent)]
    pub global_share_floor: f64,
    /// Most keyed L7 counters held in this process (per distinct header value, client...);
    /// beyond it the least recently used idle ones are evicted.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub l7_max_keys: usize,
    /// Most `ShouldRateLimit` calls decided at once; more get RESOURCE_EXHAUSTED at once.
    #[arg(long, value_name = "N", default_value_t = RlsConfig::default().max_in_flight)]
    pub rls_max_in_flight: usize,
    /// Escalation takes the client address from this descriptor entry (a `request_headers`
    /// action of the same name, e.g. x-forwarded-for) instead of `remote_address`.
    #[arg(long, value_name = "HEADER")]
    pub client_ip_header: Option<String>,
    /// With --client-ip-header: proxies that appended their own address after the client's.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "client_ip_header")]
    pub trusted_hops: u32,
    /// Prometheus metrics endpoint (`GET /metrics`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9091")]
    pub metrics_listen: SocketAddr,
    /// Do not serve metrics.
    #[arg(long)]
    pub no_metrics: bool,
}

/// `--rls-backend`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    #[default]
    Local,
    Redis,
}

fn parse_failure_mode(s: &str) -> Result<FailureMode, String> {
    s.parse()
}

/// Parses `500ms`, `10s`, `2m`, `1h`.
/// `5%` or `5` as the fraction 0.05; 0 to 100.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let n: f64 = t
        .strip_suffix('%')
        .unwrap_or(t)
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: expected a percentage such as 5%"))?;
    if !(0.0..=100.0).contains(&n) {
        return Err(format!("`{s}`: must be between 0% and 100%"));
    }
    Ok(n / 100.0)
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}`: expected a number followed by ms, s, m or h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    };
    if d.is_zero() {
        return Err(format!("`{s}`: must be more than zero"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn percentages_parse_with_or_without_the_sign() {
        assert_eq!(parse_percent("5%"), Ok(0.05));
        assert_eq!(parse_percent("50"), Ok(0.5));
        assert_eq!(parse_percent(" 0 % "), Ok(0.0));
        assert!(parse_percent("101%").is_err());
        assert!(parse_percent("-1%").is_err());
        assert!(parse_percent("five").is_err());
    }
}
