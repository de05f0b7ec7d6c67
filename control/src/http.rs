//! The health and metrics endpoint (`--healthz-ip`, `--healthz-port`): a deliberately small
//! HTTP/1.1 server on a tokio `TcpListener`.
//!
//! `GET /healthz` answers 200 `ok` while this host holds its lease, the packet engine is
//! running and no host interface still uses an old subnet of this host; else 503 with a short
//! reason (while starting: which step weftd waits for). `GET /metrics` answers the Prometheus
//! text a callback renders. One request per connection (`Connection: close`). The request head
//! is bounded in size and time and anything malformed gets a 4xx, so a port scanner or a
//! confused client costs a few bytes and never a panic. The number of open connections is
//! bounded too; when all slots are taken the oldest connection is closed to make room, so
//! idle clients cannot keep a health probe out.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders the metrics page on each `GET /metrics`.
pub type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;

/// What `/healthz` reports: flipped by the daemon as the lease and the engine come and go.
#[derive(Debug, Default)]
pub struct Health {
    phase: Mutex<Option<&'static str>>,
    lease_held: AtomicBool,
    engine_running: AtomicBool,
    subnet_stale: AtomicBool,
}

impl Health {
    /// Neither lease nor engine yet: unhealthy.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records whether this host currently holds a valid subnet lease.
    pub fn set_lease_held(&self, held: bool) {
        self.lease_held.store(held, Ordering::Relaxed);
    }

    /// Records whether the packet engine is running.
    pub fn set_engine_running(&self, running: bool) {
        self.engine_running.store(running, Ordering::Relaxed);
    }

    /// Names the step weftd is in while it is not (yet, or any more) forwarding, e.g.
    /// "starting: waiting for the network config in etcd"; `None` once it runs. While set, it
    /// is the reason `/healthz` gives.
    pub fn set_phase(&self, phase: Option<&'static str>) {
        if let Ok(mut current) = self.phase.lock() {
            *current = phase;
        }
    }

    /// Records whether a host interface (docker's bridge) may still use a subnet this host
    /// no longer holds.
    pub fn set_subnet_stale(&self, stale: bool) {
        self.subnet_stale.store(stale, Ordering::Relaxed);
    }

    /// Whether a host interface may still use a subnet this host no longer holds.
    pub fn subnet_stale(&self) -> bool {
        self.subnet_stale.load(Ordering::Relaxed)
    }

    /// `Ok` when healthy, else why not.
    pub fn check(&self) -> Result<(), &'static str> {
        if let Some(phase) = self.phase.lock().ok().and_then(|phase| *phase) {
            return Err(phase);
        }
        if self.subnet_stale() {
            return Err("this host's subnet changed and a host interface still uses the old one: restart docker");
        }
        match (
            self.lease_held.load(Ordering::Relaxed),
            self.engine_running.load(Ordering::Relaxed),
        ) {
            (true, true) => Ok(()),
            (false, true) => Err("no subnet lease held"),
            (true, false) => Err("packet engine not running"),
            (false, false) => Err("no subnet lease held; packet engine not running"),
        }
    }
}

/// Resource bounds for each connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted request head (request line and headers), in bytes.
    pub max_head: usize,
    /// Time a client has to send its request head, and to take the response.
    pub io_timeout: Duration,
    /// Connections open at once; a new one beyond this closes the oldest.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 8 * 1024,
            io_timeout: Duration::from_secs(5),
            max_connections: 64,
        }
    }
}

