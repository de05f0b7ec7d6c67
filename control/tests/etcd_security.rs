//! Reaching a secured etcd: TLS with client certificates (`--etcd-cafile`, `--etcd-certfile`,
//! `--etcd-keyfile`) and user name / password authentication (`--etcd-username`,
//! `--etcd-password`), each against a real etcd started by the test.

#[path = "support/etcd.rs"]
mod etcd;

use std::time::Duration;

use etcd::Etcd;
use weft_control::lease::{self, Backoff, Settings};
use weft_control::registry::{EtcdRegistry, EtcdSettings, Registry, TlsFiles};
use weft_control::secret::Secret;
use weft_engine::{RouteTable, Routes};

const CONFIG: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}"#;
const WAIT: Duration = Duration::from_secs(20);

fn settings(endpoint: String) -> EtcdSettings {
    EtcdSettings {
        request_timeout: Duration::from_secs(2),
        ..EtcdSettings::new(vec![endpoint])
    }
}

/// A whole membership over `reg` acquires a lease.
async fn acquires(reg: EtcdRegistry) {
    let retry = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    let config = tokio::time::timeout(WAIT, lease::wait_for_config(&reg, retry))
        .await
        .expect("config not read");
    let routes = Routes::new(RouteTable::empty(config.overlay().unwrap(), config.port()));
    let settings = Settings {
        retry,
        ..Settings::new("198.18.0.1".parse().unwrap())
    };
    let (mut handle, task) = lease::run_membership(reg, &config, settings, routes).unwrap();
    let lease = tokio::time::timeout(WAIT, handle.acquired())
        .await
        .expect("no lease")
        .expect("membership ended");
    assert!(config.fits(lease.subnet));
    task.abort();
}

/// Writes the network config into `etcd`; returns the client that wrote it.
async fn with_config(etcd: &Etcd) -> etcd_client::Client {
    let mut client = etcd.client().await;
    client
        .put("/coreos.com/network/config", CONFIG, None)
        .await
        .unwrap();
    client
}

/// An etcd that requires TLS client certificates, with the network config written.
async fn tls_etcd_with_config() -> (Etcd, etcd::TlsCerts) {
    let mut etcd = Etcd::prepare_tls();
    etcd.run().await;
    with_config(&etcd).await;
    let certs = etcd.certs().unwrap().clone();
    (etcd, certs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let (etcd, certs) = tls_etcd_with_config().await;

    let mut secured = settings(etcd.endpoint());
    secured.tls = Some(TlsFiles {
        ca: Some(certs.ca.clone()),
        cert: Some(certs.client_cert.clone()),
        key: Some(certs.client_key.clone()),
    });
    acquires(EtcdRegistry::new(&secured).unwrap()).await;

    // Without a client certificate etcd refuses the connection.
    let mut anonymous = secured.clone();
    anonymous.tls = Some(TlsFiles {
        ca: Some(certs.ca.clone()),
        ..TlsFiles::default()
    });
    let reg = EtcdRegistry::new(&anonymous).unwrap();
    assert!(reg.config().await.is_err());
    // Without the CA, etcd's certificate is not trusted.
    let mut untrusting = secured.clone();
    untrusting.tls = Some(TlsFiles {
        ca: None,
        ..secured.tls.clone().unwrap()
    });
    let reg = EtcdRegistry::new(&untrusting).unwrap();
    assert!(reg.config().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_name_and_password() {
    let etcd = Etcd::start().await;
    let mut client = with_config(&etcd).await;
    client.user_add("root", "root-secret", None).await.unwrap();
    client.user_grant_role("root", "root").await.unwrap();
    client.auth_enable().await.unwrap();

    let mut with_password = settings(etcd.endpoint());
    with_password.credentials = Some(("root".to_owned(), Secret::new("root-secret")));
    acquires(EtcdRegistry::new(&with_password).unwrap()).await;

    for credentials in [None, Some(("root".to_owned(), Secret::new("wrong")))] {
        let mut refused = settings(etcd.endpoint());
        refused.credentials = credentials.clone();
        let reg = EtcdRegistry::new(&refused).unwrap();
        assert!(reg.config().await.is_err(), "{credentials:?} accepted");
    }
}

#[test]
fn https_without_a_ca_file_trusts_the_system_roots() {
    let mut etcd = Etcd::prepare_tls();
    let certs = etcd.certs().unwrap().clone();
    // The system's roots, as rustls-native-certs finds them, are here the test CA alone
    // (SSL_CERT_FILE is honoured as OpenSSL and Go honour it). Set before any other thread
    // exists; nextest runs each test in a process of its own, so no other test sees it.
    std::env::set_var("SSL_CERT_FILE", &certs.ca);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        etcd.run().await;
        with_config(&etcd).await;
        let mut secured = settings(etcd.endpoint());
        assert!(secured.endpoints[0].starts_with("https://"));
        secured.tls = Some(TlsFiles {
            ca: None,
            cert: Some(certs.client_cert.clone()),
            key: Some(certs.client_key.clone()),
        });
        acquires(EtcdRegistry::new(&secured).unwrap()).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_files_are_ignored_for_http_endpoints() {
    let etcd = Etcd::start().await;
    with_config(&etcd).await;
    let mut plain = settings(etcd.endpoint());
    assert!(plain.endpoints[0].starts_with("http://"));
    plain.tls = Some(TlsFiles {
        ca: Some("/nonexistent/ca.pem".into()),
        cert: Some("/nonexistent/cert.pem".into()),
        key: Some("/nonexistent/key.pem".into()),
    });
    acquires(EtcdRegistry::new(&plain).unwrap()).await;
}
