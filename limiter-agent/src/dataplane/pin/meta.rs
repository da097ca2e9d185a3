//! What an agent records next to the maps it pins, in two small maps it creates itself
//! (bpffs holds only BPF objects, so the record is a map too):
//!
//! - `META`: the layout stamp, when the set was pinned, the last agent (pid, start, stop),
//!   and the policy in force (digest and names), for `top` and the next agent;
//! - `RULE_IDS`: the stable rule ids ([`RuleIds`](crate::dataplane::RuleIds)) by id: the
//!   fingerprint of the rule that owns each id and its name, so the next agent gives unchanged
//!   rules the same id, and with it their bucket state and counters.
//!
//! The kernel program never reads these maps.

use std::{
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use aya::{
    Pod,
    maps::{Array, Map, MapData, MapError},
};

/// `META`'s value starts with these bytes; a different value means a different format.
pub const META_MAGIC: u64 = u64::from_le_bytes(*b"LIMITR01");
/// Bytes of the policy description kept in [`Meta::policy`].
pub const POLICY_TEXT: usize = 120;
/// Bytes of a rule name kept in [`RuleIdEntry::name`].
pub const RULE_NAME: usize = 112;

/// The single entry of `META`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Meta {
    pub magic: u64,
    /// The layout stamp of the maps pinned with it.
    pub layout_stamp: u64,
    /// Unix seconds when these maps were pinned (by the first agent, or the upgrade that
    /// replaced them).
    pub pinned_at_s: u64,
    /// Unix seconds when the last agent started.
    pub agent_started_s: u64,
    /// Unix seconds when the last agent stopped and left the shield in force; 0 while it runs
    /// (and after a `kill -9`, which records nothing).
    pub agent_stopped_s: u64,
    /// Digest of the kernel plan in force.
    pub policy_digest: u64,
    pub agent_pid: u32,
    /// `RuleIds`' next never-used id.
    pub rule_ids_next: u32,
    /// Kernel rules in force.
    pub kernel_rules: u32,
    pub _pad: u32,
    /// The policies in force (names), NUL-padded UTF-8, truncated.
    pub policy: [u8; POLICY_TEXT],
}

const _: () = assert!(size_of::<Meta>() == 64 + POLICY_TEXT);

impl Meta {
    pub fn new(layout_stamp: u64) -> Self {
        Self {
            magic: META_MAGIC,
            layout_stamp,
            pinned_at_s: unix_now(),
            agent_started_s: 0,
            agent_stopped_s: 0,
            policy_digest: 0,
            agent_pid: 0,
            rule_ids_next: 0,
            kernel_rules: 0,
            _pad: 0,
            policy: [0; POLICY_TEXT],
        }
    }

    pub fn policy_text(&self) -> String {
        text(&self.policy)
    }

    pub fn set_policy_text(&mut self, s: &str) {
        self.policy = fixed(s);
    }
}

/// State of an id in `RULE_IDS`.
pub mod id_state {
    pub const UNUSED: u32 = 0;
    pub const LIVE: u32 = 1;
    /// Retired by the last apply, purged once, not yet reusable.
    pub const HELD: u32 = 2;
    pub const FREE: u32 = 3;
}

/// Entry `id` of `RULE_IDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RuleIdEntry {
    /// [`id_state`].
    pub state: u32,
    pub _pad: u32,
    /// `RuleIdentity` fingerprint of the live rule holding the id.
    pub fingerprint: u64,
    /// Its name (`policy/rule`), NUL-padded UTF-8, truncated.
    pub name: [u8; RULE_NAME],
}

const _: () = assert!(size_of::<RuleIdEntry>() == 16 + RULE_NAME);

impl RuleIdEntry {
    pub fn new(state: u32, fingerprint: u64, name: &str) -> Self {
        Self { state, _pad: 0, fingerprint, name: fixed(name) }
    }

    pub fn name(&self) -> String {
        text(&self.name)
    }
}

// SAFETY: repr(C), Copy, every field an integer or byte array, no padding (sizes asserted).
unsafe impl Pod for Meta {}
// SAFETY: as above.
unsafe impl Pod for RuleIdEntry {}

fn fixed<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0; N];
    // Cut at a char boundary so the text stays UTF-8.
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The two record maps of a pinned set.
pub struct MetaMaps {
    pub meta: Array<MapData, Meta>,
    pub rule_ids: Array<MapData, RuleIdEntry>,
}

impl MetaMaps {
    /// Creates both maps (not pinned yet).
    pub fn create() -> Result<Self, MapError> {
        Ok(Self {
            meta: Array::create(1, 0)?,
            rule_ids: Array::create(limiter_common::MAX_RULES, 0)?,
        })
    }

    /// Opens the maps pinned at `meta` and `rule_ids`; an error when they are missing or of
    /// another format.
    pub fn open(meta: &Path, rule_ids: &Path) -> Result<Self, MapError> {
        let open = |p: &Path| MapData::from_pin(p).and_then(Map::from_map_data);
        Ok(Self { meta: Array::try_from(open(meta)?)?, rule_ids: Array::try_from(open(rule_ids)?)? })
    }

    /// Creates both maps and pins them at `meta` and `rule_ids`.
    pub fn create_pinned(meta: &Path, rule_ids: &Path) -> Result<Self, MapError> {
        let pin_err = |e| MapError::PinError { name: None, error: e };
        let fresh = Self::create()?;
        // aya's typed maps pin by value; reopen them from their pins.
        fresh.meta.pin(meta).map_err(pin_err)?;
        fresh.rule_ids.pin(rule_ids).map_err(pin_err)?;
        Self::open(meta, rule_ids)
    }

    /// The record; `None` when `META` holds something else (not written yet, or another
    /// format with the same size).
    pub fn read(&self) -> Result<Option<Meta>, MapError> {
        let m = self.meta.get(&0, 0)?;
        Ok((m.magic == META_MAGIC).then_some(m))
    }

    pub fn write(&mut self, meta: &Meta) -> Result<(), MapError> {
        self.meta.set(0, meta, 0)
    }

    /// Every id below `next` with its entry.
    pub fn ids(&self, next: u32) -> Result<Vec<(u32, RuleIdEntry)>, MapError> {
        (0..next.min(limiter_common::MAX_RULES)).map(|id| self.rule_ids.get(&id, 0).map(|e| (id, e))).collect()
    }
}
