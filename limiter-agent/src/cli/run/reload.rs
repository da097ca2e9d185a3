//! Loading the policy set at start, and reloading it while running (SIGHUP or a watched
//! change): all or nothing, the running policy stays when the new one is rejected.

use std::path::PathBuf;

use log::{error, info, warn};

use super::InForce;
use crate::{
    control,
    dataplane::Dataplane,
    metrics::Metrics,
    plan::KernelPlan,
    policy::{self, Compiled},
    rls::{RateLimiter, escalation::Penalties},
    sync,
};

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

/// Reloads that succeeded and that were rejected since start (logged with each reload).
#[derive(Debug, Default)]
pub(super) struct ReloadCounts {
    applied: u64,
    rejected: u64,
    last_rejected: bool,
}

impl ReloadCounts {
    pub(super) fn record(&mut self, outcome: Option<bool>, metrics: &Metrics) {
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
    pub(super) fn control(&self) -> control::Reloads {
        control::Reloads { applied: self.applied, rejected: self.rejected, last_ok: !self.last_rejected }
    }
}

/// Re-reads the policy; a policy with any error is rejected whole and the running one stays.
/// The kernel plan is applied first (one atomic switch in the kernel); only if that succeeds
/// are the L7 rules replaced (one atomic swap in the engine), so a rejected set changes
/// neither. `Some(true)`: applied; `Some(false)`: rejected; `None`: nothing changed.
pub(super) fn reload(
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
    let shares = super::nodes::shares_in(&compiled.plan, in_force.view.as_deref(), in_force.share_floor);
    let kernel_changed = dp.as_ref().is_some_and(|dp| dp.current_plan() != Some(&compiled.plan));
    let l7_changed = in_force.l7 != compiled.l7 || in_force.penalties != penalties;
    if !kernel_changed && !l7_changed {
        info!("{why}: policy unchanged");
        return None;
    }
    let mut kernel_note = String::new();
    if let Some(dp) = dp.filter(|_| kernel_changed) {
        match dp.apply_shared(&compiled.plan, shares) {
            Ok(a) => {
                kernel_note = format!("{} kernel rules, {} kept their bucket state", a.rules, a.kept);
                let globals = sync::global_rules(&compiled.plan);
                let nodes = in_force.nodes();
                if nodes > 1 && globals > 0 {
                    kernel_note.push_str(&format!(
                        ", {globals} global rule(s) shared by demand across {}",
                        sync::nodes_text(nodes)
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
