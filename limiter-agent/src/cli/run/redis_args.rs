//! Where the Redis backend is: the `--redis-*` flags and envoyproxy/ratelimit's environment
//! (`BACKEND_TYPE`, `REDIS_*`, `REDIS_PERSECOND_*`, `CACHE_KEY_PREFIX`), so the reference's
//! Deployment (Envoy Gateway's managed rate limit service among them) can run this agent with
//! its environment unchanged. A flag given on the command line wins over its variable. What was
//! used is logged with secrets redacted, and every reference variable that is set but not
//! honoured is logged by name with the reason.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use log::{info, warn};

use super::BackendKind;
use crate::rls::redis::target::{Auth, RedisTarget, SocketType, TlsFiles, Topology};

/// The default Redis when neither `--redis-url` nor `REDIS_URL` names one.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// `--redis-*`: where Redis is and how to reach it.
#[derive(Debug, Default, clap::Args)]
pub struct RedisArgs {
    /// Redis for `--rls-backend redis`: comma-separated nodes as the reference's REDIS_URL
    /// (`host:port`, `redis://`, `rediss://`; for sentinel the master's name first:
    /// `mymaster,host1:26379,host2:26379`) [env: REDIS_URL; default redis://127.0.0.1:6379].
    #[arg(long, value_name = "URLS")]
    pub redis_url: Option<String>,
    /// single, sentinel or cluster [env: REDIS_TYPE; default single].
    #[arg(long, value_name = "TYPE", value_parser = parse_topology)]
    pub redis_type: Option<Topology>,
    /// File holding the Redis password, or `user:password` (Redis 6 ACL) [env: REDIS_AUTH,
    /// the value itself]. Keeps the secret out of URLs and process listings.
    #[arg(long, value_name = "PATH")]
    pub redis_auth_file: Option<PathBuf>,
    /// TLS to Redis (also implied by `rediss://` and by --redis-tls-cacert) [env: REDIS_TLS].
    #[arg(long)]
    pub redis_tls: bool,
    /// PEM CA that signed the Redis servers' certificates (default: the system roots) [env:
    /// REDIS_TLS_CACERT].
    #[arg(long, value_name = "PATH")]
    pub redis_tls_cacert: Option<PathBuf>,
    /// PEM client certificate for Redis servers that require one [env: REDIS_TLS_CLIENT_CERT].
    #[arg(long, value_name = "PATH", requires = "redis_tls_client_key")]
    pub redis_tls_client_cert: Option<PathBuf>,
    /// PEM key of --redis-tls-client-cert [env: REDIS_TLS_CLIENT_KEY].
    #[arg(long, value_name = "PATH", requires = "redis_tls_client_cert")]
    pub redis_tls_client_key: Option<PathBuf>,
    /// A second Redis for limits whose unit is a second, as the reference's REDIS_PERSECOND
    /// (same forms as --redis-url) [env: REDIS_PERSECOND=true with REDIS_PERSECOND_URL].
    #[arg(long, value_name = "URLS")]
    pub redis_persecond_url: Option<String>,
    /// Type of --redis-persecond-url [env: REDIS_PERSECOND_TYPE; default single].
    #[arg(long, value_name = "TYPE", value_parser = parse_topology)]
    pub redis_persecond_type: Option<Topology>,
    /// Password file of --redis-persecond-url [env: REDIS_PERSECOND_AUTH].
    #[arg(long, value_name = "PATH")]
    pub redis_persecond_auth_file: Option<PathBuf>,
    /// Prefix of every Redis key [env: CACHE_KEY_PREFIX; default empty].
    #[arg(long, value_name = "PREFIX")]
    pub redis_key_prefix: Option<String>,
}

fn parse_topology(s: &str) -> Result<Topology, String> {
    s.parse()
}

/// The Redis settings in force, after flags and environment.
#[derive(Debug)]
pub struct RedisSettings {
    pub backend: BackendKind,
    pub target: RedisTarget,
    pub per_second: Option<RedisTarget>,
    pub key_prefix: String,
}

