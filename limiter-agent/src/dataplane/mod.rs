//! The XDP data path seen from userspace: load, attach, apply plans, read counters.
//!
//! [`Dataplane`] is the only owner of the `Ebpf` object; it takes every map out once, into
//! typed wrappers, and adds context to each aya error.

mod block;
mod entries;
mod fragments;
mod global_sources;
pub use global_sources::SourceCount;
mod observe;
use observe::{count_blocked, read_stats, read_top};
pub mod pin;
mod pinned;
mod synproxy;
pub use synproxy::{SynproxyHost, wscale_for};
mod shares;

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues, lpm_trie::Key},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId},
    util::nr_cpus,
};
pub use entries::{IdState, PlanError, RuleIds, SetEntries, fingerprints, layout, list_entry, mapped};
use limiter_common::{
    Addr, BlockEntry, Bucket, Config, Counter, LIST_HOST_PREFIX, ListKey, ListValue, MAX_RULES, ParseRecord, PortKey,
    PortRules, RuleConfig, RuleCounter, SharedBucketKey, SourceBucketKey, XDP_DROP, XDP_PASS, names,
};
use log::{info, warn};
pub use observe::{PinnedView, Stats};
pub use pinned::Adoption;

use crate::plan::KernelPlan;

/// The compiled XDP object, built by `build.rs` from `limiter-ebpf`.
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/limiter"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object into the kernel: {0} (are you root, with bpffs mounted?)")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel rejected the XDP program: {0}")]
    Verify(#[source] ProgramError),
    #[error("map {name} is missing from the XDP object (agent and program out of sync?)")]
    MissingMap { name: &'static str },
    #[error("map {name}: {action}: {source}")]
    Map { name: &'static str, action: &'static str, source: MapError },
    #[error("attaching XDP to {iface} in {mode} mode: {source}")]
    Attach { iface: String, mode: &'static str, source: ProgramError },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("BPF_PROG_TEST_RUN: {0}")]
    TestRun(#[source] ProgramError),
    #[error("reading the per-CPU count: {0}")]
    Cpus(String),
    #[error(transparent)]
    Pin(#[from] pin::PinError),
    #[error("pinning the XDP program: {0}")]
    ProgramPin(#[source] aya::pin::PinError),
    #[error("SYN proxy: {0}")]
    Synproxy(String),
    #[error("rule {rule} of the plan in force has no id (agent state out of sync; reload the policy)")]
    NoRuleId { rule: String },
    #[error("the XDP link of {iface}: {action}: {detail}")]
    Link { iface: String, action: &'static str, detail: String },
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

fn map_err(name: &'static str, action: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, action, source }
}

/// How to attach: `auto` tries native (driver) mode and falls back to generic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    Native,
    Generic,
    #[default]
    Auto,
}

impl AttachMode {
    /// The mode's name, as `attach` reports it (`None` for `auto`).
    pub fn label(self) -> Option<&'static str> {
        match self {
            Self::Native => Some("native"),
            Self::Generic => Some("generic"),
            Self::Auto => None,
        }
    }
}

/// Where the maps of a load come from.
#[derive(Clone, Copy)]
enum MapPins<'a> {
    /// Fresh maps, not pinned.
    None,
    /// The maps pinned in this directory, by name; created and pinned there if missing.
    Reuse(&'a std::path::Path),
    /// Fresh maps, pinned in this directory under staged names (an upgrade).
    Stage(&'a std::path::Path),
}

/// Load-time settings that size maps or set program-wide behaviour.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Capacity of the per-source bucket table (LRU). Every (rule, source[, port]) takes one
    /// entry of 24 + 8 bytes plus the kernel's per-entry overhead.
    pub source_entries: u32,
    /// IPv6 sources are bucketed by this prefix length.
    pub ipv6_source_prefix: u8,
    /// Verdict for frames the parser cannot follow.
    pub drop_unparsed: bool,
    /// Emit aya-log records for drops.
    pub debug_log: bool,
    /// Have the program write what it parsed from every frame into `PARSE_RECORD`
    /// ([`Dataplane::test_run_recorded`]); for tests and the fuzzer, it costs per packet.
    pub record_parse: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            source_entries: limiter_common::DEFAULT_SOURCE_ENTRIES,
            ipv6_source_prefix: 64,
            drop_unparsed: false,
            debug_log: false,
            record_parse: false,
        }
    }
}

/// Summary of an applied plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub set: u8,
    pub rules: usize,
    pub rule_slots: usize,
    pub port_lists: usize,
    pub allow: usize,
    pub deny: usize,
    /// Rules whose bucket state was kept from the previous plan.
    pub kept: usize,
}

/// The loaded XDP program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    config: Array<MapData, Config>,
    allow: LpmTrie<MapData, ListKey, ListValue>,
    deny: LpmTrie<MapData, ListKey, ListValue>,
    allow_hosts: HashMap<MapData, Key<ListKey>, ListValue>,
    deny_hosts: HashMap<MapData, Key<ListKey>, ListValue>,
    block: HashMap<MapData, Addr, BlockEntry>,
    port_rules: HashMap<MapData, PortKey, PortRules>,
    rules: Array<MapData, RuleConfig>,
    shared_buckets: HashMap<MapData, SharedBucketKey, Bucket>,
    /// An LRU hash in the kernel; aya's `HashMap` serves both kinds.
    source_buckets: HashMap<MapData, SourceBucketKey, Bucket>,
    stats: PerCpuArray<MapData, Counter>,
    rule_stats: PerCpuArray<MapData, RuleCounter>,
    /// LRU per-CPU hash in the kernel: drops per source, for the "top limited sources" view.
    dropped_sources: PerCpuHashMap<MapData, Addr, Counter>,
    /// LRU per-CPU hash in the kernel: admitted tokens of global per-source rules.
    global_sources: PerCpuHashMap<MapData, SourceBucketKey, u64>,
    parse_record: PerCpuArray<MapData, ParseRecord>,
    synproxy: synproxy::SynproxyMaps,
    /// Must outlive the program: it owns the log map (see TOOLCHAIN.md).
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ids: RuleIds,
    /// Entries written into each set, so the next write into it can delete them first.
    written: [Option<SetEntries>; 2],
    active_set: u8,
    /// `CONFIG_FLAG_NO_ALLOW` / `CONFIG_FLAG_NO_DENY` for the active set: written with it.
    list_flags: u32,
    /// The block list holds no entry (`CONFIG_FLAG_NO_BLOCK`).
    block_empty: bool,
    names: BTreeMap<u32, String>,
    /// The plan in force as given (global rules at their policy limit: their identity).
    current: Option<KernelPlan>,
    /// This node's shares of `global` rules, by rule name: the limit their buckets enforce
    /// instead of the policy's (see [`Dataplane::set_shares`]).
    shares: BTreeMap<String, crate::plan::Limit>,
    options: LoadOptions,
    /// The pin directory and its record, when the data path is pinned.
    pinned: Option<pinned::Pinned>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DataplaneError::MissingMap { name })?;
    T::try_from(map).map_err(map_err(name, "opening"))
}