/// A response, before serialization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type` header value.
    pub content_type: &'static str,
    /// `Allow` header value, for 405.
    pub allow: Option<&'static str>,
    /// Body (omitted on the wire for HEAD).
    pub body: String,
    /// Whether the request was HEAD.
    pub head_only: bool,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            allow: None,
            body: body.into(),
            head_only: false,
        }
    }

    /// The response as bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason_phrase(self.status),
            self.content_type,
            self.body.len()
        );
        if let Some(allow) = self.allow {
            out.push_str("Allow: ");
            out.push_str(allow);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Answers one request head (everything before the blank line). Pure.
pub fn respond(
    head: &[u8],
    health: &Health,
    metrics: &(dyn Fn() -> String + Send + Sync),
) -> Response {
    let Ok(head) = std::str::from_utf8(head) else {
        return Response::text(400, "bad request\n");
    };
    let request_line = head.split('\n').next().unwrap_or_default();
    let request_line = request_line.strip_suffix('\r').unwrap_or(request_line);
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "bad request\n");
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Response::text(400, "bad request\n");
    }
    if !version.starts_with("HTTP/") {
        return Response::text(400, "bad request\n");
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Response::text(505, "HTTP/1.x only\n");
    }
    if !target.starts_with('/') {
        return Response::text(400, "bad request\n");
    }
    let path = target.split(['?', '#']).next().unwrap_or_default();

    let head_only = method == "HEAD";
    let mut response = match path {
        "/healthz" | "/metrics" if method != "GET" && !head_only => Response {
            allow: Some("GET, HEAD"),
            ..Response::text(405, "method not allowed\n")
        },
        "/healthz" => match health.check() {
            Ok(()) => Response::text(200, "ok"),
            Err(reason) => Response::text(503, reason),
        },
        "/metrics" => Response {
            content_type: PROMETHEUS_CONTENT_TYPE,
            ..Response::text(200, metrics())
        },
        _ => Response::text(404, "not found\n"),
    };
    response.head_only = head_only;
    response
}

/// Where a request head ends: just past the first blank line (`\r\n\r\n`, or a bare `\n\n`
/// from lenient clients).
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The health and metrics server.
pub struct HttpServer {
    listener: TcpListener,
    health: Arc<Health>,
    metrics: MetricsFn,
    limits: Limits,
}

impl HttpServer {
    /// Binds `addr` (use port 0 for any free port).
    pub async fn bind(
        addr: SocketAddr,
        health: Arc<Health>,
        metrics: MetricsFn,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(HttpServer::from_listener(listener, health, metrics))
    }

    /// Serves on an already bound listener.
    pub fn from_listener(listener: TcpListener, health: Arc<Health>, metrics: MetricsFn) -> Self {
        HttpServer {
            listener,
            health,
            metrics,
            limits: Limits::default(),
        }
    }

    /// Replaces the default per-connection limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts and serves connections until the future is dropped; each connection is its
    /// own task. When `max_connections` are open, the oldest is closed to make room: a slow
    /// or idle client can hold a slot only until newer clients need it.
    pub async fn run(self) {
        let open = Arc::new(OpenConnections::default());
        let mut next_id = 0u64;
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("healthz: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let id = next_id;
            next_id += 1;
            let health = self.health.clone();
            let metrics = self.metrics.clone();
            let limits = self.limits;
            let registry = open.clone();
            let mut evicted = Vec::new();
            {
                // Held across the spawn so that the task cannot deregister before it is
                // registered; the evicted are aborted after it is released, since an aborted
                // task deregisters itself.
                // A panic elsewhere cannot leave the map half-updated in a way that matters
                // here; the probe must go on being answered.
                let mut tasks = open
                    .tasks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                while tasks.len() >= limits.max_connections.max(1) {
                    let Some((_, oldest)) = tasks.pop_first() else {
                        break;
                    };
                    evicted.push(oldest);
                }
                let task = tokio::spawn(async move {
                    let _registered = Registered { open: registry, id };
                    if let Err(e) = serve_connection(stream, &health, &*metrics, limits).await {
                        tracing::debug!("healthz: connection from {peer}: {e}");
                    }
                });
                tasks.insert(id, task.abort_handle());
            }
            for oldest in evicted {
                tracing::debug!("healthz: too many connections, closing the oldest");
                oldest.abort();
            }
        }
    }
}

/// The connections being served, by age (ids increase).
#[derive(Default)]
struct OpenConnections {
    tasks: Mutex<BTreeMap<u64, AbortHandle>>,
}

/// Removes a connection from [`OpenConnections`] when its task ends or is aborted.
struct Registered {
    open: Arc<OpenConnections>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut tasks) = self.open.tasks.lock() {
            tasks.remove(&self.id);
        }
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    health: &Health,
    metrics: &(dyn Fn() -> String + Send + Sync),
    limits: Limits,
) -> io::Result<()> {
    let response = match tokio::time::timeout(
        limits.io_timeout,
        read_head(&mut stream, limits.max_head),
    )
    .await
    {
        Err(_) => Response::text(408, "request timeout\n"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(HeadRead::TooLarge))) => Response::text(431, "request head too large\n"),
        Ok(Ok(Some(HeadRead::Head(head)))) => respond(&head, health, metrics),
    };
    let bytes = response.to_bytes();
    match tokio::time::timeout(limits.io_timeout, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await
    {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client too slow to read",
        )),
    }
}

