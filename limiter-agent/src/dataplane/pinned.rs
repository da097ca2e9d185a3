//! The data path kept in a pin directory ([`pin`](super::pin)): opened fresh, adopted from a
//! set of the same layout, or upgraded from a set of another layout; attached through pinned
//! XDP links; left in force or removed when the agent exits.
//!
//! The rule that shapes all of it: at no instant is an interface unshielded. A pinned link is
//! never detached to change what runs on it; the program is swapped with `bpf_link_update`,
//! which the kernel does atomically between two packets.

use std::{collections::HashMap as StdHashMap, path::Path};

use aya::{
    maps::{HashMap, Map, MapData, MapInfo, lpm_trie::Key},
    programs::{
        ProgramInfo, Xdp,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use aya_obj::programs::XdpAttachType;
use limiter_common::{
    Addr, BlockEntry, Bucket, LIST_HOST_PREFIX, ListKey, ListValue, PortRules, SharedBucketKey, SourceBucketKey,
    layout::{LAYOUT_STAMP, SHARED_MAPS, map_type},
    names,
};
use log::{info, warn};

use super::{
    AttachMode, Dataplane, DataplaneError, LoadOptions, MapPins, Result, SetEntries, boot_time_ns,
    entries::{IdState, RuleIds},
    map_err,
    pin::{
        PROGRAM_PIN, PinDir, STAGED,
        meta::{Meta, MetaMaps, RuleIdEntry, id_state, unix_now},
        sys,
    },
};
use crate::plan::KernelPlan;

/// What the agent found in its pin directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Adoption {
    /// Nothing: a new set was pinned.
    Fresh,
    /// A set of this layout: its maps are in use as they were.
    Adopted {
        /// Unix seconds the set was pinned.
        since_s: u64,
        last_pid: u32,
        /// When the last agent stopped (0: it did not say; killed).
        stopped_s: u64,
        policy: String,
        /// Whether the pinned program is this agent's code (kept) or is being replaced.
        same_program: bool,
    },
    /// A set of another layout: fresh maps, what can be carried is carried.
    Upgraded { reason: String },
}

impl Adoption {
    /// One log line for the start.
    pub fn describe(&self, dir: &Path) -> String {
        match self {
            Self::Fresh => format!("pinning the shield in {}", dir.display()),
            Self::Adopted { since_s, last_pid, stopped_s, policy, same_program } => {
                let now = unix_now();
                let left = if *stopped_s == 0 {
                    format!("its agent (pid {last_pid}) did not stop cleanly")
                } else {
                    format!("it ran without an agent for {}s (pid {last_pid} stopped)", now.saturating_sub(*stopped_s))
                };
                let program =
                    if *same_program { "program unchanged" } else { "program replaced in place (bpf_link_update)" };
                format!(
                    "adopted the shield pinned in {} {}s ago (policy {policy}): {left}; buckets, block list and counters kept, {program}",
                    dir.display(),
                    now.saturating_sub(*since_s)
                )
            }
            Self::Upgraded { reason } => {
                format!("the shield pinned in {} has another layout ({reason}): upgrading it", dir.display())
            }
        }
    }
}

/// What a set of another layout still offers, read before its maps are replaced.
struct Upgrade {
    reason: String,
    block: Option<HashMap<MapData, Addr, BlockEntry>>,
    shared: Option<HashMap<MapData, SharedBucketKey, Bucket>>,
    sources: Option<HashMap<MapData, SourceBucketKey, Bucket>>,
    /// Old rule id → fingerprint of the rule that held it.
    ids: Vec<(u32, u64)>,
}

/// The pinned half of a [`Dataplane`].
pub(super) struct Pinned {
    pub(super) dir: PinDir,
    record_maps: MetaMaps,
    record: Meta,
    /// The pinned program, when it is this agent's code: it keeps running and serves new
    /// attachments, rather than a copy.
    pub(super) kept_program: Option<Xdp>,
    /// This agent's program must replace the pinned one (`prog`) once the links run it.
    replace_program: bool,
    upgrade: Option<Upgrade>,
    adoption: Adoption,
}

enum Found {
    Nothing,
    Same(Box<MetaMaps>, Meta),
    Other(String),
}

fn hash_from_pin<K: aya::Pod, V: aya::Pod>(path: &Path) -> Option<HashMap<MapData, K, V>> {
    let map = MapData::from_pin(path).and_then(Map::from_map_data).ok()?;
    HashMap::try_from(map).ok()
}

fn type_number(t: aya::maps::MapType) -> u32 {
    use aya::maps::MapType as T;
    match t {
        T::Hash => map_type::HASH,
        T::Array => map_type::ARRAY,
        T::PerCpuArray => map_type::PERCPU_ARRAY,
        T::LruHash => map_type::LRU_HASH,
        T::LruPerCpuHash => map_type::LRU_PERCPU_HASH,
        T::LpmTrie => map_type::LPM_TRIE,
        T::ProgramArray => map_type::PROG_ARRAY,
        _ => u32::MAX,
    }
}

/// Whether the set in `dir` can be adopted as it is, and if not, why.
fn inspect(dir: &PinDir, options: &LoadOptions, stamp: u64) -> Result<Found> {
    if dir.is_empty()? {
        return Ok(Found::Nothing);
    }
    let (meta, ids) = dir.meta_paths();
    let maps = match MetaMaps::open(&meta, &ids) {
        Ok(m) => m,
        Err(e) => return Ok(Found::Other(format!("no record this agent can read: {e}"))),
    };
    let Some(record) = maps.read().map_err(map_err("META", "reading"))? else {
        return Ok(Found::Other("a record of another format".into()));
    };
    if record.layout_stamp != stamp {
        return Ok(Found::Other(format!("layout {:016x}, this agent's is {stamp:016x}", record.layout_stamp)));
    }
    for spec in SHARED_MAPS {
        let info = match MapInfo::from_pin(dir.join(spec.name)) {
            Ok(i) => i,
            Err(e) => return Ok(Found::Other(format!("map {}: {e}", spec.name))),
        };
        let max = if spec.name == names::SOURCE_BUCKETS { options.source_entries.max(1) } else { spec.max_entries };
        let kind = info.map_type().map(type_number).unwrap_or(u32::MAX);
        let found = (kind, info.key_size(), info.value_size(), info.max_entries());
        let wanted = (spec.map_type, spec.key_size, spec.value_size, max);
        if found != wanted {
            return Ok(Found::Other(format!(
                "map {}: (type, key, value, entries) {found:?}, this agent wants {wanted:?}",
                spec.name
            )));
        }
    }
    Ok(Found::Same(Box::new(maps), record))
}

impl Dataplane {
    /// Loads the program into the pin directory `dir`, adopting what is pinned there: see
    /// [`Adoption`]. Then [`Self::apply`] the policy, [`Self::carry_over`],
    /// [`Self::attach`] every interface and [`Self::commit_pins`].
    ///
    /// `layout_salt` (tests) perturbs this agent's layout stamp.
    pub fn open_pinned(options: LoadOptions, dir: &Path, layout_salt: u64) -> Result<Self> {
        let dir = PinDir::open(dir)?;
        let stamp = LAYOUT_STAMP.wrapping_add(layout_salt);
        let (meta_path, ids_path) = dir.meta_paths();
        let (mut dp, pinned) = match inspect(&dir, &options, stamp)? {
            Found::Nothing => {
                let mut dp = Self::load_with(options, MapPins::Reuse(dir.root()))?;
                dp.write_config()?;
                dp.program()?.pin(dir.join(PROGRAM_PIN)).map_err(DataplaneError::ProgramPin)?;
                let record_maps =
                    MetaMaps::create_pinned(&meta_path, &ids_path).map_err(map_err("META", "creating"))?;
                let pinned = Pinned {
                    dir,
                    record_maps,
                    record: Meta::new(stamp),
                    kept_program: None,
                    replace_program: false,
                    upgrade: None,
                    adoption: Adoption::Fresh,
                };
                (dp, pinned)
            }
            Found::Same(record_maps, record) => {
                let mut dp = Self::load_with(options, MapPins::Reuse(dir.root()))?;
                dp.restore(&record_maps, &record)?;
                // Same active set; this agent's program-wide options.
                dp.write_config()?;
                let prog_path = dir.join(PROGRAM_PIN);
                let pinned_tag = ProgramInfo::from_pin(&prog_path).map(|i| i.tag()).ok();
                let our_tag = dp.program()?.info().map_err(DataplaneError::Verify)?.tag();
                let kept_program = if pinned_tag == Some(our_tag) {
                    Some(Xdp::from_pin(&prog_path, XdpAttachType::Interface).map_err(DataplaneError::Verify)?)
                } else {
                    None
                };
                let adoption = Adoption::Adopted {
                    since_s: record.pinned_at_s,
                    last_pid: record.agent_pid,
                    stopped_s: record.agent_stopped_s,
                    policy: record.policy_text(),
                    same_program: kept_program.is_some(),
                };
                let replace_program = kept_program.is_none();
                (
                    dp,
                    Pinned {
                        dir,
                        record_maps: *record_maps,
                        record,
                        kept_program,
                        replace_program,
                        upgrade: None,
                        adoption,
                    },
                )
            }
            Found::Other(reason) => {
                let upgrade = Upgrade::read(&dir, reason.clone());
                let dp = Self::load_with(options, MapPins::Stage(dir.root()))?;
                let staged = |p: &Path| {
                    p.with_file_name(format!("{}{STAGED}", p.file_name().unwrap_or_default().to_string_lossy()))
                };
                let record_maps = MetaMaps::create_pinned(&staged(&meta_path), &staged(&ids_path))
                    .map_err(map_err("META", "creating"))?;
                let pinned = Pinned {
                    dir,
                    record_maps,
                    record: Meta::new(stamp),
                    kept_program: None,
                    replace_program: true,
                    upgrade: Some(upgrade),
                    adoption: Adoption::Upgraded { reason },
                };
                (dp, pinned)
            }
        };
        let mut pinned = pinned;
        pinned.record.agent_pid = std::process::id();
        pinned.record.agent_started_s = unix_now();
        pinned.record.agent_stopped_s = 0;
        pinned.record_maps.write(&pinned.record).map_err(map_err("META", "writing"))?;
        dp.pinned = Some(pinned);
        Ok(dp)
    }

    /// What [`Self::open_pinned`] found (`None` for an unpinned data path).
    pub fn adoption(&self) -> Option<&Adoption> {
        self.pinned.as_ref().map(|p| &p.adoption)
    }

    /// Takes the state of adopted maps: the active set, what each set holds, the rule ids.
    fn restore(&mut self, record_maps: &MetaMaps, record: &Meta) -> Result<()> {
        let config = self.config.get(&0, 0).map_err(map_err(names::CONFIG, "reading"))?;
        self.active_set = (config.active_set & 1) as u8;
        for set in 0..2u8 {
            self.written[usize::from(set)] = Some(self.scan_set(set));
        }
        // The adopted active set's lists: rewriting CONFIG with "empty" flags before the policy
        // flip would let a denied source past the deny list it still holds.
        self.list_flags = self.written[usize::from(self.active_set)].as_ref().map_or(0, SetEntries::list_flags);
        self.block_empty = self.block.keys().next().is_none();
        let entries = record_maps.ids(record.rule_ids_next).map_err(map_err("RULE_IDS", "reading"))?;
        let mut ids = Vec::new();
        for (id, e) in entries {
            let state = match e.state {
                id_state::LIVE => {
                    self.names.insert(id, e.name());
                    IdState::Live(e.fingerprint)
                }
                id_state::HELD => IdState::Held,
                _ => IdState::Free,
            };
            ids.push((id, state));
        }
        self.ids = RuleIds::restore(record.rule_ids_next, &ids);
        Ok(())
    }

    /// The entries a policy set holds in adopted maps (what the next write into it deletes).
    fn scan_set(&self, set: u8) -> SetEntries {
        let set_be = u32::from(set).to_be();
        let lpm = |trie: &aya::maps::LpmTrie<MapData, ListKey, ListValue>| -> Vec<(u32, ListKey, ListValue)> {
            trie.keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.data().set_be == set_be)
                .map(|k| (k.prefix_len(), k.data(), ListValue::default()))
                .collect()
        };
        let hosts = |hash: &HashMap<MapData, Key<ListKey>, ListValue>| -> Vec<(u32, ListKey, ListValue)> {
            hash.keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.data().set_be == set_be)
                .map(|k| (LIST_HOST_PREFIX, k.data(), ListValue::default()))
                .collect()
        };
        let (mut allow, mut deny) = (lpm(&self.allow), lpm(&self.deny));
        allow.extend(hosts(&self.allow_hosts));
        deny.extend(hosts(&self.deny_hosts));
        SetEntries {
            ports: self
                .port_rules
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.set == set)
                .map(|k| (k, PortRules::default()))
                .collect(),
            allow,
            deny,
            ..SetEntries::default()
        }
    }

    /// Records the rule ids and the policy in force (after an apply).
    pub(super) fn persist(&mut self, plan: &KernelPlan) {
        let Some(p) = self.pinned.as_mut() else { return };
        let (next, ids) = self.ids.export();
        let mut failed = None;
        for (id, state) in ids {
            let entry = match state {
                IdState::Live(fp) => {
                    RuleIdEntry::new(id_state::LIVE, fp, self.names.get(&id).map_or("", String::as_str))
                }
                IdState::Held => RuleIdEntry::new(id_state::HELD, 0, ""),
                IdState::Free => RuleIdEntry::new(id_state::FREE, 0, ""),
            };
            if let Err(e) = p.record_maps.rule_ids.set(id, entry, 0) {
                failed = Some(e);
            }
        }
        p.record.rule_ids_next = next;
        p.record.kernel_rules = plan.rules.len() as u32;
        p.record.policy_digest = super::entries::fingerprints(plan)
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, f| (h ^ f).wrapping_mul(0x0000_0100_0000_01b3));
        p.record.set_policy_text(&policy_text(plan));
        if let Err(e) = p.record_maps.write(&p.record) {
            failed = Some(e);
        }
        if let Some(e) = failed {
            warn!(
                "recording the rule ids in {}: {e} (the next agent may give some rules fresh buckets)",
                p.dir.root().display()
            );
        }
    }

    /// After the first apply of an upgrade: copies the block list and the buckets of rules
    /// that did not change into the fresh maps, just before the links switch to them. Returns
    /// the one line that says what was carried and what was reset.
    pub fn carry_over(&mut self) -> Result<Option<String>> {
        let Some(up) = self.pinned.as_mut().and_then(|p| p.upgrade.take()) else { return Ok(None) };
        let now = boot_time_ns();
        let mut reset = vec!["counters"];
        let mut blocked = 0;
        match &up.block {
            Some(old) => {
                for (k, v) in old.iter().filter_map(|e| e.ok()).filter(|(_, v)| v.expires_at_ns > now) {
                    self.block.insert(k, v, 0).map_err(map_err(names::BLOCK, "carrying over"))?;
                    blocked += 1;
                    self.block_empty = false;
                }
            }
            None => reset.push("block list (unreadable)"),
        }
        if blocked > 0 {
            // The fresh CONFIG was written with an empty block list.
            self.write_config()?;
        }
        let moved: StdHashMap<u32, u32> =
            up.ids.iter().filter_map(|(old, fp)| self.ids.id_of(*fp).map(|new| (*old, new))).collect();
        let mut buckets = 0;
        if let Some(old) = &up.shared {
            for (mut k, v) in old.iter().filter_map(|e| e.ok()) {
                if let Some(&id) = moved.get(&k.rule_id) {
                    k.rule_id = id;
                    self.shared_buckets.insert(k, v, 0).map_err(map_err(names::SHARED_BUCKETS, "carrying over"))?;
                    buckets += 1;
                }
            }
        }
        if let Some(old) = &up.sources {
            for (mut k, v) in old.iter().filter_map(|e| e.ok()) {
                if let Some(&id) = moved.get(&k.rule_id) {
                    k.rule_id = id;
                    // LRU: a full table evicts, which only hands some source a full bucket.
                    let _ = self.source_buckets.insert(k, v, 0);
                    buckets += 1;
                }
            }
        }
        if up.shared.is_none() || up.sources.is_none() || up.ids.is_empty() {
            reset.push("buckets (unreadable)");
        }
        let changed = self.names.len().saturating_sub(moved.len());
        if changed > 0 {
            reset.push("buckets of new or changed rules");
        }
        let dir = self.pinned.as_ref().map(|p| p.dir.root().display().to_string()).unwrap_or_default();
        Ok(Some(format!(
            "upgraded the shield in {dir} ({}): new program and fresh maps swapped in with one link update per interface; \
             carried over {blocked} block-list entries and {buckets} buckets of {} unchanged rules; reset: {}",
            up.reason,
            moved.len(),
            reset.join(", ")
        )))
    }

    /// Attaches to `iface` through its pinned link: a live pinned link is kept (its program
    /// replaced in place when this agent's differs), else a new link is attached and pinned.
    pub(super) fn attach_pinned(&mut self, iface: &str, mode: AttachMode) -> Result<&'static str> {
        let ifindex = sys::ifindex(iface);
        let (existing, replace) = {
            let p = self.pinned.as_ref().ok_or(DataplaneError::MissingMap { name: "pin directory" })?;
            (p.dir.links()?.into_iter().find(|l| l.iface == iface), p.kept_program.is_none())
        };
        if let Some(link) = existing {
            match sys::xdp_link(&link.path) {
                Ok(state) if state.ifindex == ifindex && ifindex != 0 => {
                    if mode != AttachMode::Auto && mode.label() != Some(link.mode.as_str()) {
                        warn!("{iface}: the pinned link runs in {} mode; detach to change it", link.mode);
                    }
                    if replace {
                        let err = |action: &'static str| {
                            let iface = iface.to_owned();
                            move |e: String| DataplaneError::Link { iface, action, detail: e }
                        };
                        let pinned = PinnedLink::from_pin(&link.path).map_err(|e| err("opening")(e.to_string()))?;
                        let xdp = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| err("opening")(e.to_string()))?;
                        self.program()?
                            .attach_to_link(xdp)
                            .map_err(|e| err("replacing its program (bpf_link_update)")(e.to_string()))?;
                        info!("{iface}: kept its pinned link; program replaced in place (bpf_link_update)");
                    } else {
                        info!("{iface}: kept its pinned link and program");
                    }
                    return Ok(if link.mode == "generic" { "generic" } else { "native" });
                }
                Ok(state) => warn!(
                    "{iface}: the pinned link {} points at interface index {} (now {ifindex}): the interface was recreated; attaching anew",
                    link.path.display(),
                    state.ifindex
                ),
                Err(e) => warn!("{iface}: the pinned link {} is unusable ({e}); attaching anew", link.path.display()),
            }
            let _ = std::fs::remove_file(&link.path);
        }
        let (label, id) = self.attach_link(iface, mode)?;
        let err = |action: &'static str| {
            let iface = iface.to_owned();
            move |e: String| DataplaneError::Link { iface, action, detail: e }
        };
        let link = self.program()?.take_link(id).map_err(|e| err("taking the link")(e.to_string()))?;
        let fd = FdLink::try_from(link).map_err(|_| {
            err("pinning")(
                "attached through netlink, not a bpf_link: this kernel cannot pin XDP links (needs 5.9)".into(),
            )
        })?;
        let path = self.pinned.as_ref().map(|p| p.dir.link_path(iface, label)).unwrap_or_default();
        fd.pin(&path).map_err(|e| err("pinning")(e.to_string()))?;
        Ok(label)
    }

    /// Once every interface is attached: pins left for interfaces no longer shielded are
    /// removed, an upgrade's staged maps replace the old pins, this agent's program replaces
    /// the pinned one, and the record names this agent.
    pub fn commit_pins(&mut self, ifaces: &[String]) -> Result<()> {
        let Some(p) = self.pinned.as_ref() else { return Ok(()) };
        for link in p.dir.links()?.into_iter().filter(|l| !ifaces.contains(&l.iface)) {
            match std::fs::remove_file(&link.path) {
                Ok(()) => info!("{}: no longer in --iface: detached (its pinned link removed)", link.iface),
                Err(e) => warn!("{}: removing its pinned link {}: {e}", link.iface, link.path.display()),
            }
            if let Err(e) = p.dir.remove_marker(&link.iface) {
                warn!("{}: {e}", link.iface);
            }
        }
        let upgraded = matches!(p.adoption, Adoption::Upgraded { .. });
        let root = p.dir.root().to_owned();
        let rename = |name: &str| -> Result<()> {
            let from = root.join(format!("{name}{STAGED}"));
            let to = root.join(name);
            std::fs::rename(&from, &to).map_err(|source| {
                DataplaneError::Pin(super::pin::PinError::Io { path: to, action: "replacing the pin", source })
            })
        };
        if upgraded {
            for spec in SHARED_MAPS {
                rename(spec.name)?;
            }
            rename(super::pin::META_PIN)?;
            rename(super::pin::RULE_IDS_PIN)?;
        }
        if p.replace_program {
            let staged = root.join(format!("{PROGRAM_PIN}{STAGED}"));
            self.program()?.pin(&staged).map_err(DataplaneError::ProgramPin)?;
            rename(PROGRAM_PIN)?;
            if let Some(p) = self.pinned.as_mut() {
                p.replace_program = false;
            }
        }
        Ok(())
    }

    /// Leaves the shield in force: the links, the program and the maps stay pinned, and the
    /// record says when this agent stopped. Dropping the returned value closes this
    /// process's handles.
    pub fn leave(mut self) {
        if let Some(p) = self.pinned.as_mut() {
            p.record.agent_stopped_s = unix_now();
            if let Err(e) = p.record_maps.write(&p.record) {
                warn!("recording the stop in {}: {e}", p.dir.root().display());
            }
            info!(
                "leaving the shield in force: pinned in {} (remove it with `limiter-agent detach --pin-dir {}`)",
                p.dir.root().display(),
                p.dir.root().display()
            );
        }
    }

    /// Detaches from every interface and removes every pin (`--detach-on-exit`).
    pub fn remove_pins(mut self) -> Result<String> {
        let Some(mut p) = self.pinned.take() else { return Ok(String::new()) };
        p.kept_program = None;
        // This process's handles first: the links must have no holder but their pins.
        drop(self);
        let Pinned { dir, .. } = p;
        Ok(dir.remove(&[])?)
    }
}