/// Reference variables read here, besides the `REDIS_PERSECOND_*` twins.
const HONOURED: &[&str] = &[
    "BACKEND_TYPE",
    "CACHE_KEY_PREFIX",
    "REDIS_SOCKET_TYPE",
    "REDIS_TYPE",
    "REDIS_URL",
    "REDIS_AUTH",
    "REDIS_SENTINEL_AUTH",
    "REDIS_TLS",
    "REDIS_TLS_CACERT",
    "REDIS_TLS_CLIENT_CERT",
    "REDIS_TLS_CLIENT_KEY",
    "REDIS_POOL_SIZE",
    "REDIS_PERSECOND",
    "REDIS_PERSECOND_SOCKET_TYPE",
    "REDIS_PERSECOND_TYPE",
    "REDIS_PERSECOND_URL",
    "REDIS_PERSECOND_AUTH",
    "REDIS_PERSECOND_SENTINEL_AUTH",
    "REDIS_PERSECOND_TLS",
    "REDIS_PERSECOND_POOL_SIZE",
];

/// Reference variables of the Redis backend this agent does not honour, and why.
const NOT_HONOURED: &[(&str, &str)] = &[
    ("REDIS_TIMEOUT", "use --redis-timeout (its default suits Envoy's 20 ms call timeout)"),
    ("REDIS_TLS_SKIP_HOSTNAME_VERIFICATION", "server certificates are always verified; give their CA instead"),
    ("REDIS_PIPELINE_WINDOW", "each call is sent at once, pipelined on one multiplexed connection"),
    ("REDIS_PIPELINE_LIMIT", "each call is sent at once, pipelined on one multiplexed connection"),
    ("REDIS_PERSECOND_PIPELINE_WINDOW", "each call is sent at once, pipelined on one multiplexed connection"),
    ("REDIS_PERSECOND_PIPELINE_LIMIT", "each call is sent at once, pipelined on one multiplexed connection"),
    ("REDIS_POOL_ON_EMPTY_BEHAVIOR", "there is no pool to run empty: one multiplexed connection per Redis"),
    ("REDIS_POOL_ON_EMPTY_WAIT_DURATION", "there is no pool to run empty: one multiplexed connection per Redis"),
    (
        "REDIS_HEALTH_CHECK_ACTIVE_CONNECTION",
        "the health service stays SERVING; Redis failures follow --redis-failure-mode",
    ),
    ("EXPIRATION_JITTER_MAX_SECONDS", "keys expire exactly one unit after their last hit"),
    ("MEMCACHE_HOST_PORT", "only the redis backend exists here"),
    ("MEMCACHE_SRV", "only the redis backend exists here"),
];

