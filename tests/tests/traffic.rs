//! Real traffic over veth pairs between network namespaces the tests create, through the XDP
//! program attached (native mode) to the server side of each pair. These reproduce the
//! gateway documentation's rate-limit exercises at L4.
//!
//! What is admitted is measured at the receiver (sockets or an AF_PACKET tap on the server
//! interface, which sees a frame only if XDP passed it), independently of the program's own
//! counters. Where the expected count depends on elapsed time, it is computed from the
//! measured send times with the same bucket function the kernel uses; no test asserts on a
//! duration.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use limiter_agent::{
    dataplane::{AttachMode, Dataplane, LoadOptions},
    plan::{CountKind, KernelPlan, KernelRule, Limit, ListEntry, PortTarget, Protocol, SourceSelector, Unit},
};
use limiter_common::{BucketParams, gcra, reason};
use limiter_tests::{
    netns::Topology,
    packet::{Packet, is_udp_to},
    rawsock::{RawReceiver, RawSender, udp_socket},
    require_root,
};
use rand::{Rng, SeedableRng, rngs::SmallRng};

const UDP_PORT: u16 = 9000;
const TCP_PORT: u16 = 8080;
const MARKER: &[u8] = b"limiter-traffic";

/// A limit of `requests` per `unit` with `burst`.
fn limit(requests: u64, unit: Unit, burst: u64) -> Limit {
    Limit { requests, unit, burst }
}

/// A rule on one port; `distinct`: a bucket per source, else one shared bucket.
fn rule(name: &str, count: CountKind, limit: Limit, target: (u16, Protocol), distinct: bool) -> KernelRule {
    KernelRule {
        name: format!("test/{name}"),
        targets: vec![PortTarget { port: target.0, protocol: target.1 }],
        source: SourceSelector::everyone(distinct),
        count,
        limit,
        shadow: false,
        global: false,
    }
}

/// Loads the program with `plan` and attaches it natively to the server side of every client.
fn shield(topo: &Topology, plan: &KernelPlan, options: LoadOptions) -> Dataplane {
    let mut dp = Dataplane::load(options).expect("load the XDP program");
    dp.apply(plan).expect("apply the plan");
    let ifaces: Vec<String> = topo.clients.iter().map(|c| c.server.name.clone()).collect();
    topo.server.run(|| {
        for iface in &ifaces {
            let mode = dp.attach(iface, AttachMode::Native).expect("attach XDP to the server veth");
            assert_eq!(mode, "native");
        }
    });
    dp
}

fn topology(tag: &str, clients: usize) -> Topology {
    require_root();
    Topology::new(tag, clients).expect("create namespaces and veth pairs")
}

/// Sends `n` UDP datagrams from client `i` to the server (a real socket in the client
/// namespace, so real ARP/neighbour resolution and a real IP stack on both ends).
fn send_udp(topo: &Topology, i: usize, n: usize) {
    let c = topo.client(i);
    let server: SocketAddr = (c.server.ipv4().unwrap(), UDP_PORT).into();
    let sock: UdpSocket = udp_socket(&c.ns, (c.client.ipv4().unwrap(), 0).into()).unwrap();
    for _ in 0..n {
        sock.send_to(MARKER, server).unwrap();
    }
}

/// Datagrams the server socket receives until `quiet` passes with nothing new, by source.
fn receive_udp(sock: &UdpSocket, quiet: Duration) -> HashMap<IpAddr, usize> {
    let mut by_source = HashMap::new();
    let mut buf = [0u8; 2048];
    sock.set_read_timeout(Some(quiet)).unwrap();
    loop {
        match sock.recv_from(&mut buf) {
            Ok((len, from)) if &buf[..len] == MARKER => *by_source.entry(from.ip()).or_insert(0) += 1,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return by_source,
            Err(e) => panic!("receiving: {e}"),
        }
    }
}

fn server_udp(topo: &Topology) -> UdpSocket {
    udp_socket(&topo.server, (Ipv4Addr::UNSPECIFIED, UDP_PORT).into()).unwrap()
}

