//! The `limiter-agent` binary and scratch directories for the tests that run it as a program
//! (`cli`, `top`, `agent`): one place that knows how to build it and where cargo puts it.

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
