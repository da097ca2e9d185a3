//! The rate limit service over TLS and mutual TLS (`--rls-tls-cert`, `--rls-tls-key`,
//! `--rls-tls-client-ca`), with certificates made for each test ([`limiter_tests::tls`]):
//!
//! - tonic clients: a client that trusts the CA is answered; a plaintext client, a client
//!   without a certificate (under mutual TLS) and one whose certificate another CA signed are
//!   refused at the handshake, before any request is read; unusable files are named;
//! - a real Envoy whose rate limit cluster presents a client certificate gets the exact
//!   200/429 sequence; an Envoy with a stranger's certificate cannot reach the service and
//!   fails open, as its `failure_mode_deny: false` says.
//!
//! Time: the engine's clock stands still at [`T`] (see `tests/tests/envoy.rs`), so a minute
//! window never rolls over mid-test.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor::Entry};
use envoy_types::pb::envoy::service::ratelimit::v3::{
    RateLimitRequest, rate_limit_response::Code, rate_limit_service_client::RateLimitServiceClient,
};
use limiter_agent::l7::{Engine, EngineConfig};
use limiter_agent::rls::{RlsTls, ServeError};
use limiter_tests::agent::TempDir;
use limiter_tests::envoy::{Counting, Envoy, EnvoyConfig, HttpBackend, RateLimitService, Route, UpstreamTls, get};
use limiter_tests::tls::{CertPair, TestCa};
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const T: u64 = 1_700_000_010;
const HANG: Duration = Duration::from_secs(30);

/// Two requests a minute under `generic_key=tls`, in domain `shop`.
const CONFIG: &str = "domain: shop
descriptors:
  - key: generic_key
    value: tls
    rate_limit: {unit: minute, requests_per_unit: 2}
";

fn engine() -> Engine {
    let dir = TempDir::with_files("rls-tls", &[("shop.yaml", CONFIG)]);
    let compiled = limiter_agent::policy::load_and_compile(&[dir.path("shop.yaml")]).expect("the config compiles");
    let anchor = Instant::now() + Duration::from_secs(3600);
    Engine::with_clock(compiled.l7, EngineConfig::default(), anchor, Duration::from_secs(T))
}

fn tls(server: &CertPair, client_ca: Option<&TestCa>) -> RlsTls {
    RlsTls {
        cert_pem: server.cert.clone().into_bytes(),
        key_pem: server.key.clone().into_bytes(),
        client_ca_pem: client_ca.map(|ca| ca.pem().into_bytes()),
    }
}

fn serve(tls: RlsTls) -> RateLimitService {
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    RateLimitService::start_with_tls(listen, engine(), Counting::Local, Some(tls)).expect("serve over TLS")
}

/// One `ShouldRateLimit` for `[generic_key=tls]` through a client that trusts `ca` and
/// presents `identity`; `scheme` `http` makes a plaintext client. Errors (the connection's or
/// the call's) as text.
fn call(addr: SocketAddr, scheme: &str, ca: &TestCa, identity: Option<&CertPair>) -> Result<Code, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut endpoint = Channel::from_shared(format!("{scheme}://{addr}")).expect("endpoint");
        if scheme == "https" {
            let mut config =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.pem())).domain_name("localhost");
            if let Some(pair) = identity {
                config = config.identity(Identity::from_pem(&pair.cert, &pair.key));
            }
            endpoint = endpoint.tls_config(config).expect("client TLS config");
        }
        let connect = tokio::time::timeout(HANG, endpoint.connect()).await.expect("hang guard");
        let mut client = RateLimitServiceClient::new(connect.map_err(|e| format!("connect: {e:?}"))?);
        let entry = Entry { key: "generic_key".into(), value: "tls".into() };
        let req = RateLimitRequest {
            domain: "shop".into(),
            descriptors: vec![RateLimitDescriptor { entries: vec![entry], ..Default::default() }],
            hits_addend: 0,
        };
        let answer = tokio::time::timeout(HANG, client.should_rate_limit(req)).await.expect("hang guard");
        let code = answer.map_err(|s| format!("call: {s:?}"))?.into_inner().overall_code;
        Ok(Code::try_from(code).expect("a known code"))
    })
}

#[test]
fn over_tls_a_client_that_trusts_the_ca_is_answered_and_a_plaintext_one_is_refused() {
    let ca = TestCa::new("limiter test CA");
    let rls = serve(tls(&ca.server(), None));

    assert_eq!(call(rls.addr(), "https", &ca, None), Ok(Code::Ok));
    let plaintext = call(rls.addr(), "http", &ca, None);
    assert!(plaintext.is_err(), "a plaintext client got an answer from the TLS service: {plaintext:?}");
    // Only the TLS calls counted: the second is the last of 2, the third over the limit.
    assert_eq!(call(rls.addr(), "https", &ca, Some(&ca.client("gateway"))), Ok(Code::Ok));
    assert_eq!(call(rls.addr(), "https", &ca, None), Ok(Code::OverLimit));
}

