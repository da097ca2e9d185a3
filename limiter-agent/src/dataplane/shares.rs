//! This node's shares of `global` rules, changed in place.
//!
//! A share changes every sync period while demand moves between nodes, so it must not be a
//! new rule: a rule's id (and with it its buckets and counters) follows its policy limit, and
//! a new share only rewrites the bucket parameters of the rule's slots in the active policy
//! set. Those are plain array values the program reads per packet; a packet that reads a slot
//! while it is rewritten may see the old rate with the new depth (or the reverse) for that one
//! packet, both values the agent chose, so no set flip is needed.

use std::collections::BTreeMap;

use limiter_common::{
    BucketParams, MAX_RULES, SharedBucketKey,
    bucket::{FP_SHIFT, remaining_tokens},
    names,
};

use super::{Dataplane, DataplaneError, Result, boot_time_ns, entries, ignore_missing, map_err};
use crate::plan::{KernelPlan, Limit};

/// `plan` with the limit of each `global` rule named in `shares` replaced by its share.
pub(super) fn with_shares(plan: &KernelPlan, shares: &BTreeMap<String, Limit>) -> KernelPlan {
    let mut plan = plan.clone();
    for rule in plan.rules.iter_mut().filter(|r| r.global) {
        if let Some(share) = shares.get(&rule.name) {
            rule.limit = *share;
        }
    }
    plan
}

impl Dataplane {
    /// The shares in force, by rule name.
    pub fn shares(&self) -> &BTreeMap<String, Limit> {
        &self.shares
    }

    /// [`Self::apply`] with `shares` for the plan's `global` rules (a reload, where the new
    /// limits need shares computed for them). On error the previous shares stay, with the
    /// previous plan.
    pub fn apply_shared(&mut self, plan: &KernelPlan, shares: BTreeMap<String, Limit>) -> Result<super::Applied> {
        let previous = std::mem::replace(&mut self.shares, shares);
        let applied = self.apply(plan);
        if applied.is_err() {
            self.shares = previous;
        }
        applied
    }

    /// Puts `shares` in force for the plan in force, in place: each changed rule keeps its id,
    /// its buckets and its counters. A shared bucket (one for all sources) keeps its tokens
    /// rather than its time: a node whose share grows does not get the difference at once as
    /// a fresh burst, it earns it at the new rate. Per-source buckets keep their state as is
    /// (rewriting every tracked source each period would cost O(sources)): their depth and rate
    /// scale together, so a full one stays full and an empty one stays empty. Returns the
    /// number of rules whose bucket parameters changed.
    pub fn set_shares(&mut self, shares: BTreeMap<String, Limit>) -> Result<usize> {
        let Some(plan) = self.current.clone() else {
            self.shares = shares;
            return Ok(0);
        };
        let set = self.active_set;
        let ids = entries::fingerprints(&plan)
            .iter()
            .zip(&plan.rules)
            .map(|(fp, rule)| self.ids.id_of(*fp).ok_or_else(|| DataplaneError::NoRuleId { rule: rule.name.clone() }))
            .collect::<Result<Vec<u32>>>()?;
        let fresh = entries::layout(&with_shares(&plan, &shares), set, &ids)?;
        let Some(written) = self.written[usize::from(set)].as_mut() else {
            self.shares = shares;
            return Ok(0);
        };
        // The same plan laid out again: slots line up one to one; only bucket params differ.
        let mut changed: BTreeMap<u32, (BucketParams, BucketParams)> = BTreeMap::new();
        for ((slot, new), (_, old)) in fresh.rules.iter().zip(written.rules.iter_mut()) {
            if new.bucket == old.bucket {
                continue;
            }
            self.rules
                .set(u32::from(set) * MAX_RULES + slot, new, 0)
                .map_err(map_err(names::RULES, "rewriting a rule's share"))?;
            changed.insert(new.rule_id, (old.bucket, new.bucket));
            *old = *new;
        }
        self.shares = shares;
        self.keep_tokens(&changed)?;
        Ok(changed.len())
    }

