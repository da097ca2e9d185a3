//! The Envoy rate limit service: `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`
//! over gRPC (tonic, with Envoy's pre-generated protos from `envoy-types`), plus the standard
//! `grpc.health.v1.Health` service, answered from the compiled [`L7Plan`] by the
//! [`crate::l7::Engine`] (backend `local`) or with counts in Redis ([`redis`]).
//!
//! `limiter-agent run --rls-listen 127.0.0.1:8081` (the default; loopback unless told
//! otherwise) serves it next to the XDP data path, or alone when run without `--iface`.
//!
//! # What Envoy must send
//!
//! A gateway's `envoy.filters.http.ratelimit` filter sends, per request, the descriptors its
//! route's `rate_limits` actions produce; `limiter-agent explain` prints those actions for
//! every L7 rule of a policy set. The domain selects the rule set:
//!
//! - **envoyproxy/ratelimit configs** (`domain`, nested `descriptors`): the config's own
//!   domain and keys, exactly as the reference service reads them: per descriptor, at each
//!   level the exact `key` + `value`, else the first wildcard value (`foo*`, `/api/*/x`) in
//!   config order, else the key alone; the request's descriptor must end where the rule does
//!   (depth); `unlimited`, `replaces` and `shadow_mode` as the reference.
//! - **Gateway kinds** (`RateLimitPolicy`, Envoy Gateway `BackendTrafficPolicy`, TEG, kgateway
//!   local, agentgateway): domain [`DEFAULT_DOMAIN`] (`limiter`), one descriptor per rule, its
//!   entries in `clientSelectors` order (full table in [`crate::policy::compile`]'s `l7`):
//!
//! | rule written as | descriptor entry Envoy sends | `rate_limits` action |
//! |---|---|---|
//! | every rule `policy/rule` | `generic_key` = `policy/rule` (first) | `generic_key: {descriptor_value: policy/rule}` |
//! | `sourceCIDR` (`Distinct`: per client, `Exact`: one shared counter; `invert`) | `remote_address` = client address | `remote_address: {}` |
//! | header `type: Distinct` (EG `value: "*"`) | `<header>` = its value | `request_headers: {header_name, descriptor_key: <header>}` |
//! | header `Exact` `v` | `header_match` = `<header>=v` | `header_value_match` (exact `v`) |
//! | header `Exact` + `invert` | `header_match` = `<header>!=v` | `header_value_match`, `expect_match: false` |
//! | header `Distinct` + `invert` | `header_match` = `no <header>` | `header_value_match`, `present_match`, `expect_match: false` |
//!
//! For example Envoy Gateway's per-user rule `{headers: [{name: x-user-id, type: Distinct}]}`
//! in policy `default/per-user` with rule `0` is answered for the descriptor
//! `[generic_key=default/per-user/0, x-user-id=alice]` in domain `limiter`, and a native
//! `sourceCIDR: {type: Distinct, value: 0.0.0.0/0}` rule `shield/per-ip` for
//! `[generic_key=shield/per-ip, remote_address=192.0.2.7]`. A request without the header
//! sends no such descriptor (Envoy drops a descriptor whose `request_headers` header is
//! missing), so the rule does not apply to it, as in the gateway.
//!
//! # Answers
//!
//! One `DescriptorStatus` per request descriptor, in order: `code`, `current_limit`
//! `{requests_per_unit, unit, name}` (name = the rule's name, so Envoy's
//! `enable_x_ratelimit_headers: DRAFT_VERSION_03` writes `x-ratelimit-limit: 10,
//! 10;w=60;name="default/per-user/0"`), `limit_remaining` and `duration_until_reset` (whole
//! seconds, rounded up); `overall_code` is `OVER_LIMIT` if any status is. A descriptor no
//! rule matches, and every descriptor of an unknown domain, is `OK` with no limit; an
//! `unlimited` rule answers `OK`, no limit, remaining `u32::MAX` (as the reference). Shadow
//! rules count and answer `OK` (counted in `limiter_rls_shadow_over_limit_total`). A unit
//! the protocol cannot name (kgateway `fillInterval: 10s`) is reported as the same rate in
//! the smallest unit that holds the interval (5 per 10s → 30 per minute).
//!
//! # Errors and limits
//!
//! A call with an empty domain, no descriptors, a descriptor without entries, an entry
//! with an empty key, a descriptor `hits_addend` beyond `u32::MAX`, `is_negative_hits` or a
//! per-descriptor limit override (neither is supported) gets gRPC `INVALID_ARGUMENT` naming
//! the problem. With [`RateLimiter::with_allowed_callers`] (`--rls-allow-callers`), a call
//! whose TCP peer is outside those networks gets `PERMISSION_DENIED`: callers name the client
//! address escalation blocks, so only gateways should be able to call. Requests larger than [`RlsConfig::max_request_bytes`] are refused by tonic
//! (`OUT_OF_RANGE`). At most [`RlsConfig::max_in_flight`] calls are decided at once: a call
//! beyond that gets `RESOURCE_EXHAUSTED` at once, and Envoy applies its own
//! `failure_mode_deny` (default: let the request through). Each HTTP/2 connection has at
//! most [`RlsConfig::max_streams_per_connection`] calls open, and every call is bounded by
//! [`RlsConfig::timeout`].
//!
//! # Transport
//!
//! Plaintext HTTP/2 by default, as Envoy's rate limit cluster is usually configured on a
//! node-local or loopback address. With [`RlsTls`] (`--rls-tls-cert`, `--rls-tls-key`) the
//! service speaks TLS; with a client CA as well (`--rls-tls-client-ca`), mutual TLS: only
//! callers presenting a certificate that CA signed complete the handshake.
//!
//! # Escalation
//!
//! With `--iface`, a source a policy's `penalty` catches is put in the XDP block list; see
//! [`escalation`].
//!
//! # Shutdown
//!
//! [`serve`] stops accepting when its shutdown signal fires, marks the health service
//! `NOT_SERVING`, and lets calls in flight finish for at most [`RlsConfig::drain_timeout`];
//! connections still open then (a health `Watch` stream never ends by itself) are closed.

