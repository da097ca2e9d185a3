//! The Redis backend on the topologies users run, all real servers the harness starts on
//! loopback: a 3-master Redis Cluster (counts exact across masters, each key on the master of
//! its slot, requests whose descriptors span slots), a Sentinel group failing over mid-test
//! (the failure mode answers while the old master is gone, counting resumes on the new master
//! without a restart, metrics count it), and a TLS server with a password and client
//! certificates (certificates made here by rcgen).
//!
//! Windows use a fixed `SystemTime` per request, as in `rls_redis.rs`, so no window edge moves
//! under a test.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use limiter_agent::l7::{Code, DescriptorEntry, Engine, EngineConfig, RequestDescriptor, RlsRequest, RlsResponse};
use limiter_agent::plan::l7::{Algorithm, Attribute, EntryMatch, EntryValue, L7Plan, L7Rule, Scope};
use limiter_agent::plan::{Limit, Unit};
use limiter_agent::rls::redis::target::{Auth, RedisTarget, SocketType, TlsFiles, Topology};
use limiter_agent::rls::redis::{FailureMode, RedisBackend, RedisConfig};
use limiter_tests::redis::RedisServer;
use limiter_tests::redis_topology::{RedisCluster, SentinelGroup};
use limiter_tests::tls::TestCa;

/// 30 s into a minute.
const T: u64 = 1_700_000_010;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

/// `domain` rule: one counter per distinct value of `key`, `requests` per `unit`.
fn rule(domain: &str, key: &str, requests: u64, unit: Unit) -> L7Rule {
    L7Rule {
        name: format!("{domain}/{key}"),
        limit_name: None,
        domain: domain.to_owned(),
        entries: vec![EntryMatch {
            key: key.to_owned(),
            attribute: Attribute::Descriptor,
            value: EntryValue::Distinct,
        }],
        limit: Some(Limit { requests, unit, burst: 0 }),
        exempt: false,
        quota_mode: false,
        algorithm: Algorithm::FixedWindow,
        scope: Scope::Global,
        shadow: false,
        replaces: Vec::new(),
        cost_request: None,
        cost_response: None,
        targets: Vec::new(),
    }
}

/// One [`rule`] per minute.
fn engine(domain: &str, key: &str, requests: u64) -> Arc<Engine> {
    Arc::new(Engine::new(L7Plan { rules: vec![rule(domain, key, requests, Unit::Minute)] }, EngineConfig::default()))
}

fn request(domain: &str, key: &str, values: &[&str]) -> RlsRequest {
    RlsRequest {
        domain: domain.to_owned(),
        descriptors: values
            .iter()
            .map(|v| RequestDescriptor {
                entries: vec![DescriptorEntry { key: key.to_owned(), value: (*v).to_owned() }],
                hits_addend: None,
                limit: None,
            })
            .collect(),
        hits_addend: 0,
    }
}

async fn decide(backend: &RedisBackend, engine: &Engine, req: &RlsRequest) -> RlsResponse {
    backend.should_rate_limit(engine, req, at(T)).await.expect("valid request")
}

fn config(failure_mode: FailureMode) -> RedisConfig {
    RedisConfig { failure_mode, ..RedisConfig::default() }
}

#[test]
fn cluster_counts_exactly_across_three_masters_with_keys_on_their_slots_master() {
    let cluster = RedisCluster::start(3).expect("3-master cluster");
    let target = RedisTarget::parse(Topology::Cluster, SocketType::Tcp, &cluster.url_list()).expect("cluster list");
    let rt = runtime();
    rt.block_on(async {
        let engine = engine("users", "user", 5);
        let redis = RedisBackend::connect_to(&target, None, config(FailureMode::FailClosed)).await.expect("backend");
        assert!(redis.is_connected(), "no connection to the cluster {}", cluster.url_list());

        // The new user: 12 users, 7 calls each, 5 per minute allowed.
        let users: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
        let (mut ok, mut over) = (0, 0);
        for user in &users {
            for _ in 0..7 {
                match decide(&redis, &engine, &request("users", "user", &[user])).await.overall {
                    Code::Ok => ok += 1,
                    Code::OverLimit => over += 1,
                }
            }
        }
        assert_eq!((ok, over), (60, 24), "exactly 5 of 7 calls per user pass");
        assert_eq!(redis.stats().failure_mode_answers, 0, "no call fell back on the failure mode");

        let window = T / 60 * 60;
        let expected: Vec<String> = {
            let mut keys: Vec<String> = users.iter().map(|u| format!("users_user_{u}_{window}")).collect();
            keys.sort();
            keys
        };
        assert_eq!(cluster.keys("users_*").expect("keys"), expected, "the reference's keys, once each");
        let mut holders = std::collections::BTreeSet::new();
        for key in &expected {
            let owner = cluster.node_of(key).expect("slot owner");
            assert_eq!(owner.keys(key).expect("keys"), vec![key.clone()], "{key} lives on its slot's master");
            let count = owner.get_int(key).expect("GET").expect("counter");
            // 5 allowed and at least the first refusal are counted; later refusals may come
            // from the over-limit cache without touching Redis.
            assert!((6..=7).contains(&count), "{key}: {count}");
            holders.insert(owner.port());
        }
        assert_eq!(holders.len(), 3, "12 users' keys spread over the 3 masters");

        // One request whose descriptors live on different masters: pipelines split per slot,
        // every descriptor counted once.
        let engine = engine_with_limit("multi", 1000);
        let values: Vec<String> = (0..20).map(|i| format!("v{i}")).collect();
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        for round in 1..=3 {
            let response = decide(&redis, &engine, &request("multi", "k", &refs)).await;
            assert_eq!(response.overall, Code::Ok);
            for status in &response.statuses {
                assert_eq!(status.limit_remaining, 1000 - round, "every descriptor counted once per call");
            }
        }
        for v in &values {
            let key = format!("multi_k_{v}_{window}");
            assert_eq!(cluster.node_of(&key).expect("owner").get_int(&key).expect("GET"), Some(3), "{key}");
        }
    });
}

