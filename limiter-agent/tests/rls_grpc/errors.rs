//! Malformed calls and overload.

use super::*;

// ---------------------------------------------------------------------------------------------
// 7. Errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_calls_get_invalid_argument_naming_the_problem() {
    let engine = frozen_engine(shop_and_api("errors"));
    let mut rls = start_with(engine, Options { max_request_bytes: 1024, ..Options::default() }).await;
    // Every good call asks for a fresh value of the key-only rule (limit 3): remaining 2.
    let good = |i: usize| request("shop", vec![descriptor(&[("k", &format!("fine-{i}"))])]);
    let minute = reset_at_t(60);
    let with = |edit: fn(&mut RateLimitDescriptor)| {
        let mut d = descriptor(&[("k", "v")]);
        edit(&mut d);
        request("shop", vec![descriptor(&[("k", "ok")]), d])
    };
    let cases: Vec<(&str, RateLimitRequest, &str)> = vec![
        ("empty domain", request("", vec![descriptor(&[("k", "v")])]), "rate limit domain must not be empty"),
        ("no descriptors", request("shop", vec![]), "rate limit descriptor list must not be empty"),
        (
            "hits_addend beyond u32",
            with(|d| d.hits_addend = Some(UInt64Value { value: u64::from(u32::MAX) + 1 })),
            "rate limit descriptor 1: hits_addend 4294967296 is more than 4294967295",
        ),
        (
            "is_negative_hits",
            with(|d| d.is_negative_hits = true),
            "rate limit descriptor 1: is_negative_hits is not supported",
        ),
        (
            "limit override without a unit",
            with(|d| d.limit = Some(RateLimitOverride { requests_per_unit: 9, unit: 0 })),
            "rate limit descriptor 1: limit override with unknown unit 0",
        ),
    ];
    let refused = cases.len();
    for (i, (what, req, message)) in cases.into_iter().enumerate() {
        let status = rls.call(req).await.expect_err(what);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains(message), "{what}: {:?} does not say {message:?}", status.message());
        // The server keeps answering.
        let s = rls.ask(good(i)).await;
        assert_eq!(seen(&s.statuses[0]), ok("", 3, ProtoUnit::Minute, 2, minute), "{what}");
    }
    // The good descriptor beside each bad one was never charged.
    assert_eq!(seen(&rls.one("shop", &[("k", "ok")]).await), ok("", 3, ProtoUnit::Minute, 2, minute));
    // u32::MAX itself is accepted (and is far over the limit).
    let edge = with(|d| d.hits_addend = Some(UInt64Value { value: u64::from(u32::MAX) }));
    assert_eq!(rls.ask(edge).await.overall_code, ProtoCode::OverLimit as i32);

    // Bigger than max_request_bytes: tonic refuses it before the service sees it.
    let big = "v".repeat(2048);
    let status = rls.call(request("shop", vec![descriptor(&[("k", &big)])])).await.expect_err("oversized");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("the limit is: 1024 bytes"), "{:?}", status.message());
    let s = rls.ask(good(100)).await;
    assert_eq!(seen(&s.statuses[0]), ok("", 3, ProtoUnit::Minute, 2, minute));

    let text = rls.metrics.render();
    let errors = metric(&text, "limiter_rls_request_errors_total{reason=\"invalid_argument\"}");
    assert_eq!(errors, Some(refused as f64), "{text}");
    rls.stop().await;
}

/// A stand-in Redis on a loopback port: it answers the client's connection handshake (`+OK`
/// to each command) and then holds the first counting pipeline (`INCRBY`) unanswered, telling
/// the test that it arrived. `release` closes the connection and the listener.
struct StuckRedis {
    url: String,
    counting: oneshot::Receiver<()>,
    release: oneshot::Sender<()>,
}

impl StuckRedis {
    async fn start() -> StuckRedis {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind stand-in redis");
        let url = format!("redis://{}/0", listener.local_addr().expect("bound"));
        let (counting_tx, counting) = oneshot::channel();
        let (release, release_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("the backend connects");
            // Nobody else may connect: a reconnect after release is refused.
            drop(listener);
            let mut counting_tx = Some(counting_tx);
            tokio::select! {
                () = serve_resp(stream, &mut counting_tx) => {}
                _ = release_rx => {}
            }
        });
        StuckRedis { url, counting, release }
    }
}