pub mod escalation;
pub mod redis;
mod service;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use log::info;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

pub use self::service::{RateLimiter, request_from_proto, response_to_proto};
use crate::plan::L7Plan;
use crate::plan::l7::DEFAULT_DOMAIN;

/// The `grpc.health.v1` service name envoyproxy/ratelimit answers for (besides `""` and the
/// protocol's full service name).
pub const REFERENCE_HEALTH_SERVICE: &str = "ratelimit";

/// Where decisions are counted.
#[derive(Clone)]
pub enum Backend {
    /// In this process ([`crate::l7::Engine`]): token buckets and fixed windows, per node.
    Local,
    /// In Redis: exact fixed windows shared by every node (and by envoyproxy/ratelimit).
    Redis(redis::RedisBackend),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Local => "local",
            Backend::Redis(_) => "redis",
        })
    }
}

/// Settings of the gRPC server.
#[derive(Clone, Debug)]
pub struct RlsConfig {
    pub listen: SocketAddr,
    /// Largest `ShouldRateLimit` request accepted (bytes, decoded message).
    pub max_request_bytes: usize,
    /// Calls decided at once across every connection.
    pub max_in_flight: usize,
    /// Calls open at once on one HTTP/2 connection.
    pub max_streams_per_connection: u32,
    /// Longest a call may take.
    pub timeout: Duration,
    /// After shutdown fires, how long open calls get to finish before their connections are
    /// closed. Needed because a health `Watch` stream never ends on its own.
    pub drain_timeout: Duration,
    /// gRPC over TLS (and, with a client CA, only for callers with a certificate it signed);
    /// plaintext HTTP/2 when `None`.
    pub tls: Option<RlsTls>,
}

/// TLS of the rate limit service, as PEM read from the files `--rls-tls-cert`, `--rls-tls-key`
/// and `--rls-tls-client-ca` name: what envoyproxy/ratelimit offers with `GRPC_SERVER_USE_TLS`,
/// `GRPC_SERVER_TLS_CERT`/`_KEY` and `GRPC_CLIENT_TLS_CACERT`.
///
/// Mutual TLS is the way to trust callers beyond loopback: a caller names the client address
/// that escalation blocks, and with a client CA only gateways holding a certificate it signed
/// can call at all (a TLS handshake without one fails before any request is read).
#[derive(Clone)]
pub struct RlsTls {
    /// The certificate chain the service presents, leaf first.
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// CA certificate(s) a caller's certificate must chain to; `None` accepts any caller.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for RlsTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("RlsTls").field("client_certificates_required", &self.client_ca_pem.is_some()).finish()
    }
}