fn engine_with_limit(domain: &str, requests: u64) -> Arc<Engine> {
    engine(domain, "k", requests)
}

#[test]
fn sentinel_failover_answers_by_the_failure_mode_then_counts_on_the_new_master() {
    let mut group = SentinelGroup::start().expect("sentinel group");
    let target = RedisTarget::parse(Topology::Sentinel, SocketType::Tcp, &group.url_list()).expect("sentinel list");
    let rt = runtime();
    rt.block_on(async {
        let engine = engine("svc", "user", 100);
        let redis = RedisBackend::connect_to(&target, None, config(FailureMode::FailClosed)).await.expect("backend");
        assert!(redis.is_connected(), "no master through the sentinels {}", group.url_list());
        let req = request("svc", "user", &["alice"]);
        for remaining in [99, 98, 97] {
            let response = decide(&redis, &engine, &req).await;
            assert_eq!((response.overall, response.statuses[0].limit_remaining), (Code::Ok, remaining));
        }
        let key = format!("svc_user_alice_{}", T / 60 * 60);
        assert_eq!(group.master.get_int(&key).expect("GET"), Some(3));

        // The replica holds the 3 hits before the master dies.
        for _ in 0..200 {
            if group.replica.get_int(&key).expect("GET") == Some(3) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(group.replica.get_int(&key).expect("GET"), Some(3), "replicated before the kill");

        // The master dies (SIGKILL). Until the sentinels agree it is down and promote the
        // replica, every call gets the failure mode (failClosed here), at once: the backend
        // keeps asking the sentinels in the background, never makes a call wait for it.
        group.master.stop().expect("kill the master");
        let during = decide(&redis, &engine, &req).await;
        assert_eq!(during.overall, Code::OverLimit, "failClosed while the master is gone: {during:?}");
        assert_eq!(during.statuses[0].limit_remaining, 0);
        assert!(redis.stats().failure_mode_answers >= 1);

        // Then counting resumes on the new master, without a restart.
        let mut counted = None;
        let mut failure_answers = 1;
        for _ in 0..600 {
            let response = decide(&redis, &engine, &req).await;
            if response.overall == Code::Ok {
                counted = Some(response.statuses[0].limit_remaining);
                break;
            }
            failure_answers += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::task::block_in_place(|| group.wait_promoted()).expect("the sentinels promoted the replica");
        assert_eq!(redis.stats().failure_mode_answers, failure_answers, "each refused call counted once");
        // The first counted call after the failover is the 4th of the window.
        assert_eq!(counted, Some(96), "counting resumed on the new master");
        assert_eq!(group.replica.get_int(&key).expect("GET"), Some(4), "the new master holds the count");
        let stats = redis.stats();
        assert!(stats.reconnects >= 1, "{stats:?}");
        assert!(stats.errors >= 1, "{stats:?}");
    });
}

/// A TLS `redis-server` with a password that also demands client certificates: the plain port
/// stays for the harness's own commands, the agent's backend uses the TLS one.
fn tls_server(dir: &Path, ca: &TestCa, password: &str) -> (RedisServer, u16) {
    let server_pair = ca.server();
    let (cert, key) = server_pair.write(dir, "server");
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).expect("write CA");
    let tls_port = limiter_tests::redis::free_port().expect("free port");
    let server = RedisServer::start_with(
        |_, _| {
            vec![
                "--tls-port".into(),
                tls_port.to_string(),
                "--tls-cert-file".into(),
                cert.display().to_string(),
                "--tls-key-file".into(),
                key.display().to_string(),
                "--tls-ca-cert-file".into(),
                ca_file.display().to_string(),
                "--tls-auth-clients".into(),
                "yes".into(),
                "--requirepass".into(),
                password.to_owned(),
            ]
        },
        Some(password),
    )
    .expect("redis-server with TLS (Debian's build has it)");
    (server, tls_port)
}

#[test]
fn tls_with_a_password_and_a_client_certificate_counts_and_refuses_the_wrong_ones() {
    let dir = limiter_tests::agent::TempDir::new("redis-tls");
    let ca = TestCa::new("limiter redis test CA");
    let (server, tls_port) = tls_server(dir.root(), &ca, "s3cret-pw");
    let (client_cert, client_key) = ca.client("limiter-agent").write(dir.root(), "client");
    let good = RedisTarget {
        tls: Some(TlsFiles {
            ca: Some(dir.root().join("ca.crt")),
            client_cert: Some(client_cert),
            client_key: Some(client_key),
        }),
        auth: Some(Auth { username: None, password: "s3cret-pw".into() }),
        ..RedisTarget::parse(Topology::Single, SocketType::Tcp, &format!("localhost:{tls_port}")).expect("url")
    };
    assert!(!good.to_string().contains("s3cret-pw"), "the password never shows: {good}");
    let rt = runtime();
    rt.block_on(async {
        let engine = engine("tls", "user", 2);
        let redis = RedisBackend::connect_to(&good, None, config(FailureMode::FailOpen)).await.expect("backend");
        assert!(redis.is_connected(), "TLS + password + client certificate: {good}");
        let req = request("tls", "user", &["bob"]);
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(decide(&redis, &engine, &req).await.overall);
        }
        assert_eq!(got, vec![Code::Ok, Code::Ok, Code::OverLimit]);
        assert_eq!(server.get_int(&format!("tls_user_bob_{}", T / 60 * 60)).expect("GET"), Some(3));

        // A wrong password, a missing client certificate, an unknown CA: no connection, and
        // the failure mode answers (failClosed here) instead of a hang or a crash.
        let wrong_password =
            RedisTarget { auth: Some(Auth { username: None, password: "nope".into() }), ..good.clone() };
        let no_client_cert = RedisTarget {
            tls: Some(TlsFiles { client_cert: None, client_key: None, ..good.tls.clone().expect("tls") }),
            ..good.clone()
        };
        let other_ca = TestCa::new("another CA");
        std::fs::write(dir.root().join("other-ca.crt"), other_ca.pem()).expect("write");
        let unknown_ca = RedisTarget {
            tls: Some(TlsFiles { ca: Some(dir.root().join("other-ca.crt")), ..good.tls.clone().expect("tls") }),
            ..good.clone()
        };
        for (what, target) in
            [("wrong password", wrong_password), ("no client certificate", no_client_cert), ("unknown CA", unknown_ca)]
        {
            let redis =
                RedisBackend::connect_to(&target, None, config(FailureMode::FailClosed)).await.expect("backend");
            assert!(!redis.is_connected(), "{what}: must not connect");
            let response = decide(&redis, &engine, &request("tls", "user", &["carol"])).await;
            assert_eq!(response.overall, Code::OverLimit, "{what}: failClosed answers");
            assert_eq!(redis.stats().failure_mode_answers, 1, "{what}");
        }
        assert_eq!(server.get_int(&format!("tls_user_carol_{}", T / 60 * 60)).expect("GET"), None);
    });
}

