//! Glue to [`crate::sync`]: joining the Redis node set at start, sending this node's counters
//! to the sync task each period, and putting in force the shares of the `global` kernel rules
//! that each view it sends back gives this node.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use anyhow::Context as _;
use log::{debug, error, info, warn};
use tokio::sync::{mpsc, watch};

use super::{BackendKind, InForce, RunArgs, redis_args::RedisSettings};
use crate::{
    dataplane::Dataplane,
    metrics::{KernelRuleLabels, Metrics},
    plan::{KernelPlan, Limit},
    sync::{
        self, Membership, MembershipConfig,
        demand::{self, Demand, View},
        exchange::Reading,
        window::{self, Held},
    },
};

/// The main loop's ends of the sync task's channels.
pub(super) struct SyncLink {
    readings: watch::Sender<Reading>,
    pub(super) views: watch::Receiver<Option<Arc<View>>>,
    /// Sources over the window limit of a global per-source rule, each sync period (taken
    /// out by the main loop, which waits on it beside `views`).
    pub(super) holds: Option<mpsc::UnboundedReceiver<Vec<Held>>>,
}

/// Joins the Redis node set when this agent shields interfaces and counts `global` rules in
/// Redis (see [`crate::sync`]): one sync round now, so the first plan applied already holds
/// this node's share, then a task that follows this node's counters (pushed on `servers`, it
/// leaves the set at shutdown). Returns the first view (`None`: Redis did not answer, the
/// full limits apply until it does) and the link to the task.
pub(super) async fn join_nodes(
    args: &RunArgs,
    settings: &RedisSettings,
    plan: &KernelPlan,
    shutdown: &watch::Receiver<bool>,
    servers: &mut Vec<(&str, tokio::task::JoinHandle<anyhow::Result<()>>)>,
) -> anyhow::Result<(Option<Arc<View>>, Option<SyncLink>)> {
    let globals = sync::global_rules(plan);
    let per_source = sync::global_per_source_rules(plan);
    if args.ifaces.is_empty() {
        return Ok((None, None));
    }
    if settings.backend != BackendKind::Redis {
        if globals + per_source > 0 {
            info!(
                "sync: {} global kernel rule(s) count on this node only (no --rls-backend redis)",
                globals + per_source
            );
        }
        return Ok((None, None));
    }
    let node_id = args.rls.node_id.clone().unwrap_or_else(sync::default_node_id);
    let config = MembershipConfig::new(node_id, &settings.key_prefix, args.rls.global_heartbeat);
    let mut membership = Membership::with_target(&settings.target, config).context("--redis-url")?;
    let (key, id) = (membership.config().key.clone(), membership.config().node_id.clone());
    // No demand of its own yet: this node starts on its floor beside busy nodes, or on an
    // equal part when no node has demand.
    let view = match membership.sync_once(&Demand::new()).await {
        Some(view) => {
            let n = sync::nodes_text(view.nodes.len() as u64);
            info!(
                "sync: joined {key} as {id}: {n} live; {globals} global kernel rule(s) shared across {n} by demand, floors {}% of each limit; {per_source} global per-source rule(s) summed per window",
                args.rls.global_share_floor * 100.0
            );
            Some(Arc::new(view))
        }
        None => {
            warn!(
                "sync: no node set yet (redis unreachable): {globals} global kernel rule(s) get the full limit on this node until the first sync answers"
            );
            None
        }
    };
    let (readings, readings_rx) = watch::channel(Reading::default());
    let (views_tx, views) = watch::channel(view.clone());
    let (holds_tx, holds) = mpsc::unbounded_channel();
    let shutdown = shutdown.clone();
    servers.push((
        "node membership",
        tokio::spawn(async move {
            membership.run_shares(readings_rx, views_tx, holds_tx, shutdown).await;
            Ok(())
        }),
    ));
    Ok((view, Some(SyncLink { readings, views, holds: Some(holds) })))
}

/// This node's shares of `plan`'s global rules in `view`; none without a view (the full
/// limits: this node alone, or Redis not reached yet).
pub(super) fn shares_in(plan: &KernelPlan, view: Option<&View>, floor: f64) -> BTreeMap<String, Limit> {
    view.map(|v| demand::shares(plan, v, floor)).unwrap_or_default()
}

