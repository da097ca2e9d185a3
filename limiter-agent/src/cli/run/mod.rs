//! `limiter-agent run`: load the XDP program, apply the policy, attach; serve the Envoy rate
//! limit service and the metrics endpoint; reload on change; report; detach.
//!
//! Start-up order is chosen so that a failure leaves nothing behind: the policy is compiled
//! first, then the rate limit service and metrics bind their ports (the usual failure: a port
//! in use), and only then is XDP loaded and attached. Shutdown (SIGINT/SIGTERM) reverses it:
//! the servers stop accepting and finish calls in flight; the XDP program stays attached and
//! pinned (`--pin-dir`) for the next agent to adopt, unless `--detach-on-exit`.
//!
//! - `args`: the command line (`RunArgs`, `RlsArgs`).
//! - `reload`: loading the policy set and reloading it while running.
//! - `kernel`: the XDP half: load or adopt, attach, stats tick, escalation, leave or detach.
//! - `nodes`: the Redis node set and this node's demand-following shares of `global` kernel rules.
//! - `stats`: the stats line logged at each `--stats-interval`.

mod args;
mod kernel;
mod nodes;
mod redis_args;
mod reload;
mod stats;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use log::{info, warn};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

pub use self::{
    args::{BackendKind, RlsArgs, RunArgs, parse_duration},
    kernel::require_root,
    reload::{load_compiled, load_plan},
    stats::{rls_stats, stats_line},
};
use self::{
    kernel::{Kernel, escalate, start_kernel},
    nodes::{hold, join_nodes, next_holds, next_view, reshare, send_reading, shares_in},
    reload::{ReloadCounts, reload},
};
use crate::{
    control::{Control, RlsSource},
    l7::{Engine, EngineConfig},
    metrics::{self, Metrics},
    plan::{KernelPlan, L7Plan},
    rls::{
        self, Backend, RateLimiter, RlsConfig, RlsTls, ServeError,
        escalation::{BlockOrder, ClientAddress, EscalationConfig, Escalator, Penalties},
        redis::{RedisBackend, RedisConfig},
    },
    sync,
    watch::PolicyWatcher,
};

/// What is in force, to tell a changed policy set from an unchanged one.
#[derive(Debug)]
struct InForce {
    /// The compiled kernel plan, global rules at their policy limit.
    plan: KernelPlan,
    /// The last view of the node set and its demand (`None` without membership, or before
    /// Redis first answered: the full limits apply).
    view: Option<Arc<sync::demand::View>>,
    /// `--global-share-floor`.
    share_floor: f64,
    /// The requests of each share when the shares were last logged.
    logged_shares: std::collections::BTreeMap<String, u64>,
    l7: L7Plan,
    penalties: Penalties,
}

impl InForce {
    /// Live nodes in the last view (1 without one).
    fn nodes(&self) -> u64 {
        self.view.as_ref().map_or(1, |v| v.nodes.len() as u64)
    }
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
    let settings = redis_args::resolve(
        args.rls.rls_backend,
        &args.rls.redis,
        &|k| std::env::var(k).ok(),
        &redis_args::env_names(),
    )
    .context("the Redis settings (flags and REDIS_* environment) have errors; nothing was started")?;
    let backend = match settings.backend {
        BackendKind::Local => Backend::Local,
        BackendKind::Redis => {
            let config = RedisConfig {
                failure_mode: args.rls.redis_failure_mode,
                key_prefix: settings.key_prefix.clone(),
                response_timeout: args.rls.redis_timeout,
                negative_cache_capacity: args.rls.redis_local_cache_keys,
                ..RedisConfig::default()
            };
            let redis = RedisBackend::connect_to(&settings.target, settings.per_second.as_ref(), config)
                .await
                .context("--redis-url")?;
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
        let tls = match (&args.rls.rls_tls_cert, &args.rls.rls_tls_key) {
            (Some(cert), Some(key)) => Some(RlsTls::from_files(cert, key, args.rls.rls_tls_client_ca.as_deref())?),
            _ => None,
        };
        let config = RlsConfig {
            listen: args.rls.rls_listen,
            max_in_flight: args.rls.rls_max_in_flight,
            tls,
            ..RlsConfig::default()
        };
        let running = rls::serve(&config, Arc::clone(&limiter), shutdown_rx.clone()).await.map_err(|e| {
            let fix = match e {
                ServeError::Bind { .. } => "pick another --rls-listen, or --no-rls",
                ServeError::Tls { .. } => "check --rls-tls-cert, --rls-tls-key and --rls-tls-client-ca",
            };
            anyhow::Error::new(e).context(format!("starting the rate limit service: {fix}"))
        })?;
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
    // Before anything is attached: a SIGTERM during the start is then handled by the loop
    // (leave or detach as configured), not by the default action that kills the process.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut control = open_control(&args)?;
    let (view, mut sync_link) = join_nodes(&args, &settings, &compiled.plan, &shutdown_rx, &mut servers).await?;
    let share_floor = args.rls.global_share_floor;
    let mut kernel = if args.ifaces.is_empty() {
        info!("no --iface: no XDP program; serving the rate limit service only");
        None
    } else {
        let shares = shares_in(&compiled.plan, view.as_deref(), share_floor);
        Some(start_kernel(&args, &compiled.plan, shares, control.as_mut())?)
    };
    let mut in_force = InForce {
        plan: compiled.plan,
        view,
        share_floor,
        logged_shares: Default::default(),
        l7: compiled.l7,
        penalties,
    };
    // The sync period: this node's counters go to the sync task, which publishes the demand
    // they make and sends back the view its shares follow.
    let mut sync_tick = tokio::time::interval(args.rls.global_heartbeat);
    sync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut watcher = PolicyWatcher::new(&args.policies);
    let mut watch_tick = tokio::time::interval(args.watch_interval);
    watch_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reloads = ReloadCounts::default();
    let mut tick = tokio::time::interval(args.stats_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut control_tick = tokio::time::interval(Duration::from_secs(1));
    control_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rls = rls_source.read();
    let mut holds = sync_link.as_mut().and_then(|l| l.holds.take());
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
            _ = sync_tick.tick(), if sync_link.is_some() => {
                if let (Some(k), Some(link)) = (kernel.as_ref(), sync_link.as_ref()) {
                    send_reading(&k.dp, &in_force, link);
                }
            }
            Some(view) = next_view(&mut sync_link) => {
                if let Some(k) = kernel.as_mut() {
                    reshare(&mut k.dp, &mut in_force, Some(view), &metrics);
                }
            }
            Some(held) = next_holds(&mut holds) => {
                if let Some(k) = kernel.as_mut() {
                    hold(&mut k.dp, &held, &metrics);
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
                if let Some(k) = kernel.as_mut() && sync_link.is_some() {
                    reshare(&mut k.dp, &mut in_force, None, &metrics);
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
        k.exit(&args.ifaces, args.detach_on_exit);
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

/// How long the servers get to finish the calls in flight at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
