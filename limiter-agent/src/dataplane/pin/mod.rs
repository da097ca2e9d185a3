//! The pin directory: where the program, its XDP links and every map live in bpffs, so the
//! shield outlives the agent (DESIGN.md, "Lifecycle").
//!
//! Layout of a directory (default [`DEFAULT_PIN_DIR`]):
//! - one pin per shared map, by its name (`CONFIG`, `BLOCK`, ... see
//!   [`limiter_common::layout::SHARED_MAPS`]);
//! - `META` and `RULE_IDS`: the agent's record ([`meta`]);
//! - `prog`: the XDP program;
//! - `link-<mode>-<iface>`: one XDP link per interface (`mode`: native or generic; a dot
//!   in the interface name, which bpffs refuses, is written `:`, which interface names cannot
//!   hold);
//! - `tc-ingress-<iface>`: the SYN proxy's TC-ingress marker link of the interface, which
//!   comes and goes with its XDP link.
//!
//! One agent per directory: it holds an exclusive `flock` on the directory itself for as long
//! as it runs, so `top` and `detach` can tell a running agent from a shield left alone.
//!
//! - `meta`: the record maps; `sys`: the syscalls aya does not wrap.

pub mod meta;
pub mod sys;

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

use limiter_common::layout::SHARED_MAPS;

use self::meta::{Meta, MetaMaps};

/// Where `run` pins unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/limiter";
pub const PROGRAM_PIN: &str = "prog";
pub const META_PIN: &str = "META";
pub const RULE_IDS_PIN: &str = "RULE_IDS";
const LINK_PREFIX: &str = "link-";
const MARKER_PREFIX: &str = "tc-ingress-";
/// Suffix of pins staged by an upgrade before they replace the old ones. (bpffs refuses
/// names with a dot: they are reserved.)
pub const STAGED: &str = "-staged";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{path} is not on a bpffs (filesystem type {fs_type:#x}): mount one with `mount -t bpf bpf {mount}`, \
         or pass --pin-dir on a bpffs"
    )]
    NotBpffs { path: PathBuf, fs_type: i64, mount: String },
    #[error(
        "another limiter-agent{} runs on {path}: one agent per pin directory (stop it, or give this one another --pin-dir)",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Busy { path: PathBuf, pid: Option<u32> },
    #[error("{path}: {action}: {source}")]
    Io { path: PathBuf, action: &'static str, source: io::Error },
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> PinError {
    let path = path.to_owned();
    move |source| PinError::Io { path, action, source }
}

/// A pinned XDP link found in the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkPin {
    pub iface: String,
    /// `native` or `generic`.
    pub mode: String,
    pub path: PathBuf,
}

/// A locked pin directory.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
    /// Holds the exclusive lock while open.
    _lock: File,
}

/// Checks that `path` (or, if it does not exist yet, its closest existing parent) is on a
/// bpffs.
pub fn require_bpffs(path: &Path) -> Result<(), PinError> {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let fs_type = sys::fs_type(existing).map_err(io_err(existing, "reading its filesystem type"))?;
    if fs_type != sys::BPF_FS_MAGIC {
        // Suggest mounting where the directory would live: its parent for the default layout.
        let mount =
            if path == Path::new(DEFAULT_PIN_DIR) { "/sys/fs/bpf".to_owned() } else { existing.display().to_string() };
        return Err(PinError::NotBpffs { path: path.to_owned(), fs_type, mount });
    }
    Ok(())
}

impl PinDir {
    /// Creates `path` if needed (on a bpffs) and takes its lock; fails if another agent holds
    /// it. Pins staged by an agent that died during an upgrade are removed.
    pub fn open(path: &Path) -> Result<Self, PinError> {
        require_bpffs(path)?;
        std::fs::create_dir_all(path).map_err(io_err(path, "creating the pin directory"))?;
        require_bpffs(path)?;
        let dir = Self::lock(path)?;
        for name in dir.names()? {
            if name.ends_with(STAGED) {
                let _ = std::fs::remove_file(path.join(&name));
            }
        }
        Ok(dir)
    }