/// Sends this node's cumulative offered counts of the global rules, and the admitted counts
/// of the sources of its global per-source rules, to the sync task.
pub(super) fn send_reading(dp: &Dataplane, in_force: &InForce, link: &SyncLink) {
    let stats = match dp.stats() {
        Ok(stats) => stats,
        Err(e) => return warn!("sync: reading the counters of global rules: {e}"),
    };
    let counts = demand::offered(&in_force.plan, &stats);
    let windows = window::window_rules(&in_force.plan);
    let sources = if windows.is_empty() {
        Vec::new()
    } else {
        match dp.global_source_counts() {
            Ok(sources) => sources,
            Err(e) => return warn!("sync: reading the per-source counts of global rules: {e}"),
        }
    };
    link.readings.send_replace(Reading { at: Some(Instant::now()), counts, windows, sources });
}

/// The next sources to hold, when the sync task sends some; never resolves without membership.
pub(super) async fn next_holds(holds: &mut Option<mpsc::UnboundedReceiver<Vec<Held>>>) -> Option<Vec<Held>> {
    if let Some(holds) = holds
        && let Some(held) = holds.recv().await
    {
        return Some(held);
    }
    std::future::pending().await
}

/// Holds each source over a global per-source rule's window limit on this node until the
/// window ends (block list, and this node's buckets of the rule for it emptied by then). Each
/// source is logged and counted once per window; it is held again at every report (the hold
/// is the same, a lost write is made good).
pub(super) fn hold(dp: &mut Dataplane, held: &[Held], metrics: &Metrics) {
    for h in held {
        match dp.hold(&h.rule, h.source, h.remaining) {
            Ok(_) if h.first => {
                metrics.global_source_holds.inc(&KernelRuleLabels { rule: h.rule.clone() });
                info!(
                    "sync: holding {} on every node for the rest of the window ({} ms): {} admitted {} {} across nodes in this window, over its limit of {}",
                    h.field,
                    h.remaining.as_millis(),
                    h.rule,
                    h.total,
                    h.count.to_string().to_lowercase(),
                    h.limit
                );
            }
            Ok(_) => {}
            Err(e) => error!("sync: holding {} for {} failed (retried at the next report): {e:#}", h.field, h.rule),
        }
    }
}

/// The next view, when the sync task sends one; never resolves without membership.
pub(super) async fn next_view(link: &mut Option<SyncLink>) -> Option<Arc<View>> {
    if let Some(link) = link
        && link.views.changed().await.is_ok()
    {
        return link.views.borrow_and_update().clone();
    }
    // Without membership, or once its task has ended: nothing more to wait for.
    std::future::pending().await
}

/// Puts in force this node's shares in `view`, in place (buckets and rule ids kept). A share
/// that fails to apply is logged; the next view, or the next stats tick, retries it. Shares
/// are logged (info) when one moved by a tenth of its limit or more since last logged, so a
/// shift shows in the log without a line every period.
pub(super) fn reshare(dp: &mut Dataplane, in_force: &mut InForce, view: Option<Arc<View>>, metrics: &Metrics) {
    if view.is_some() {
        in_force.view = view;
    }
    let shares = shares_in(&in_force.plan, in_force.view.as_deref(), in_force.share_floor);
    if dp.shares() == &shares {
        metrics.global_shares(in_force.nodes(), dp.shares());
        return;
    }
    let text = shares_text(&shares);
    let moved = in_force.plan.rules.iter().filter(|r| r.global_shared()).any(|r| {
        let (Some(new), old) = (shares.get(&r.name), in_force.logged_shares.get(&r.name)) else { return false };
        old.is_none_or(|old| new.requests.abs_diff(*old) >= (r.limit.requests / 10).max(1))
    });
    match dp.set_shares(shares) {
        Ok(changed) => {
            if moved {
                in_force.logged_shares = dp.shares().iter().map(|(name, l)| (name.clone(), l.requests)).collect();
                info!("sync: shares of {} live: {text}", sync::nodes_text(in_force.nodes()));
            } else {
                debug!("sync: {changed} global kernel rule(s) re-shared: {text}");
            }
        }
        Err(e) => error!("sync: putting the new shares in force failed, the previous ones stay (retried): {e:#}"),
    }
    metrics.global_shares(in_force.nodes(), dp.shares());
}

/// `p/r=120/Second+10` for each share, for logs.
fn shares_text(shares: &BTreeMap<String, Limit>) -> String {
    shares.iter().map(|(name, l)| format!("{name}={}/{}+{}", l.requests, l.unit, l.burst)).collect::<Vec<_>>().join(" ")
}