    /// Rewrites each shared bucket of the `changed` rules so that it holds as many tokens under
    /// the new parameters as it held under the old ones (at most the new depth).
    ///
    /// A packet charging the bucket while it is rewritten may have its charge lost (the map
    /// update replaces the value the program is updating): one packet per CPU per share change.
    fn keep_tokens(&mut self, changed: &BTreeMap<u32, (BucketParams, BucketParams)>) -> Result<()> {
        if changed.is_empty() {
            return Ok(());
        }
        let keys: Vec<SharedBucketKey> =
            self.shared_buckets.keys().filter_map(|k| k.ok()).filter(|k| changed.contains_key(&k.rule_id)).collect();
        for key in keys {
            let Some((old, new)) = changed.get(&key.rule_id) else { continue };
            let bucket = match self.shared_buckets.get(&key, 0) {
                Ok(b) => b,
                // Gone since the walk (a reload purged it): nothing to keep.
                Err(e) => {
                    ignore_missing(Err(e)).map_err(map_err(names::SHARED_BUCKETS, "reading"))?;
                    continue;
                }
            };
            let now = boot_time_ns();
            // The refund word stays as it is: a charge in flight read it, and computes its new
            // TAT relative to it.
            let effective = limiter_common::bucket::effective_tat(bucket.tat_ns, bucket.refunded_ns);
            let tat_ns = tat_keeping_tokens(old, new, effective, now).saturating_add(bucket.refunded_ns);
            self.shared_buckets
                .insert(key, limiter_common::Bucket { tat_ns, refunded_ns: bucket.refunded_ns }, 0)
                .map_err(map_err(names::SHARED_BUCKETS, "rewriting a bucket for a new share"))?;
        }
        Ok(())
    }
}

/// The theoretical arrival time under `new` that leaves as many tokens at `now` as `tat` left
/// under `old`, capped at `new`'s depth (a full bucket: `now`).
pub(crate) fn tat_keeping_tokens(old: &BucketParams, new: &BucketParams, tat: u64, now: u64) -> u64 {
    let tokens = u128::from(remaining_tokens(old, tat, now));
    let free_ns = (tokens * u128::from(new.ns_per_token_fp)) >> FP_SHIFT;
    let free_ns = u64::try_from(free_ns).unwrap_or(u64::MAX).min(new.burst_ns);
    now.saturating_add(new.burst_ns - free_ns)
}

#[cfg(test)]
mod tests {
    use limiter_common::bucket::NS_PER_SECOND;

    use super::*;

    #[test]
    fn a_new_share_keeps_the_tokens_not_the_time() {
        let old = BucketParams::for_packets(10, NS_PER_SECOND, 0).unwrap();
        let new = BucketParams::for_packets(100, NS_PER_SECOND, 0).unwrap();
        let now = 50 * NS_PER_SECOND;
        // Full under the old share (10 tokens): 10 tokens under the new one, not 100.
        let tat = tat_keeping_tokens(&old, &new, 0, now);
        assert_eq!(remaining_tokens(&new, tat, now), 10);
        // Empty stays empty.
        let tat = tat_keeping_tokens(&old, &new, now + old.burst_ns, now);
        assert_eq!(remaining_tokens(&new, tat, now), 0);
        // Shrinking caps at the new depth.
        let tat = tat_keeping_tokens(&new, &old, 0, now);
        assert_eq!(remaining_tokens(&old, tat, now), 10);
        // Half full: 5 tokens either way.
        let tat = tat_keeping_tokens(&old, &new, now + old.burst_ns / 2, now);
        assert_eq!(remaining_tokens(&new, tat, now), 5);
    }

    #[test]
    fn only_global_rules_take_a_share() {
        use crate::plan::{CountKind, KernelRule, SourceSelector, Unit};
        let rule = |name: &str, global| KernelRule {
            name: name.into(),
            targets: Vec::new(),
            source: SourceSelector::everyone(false),
            count: CountKind::Packets,
            limit: Limit { requests: 100, unit: Unit::Second, burst: 0 },
            shadow: false,
            global,
        };
        let plan = KernelPlan { rules: vec![rule("p/local", false), rule("p/global", true)], ..Default::default() };
        let share = Limit { requests: 7, unit: Unit::Second, burst: 0 };
        let shares: BTreeMap<String, Limit> =
            [("p/local".to_owned(), share), ("p/global".to_owned(), share)].into_iter().collect();
        let shared = with_shares(&plan, &shares);
        assert_eq!(shared.rules[0], plan.rules[0]);
        assert_eq!(shared.rules[1].limit, share);
    }
}
