//! `limiter-agent check PATH...`: validate policies and show where each rule would be enforced.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::policy::{self, Compiled, PolicyErrors};

/// Validate policy files or directories without loading anything.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Policy files, or directories of `*.yaml` / `*.yml` files; all of them form one set.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// Prints every error (stderr), every notice (stderr, as warnings; the ports each
/// `Gateway`/`HTTPRoute` target resolved to among them) and one summary line per policy and
/// ratelimit config, then one per `ListenerMap` (stdout). A policy's line ends with its
/// resolved targets (`; Gateway eg on 443/TCP,80/TCP`). Exit code 1 when any error was found,
/// 0 otherwise.
pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    report(&args.paths, &mut stdout.lock(), &mut stderr.lock())
}

/// Loads and compiles `paths` as one set, printing what [`run`] prints; the compiled plan
/// when there were no errors. Shared with `explain`.
pub(crate) fn load(paths: &[PathBuf], err: &mut dyn Write) -> anyhow::Result<Option<Compiled>> {
    let compiled = policy::load_paths(paths).map(|set| policy::compile(&set));
    let errors = match compiled {
        Ok(c) if c.errors.is_empty() => {
            for n in &c.notices {
                writeln!(err, "warning: {n}")?;
            }
            return Ok(Some(c));
        }
        Ok(c) => {
            for n in &c.notices {
                writeln!(err, "warning: {n}")?;
            }
            PolicyErrors(c.errors)
        }
        Err(errors) => errors,
    };
    for e in &errors {
        writeln!(err, "error: {e}")?;
    }
    writeln!(err, "{} error(s); policy set rejected", errors.len())?;
    Ok(None)
}

/// [`run`] with the output streams given, for tests.
pub fn report(paths: &[PathBuf], out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let Some(compiled) = load(paths, err)? else { return Ok(ExitCode::FAILURE) };
    if compiled.summaries.is_empty() {
        writeln!(out, "no policies found")?;
    }
    for s in &compiled.summaries {
        writeln!(out, "{s}")?;
    }
    for m in &compiled.listener_maps {
        writeln!(out, "{m}")?;
    }
    let plan = &compiled.plan;
    // Only with maps, so the line of a set without them reads as it always did.
    let maps = match compiled.listener_maps.len() {
        0 => String::new(),
        n => format!(", {n} listener map(s)"),
    };
    writeln!(
        out,
        "ok: {} policies and configs{maps}, {} kernel rules, {} L7 rules, {} allow and {} deny entries, {} warning(s)",
        compiled.summaries.len(),
        plan.rules.len(),
        compiled.l7.rules.len(),
        plan.allow.len(),
        plan.deny.len(),
        compiled.notices.len()
    )?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn run_check(paths: &[PathBuf]) -> (ExitCode, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = report(paths, &mut out, &mut err).unwrap();
        (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    }

    fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies")
    }

    #[test]
    fn valid_examples_pass_with_summaries_and_warnings() {
        let (code, out, err) = run_check(&[examples()]);
        assert_eq!(code, ExitCode::SUCCESS, "{err}");
        assert!(out.contains("demo: 2 rule(s) in the kernel, 0 L7, 0 not enforced\n"), "{out}");
        assert!(out.contains("task-api: 3 rule(s) in the kernel, 4 L7, 0 not enforced\n"), "{out}");
        assert!(out.contains("ok: 4 policies and configs, 9 kernel rules, 4 L7 rules"), "{out}");
        assert!(err.lines().all(|l| l.starts_with("warning: ")), "{err}");
        assert!(err.contains("task-api.yaml:14:12 (document 1): spec.penalty: escalation: a source the rate limit service denies 20 times"), "{err}");
    }

    #[test]
    fn a_listener_map_shows_resolved_ports_and_counts_the_guards() {
        let gateways = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gateways");
        let dirs = ["envoy-gateway", "agentgateway"].map(|d| gateways.join(d));
        let (code, out, err) = run_check(&dirs);
        assert_eq!(code, ExitCode::SUCCESS, "{err}");
        assert!(out.contains("eg-source-ip: 0 rule(s) in the kernel, 1 L7, 0 not enforced\n"), "{out}");
        assert!(out.contains("ok: 9 policies and configs, 0 kernel rules, "), "{out}");

        let mut paths = vec![gateways.join("listeners.yaml")];
        paths.extend(dirs);
        let (code, out, err) = run_check(&paths);
        assert_eq!(code, ExitCode::SUCCESS, "{err}");
        assert!(
            out.contains("eg-source-ip: 1 rule(s) in the kernel, 1 L7, 0 not enforced; Gateway eg on 80/TCP,443/TCP\n"),
            "{out}"
        );
        assert!(
            out.contains("ListenerMap node-listeners: 3 gateway(s), 5 route(s), resolving 9 policy target(s)\n"),
            "{out}"
        );
        assert!(out.contains("ok: 9 policies and configs, 1 listener map(s), 3 kernel rules, "), "{out}");
        assert!(err.contains("source-ip.yaml:10:7: spec.targetRefs[0]: Gateway eg: resolved to ports 80/TCP,443/TCP by ListenerMap node-listeners"), "{err}");
    }

    #[test]
    fn invalid_examples_fail_and_print_every_error() {
        let (code, out, err) = run_check(&[examples().join("invalid")]);
        assert_eq!(code, ExitCode::FAILURE);
        assert!(out.is_empty(), "{out}");
        let errors = err.lines().filter(|l| l.starts_with("error: ")).count();
        assert_eq!(errors, 12, "{err}");
        assert!(
            err.contains("bad-unit.yaml:15:19: spec.rateLimit.local.rules[2].limit.unit: unknown unit \"Minuets\"")
        );
        assert!(err.ends_with("12 error(s); policy set rejected\n"), "{err}");
    }
}
