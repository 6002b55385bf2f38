//! The HTTP/1.1 server: accept loop, who may connect (allow-list and per-client cap, decided at
//! accept), the connection cap, timeouts, keep-alive and graceful shutdown.
//!
//! It owns sockets and connections only. What a request means belongs to a [`Routes`]
//! implementation ([`ingest::Ingress`] for webhooks). It must never read a byte from a peer its
//! [`PeerPolicy`] refuses, never read a body without the limits of [`body`], and never drop an
//! in-flight request on shutdown before the grace period ends.

pub mod admin;
pub mod body;
pub mod error;
pub mod ingest;
pub mod probes;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Open files the process needs beyond its connections (listeners, SQLite files, logs).
const FILE_HEADROOM: u64 = 256;
/// Refused connections are summarised in the log at most this often (an attack must not flood it).
const REFUSAL_REPORT_EVERY: Duration = Duration::from_secs(10);

/// A request body a [`Routes`] can read: hyper's `Incoming` off a socket, or
/// `http_body_util::Full` when a test hands a request straight to the routes.
pub trait RequestBody:
    hyper::body::Body<Data = Bytes, Error: std::error::Error + Send + Sync + 'static>
    + Send
    + Sync
    + Unpin
    + 'static
{
}

impl<B> RequestBody for B where
    B: hyper::body::Body<Data = Bytes, Error: std::error::Error + Send + Sync + 'static>
        + Send
        + Sync
        + Unpin
        + 'static
{
}

/// Something that answers requests.
pub trait Routes: Send + Sync + 'static {
    fn route<B: RequestBody>(
        self: Arc<Self>,
        request: Request<B>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;

    /// Which peers may connect at all; by default any, without a per-client cap.
    fn peer_policy(&self) -> PeerPolicy {
        PeerPolicy::default()
    }
}

/// Who may connect, decided from the peer address alone, as soon as a connection is accepted.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    /// Peers allowed to connect (empty: any).
    pub allow_networks: Vec<IpNet>,
    /// Reverse proxies: always admitted (the real client, named in `X-Forwarded-For`, is checked
    /// per request) and exempt from the per-client cap, which would otherwise cap everyone.
    pub trusted_proxies: Vec<IpNet>,
    /// Most simultaneous connections from one peer address, an IPv6 peer counting by its /64
    /// (one host's usual allocation). `None`: no cap.
    pub max_connections_per_client: Option<usize>,
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    OutsideAllowList,
    OverClientCap,
}

impl PeerPolicy {
    fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&peer))
    }

    fn check_network(&self, peer: IpAddr) -> Result<(), Refusal> {
        let allowed = self.allow_networks.is_empty()
            || self.is_trusted_proxy(peer)
            || self.allow_networks.iter().any(|n| n.contains(&peer));
        if allowed {
            Ok(())
        } else {
            Err(Refusal::OutsideAllowList)
        }
    }
}

/// Open connections per peer address (IPv6: per /64), for the per-client cap.
#[derive(Debug, Default)]
struct ClientConnections(Mutex<HashMap<IpAddr, usize>>);

/// What the per-client cap counts a peer as: IPv4 addresses one by one, IPv6 by /64, since a
/// single IPv6 host can pick any address in its /64.
fn client_key(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
    }
}

/// One counted connection; uncounted when dropped.
struct ClientSlot {
    counts: Arc<ClientConnections>,
    peer: IpAddr,
}

