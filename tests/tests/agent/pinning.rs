//! The shield outlives the agent: programs, links and maps pinned in a bpffs of the test's own
//! ([`PinDir`]). Under traffic, `kill -9` and a restart hand no source a fresh burst and never
//! stop the drops; a block-listed source stays blocked, and block expiry and buckets keep
//! working while no agent runs; a graceful restart and an upgrade to another layout let not
//! one packet of a denied source through; `detach` leaves nothing behind.
//!
//! Counts only: what the server receives, and the pinned drop counters read from the test
//! process. Waits are for conditions (a log line, a counter moving), never timed asserts.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use limiter_agent::dataplane::boot_time_ns;
use limiter_common::{Addr, BlockEntry, CONFIG_FLAG_NO_BLOCK, Config, Counter, ipv4_mapped, names, reason};
use limiter_tests::{agent::PinDir, netns::Topology, rawsock::udp_socket, require_root};

use crate::{Agent, MARKER, UDP_PORT, agent_binary, policy, send_from_client_and_count, xdp_attached};

const START: Duration = Duration::from_secs(30);

/// Packets dropped so far, summed over CPUs and drop reasons, read from the pinned `STATS`.
fn pinned_drops(pins: &PinDir) -> u64 {
    let data = MapData::from_pin(pins.path().join(names::STATS)).expect("open the pinned STATS");
    let stats: PerCpuArray<MapData, Counter> =
        PerCpuArray::try_from(Map::from_map_data(data).unwrap()).expect("STATS is a per-CPU array");
    (0..reason::VERDICT_REASONS)
        .filter(|r| reason::is_drop(*r))
        .map(|r| stats.get(&r, 0).unwrap().iter().map(|c| c.packets).sum::<u64>())
        .sum()
}

/// Waits (at most 10 s) until the pinned drop count passes `above`; panics with `what`.
fn wait_drops_above(pins: &PinDir, above: u64, what: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = pinned_drops(pins);
        if d > above {
            return d;
        }
        assert!(Instant::now() < deadline, "{what}: drops stayed at {d} (needed more than {above})");
        thread::sleep(Duration::from_millis(20));
    }
}

fn block_map(pins: &PinDir) -> BpfHashMap<MapData, Addr, BlockEntry> {
    let data = MapData::from_pin(pins.path().join(names::BLOCK)).expect("open the pinned BLOCK");
    BpfHashMap::try_from(Map::from_map_data(data).unwrap()).expect("BLOCK is a hash")
}

/// Writes a block entry into the pinned list as any writer besides the agent must: clearing
/// `CONFIG_FLAG_NO_BLOCK` first, or the program skips the (empty-until-now) list.
fn block_pinned(pins: &PinDir, addr: Addr, expires_at_ns: u64) {
    let data = MapData::from_pin(pins.path().join(names::CONFIG)).expect("open the pinned CONFIG");
    let mut config: Array<MapData, Config> =
        Array::try_from(Map::from_map_data(data).unwrap()).expect("CONFIG is an array");
    let mut c = config.get(&0, 0).unwrap();
    c.flags &= !CONFIG_FLAG_NO_BLOCK;
    config.set(0, c, 0).unwrap();
    block_map(pins).insert(addr, BlockEntry { expires_at_ns }, 0).unwrap();
}

/// Sends datagrams from client `i` to the server, one every `gap`, until `stop`; counts them.
fn sender(
    topo: &Topology,
    i: usize,
    gap: Duration,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
) -> thread::JoinHandle<()> {
    let c = topo.client(i);
    let to: SocketAddr = (c.server.ipv4().unwrap(), UDP_PORT).into();
    let sock = udp_socket(&c.ns, (c.client.ipv4().unwrap(), 0).into()).unwrap();
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if sock.send_to(MARKER, to).is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            thread::sleep(gap);
        }
    })
}

/// Everything the server socket holds, by source.
fn received_by_source(server: &UdpSocket) -> HashMap<IpAddr, usize> {
    let mut by = HashMap::new();
    let mut buf = [0u8; 256];
    server.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
    while let Ok((len, from)) = server.recv_from(&mut buf) {
        if &buf[..len] == MARKER {
            *by.entry(from.ip()).or_insert(0) += 1;
        }
    }
    by
}

