//! The kernel half of the SYN proxy: the nftables rules and the sysctl that make netfilter's
//! SYNPROXY finish the handshakes whose SYNs the XDP program answered with cookies.
//!
//! An ACK that completes a cookie handshake has no conntrack entry. With
//! `nf_conntrack_tcp_loose = 0` conntrack refuses to pick such a segment up as a connection
//! in progress and marks it invalid; the `synproxy` statement then checks its cookie (the same
//! kernel secret the XDP program used), opens the connection to the real listener with the
//! client's address, port and options, and from then on translates sequence numbers between
//! the two halves. Other invalid segments for the proxied ports are dropped.
//!
//! Unlike the kernel selftest this follows, SYNs are not exempted from conntrack
//! (`notrack`): a SYN the XDP program lets through (threshold mode, below the threshold) then
//! reaches the listener as if there were no proxy, with its own options and no sequence
//! translation.
//!
//! The table is the agent's: written whole in one nftables transaction (idempotent), left in
//! place when the agent stops (the pinned shield keeps answering cookies, and the ACKs still
//! need SYNPROXY), removed by `limiter-agent detach` or when no port is proxied any more.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use crate::dataplane::SynproxyHost;

/// The nftables table (family `inet`) the agent owns.
pub const TABLE: &str = "limiter_synproxy";
const LOOSE: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_loose";

#[derive(Debug, thiserror::Error)]
pub enum SynproxyError {
    #[error("running nft (is the nftables package installed?): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the SYN proxy rules ({status}): {stderr}")]
    Nft { status: String, stderr: String },
    #[error("{path}: {source} (is the nf_conntrack module available?)")]
    Sysctl { path: &'static str, source: std::io::Error },
}

/// The whole table for `ports`, as one nftables script that replaces any earlier version.
pub fn ruleset(ports: &[u16], host: SynproxyHost) -> String {
    let mut script = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
    if ports.is_empty() {
        return script;
    }
    let set = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    let opts = |mss: u16| format!("synproxy mss {mss} wscale {} timestamp sack-perm", host.wscale);
    script.push_str(&format!(
        "table inet {TABLE} {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tmeta nfproto ipv4 tcp dport {{ {set} }} ct state invalid,untracked {}\n\
         \t\tmeta nfproto ipv6 tcp dport {{ {set} }} ct state invalid,untracked {}\n\
         \t\ttcp dport {{ {set} }} ct state invalid drop\n\
         \t}}\n\
         }}\n",
        opts(host.mss4),
        opts(host.mss6),
    ));
    script
}

fn nft(script: &str) -> Result<(), SynproxyError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(SynproxyError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(SynproxyError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(SynproxyError::Spawn)?;
    if !out.status.success() {
        return Err(SynproxyError::Nft {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn set_loose(value: &str) -> Result<(), SynproxyError> {
    std::fs::write(LOOSE, value).map_err(|source| SynproxyError::Sysctl { path: LOOSE, source })
}

/// Installs (or replaces) the rules for `ports` in the calling thread's network namespace;
/// with no port, removes them (see [`remove`]).
pub fn apply(ports: &[u16], host: SynproxyHost) -> Result<(), SynproxyError> {
    if ports.is_empty() {
        return remove();
    }
    nft(&ruleset(ports, host))?;
    // After the table: its conntrack expressions are what load nf_conntrack, which owns the
    // sysctl.
    set_loose("0")
}

/// Removes the table if present and gives conntrack back its default (loose pick-up of
/// connections in progress). Idempotent.
pub fn remove() -> Result<(), SynproxyError> {
    nft(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"))?;
    if std::path::Path::new(LOOSE).exists() { set_loose("1") } else { Ok(()) }
}

/// Whether the table is installed in the calling thread's network namespace.
pub fn installed() -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", TABLE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_replaces_the_table_and_matches_the_host_values() {
        let host = SynproxyHost { mss4: 1460, mss6: 1440, wscale: 9, ttl: 64 };
        let s = ruleset(&[9100, 443], host);
        assert!(s.starts_with("table inet limiter_synproxy\ndelete table inet limiter_synproxy\n"));
        assert!(s.contains("meta nfproto ipv4 tcp dport { 9100, 443 } ct state invalid,untracked synproxy mss 1460 wscale 9 timestamp sack-perm"));
        assert!(s.contains("meta nfproto ipv6 tcp dport { 9100, 443 } ct state invalid,untracked synproxy mss 1440 wscale 9"));
        assert!(s.contains("tcp dport { 9100, 443 } ct state invalid drop"));
        assert_eq!(ruleset(&[], host).lines().count(), 2);
    }
}
