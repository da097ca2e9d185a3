//! The `limiter-agent` binary, scratch directories and pin directories (a bpffs each) for the
//! tests that run it as a program (`cli`, `top`, `agent`): one place that knows how to build
//! it and where cargo puts it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Builds the agent binary once per test process (cargo does nothing if it is current) and
/// returns its path. Built by the cargo running the tests, with its profile, so a test never
/// runs a stale binary.
pub fn agent_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "limiter-agent", "--bin", "limiter-agent"])
            .status()
            .expect("run cargo build for limiter-agent");
        assert!(status.success(), "building limiter-agent failed");
        // target/<profile>/deps/<test>-<hash> -> target/<profile>/limiter-agent
        let exe = std::env::current_exe().expect("test executable path");
        let bin = exe.parent().and_then(Path::parent).expect("target dir").join("limiter-agent");
        assert!(bin.exists(), "{} missing after cargo build", bin.display());
        bin
    })
}

/// A scratch directory (policies, sockets, configs), removed on drop, also when the test
/// panics. Unique per process and per call, so tests never see each other's files.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("limiter-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        TempDir(dir)
    }

    /// A directory holding `files` (name, text).
    pub fn with_files(tag: &str, files: &[(&str, &str)]) -> TempDir {
        let dir = TempDir::new(tag);
        for (name, text) in files {
            dir.write(name, text);
        }
        dir
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.0
    }

    /// Where `name` is (or would be) in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `name` by writing a temporary file and renaming it over the old one, as a config
    /// management tool (or the ConfigMap swap) would, so a watcher never reads half a file.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        std::fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A bpffs of its own for one test's agents (`run --pin-dir`), mounted under /run (which
/// `ip netns exec` keeps visible, unlike /sys/fs/bpf: see TOOLCHAIN.md). Dropping it unmounts
/// the bpffs, which releases whatever is still pinned there: links detach, programs and maps
/// go. Declare it before the agents that use it, so it is dropped after them.
pub struct PinDir {
    mount: PathBuf,
}

impl PinDir {
    pub fn new(tag: &str) -> PinDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mount = PathBuf::from(format!("/run/limiter-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&mount).unwrap_or_else(|e| panic!("create {}: {e}", mount.display()));
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&mount)
            .status()
            .expect("run mount -t bpf");
        assert!(status.success(), "mount -t bpf bpf {} failed", mount.display());
        PinDir { mount }
    }

    /// The pin directory inside the bpffs (the agent creates it).
    pub fn path(&self) -> PathBuf {
        self.mount.join("limiter")
    }

    /// The path as a `--pin-dir` argument.
    pub fn arg(&self) -> String {
        self.path().to_string_lossy().into_owned()
    }

    /// Names of what is pinned (empty when the directory is gone).
    pub fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path())
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Lazy: an agent killed a moment ago may still hold the directory open.
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = std::fs::remove_dir(&self.mount);
    }
}
