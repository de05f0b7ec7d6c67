//! subnet.env: the file through which docker, CNI and scripts learn this host's subnet.
//!
//! The format is flanneld's, byte for byte:
//!
//! ```text
//! FLANNEL_NETWORK=10.1.0.0/16
//! FLANNEL_SUBNET=10.1.15.1/24
//! FLANNEL_MTU=1472
//! FLANNEL_IPMASQ=false
//! ```
//!
//! `FLANNEL_SUBNET` is the lease's first host address (network address + 1) with the subnet's
//! prefix length. The file is also read back at start: the subnet it names is the one this host
//! held before, which the lease logic prefers so that container addresses survive restarts.

use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

/// flanneld's default `--subnet-file`.
pub const DEFAULT_PATH: &str = "/run/flannel/subnet.env";

/// The contents of subnet.env.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The whole overlay Network (`FLANNEL_NETWORK`).
    pub network: Ipv4Net,
    /// This host's lease (its network address; `FLANNEL_SUBNET` is that + 1).
    pub subnet: Ipv4Net,
    /// The MTU containers should use (`FLANNEL_MTU`).
    pub mtu: u32,
    /// Whether weftd masquerades traffic leaving the overlay (`FLANNEL_IPMASQ`).
    pub ipmasq: bool,
}

/// Why subnet.env cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A line is not `KEY=VALUE`.
    #[error("line {line}: expected KEY=VALUE, got {text:?}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A variable is missing.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// A variable's value cannot be read.
    #[error("{name}: invalid value {value:?}")]
    Value {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
    },
}

impl SubnetEnv {
    /// The file's text, exactly as flanneld writes it for the udp backend.
    pub fn render(&self) -> String {
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            first_host(self.subnet),
            self.subnet.prefix_len(),
            self.mtu,
            self.ipmasq
        )
    }

    /// Read the four variables back from a file's text. Blank lines, `#` comments, an `export `
    /// prefix, quoted values and unknown variables (the IPv6 ones) are accepted.
    pub fn parse(text: &str) -> Result<Self, SubnetEnvError> {
        let vars = Vars::parse(text)?;
        let network = vars.cidr("FLANNEL_NETWORK")?.trunc();
        let subnet = vars.cidr("FLANNEL_SUBNET")?.trunc();
        let mtu_text = vars.require("FLANNEL_MTU")?;
        let mtu = mtu_text.parse().map_err(|_| SubnetEnvError::Value {
            name: "FLANNEL_MTU",
            value: mtu_text.to_owned(),
        })?;
        let masq_text = vars.require("FLANNEL_IPMASQ")?;
        let ipmasq = masq_text.parse().map_err(|_| SubnetEnvError::Value {
            name: "FLANNEL_IPMASQ",
            value: masq_text.to_owned(),
        })?;
        Ok(Self {
            network,
            subnet,
            mtu,
            ipmasq,
        })
    }

    /// Write the file so that readers see either the old or the new contents, never a part:
    /// a temporary file in the same directory, flushed to disk, renamed over `path`. Missing
    /// parent directories are created.
    pub fn write_atomic(&self, path: &Path) -> Result<(), SubnetEnvError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| SubnetEnvError::Io { path, source }
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().ok_or_else(|| SubnetEnvError::Io {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
        })?;
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(".tmp");
        let temp = dir.join(temp_name);
        let write = || -> io::Result<()> {
            let mut file = fs::File::create(&temp)?;
            file.write_all(self.render().as_bytes())?;
            file.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&temp);
            return Err(io_err(&temp)(e));
        }
        fs::rename(&temp, path).map_err(io_err(path))?;
        // Make the rename itself durable; a directory that cannot be opened or synced (some
        // file systems refuse) does not undo a write that already happened.
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The lease subnet named by the file at `path` (FLANNEL_SUBNET with host bits cleared):
    /// `None` when the file or the variable is absent, an error when the file cannot be read or
    /// the value is malformed. The caller logs an error and carries on without it.
    pub fn read(path: &Path) -> Result<Option<Ipv4Net>, SubnetEnvError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(SubnetEnvError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let vars = Vars::parse(&text)?;
        if vars.get("FLANNEL_SUBNET").is_none() {
            return Ok(None);
        }
        Ok(Some(vars.cidr("FLANNEL_SUBNET")?.trunc()))
    }
}

/// The first host address of `subnet`: what docker's bridge takes.
fn first_host(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1))
}

