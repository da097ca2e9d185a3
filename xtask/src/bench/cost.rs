//! The cost sections of `bench/REPORT.md`: the goals (ratios against the floor and the peers,
//! at the top), the per-packet tables and the NIC-like flood.

use std::fmt::Write as _;

use serde_json::Value;

use super::report::{f, repeat_cmd, rows, thousands};

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn peer_row<'a>(pp: &'a Value, path: &str, key: &str, n: f64) -> Option<&'a Value> {
    arr(&pp["peer"]["rows"]).iter().find(|r| r["path"] == path && f(&r[key]) == n)
}

fn beside<'a>(pp: &'a Value, check: &str) -> Option<&'a Value> {
    arr(&pp["peer"]["limiter_beside"]).iter().find(|r| r["check"] == check)
}

fn check_row<'a>(pp: &'a Value, check: &str, path: &str, sources: f64) -> Option<&'a Value> {
    rows(pp).iter().find(|r| r["check"] == check && r["path"] == path && f(&r["sources"]) == sources)
}

/// One goal: the measured value, the bound, whether lower is better (always here).
struct Goal {
    name: &'static str,
    measured: f64,
    goal: f64,
    unit: &'static str,
    detail: String,
    bound: &'static str,
}

fn goals(r: &Value) -> Vec<Goal> {
    let mut out = Vec::new();
    let pp = &r["per_packet"];
    if let (Some(l), Some(x)) = (beside(pp, "deny hit"), peer_row(pp, "matched", "entries", 1.0)) {
        out.push(Goal {
            name: "list hit : xdp-filter matched",
            measured: f(&l["cpu_ns"]) / f(&x["cpu_ns"]),
            goal: 1.0,
            unit: "×",
            detail: format!(
                "{:.1} ns : {:.1} ns (the deny-hit check, a deny list of one prefix holding the source, \
                 measured right beside the peer)",
                f(&l["cpu_ns"]),
                f(&x["cpu_ns"])
            ),
            bound: "before the list is probed the limiter parses further than xdp-filter (VLAN tags, IPv6 \
                    extension chains, fragments) and reads its config; its prefix lists are LPM tries and its \
                    host lists hashes keyed by a set number and a 16-byte address (IPv4 mapped into IPv6), \
                    where xdp-filter hashes 4 bytes; and every drop also updates the top-dropped-sources \
                    table",
        });
    }
    if let (Some(l), Some(x)) = (beside(pp, "per-source bucket"), peer_row(pp, "unmatched", "sources", 1.0)) {
        out.push(Goal {
            name: "per-source bucket pass : xdp-filter unmatched",
            measured: f(&l["cpu_ns"]) / f(&x["cpu_ns"]),
            goal: 1.3,
            unit: "×",
            detail: format!("{:.1} ns : {:.1} ns (one source)", f(&l["cpu_ns"]), f(&x["cpu_ns"])),
            bound: "a pass runs what xdp-filter does not: the three list probes, the port's rule list, \
                    the rule walk, a clock read, a bucket lookup in the per-source LRU table and a \
                    compare-and-swap, and the counters",
        });
    }
    let one = check_row(pp, "per-source bucket", "pass", 1.0);
    let max_sources = rows(pp).iter().map(|x| f(&x["sources"])).fold(0.0, f64::max);
    if let (Some(a), Some(b)) = (one, check_row(pp, "per-source bucket", "pass", max_sources))
        && max_sources > 1.0
    {
        out.push(Goal {
            name: "per-source pass, many sources : one source",
            measured: f(&b["cpu_ns"]) / f(&a["cpu_ns"]),
            goal: 2.0,
            unit: "×",
            detail: format!(
                "{:.1} ns over {} sources : {:.1} ns over one",
                f(&b["cpu_ns"]),
                thousands(max_sources),
                f(&a["cpu_ns"])
            ),
            bound: "each new source's bucket is a cache miss (the table is ~100 MiB, far beyond the CPU \
                    caches), plus the LRU bookkeeping",
        });
    }
    if let Some(nic) = r.get("nic") {
        out.push(Goal {
            name: "NIC-like receive CPU per Mframe : nftables",
            measured: f(&nic["ratio_limiter_to_nftables"]),
            goal: 1.0 / 3.0,
            unit: "×",
            detail: "threaded-NAPI thread run time per million frames at a 90% drop mix".into(),
            bound: "what the filter does not remove: the veth's own per-frame NAPI work (ring, xdp_frame \
                    return) and the skb, IP and UDP work for the 10% that pass are the same for every filter",
        });
    }
    if let Some(mem) = r.get("memory")
        && let Some(row) = rows(mem).iter().rev().find(|x| f(&x["capacity"]) == f(&mem["default_capacity"]))
    {
        out.push(Goal {
            name: "kernel bytes per tracked source",
            measured: f(&row["bytes_per_slot"]),
            goal: 80.0,
            unit: " bytes",
            detail: format!("memlock of the per-source table / capacity ({})", thousands(f(&row["capacity"]))),
            bound: "the kernel's LRU hash element: 48 bytes of its own (hash-chain node, LRU node, hash) \
                    plus the key and the value each rounded up to 8, plus a 16-byte hash bucket per slot \
                    (the bucket array is sized to the capacity rounded up to a power of two); with the \
                    24-byte key (rule id, port, protocol, 16-byte source) and the 16-byte bucket (the \
                    TAT and the refund word that keeps refunds out of the charges' compare-and-swap) \
                    that is 48 + 24 + 16 + 16 = 104. 80 leaves 16 bytes for key and value together, less \
                    than an IPv6 source alone: only a hashed key (with collisions) or a table the kernel \
                    does not offer gets there",
        });
    }
    out
}