enum HeadRead {
    Head(Vec<u8>),
    TooLarge,
}

/// Reads until the end of the request head; `None` when the client closed first.
async fn read_head(stream: &mut TcpStream, max_head: usize) -> io::Result<Option<HeadRead>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            // A closed connection with a partial head still deserves an answer if it can
            // be parsed (e.g. a client that half-closes after one line).
            return Ok(if buf.is_empty() {
                None
            } else {
                Some(HeadRead::Head(buf))
            });
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf[scan_from..]).map(|e| e + scan_from) {
            if end > max_head {
                return Ok(Some(HeadRead::TooLarge));
            }
            buf.truncate(end);
            return Ok(Some(HeadRead::Head(buf)));
        }
        if buf.len() > max_head {
            return Ok(Some(HeadRead::TooLarge));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> String {
        "# TYPE weft_up gauge\nweft_up 1\n".to_string()
    }

    fn healthy() -> Health {
        let h = Health::new();
        h.set_lease_held(true);
        h.set_engine_running(true);
        h
    }

    #[test]
    fn health_reasons() {
        let h = Health::new();
        assert_eq!(
            h.check(),
            Err("no subnet lease held; packet engine not running")
        );
        h.set_lease_held(true);
        assert_eq!(h.check(), Err("packet engine not running"));
        h.set_engine_running(true);
        assert_eq!(h.check(), Ok(()));
        h.set_lease_held(false);
        assert_eq!(h.check(), Err("no subnet lease held"));
    }

    #[test]
    fn phase_and_stale_subnet_come_first() {
        let h = healthy();
        h.set_phase(Some("starting: waiting for a subnet lease"));
        assert_eq!(h.check(), Err("starting: waiting for a subnet lease"));
        h.set_phase(None);
        h.set_subnet_stale(true);
        assert!(h
            .check()
            .is_err_and(|reason| reason.contains("restart docker")));
        assert!(h.subnet_stale());
        h.set_subnet_stale(false);
        assert_eq!(h.check(), Ok(()));
    }

    #[test]
    fn routes_and_methods() {
        let h = healthy();
        let r = respond(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", &h, &metrics);
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        let r = respond(b"GET /healthz?verbose=1 HTTP/1.0\r\n\r\n", &h, &metrics);
        assert_eq!(r.status, 200);
        let r = respond(b"GET /healthz HTTP/1.1\nHost: x\n\n", &h, &metrics);
        assert_eq!(r.status, 200, "bare LF line ends");
        let r = respond(b"GET /metrics HTTP/1.1\r\n\r\n", &h, &metrics);
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, PROMETHEUS_CONTENT_TYPE);
        assert_eq!(r.body, metrics());
        let r = respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", &h, &metrics);
        assert!(r.head_only);
        assert!(!String::from_utf8(r.to_bytes()).unwrap().contains("weft_up"));
        let r = respond(b"POST /healthz HTTP/1.1\r\n\r\n", &h, &metrics);
        assert_eq!((r.status, r.allow), (405, Some("GET, HEAD")));
        assert_eq!(respond(b"GET / HTTP/1.1\r\n\r\n", &h, &metrics).status, 404);
        assert_eq!(
            respond(b"GET /healthzz HTTP/1.1\r\n\r\n", &h, &metrics).status,
            404
        );
        assert_eq!(
            respond(b"GET /healthz HTTP/2.0\r\n\r\n", &h, &metrics).status,
            505
        );
    }

    #[test]
    fn malformed_heads_are_bad_requests() {
        let h = healthy();
        for head in [
            &b""[..],
            b"\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /healthz\r\n\r\n",
            b"GET /healthz HTTP/1.1 extra\r\n\r\n",
            b"get /healthz HTTP/1.1\r\n\r\n",
            b"GET healthz HTTP/1.1\r\n\r\n",
            b"GET /healthz FTP/1.0\r\n\r\n",
            b"\xff\xfe\x00garbage",
            b"GET  /healthz HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(respond(head, &h, &metrics).status, 400, "{head:?}");
        }
    }

    #[test]
    fn head_end_finds_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn serialized_response() {
        let r = Response::text(503, "no subnet lease held");
        assert_eq!(
            String::from_utf8(r.to_bytes()).unwrap(),
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 20\r\nConnection: close\r\n\r\nno subnet lease held"
        );
    }
}