/// Resolves the backend and Redis settings from `args` and the environment `env`, logging what
/// was used and what was not.
pub fn resolve(
    flag_backend: Option<BackendKind>,
    args: &RedisArgs,
    env: &dyn Fn(&str) -> Option<String>,
    all_env: &[String],
) -> anyhow::Result<RedisSettings> {
    let mut used: Vec<String> = Vec::new();
    let backend = match (flag_backend, env("BACKEND_TYPE")) {
        (Some(kind), Some(v)) => {
            used.push(format!("--rls-backend over BACKEND_TYPE={v}"));
            kind
        }
        (Some(kind), None) => kind,
        (None, Some(v)) => match v.to_ascii_lowercase().as_str() {
            "redis" => {
                used.push("BACKEND_TYPE=redis".into());
                BackendKind::Redis
            }
            other => bail!("BACKEND_TYPE={other}: only redis is supported (or leave it unset and use --rls-backend)"),
        },
        (None, None) => BackendKind::Local,
    };
    let redis_vars: Vec<&String> =
        all_env.iter().filter(|n| n.starts_with("REDIS_") || n.as_str() == "CACHE_KEY_PREFIX").collect();
    if backend != BackendKind::Redis {
        if !redis_vars.is_empty() {
            let names: Vec<&str> = redis_vars.iter().map(|s| s.as_str()).collect();
            warn!(
                "redis: not used (backend local, no --rls-backend redis or BACKEND_TYPE=redis); ignoring {}",
                names.join(", ")
            );
        }
        let target = RedisTarget::parse(Topology::Single, SocketType::Tcp, DEFAULT_URL)?;
        return Ok(RedisSettings { backend, target, per_second: None, key_prefix: String::new() });
    }

    let key_prefix = pick(&args.redis_key_prefix, "--redis-key-prefix", "CACHE_KEY_PREFIX", env, &mut used, false)
        .unwrap_or_default();
    let target = target_of(
        &Side {
            url: &args.redis_url,
            url_flag: "--redis-url",
            topology: args.redis_type,
            auth_file: args.redis_auth_file.as_deref(),
            tls: args.redis_tls,
            tls_files: TlsFiles {
                ca: args.redis_tls_cacert.clone(),
                client_cert: args.redis_tls_client_cert.clone(),
                client_key: args.redis_tls_client_key.clone(),
            },
            env_prefix: "REDIS_",
        },
        env,
        &mut used,
    )?
    .context("no Redis")?;
    let per_second_on = args.redis_persecond_url.is_some()
        || match env("REDIS_PERSECOND") {
            Some(v) => {
                let on = parse_bool("REDIS_PERSECOND", &v)?;
                used.push(format!("REDIS_PERSECOND={v}"));
                on
            }
            None => false,
        };
    let per_second = if per_second_on {
        let side = Side {
            url: &args.redis_persecond_url,
            url_flag: "--redis-persecond-url",
            topology: args.redis_persecond_type,
            auth_file: args.redis_persecond_auth_file.as_deref(),
            tls: false,
            // The reference shares the TLS files between both Redis.
            tls_files: target.tls.clone().unwrap_or_default(),
            env_prefix: "REDIS_PERSECOND_",
        };
        Some(target_of(&side, env, &mut used)?.context("REDIS_PERSECOND is on but REDIS_PERSECOND_URL is not set")?)
    } else {
        None
    };

    for name in &redis_vars {
        if let Some((_, why)) = NOT_HONOURED.iter().find(|(n, _)| n == name) {
            warn!("redis: {name} is set but not honoured: {why}");
        } else if !HONOURED.contains(&name.as_str()) {
            warn!("redis: {name} is set but not honoured: not a setting this agent knows");
        }
    }
    for (name, why) in NOT_HONOURED.iter().filter(|(n, _)| !n.starts_with("REDIS_")) {
        if all_env.iter().any(|n| n == name) {
            warn!("redis: {name} is set but not honoured: {why}");
        }
    }
    info!(
        "redis: backend {}{}; key prefix {key_prefix:?}; from {}",
        target,
        per_second.as_ref().map(|t| format!(", per-second limits on {t}")).unwrap_or_default(),
        if used.is_empty() { "defaults and flags".to_owned() } else { used.join(", ") }
    );
    Ok(RedisSettings { backend, target, per_second, key_prefix })
}

/// The settings of one Redis (main or per-second).
struct Side<'a> {
    url: &'a Option<String>,
    url_flag: &'static str,
    topology: Option<Topology>,
    auth_file: Option<&'a Path>,
    tls: bool,
    tls_files: TlsFiles,
    /// `REDIS_` or `REDIS_PERSECOND_`.
    env_prefix: &'static str,
}