struct Vars<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Vars<'a> {
    fn parse(text: &'a str) -> Result<Self, SubnetEnvError> {
        let mut vars = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let Some((key, value)) = line.split_once('=') else {
                return Err(SubnetEnvError::Syntax {
                    line: i + 1,
                    text: line.to_owned(),
                });
            };
            let value = value.trim();
            let value = ['"', '\'']
                .iter()
                .find_map(|q| value.strip_prefix(*q)?.strip_suffix(*q))
                .unwrap_or(value);
            vars.push((key.trim(), value));
        }
        Ok(Self(vars))
    }

    /// The last assignment wins, as when the file is sourced by a shell.
    fn get(&self, name: &str) -> Option<&'a str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
    }

    fn require(&self, name: &'static str) -> Result<&'a str, SubnetEnvError> {
        self.get(name).ok_or(SubnetEnvError::Missing(name))
    }

    fn cidr(&self, name: &'static str) -> Result<Ipv4Net, SubnetEnvError> {
        let value = self.require(name)?;
        value.parse().map_err(|_| SubnetEnvError::Value {
            name,
            value: value.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> String {
        crate::subnet::fixture("subnet.env")
    }

    fn host1() -> SubnetEnv {
        SubnetEnv {
            network: "10.1.0.0/16".parse().unwrap(),
            subnet: "10.1.15.0/24".parse().unwrap(),
            mtu: 1472,
            ipmasq: false,
        }
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir().join(format!(
                "weft-subnet-env-{tag}-{}-{nanos}",
                std::process::id()
            ));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn render_is_byte_identical_to_flanneld() {
        assert_eq!(host1().render(), fixture());
    }

    #[test]
    fn parse_reads_flanneld_output() {
        assert_eq!(SubnetEnv::parse(&fixture()).unwrap(), host1());
        let sourced = "# written by hand\nexport FLANNEL_NETWORK=\"10.1.0.0/16\"\n\n\
                       FLANNEL_SUBNET='10.1.15.1/24'\nFLANNEL_IPV6_NETWORK=fc00::/48\n\
                       FLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";
        let env = SubnetEnv::parse(sourced).unwrap();
        assert_eq!(env.subnet, host1().subnet);
        assert!(env.ipmasq);
    }

    #[test]
    fn parse_refuses_malformed_files() {
        let cases = [
            ("FLANNEL_NETWORK=10.1.0.0/16\n", "FLANNEL_SUBNET is missing"),
            ("garbage\n", "line 1: expected KEY=VALUE, got \"garbage\""),
        ];
        for (text, message) in cases {
            assert_eq!(SubnetEnv::parse(text).unwrap_err().to_string(), message);
        }
        let bad_mtu = fixture().replace("1472", "big");
        assert_eq!(
            SubnetEnv::parse(&bad_mtu).unwrap_err().to_string(),
            "FLANNEL_MTU: invalid value \"big\""
        );
    }

    #[test]
    fn write_then_read_back() {
        let dir = TempDir::new("write");
        let path = dir.0.join("run/flannel/subnet.env");
        assert_eq!(SubnetEnv::read(&path).unwrap(), None, "absent file");
        host1().write_atomic(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), fixture());
        assert_eq!(
            SubnetEnv::read(&path).unwrap(),
            Some("10.1.15.0/24".parse().unwrap())
        );
        // Overwrite in place; no temporary file is left behind.
        let moved = SubnetEnv {
            subnet: "10.1.81.0/24".parse().unwrap(),
            ..host1()
        };
        moved.write_atomic(&path).unwrap();
        assert_eq!(
            SubnetEnv::read(&path).unwrap(),
            Some("10.1.81.0/24".parse().unwrap())
        );
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["subnet.env"]);
    }

    #[test]
    fn read_reports_malformed_files_and_tolerates_missing_subnet() {
        let dir = TempDir::new("read");
        let path = dir.0.join("subnet.env");
        fs::write(&path, "FLANNEL_SUBNET=10.1.15.300/24\n").unwrap();
        let err = SubnetEnv::read(&path).unwrap_err();
        assert!(err.to_string().contains("FLANNEL_SUBNET"), "{err}");
        fs::write(&path, "FLANNEL_IPV6_SUBNET=fc00:0:0:1::1/64\n").unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap(), None);
        fs::write(&path, "not a variable\n").unwrap();
        assert!(SubnetEnv::read(&path).is_err());
        // A directory where the file should be is an I/O error, not a crash.
        let as_dir = dir.0.join("dir.env");
        fs::create_dir(&as_dir).unwrap();
        assert!(matches!(
            SubnetEnv::read(&as_dir),
            Err(SubnetEnvError::Io { .. })
        ));
    }
}
