//! A real, private etcd for integration tests.
//!
//! Each [`Etcd`] runs its own `etcd` process on 127.0.0.1 with free ports and a fresh data
//! directory, can be stopped and restarted on the same directory and ports, and is killed (by
//! its PID) and its directory removed when dropped, also when the test panics. A missing etcd
//! binary fails the test with the package to install.

#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// How long etcd may take to answer after it is started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One etcd member serving clients on 127.0.0.1.
pub struct Etcd {
    binary: PathBuf,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    tls: Option<TlsCerts>,
    child: Option<Child>,
}

/// A private CA and the certificates an etcd with client-certificate authentication needs.
#[derive(Clone, Debug)]
pub struct TlsCerts {
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    /// etcd's certificate, for IP 127.0.0.1.
    pub server_cert: PathBuf,
    /// etcd's private key.
    pub server_key: PathBuf,
    /// A client certificate signed by the CA.
    pub client_cert: PathBuf,
    /// The client's private key.
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("openssl not found ({e}): apt-get install openssl"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TlsCerts {
    /// Make a CA, a server certificate for 127.0.0.1 and a client certificate in `dir`.
    fn generate(dir: &Path) -> Self {
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=weft test CA"];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
        openssl(dir, &ca);
        for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
            let (key, csr, pem, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            fs::write(
                dir.join(&ext),
                format!(
                    "subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n\
                     keyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n"
                ),
            )
            .expect("cannot write an openssl extension file");
            let mut req = vec![
                "req",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                &key,
                "-out",
                &csr,
            ];
            req.extend(ec);
            openssl(dir, &req);
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "1",
                    "-extfile",
                    &ext,
                    "-out",
                    &pem,
                ],
            );
        }
        Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

fn find_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WEFT_TEST_ETCD") {
        return PathBuf::from(path);
    }
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("etcd"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("etcd not found: apt-get install etcd-server"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot find a free port on 127.0.0.1")
}

impl Etcd {
    /// Prepare an etcd (binary, ports, data directory) without starting it.
    pub fn prepare() -> Self {
        let binary = find_binary();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "weft-etcd-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("cannot create the etcd test directory");
        Self {
            binary,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            tls: None,
            child: None,
        }
    }

    /// Like [`Etcd::prepare`], serving clients over TLS only and requiring a client
    /// certificate signed by a private CA.
    pub fn prepare_tls() -> Self {
        let mut etcd = Self::prepare();
        etcd.tls = Some(TlsCerts::generate(&etcd.dir));
        etcd
    }

    /// The certificates, for an etcd made by [`Etcd::prepare_tls`].
    pub fn certs(&self) -> Option<&TlsCerts> {
        self.tls.as_ref()
    }

    /// Start a fresh etcd and wait until it serves requests.
    pub async fn start() -> Self {
        let mut etcd = Self::prepare();
        etcd.run().await;
        etcd
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn connect_options(&self) -> Option<etcd_client::ConnectOptions> {
        let certs = self.tls.as_ref()?;
        let read = |p: &Path| fs::read(p).expect("cannot read a test certificate");
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&certs.ca)))
            .identity(etcd_client::Identity::from_pem(
                read(&certs.client_cert),
                read(&certs.client_key),
            ));
        Some(etcd_client::ConnectOptions::new().with_tls(tls))
    }

    /// A client connected to this etcd.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], self.connect_options())
            .await
            .expect("cannot create an etcd client")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("cannot open the etcd log");
        let log_err = log.try_clone().expect("cannot clone the etcd log handle");
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(&self.binary);
        if let Some(certs) = &self.tls {
            command
                .arg(format!("--cert-file={}", certs.server_cert.display()))
                .arg(format!("--key-file={}", certs.server_key.display()))
                .arg(format!("--trusted-ca-file={}", certs.ca.display()))
                .arg("--client-cert-auth");
        }
        let child = command
            .arg("--name=weft-test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=weft-test={peer}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.binary.display()));
        self.child = Some(child);
    }

    /// Start (or start again) on this etcd's directory and ports and wait until it serves.
    pub async fn run(&mut self) {
        self.spawn();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "etcd exited during start-up ({status}); its log:\n{}",
                        self.log_tail()
                    );
                }
            }
            if self.answers().await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become ready within {READY_TIMEOUT:?}; its log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn answers(&self) -> bool {
        let attempt = async {
            let mut client =
                etcd_client::Client::connect([self.endpoint()], self.connect_options())
                    .await
                    .ok()?;
            client.get("/weft-test-ready", None).await.ok()
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), attempt).await,
            Ok(Some(_))
        )
    }

    /// Kill etcd (its data stays for [`Etcd::run`]).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the etcd process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