#[test]
fn mutual_tls_answers_only_clients_with_a_certificate_its_client_ca_signed() {
    let ca = TestCa::new("limiter test CA");
    let other = TestCa::new("someone else's CA");
    let rls = serve(tls(&ca.server(), Some(&ca)));

    assert_eq!(call(rls.addr(), "https", &ca, Some(&ca.client("gateway"))), Ok(Code::Ok));
    // The server's alert (CertificateRequired, UnknownCA) or, when the client has written
    // before reading it, a broken pipe: TLS 1.3 clients finish their side of the handshake
    // first, so which one the client sees is timing. Either way, no answer.
    let anonymous = call(rls.addr(), "https", &ca, None);
    assert!(anonymous.is_err(), "a client without a certificate was answered: {anonymous:?}");
    let stranger = call(rls.addr(), "https", &ca, Some(&other.client("stranger")));
    assert!(stranger.is_err(), "a client whose certificate another CA signed was answered: {stranger:?}");
    let plaintext = call(rls.addr(), "http", &ca, None);
    assert!(plaintext.is_err(), "a plaintext client was answered: {plaintext:?}");
    // The refused calls were never decided: one more is the second of 2.
    assert_eq!(call(rls.addr(), "https", &ca, Some(&ca.client("gateway"))), Ok(Code::Ok));
}

#[test]
fn unusable_tls_files_are_named_and_a_mismatched_key_stops_the_start() {
    let dir = TempDir::with_files("rls-tls-files", &[("not.pem", "just some text\n")]);
    let (missing, not_pem) = (dir.path("missing.pem"), dir.path("not.pem"));
    let ca = TestCa::new("limiter test CA");
    let (cert, key) = ca.server().write(dir.root(), "server");

    let err = RlsTls::from_files(&missing, &key, None).unwrap_err().to_string();
    assert!(err.starts_with("--rls-tls-cert ") && err.contains("missing.pem"), "{err}");
    let err = RlsTls::from_files(&cert, &not_pem, None).unwrap_err().to_string();
    assert!(err.starts_with("--rls-tls-key ") && err.contains("not.pem") && err.contains("no PEM block"), "{err}");
    let err = RlsTls::from_files(&cert, &key, Some(&missing)).unwrap_err().to_string();
    assert!(err.starts_with("--rls-tls-client-ca ") && err.contains("missing.pem"), "{err}");
    let good = RlsTls::from_files(&cert, &key, Some(&cert)).expect("readable PEM files");

    // Another certificate's key: rustls refuses it when the server is built, before anything
    // is served, and says why.
    let mismatched = RlsTls { key_pem: ca.server().key.into_bytes(), ..good };
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let err = RateLimitService::start_with_tls(listen, engine(), Counting::Local, Some(mismatched))
        .err()
        .expect("a mismatched key must not serve");
    let tls_error = err.chain().find_map(|e| e.downcast_ref::<ServeError>());
    assert!(matches!(tls_error, Some(ServeError::Tls { .. })), "{err:#}");
    assert!(format!("{err:#}").contains("KeyMismatch"), "{err:#}");
}

/// A generated Envoy whose route to the backend sends `[generic_key=tls]` to the service over
/// mutual TLS, presenting `client`.
fn envoy(rls: &RateLimitService, backend: &HttpBackend, ca: &TestCa, client: &CertPair, dir: &TempDir) -> Envoy {
    let ca_file = dir.path("ca.crt");
    std::fs::write(&ca_file, ca.pem()).expect("write CA");
    let (cert, key) = client.write(dir.root(), "envoy");
    let route =
        Route { prefix: "/".into(), rate_limits: json!([{"actions": [{"generic_key": {"descriptor_value": "tls"}}]}]) };
    let config = EnvoyConfig {
        rls: rls.addr(),
        domain: "shop".into(),
        routes: vec![route],
        failure_mode_deny: false,
        rls_tls: Some(UpstreamTls { ca: ca_file, cert, key }),
    };
    Envoy::start(&config, backend).expect("envoy starts")
}

#[test]
fn envoy_calls_the_service_over_mutual_tls_and_a_stranger_certificate_fails_open() {
    let ca = TestCa::new("limiter test CA");
    let rls = serve(tls(&ca.server(), Some(&ca)));
    let backend = HttpBackend::start().expect("HTTP backend");
    let dir = TempDir::new("rls-tls-envoy");

    let gateway = envoy(&rls, &backend, &ca, &ca.client("gateway"), &dir);
    let statuses: Vec<u16> = (0..3).map(|_| get(gateway.port(), "/", &[]).expect("GET").status).collect();
    assert_eq!(statuses, [200, 200, 429], "{}", gateway.log());
    let limited = get(gateway.port(), "/", &[]).expect("GET");
    assert_eq!(limited.header("x-ratelimit-limit"), Some("2, 2;w=60"), "an unnamed limit: no name=");
    drop(gateway);

    // Another CA's certificate: the handshake fails, so Envoy has no answer and fails open.
    let other = TestCa::new("someone else's CA");
    let stranger = envoy(&rls, &backend, &ca, &other.client("stranger"), &dir);
    let statuses: Vec<u16> = (0..3).map(|_| get(stranger.port(), "/", &[]).expect("GET").status).collect();
    assert_eq!(statuses, [200, 200, 200], "{}", stranger.log());
    assert_eq!(stranger.stat("cluster.backend.ratelimit.failure_mode_allowed").expect("envoy stats"), 3);
    assert_eq!(backend.requests(), 2 + 3, "the 429s never reached the backend");
}