/// The goals table, at the top of the report.
pub fn goals_section(md: &mut String, r: &Value) {
    let goals = goals(r);
    if goals.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "## Goals (ratios measured in this run)\n\n| goal | measured | target | | what was compared |\n|---|---:|---:|---|---|"
    );
    for g in &goals {
        let met = g.measured <= g.goal;
        let verdict =
            if met { "met".to_owned() } else { format!("missed by {:.0}%", (g.measured / g.goal - 1.0) * 100.0) };
        let fmt = |x: f64| if g.unit == "×" { format!("{x:.2}×") } else { format!("{x:.0}{}", g.unit) };
        let _ = writeln!(md, "| {} | {} | ≤ {} | {verdict} | {} |", g.name, fmt(g.measured), fmt(g.goal), g.detail);
    }
    let missed: Vec<&Goal> = goals.iter().filter(|g| g.measured > g.goal).collect();
    if !missed.is_empty() {
        let _ = writeln!(md, "\nWhat bounds the missed ones:\n");
        for g in missed {
            let _ = writeln!(md, "- **{}**: {}.", g.name, g.bound);
        }
    }
    let _ = writeln!(md);
}

/// Headline lines for the per-packet and NIC-like sections.
pub fn headline_lines(r: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    let pp = &r["per_packet"];
    if let (Some(d), Some(s), Some(m), Some(u)) = (
        beside(pp, "deny hit"),
        beside(pp, "per-source bucket"),
        peer_row(pp, "matched", "entries", 1.0),
        peer_row(pp, "unmatched", "sources", 1.0),
    ) {
        lines.push(format!(
            "- Per packet, against Debian's xdp-filter on the same frames: deny-list hit {:.0} ns vs its matched path {:.0} ns ({:.2}×); per-source bucket pass {:.0} ns vs its unmatched path {:.0} ns ({:.2}×). Trivial XDP program: {:.1} ns.",
            f(&d["cpu_ns"]),
            f(&m["cpu_ns"]),
            f(&d["cpu_ns"]) / f(&m["cpu_ns"]),
            f(&s["cpu_ns"]),
            f(&u["cpu_ns"]),
            f(&s["cpu_ns"]) / f(&u["cpu_ns"]),
            f(&d["trivial_cpu_ns"])
        ));
    }
    let max_sources = rows(pp).iter().map(|x| f(&x["sources"])).fold(0.0, f64::max);
    if let (Some(a), Some(b)) =
        (check_row(pp, "per-source bucket", "pass", 1.0), check_row(pp, "per-source bucket", "pass", max_sources))
    {
        lines.push(format!(
            "- Per-source bucket pass over {} distinct sources: {:.0} ns ({:.2}× one source); new source every frame with the table full: {:.0} ns.",
            thousands(max_sources),
            f(&b["cpu_ns"]),
            f(&b["cpu_ns"]) / f(&a["cpu_ns"]),
            f(&pp["new_source"]["cpu_ns"])
        ));
    }
    if let Some(nic) = r.get("nic") {
        lines.push(format!(
            "- NIC-like flood (xdp_frames through a redirect chain, 90% drop mix): receive CPU per million frames limiter : nftables = {:.2}, : iptables hashlimit = {:.2}, : xdp-filter = {:.2}, : no filter = {:.2}.",
            f(&nic["ratio_limiter_to_nftables"]),
            f(&nic["ratio_limiter_to_iptables"]),
            f(&nic["ratio_limiter_to_xdp_filter"]),
            f(&nic["ratio_limiter_to_none"])
        ));
    }
    lines
}

