//! `limiter-agent run`: load the XDP program, apply the policy, attach; serve the Envoy rate
//! limit service and the metrics endpoint; reload on change; report; detach.
//!
//! Start-up order is chosen so that a failure leaves nothing behind: the policy is compiled
//! first, then the rate limit service and metrics bind their ports (the usual failure: a port
//! in use), and only then is XDP loaded and attached. Shutdown (SIGINT/SIGTERM) reverses it:
//! the servers stop accepting and finish calls in flight, then XDP is detached.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use limiter_common::{Counter, reason};
use log::{error, info, warn};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::{
    control::{self, Control, RlsSource, RlsStatus},
    dataplane::{AttachMode, Dataplane, LoadOptions, Stats},
    l7::{Engine, EngineConfig},
    metrics::{self, Metrics, PolicyLabels},
    plan::{KernelPlan, L7Plan},
    policy::{self, Compiled},
    rls::{
        self, Backend, RateLimiter, RlsConfig,
        escalation::{BlockOrder, ClientAddress, EscalationConfig, Escalator, Penalties},
        redis::{FailureMode, RedisBackend, RedisConfig},
    },
    sync::{self, Membership, MembershipConfig},
    watch::PolicyWatcher,
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
    /// Where the counts of `global` L7 rules and envoyproxy/ratelimit configs live: `local`
    /// (this process, per node) or `redis` (shared by every node, the reference service's
    /// keys). `local` L7 rules are always counted in this process.
    #[arg(long, value_enum, default_value_t = BackendKind::Local)]
    pub rls_backend: BackendKind,
    /// Redis for `--rls-backend redis`.
    #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Answer for descriptors that need Redis while it is unreachable: failOpen (OK, no
    /// limit) or failClosed (OVER_LIMIT).
    #[arg(long, value_name = "MODE", default_value = "failOpen", value_parser = parse_failure_mode)]
    pub redis_failure_mode: FailureMode,
    /// Prefix of every Redis key (the reference service's CACHE_KEY_PREFIX).
    #[arg(long, value_name = "PREFIX", default_value = "")]
    pub redis_key_prefix: String,
    /// Longest wait for one Redis round trip before the failure mode answers.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    pub redis_timeout: Duration,
    /// With --iface and --rls-backend redis: this node's member id in the Redis node set that
    /// splits `global` kernel rules (default: hostname-pid). Unique per node.
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// How often this node renews its membership; a member silent for three heartbeats is
    /// gone. Use the same value on every node.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub global_heartbeat: Duration,
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

/// Loads and compiles the policy set; logs every notice. Errors carry file/line/field.
pub fn load_compiled(paths: &[PathBuf]) -> anyhow::Result<Compiled> {
    let set = policy::load_paths(paths).map_err(|errors| anyhow::anyhow!("{errors}"))?;
    // Set-level errors (e.g. duplicate L7 rule names) reject the set like load errors.
    let compiled = policy::compile(&set).into_result().map_err(|errors| anyhow::anyhow!("{errors}"))?;
    for notice in &compiled.notices {
        warn!("{notice}");
    }
    Ok(compiled)
}

/// The kernel half of [`load_compiled`].
pub fn load_plan(paths: &[PathBuf]) -> anyhow::Result<KernelPlan> {
    load_compiled(paths).map(|c| c.plan)
}

/// What is in force, to tell a changed policy set from an unchanged one.
#[derive(Debug)]
struct InForce {
    /// The compiled kernel plan, before global rules are split into this node's share.
    plan: KernelPlan,
    /// Live nodes sharing the global kernel rules (1 without membership).
    nodes: u64,
    l7: L7Plan,
    penalties: Penalties,
}

/// The XDP half of a running agent.
struct Kernel {
    dp: Dataplane,
    last: Stats,
    last_at: Instant,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.ifaces.is_empty() && args.rls.no_rls {
        bail!("nothing to run: give --iface to shield interfaces, or drop --no-rls to serve the rate limit service");
    }
    let compiled = load_compiled(&args.policies).context("the policy has errors; nothing was started")?;
    let metrics = Arc::new(Metrics::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    // The rate limit service first: binding its ports is what usually fails, and nothing is
    // attached yet when it does.
    let engine = Arc::new(Engine::new(compiled.l7.clone(), EngineConfig { max_keys: args.rls.l7_max_keys }));
    metrics.watch_engine(Arc::clone(&engine));
    let backend = match args.rls.rls_backend {
        BackendKind::Local => Backend::Local,
        BackendKind::Redis => {
            let config = RedisConfig {
                failure_mode: args.rls.redis_failure_mode,
                key_prefix: args.rls.redis_key_prefix.clone(),
                response_timeout: args.rls.redis_timeout,
                ..RedisConfig::default()
            };
            let redis = RedisBackend::connect(&args.rls.redis_url, config).await.context("--redis-url")?;
            metrics.watch_redis(redis.clone());
            Backend::Redis(redis)
        }
    };
    // Escalation needs the kernel's block list: with no interface there is none.
    let (orders_tx, mut orders_rx) = mpsc::channel::<BlockOrder>(1024);
    let penalties = Penalties::of(&compiled);
    let escalation = if args.ifaces.is_empty() {
        if !penalties.policies.is_empty() {
            warn!("escalation is off: penalties need the XDP block list, and no --iface was given");
        }
        None
    } else {
        let client_address = match &args.rls.client_ip_header {
            Some(name) => ClientAddress::Header { name: name.clone(), trusted_hops: args.rls.trusted_hops },
            None => ClientAddress::RemoteAddress,
        };
        let config =
            EscalationConfig { client_address, ipv6_prefix: args.ipv6_source_prefix, ..EscalationConfig::default() };
        Some(Arc::new(Escalator::new(config, penalties.clone(), orders_tx)))
    };
    let limiter = Arc::new(
        RateLimiter::new(engine, backend.clone(), Arc::clone(&metrics), escalation, args.rls.rls_max_in_flight)
            .with_allowed_callers(args.rls.rls_allow_callers.clone()),
    );
    let mut servers: Vec<(&str, tokio::task::JoinHandle<anyhow::Result<()>>)> = Vec::new();
    let mut rls_addr = None;
    if !args.rls.no_rls {
        let config = RlsConfig {
            listen: args.rls.rls_listen,
            max_in_flight: args.rls.rls_max_in_flight,
            ..RlsConfig::default()
        };
        let running = rls::serve(&config, Arc::clone(&limiter), shutdown_rx.clone())
            .await
            .context("starting the rate limit service: pick another --rls-listen, or --no-rls")?;
        info!("rate limit service: {} L7 rules, backend {backend:?}, on {}", compiled.l7.rules.len(), running.addr);
        rls_addr = Some(running.addr);
        let task = running.task;
        servers.push(("rate limit service", tokio::spawn(async move { Ok(task.await??) })));
    }
    if !args.rls.no_metrics {
        let (_, task) = metrics::serve(args.rls.metrics_listen, Arc::clone(&metrics), shutdown_rx.clone())
            .await
            .context("starting the metrics endpoint: pick another --metrics-listen, or --no-metrics")?;
        servers.push(("metrics", tokio::spawn(async move { Ok(task.await?) })));
    }

    let rls_source = RlsSource {
        limiter: Arc::clone(&limiter),
        backend,
        metrics: Arc::clone(&metrics),
        serving: rls_addr,
        l7_max_keys: args.rls.l7_max_keys,
    };
    let mut control = open_control(&args)?;
    let (nodes, mut nodes_rx) = join_nodes(&args, &compiled.plan, &shutdown_rx, &mut servers).await?;
    let mut kernel = if args.ifaces.is_empty() {
        info!("no --iface: no XDP program; serving the rate limit service only");
        None
    } else {
        Some(start_kernel(&args, &sync::shared_plan(&compiled.plan, nodes), control.as_mut())?)
    };
    let mut in_force = InForce { plan: compiled.plan, nodes, l7: compiled.l7, penalties };

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut watcher = PolicyWatcher::new(&args.policies);
    let mut watch_tick = tokio::time::interval(args.watch_interval);
    watch_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reloads = ReloadCounts::default();
    let mut tick = tokio::time::interval(args.stats_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut control_tick = tokio::time::interval(Duration::from_secs(1));
    control_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rls = rls_source.read();
    loop {
        tokio::select! {
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sighup.recv() => {
                watcher.mark_applied();
                let outcome = reload(kernel.as_mut().map(|k| &mut k.dp), &limiter, &mut in_force, &args.policies, "SIGHUP");
                reloads.record(outcome, &metrics);
            }
            _ = watch_tick.tick(), if !args.no_watch => {
                if watcher.poll() {
                    let why = "policy files changed";
                    let outcome = reload(kernel.as_mut().map(|k| &mut k.dp), &limiter, &mut in_force, &args.policies, why);
                    reloads.record(outcome, &metrics);
                }
            }
            Some(n) = next_nodes(&mut nodes_rx) => {
                if let Some(k) = kernel.as_mut() {
                    reshare(&mut k.dp, &mut in_force, n);
                }
            }
            Some(order) = orders_rx.recv() => {
                if let Some(k) = kernel.as_mut() {
                    escalate(&mut k.dp, &order, &metrics);
                }
            }
            _ = control_tick.tick(), if control.is_some() => {
                if let Some(c) = control.as_mut() {
                    c.refresh(kernel.as_ref().map(|k| &k.dp), reloads.control(), rls_source.read());
                }
            }
            _ = tick.tick() => {
                // A share that failed to apply is retried here until it holds.
                if let (Some(k), Some(rx)) = (kernel.as_mut(), nodes_rx.as_ref()) {
                    let n = *rx.borrow();
                    reshare(&mut k.dp, &mut in_force, n);
                }
                if let Some(escalator) = limiter.escalation() {
                    escalator.sweep(Instant::now());
                }
                let rls_now = rls_source.read();
                if let Some(c) = control.as_mut() {
                    c.refresh(kernel.as_ref().map(|k| &k.dp), reloads.control(), rls_now.clone());
                }
                let kernel_line = kernel.as_mut().and_then(Kernel::stats_tick);
                let rls_part = rls_now.serving.then(|| rls_stats(&last_rls, &rls_now));
                match (kernel_line, rls_part) {
                    (Some(line), Some(rls)) => info!("{line}; {rls}"),
                    (Some(line), None) => info!("{line}"),
                    (None, Some(rls)) => info!("stats: {rls}"),
                    (None, None) => {}
                }
                last_rls = rls_now;
            }
        }
    }

    // Stop serving first (calls in flight finish), then detach.
    let _ = shutdown_tx.send(true);
    for (name, task) in servers {
        match tokio::time::timeout(SHUTDOWN_GRACE, task).await {
            Ok(Ok(Ok(()))) => info!("{name} stopped"),
            Ok(Ok(Err(e))) => warn!("{name} ended with an error: {e:#}"),
            Ok(Err(e)) => warn!("{name} task failed: {e}"),
            Err(_) => warn!("{name} did not stop within {SHUTDOWN_GRACE:?}; leaving it"),
        }
    }
    if let Some(k) = kernel {
        k.detach(&args.ifaces);
    }
    drop(control);
    Ok(())
}

/// Opens the control socket `top` reads. With `--iface` a failure stops the start (nothing is
/// attached yet); serving the rate limit service only, it is a warning: that mode needs no
/// root, and the default path (under /run) may not be writable, which must not keep the
/// service from Envoy.
fn open_control(args: &RunArgs) -> anyhow::Result<Option<Control>> {
    match Control::bind(&args.control_socket) {
        Ok(control) => Ok(Some(control)),
        Err(e) if args.ifaces.is_empty() => {
            warn!("no control socket, `limiter-agent top` will not reach this agent: {e} (pass --control-socket PATH)");
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e).context("opening the control socket; nothing was attached")),
    }
}

/// Joins the Redis node set when this agent shields interfaces and counts `global` rules in
/// Redis (see [`crate::sync`]): one heartbeat now, so the first plan applied is already this
/// node's share, then a task that renews it (pushed on `servers`, it leaves the set at
/// shutdown). Returns the node count and where its changes arrive.
async fn join_nodes(
    args: &RunArgs,
    plan: &KernelPlan,
    shutdown: &watch::Receiver<bool>,
    servers: &mut Vec<(&str, tokio::task::JoinHandle<anyhow::Result<()>>)>,
) -> anyhow::Result<(u64, Option<watch::Receiver<u64>>)> {
    let globals = sync::global_rules(plan);
    if args.ifaces.is_empty() {
        return Ok((1, None));
    }
    if args.rls.rls_backend != BackendKind::Redis {
        if globals > 0 {
            info!("sync: {globals} global kernel rule(s) count on this node only (no --rls-backend redis)");
        }
        return Ok((1, None));
    }
    let node_id = args.rls.node_id.clone().unwrap_or_else(sync::default_node_id);
    let config = MembershipConfig::new(node_id, &args.rls.redis_key_prefix, args.rls.global_heartbeat);
    let mut membership = Membership::new(&args.rls.redis_url, config).context("--redis-url")?;
    let (key, id) = (membership.config().key.clone(), membership.config().node_id.clone());
    let nodes = match membership.beat_logged().await {
        Some(n) => {
            info!(
                "sync: joined {key} as {id}: {} live; {globals} global kernel rule(s) shared across {}",
                sync::nodes_text(n),
                sync::nodes_text(n)
            );
            n
        }
        None => {
            warn!(
                "sync: no node count yet (redis unreachable): {globals} global kernel rule(s) get the full limit on this node until the first heartbeat answers"
            );
            1
        }
    };
    let (tx, rx) = watch::channel(nodes);
    let shutdown = shutdown.clone();
    servers.push((
        "node membership",
        tokio::spawn(async move {
            membership.run(tx, shutdown).await;
            Ok(())
        }),
    ));
    Ok((nodes, Some(rx)))
}

/// The next node count, when it changes; never resolves without membership.
async fn next_nodes(rx: &mut Option<watch::Receiver<u64>>) -> Option<u64> {
    if let Some(rx) = rx
        && rx.changed().await.is_ok()
    {
        return Some(*rx.borrow_and_update());
    }
    // Without membership, or once its task has ended: nothing more to wait for.
    std::future::pending().await
}

/// Re-applies the kernel plan with the shares of `nodes` live nodes. Changed rules start with
/// a full bucket: each membership change hands out one fresh burst.
fn reshare(dp: &mut Dataplane, in_force: &mut InForce, nodes: u64) {
    if nodes == in_force.nodes {
        return;
    }
    let was = in_force.nodes;
    let globals = sync::global_rules(&in_force.plan);
    let plan = sync::shared_plan(&in_force.plan, nodes);
    if dp.current_plan() == Some(&plan) {
        in_force.nodes = nodes;
        return;
    }
    match dp.apply(&plan) {
        Ok(_) => {
            in_force.nodes = nodes;
            info!(
                "sync: {} live (was {was}): {globals} global kernel rule(s) re-applied, shared across {}",
                sync::nodes_text(nodes),
                sync::nodes_text(nodes)
            );
        }
        Err(e) => error!(
            "sync: {} live (was {was}), but re-applying the shares failed, the previous ones stay (retried at each stats tick): {e:#}",
            sync::nodes_text(nodes)
        ),
    }
}

/// How long the servers get to finish the calls in flight at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Loads the XDP program, applies the kernel plan and attaches to every interface.
fn start_kernel(args: &RunArgs, plan: &KernelPlan, mut control: Option<&mut Control>) -> anyhow::Result<Kernel> {
    let options = LoadOptions {
        source_entries: args.source_entries,
        ipv6_source_prefix: args.ipv6_source_prefix,
        drop_unparsed: args.drop_unparsed,
        debug_log: args.debug_log,
    };
    let mut dp = Dataplane::load(options).context("loading the XDP program")?;
    let applied = dp.apply(plan).context("applying the policy to the kernel maps")?;
    info!(
        "policy applied: {} kernel rules ({} slots, {} port lists), {} allow and {} deny entries",
        applied.rules, applied.rule_slots, applied.port_lists, applied.allow, applied.deny
    );
    for iface in &args.ifaces {
        let mode = dp.attach(iface, args.xdp_mode).with_context(|| {
            format!("attaching to {iface}: check the name with `ip link`, or try --xdp-mode generic")
        })?;
        info!("attached to {iface} in {mode} mode");
        if let Some(control) = control.as_deref_mut() {
            control.attached(iface, mode);
        }
    }
    let last = dp.stats().context("reading counters")?;
    Ok(Kernel { dp, last, last_at: Instant::now() })
}

impl Kernel {
    /// Housekeeping of a stats tick; returns the kernel's stats line.
    fn stats_tick(&mut self) -> Option<String> {
        self.dp.flush_log();
        if let Err(e) = self.dp.expire_blocks() {
            warn!("expiring block-list entries: {e}");
        }
        match self.dp.stats() {
            Ok(now) => {
                let line = stats_line(&self.last, &now, self.last_at.elapsed());
                self.last = now;
                self.last_at = Instant::now();
                Some(line)
            }
            Err(e) => {
                warn!("reading counters: {e}");
                None
            }
        }
    }

    fn detach(self, ifaces: &[String]) {
        let Kernel { dp, .. } = self;
        dp.log_summary();
        let stats = dp.stats().ok();
        drop(dp);
        info!("detached from {}", ifaces.join(", "));
        if let Some(stats) = stats {
            for (name, c) in &stats.rules {
                info!(
                    "rule {name}: passed {} dropped {} shadow-dropped {} packets",
                    c.passed.packets, c.dropped.packets, c.shadow_dropped.packets
                );
            }
        }
    }
}

/// Puts an escalated source in the XDP block list.
fn escalate(dp: &mut Dataplane, order: &BlockOrder, metrics: &Metrics) {
    match dp.block(order.addr, order.duration) {
        Ok(()) => {
            warn!(
                "escalation: {} blocked in XDP for {:?}: {} denials within {:?} (policy {})",
                order.addr, order.duration, order.denials, order.within, order.policy
            );
            metrics.escalations.inc(&PolicyLabels { policy: order.policy.clone() });
        }
        Err(e) => error!("escalation: blocking {} (policy {}) failed: {e:#}", order.addr, order.policy),
    }
}

/// Reloads that succeeded and that were rejected since start (logged with each reload).
#[derive(Debug, Default)]
struct ReloadCounts {
    applied: u64,
    rejected: u64,
    last_rejected: bool,
}

impl ReloadCounts {
    fn record(&mut self, outcome: Option<bool>, metrics: &Metrics) {
        if let Some(applied) = outcome {
            metrics.reload(applied);
        }
        match outcome {
            Some(true) => {
                self.applied += 1;
                self.last_rejected = false;
            }
            Some(false) => {
                self.rejected += 1;
                self.last_rejected = true;
                warn!("policy reloads rejected since start: {}", self.rejected);
            }
            None => {}
        }
    }
}

impl ReloadCounts {
    fn control(&self) -> control::Reloads {
        control::Reloads { applied: self.applied, rejected: self.rejected, last_ok: !self.last_rejected }
    }
}

/// Re-reads the policy; a policy with any error is rejected whole and the running one stays.
/// The kernel plan is applied first (one atomic switch in the kernel); only if that succeeds
/// are the L7 rules replaced (one atomic swap in the engine), so a rejected set changes
/// neither. `Some(true)`: applied; `Some(false)`: rejected; `None`: nothing changed.
fn reload(
    dp: Option<&mut Dataplane>,
    limiter: &RateLimiter,
    in_force: &mut InForce,
    paths: &[PathBuf],
    why: &str,
) -> Option<bool> {
    let compiled = match load_compiled(paths) {
        Ok(c) => c,
        Err(e) => {
            error!("{why}: reload rejected, the previous policy stays in force:\n{e:#}");
            return Some(false);
        }
    };
    let penalties = Penalties::of(&compiled);
    let kernel_plan = sync::shared_plan(&compiled.plan, in_force.nodes);
    let kernel_changed = dp.as_ref().is_some_and(|dp| dp.current_plan() != Some(&kernel_plan));
    let l7_changed = in_force.l7 != compiled.l7 || in_force.penalties != penalties;
    if !kernel_changed && !l7_changed {
        info!("{why}: policy unchanged");
        return None;
    }
    let mut kernel_note = String::new();
    if let Some(dp) = dp.filter(|_| kernel_changed) {
        match dp.apply(&kernel_plan) {
            Ok(a) => {
                kernel_note = format!("{} kernel rules, {} kept their bucket state", a.rules, a.kept);
                let globals = sync::global_rules(&compiled.plan);
                if in_force.nodes > 1 && globals > 0 {
                    kernel_note.push_str(&format!(
                        ", {globals} global rule(s) shared across {}",
                        sync::nodes_text(in_force.nodes)
                    ));
                }
            }
            Err(e) => {
                error!("{why}: reload rejected, the previous policy stays in force: {e:#}");
                return Some(false);
            }
        }
    }
    in_force.plan = compiled.plan;
    if l7_changed {
        let rules = compiled.l7.rules.len();
        limiter.replace(compiled.l7.clone(), penalties.clone());
        in_force.l7 = compiled.l7;
        in_force.penalties = penalties;
        if !kernel_note.is_empty() {
            kernel_note.push_str("; ");
        }
        kernel_note.push_str(&format!("{rules} L7 rules (unchanged ones keep their counters)"));
    }
    info!("{why}: policy reloaded: {kernel_note}");
    Some(true)
}

fn delta(a: Counter, b: Counter) -> Counter {
    Counter { packets: b.packets.saturating_sub(a.packets), bytes: b.bytes.saturating_sub(a.bytes) }
}

/// One line per interval: rates passed and dropped, then drops by reason and by rule.
pub fn stats_line(before: &Stats, now: &Stats, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let passed = delta(before.passed(), now.passed());
    let dropped = delta(before.dropped(), now.dropped());
    let mut line = format!(
        "stats: passed {} pkts ({:.0}/s), dropped {} pkts ({:.0}/s)",
        passed.packets,
        passed.packets as f64 / secs,
        dropped.packets,
        dropped.packets as f64 / secs
    );
    let reasons: Vec<String> = (reason::DROP_UNPARSED..reason::VERDICT_REASONS)
        .filter_map(|r| {
            let d = delta(before.reason(r), now.reason(r)).packets;
            (d > 0).then(|| format!("{}={d}", reason::name(r)))
        })
        .collect();
    if !reasons.is_empty() {
        line.push_str(&format!(" [by reason: {}]", reasons.join(" ")));
    }
    let rules: Vec<String> = now
        .rules
        .iter()
        .filter_map(|(name, c)| {
            let prev = before.rules.get(name).copied().unwrap_or_default();
            let d = delta(prev.dropped, c.dropped).packets;
            let s = delta(prev.shadow_dropped, c.shadow_dropped).packets;
            match (d, s) {
                (0, 0) => None,
                (d, 0) => Some(format!("{name}={d}")),
                (d, s) => Some(format!("{name}={d}(+{s} shadow)")),
            }
        })
        .collect();
    if !rules.is_empty() {
        line.push_str(&format!(" [by rule: {}]", rules.join(" ")));
    }
    line
}

/// The rate limit service's part of the stats line: descriptors answered OK and over the
/// limit, calls refused and sources escalated since `before`.
pub fn rls_stats(before: &RlsStatus, now: &RlsStatus) -> String {
    let d = |f: fn(&RlsStatus) -> u64| f(now).saturating_sub(f(before));
    let mut part = format!(
        "rls: ok {}, over_limit {}, errors {}, escalations {}",
        d(RlsStatus::ok),
        d(RlsStatus::over_limit),
        d(RlsStatus::request_errors_total),
        d(RlsStatus::escalations_total)
    );
    let shadow = d(RlsStatus::shadow_over_limit_total);
    if shadow > 0 {
        part.push_str(&format!(", shadow {shadow}"));
    }
    if let Some(redis) = now.redis.as_ref().filter(|r| !r.connected) {
        part.push_str(&format!(" [redis unreachable: answering {}]", redis.failure_mode));
    }
    part
}

/// Refuses to start without root, with a hint, rather than failing deep in a syscall.
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("limiter-agent run needs root (CAP_BPF and CAP_NET_ADMIN): rerun with sudo");
    }
    Ok(())
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
    fn stats_line_reports_deltas_by_reason_and_rule() {
        let mut a = Stats { reasons: vec![Counter::default(); reason::COUNT as usize], ..Default::default() };
        let mut b = a.clone();
        b.reasons[reason::PASS_CONFORMING as usize] = Counter { packets: 10, bytes: 1000 };
        b.reasons[reason::DROP_SHARED_BUCKET as usize] = Counter { packets: 4, bytes: 400 };
        a.rules.insert("p/r".into(), Default::default());
        let mut rc = limiter_common::RuleCounter::default();
        rc.dropped.packets = 4;
        b.rules.insert("p/r".into(), rc);
        let line = stats_line(&a, &b, Duration::from_secs(2));
        assert_eq!(
            line,
            "stats: passed 10 pkts (5/s), dropped 4 pkts (2/s) [by reason: shared_bucket=4] [by rule: p/r=4]"
        );
    }

    #[test]
    fn rls_stats_part_reports_deltas_and_an_unreachable_redis() {
        use crate::control::{DecisionCount, EscalationCount, RedisStatus, RequestErrorCount, ShadowCount};
        let decision =
            |code: &str, n| DecisionCount { domain: "d".into(), rule: "d/r".into(), code: code.into(), descriptors: n };
        let before = RlsStatus { decisions: vec![decision("OK", 10), decision("OVER_LIMIT", 1)], ..Default::default() };
        let now = RlsStatus {
            decisions: vec![decision("OK", 15), decision("OVER_LIMIT", 4)],
            request_errors: vec![RequestErrorCount { reason: "overloaded".into(), requests: 2 }],
            escalations: vec![EscalationCount { policy: "p".into(), sources: 1 }],
            ..Default::default()
        };
        assert_eq!(rls_stats(&before, &now), "rls: ok 5, over_limit 3, errors 2, escalations 1");
        let shadowed = RlsStatus {
            shadow_over_limit: vec![ShadowCount { domain: "d".into(), rule: "d/s".into(), descriptors: 7 }],
            redis: Some(RedisStatus { connected: false, failure_mode: "failOpen".into(), ..Default::default() }),
            ..now.clone()
        };
        assert_eq!(
            rls_stats(&now, &shadowed),
            "rls: ok 0, over_limit 0, errors 0, escalations 0, shadow 7 [redis unreachable: answering failOpen]"
        );
    }
}