    /// Locks an existing directory (`detach`); `None` if there is none.
    pub fn open_existing(path: &Path) -> Result<Option<Self>, PinError> {
        if !path.exists() {
            return Ok(None);
        }
        require_bpffs(path)?;
        Self::lock(path).map(Some)
    }

    fn lock(path: &Path) -> Result<Self, PinError> {
        let file = File::open(path).map_err(io_err(path, "opening the pin directory"))?;
        if !sys::try_lock(&file, true).map_err(io_err(path, "locking"))? {
            return Err(PinError::Busy { path: path.to_owned(), pid: read_meta(path).map(|m| m.agent_pid) });
        }
        Ok(Self { path: path.to_owned(), _lock: file })
    }

    pub fn root(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Names of the entries in the directory.
    pub fn names(&self) -> Result<Vec<String>, PinError> {
        list(&self.path)
    }

    /// The pinned XDP links.
    pub fn links(&self) -> Result<Vec<LinkPin>, PinError> {
        links(&self.path)
    }

    /// Where the link of `iface` attached in `mode` is pinned.
    pub fn link_path(&self, iface: &str, mode: &str) -> PathBuf {
        self.path.join(format!("{LINK_PREFIX}{mode}-{}", iface.replace('.', ":")))
    }

    /// Where the TC-ingress marker link of `iface` is pinned.
    pub fn marker_path(&self, iface: &str) -> PathBuf {
        self.path.join(format!("{MARKER_PREFIX}{}", iface.replace('.', ":")))
    }

    /// Removes the TC marker link of `iface` now (see [`Self::remove`] for why the fd).
    pub fn remove_marker(&self, iface: &str) -> Result<(), PinError> {
        let path = self.marker_path(iface);
        if !path.exists() {
            return Ok(());
        }
        let held = sys::obj_get(&path).ok();
        std::fs::remove_file(&path).map_err(io_err(&path, "removing the TC marker link pin"))?;
        drop(held);
        Ok(())
    }

    /// Removes the links of `ifaces` (all links when empty); once no link is left, the
    /// program, the maps and the directory too. Returns what was done, in one line.
    pub fn remove(self, ifaces: &[String]) -> Result<String, PinError> {
        let links = self.links()?;
        let mut detached = Vec::new();
        for link in links.iter().filter(|l| ifaces.is_empty() || ifaces.contains(&l.iface)) {
            // With no agent holding it, the pin is the link's last reference. Dropping a pin
            // releases it from a workqueue, later; closing an fd releases it at once. So hold
            // an fd across the unlink and close it: the interface is detached on return.
            let held = sys::obj_get(&link.path).ok();
            std::fs::remove_file(&link.path).map_err(io_err(&link.path, "removing the link pin"))?;
            drop(held);
            self.remove_marker(&link.iface)?;
            detached.push(link.iface.clone());
        }
        let missing: Vec<&String> = ifaces.iter().filter(|i| !links.iter().any(|l| &l.iface == *i)).collect();
        let left = self.links()?;
        let mut line = if detached.is_empty() {
            format!("no link pinned in {} for {}", self.path.display(), join(&missing))
        } else {
            format!("detached {} (pins in {})", detached.join(", "), self.path.display())
        };
        if !left.is_empty() {
            let names: Vec<&str> = left.iter().map(|l| l.iface.as_str()).collect();
            line.push_str(&format!("; still shielded: {}", names.join(", ")));
            return Ok(line);
        }
        for name in self.names()? {
            let p = self.path.join(&name);
            std::fs::remove_file(&p).map_err(io_err(&p, "removing the pin"))?;
        }
        std::fs::remove_dir(&self.path).map_err(io_err(&self.path, "removing the pin directory"))?;
        line.push_str("; program and maps removed");
        Ok(line)
    }

    /// Whether anything of a pinned set is here.
    pub fn is_empty(&self) -> Result<bool, PinError> {
        Ok(self.names()?.is_empty())
    }

    /// Paths of the record maps.
    pub fn meta_paths(&self) -> (PathBuf, PathBuf) {
        (self.join(META_PIN), self.join(RULE_IDS_PIN))
    }

    /// Paths of the shared maps, by name.
    pub fn map_paths(&self) -> impl Iterator<Item = (&'static str, PathBuf)> + '_ {
        SHARED_MAPS.iter().map(|m| (m.name, self.join(m.name)))
    }
}

fn join(items: &[&String]) -> String {
    items.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}

fn list(path: &Path) -> Result<Vec<String>, PinError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io_err(path, "listing"))? {
        let entry = entry.map_err(io_err(path, "listing"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// The pinned XDP links in `path`.
pub fn links(path: &Path) -> Result<Vec<LinkPin>, PinError> {
    Ok(list(path)?
        .into_iter()
        .filter(|n| !n.ends_with(STAGED))
        .filter_map(|name| {
            let rest = name.strip_prefix(LINK_PREFIX)?;
            let (mode, iface) = rest.split_once('-')?;
            Some(LinkPin { iface: iface.replace(':', "."), mode: mode.to_owned(), path: path.join(&name) })
        })
        .collect())
}

/// The record of the set pinned in `path`, if there is one that this agent can read.
pub fn read_meta(path: &Path) -> Option<Meta> {
    let maps = MetaMaps::open(&path.join(META_PIN), &path.join(RULE_IDS_PIN)).ok()?;
    maps.read().ok().flatten()
}

/// Whether an agent holds the lock of `path` (it runs). `None`: no such directory.
pub fn agent_running(path: &Path) -> Option<bool> {
    let file = File::open(path).ok()?;
    // A shared lock is granted unless an agent holds the exclusive one; ours goes with `file`.
    sys::try_lock(&file, false).ok().map(|free| !free)
}

#[cfg(test)]
mod tests {
    use limiter_common::layout::{SHARED_MAPS, shared_map};

    /// Maps of the program that are not shared with the agent, so not pinned: each load gets
    /// its own. A map added to the program must be listed either here or in
    /// `limiter_common::layout::SHARED_MAPS` (which moves the layout stamp).
    const PRIVATE_MAPS: &[&str] = &[
        "SCRATCH",
        "FRAGMENT_KEY",
        "PARSE_RECORD",
        "AYA_LOGS",
        "AYA_LOG_BUF",
        limiter_common::synproxy::names::SYNPROXY_SCRATCH,
        limiter_common::synproxy::names::SYNPROXY_HANDOFF,
    ];

    #[test]
    fn the_layout_lists_every_map_of_the_compiled_program_as_compiled() {
        let obj = aya_obj::Object::parse(super::super::XDP_OBJECT).expect("parse the embedded XDP object");
        let mut shared = Vec::new();
        for (name, map) in &obj.maps {
            // Sections such as .rodata and .bss hold globals, not maps the agent shares.
            if name.starts_with('.') || PRIVATE_MAPS.contains(&name.as_str()) {
                continue;
            }
            let spec = shared_map(name).unwrap_or_else(|| {
                panic!(
                    "map {name} of the XDP program is in neither limiter_common::layout::SHARED_MAPS nor \
                     PRIVATE_MAPS: list it, so the layout stamp covers it"
                )
            });
            let found = (map.map_type(), map.key_size(), map.value_size(), map.max_entries(), map.map_flags());
            let listed = (spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags);
            assert_eq!(found, listed, "map {name}: (type, key, value, entries, flags) compiled vs listed");
            shared.push(name.as_str());
        }
        for spec in SHARED_MAPS {
            assert!(shared.contains(&spec.name), "{} is listed in SHARED_MAPS but not in the program", spec.name);
        }
    }
}
