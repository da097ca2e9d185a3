//! `limiter-agent top`: a live view of a running agent, read from its control socket.
//!
//! Rates come from two snapshots: the counter deltas divided by the time between the agent's
//! reads (`time_unix_ms`), not by how long this client slept; the kernel's packets and the
//! rate limit service's answers alike. On a terminal each frame clears the screen and redraws
//! (plain ANSI, works over SSH); piped, each interval is one summary line (`line`), so a log or
//! a demo reads as a stream; `--once` prints the full view either way.
//!
//! - `rates`: per-second rates between two snapshots.
//! - `render`: the text view.
//! - `line`: the one-line summary.

mod line;
mod rates;
mod render;
#[cfg(test)]
mod tests;

use std::{
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

pub use self::{
    line::render_line,
    rates::{Rate, Rates, ReasonRate, RlsErrorRate, RlsRates, RlsRuleRate, RuleRate, SourceRate},
    render::render,
};
use crate::{
    cli::run::parse_duration,
    control::{self, Snapshot},
    dataplane::PinnedView,
};

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// The agent's control socket (`limiter-agent run --control-socket`).
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Time between two snapshots (e.g. 500ms, 1s, 5s).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Print one view (rates over one interval) and exit.
    #[arg(long)]
    pub once: bool,
    /// JSON instead of text: the snapshot plus `rates`, one line per interval.
    #[arg(long)]
    pub json: bool,
    /// Where a shield is pinned (`run --pin-dir`): with no agent on the socket, `top` reads
    /// the pinned counters and says that no agent runs.
    #[arg(long, value_name = "DIR", default_value = crate::dataplane::pin::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// What `--json` prints: the newer snapshot with the rates since the older one.
#[derive(Serialize)]
struct JsonView<'a> {
    #[serde(flatten)]
    snapshot: &'a Snapshot,
    rates: &'a Rates,
}

pub fn run(args: TopArgs) -> anyhow::Result<()> {
    let first = fetch(&args)?;
    if args.once {
        std::thread::sleep(args.interval);
        let now = if first.unattended.is_some() { fetch(&args)? } else { fetch_newer(&args.socket, &first)? };
        print_view(&args, &first, &now, false)?;
        return Ok(());
    }
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the tokio runtime")?;
    runtime.block_on(live(args, first))
}

async fn live(args: TopArgs, mut last: Snapshot) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let redraw = !args.json && std::io::stdout().is_terminal();
    // Hides the cursor while redrawing; shows it again however this function ends.
    let _cursor = redraw.then(Cursor::hide);
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => {}
        }
        match fetch(&args) {
            Ok(now) => {
                print_view(&args, &last, &now, redraw)?;
                last = now;
            }
            // The agent may be restarting: say so and keep trying.
            Err(e) if args.json => eprintln!("limiter-agent top: {e}"),
            Err(e) => {
                let mut out = std::io::stdout().lock();
                if redraw {
                    write!(out, "\x1b[H\x1b[2J")?;
                }
                if redraw {
                    writeln!(out, "limiter-agent top: {e}\n(retrying every {:?}; Ctrl-C to quit)", args.interval)?;
                } else {
                    writeln!(out, "limiter-agent top: {e} (retrying every {:?})", args.interval)?;
                }
                out.flush()?;
            }
        }
    }
    Ok(())
}

struct Cursor;

impl Cursor {
    fn hide() -> Self {
        print!("\x1b[?25l");
        Self
    }
}

impl Drop for Cursor {
    fn drop(&mut self) {
        println!("\x1b[?25h");
        let _ = std::io::stdout().flush();
    }
}

/// The agent's snapshot; with no agent on the socket, one read from the shield pinned in
/// `--pin-dir` if one runs there without an agent, else the socket's error.
fn fetch(args: &TopArgs) -> Result<Snapshot, control::ControlError> {
    control::fetch(&args.socket).or_else(|e| unattended(&args.pin_dir).ok_or(e))
}

/// A snapshot of the shield pinned in `dir`, when no agent holds it.
fn unattended(dir: &Path) -> Option<Snapshot> {
    let view = PinnedView::open(dir).ok()??;
    if view.agent_running {
        return None;
    }
    let stats = view.stats().ok()?;
    let top = view.top_dropped_sources(control::TOP_SOURCES).ok()?;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let record = view.record;
    let pinned_at = record.map_or(0, |r| r.pinned_at_s);
    let meta = control::Meta {
        time_unix_ms: now_ms,
        uptime_s: (now_ms / 1000).saturating_sub(pinned_at),
        interfaces: view
            .links
            .iter()
            .map(|l| control::Interface { name: l.iface.clone(), mode: l.mode.clone() })
            .collect(),
        policy: control::PolicyStatus {
            rules: record.map_or(stats.rules.len(), |r| r.kernel_rules as usize),
            last_reload_ok: true,
            ..Default::default()
        },
        sources: {
            let (tracked, capacity) = view.tracked_sources();
            control::SourceTable { tracked: tracked as u64, capacity: u64::from(capacity), sampled_at_unix_ms: now_ms }
        },
        ..Default::default()
    };
    let mut snapshot = Snapshot::build(Some((&stats, &top)), meta);
    snapshot.unattended = Some(control::Unattended {
        pin_dir: dir.display().to_string(),
        pinned_at_unix_s: pinned_at,
        policy: record.map_or_else(|| "unknown (record unreadable)".to_owned(), |r| r.policy_text()),
        last_agent_pid: record.map_or(0, |r| r.agent_pid),
        agent_stopped_unix_s: record.map_or(0, |r| r.agent_stopped_s),
        blocked_now: view.blocked_sources() as u64,
    });
    Some(snapshot)
}

/// Fetches until the agent has published a snapshot newer than `before` (it refreshes about
/// once a second), for at most three seconds.
fn fetch_newer(socket: &Path, before: &Snapshot) -> anyhow::Result<Snapshot> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = control::fetch(socket)?;
        if now.time_unix_ms != before.time_unix_ms || Instant::now() >= deadline {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn print_view(args: &TopArgs, before: &Snapshot, now: &Snapshot, redraw: bool) -> anyhow::Result<()> {
    let rates = Rates::between(before, now);
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&JsonView { snapshot: now, rates: &rates })?)?;
    } else {
        if redraw {
            write!(out, "\x1b[H\x1b[2J")?;
        }
        if redraw || args.once {
            write!(out, "{}", render(now, &rates, &args.socket))?;
        } else {
            writeln!(out, "{}", render_line(now, &rates))?;
        }
    }
    out.flush()?;
    Ok(())
}
