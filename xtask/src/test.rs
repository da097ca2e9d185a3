//! `cargo xtask test`: setup, unit tests of the default members, envoyproxy/ratelimit's own
//! test cases against the agent ([`peer`], both backends), then the privileged integration
//! tests (`limiter-tests`) one at a time as root.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{peer, setup, util};

/// The filter word that runs the conformance suite in a filtered run (`cargo xtask test --
/// peer_ratelimit`); an unfiltered run always runs it.
const PEER_FILTER: &str = "peer_ratelimit";

/// Prefix of the network namespaces the integration test harness creates.
const HARNESS_NETNS_PREFIX: &str = "lt-";

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Extra arguments for the test binaries (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

pub fn cmd(args: &TestArgs) -> Result<()> {
    // Fail before the long build rather than after it.
    if !util::is_root()? {
        bail!(
            "privileged tests need root: rerun with sudo (sudo -E cargo xtask test); \
             `cargo test` alone runs the unit tests without root"
        );
    }
    setup::ensure()?;

    println!("test: unit tests (limiter-common, limiter-agent, xtask)");
    let mut unit = util::cargo()?;
    unit.arg("test");
    if !args.test_args.is_empty() {
        unit.arg("--").args(&args.test_args);
    }
    util::run(&mut unit).context("unit tests failed: see the failures above; rerun one with `cargo test NAME`")?;

    if args.test_args.is_empty() || args.test_args.iter().any(|a| a == PEER_FILTER) {
        peer::run_suite()?;
    } else {
        println!(
            "test: envoyproxy/ratelimit conformance suite not run: a filter was given (add `{PEER_FILTER}` to run it)"
        );
    }

    remove_leftover_netns()?;
    println!("test: privileged integration tests (limiter-tests, one at a time)");
    util::run(util::cargo()?.args(["test", "-p", "limiter-tests", "--", "--test-threads=1"]).args(&args.test_args))
        .context("privileged tests failed: see above; rerun one with `cargo xtask test -- NAME --nocapture`")?;

    println!("test: all tests passed");
    Ok(())
}

/// Deletes namespaces left by a crashed earlier run of the harness (`lt-<tag>-<pid>-<n>`), and
/// only those whose test process is gone: a second test run on the same machine keeps its own.
fn remove_leftover_netns() -> Result<()> {
    let list = util::output(Command::new("ip").args(["netns", "list"]))
        .context("cannot list network namespaces: is iproute2 installed (cargo xtask setup)?")?;
    for name in netns_with_prefix(&list, HARNESS_NETNS_PREFIX) {
        if owner_pid(name).is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            continue;
        }
        println!("test: removing leftover network namespace {name} from an earlier run");
        util::run(Command::new("ip").args(["netns", "del", name])).with_context(|| {
            format!("cannot delete netns {name}: kill the processes still inside it (ip netns pids {name})")
        })?;
    }
    Ok(())
}

/// Names in `ip netns list` output (`name (id: 3)` or `name`) that start with `prefix`.
pub fn netns_with_prefix<'a>(list: &'a str, prefix: &str) -> Vec<&'a str> {
    list.lines().filter_map(|l| l.split_whitespace().next()).filter(|name| name.starts_with(prefix)).collect()
}

/// The pid in a harness namespace name (`lt-<tag>-<pid>-<n>`; the tag may hold `-`).
fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.rsplitn(3, '-');
    let _counter = parts.next()?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_list_parsing() {
        let list = "lt-verdict-1 (id: 3)\nld-srv (id: 1)\nlt-x\nmylt-x\n";
        assert_eq!(netns_with_prefix(list, "lt-"), ["lt-verdict-1", "lt-x"]);
        assert!(netns_with_prefix("", "lt-").is_empty());
    }

    #[test]
    fn owner_pid_parsing() {
        assert_eq!(owner_pid("lt-verdict-x-1234-7"), Some(1234));
        assert_eq!(owner_pid("lt-a-99-0"), Some(99));
        assert_eq!(owner_pid("lt-x"), None);
    }
}