fn target_of(
    side: &Side<'_>,
    env: &dyn Fn(&str) -> Option<String>,
    used: &mut Vec<String>,
) -> anyhow::Result<Option<RedisTarget>> {
    let var = |suffix: &str| format!("{}{suffix}", side.env_prefix);
    let main = side.env_prefix == "REDIS_";
    let Some(url) =
        pick(side.url, side.url_flag, &var("URL"), env, used, true).or_else(|| main.then(|| DEFAULT_URL.into()))
    else {
        return Ok(None);
    };
    let topology = match (side.topology, env(&var("TYPE"))) {
        (Some(t), _) => t,
        (None, Some(v)) => {
            used.push(format!("{}={v}", var("TYPE")));
            v.parse().map_err(anyhow::Error::msg).with_context(|| var("TYPE"))?
        }
        (None, None) => Topology::Single,
    };
    let socket = match env(&var("SOCKET_TYPE")) {
        Some(v) => {
            used.push(format!("{}={v}", var("SOCKET_TYPE")));
            v.parse().map_err(anyhow::Error::msg).with_context(|| var("SOCKET_TYPE"))?
        }
        None => SocketType::Tcp,
    };
    let mut target =
        RedisTarget::parse(topology, socket, &url).with_context(|| format!("{} / {}", side.url_flag, var("URL")))?;
    let auth = match (side.auth_file, env(&var("AUTH"))) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the Redis password file {}", path.display()))?;
            used.push(format!("password from {}", path.display()));
            Some(Auth::parse(&text))
        }
        (None, Some(v)) if !v.is_empty() => {
            used.push(format!("{}=<redacted>", var("AUTH")));
            Some(Auth::parse(&v))
        }
        _ => None,
    };
    if auth.is_some() {
        target.auth = auth;
    }
    if let Some(v) = env(&var("SENTINEL_AUTH")).filter(|v| !v.is_empty()) {
        used.push(format!("{}=<redacted>", var("SENTINEL_AUTH")));
        target.sentinel_auth = Some(Auth::parse(&v));
    }
    let env_tls = match env(&var("TLS")) {
        Some(v) => {
            used.push(format!("{}={v}", var("TLS")));
            parse_bool(&var("TLS"), &v)?
        }
        None => false,
    };
    let mut files = side.tls_files.clone();
    if main {
        for (slot, name) in [
            (&mut files.ca, "REDIS_TLS_CACERT"),
            (&mut files.client_cert, "REDIS_TLS_CLIENT_CERT"),
            (&mut files.client_key, "REDIS_TLS_CLIENT_KEY"),
        ] {
            if slot.is_none()
                && let Some(v) = env(name).filter(|v| !v.is_empty())
            {
                used.push(format!("{name}={v}"));
                *slot = Some(PathBuf::from(v));
            }
        }
    }
    if files.client_cert.is_some() != files.client_key.is_some() {
        bail!(
            "a Redis TLS client certificate needs its key and the key its certificate (REDIS_TLS_CLIENT_CERT, REDIS_TLS_CLIENT_KEY)"
        );
    }
    let tls_on = side.tls || env_tls || target.tls.is_some() || (main && files.ca.is_some());
    if tls_on {
        target.tls = Some(files);
    }
    for name in [var("POOL_SIZE")] {
        if let Some(v) = env(&name) {
            v.parse::<u32>().with_context(|| format!("{name}={v}: expected a number"))?;
            used.push(format!("{name}={v} (one multiplexed connection serves every call; no pool needed)"));
        }
    }
    Ok(Some(target))
}

/// The flag's value if given (noting a variable it overrides), else the variable's.
fn pick(
    flag: &Option<String>,
    flag_name: &str,
    var: &str,
    env: &dyn Fn(&str) -> Option<String>,
    used: &mut Vec<String>,
    redact: bool,
) -> Option<String> {
    let shown = |v: &str| if redact { crate::rls::redis::target::redact_url(v) } else { v.to_owned() };
    match (flag, env(var)) {
        (Some(f), Some(_)) => {
            used.push(format!("{flag_name} over {var}"));
            Some(f.clone())
        }
        (Some(f), None) => Some(f.clone()),
        (None, Some(v)) => {
            used.push(format!("{var}={}", shown(&v)));
            Some(v)
        }
        (None, None) => None,
    }
}

/// Go's `strconv.ParseBool`, which the reference's settings use.
fn parse_bool(name: &str, v: &str) -> anyhow::Result<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => bail!("{name}={v}: expected true or false"),
    }
}

