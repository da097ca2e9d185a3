//! `limiter-agent check PATH...`: validate policies and show what the kernel would enforce.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::policy;

/// Validate policy files or directories without loading anything.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Policy files, or directories of `*.yaml` / `*.yml` files.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// Prints every error (stderr), every notice (stderr, as warnings) and one summary line per
/// policy (stdout). Exit code 1 when any error was found, 0 otherwise.
pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    report(&args.paths, &mut stdout.lock(), &mut stderr.lock())
}

/// [`run`] with the output streams given, for tests.
pub fn report(paths: &[PathBuf], out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match policy::load_paths(paths) {
        Err(errors) => {
            for e in &errors {
                writeln!(err, "error: {e}")?;
            }
            writeln!(err, "{} error(s); policy set rejected", errors.len())?;
            Ok(ExitCode::FAILURE)
        }
        Ok(set) => {
            let compiled = policy::compile(&set);
            for n in &compiled.notices {
                writeln!(err, "warning: {n}")?;
            }
            if set.policies.is_empty() {
                writeln!(out, "no policies found")?;
            }
            for s in &compiled.summaries {
                writeln!(out, "{s}")?;
            }
            let plan = &compiled.plan;
            writeln!(
                out,
                "ok: {} policies, {} kernel rules, {} allow and {} deny entries",
                set.policies.len(),
                plan.rules.len(),
                plan.allow.len(),
                plan.deny.len()
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
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
        assert!(out.contains("demo: 2 rule(s) in the kernel, 0 not enforced\n"), "{out}");
        assert!(out.contains("task-api: 3 rule(s) in the kernel, 4 not enforced\n"), "{out}");
        assert!(out.contains("ok: 4 policies, 9 kernel rules"), "{out}");
        assert!(err.lines().all(|l| l.starts_with("warning: ")), "{err}");
        assert!(err.contains("task-api.yaml:14:12 (document 1): spec.penalty: penalty escalation"), "{err}");
    }

    #[test]
    fn invalid_examples_fail_and_print_every_error() {
        let (code, out, err) = run_check(&[examples().join("invalid")]);
        assert_eq!(code, ExitCode::FAILURE);
        assert!(out.is_empty(), "{out}");
        let errors = err.lines().filter(|l| l.starts_with("error: ")).count();
        assert_eq!(errors, 10, "{err}");
        assert!(
            err.contains("bad-unit.yaml:15:19: spec.rateLimit.local.rules[2].limit.unit: unknown unit \"Minuets\"")
        );
        assert!(err.ends_with("10 error(s); policy set rejected\n"), "{err}");
    }
}
