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
    rates::{Rate, Rates, ReasonRate, RlsErrorRate, RlsRates, RlsRuleRate, RuleRate, SourceRate},
    line::render_line,
    render::render,
};
use crate::{
    cli::run::parse_duration,
    control::{self, Snapshot},
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
}

/// What `--json` prints: the newer snapshot with the rates since the older one.
#[derive(Serialize)]
struct JsonView<'a> {
    #[serde(flatten)]
    snapshot: &'a Snapshot,
    rates: &'a Rates,
}

pub fn run(args: TopArgs) -> anyhow::Result<()> {
    let first = control::fetch(&args.socket)?;
    if args.once {
        std::thread::sleep(args.interval);
        let now = fetch_newer(&args.socket, &first)?;
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
        match control::fetch(&args.socket) {
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
