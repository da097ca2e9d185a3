//! Glue to [`crate::sync`]: joining the Redis node set at start, following its node count,
//! and re-applying this node's share of the `global` kernel rules when the count changes.

use anyhow::Context as _;
use log::{error, info, warn};
use tokio::sync::watch;

use super::{BackendKind, InForce, RunArgs, redis_args::RedisSettings};
use crate::{
    dataplane::Dataplane,
    plan::KernelPlan,
    sync::{self, Membership, MembershipConfig},
};

/// Joins the Redis node set when this agent shields interfaces and counts `global` rules in
/// Redis (see [`crate::sync`]): one heartbeat now, so the first plan applied is already this
/// node's share, then a task that renews it (pushed on `servers`, it leaves the set at
/// shutdown). Returns the node count and where its changes arrive.
pub(super) async fn join_nodes(
    args: &RunArgs,
    settings: &RedisSettings,
    plan: &KernelPlan,
    shutdown: &watch::Receiver<bool>,
    servers: &mut Vec<(&str, tokio::task::JoinHandle<anyhow::Result<()>>)>,
) -> anyhow::Result<(u64, Option<watch::Receiver<u64>>)> {
    let globals = sync::global_rules(plan);
    if args.ifaces.is_empty() {
        return Ok((1, None));
    }
    if settings.backend != BackendKind::Redis {
        if globals > 0 {
            info!("sync: {globals} global kernel rule(s) count on this node only (no --rls-backend redis)");
        }
        return Ok((1, None));
    }
    let node_id = args.rls.node_id.clone().unwrap_or_else(sync::default_node_id);
    let config = MembershipConfig::new(node_id, &settings.key_prefix, args.rls.global_heartbeat);
    let mut membership = Membership::with_target(&settings.target, config).context("--redis-url")?;
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
pub(super) async fn next_nodes(rx: &mut Option<watch::Receiver<u64>>) -> Option<u64> {
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
pub(super) fn reshare(dp: &mut Dataplane, in_force: &mut InForce, nodes: u64) {
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