#[test]
fn five_new_connections_per_minute_admits_exactly_five_then_drops() {
    let topo = topology("conn", 1);
    let plan = KernelPlan {
        rules: vec![rule("conn", CountKind::Connections, limit(5, Unit::Minute, 0), (TCP_PORT, Protocol::Tcp), true)],
        ..Default::default()
    };
    let dp = shield(&topo, &plan, LoadOptions::default());
    let listen: SocketAddr = (topo.client(0).server.ipv4().unwrap(), TCP_PORT).into();
    let listener = topo.server.run(|| TcpListener::bind(listen)).unwrap();
    let client = topo.client(0);
    // Each attempt waits 400 ms for the handshake: far below the 1 s initial SYN
    // retransmission timeout, so a dropped SYN is a failed attempt, not a late success.
    let outcomes: Vec<bool> = client.ns.run(|| {
        let mut streams = Vec::new();
        let outcomes = (0..10)
            .map(|_| match TcpStream::connect_timeout(&listen, Duration::from_millis(400)) {
                Ok(s) => {
                    streams.push(s);
                    true
                }
                Err(_) => false,
            })
            .collect();
        // The admitted connections carry data both ways: established traffic is not limited.
        for s in &mut streams {
            use std::io::Write;
            s.write_all(b"hello").unwrap();
        }
        outcomes
    });
    assert_eq!(outcomes, [true, true, true, true, true, false, false, false, false, false]);
    let stats = dp.stats().unwrap();
    assert_eq!(stats.rules["test/conn"].passed.packets, 5);
    assert!(stats.rules["test/conn"].dropped.packets >= 5);
    drop(listener);
}

#[test]
fn each_client_namespace_gets_its_own_per_source_quota() {
    let topo = topology("quota", 2);
    let plan = KernelPlan {
        rules: vec![rule("per-source", CountKind::Packets, limit(10, Unit::Hour, 0), (UDP_PORT, Protocol::Udp), true)],
        ..Default::default()
    };
    let _dp = shield(&topo, &plan, LoadOptions::default());
    let server = server_udp(&topo);
    send_udp(&topo, 0, 30);
    send_udp(&topo, 1, 30);
    let got = receive_udp(&server, Duration::from_millis(500));
    assert_eq!(got.get(&IpAddr::V4(topo.client(0).client.ipv4().unwrap())), Some(&10));
    assert_eq!(got.get(&IpAddr::V4(topo.client(1).client.ipv4().unwrap())), Some(&10));
}

/// Expected admissions for packets sent at `times` (ns from an arbitrary origin) through
/// buckets `params`, all of which must conform (the kernel's rule: first exhausted denies).
fn model(times: &[u64], params: &[BucketParams]) -> usize {
    let mut tats = vec![0u64; params.len()];
    let base = 1_000_000_000_000; // far from zero, like a real boot clock
    let mut admitted = 0;
    for &t in times {
        let now = base + t;
        let next: Vec<Option<u64>> =
            params.iter().zip(&tats).map(|(p, &tat)| gcra(tat, now, p.cost_ns(1), p.burst_ns)).collect();
        if next.iter().all(Option::is_some) {
            tats = next.into_iter().map(|t| t.unwrap_or_default()).collect();
            admitted += 1;
        }
    }
    admitted
}

#[test]
fn three_per_second_with_burst_three_admits_six_then_refills() {
    let topo = topology("burst", 1);
    let plan = KernelPlan {
        rules: vec![rule("burst", CountKind::Packets, limit(3, Unit::Second, 3), (UDP_PORT, Protocol::Udp), true)],
        ..Default::default()
    };
    let _dp = shield(&topo, &plan, LoadOptions::default());
    let server = server_udp(&topo);
    let start = Instant::now();
    send_udp(&topo, 0, 10);
    let first_burst_ns = start.elapsed().as_nanos() as u64;
    let first = receive_udp(&server, Duration::from_millis(300)).values().sum::<usize>();
    assert_eq!(first, 6, "a full bucket admits 3 + burst 3 at once");
    thread::sleep(Duration::from_millis(1100));
    let second_start_ns = start.elapsed().as_nanos() as u64;
    send_udp(&topo, 0, 10);
    let second = receive_udp(&server, Duration::from_millis(300)).values().sum::<usize>();
    // About one second refills 3 tokens. Bound it by the model at the earliest and latest
    // moments the burst could have been judged.
    let params = [BucketParams::for_packets(3, 1_000_000_000, 3).unwrap()];
    let at = |a: u64, b: u64| -> usize {
        let mut t = vec![a; 10];
        t.extend(std::iter::repeat_n(b, 10));
        model(&t, &params) - 6
    };
    let low = at(first_burst_ns, second_start_ns);
    let high = at(0, start.elapsed().as_nanos() as u64);
    assert!(low >= 3, "the sleep alone refills three tokens");
    assert!((low..=high).contains(&second), "refilled {second}, model says {low}..={high}");
}