impl Upgrade {
    fn read(dir: &PinDir, reason: String) -> Self {
        let ids = {
            let (meta, ids) = dir.meta_paths();
            MetaMaps::open(&meta, &ids)
                .ok()
                .and_then(|m| {
                    let record = m.read().ok().flatten()?;
                    m.ids(record.rule_ids_next).ok()
                })
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, e)| e.state == id_state::LIVE)
                .map(|(id, e)| (id, e.fingerprint))
                .collect()
        };
        Self {
            reason,
            block: hash_from_pin(&dir.join(names::BLOCK)),
            shared: hash_from_pin(&dir.join(names::SHARED_BUCKETS)),
            sources: hash_from_pin(&dir.join(names::SOURCE_BUCKETS)),
            ids,
        }
    }
}

/// The policies of `plan`'s rules (`policy/rule` names), for the record.
fn policy_text(plan: &KernelPlan) -> String {
    let mut policies: Vec<&str> = plan.rules.iter().map(|r| r.name.split('/').next().unwrap_or(&r.name)).collect();
    policies.dedup();
    policies.sort_unstable();
    policies.dedup();
    let mut text = if policies.is_empty() { "no kernel rules".to_owned() } else { policies.join(", ") };
    text.push_str(&format!(
        " ({} kernel rules, {} allow, {} deny)",
        plan.rules.len(),
        plan.allow.len(),
        plan.deny.len()
    ));
    text
}
