//! systemd readiness notification (`sd_notify`): `READY=1` once subnet.env is written,
//! `STATUS=…` lines, `STOPPING=1` on shutdown, sent as datagrams to `$NOTIFY_SOCKET`.
//!
//! The socket is a filesystem path or, with a leading `@`, a Linux abstract socket name.
//! Without `$NOTIFY_SOCKET` (not started by systemd with `Type=notify`) every call is a no-op.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is set but is not a usable socket address.
    #[error("invalid NOTIFY_SOCKET {0:?}")]
    BadAddress(String),
    /// Creating the socket or sending failed.
    #[error("sd_notify to {socket:?} failed: {source}")]
    Io {
        /// `$NOTIFY_SOCKET` as given.
        socket: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// Sends notifications to one systemd notify socket.
#[derive(Debug)]
pub struct Notifier {
    name: String,
    addr: SocketAddr,
    socket: UnixDatagram,
}

impl Notifier {
    /// A notifier for `$NOTIFY_SOCKET`, or `None` when it is unset or empty.
    pub fn from_env() -> Result<Option<Self>, NotifyError> {
        Notifier::from_var(std::env::var(NOTIFY_SOCKET_ENV).ok().as_deref())
    }

    /// A notifier for the given value of `$NOTIFY_SOCKET`; `None` when unset or empty.
    pub fn from_var(value: Option<&str>) -> Result<Option<Self>, NotifyError> {
        match value {
            Some(name) if !name.is_empty() => Notifier::new(name).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for a socket named as in `$NOTIFY_SOCKET`: a path, or `@name` for an
    /// abstract socket.
    pub fn new(name: &str) -> Result<Self, NotifyError> {
        let addr = if let Some(abstract_name) = name.strip_prefix('@') {
            SocketAddr::from_abstract_name(abstract_name.as_bytes())
        } else if name.starts_with('/') {
            SocketAddr::from_pathname(name)
        } else {
            return Err(NotifyError::BadAddress(name.to_string()));
        }
        .map_err(|_| NotifyError::BadAddress(name.to_string()))?;
        let socket = UnixDatagram::unbound().map_err(|source| NotifyError::Io {
            socket: name.to_string(),
            source,
        })?;
        Ok(Notifier {
            name: name.to_string(),
            addr,
            socket,
        })
    }

    /// Sends one notification: newline-separated `KEY=value` assignments.
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(|_| ())
            .map_err(|source| NotifyError::Io {
                socket: self.name.clone(),
                source,
            })
    }

    /// `READY=1`: start-up is complete.
    pub fn ready(&self) -> Result<(), NotifyError> {
        self.send("READY=1")
    }

    /// `STATUS=<text>`: a one-line status for `systemctl status`. Newlines are replaced
    /// so that the text cannot inject further assignments.
    pub fn status(&self, text: &str) -> Result<(), NotifyError> {
        self.send(&format!("STATUS={}", text.replace('\n', " ")))
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.send("STOPPING=1")
    }
}

/// Sends `state` to `$NOTIFY_SOCKET`; returns `Ok(false)` without doing anything when it is
/// unset, `Ok(true)` when the notification was sent.
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    match Notifier::from_env()? {
        Some(notifier) => notifier.send(state).map(|()| true),
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("notification received");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("weft-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();

        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        n.ready().unwrap();
        n.status("lease 10.1.15.0/24\nREADY=0").unwrap();
        n.stopping().unwrap();
        assert_eq!(recv(&server), "READY=1");
        assert_eq!(recv(&server), "STATUS=lease 10.1.15.0/24 READY=0");
        assert_eq!(recv(&server), "STOPPING=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("weft-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();

        Notifier::new(&format!("@{name}")).unwrap().ready().unwrap();
        assert_eq!(recv(&server), "READY=1");
    }

    #[test]
    fn unset_or_empty_variable_means_no_notifier() {
        assert!(Notifier::from_var(None).unwrap().is_none());
        assert!(Notifier::from_var(Some("")).unwrap().is_none());
        assert!(Notifier::from_var(Some("@x")).unwrap().is_some());
    }

    #[test]
    fn bad_addresses_and_missing_listeners_are_errors() {
        assert!(matches!(
            Notifier::new("relative/path"),
            Err(NotifyError::BadAddress(_))
        ));
        let n = Notifier::new("/nonexistent/weft/notify.sock").unwrap();
        assert!(matches!(n.ready(), Err(NotifyError::Io { .. })));
    }
}