#[test]
fn two_rules_at_once_deny_when_either_runs_out() {
    // TEG's two-rule example (1/s and 20/min), scaled to 10/s and 20/min so the per-minute
    // rule runs out within seconds: bursts of 25 every ~1.2 s. First the per-second rule
    // binds (10 of 25), then the per-minute one (20 in total).
    let topo = topology("two", 1);
    let per_second =
        rule("per-second", CountKind::Packets, limit(10, Unit::Second, 0), (UDP_PORT, Protocol::Udp), true);
    let per_minute =
        rule("per-minute", CountKind::Packets, limit(20, Unit::Minute, 0), (UDP_PORT, Protocol::Udp), true);
    let dp = shield(
        &topo,
        &KernelPlan { rules: vec![per_second, per_minute], ..Default::default() },
        LoadOptions::default(),
    );
    let server = server_udp(&topo);
    let mut got = Vec::new();
    for _ in 0..3 {
        send_udp(&topo, 0, 25);
        got.push(receive_udp(&server, Duration::from_millis(200)).values().sum::<usize>());
        thread::sleep(Duration::from_millis(1000));
    }
    assert_eq!(got[0], 10, "per-second rule binds first");
    assert_eq!(got[1], 10, "per-second refilled, per-minute has 10 left");
    // Per-minute refills one token every 3 s: at most one more after ~2.4 s.
    assert!(got[2] <= 1, "per-minute rule now binds: got {}", got[2]);
    let stats = dp.stats().unwrap();
    assert!(stats.rules["test/per-minute"].dropped.packets >= 24);
    assert!(stats.rules["test/per-second"].dropped.packets >= 30);
}

/// A UDP frame from a random spoofed source in 10.128.0.0/9.
fn spoofed(rng: &mut SmallRng, dst_mac: [u8; 6], dst: Ipv4Addr) -> Vec<u8> {
    let src = Ipv4Addr::new(10, rng.random_range(128..=255), rng.random(), rng.random_range(1..=254));
    Packet::eth().dst_mac(dst_mac).ipv4(src, dst).udp(rng.random_range(1024..=65535), UDP_PORT).payload(MARKER).build()
}

#[test]
fn a_random_source_flood_is_held_by_the_port_bucket() {
    let topo = topology("flood", 1);
    // Each source may send 100/s (no spoofed source ever trips that), the port takes 500/s.
    let plan = KernelPlan {
        rules: vec![
            rule("per-source", CountKind::Packets, limit(100, Unit::Second, 0), (UDP_PORT, Protocol::Udp), true),
            rule("port-ceiling", CountKind::Packets, limit(500, Unit::Second, 0), (UDP_PORT, Protocol::Udp), false),
        ],
        ..Default::default()
    };
    // A deliberately small source table: the flood must not need it.
    let dp = shield(&topo, &plan, LoadOptions { source_entries: 4096, ..Default::default() });
    let c = topo.client(0);
    let rx = RawReceiver::open(&topo.server, &c.server.name).unwrap();
    let tx = RawSender::open(&c.ns, &c.client.name).unwrap();
    let mut rng = SmallRng::seed_from_u64(42);
    let dst = c.server.ipv4().unwrap();
    let mut times = Vec::new();
    let start = Instant::now();
    for _ in 0..30_000 {
        tx.send(&spoofed(&mut rng, c.server.mac, dst)).unwrap();
        times.push(start.elapsed().as_nanos() as u64);
    }
    let admitted =
        rx.count_matching(Instant::now() + Duration::from_millis(500), |f| is_udp_to(f, UDP_PORT, MARKER)).unwrap();
    let expected = model(&times, &[BucketParams::for_packets(500, 1_000_000_000, 0).unwrap()]);
    let tolerance = expected / 50 + 2;
    assert!(admitted.abs_diff(expected) <= tolerance, "admitted {admitted}, model {expected} ± {tolerance}");
    assert!(admitted < 30_000 / 4, "the flood was held: {admitted} of 30000 admitted");
    let stats = dp.stats().unwrap();
    assert!(stats.reason(reason::DROP_SHARED_BUCKET).packets >= 30_000 - admitted as u64 - 1);
    assert_eq!(stats.reason(reason::EVENT_SOURCE_INSERT_FAILED).packets, 0);
    // Only admitted packets created per-source state, and the LRU bounds it.
    assert!(dp.tracked_sources() <= 4096);
}