#[test]
fn second_unit_limits_count_in_the_per_second_redis() {
    let main = RedisServer::start().expect("redis-server");
    let per_second = RedisServer::start().expect("redis-server");
    let target = |s: &RedisServer| RedisTarget::parse(Topology::Single, SocketType::Tcp, &s.url()).expect("url");
    let rt = runtime();
    rt.block_on(async {
        let rules = vec![rule("d", "minute", 10, Unit::Minute), rule("d", "second", 10, Unit::Second)];
        let engine = Engine::new(L7Plan { rules }, EngineConfig::default());
        let redis =
            RedisBackend::connect_to(&target(&main), Some(&target(&per_second)), config(FailureMode::FailClosed))
                .await
                .expect("backend");
        assert!(redis.is_connected());
        let req = RlsRequest {
            domain: "d".into(),
            descriptors: vec![
                RequestDescriptor {
                    entries: vec![DescriptorEntry { key: "minute".into(), value: "m".into() }],
                    hits_addend: None,
                    limit: None,
                },
                RequestDescriptor {
                    entries: vec![DescriptorEntry { key: "second".into(), value: "s".into() }],
                    hits_addend: None,
                    limit: None,
                },
            ],
            hits_addend: 0,
        };
        for _ in 0..2 {
            assert_eq!(decide(&redis, &engine, &req).await.overall, Code::Ok);
        }
        // The second-unit key lives 1 s, so the command counts tell where each went.
        assert_eq!(main.keys("*").expect("keys"), vec![format!("d_minute_m_{}", T / 60 * 60)]);
        assert_eq!(main.get_int(&format!("d_minute_m_{}", T / 60 * 60)).expect("GET"), Some(2));
        assert_eq!(main.command_calls("incrby").expect("stats"), 2, "minute counts on the main Redis");
        assert_eq!(per_second.command_calls("incrby").expect("stats"), 2, "second counts on the per-second Redis");
    });
}