impl ClientConnections {
    fn try_take(self: &Arc<Self>, peer: IpAddr, max: usize) -> Result<ClientSlot, Refusal> {
        let peer = client_key(peer);
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let open = counts.entry(peer).or_insert(0);
        if *open >= max {
            return Err(Refusal::OverClientCap);
        }
        *open += 1;
        Ok(ClientSlot {
            counts: self.clone(),
            peer,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = counts.get_mut(&self.peer) {
            *open -= 1;
            if *open == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

/// Says in the log that connections were refused: the first at once, then a count at most every
/// [`REFUSAL_REPORT_EVERY`].
#[derive(Default)]
struct RefusalLog {
    outside_allow_list: u64,
    over_client_cap: u64,
    last_report: Option<Instant>,
}

impl RefusalLog {
    fn note(&mut self, refusal: Refusal, peer: IpAddr) {
        match refusal {
            Refusal::OutsideAllowList => self.outside_allow_list += 1,
            Refusal::OverClientCap => self.over_client_cap += 1,
        }
        if self
            .last_report
            .is_some_and(|at| at.elapsed() < REFUSAL_REPORT_EVERY)
        {
            return;
        }
        tracing::warn!(
            outside_allow_list = self.outside_allow_list,
            over_client_cap = self.over_client_cap,
            last_peer = %peer,
            "connections closed at accept (server.allow_networks, server.max_connections_per_client)"
        );
        *self = RefusalLog {
            last_report: Some(Instant::now()),
            ..RefusalLog::default()
        };
    }
}

/// Raises the open-file limit to fit `max_connections`, and says so loudly if the hard limit
/// does not allow it (accepts would fail with EMFILE long before the cap).
fn ensure_open_file_limit(max_connections: usize) {
    let wanted = max_connections as u64 + FILE_HEADROOM;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit >= wanted => {}
        Ok(limit) => tracing::warn!(
            open_file_limit = limit,
            max_connections,
            "the open-file limit is below server.max_connections; raise LimitNOFILE (systemd) \
             or ulimit -n, or lower server.max_connections"
        ),
        Err(error) => tracing::warn!(%error, "could not read or raise the open-file limit"),
    }
}

/// Connection-level limits.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// Serves `routes` on `listener` until `shutdown` completes, then stops accepting, lets
/// in-flight requests finish (up to the grace period) and returns.
pub async fn serve<R: Routes>(
    listener: TcpListener,
    routes: Arc<R>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    ensure_open_file_limit(limits.max_connections);
    let policy = routes.peer_policy();
    let clients = Arc::new(ClientConnections::default());
    let mut refusals = RefusalLog::default();
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let mut spare_permit = None;
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let permit = match spare_permit.take() {
            Some(permit) => permit,
            None => tokio::select! {
                permit = connections.clone().acquire_owned() => permit.expect("semaphore is never closed"),
                () = &mut shutdown => break,
            },
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually EMFILE or a connection reset before accept: pause, don't spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let client = peer.ip().to_canonical();
        let admitted =
            policy
                .check_network(client)
                .and_then(|()| match policy.max_connections_per_client {
                    Some(max) if !policy.is_trusted_proxy(client) => {
                        clients.try_take(client, max).map(Some)
                    }
                    _ => Ok(None),
                });
        let client_slot = match admitted {
            Ok(slot) => slot,
            Err(refusal) => {
                // Closed unread: dropping the socket is all a refused peer gets.
                drop(stream);
                refusals.note(refusal, client);
                spare_permit = Some(permit);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let routes = routes.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let routes = routes.clone();
            async move { Ok::<_, Infallible>(routes.route(request, peer).await) }
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
            drop((permit, client_slot));
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?limits.shutdown_grace, "connections still open after the shutdown grace period");
    }
}

/// A short JSON response, the only body shape this service sends.
pub fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_per_client_cap_counts_ipv6_peers_by_their_64() {
        let clients = Arc::new(ClientConnections::default());
        let first = clients.try_take(ip("2001:db8:1:2::1"), 2).unwrap();
        let _second = clients.try_take(ip("2001:db8:1:2:ffff::9"), 2).unwrap();
        assert_eq!(
            clients
                .try_take(ip("2001:db8:1:2::77").to_canonical(), 2)
                .err(),
            Some(Refusal::OverClientCap)
        );
        assert!(clients.try_take(ip("2001:db8:1:3::1"), 2).is_ok());
        let _v4 = clients.try_take(ip("192.0.2.1"), 1).unwrap();
        assert!(clients.try_take(ip("192.0.2.2"), 1).is_ok());
        drop(first);
        assert!(clients.try_take(ip("2001:db8:1:2::77"), 2).is_ok());
    }

    #[test]
    fn trusted_proxies_pass_the_allow_list_at_accept() {
        let policy = PeerPolicy {
            allow_networks: vec!["192.0.2.0/24".parse().unwrap()],
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            max_connections_per_client: Some(1),
        };
        assert_eq!(policy.check_network(ip("192.0.2.9")), Ok(()));
        assert_eq!(policy.check_network(ip("10.1.2.3")), Ok(()));
        assert_eq!(
            policy.check_network(ip("198.51.100.1")),
            Err(Refusal::OutsideAllowList)
        );
        assert_eq!(
            PeerPolicy::default().check_network(ip("198.51.100.1")),
            Ok(())
        );
    }
}
