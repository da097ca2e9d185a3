//! Global per-source rules on this node: the admitted counts the program keeps per source
//! (`GLOBAL_SOURCE_COUNTS`), read for the cross-node window sums ([`crate::sync::window`]),
//! and the hold of a source whose window total went over the limit.

use std::{net::IpAddr, time::Duration};

use limiter_common::{Bucket, KEY_BY_PORT, SourceBucketKey, bucket::effective_tat, names};

use super::{Dataplane, Result, addr_to_ip, boot_time_ns, entries::proto_number, ignore_missing, map_err};

/// One source's admitted tokens under one global per-source rule on this node, summed over
/// the CPUs: cumulative since the entry was created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceCount {
    /// The rule's name (`policy/rule`): the same on every node.
    pub rule: String,
    pub source: IpAddr,
    /// Destination port and protocol number when the rule keys by port, else 0 and 0.
    pub port: u16,
    pub protocol: u8,
    /// The kernel's key, to tell an entry that was evicted and made again (another rule id
    /// after a reload counts apart).
    pub key: SourceBucketKey,
    pub count: u64,
}

impl Dataplane {
    /// Every source's admitted count under the global per-source rules of the plan in force.
    /// Entries of rules no longer in force (a reload retired them) are left out.
    pub fn global_source_counts(&self) -> Result<Vec<SourceCount>> {
        let mut out = Vec::new();
        for entry in self.global_sources.iter() {
            let (key, per_cpu) = entry.map_err(map_err(names::GLOBAL_SOURCE_COUNTS, "reading"))?;
            let Some(rule) = self.names.get(&key.rule_id) else { continue };
            let count = per_cpu.iter().fold(0u64, |sum, c| sum.saturating_add(*c));
            out.push(SourceCount {
                rule: rule.clone(),
                source: addr_to_ip(&key.addr),
                port: key.port,
                protocol: key.protocol,
                key,
                count,
            });
        }
        Ok(out)
    }

    /// Holds `source` for `duration` (the rest of the window) because it went over `rule`'s
    /// window limit across nodes: it goes into the block list (a longer block already there,
    /// an escalation's, stays), and this node's buckets of `rule` for it are set to be empty
    /// when the hold ends. Without the second step the buckets would fill up during the hold
    /// and hand the source a full burst on every node at each new window, so the nodes
    /// together would admit nodes x the limit per window; empty, they admit at the rule's
    /// rate until the window total is over again. Returns the buckets set.
    pub fn hold(&mut self, rule: &str, source: IpAddr, duration: Duration) -> Result<usize> {
        let key = self.block_key(source);
        let until = boot_time_ns().saturating_add(duration.as_nanos().min(u128::from(u64::MAX)) as u64);
        let longer = match self.block.get(&key, 0) {
            Ok(e) => e.expires_at_ns >= until,
            Err(e) => {
                ignore_missing(Err(e)).map_err(map_err(names::BLOCK, "reading"))?;
                false
            }
        };
        if !longer {
            self.block(source, duration)?;
        }
        let Some((rule_id, params, by_port)) = self.rule_params(rule) else { return Ok(0) };
        let ports: Vec<(u16, u8)> = if by_port {
            let targets = self.current.as_ref().and_then(|p| p.rules.iter().find(|r| r.name == rule));
            targets.map(|r| r.targets.iter().map(|t| (t.port, proto_number(t.protocol))).collect()).unwrap_or_default()
        } else {
            vec![(0, 0)]
        };
        let empty_at = until.saturating_add(params.burst_ns);
        let mut set = 0;
        for (port, protocol) in ports {
            let key = SourceBucketKey { rule_id, port, protocol, _pad: 0, addr: key };
            let bucket = match self.source_buckets.get(&key, 0) {
                Ok(b) => b,
                Err(e) => {
                    ignore_missing(Err(e)).map_err(map_err(names::SOURCE_BUCKETS, "reading"))?;
                    continue;
                }
            };
            if effective_tat(bucket.tat_ns, bucket.refunded_ns) >= empty_at {
                continue;
            }
            // The source is blocked now, so no charge races this write. The refund word stays
            // (the state is the difference of the two).
            let tat_ns = empty_at.saturating_add(bucket.refunded_ns);
            self.source_buckets
                .insert(key, Bucket { tat_ns, refunded_ns: bucket.refunded_ns }, 0)
                .map_err(map_err(names::SOURCE_BUCKETS, "emptying a held source's bucket"))?;
            set += 1;
        }
        Ok(set)
    }

    /// The id, bucket parameters and port keying of `rule` as written in the active set.
    fn rule_params(&self, rule: &str) -> Option<(u32, limiter_common::BucketParams, bool)> {
        let id = self.names.iter().find(|(_, name)| name.as_str() == rule).map(|(id, _)| *id)?;
        let written = self.written[usize::from(self.active_set)].as_ref()?;
        let (_, config) = written.rules.iter().find(|(_, c)| c.rule_id == id)?;
        Some((id, config.bucket, config.key_flags & KEY_BY_PORT != 0))
    }
}