#[test]
fn an_allow_listed_source_is_never_dropped_while_others_are() {
    let topo = topology("allow", 2);
    let trusted = topo.client(0).client.ipv4().unwrap();
    let plan = KernelPlan {
        allow: vec![ListEntry { net: IpAddr::V4(trusted).into(), policy: "test".into() }],
        rules: vec![rule("strict", CountKind::Packets, limit(5, Unit::Hour, 0), (UDP_PORT, Protocol::Udp), false)],
        ..Default::default()
    };
    let _dp = shield(&topo, &plan, LoadOptions::default());
    let server = server_udp(&topo);
    send_udp(&topo, 0, 200);
    send_udp(&topo, 1, 200);
    let got = receive_udp(&server, Duration::from_millis(500));
    assert_eq!(got.get(&IpAddr::V4(trusted)), Some(&200));
    assert_eq!(got.get(&IpAddr::V4(topo.client(1).client.ipv4().unwrap())), Some(&5));
}

/// Pins the calling thread to one CPU, so two senders drive the program on both CPUs.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set), 0, "pin to CPU {cpu}");
    }
}

/// What each of two senders, pinned one to each CPU and each offering 5x `rate` in 1 ms
/// steps for `seconds`, got through: (admitted per client, offered in all, first and last
/// send time in ns since start).
fn two_cpu_senders(topo: &Topology, rate: u64, seconds: u64) -> (Vec<usize>, usize, u64, u64) {
    let receivers: Vec<RawReceiver> =
        topo.clients.iter().map(|c| RawReceiver::open(&topo.server, &c.server.name).unwrap()).collect();
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let per_ms = (rate * 5 / 1000) as usize;
    let sent: Vec<(usize, u64, u64)> = thread::scope(|s| {
        let handles: Vec<_> = topo
            .clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                s.spawn(move || {
                    let tx = RawSender::open(&c.ns, &c.client.name).unwrap();
                    pin_to_cpu(i);
                    let frame = Packet::eth()
                        .dst_mac(c.server.mac)
                        .ipv4(c.client.ipv4().unwrap(), c.server.ipv4().unwrap())
                        .udp(40000, UDP_PORT)
                        .payload(MARKER)
                        .build();
                    let mut n = 0;
                    let first = start.elapsed().as_nanos() as u64;
                    let mut step = Instant::now();
                    while Instant::now() < end {
                        for _ in 0..per_ms {
                            tx.send(&frame).unwrap();
                        }
                        n += per_ms;
                        step += Duration::from_millis(1);
                        if let Some(wait) = step.checked_duration_since(Instant::now()) {
                            thread::sleep(wait);
                        }
                    }
                    (n, first, start.elapsed().as_nanos() as u64)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let offered: usize = sent.iter().map(|s| s.0).sum();
    let first = sent.iter().map(|s| s.1).min().unwrap();
    let last = sent.iter().map(|s| s.2).max().unwrap();
    let admitted: Vec<usize> = receivers
        .iter()
        .map(|rx| {
            rx.count_matching(Instant::now() + Duration::from_millis(300), |f| is_udp_to(f, UDP_PORT, MARKER)).unwrap()
        })
        .collect();
    (admitted, offered, first, last)
}

fn two_cpus() {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    assert!(cpus >= 2, "needs two CPUs to exercise concurrent bucket updates, found {cpus}");
}

#[test]
fn concurrent_senders_on_both_cpus_are_admitted_within_two_percent() {
    two_cpus();
    let topo = topology("accuracy", 2);
    // One shared bucket for both senders: 4000/s, depth 4000 + 1000.
    const RATE: u64 = 4000;
    const BURST: u64 = 1000;
    const SECONDS: u64 = 4;
    let plan = KernelPlan {
        rules: vec![rule(
            "shared",
            CountKind::Packets,
            limit(RATE, Unit::Second, BURST),
            (UDP_PORT, Protocol::Udp),
            false,
        )],
        ..Default::default()
    };
    let dp = shield(&topo, &plan, LoadOptions::default());
    // Each sender offers 5x the rate, together 10x.
    let (admitted, offered, first, last) = two_cpu_senders(&topo, RATE, SECONDS);
    let admitted: usize = admitted.iter().sum();
    let window_s = (last - first) as f64 / 1e9;
    let expected = RATE as f64 * window_s + (RATE + BURST) as f64;
    let error = (admitted as f64 - expected).abs() / expected;
    eprintln!(
        "accuracy: offered {offered} over {window_s:.3} s ({:.1}x the rate), admitted {admitted}, expected {expected:.0}, error {:.3}%",
        offered as f64 / window_s / RATE as f64,
        error * 100.0
    );
    assert!(offered as f64 > 8.0 * RATE as f64 * window_s, "senders offered at least 8x the rate");
    assert!(error <= 0.02, "admitted {admitted}, expected {expected:.0} (error {:.2}%)", error * 100.0);
    let stats = dp.stats().unwrap();
    assert_eq!(
        stats.rules["test/shared"].passed.packets as usize, admitted,
        "kernel counters agree with the receivers"
    );
    eprintln!("accuracy: contended CAS refusals: {}", stats.reason(reason::EVENT_BUCKET_CONTENDED).packets);
}

#[test]
fn a_shared_and_a_per_source_bucket_hit_from_both_cpus_at_once_stay_accurate() {
    // Both senders charge the shared bucket; the second sender also has a per-source bucket
    // that refuses most of its packets, so its CPU keeps handing shared charges back (refunds)
    // while the other CPU charges: the races a refund can cause are exercised on both words.
    two_cpus();
    let topo = topology("accuracy2", 2);
    const RATE: u64 = 4000;
    const BURST: u64 = 1000;
    const SOURCE_RATE: u64 = 1000;
    const SECONDS: u64 = 4;
    let second = topo.client(1).client.ipv4().unwrap();
    let mut per_source =
        rule("per-source", CountKind::Packets, limit(SOURCE_RATE, Unit::Second, 0), (UDP_PORT, Protocol::Udp), true);
    per_source.source.nets = vec![IpAddr::V4(second).into()];
    let plan = KernelPlan {
        rules: vec![
            rule("shared", CountKind::Packets, limit(RATE, Unit::Second, BURST), (UDP_PORT, Protocol::Udp), false),
            per_source,
        ],
        ..Default::default()
    };
    let dp = shield(&topo, &plan, LoadOptions::default());
    let (admitted, offered, first, last) = two_cpu_senders(&topo, RATE, SECONDS);
    let window_s = (last - first) as f64 / 1e9;
    let total: usize = admitted.iter().sum();
    let expected_total = RATE as f64 * window_s + (RATE + BURST) as f64;
    let expected_second = SOURCE_RATE as f64 * window_s + SOURCE_RATE as f64;
    let stats = dp.stats().unwrap();
    let contended = stats.reason(reason::EVENT_BUCKET_CONTENDED).packets;
    eprintln!(
        "accuracy (shared + per-source): offered {offered} over {window_s:.3} s, admitted {admitted:?} (total {total}, expected {expected_total:.0}; second sender expected at most {expected_second:.0}), contended {contended}"
    );
    let error = (total as f64 - expected_total).abs() / expected_total;
    assert!(error <= 0.02, "total admitted {total}, expected {expected_total:.0} (error {:.2}%)", error * 100.0);
    assert!(
        admitted[1] as f64 <= expected_second * 1.02,
        "the second sender's own bucket held: {} admitted, at most {expected_second:.0}",
        admitted[1]
    );
    // (The shared rule's own `passed` also counts charges refunded when the per-source bucket
    // refused; the verdict counter counts packets.)
    assert_eq!(
        stats.reason(reason::PASS_CONFORMING).packets as usize,
        total,
        "kernel counters agree with the receivers"
    );
    assert_eq!(stats.rules["test/per-source"].passed.packets as usize, admitted[1]);
}
