//! Differential fuzzing in CI: a bounded number of generated and mutated frames through the
//! real XDP program (`BPF_PROG_TEST_RUN`), each checked against etherparse's reading and the
//! README's verdict table (see `limiter_tests::fuzz`). `cargo xtask fuzz` runs millions.
//!
//! `LIMITER_FUZZ_SEED` and `LIMITER_FUZZ_FRAMES` replay another run; a failure prints the
//! seed and every frame that disagreed, in hex, with both readings.

use limiter_tests::fuzz::{self, Options};
use limiter_tests::require_root;

/// Enough for every shape and mutation to come up hundreds of times (see bench/FUZZ.md for
/// the counts of a longer run), in well under a minute.
const CI_FRAMES: u64 = 100_000;
const CI_SEED: u64 = 1;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|e| panic!("{name}={v:?}: not a number: {e}")),
        Err(_) => default,
    }
}

#[test]
fn program_agrees_with_etherparse_on_generated_frames() {
    require_root();
    let opts = Options {
        frames: env_u64("LIMITER_FUZZ_FRAMES", CI_FRAMES),
        seed: env_u64("LIMITER_FUZZ_SEED", CI_SEED),
        keep: 20,
    };
    let summary = fuzz::run(&opts, |_| {}).expect("run the fuzzer");
    assert_eq!(summary.frames, opts.frames);
    assert!(summary.records, "the program must write PARSE_RECORD when asked to");
    // The run covered what it claims to: every shape dimension saw each of its main labels.
    for (dim, label) in [
        ("link", "0x9100"),
        ("link", "3 tags"),
        ("l3", "IPv6 chain >= 16"),
        ("l3", "IPv6 ext with 135/139/140"),
        ("fragment", "tiny first"),
        ("fragment", "later"),
        ("mutation", "truncation sweep"),
        ("mutation", "IPv4 IHL"),
    ] {
        assert!(summary.shapes.get(&(dim, label)).copied().unwrap_or(0) > 0, "no frame of shape {dim}={label}");
    }
    let mut report = String::new();
    for d in &summary.kept {
        report.push_str(&d.to_string());
    }
    assert_eq!(
        summary.disagreements, 0,
        "{} of {} frames disagree (seed {}; failing shapes {:?}); the first:\n{report}",
        summary.disagreements, summary.frames, summary.seed, summary.failing_shapes
    );
}