impl RlsTls {
    /// Reads the PEM files; an error names the flag and the file.
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<RlsTls, TlsFileError> {
        let read = |flag: &'static str, path: &Path| {
            let text = std::fs::read(path).map_err(|source| TlsFileError {
                flag,
                path: path.to_owned(),
                problem: source.to_string(),
            })?;
            const PEM_BEGIN: &[u8] = b"-----BEGIN ";
            if !text.windows(PEM_BEGIN.len()).any(|w| w == PEM_BEGIN) {
                let problem = "no PEM block in it (expected -----BEGIN ...-----)".to_owned();
                return Err(TlsFileError { flag, path: path.to_owned(), problem });
            }
            Ok(text)
        };
        Ok(RlsTls {
            cert_pem: read("--rls-tls-cert", cert)?,
            key_pem: read("--rls-tls-key", key)?,
            client_ca_pem: client_ca.map(|p| read("--rls-tls-client-ca", p)).transpose()?,
        })
    }

    fn server_config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }

    fn describe(&self) -> &'static str {
        if self.client_ca_pem.is_some() { "TLS, client certificates required" } else { "TLS" }
    }
}

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {}: {problem}", path.display())]
pub struct TlsFileError {
    pub flag: &'static str,
    pub path: PathBuf,
    pub problem: String,
}

impl Default for RlsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            max_request_bytes: 64 * 1024,
            max_in_flight: 1024,
            max_streams_per_connection: 256,
            timeout: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(3),
            tls: None,
        }
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding the rate limit service to {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    /// rustls refused the certificate or key (not a certificate, a key that does not match...).
    // The cause (rustls's reason, e.g. KeyMismatch) is the source, printed by the error chain.
    #[error("the rate limit service's TLS certificate, key or client CA is not usable")]
    Tls { source: tonic::transport::Error },
}

/// A running server: its bound address and its task (which ends after shutdown).
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub task: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Binds `config.listen` (port 0 picks a free one) and serves `ShouldRateLimit` and the
/// health service until `shutdown` turns true.
pub async fn serve(
    config: &RlsConfig,
    limiter: Arc<RateLimiter>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Running, ServeError> {
    let addr = config.listen;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| ServeError::Bind { addr, source })?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RateLimitServiceServer<RateLimiter>>().await;
    // The name envoyproxy/ratelimit registers, which its Deployment's gRPC probe asks for.
    health.set_service_status(REFERENCE_HEALTH_SERVICE, tonic_health::ServingStatus::Serving).await;
    let service = RateLimitServiceServer::from_arc(limiter).max_decoding_message_size(config.max_request_bytes);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(tls.server_config()).map_err(|source| ServeError::Tls { source })?;
    }
    let server = builder
        .concurrency_limit_per_connection(config.max_streams_per_connection as usize)
        .max_concurrent_streams(config.max_streams_per_connection)
        .timeout(config.timeout)
        .add_service(health_service)
        .add_service(service);
    let transport = config.tls.as_ref().map_or("plaintext", RlsTls::describe);
    info!("rate limit service listening on {bound} (gRPC envoy.service.ratelimit.v3 and grpc.health.v1; {transport})");
    let drain = config.drain_timeout;
    let task = tokio::spawn(async move {
        let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
            health.set_not_serving::<RateLimitServiceServer<RateLimiter>>().await;
            health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            health.set_service_status(REFERENCE_HEALTH_SERVICE, tonic_health::ServingStatus::NotServing).await;
            let _ = fired_tx.send(());
        };
        let serving = server.serve_with_incoming_shutdown(incoming, stop);
        tokio::pin!(serving);
        // Graceful shutdown waits for every open call; bound it, so that a client holding a
        // stream open (a health Watch) cannot keep the agent from exiting.
        let drained = async move {
            if fired_rx.await.is_ok() {
                tokio::time::sleep(drain).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            result = &mut serving => result,
            () = drained => {
                log::warn!("rate limit service: calls still open {drain:?} after shutdown; closing their connections");
                Ok(())
            }
        }
    });
    Ok(Running { addr: bound, task })
}

/// The domains a plan has rules for (the rest are "unknown": answered OK, labelled
/// [`crate::metrics::UNKNOWN_DOMAIN`]).
pub fn plan_domains(plan: &L7Plan) -> std::collections::HashSet<String> {
    let mut domains: std::collections::HashSet<String> = plan.rules.iter().map(|r| r.domain.clone()).collect();
    if domains.is_empty() {
        // Nothing to label, but keep the gateway kinds' domain readable in metrics.
        domains.insert(DEFAULT_DOMAIN.to_owned());
    }
    domains
}
