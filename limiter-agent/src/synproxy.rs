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
//! Connections that were open before conntrack started tracking (it starts when this table
//! is first installed: its `ct` expressions load it) are invalid to it too, and would be
//! taken for bad cookies. The data path's TC-ingress marker sets
//! [`SYNPROXY_ESTABLISHED_MARK`] on every segment of a proxied port whose 4-tuple has a
//! socket other than a listener, and the first rule accepts those; a cookie ACK only ever
//! finds the listener, so it still goes through SYNPROXY.
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

use limiter_common::synproxy::SYNPROXY_ESTABLISHED_MARK;

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
    let mark = SYNPROXY_ESTABLISHED_MARK;
    script.push_str(&format!(
        "table inet {TABLE} {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tmeta nfproto ipv4 tcp dport {{ {set} }} meta mark and {mark:#010x} == {mark:#010x} accept\n\
         \t\tmeta nfproto ipv4 tcp dport {{ {set} }} ct state invalid,untracked {}\n\
         \t\tmeta nfproto ipv4 tcp dport {{ {set} }} ct state invalid drop\n\
         \t}}\n\
         }}\n",
        opts(host.mss4),
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

/// The IPv6 rules, as `ip6tables-legacy` commands: nftables' own `synproxy` expression
/// checks an IPv6 segment's checksum with the IPv4 routine (`nf_ip_checksum` in
/// `nft_synproxy_do_eval`), so every IPv6 ACK whose checksum the driver did not already
/// verify (XDP on veth, many virtual NICs) is dropped there without a count; `iptables-nft`
/// translates `-j SYNPROXY` into that same expression. The xtables target
/// (`ip6t_SYNPROXY`) checks with the IPv6 routine.
fn v6_commands(ports: &[u16], host: SynproxyHost) -> Vec<Vec<String>> {
    let ports = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let rule = |tail: &[&str]| {
        let head = ["-A", V6_CHAIN, "-p", "tcp", "-m", "multiport", "--dports", &ports, "-m", "conntrack"];
        head.iter().chain(tail).map(|s| (*s).to_owned()).collect::<Vec<String>>()
    };
    let wscale = host.wscale.to_string();
    let mss = host.mss6.to_string();
    let mark = format!("{SYNPROXY_ESTABLISHED_MARK:#x}/{SYNPROXY_ESTABLISHED_MARK:#x}");
    let head = ["-A", V6_CHAIN, "-p", "tcp", "-m", "multiport", "--dports", &ports, "-m", "mark", "--mark", &mark];
    vec![
        head.iter().chain(&["-j", "RETURN"]).map(|s| (*s).to_owned()).collect(),
        rule(&[
            "--ctstate",
            "INVALID,UNTRACKED",
            "-j",
            "SYNPROXY",
            "--sack-perm",
            "--timestamp",
            "--wscale",
            &wscale,
            "--mss",
            &mss,
        ]),
        rule(&["--ctstate", "INVALID", "-j", "DROP"]),
    ]
}

const V6_CHAIN: &str = "LIMITER_SYNPROXY";
const IP6TABLES: &str = "ip6tables-legacy";

fn ip6tables(args: &[&str]) -> Result<bool, SynproxyError> {
    let out = Command::new(IP6TABLES).args(args).output().map_err(SynproxyError::Spawn)?;
    Ok(out.status.success())
}

fn ip6tables_checked(args: &[String]) -> Result<(), SynproxyError> {
    let out = Command::new(IP6TABLES).args(args).output().map_err(SynproxyError::Spawn)?;
    if !out.status.success() {
        return Err(SynproxyError::Nft {
            status: format!("{IP6TABLES} {}: {}", args.join(" "), out.status),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Replaces the IPv6 chain's rules and makes sure INPUT jumps to it (idempotent).
fn apply_v6(ports: &[u16], host: SynproxyHost) -> Result<(), SynproxyError> {
    let _ = ip6tables(&["-N", V6_CHAIN])?;
    ip6tables_checked(&["-F".to_owned(), V6_CHAIN.to_owned()])?;
    for cmd in v6_commands(ports, host) {
        ip6tables_checked(&cmd)?;
    }
    if !ip6tables(&["-C", "INPUT", "-j", V6_CHAIN])? {
        ip6tables_checked(&["-I".to_owned(), "INPUT".to_owned(), "-j".to_owned(), V6_CHAIN.to_owned()])?;
    }
    Ok(())
}

fn remove_v6() -> Result<(), SynproxyError> {
    while ip6tables(&["-D", "INPUT", "-j", V6_CHAIN])? {}
    let _ = ip6tables(&["-F", V6_CHAIN])?;
    let _ = ip6tables(&["-X", V6_CHAIN])?;
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
    apply_v6(ports, host)?;
    // After the table: its conntrack expressions are what load nf_conntrack, which owns the
    // sysctl.
    set_loose("0")
}

/// Removes the table if present and gives conntrack back its default (loose pick-up of
/// connections in progress). Idempotent.
pub fn remove() -> Result<(), SynproxyError> {
    nft(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"))?;
    remove_v6()?;
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
        let accept = "meta nfproto ipv4 tcp dport { 9100, 443 } meta mark and 0x02000000 == 0x02000000 accept";
        let proxy = "meta nfproto ipv4 tcp dport { 9100, 443 } ct state invalid,untracked synproxy mss 1460 wscale 9 timestamp sack-perm";
        assert!(s.find(accept).is_some_and(|a| s.find(proxy).is_some_and(|p| a < p)), "marked segments first:\n{s}");
        assert!(s.contains("meta nfproto ipv4 tcp dport { 9100, 443 } ct state invalid drop"));
        let v6 = v6_commands(&[9100, 443], host);
        assert_eq!(
            v6[0].join(" "),
            "-A LIMITER_SYNPROXY -p tcp -m multiport --dports 9100,443 -m mark --mark 0x2000000/0x2000000 -j RETURN"
        );
        let v6 = &v6[1..];
        assert_eq!(
            v6[0].join(" "),
            "-A LIMITER_SYNPROXY -p tcp -m multiport --dports 9100,443 -m conntrack --ctstate INVALID,UNTRACKED \
             -j SYNPROXY --sack-perm --timestamp --wscale 9 --mss 1440"
        );
        assert_eq!(
            v6[1].join(" "),
            "-A LIMITER_SYNPROXY -p tcp -m multiport --dports 9100,443 -m conntrack --ctstate INVALID -j DROP"
        );
        assert_eq!(ruleset(&[], host).lines().count(), 2);
    }
}
