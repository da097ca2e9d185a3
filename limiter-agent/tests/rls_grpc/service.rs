//! Health and shutdown, metrics, escalation, and the plan the tests rely on.

use super::*;

// ---------------------------------------------------------------------------------------------
// 8. Health and shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_serves_until_shutdown_then_the_server_ends() {
    assert_eq!(RateLimitServiceServer::<RateLimiter>::NAME, SERVICE);
    let rls = start(shop_and_api("health")).await;
    let mut health = HealthClient::new(channel(rls.addr).await);
    // "ratelimit" is the name envoyproxy/ratelimit registers, which its Deployment's gRPC
    // readiness probe asks for.
    for service in ["", SERVICE, "ratelimit"] {
        let resp = within(health.check(HealthCheckRequest { service: service.into() })).await.expect("check");
        assert_eq!(resp.into_inner().status, ServingStatus::Serving as i32, "{service:?}");
    }
    let status =
        within(health.check(HealthCheckRequest { service: "no.such.Service".into() })).await.expect_err("unknown");
    assert_eq!(status.code(), tonic::Code::NotFound);

    // A watcher sees the service go NOT_SERVING when shutdown fires.
    let mut watch =
        within(health.watch(HealthCheckRequest { service: SERVICE.into() })).await.expect("watch").into_inner();
    let first = within(watch.message()).await.expect("watch stream").expect("a first status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let mut probe =
        within(health.watch(HealthCheckRequest { service: "ratelimit".into() })).await.expect("watch").into_inner();
    let first = within(probe.message()).await.expect("watch stream").expect("a first status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    rls.shutdown.send(true).expect("server task holds the receiver");
    let next = within(watch.message()).await.expect("watch stream").expect("a status change");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    let next = within(probe.message()).await.expect("watch stream").expect("a status change");
    assert_eq!(next.status, ServingStatus::NotServing as i32, "the reference's probe name goes down too");
    // Graceful shutdown waits for open calls, the watches included: end them, and the task ends.
    drop(watch);
    drop(probe);
    drop(health);
    drop(rls.client);
    within(rls.task).await.expect("server task panicked").expect("server ended cleanly");

    // Nothing listens any more.
    assert!(TcpStream::connect(rls.addr).await.is_err(), "{} still accepts", rls.addr);
}

/// A client that keeps a health `Watch` open does not keep the server alive past the drain
/// timeout: its connection is closed and the serve task ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_watch_stream_does_not_hold_shutdown_past_the_drain_timeout() {
    let options = Options { drain_timeout: Duration::from_millis(200), ..Options::default() };
    let rls = start_with(frozen_engine(shop_and_api("drain")), options).await;
    let mut health = HealthClient::new(channel(rls.addr).await);
    let mut watch =
        within(health.watch(HealthCheckRequest { service: SERVICE.into() })).await.expect("watch").into_inner();
    let first = within(watch.message()).await.expect("watch stream").expect("a first status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    rls.shutdown.send(true).expect("server task holds the receiver");
    // The watch stays open on this side; the server must end anyway.
    within(rls.task).await.expect("server task panicked").expect("server ended cleanly");
    assert!(TcpStream::connect(rls.addr).await.is_err(), "{} still accepts", rls.addr);
    drop(watch);
}

// ---------------------------------------------------------------------------------------------
// 9. Metrics

/// GET /metrics over plain HTTP/1.1; returns the body.
async fn scrape(addr: SocketAddr) -> String {
    let mut stream = within(TcpStream::connect(addr)).await.expect("connect to metrics");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: limiter\r\nConnection: close\r\n\r\n").await.expect("send");
    let mut raw = Vec::new();
    within(stream.read_to_end(&mut raw)).await.expect("read scrape");
    let text = String::from_utf8(raw).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length: ")).expect("content-length").parse().expect("number");
    assert_eq!(body.len(), length);
    body.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_decisions_errors_and_durations() {
    let mut rls = start(shop_and_api("metrics")).await;
    let (shutdown_metrics, metrics_rx) = watch::channel(false);
    let (metrics_addr, metrics_task) =
        limiter_agent::metrics::serve(SocketAddr::from(([127, 0, 0, 1], 0)), Arc::clone(&rls.metrics), metrics_rx)
            .await
            .expect("metrics serve");

    for _ in 0..3 {
        rls.one("shop", &[("k", "exact")]).await; // 1 OK, then 2 OVER_LIMIT
    }
    rls.ask(request("elsewhere", vec![descriptor(&[("k", "exact")]), descriptor(&[("a", "b")])])).await;
    rls.one("shop", &[("nothing", "here")]).await;
    rls.one("limiter", &[("generic_key", "api/per-user"), ("x-user-id", "carol")]).await;
    rls.call(request("shop", vec![])).await.expect_err("no descriptors");
    let decided = 6.0;

    let text = scrape(metrics_addr).await;
    let decisions = |domain: &str, rule: &str, code: &str| {
        metric(&text, &format!("limiter_rls_decisions_total{{domain=\"{domain}\",rule=\"{rule}\",code=\"{code}\"}}"))
    };
    assert_eq!(decisions("shop", "shop/k=exact", "OK"), Some(1.0), "{text}");
    assert_eq!(decisions("shop", "shop/k=exact", "OVER_LIMIT"), Some(2.0), "{text}");
    assert_eq!(decisions("_unknown_", "", "OK"), Some(2.0), "{text}");
    assert_eq!(decisions("elsewhere", "", "OK"), None, "unknown domains are not labels: {text}");
    assert_eq!(decisions("shop", "", "OK"), Some(1.0), "{text}");
    assert_eq!(decisions("limiter", "api/per-user", "OK"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "limiter_rls_request_errors_total{reason=\"invalid_argument\"}"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "limiter_rls_decision_duration_seconds_count"), Some(decided), "{text}");
    let inf = metric(&text, "limiter_rls_decision_duration_seconds_bucket{le=\"+Inf\"}");
    assert_eq!(inf, Some(decided), "{text}");
    // Keyed counters: carol's bucket and the `k=exact` window.
    assert_eq!(metric(&text, "limiter_l7_tracked_keys"), Some(2.0), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");

    shutdown_metrics.send(true).expect("metrics task holds the receiver");
    within(metrics_task).await.expect("metrics task ended");
    rls.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 10. Escalation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_denials_escalate_to_a_block_order() {
    let (_, compiled) = load("escalation", &[("api.yaml", API), ("shop.yaml", SHOP)]);
    let penalties = Penalties::of(&compiled);
    assert_eq!(penalties.policies.len(), 1, "{penalties:?}");
    assert_eq!(penalties.policies[0].rules, ["api/per-user", "api/per-ip"]);
    let (orders_tx, mut orders) = mpsc::channel::<BlockOrder>(16);
    let escalator = Arc::new(Escalator::new(EscalationConfig::default(), penalties, orders_tx));
    let options = Options { escalation: Some(escalator), ..Options::default() };
    let mut rls = start_with(frozen_engine(compiled.l7), options).await;

    let call =
        |addr: &str| request("limiter", vec![descriptor(&[("generic_key", "api/per-ip"), ("remote_address", addr)])]);
    // 2 admitted, then denials; the 3rd denial gives the order, not the 2nd.
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(rls.ask(call("192.0.2.7")).await.overall_code);
        assert!(orders.try_recv().is_err(), "no order before the 3rd denial");
    }
    let (allowed, denied) = (ProtoCode::Ok as i32, ProtoCode::OverLimit as i32);
    assert_eq!(codes, [allowed, allowed, denied, denied]);
    assert_eq!(rls.ask(call("192.0.2.7")).await.overall_code, ProtoCode::OverLimit as i32);
    let order = orders.try_recv().expect("a block order after the 3rd denial");
    assert_eq!(order.addr, "192.0.2.7".parse::<IpAddr>().expect("address"));
    assert_eq!((order.policy.as_str(), order.duration, order.denials), ("api", Duration::from_secs(60), 3));
    assert_eq!(order.within, Duration::from_secs(3600));

    // Denials of a header rule count for the same policy, for the address in the call.
    let user = |who: &str, addr: &str| {
        request(
            "limiter",
            vec![
                descriptor(&[("generic_key", "api/per-user"), ("x-user-id", who)]),
                descriptor(&[("remote_address", addr)]),
            ],
        )
    };
    // dave's bucket holds 6: calls 7 and 8 are the 1st and 2nd denials, call 9 the 3rd.
    for call in 1..=9 {
        let resp = rls.ask(user("dave", "198.51.100.9")).await;
        let expected = if call <= 6 { allowed } else { denied };
        assert_eq!(resp.overall_code, expected, "call {call}");
        if call < 9 {
            assert!(orders.try_recv().is_err(), "no order after call {call}");
        }
    }
    assert_eq!(orders.try_recv().expect("order").addr, "198.51.100.9".parse::<IpAddr>().expect("address"));

    // An allow-listed source is denied as often, and never ordered blocked.
    let mut denials = 0;
    for _ in 0..10 {
        if rls.ask(call("10.1.2.3")).await.overall_code == ProtoCode::OverLimit as i32 {
            denials += 1;
        }
    }
    assert_eq!(denials, 8);
    assert!(orders.try_recv().is_err(), "an allow-listed source is never blocked");
    // Nor is a call that names no address.
    for _ in 0..5 {
        rls.ask(request("limiter", vec![descriptor(&[("generic_key", "api/per-user"), ("x-user-id", "dave")])])).await;
    }
    assert!(orders.try_recv().is_err());
    rls.stop().await;
}

#[test]
fn the_yaml_compiles_to_the_rules_the_tests_name() {
    let plan = shop_and_api("names");
    let names: HashMap<&str, &str> = plan.rules.iter().map(|r| (r.name.as_str(), r.domain.as_str())).collect();
    for (name, domain) in [
        ("shop/k=ex*", "shop"),
        ("shop/k=e*", "shop"),
        ("shop/k=exact", "shop"),
        ("shop/k", "shop"),
        ("shop/path=/api/*/x", "shop"),
        ("shop/authenticated=false/remote_address", "shop"),
        ("shop/authenticated=false/remote_address=10.0.0.5", "shop"),
        ("client-daily", "shop"),
        ("trial-hourly", "shop"),
        ("shop/tuning=shadow", "shop"),
        ("shop/hits", "shop"),
        ("api/per-user", "limiter"),
        ("api/per-ip", "limiter"),
    ] {
        assert_eq!(names.get(name), Some(&domain), "{name} in {names:?}");
    }
    assert_eq!(names.len(), 13, "{names:?}");
}
