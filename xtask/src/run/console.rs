//! The demo's output: narration lines that scroll, and a live block of a few lines (what each
//! client got in the last second, and `limiter-agent top`'s one-line summary) that stays at the
//! bottom of a terminal and is redrawn in place. Every thread prints through here, so a line
//! never lands inside the block. When stdout is not a terminal, each live update is printed as
//! one plain line, once a second.

use std::io::{IsTerminal as _, Write as _};
use std::sync::{Mutex, OnceLock};

struct State {
    terminal: bool,
    /// Lines of the live block now on screen (terminal only).
    drawn: usize,
    /// The live block's current text, redrawn under every new narration line.
    live: Vec<String>,
}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(|| Mutex::new(State { terminal: std::io::stdout().is_terminal(), drawn: 0, live: Vec::new() }))
}

/// Prints `text` as a narration line: above the live block on a terminal.
pub fn line(text: &str) {
    let Ok(mut st) = state().lock() else { return };
    let mut out = std::io::stdout().lock();
    erase(&mut st, &mut out);
    let _ = writeln!(out, "{text}");
    draw(&mut st, &mut out);
    let _ = out.flush();
}

/// Replaces the live block. Off a terminal its lines are printed as one, after `prefix`.
pub fn live(lines: Vec<String>, prefix: &str) {
    let Ok(mut st) = state().lock() else { return };
    let mut out = std::io::stdout().lock();
    if st.terminal {
        erase(&mut st, &mut out);
        st.live = lines;
        draw(&mut st, &mut out);
    } else {
        let _ = writeln!(out, "{prefix}{}", lines.join(" | "));
    }
    let _ = out.flush();
}

/// Removes the live block from the screen; narration goes on without it.
pub fn end_live() {
    let Ok(mut st) = state().lock() else { return };
    let mut out = std::io::stdout().lock();
    erase(&mut st, &mut out);
    st.live.clear();
    let _ = out.flush();
}

fn erase(st: &mut State, out: &mut impl std::io::Write) {
    if st.drawn > 0 {
        // To the start of the block's first line, then clear to the end of the screen.
        let _ = write!(out, "\x1b[{}F\x1b[J", st.drawn);
        st.drawn = 0;
    }
}

fn draw(st: &mut State, out: &mut impl std::io::Write) {
    if !st.terminal || st.live.is_empty() {
        return;
    }
    // A wrapped line would take two rows and the next erase would miss one: cut to the width.
    let width = columns().saturating_sub(1).max(20);
    for l in &st.live {
        let _ = writeln!(out, "{}", cut(l, width));
    }
    st.drawn = st.live.len();
}

fn cut(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(width - 1).collect();
    t.push('…');
    t
}

/// The terminal's width (80 if it cannot be read).
fn columns() -> usize {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we pass; stdout is a valid fd.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    if rc == 0 && size.ws_col > 0 { usize::from(size.ws_col) } else { 80 }
}

/// `println!` for the demo: a narration line through [`line`].
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::run::console::line(&format!($($arg)*))
    };
}
pub(crate) use say;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_live_lines_are_cut_to_the_width() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("a line far too long", 10), "a line fa…");
        assert_eq!(cut("a line far too long", 10).chars().count(), 10);
    }
}
