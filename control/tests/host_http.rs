//! The health and metrics server over real TCP on 127.0.0.1.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_control::http::{Health, HttpServer, Limits, MetricsFn, PROMETHEUS_CONTENT_TYPE};

struct Served {
    addr: std::net::SocketAddr,
    health: Arc<Health>,
    scrapes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

async fn serve(limits: Limits) -> Served {
    let health = Arc::new(Health::new());
    let scrapes = Arc::new(AtomicUsize::new(0));
    let counter = scrapes.clone();
    let metrics: MetricsFn = Arc::new(move || {
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        format!("# TYPE weft_scrapes counter\nweft_scrapes {n}\n")
    });
    let server = HttpServer::bind("127.0.0.1:0".parse().unwrap(), health.clone(), metrics)
        .await
        .expect("bind 127.0.0.1:0")
        .with_limits(limits);
    let addr = server.local_addr().unwrap();
    let task = tokio::spawn(server.run());
    Served {
        addr,
        health,
        scrapes,
        task,
    }
}

/// Sends raw bytes, half-closes if asked, and returns everything the server sent back.
async fn exchange(addr: std::net::SocketAddr, request: &[u8], half_close: bool) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write request");
    if half_close {
        s.shutdown().await.expect("half-close");
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("server answered in time")
        .expect("read response");
    String::from_utf8_lossy(&out).into_owned()
}

fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

fn body(response: &str) -> &str {
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("")
}

#[tokio::test]
async fn healthz_follows_health_state() {
    let s = serve(Limits::default()).await;
    let get = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";

    let r = exchange(s.addr, get, false).await;
    assert_eq!(status(&r), 503, "{r}");
    assert!(body(&r).contains("no subnet lease held"), "{r}");

    s.health.set_lease_held(true);
    let r = exchange(s.addr, get, false).await;
    assert_eq!(status(&r), 503, "{r}");
    assert_eq!(body(&r), "packet engine not running");

    s.health.set_engine_running(true);
    let r = exchange(s.addr, get, false).await;
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(body(&r), "ok");
    assert!(r.contains("Content-Length: 2\r\n"), "{r}");
    assert!(r.contains("Connection: close\r\n"), "{r}");

    s.health.set_lease_held(false);
    assert_eq!(status(&exchange(s.addr, get, false).await), 503);
    s.task.abort();
}

#[tokio::test]
async fn metrics_come_from_the_callback() {
    let s = serve(Limits::default()).await;
    let r = exchange(s.addr, b"GET /metrics HTTP/1.1\r\n\r\n", false).await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(
        r.contains(&format!("Content-Type: {PROMETHEUS_CONTENT_TYPE}\r\n")),
        "{r}"
    );
    assert_eq!(body(&r), "# TYPE weft_scrapes counter\nweft_scrapes 1\n");
    let r = exchange(s.addr, b"GET /metrics HTTP/1.0\r\n\r\n", false).await;
    assert_eq!(body(&r), "# TYPE weft_scrapes counter\nweft_scrapes 2\n");
    assert_eq!(s.scrapes.load(Ordering::Relaxed), 2);
    s.task.abort();
}

#[tokio::test]
async fn other_paths_and_methods() {
    let s = serve(Limits::default()).await;
    let r = exchange(s.addr, b"GET /nope HTTP/1.1\r\n\r\n", false).await;
    assert_eq!(status(&r), 404, "{r}");
    let r = exchange(s.addr, b"DELETE /healthz HTTP/1.1\r\n\r\n", false).await;
    assert_eq!(status(&r), 405, "{r}");
    assert!(r.contains("Allow: GET, HEAD\r\n"), "{r}");
    let r = exchange(s.addr, b"HEAD /healthz HTTP/1.1\r\n\r\n", false).await;
    assert_eq!(status(&r), 503, "{r}");
    assert_eq!(body(&r), "", "HEAD has no body");
    s.task.abort();
}

#[tokio::test]
async fn garbage_never_breaks_the_server() {
    let s = serve(Limits {
        max_head: 1024,
        io_timeout: Duration::from_millis(300),
        max_connections: 8,
    })
    .await;
    s.health.set_lease_held(true);
    s.health.set_engine_running(true);

    let inputs: Vec<Vec<u8>> = vec![
        b"\x00\x01\x02\xff\xfe\r\n\r\n".to_vec(),
        b"GET\r\n\r\n".to_vec(),
        b"GET /healthz HTTP/1.1 trailing junk\r\n\r\n".to_vec(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(), // a TLS ClientHello start
        vec![b'A'; 100_000],
        [
            b"GET /healthz HTTP/1.1\r\nX: ".as_slice(),
            &[b'y'; 4000],
            b"\r\n\r\n",
        ]
        .concat(),
    ];
    for input in &inputs {
        let r = exchange(s.addr, input, true).await;
        let code = status(&r);
        assert!(
            (400..500).contains(&code),
            "input starting {:?} got {r:?}",
            &input[..input.len().min(16)]
        );
    }
    let r = exchange(s.addr, &vec![b'A'; 100_000], false).await;
    assert_eq!(status(&r), 431, "an endless head is cut off");

    // A client that connects and says nothing is timed out.
    let mut idle = TcpStream::connect(s.addr).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut out))
        .await
        .expect("idle connection closed by the server")
        .unwrap();
    assert_eq!(status(&String::from_utf8_lossy(&out)), 408);

    // A client that connects and leaves at once costs nothing.
    drop(TcpStream::connect(s.addr).await.unwrap());

    // A request split across many small writes still works.
    let mut slow = TcpStream::connect(s.addr).await.unwrap();
    for piece in [&b"GET /hea"[..], b"lthz HTTP/1", b".1\r\n", b"\r", b"\n"] {
        slow.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut out = Vec::new();
    slow.read_to_end(&mut out).await.unwrap();
    assert_eq!(status(&String::from_utf8_lossy(&out)), 200);

    // Still serving.
    let r = exchange(s.addr, b"GET /healthz HTTP/1.1\r\n\r\n", false).await;
    assert_eq!((status(&r), body(&r)), (200, "ok"));
    assert!(!s.task.is_finished());
    s.task.abort();
}

#[tokio::test]
async fn idle_connections_cannot_keep_a_probe_out() {
    let s = serve(Limits::default()).await;
    s.health.set_lease_held(true);
    s.health.set_engine_running(true);
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(s.addr).await.expect("connect"));
    }
    // Far less than the per-connection timeout: the probe got a slot at once.
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        exchange(s.addr, b"GET /healthz HTTP/1.1\r\n\r\n", false),
    )
    .await
    .expect("healthz answered while 100 clients idled");
    assert_eq!((status(&r), body(&r)), (200, "ok"));

    // The oldest idle clients were closed to make room; the newest still wait for a timeout.
    let mut closed = 0;
    for conn in &mut idle {
        let mut buf = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(20), conn.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert!(
        closed >= 100 + 1 - Limits::default().max_connections,
        "{closed} closed"
    );
    s.task.abort();
}