impl Dataplane {
    /// Loads and verifies the program (not attached yet) with an empty policy, with maps of
    /// its own: nothing is pinned, and dropping the `Dataplane` detaches and unloads it all.
    /// [`Self::open_pinned`] is the pinned variant.
    pub fn load(options: LoadOptions) -> Result<Self> {
        Self::load_with(options, MapPins::None)
    }

    fn load_with(options: LoadOptions, pins: MapPins<'_>) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::SOURCE_BUCKETS, options.source_entries.max(1));
        if let MapPins::Reuse(dir) = pins {
            for spec in limiter_common::layout::SHARED_MAPS {
                loader.map_pin_path(spec.name, dir.join(spec.name));
            }
        }
        let mut ebpf = loader.load(XDP_OBJECT).map_err(DataplaneError::Load)?;
        let logger = if options.debug_log {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(l) => Some(l),
                Err(e) => {
                    warn!("debug logging requested but unavailable: {e}");
                    None
                }
            }
        } else {
            None
        };
        let program: &mut Xdp = ebpf
            .program_mut(names::PROGRAM)
            .ok_or(DataplaneError::MissingMap { name: names::PROGRAM })?
            .try_into()
            .map_err(DataplaneError::Verify)?;
        program.load().map_err(DataplaneError::Verify)?;
        synproxy::load_program(&mut ebpf)?;
        synproxy::load_marker(&mut ebpf)?;
        if let MapPins::Stage(dir) = pins {
            for spec in limiter_common::layout::SHARED_MAPS {
                let map = ebpf.map(spec.name).ok_or(DataplaneError::MissingMap { name: spec.name })?;
                map.pin(dir.join(format!("{}{}", spec.name, pin::STAGED))).map_err(|error| DataplaneError::Map {
                    name: spec.name,
                    action: "pinning",
                    source: MapError::PinError { name: None, error },
                })?;
            }
        }
        let mut dp = Self {
            config: take(&mut ebpf, names::CONFIG)?,
            allow: take(&mut ebpf, names::ALLOW)?,
            deny: take(&mut ebpf, names::DENY)?,
            allow_hosts: take(&mut ebpf, names::ALLOW_HOSTS)?,
            deny_hosts: take(&mut ebpf, names::DENY_HOSTS)?,
            block: take(&mut ebpf, names::BLOCK)?,
            port_rules: take(&mut ebpf, names::PORT_RULES)?,
            rules: take(&mut ebpf, names::RULES)?,
            shared_buckets: take(&mut ebpf, names::SHARED_BUCKETS)?,
            source_buckets: take(&mut ebpf, names::SOURCE_BUCKETS)?,
            stats: take(&mut ebpf, names::STATS)?,
            rule_stats: take(&mut ebpf, names::RULE_STATS)?,
            dropped_sources: take(&mut ebpf, names::DROPPED_SOURCES)?,
            global_sources: take(&mut ebpf, names::GLOBAL_SOURCE_COUNTS)?,
            parse_record: take(&mut ebpf, names::PARSE_RECORD)?,
            synproxy: synproxy::SynproxyMaps::take(&mut ebpf)?,
            ebpf,
            logger,
            ids: RuleIds::default(),
            written: [None, None],
            active_set: 0,
            list_flags: SetEntries::default().list_flags(),
            block_empty: true,
            names: BTreeMap::new(),
            current: None,
            shares: BTreeMap::new(),
            options,
            pinned: None,
        };
        if !matches!(pins, MapPins::Reuse(_)) {
            dp.write_config()?;
        }
        Ok(dp)
    }

    fn write_config(&mut self) -> Result<()> {
        let config = Config {
            active_set: u32::from(self.active_set),
            ipv6_source_prefix: u32::from(self.options.ipv6_source_prefix),
            unparsed_verdict: if self.options.drop_unparsed { XDP_DROP } else { XDP_PASS },
            flags: if self.options.debug_log { limiter_common::CONFIG_FLAG_DEBUG_LOG } else { 0 }
                | if self.options.record_parse { limiter_common::CONFIG_FLAG_RECORD_PARSE } else { 0 }
                | self.list_flags
                | if self.block_empty { limiter_common::CONFIG_FLAG_NO_BLOCK } else { 0 }
                | if self.synproxy.any_in_set(self.active_set) {
                    limiter_common::synproxy::CONFIG_FLAG_SYNPROXY
                } else {
                    0
                },
        };
        self.config.set(0, config, 0).map_err(map_err(names::CONFIG, "writing"))
    }

    fn program(&mut self) -> Result<&mut Xdp> {
        if let Some(kept) = self.pinned.as_mut().and_then(|p| p.kept_program.as_mut()) {
            return Ok(kept);
        }
        self.ebpf
            .program_mut(names::PROGRAM)
            .ok_or(DataplaneError::MissingMap { name: names::PROGRAM })?
            .try_into()
            .map_err(DataplaneError::Verify)
    }

    /// Attaches to `iface` (in the calling thread's network namespace). Returns the mode
    /// used. Unpinned, the link is detached when the `Dataplane` is dropped; pinned, it goes
    /// through the pinned link of `iface` (see [`Self::open_pinned`]).
    ///
    /// With the XDP program goes the SYN proxy's TC-ingress marker (see
    /// [`synproxy::attach_marker`]); it costs one array lookup per packet while no port is
    /// proxied.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<&'static str> {
        let label = if self.pinned.is_some() {
            self.attach_pinned(iface, mode)?
        } else {
            self.attach_link(iface, mode).map(|(label, _)| label)?
        };
        let pin = self.pinned.as_ref().map(|p| p.dir.marker_path(iface));
        synproxy::attach_marker(&mut self.ebpf, iface, pin.as_deref())?;
        Ok(label)
    }

    fn attach_link(&mut self, iface: &str, mode: AttachMode) -> Result<(&'static str, XdpLinkId)> {
        let program = self.program()?;
        let try_mode = |program: &mut Xdp, m: XdpMode, label: &'static str| {
            program.attach(iface, m).map(|id| (label, id)).map_err(|source| DataplaneError::Attach {
                iface: iface.to_owned(),
                mode: label,
                source,
            })
        };
        match mode {
            AttachMode::Native => try_mode(program, XdpMode::Driver, "native"),
            AttachMode::Generic => try_mode(program, XdpMode::Skb, "generic"),
            AttachMode::Auto => match try_mode(program, XdpMode::Driver, "native") {
                Ok(attached) => Ok(attached),
                Err(e) => {
                    warn!(
                        "{e}; falling back to generic (skb) mode, which runs after the kernel allocates an skb and costs more per packet"
                    );
                    try_mode(program, XdpMode::Skb, "generic")
                }
            },
        }
    }

    /// The plan currently enforced, if any, as given: `global` rules at their policy limit
    /// ([`Self::shares`] holds what their buckets enforce).
    pub fn current_plan(&self) -> Option<&KernelPlan> {
        self.current.as_ref()
    }

    /// Applies `plan` atomically: writes it into the inactive policy set, then flips the set
    /// the program reads with one store. Buckets of rules that did not change are kept; on
    /// error nothing the program reads has changed. `global` rules named in the shares in
    /// force ([`Self::set_shares`]) enforce their share; their identity (and so whether they
    /// keep their buckets) is that of the policy's limit.
    pub fn apply(&mut self, plan: &KernelPlan) -> Result<Applied> {
        let target = 1 - self.active_set;
        // Lay out first: a plan that does not fit fails before any map is touched. Ids are
        // assigned on a copy and committed only once the flip has happened.
        let mut ids = self.ids.clone();
        let (rule_ids, retired) = ids.assign(plan)?;
        let entries = layout(&shares::with_shares(plan, &self.shares), target, &rule_ids)?;
        let kept = rule_ids.iter().filter(|id| self.names.contains_key(id)).count();

        self.clear_set(target)?;
        // Remember what goes into the inactive set before writing it: if a write fails
        // half-way, the next apply still deletes every entry this one may have written.
        self.written[usize::from(target)] = Some(entries.clone());
        for (slot, config) in &entries.rules {
            self.rules
                .set(u32::from(target) * MAX_RULES + slot, config, 0)
                .map_err(map_err(names::RULES, "writing a rule"))?;
        }
        for (key, list) in &entries.ports {
            self.port_rules.insert(key, list, 0).map_err(map_err(names::PORT_RULES, "writing a port list"))?;
        }
        for (prefix, key, value) in &entries.allow {
            if *prefix == LIST_HOST_PREFIX {
                self.allow_hosts
                    .insert(Key::new(*prefix, *key), value, 0)
                    .map_err(map_err(names::ALLOW_HOSTS, "inserting"))?;
            } else {
                self.allow.insert(&Key::new(*prefix, *key), value, 0).map_err(map_err(names::ALLOW, "inserting"))?;
            }
        }
        for (prefix, key, value) in &entries.deny {
            if *prefix == LIST_HOST_PREFIX {
                self.deny_hosts
                    .insert(Key::new(*prefix, *key), value, 0)
                    .map_err(map_err(names::DENY_HOSTS, "inserting"))?;
            } else {
                self.deny.insert(&Key::new(*prefix, *key), value, 0).map_err(map_err(names::DENY, "inserting"))?;
            }
        }
        self.synproxy.write_set(target, plan)?;
        // netfilter's half first: from the flip on, ACKs with cookies need it.
        let old_ports = self.current.as_ref().map(synproxy::ports);
        let new_ports = synproxy::ports(plan);
        if !new_ports.is_empty() && old_ports.as_ref() != Some(&new_ports) {
            crate::synproxy::apply(&new_ports, self.synproxy.host)
                .map_err(|e| DataplaneError::Synproxy(format!("installing the netfilter half: {e}")))?;
        }
        // Fresh ids must start with empty counters.
        let fresh: Vec<u32> = rule_ids.iter().copied().filter(|id| !self.names.contains_key(id)).collect();
        for id in fresh {
            self.reset_rule_stats(id)?;
        }

        // The flip: from here on every packet is judged by the new set.
        self.active_set = target;
        self.list_flags = entries.list_flags();
        self.write_config()?;

        let applied = Applied {
            set: target,
            rules: plan.rules.len(),
            rule_slots: entries.rules.len(),
            port_lists: entries.ports.len(),
            allow: entries.allow.len(),
            deny: entries.deny.len(),
            kept,
        };
        if new_ports.is_empty() && old_ports.is_some_and(|p| !p.is_empty()) {
            // The program no longer answers cookies; the handshakes it answered in the last
            // moments cannot complete any more, as when a NIC's SYN cookies stop.
            if let Err(e) = crate::synproxy::remove() {
                warn!("SYN proxy: removing the netfilter half: {e}");
            }
        }
        self.names = entries.names;
        self.current = Some(plan.clone());
        self.ids = ids;
        // Retired rules: purge their buckets, and again those of the ids the previous apply
        // retired, which only then become reusable (`RuleIds::release` says why).
        let mut purge = retired.clone();
        purge.extend_from_slice(self.ids.held());
        self.purge_buckets(&purge)?;
        self.ids.release(&retired);
        self.persist(plan);
        Ok(applied)
    }

    /// Deletes what an earlier apply wrote into `set` (inactive now).
    fn clear_set(&mut self, set: u8) -> Result<()> {
        let Some(old) = self.written[usize::from(set)].take() else { return Ok(()) };
        for (key, _) in &old.ports {
            ignore_missing(self.port_rules.remove(key)).map_err(map_err(names::PORT_RULES, "removing"))?;
        }
        for (prefix, key, _) in &old.allow {
            if *prefix == LIST_HOST_PREFIX {
                ignore_missing(self.allow_hosts.remove(&Key::new(*prefix, *key)))
                    .map_err(map_err(names::ALLOW_HOSTS, "removing"))?;
            } else {
                ignore_missing(self.allow.remove(&Key::new(*prefix, *key)))
                    .map_err(map_err(names::ALLOW, "removing"))?;
            }
        }
        for (prefix, key, _) in &old.deny {
            if *prefix == LIST_HOST_PREFIX {
                ignore_missing(self.deny_hosts.remove(&Key::new(*prefix, *key)))
                    .map_err(map_err(names::DENY_HOSTS, "removing"))?;
            } else {
                ignore_missing(self.deny.remove(&Key::new(*prefix, *key))).map_err(map_err(names::DENY, "removing"))?;
            }
        }
        // RULES slots are overwritten, not deleted (array).
        Ok(())
    }

    fn purge_buckets(&mut self, retired: &[u32]) -> Result<()> {
        if retired.is_empty() {
            return Ok(());
        }
        let shared: Vec<SharedBucketKey> =
            self.shared_buckets.keys().filter_map(|k| k.ok()).filter(|k| retired.contains(&k.rule_id)).collect();
        for k in shared {
            ignore_missing(self.shared_buckets.remove(&k)).map_err(map_err(names::SHARED_BUCKETS, "removing"))?;
        }
        let sources: Vec<SourceBucketKey> =
            self.source_buckets.keys().filter_map(|k| k.ok()).filter(|k| retired.contains(&k.rule_id)).collect();
        for k in sources {
            ignore_missing(self.source_buckets.remove(&k)).map_err(map_err(names::SOURCE_BUCKETS, "removing"))?;
        }
        Ok(())
    }

    fn reset_rule_stats(&mut self, id: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e.to_string()))?;
        let zeros = PerCpuValues::try_from(vec![RuleCounter::default(); cpus])
            .map_err(|e| DataplaneError::Cpus(e.to_string()))?;
        self.rule_stats.set(id, zeros, 0).map_err(map_err(names::RULE_STATS, "resetting"))
    }

    /// Counters summed over CPUs.
    pub fn stats(&self) -> Result<Stats> {
        read_stats(&self.stats, &self.rule_stats, &self.names)
    }

    /// The SYN proxy's counters summed over CPUs, indexed by
    /// `limiter_common::synproxy::event`.
    pub fn synproxy_stats(&self) -> Result<Vec<Counter>> {
        self.synproxy.stats()
    }

    /// What the proxy's SYN-ACKs announce (and the nftables `synproxy` statement must match).
    pub fn synproxy_host(&self) -> SynproxyHost {
        self.synproxy.host
    }

    /// Tracked per-source bucket entries (walks the LRU table: O(entries), about a
    /// microsecond each; sample it, don't poll it per packet-second).
    pub fn tracked_sources(&self) -> usize {
        self.source_buckets.keys().filter(|k| k.is_ok()).count()
    }

    /// Sources in the block list whose block has not expired yet (walks the list; it holds
    /// only escalated sources, so it is small).
    pub fn blocked_sources(&self) -> usize {
        count_blocked(&self.block)
    }

    /// Capacity of the per-source bucket table.
    pub fn source_capacity(&self) -> u32 {
        self.options.source_entries
    }

    /// The `n` sources with the most dropped packets (IPv6 by source prefix), summed over
    /// CPUs. Approximate for sources that were new during a flood (see
    /// `DROPPED_SOURCE_SAMPLE`); exact once a source is tracked.
    pub fn top_dropped_sources(&self, n: usize) -> Result<Vec<(IpAddr, Counter)>> {
        read_top(&self.dropped_sources, n)
    }

    /// Runs the program once on `frame` through `BPF_PROG_TEST_RUN` (no interface needed)
    /// and returns its verdict (`XDP_PASS`, `XDP_DROP`...). Maps are shared with live
    /// traffic, so counters and buckets move exactly as for a real packet.
    pub fn test_run(&mut self, frame: &[u8]) -> Result<u32> {
        self.test_run_repeat(frame, 1).map(|(verdict, _)| verdict)
    }

    /// Like [`Self::test_run`], `repeat` times in the kernel; also returns the kernel's mean
    /// duration per run (for benchmarks only).
    pub fn test_run_repeat(&mut self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let program = self.program()?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat.max(1);
        let result = program.test_run(opts).map_err(DataplaneError::TestRun)?;
        Ok((result.return_value, result.duration))
    }

    /// Runs the SYN proxy's TC-ingress marker on `frame` (see [`Self::test_run_repeat`]):
    /// the `skb->mark` it leaves (`SYNPROXY_ESTABLISHED_MARK` or 0) and the mean duration.
    pub fn marker_test_run(&mut self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        synproxy::marker_test_run(&mut self.ebpf, frame, repeat)
    }

    /// The loaded program's file descriptor, for benchmarks that run it behind another
    /// program (a tail call from a harness that varies the frame per run). Valid while `self` lives.
    pub fn program_fd(&mut self) -> Result<std::os::fd::RawFd> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = self.program()?.fd().map_err(DataplaneError::Verify)?;
        Ok(fd.as_fd().as_raw_fd())
    }

    /// The slots of `PARSE_RECORD`, one per possible CPU (see [`ParseRecord`]).
    pub fn parse_records(&self) -> Result<Vec<ParseRecord>> {
        let per_cpu = self.parse_record.get(&0, 0).map_err(map_err(names::PARSE_RECORD, "reading"))?;
        Ok(per_cpu.iter().copied().collect())
    }

    /// Runs `frame` once like [`Self::test_run`] and returns, with the verdict, what the
    /// program parsed from it: the `PARSE_RECORD` slot whose sequence number moved. `None`
    /// when no slot moved (the program was loaded without [`LoadOptions::record_parse`]).
    pub fn test_run_recorded(&mut self, frame: &[u8]) -> Result<(u32, Option<ParseRecord>)> {
        let before = self.parse_records()?;
        let verdict = self.test_run(frame)?;
        let after = self.parse_records()?;
        let record = after.iter().zip(&before).find(|(a, b)| a.seq != b.seq).map(|(a, _)| *a);
        Ok((verdict, record))
    }

    /// Forwards the program's aya-log records (only when loaded with `debug_log`).
    pub fn flush_log(&mut self) {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
    }

    pub fn log_summary(&self) {
        if let Ok(stats) = self.stats() {
            let p = stats.passed();
            let d = stats.dropped();
            info!(
                "totals: passed {} packets ({} bytes), dropped {} packets ({} bytes)",
                p.packets, p.bytes, d.packets, d.bytes
            );
        }
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// The address an [`Addr`] stands for (IPv4 for IPv4-mapped addresses).
pub fn addr_to_ip(addr: &Addr) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(*addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// `CLOCK_BOOTTIME` in nanoseconds: the clock `bpf_ktime_get_boot_ns` reads.
pub fn boot_time_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}
