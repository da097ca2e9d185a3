//! The XDP half of a running agent: load the program, apply the plan and attach at start,
//! housekeeping at each stats tick, escalated sources into the block list, detach at exit.

use std::{collections::BTreeMap, time::Instant};

use anyhow::{Context as _, bail};
use log::{error, info, warn};

use super::{RunArgs, stats::stats_line};
use crate::{
    control::Control,
    dataplane::{Adoption, Dataplane, LoadOptions, Stats},
    metrics::{Metrics, PolicyLabels},
    plan::{KernelPlan, Limit},
    rls::escalation::BlockOrder,
};

/// The XDP half of a running agent.
pub(super) struct Kernel {
    pub(super) dp: Dataplane,
    last: Stats,
    last_at: Instant,
}

/// Loads the XDP program, applies the kernel plan and attaches to every interface.
/// `shares`: this node's shares of the plan's `global` rules (none: their full limits).
pub(super) fn start_kernel(
    args: &RunArgs,
    plan: &KernelPlan,
    shares: BTreeMap<String, Limit>,
    control: Option<&mut Control>,
) -> anyhow::Result<Kernel> {
    let options = LoadOptions {
        source_entries: args.source_entries,
        ipv6_source_prefix: args.ipv6_source_prefix,
        drop_unparsed: args.drop_unparsed,
        debug_log: args.debug_log,
        record_parse: false,
    };
    let mut dp = Dataplane::open_pinned(options, &args.pin_dir, args.layout_salt)
        .context("loading the XDP program into its pin directory (--pin-dir)")?;
    let fresh = dp.adoption() == Some(&Adoption::Fresh);
    if let Some(adoption) = dp.adoption() {
        info!("{}", adoption.describe(&args.pin_dir));
    }
    match shield(args, plan, shares, &mut dp, control) {
        Ok(()) => {}
        // A start that fails leaves nothing behind it pinned; an adopted shield stays as it
        // was found (the pinned policy keeps running).
        Err(e) if fresh => {
            if let Err(cleanup) = dp.remove_pins() {
                warn!("removing what this start pinned: {cleanup:#}");
            }
            return Err(e);
        }
        Err(e) => return Err(e.context("the shield pinned before this agent stays in force")),
    }
    let last = dp.stats().context("reading counters")?;
    Ok(Kernel { dp, last, last_at: Instant::now() })
}

/// Applies the plan, carries an upgrade's state over, attaches every interface and updates
/// the pins.
fn shield(
    args: &RunArgs,
    plan: &KernelPlan,
    shares: BTreeMap<String, Limit>,
    dp: &mut Dataplane,
    mut control: Option<&mut Control>,
) -> anyhow::Result<()> {
    // On adopted maps this is the usual double-buffered flip: the pinned policy judges every
    // packet until the new one is complete, and unchanged rules keep their buckets.
    let applied = dp.apply_shared(plan, shares).context("applying the policy to the kernel maps")?;
    info!(
        "policy applied: {} kernel rules ({} slots, {} port lists), {} allow and {} deny entries",
        applied.rules, applied.rule_slots, applied.port_lists, applied.allow, applied.deny
    );
    if let Some(line) = dp.carry_over().context("carrying the pinned state over to the new maps")? {
        info!("{line}");
    }
    for iface in &args.ifaces {
        let mode = dp.attach(iface, args.xdp_mode).with_context(|| {
            format!("attaching to {iface}: check the name with `ip link`, or try --xdp-mode generic")
        })?;
        info!("attached to {iface} in {mode} mode");
        if let Some(control) = control.as_deref_mut() {
            control.attached(iface, mode);
        }
    }
    dp.commit_pins(&args.ifaces).context("updating the pins")?;
    Ok(())
}

impl Kernel {
    /// Housekeeping of a stats tick; returns the kernel's stats line.
    pub(super) fn stats_tick(&mut self) -> Option<String> {
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

    /// Exit: leaves the shield in force (pinned), or with `detach` removes it.
    pub(super) fn exit(self, ifaces: &[String], detach: bool) {
        let Kernel { dp, .. } = self;
        dp.log_summary();
        let stats = dp.stats().ok();
        if detach {
            match dp.remove_pins() {
                Ok(line) => info!("detached from {}: {line}", ifaces.join(", ")),
                Err(e) => error!("detaching from {}: {e:#}", ifaces.join(", ")),
            }
            // The SYN proxy's netfilter half goes with the shield, as with `detach`.
            if crate::synproxy::installed() {
                match crate::synproxy::remove() {
                    Ok(()) => info!("removed the SYN proxy's nftables table {}", crate::synproxy::TABLE),
                    Err(e) => error!("removing the SYN proxy's netfilter half: {e:#}"),
                }
            }
        } else {
            dp.leave();
        }
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
pub(super) fn escalate(dp: &mut Dataplane, order: &BlockOrder, metrics: &Metrics) {
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

/// Refuses to start without root, with a hint, rather than failing deep in a syscall.
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("limiter-agent run needs root (CAP_BPF and CAP_NET_ADMIN): rerun with sudo");
    }
    Ok(())
}