/// Reads RESP commands; answers `+OK` until an `INCRBY` arrives, then answers nothing more.
async fn serve_resp(mut stream: TcpStream, counting: &mut Option<oneshot::Sender<()>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some((command, used)) = parse_command(&buf) {
            buf.drain(..used);
            if command.eq_ignore_ascii_case("INCRBY") || command.eq_ignore_ascii_case("EXPIRE") {
                if let Some(tx) = counting.take() {
                    let _ = tx.send(());
                }
            } else if counting.is_some() {
                stream.write_all(b"+OK\r\n").await.expect("reply to the handshake");
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                // Keep the held call pending until released (the select drops us then).
                std::future::pending::<()>().await;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One complete RESP array of bulk strings at the start of `buf`: its first element (the
/// command name) and the bytes it takes.
fn parse_command(buf: &[u8]) -> Option<(String, usize)> {
    fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = buf.get(at..)?.windows(2).position(|w| w == b"\r\n")? + at;
        Some((&buf[at..end], end + 2))
    }
    let (head, mut at) = line(buf, 0)?;
    let n: usize = std::str::from_utf8(head.strip_prefix(b"*")?).ok()?.parse().ok()?;
    let mut name = None;
    for _ in 0..n {
        let (len, start) = line(buf, at)?;
        let len: usize = std::str::from_utf8(len.strip_prefix(b"$")?).ok()?.parse().ok()?;
        let end = start + len;
        if buf.len() < end + 2 {
            return None;
        }
        name.get_or_insert_with(|| String::from_utf8_lossy(&buf[start..end]).into_owned());
        at = end + 2;
    }
    Some((name?, at))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_beyond_max_in_flight_is_resource_exhausted() {
    let redis = StuckRedis::start().await;
    let config = RedisConfig {
        failure_mode: FailureMode::FailOpen,
        connect_timeout: Duration::from_secs(3600),
        response_timeout: Duration::from_secs(3600),
        ..RedisConfig::default()
    };
    let backend = RedisBackend::connect(&redis.url, config).await.expect("valid url");
    assert!(backend.is_connected(), "the stand-in answered the handshake");
    let options = Options {
        backend: Backend::Redis(backend),
        max_in_flight: 1,
        timeout: Duration::from_secs(3600),
        ..Options::default()
    };
    let mut rls = start_with(frozen_engine(shop_and_api("overload")), options).await;

    // The first call waits on the stand-in's INCRBY reply, holding the only permit.
    let mut first_client = rls.client.clone();
    let first = tokio::spawn(async move {
        first_client.should_rate_limit(request("shop", vec![descriptor(&[("k", "held")])])).await
    });
    within(redis.counting).await.expect("the first call reached redis");

    let status = rls.call(request("shop", vec![descriptor(&[("k", "second")])])).await.expect_err("overloaded");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("too many calls in flight"), "{:?}", status.message());
    // A descriptor that needs no Redis is refused too: the limit is on calls, not on Redis.
    let status = rls.call(request("nowhere", vec![descriptor(&[("k", "v")])])).await.expect_err("overloaded");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

    // Redis goes away: the held call gets the failure-mode answer (fail open: OK, no limit)...
    redis.release.send(()).expect("stand-in running");
    let answered = within(first).await.expect("first call task").expect("first call answered");
    assert_eq!(answered.into_inner().statuses.iter().map(seen).collect::<Vec<_>>(), [no_limit(0)]);
    // ...and the permit is back.
    let resp = rls.ask(request("shop", vec![descriptor(&[("k", "after")])])).await;
    assert_eq!(resp.overall_code, ProtoCode::Ok as i32);
    let text = rls.metrics.render();
    assert_eq!(metric(&text, "limiter_rls_request_errors_total{reason=\"overloaded\"}"), Some(2.0), "{text}");
    rls.stop().await;
}

/// `--rls-allow-callers`: a caller outside the listed networks gets PERMISSION_DENIED (it could
/// otherwise name any client address for escalation to block); one inside is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_outside_the_allowed_networks_are_refused() {
    let elsewhere = Options { allowed_callers: vec!["10.0.0.0/8".parse().unwrap()], ..Options::default() };
    let mut rls = start_with(frozen_engine(shop_and_api("callers-out")), elsewhere).await;
    let status = rls.call(request("shop", vec![descriptor(&[("k", "v")])])).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("calls from 127.0.0.1 are not allowed"), "{status:?}");
    let text = rls.metrics.render();
    assert_eq!(metric(&text, "limiter_rls_request_errors_total{reason=\"permission_denied\"}"), Some(1.0), "{text}");
    rls.stop().await;

    let loopback = Options { allowed_callers: vec!["127.0.0.0/8".parse().unwrap()], ..Options::default() };
    let mut rls = start_with(frozen_engine(shop_and_api("callers-in")), loopback).await;
    let resp = rls.ask(request("shop", vec![descriptor(&[("k", "v")])])).await;
    assert_eq!(resp.overall_code, ProtoCode::Ok as i32);
    rls.stop().await;
}