/// The process environment's variable names.
pub fn env_names() -> Vec<String> {
    std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve_with(
        flag: Option<BackendKind>,
        args: &RedisArgs,
        vars: &[(&str, &str)],
    ) -> anyhow::Result<RedisSettings> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let names: Vec<String> = map.keys().cloned().collect();
        resolve(flag, args, &|k| map.get(k).cloned(), &names)
    }

    #[test]
    fn the_reference_environment_selects_a_cluster_with_auth_and_tls() {
        let s = resolve_with(
            None,
            &RedisArgs::default(),
            &[
                ("BACKEND_TYPE", "redis"),
                ("REDIS_SOCKET_TYPE", "tcp"),
                ("REDIS_TYPE", "cluster"),
                ("REDIS_URL", "10.0.0.1:7000,10.0.0.2:7000"),
                ("REDIS_AUTH", "user:pw"),
                ("REDIS_TLS", "true"),
                ("REDIS_TLS_CACERT", "/ca.pem"),
                ("REDIS_POOL_SIZE", "10"),
                ("CACHE_KEY_PREFIX", "rl_"),
                ("REDIS_PIPELINE_WINDOW", "150us"),
            ],
        )
        .expect("resolves");
        assert_eq!(s.backend, BackendKind::Redis);
        assert_eq!(s.target.topology, Topology::Cluster);
        assert_eq!(s.target.nodes.len(), 2);
        assert_eq!(s.target.auth, Some(Auth { username: Some("user".into()), password: "pw".into() }));
        assert_eq!(s.target.tls.as_ref().and_then(|t| t.ca.clone()), Some(PathBuf::from("/ca.pem")));
        assert_eq!(s.key_prefix, "rl_");
        assert!(s.per_second.is_none());
    }

    #[test]
    fn flags_win_over_the_environment() {
        let args = RedisArgs {
            redis_url: Some("127.0.0.1:6400".into()),
            redis_type: Some(Topology::Single),
            redis_key_prefix: Some("flag_".into()),
            ..RedisArgs::default()
        };
        let s = resolve_with(
            Some(BackendKind::Redis),
            &args,
            &[
                ("BACKEND_TYPE", "memcache"),
                ("REDIS_URL", "x:1,y:2"),
                ("REDIS_TYPE", "cluster"),
                ("CACHE_KEY_PREFIX", "env_"),
            ],
        )
        .expect("resolves");
        assert_eq!(s.target.topology, Topology::Single);
        assert_eq!(s.target.nodes, vec![redis::ConnectionAddr::Tcp("127.0.0.1".into(), 6400)]);
        assert_eq!(s.key_prefix, "flag_");
    }

    #[test]
    fn per_second_redis_and_errors() {
        let s = resolve_with(
            None,
            &RedisArgs::default(),
            &[
                ("BACKEND_TYPE", "redis"),
                ("REDIS_URL", "a:1"),
                ("REDIS_PERSECOND", "true"),
                ("REDIS_PERSECOND_TYPE", "sentinel"),
                ("REDIS_PERSECOND_URL", "m,s:26379"),
                ("REDIS_PERSECOND_AUTH", "pw2"),
            ],
        )
        .expect("resolves");
        let ps = s.per_second.expect("per-second redis");
        assert_eq!(ps.topology, Topology::Sentinel);
        assert_eq!(ps.master_name.as_deref(), Some("m"));
        assert_eq!(ps.auth, Some(Auth { username: None, password: "pw2".into() }));
        let bad = |vars: &[(&str, &str)]| resolve_with(None, &RedisArgs::default(), vars).is_err();
        assert!(bad(&[("BACKEND_TYPE", "memcache")]));
        assert!(bad(&[("BACKEND_TYPE", "redis"), ("REDIS_TYPE", "ring")]));
        assert!(bad(&[("BACKEND_TYPE", "redis"), ("REDIS_TLS", "yes")]));
        assert!(bad(&[("BACKEND_TYPE", "redis"), ("REDIS_PERSECOND", "true")]));
        assert!(bad(&[("BACKEND_TYPE", "redis"), ("REDIS_POOL_SIZE", "many")]));
        assert!(bad(&[("BACKEND_TYPE", "redis"), ("REDIS_TLS_CLIENT_CERT", "/c.pem")]));
        let local = resolve_with(None, &RedisArgs::default(), &[("REDIS_URL", "a:1")]).expect("resolves");
        assert_eq!(local.backend, BackendKind::Local);
    }
}