pub fn per_packet(md: &mut String, pp: &Value, command: &str) {
    let _ = writeln!(md, "## Per-packet cost (BPF_PROG_TEST_RUN, many sources)\n");
    let _ = writeln!(
        md,
        "How: `BPF_PROG_TEST_RUN` repeats one frame; on its own it would time one cache-hot bucket. So every \
         figure is taken behind a harness, a 29-instruction XDP program written out in the bench \
         (tests/src/bin/limiter-bench/bpf.rs), that rewrites the frame's IPv4 source on every run \
         (`base + (i mod K) × stride`, `i` counted across calls in an array map) and tail-calls the program \
         under test: one call with `repeat` = {} runs touches K distinct sources, K distinct keys in the \
         program's maps. The same harness in front of the trivial program (`r0 = XDP_PASS; exit`) is timed \
         back to back and subtracted, so a figure is the program's own cost:\n\n\
         `cost = CPU(harness → program) − CPU(harness → trivial) + CPU(trivial)`\n\n\
         CPU time is the calling thread's, of a 2 × repeat call minus a repeat call, per run (this cancels \
         the fixed cost of a call). Every measured call is checked against the program's own counters: \
         all runs took the intended path. The harness itself costs {:.1} ns per run (median).\n\nRepeat: {}\n",
        thousands(f(&pp["repeat"])),
        super::report::median(&rows(pp).iter().map(|x| f(&x["harness_ns"])).collect::<Vec<_>>()),
        repeat_cmd(command, "per_packet")
    );
    let mut sources: Vec<f64> = rows(pp).iter().map(|x| f(&x["sources"])).collect();
    sources.dedup();
    let _ = writeln!(md, "### Each check over K distinct sources\n");
    let _ = write!(md, "| check | path |");
    for k in &sources {
        let _ = write!(md, " {} sources: ns | × trivial |", thousands(*k));
    }
    let _ = write!(md, "\n|---|---|");
    for _ in &sources {
        let _ = write!(md, "---:|---:|");
    }
    let _ = writeln!(md);
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for row in rows(pp) {
        let (check, path) = (row["check"].as_str().unwrap_or("?"), row["path"].as_str().unwrap_or("?"));
        if seen.contains(&(check, path)) {
            continue;
        }
        seen.push((check, path));
        let _ = write!(md, "| {check} | {path} |");
        for k in &sources {
            match check_row(pp, check, path, *k) {
                Some(x) => {
                    let _ = write!(md, " {:.1} | {:.1} |", f(&x["cpu_ns"]), f(&x["ratio"]));
                }
                None => {
                    let _ = write!(md, " – | – |");
                }
            }
        }
        let _ = writeln!(md);
    }
    for path in ["matched", "unmatched"] {
        let _ = write!(md, "| xdp-filter | {path} |");
        for k in &sources {
            match peer_row(pp, path, "sources", *k) {
                Some(x) => {
                    let _ = write!(md, " {:.1} | {:.1} |", f(&x["cpu_ns"]), f(&x["ratio"]));
                }
                None => {
                    let _ = write!(md, " – | – |");
                }
            }
        }
        let _ = writeln!(md);
    }
    let trivial = super::report::median(&rows(pp).iter().map(|x| f(&x["trivial_cpu_ns"])).collect::<Vec<_>>());
    let _ = writeln!(
        md,
        "| trivial XDP (floor) | pass |{}\n",
        sources.iter().map(|_| format!(" {trivial:.1} | 1.0 |")).collect::<String>()
    );
    let _ = writeln!(
        md,
        "The allow and deny rows' sources all fall in one listed prefix (100.64.0.0/10); the per-source \
         table holds one entry per source touched. xdp-filter ({}; {}) is loaded by its own CLI on a veth of \
         the bench and run from its pin; matched: its deny list holds exactly the sources cycled (exact \
         hosts, its IPv4 map holds at most 10,000), unmatched: none of them.\n",
        pp["peer"]["program"].as_str().unwrap_or("?"),
        pp["peer"]["features"].as_str().unwrap_or("?")
    );
    let _ = writeln!(md, "### Lists of many entries (one source per entry, every entry hit)\n");
    let _ = writeln!(
        md,
        "| list | entries | kind | ns | × trivial | xdp-filter matched, same hosts: ns |\n|---|---:|---|---:|---:|---:|"
    );
    for row in arr(&pp["lists"]) {
        let n = f(&row["entries"]);
        let peer = if row["kind"] == "hosts" && row["list"] == "deny" {
            peer_row(pp, "matched", "entries", n)
                .map(|x| format!("{:.1}", f(&x["cpu_ns"])))
                .unwrap_or("– (map holds 10,000)".into())
        } else {
            String::new()
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {:.1} | {peer} |",
            row["list"].as_str().unwrap_or("?"),
            thousands(n),
            row["kind"].as_str().unwrap_or("?"),
            f(&row["cpu_ns"]),
            f(&row["ratio"])
        );
    }
    let ns = &pp["new_source"];
    let _ = writeln!(
        md,
        "\n### New source every frame\n\nPer-source bucket pass where every frame comes from a source the \
         table has never seen, with the table (capacity {}) already full: each run inserts a bucket and the \
         LRU evicts one. **{:.1} ns** per frame ({:.1}× trivial); {} inserts failed.\n",
        thousands(f(&ns["capacity"])),
        f(&ns["cpu_ns"]),
        f(&ns["ratio"]),
        thousands(f(&ns["insert_failures"]))
    );
    let two = &pp["two_cpus"];
    let _ = writeln!(
        md,
        "### One shared bucket from both CPUs\n\nA per-port bucket (one bucket for all sources) hit by \
         `BPF_PROG_TEST_RUN` calls started together on CPU 0 and CPU 1: **{:.1} ns** per run on each CPU, \
         against {:.1} ns from one CPU alone ({:.2}×); the trivial program the same two ways: {:.1} and {:.1} \
         ns ({:.2}×, what the machine adds when both CPUs are busy). With both CPUs doing nothing but \
         charging that one bucket, {} of {} charges lost six compare-and-swaps in a row to the other CPU's \
         charges and refused their packet (`bucket_contended`, the safe side).\n",
        f(&two["both_cpu_ns"]),
        f(&two["alone_cpu_ns"]),
        f(&two["slowdown"]),
        f(&two["trivial_both_cpu_ns"]),
        f(&two["trivial_alone_cpu_ns"]),
        f(&two["trivial_slowdown"]),
        thousands(f(&two["contended_refusals"])),
        thousands(f(&two["runs_total"]))
    );
}

