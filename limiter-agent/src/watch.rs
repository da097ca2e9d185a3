//! Notices when the policy files change, including the Kubernetes ConfigMap volume layout
//! (files are symlinks into a `..data` directory that the kubelet swaps atomically).
//!
//! Polling rather than inotify: a ConfigMap update replaces a symlink two levels up from the
//! files, which inotify watches on the files themselves miss, and polling a handful of small
//! files once a second costs nothing. A change is reported only once the contents have been
//! stable for one more poll, so a file caught half-written by an editor is not applied (the
//! next poll sees the finished file).

use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
};

/// Watches a set of policy files and directories.
#[derive(Debug)]
pub struct PolicyWatcher {
    paths: Vec<PathBuf>,
    /// Fingerprint of the contents last reported (or seen at start).
    applied: u64,
    /// A changed fingerprint seen once, waiting to be confirmed by the next poll.
    pending: Option<u64>,
}

impl PolicyWatcher {
    /// Starts watching; the current contents count as already applied.
    pub fn new(paths: &[PathBuf]) -> Self {
        let paths = paths.to_vec();
        let applied = fingerprint(&paths);
        Self { paths, applied, pending: None }
    }

    /// Marks the current contents as applied (e.g. after a SIGHUP reload).
    pub fn mark_applied(&mut self) {
        self.applied = fingerprint(&self.paths);
        self.pending = None;
    }

    /// Polls once. True when the contents changed and have been stable since the last poll:
    /// the caller should reload.
    pub fn poll(&mut self) -> bool {
        let now = fingerprint(&self.paths);
        if now == self.applied {
            self.pending = None;
            return false;
        }
        if self.pending == Some(now) {
            self.applied = now;
            self.pending = None;
            return true;
        }
        self.pending = Some(now);
        false
    }
}

/// Hash of every regular file (symlinks followed) under the paths, by name and content.
/// Over-inclusive on purpose (any non-hidden file counts): a spurious change only causes a
/// reload that finds the plan unchanged.
fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    for path in paths {
        hash_path(path, &mut h, 0);
    }
    h.finish()
}

fn hash_path(path: &Path, h: &mut DefaultHasher, depth: u32) {
    path.hash(h);
    match fs::metadata(path) {
        Ok(m) if m.is_dir() && depth == 0 => {
            let mut names: Vec<PathBuf> = match fs::read_dir(path) {
                Ok(entries) => entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')))
                    .collect(),
                Err(e) => {
                    e.kind().hash(h);
                    return;
                }
            };
            names.sort();
            for name in names {
                hash_path(&name, h, depth + 1);
            }
        }
        Ok(m) if m.is_file() => match fs::read(path) {
            Ok(bytes) => bytes.hash(h),
            Err(e) => e.kind().hash(h),
        },
        Ok(_) => {}
        Err(e) => e.kind().hash(h),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("limiter-watch-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_change_is_reported_once_it_is_stable() {
        let dir = tempdir("stable");
        fs::write(dir.join("a.yaml"), "one").unwrap();
        let mut w = PolicyWatcher::new(std::slice::from_ref(&dir));
        assert!(!w.poll());
        fs::write(dir.join("a.yaml"), "two").unwrap();
        assert!(!w.poll(), "first sighting waits for stability");
        fs::write(dir.join("a.yaml"), "three").unwrap();
        assert!(!w.poll(), "still changing");
        assert!(w.poll(), "stable for one poll: reload");
        assert!(!w.poll(), "reported once");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn configmap_symlink_swap_is_seen() {
        // The kubelet layout: policy.yaml -> ..data/policy.yaml, ..data -> ..2026_v1.
        let dir = tempdir("configmap");
        fs::create_dir(dir.join("..v1")).unwrap();
        fs::write(dir.join("..v1/policy.yaml"), "v1").unwrap();
        std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/policy.yaml", dir.join("policy.yaml")).unwrap();
        let mut w = PolicyWatcher::new(std::slice::from_ref(&dir));
        fs::create_dir(dir.join("..v2")).unwrap();
        fs::write(dir.join("..v2/policy.yaml"), "v2").unwrap();
        std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
        fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        assert!(!w.poll());
        assert!(w.poll());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sighup_reload_marks_the_contents_applied() {
        let dir = tempdir("mark");
        let file = dir.join("p.yaml");
        fs::write(&file, "one").unwrap();
        let mut w = PolicyWatcher::new(std::slice::from_ref(&file));
        fs::write(&file, "two").unwrap();
        w.mark_applied();
        assert!(!w.poll());
        assert!(!w.poll());
        fs::remove_dir_all(&dir).unwrap();
    }
}