/// The new user, as a program: the agent started with envoyproxy/ratelimit's
/// environment (`BACKEND_TYPE=redis`, `REDIS_TYPE=cluster`, `REDIS_URL` naming the 3 masters,
/// `CACHE_KEY_PREFIX`) answers 12 users x 7 calls with exactly 5 allowed per user, writes the
/// reference's keys on the cluster, logs the settings it used, and names the variables it does
/// not honour.
#[test]
fn the_agent_reads_the_reference_environment_and_counts_on_the_cluster() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
        RateLimitDescriptor, rate_limit_descriptor::Entry,
    };
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code as ProtoCode;
    use envoy_types::pb::envoy::service::ratelimit::v3::{
        RateLimitRequest, rate_limit_service_client::RateLimitServiceClient,
    };

    let cluster = RedisCluster::start(3).expect("3-master cluster");
    let dir = limiter_tests::agent::TempDir::new("redis-env");
    let config = dir.write(
        "users.yaml",
        "domain: users\ndescriptors:\n  - key: user\n    rate_limit: {unit: minute, requests_per_unit: 5}\n",
    );
    let port = limiter_tests::redis::free_port().expect("free port");
    let listen = format!("127.0.0.1:{port}");
    let socket = dir.path("agent.sock");
    let mut child = Command::new(limiter_tests::agent::agent_binary())
        .args(["run", "--no-metrics", "--no-watch", "--rls-listen", &listen, "--policy"])
        .arg(&config)
        .arg("--control-socket")
        .arg(&socket)
        .env("RUST_LOG", "info")
        .env("BACKEND_TYPE", "redis")
        .env("REDIS_SOCKET_TYPE", "tcp")
        .env("REDIS_TYPE", "cluster")
        .env("REDIS_URL", cluster.url_list())
        .env("REDIS_POOL_SIZE", "10")
        .env("REDIS_PIPELINE_WINDOW", "150us")
        .env("REDIS_SOMETHING_NEW", "1")
        .env("CACHE_KEY_PREFIX", "rl_")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start limiter-agent");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = child.stderr.take().expect("stderr");
    let _guard = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("agent: {line}");
            let _ = tx.send(line);
        }
    });
    let mut log = String::new();
    while !log.contains("rate limit service:") {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
            }
            Err(e) => panic!("the agent did not start serving ({e}):\n{log}"),
        }
    }
    assert!(log.contains("redis: backend cluster 127.0.0.1:"), "settings logged:\n{log}");
    assert!(log.contains("REDIS_TYPE=cluster") && log.contains("BACKEND_TYPE=redis"), "{log}");
    assert!(log.contains("REDIS_PIPELINE_WINDOW is set but not honoured"), "{log}");
    assert!(log.contains("REDIS_SOMETHING_NEW is set but not honoured"), "{log}");
    assert!(log.contains("redis: connected to cluster"), "{log}");

    let rt = runtime();
    let (ok, over) = rt.block_on(async {
        let mut client = RateLimitServiceClient::connect(format!("http://{listen}")).await.expect("connect");
        let (mut ok, mut over) = (0, 0);
        for user in 0..12 {
            for _ in 0..7 {
                let request = RateLimitRequest {
                    domain: "users".into(),
                    descriptors: vec![RateLimitDescriptor {
                        entries: vec![Entry { key: "user".into(), value: format!("u{user}") }],
                        ..Default::default()
                    }],
                    hits_addend: 0,
                };
                let code = client.should_rate_limit(request).await.expect("call").into_inner().overall_code;
                if code == ProtoCode::Ok as i32 {
                    ok += 1;
                } else if code == ProtoCode::OverLimit as i32 {
                    over += 1;
                }
            }
        }
        (ok, over)
    });
    assert_eq!((ok, over), (60, 24), "5 of 7 calls per user pass, counted on the cluster");
    let keys = cluster.keys("rl_users_user_*").expect("keys");
    assert_eq!(keys.len(), 12, "{keys:?}");
    for key in &keys {
        assert!(cluster.node_of(key).expect("owner").get_int(key).expect("GET").is_some(), "{key} on its master");
    }
}
