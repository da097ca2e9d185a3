//! Envoy 1.40 (installed by `cargo xtask setup`) and the shipped Envoy examples.

use std::path::Path;
use std::process::Command;

use limiter_tests::envoy::envoy_binary;

/// The shipped Envoy examples (this test's and the `cargo xtask run` demo's) are valid Envoy
/// 1.40 configs as they stand.
#[test]
fn the_envoy_examples_validate() {
    for name in ["envoy.yaml", "demo-envoy.yaml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/envoy").join(name);
        let out = Command::new(envoy_binary())
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(&path)
            .output()
            .expect("run envoy --mode validate");
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    }
}
