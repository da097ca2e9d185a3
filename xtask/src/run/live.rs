//! The demo's live block: what each client got since the previous update, over the agent's
//! own one-line summary (`limiter-agent top` off a terminal prints one a second; each of its
//! lines drives an update).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::console;
use super::traffic::{Counts, Tally};

pub struct LiveView {
    clients: Vec<(&'static str, Arc<Tally>)>,
    last: Mutex<(Instant, Vec<Counts>)>,
}

impl LiveView {
    pub fn new(clients: Vec<(&'static str, Arc<Tally>)>) -> Self {
        let counts = clients.iter().map(|(_, t)| t.get()).collect();
        Self { clients, last: Mutex::new((Instant::now(), counts)) }
    }

    /// Redraws the block with `top_line` from the agent and the clients' numbers since the
    /// previous call.
    pub fn update(&self, top_line: &str) {
        let Ok(mut last) = self.last.lock() else { return };
        let now = Instant::now();
        let counts: Vec<Counts> = self.clients.iter().map(|(_, t)| t.get()).collect();
        let secs = now.duration_since(last.0).as_secs_f64().max(0.001);
        let per_s = |after: u64, before: u64| (after.saturating_sub(before) as f64 / secs).round();
        let parts: Vec<String> = self
            .clients
            .iter()
            .zip(counts.iter().zip(&last.1))
            .map(|((name, _), (after, before))| {
                let (ok, limited, cut) = (per_s(after.0, before.0), per_s(after.1, before.1), per_s(after.2, before.2));
                client_part(name, ok, limited, cut)
            })
            .collect();
        *last = (now, counts);
        drop(last);
        console::live(
            vec![format!("clients, per second: {}", parts.join(" | ")), format!("agent: {top_line}")],
            "  live | ",
        );
    }
}

fn client_part(name: &str, ok: f64, limited: f64, cut: f64) -> String {
    if ok + limited + cut == 0.0 {
        return format!("{name} idle");
    }
    let mut got = vec![format!("{ok} × 200")];
    if limited > 0.0 {
        got.push(format!("{limited} × 429"));
    }
    if cut > 0.0 {
        got.push(format!("{cut} cut in XDP"));
    }
    format!("{name} {}", got.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_idle_or_what_it_got() {
        assert_eq!(client_part("polite", 0.0, 0.0, 0.0), "polite idle");
        assert_eq!(client_part("polite", 5.0, 0.0, 0.0), "polite 5 × 200");
        assert_eq!(client_part("greedy", 10.0, 62.0, 78.0), "greedy 10 × 200, 62 × 429, 78 cut in XDP");
    }
}