fn start(topo: &Topology, policy: &Path, pins: &PinDir, extra: &[&str]) -> Agent {
    let arg = pins.arg();
    let mut args = vec!["--pin-dir", arg.as_str()];
    args.extend_from_slice(extra);
    let mut agent = Agent::start(topo, policy, &args);
    agent.wait_for(&["attached to s0"], START);
    // s1, when shielded too, is attached after s0: wait for it before sending through it.
    if extra.contains(&"s1") {
        agent.wait_for(&["attached to s1"], START);
    }
    agent
}

fn stop(mut agent: Agent, sig: libc::c_int) {
    // The first stats line comes from the run loop: the agent is past its start.
    if sig != libc::SIGKILL && !agent.seen.iter().any(|l| l.contains("stats:")) {
        agent.wait_for(&["stats:"], Duration::from_secs(10));
    }
    agent.signal(sig);
    agent.child.wait_timeout(Duration::from_secs(10)).unwrap().expect("the agent exits");
}

#[test]
fn kill_9_under_traffic_and_a_restart_keep_dropping_and_hand_out_no_fresh_burst() {
    require_root();
    let topo = Topology::new("kill9", 1).unwrap();
    let pins = PinDir::new("kill9");
    let dir = crate::TempDir::new("kill9");
    let file = dir.write("policy.yaml", &policy(10, "Hour"));
    let server = udp_socket(&topo.server, (Ipv4Addr::UNSPECIFIED, UDP_PORT).into()).unwrap();

    let agent = start(&topo, &file, &pins, &[]);
    let (halt, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let traffic = sender(&topo, 0, Duration::from_millis(2), Arc::clone(&halt), Arc::clone(&sent));
    let d1 = wait_drops_above(&pins, 0, "with the agent running");

    stop(agent, libc::SIGKILL);
    assert!(xdp_attached(&topo), "XDP stays attached after kill -9");
    let d2 = wait_drops_above(&pins, d1 + 20, "after kill -9, with no agent");

    // `top` finds no agent on the socket and says so, reading the pinned shield instead.
    let socket = dir.path("nobody.sock");
    let top = |json: &[&str]| {
        let out = Command::new(agent_binary())
            .args(["top", "--once", "--interval", "200ms", "--pin-dir", &pins.arg(), "--socket"])
            .arg(&socket)
            .args(json)
            .output()
            .unwrap();
        assert!(out.status.success(), "top: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let json: serde_json::Value = serde_json::from_str(&top(&["--json"])).unwrap();
    let unattended = &json["unattended"];
    assert_eq!(unattended["agent_stopped_unix_s"], 0, "killed, not stopped: {json}");
    assert!(unattended["policy"].as_str().is_some_and(|p| p.starts_with("agent-test")), "{json}");
    assert_eq!(json["interfaces"][0]["name"], "s0", "{json}");
    assert!(json["rules"][0]["dropped_packets"].as_u64().is_some_and(|d| d >= d1), "{json}");
    let text = top(&[]);
    assert!(text.starts_with("NO AGENT RUNNING: the shield pinned in"), "{text}");
    assert!(text.contains("did not stop cleanly"), "{text}");

    let mut agent = start(&topo, &file, &pins, &[]);
    assert!(
        agent.seen.iter().any(|l| l.contains("adopted the shield pinned in") && l.contains("did not stop cleanly")),
        "{:#?}",
        agent.seen
    );
    let d3 = wait_drops_above(&pins, d2 + 20, "after the restart");
    // 10x the limit over the whole run.
    while sent.load(Ordering::Relaxed) < 100 {
        thread::sleep(Duration::from_millis(20));
    }
    halt.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    let sent = sent.load(Ordering::Relaxed);
    let got: usize = received_by_source(&server).values().sum();
    eprintln!("sent {sent}, received {got}, drops {d1} -> {d2} -> {d3}");
    assert_eq!(got, 10, "the 10 of the first burst, none after the kill or the restart (of {sent} sent)");
    agent.signal(libc::SIGTERM);
    agent.wait_for(&["leaving the shield in force"], Duration::from_secs(10));
}

#[test]
fn a_blocked_source_stays_blocked_across_a_restart_and_expiry_and_buckets_work_with_no_agent() {
    require_root();
    let topo = Topology::new("pinblock", 2).unwrap();
    let pins = PinDir::new("pinblock");
    let dir = crate::TempDir::new("pinblock");
    let file = dir.write("policy.yaml", &policy(30, "Hour"));
    let server = udp_socket(&topo.server, (Ipv4Addr::UNSPECIFIED, UDP_PORT).into()).unwrap();
    let agent = start(&topo, &file, &pins, &["--iface", "s1"]);

    // Block client 0 for an hour and client 1 for two seconds, in the pinned block list.
    let (long, short) = (topo.client(0).client.ipv4().unwrap(), topo.client(1).client.ipv4().unwrap());
    let now = boot_time_ns();
    block_pinned(&pins, ipv4_mapped(long.octets()), now + 3_600_000_000_000);
    let short_expiry = now + 2_000_000_000;
    block_pinned(&pins, ipv4_mapped(short.octets()), short_expiry);
    assert_eq!(send_from_client_and_count(&topo, 0, &server, 10), 0, "client 0 blocked");

    stop(agent, libc::SIGKILL);
    assert_eq!(send_from_client_and_count(&topo, 0, &server, 10), 0, "still blocked with no agent");
    while boot_time_ns() <= short_expiry {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(send_from_client_and_count(&topo, 1, &server, 20), 20, "client 1's block expired with no agent");
    assert_eq!(send_from_client_and_count(&topo, 1, &server, 20), 10, "and its bucket (30/hour) ran out");

    let agent = start(&topo, &file, &pins, &["--iface", "s1"]);
    assert!(agent.seen.iter().any(|l| l.contains("s1: kept its pinned link")), "{:#?}", agent.seen);
    assert_eq!(send_from_client_and_count(&topo, 0, &server, 10), 0, "client 0 still blocked after the restart");
    assert_eq!(send_from_client_and_count(&topo, 1, &server, 10), 0, "client 1's bucket is still empty");
    assert!(block_map(&pins).get(&ipv4_mapped(long.octets()), 0).is_ok(), "the block entry is still pinned");
}

/// A policy that denies `denied` and limits everyone to 10 packets an hour.
fn deny_policy(denied: Ipv4Addr) -> String {
    policy(10, "Hour").replace("  rateLimit:\n", &format!("  deny: [\"{denied}/32\"]\n  rateLimit:\n"))
}

#[test]
fn a_graceful_restart_and_an_upgrade_to_another_layout_let_nothing_through() {
    require_root();
    let topo = Topology::new("pinswap", 2).unwrap();
    let pins = PinDir::new("pinswap");
    let dir = crate::TempDir::new("pinswap");
    let (denied, limited) = (topo.client(0).client.ipv4().unwrap(), topo.client(1).client.ipv4().unwrap());
    let file = dir.write("policy.yaml", &deny_policy(denied));
    let server = udp_socket(&topo.server, (Ipv4Addr::UNSPECIFIED, UDP_PORT).into()).unwrap();
    let both = ["--iface", "s1"];

    let agent = start(&topo, &file, &pins, &both);
    let halt = Arc::new(AtomicBool::new(false));
    let counts = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let senders: Vec<_> =
        (0..2).map(|i| sender(&topo, i, Duration::from_millis(1), Arc::clone(&halt), Arc::clone(&counts[i]))).collect();
    let d = wait_drops_above(&pins, 50, "with the first agent");

    // Graceful restart: the program stays, the next agent adopts it.
    stop(agent, libc::SIGTERM);
    let d = wait_drops_above(&pins, d + 20, "between the agents");
    let agent = start(&topo, &file, &pins, &both);
    assert!(agent.seen.iter().any(|l| l.contains("adopted the shield pinned in")), "{:#?}", agent.seen);
    let d = wait_drops_above(&pins, d + 20, "after the graceful restart");

    // Upgrade: this agent's layout stamp differs, so it swaps in fresh maps under traffic.
    stop(agent, libc::SIGTERM);
    let mut agent = start(&topo, &file, &pins, &[&both[..], &["--layout-salt", "1"]].concat());
    let line = agent.seen.iter().find(|l| l.contains("upgraded the shield")).cloned().unwrap_or_default();
    assert!(line.contains("buckets of 1 unchanged rules") && line.contains("reset: counters"), "{:#?}", agent.seen);
    // Drops are counted in the fresh maps now: they start from zero.
    wait_drops_above(&pins, 20, "after the upgrade");
    let _ = d;
    halt.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
    let got = received_by_source(&server);
    let sent: Vec<usize> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    eprintln!("sent {sent:?}, received {got:?}");
    assert_eq!(got.get(&IpAddr::V4(denied)).copied().unwrap_or(0), 0, "not one packet of the denied source");
    assert_eq!(got.get(&IpAddr::V4(limited)).copied().unwrap_or(0), 10, "the limited source: its first 10 only");
    agent.signal(libc::SIGTERM);
    agent.wait_for(&["leaving the shield in force"], Duration::from_secs(10));
}

/// The ids of the program on `iface` and of the pinned maps.
fn kernel_ids(topo: &Topology, iface: &str, pins: &PinDir) -> (u32, Vec<u32>) {
    let out = topo.server.ip(&["-d", "link", "show", iface]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let prog = text
        .split("prog/xdp id ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no XDP program on {iface}: {text}"));
    let maps = pins
        .entries()
        .iter()
        .filter(|n| n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(|n| aya::maps::MapInfo::from_pin(pins.path().join(n)).unwrap().id())
        .collect();
    (prog, maps)
}

#[test]
fn detach_leaves_no_link_program_or_pin_and_detach_on_exit_restores_the_old_behaviour() {
    require_root();
    let topo = Topology::new("pindetach", 2).unwrap();
    let pins = PinDir::new("pindetach");
    let dir = crate::TempDir::new("pindetach");
    let file = dir.write("policy.yaml", &policy(5, "Hour"));
    let server = udp_socket(&topo.server, (Ipv4Addr::UNSPECIFIED, UDP_PORT).into()).unwrap();
    let s1_attached =
        || String::from_utf8_lossy(&topo.server.ip(&["link", "show", "s1"]).unwrap().stdout).contains("xdp");

    let agent = start(&topo, &file, &pins, &["--iface", "s1", "--detach-on-exit"]);
    stop(agent, libc::SIGTERM);
    assert!(!xdp_attached(&topo) && !s1_attached(), "--detach-on-exit detaches");
    assert!(pins.entries().is_empty(), "--detach-on-exit leaves no pin: {:?}", pins.entries());

    let agent = start(&topo, &file, &pins, &["--iface", "s1"]);
    stop(agent, libc::SIGTERM);
    let (prog, maps) = kernel_ids(&topo, "s0", &pins);
    assert!(!maps.is_empty());
    let detach = |extra: &[&str]| {
        let out = Command::new(agent_binary()).args(["detach", "--pin-dir", &pins.arg()]).args(extra).output().unwrap();
        assert!(out.status.success(), "detach: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let line = detach(&["--iface", "s1"]);
    assert!(line.contains("detached s1") && line.contains("still shielded: s0"), "{line}");
    assert!(!s1_attached() && xdp_attached(&topo), "only s1 detached");
    assert_eq!(send_from_client_and_count(&topo, 0, &server, 10), 5, "s0 still shielded");

    let line = detach(&[]);
    assert!(line.contains("detached s0") && line.contains("program and maps removed"), "{line}");
    assert!(!xdp_attached(&topo), "no XDP on s0");
    assert!(!pins.path().exists(), "the pin directory is gone");
    // The kernel frees the program and maps once their last reference goes (after an RCU
    // grace period): wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let progs: Vec<u32> = aya::programs::loaded_programs().filter_map(|p| p.ok()).map(|p| p.id()).collect();
        let live: Vec<u32> = aya::maps::loaded_maps().filter_map(|m| m.ok()).map(|m| m.id()).collect();
        let left: Vec<u32> = maps.iter().copied().filter(|m| live.contains(m)).collect();
        if !progs.contains(&prog) && left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still loaded after detach: program {prog}? maps {left:?}");
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(send_from_client_and_count(&topo, 0, &server, 10), 10, "traffic flows unlimited after detach");
    assert!(detach(&[]).contains("nothing pinned"));
}