pub fn nic(md: &mut String, nic: &Value, command: &str) {
    let _ = writeln!(md, "## NIC-like flood: xdp_frames through a redirect chain\n");
    let _ = writeln!(
        md,
        "How: live-frames injection (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`) is refused with \
         EPERM on this machine kind, so frames reach the shielded veth the way a NIC delivers them through a \
         redirect chain: a generator (AF_PACKET, CPU 0) writes into veth g0; its peer f0 runs a native XDP \
         program (`bpf_redirect`, 4 instructions) that sends every frame into veth s1, whose peer, the \
         shielded interface in the server namespace, receives them as xdp_frames: its XDP program runs before \
         any skb exists and only what passes gets one. The shielded veth has threaded NAPI \
         (`/sys/class/net/IF/threaded`), its NAPI thread pinned to CPU 1: all of its receive work (XDP, skb, \
         netfilter, IP, UDP) runs in that thread, and the thread's scheduler run time is the receive cost. \
         {} sources, {} frames/s, {} s; the rate limiters allow {}/s per source (depth {}), which drops \
         about 90%; xdp-filter denies {} of the sources (90%). Filters that are not XDP programs (nftables, \
         iptables, none) sit behind the trivial `XDP_PASS` program, which veth needs to receive xdp_frames \
         at all. Admitted: `Udp: InDatagrams + RcvbufErrors` in the server namespace after draining the \
         socket.\n\nRepeat: {}\n",
        nic["sources"],
        thousands(f(&nic["offered_pps"])),
        nic["seconds"],
        nic["rate_per_source"],
        nic["rate_per_source"],
        nic["denied_sources"],
        repeat_cmd(command, "nic")
    );
    let _ = writeln!(
        md,
        "| filter | offered | admitted | admitted share | NAPI thread s | receive CPU ms per million frames |\n|---|---:|---:|---:|---:|---:|"
    );
    for row in rows(nic) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1}% | {:.3} | **{:.0}** |",
            row["label"].as_str().unwrap_or("?"),
            thousands(f(&row["offered"])),
            thousands(f(&row["admitted"])),
            100.0 * f(&row["admitted_share"]),
            f(&row["napi_s"]),
            f(&row["cpu_ms_per_mframe"])
        );
    }
    let _ = writeln!(
        md,
        "\nLimiter : nftables = **{:.2}**, : iptables hashlimit = {:.2}, : xdp-filter = {:.2}, : no filter = {:.2}.\n",
        f(&nic["ratio_limiter_to_nftables"]),
        f(&nic["ratio_limiter_to_iptables"]),
        f(&nic["ratio_limiter_to_xdp_filter"]),
        f(&nic["ratio_limiter_to_none"])
    );
}
