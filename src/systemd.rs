//! Running under systemd without libsystemd: readiness notification (the
//! `sd_notify` protocol, for `Type=notify`) and socket activation (the
//! `sd_listen_fds` protocol) of the control socket. Both are small enough to
//! speak directly, and neither is needed anywhere else.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustix::fs::FileType;
use rustix::net::{AddressFamily, SocketType, sockopt};

/// The first descriptor that systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The name (`FileDescriptorName=` in the .socket unit) of the descriptor
/// taken as the control socket when systemd names several.
pub const CONTROL_NAME: &str = "control";

/// How long a notification may wait for room in systemd's queue: a full
/// queue must not hold start-up or shutdown for long.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Why systemd could not be notified.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// NOTIFY_SOCKET names no address this daemon can send to.
    #[error(
        "NOTIFY_SOCKET={0:?}: not an absolute path or an abstract @name; \
         systemd will not hear that pestod is ready"
    )]
    Address(OsString),
    /// The notification socket could not be made or written to.
    #[error("cannot notify systemd at {addr}: {error}")]
    Io {
        /// NOTIFY_SOCKET, as given.
        addr: String,
        /// Why.
        error: io::Error,
    },
}

/// Sends state changes to the service manager at NOTIFY_SOCKET. Cheap to
/// clone: the clones share one socket.
#[derive(Debug, Clone)]
pub struct Notifier {
    socket: Arc<UnixDatagram>,
    addr: SocketAddr,
    shown: String,
}

impl Notifier {
    /// The notifier that NOTIFY_SOCKET asks for; `None` when it is unset or
    /// empty (not started by systemd, or not as `Type=notify`).
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(addr) if !addr.is_empty() => Notifier::new(&addr).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for `address`: an absolute path, or `@name` for an
    /// abstract socket.
    pub fn new(address: &OsStr) -> Result<Notifier, NotifyError> {
        let shown = address.to_string_lossy().into_owned();
        let io_err = |error| NotifyError::Io {
            addr: shown.clone(),
            error,
        };
        let bytes = address.as_bytes();
        let addr = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(address).map_err(io_err)?,
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]).map_err(io_err)?,
            // Such as systemd's vsock: addresses, for a service in a VM.
            _ => return Err(NotifyError::Address(address.to_owned())),
        };
        let socket = UnixDatagram::unbound().map_err(io_err)?;
        socket
            .set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(io_err)?;
        Ok(Notifier {
            socket: Arc::new(socket),
            addr,
            shown,
        })
    }

    /// Sends `state`: newline-separated assignments such as `READY=1`.
    /// Blocks at most a couple of seconds when systemd's queue is full.
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(drop)
            .map_err(|error| NotifyError::Io {
                addr: self.shown.clone(),
                error,
            })
    }

    /// Start-up is complete (`READY=1`), with a line for `systemctl status`.
    pub fn ready(&self, status: &str) -> Result<(), NotifyError> {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// Shutdown has begun (`STOPPING=1`), with a line for `systemctl status`.
    pub fn stopping(&self, status: &str) -> Result<(), NotifyError> {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)))
    }
}

/// A STATUS value ends at the first newline: keep it to one line.
fn one_line(status: &str) -> String {
    status.replace('\n', " ")
}

/// Why the socket that systemd passed cannot be the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// LISTEN_PID is not a process id.
    #[error("LISTEN_PID={0:?}: not a process id")]
    BadPid(String),
    /// LISTEN_FDS is not a count of descriptors.
    #[error("LISTEN_FDS={0:?}: not a count of descriptors")]
    BadCount(String),
    /// LISTEN_FDNAMES does not name every descriptor.
    #[error("LISTEN_FDNAMES has {names} name(s) for LISTEN_FDS={fds}")]
    NameCount {
        /// How many names.
        names: usize,
        /// How many descriptors.
        fds: u32,
    },
    /// Several descriptors, and none is named for the control socket.
    #[error(
        "systemd passed {fds} sockets ({names}) and none is named '{CONTROL_NAME}': \
         set FileDescriptorName={CONTROL_NAME} in the .socket unit"
    )]
    NoControl {
        /// How many descriptors.
        fds: u32,
        /// LISTEN_FDNAMES.
        names: String,
    },
    /// The descriptor is not a listening UNIX stream socket.
    #[error(
        "descriptor {fd} from systemd (LISTEN_FDS) {problem}: the control socket must be a \
         listening UNIX stream socket (ListenStream=/path in the .socket unit)"
    )]
    NotControlSocket {
        /// The descriptor.
        fd: RawFd,
        /// What it is instead.
        problem: String,
    },
    /// The descriptor could not be set up.
    #[error("descriptor {fd} from systemd (LISTEN_FDS): {error}")]
    Io {
        /// The descriptor.
        fd: RawFd,
        /// Why.
        error: io::Error,
    },
    /// The passed sockets were taken already.
    #[error("the sockets from systemd were taken already")]
    Taken,
}

/// Set once the passed descriptors are taken: a descriptor must have one
/// owner, so the environment is never acted on twice.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The control socket that systemd passed (socket activation), if
/// LISTEN_PID names this process and LISTEN_FDS counts one socket at least:
/// the one named [`CONTROL_NAME`] in LISTEN_FDNAMES, else the first. It is
/// checked to be a listening UNIX stream socket, and made close-on-exec.
///
/// Call it once, early, before anything else opens a file: if systemd did
/// not in fact pass descriptor 3, whatever the process opened there first is
/// refused by the checks, but should not be there to be looked at.
pub fn control_listener() -> Result<Option<UnixListener>, ActivationError> {
    let var = |name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    let (pid, fds, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
    let Some(fd) = control_fd(
        pid.as_deref(),
        fds.as_deref(),
        names.as_deref(),
        std::process::id(),
    )?
    else {
        return Ok(None);
    };
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(ActivationError::Taken);
    }
    take_listener(fd).map(Some)
}

/// Which passed descriptor is the control socket, from LISTEN_PID,
/// LISTEN_FDS and LISTEN_FDNAMES as `sd_listen_fds` reads them; `None` when
/// nothing was passed to process `me`.
fn control_fd(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    me: u32,
) -> Result<Option<RawFd>, ActivationError> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    let pid: u32 = pid
        .parse()
        .map_err(|_| ActivationError::BadPid(pid.to_owned()))?;
    // Left in the environment by a parent for itself: not ours to take.
    if pid != me {
        return Ok(None);
    }
    let count: u32 = fds
        .parse()
        .ok()
        .filter(|n| i64::from(*n) + i64::from(LISTEN_FDS_START) <= i64::from(RawFd::MAX))
        .ok_or_else(|| ActivationError::BadCount(fds.to_owned()))?;
    if count == 0 {
        return Ok(None);
    }
    let index = match names {
        Some(list) => {
            let names: Vec<&str> = list.split(':').collect();
            if names.len() != count as usize {
                return Err(ActivationError::NameCount {
                    names: names.len(),
                    fds: count,
                });
            }
            match names.iter().position(|n| *n == CONTROL_NAME) {
                Some(i) => i,
                // systemd names a lone socket after its unit by default.
                None if count == 1 => 0,
                None => {
                    return Err(ActivationError::NoControl {
                        fds: count,
                        names: list.to_owned(),
                    });
                }
            }
        }
        None => 0,
    };
    // Fits: index < count, and count + 3 fits in a RawFd.
    Ok(Some(LISTEN_FDS_START + index as RawFd))
}

/// Takes ownership of descriptor `fd`, passed by systemd, as a listener.
#[allow(unsafe_code)]
fn take_listener(fd: RawFd) -> Result<UnixListener, ActivationError> {
    // SAFETY: only borrowed, for fstat and getsockopt, which read it. Per the
    // socket activation protocol systemd passes descriptors 3 to
    // 3 + LISTEN_FDS - 1 open to this process (LISTEN_PID), and `fd` is one
    // of them; nothing in this process owns or closes them (std opens its
    // own files close-on-exec elsewhere, and [`control_listener`] is called
    // before anything else). Were it not open after all, the calls fail with
    // EBADF and nothing is taken.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    check_listener(borrowed)
        .map_err(|problem| ActivationError::NotControlSocket { fd, problem })?;
    // SAFETY: `fd` is open and a listening AF_UNIX stream socket (checked
    // just above), systemd handed it to this process to own, and it is
    // taken once: `TAKEN` makes a second [`control_listener`] an error, so
    // no other `OwnedFd` for it ever exists.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // As sd_listen_fds does: a program that pestod ever ran must not
    // inherit the control socket.
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC).map_err(|e| {
        ActivationError::Io {
            fd,
            error: e.into(),
        }
    })?;
    Ok(UnixListener::from(owned))
}

/// Whether `fd` is a listening AF_UNIX SOCK_STREAM socket; if not, what it
/// is instead, for the user.
fn check_listener(fd: BorrowedFd<'_>) -> Result<(), String> {
    let stat = rustix::fs::fstat(fd).map_err(|e| match e {
        rustix::io::Errno::BADF => "is not open".to_owned(),
        e => format!("cannot be examined: {e}"),
    })?;
    let kind = match FileType::from_raw_mode(stat.st_mode) {
        FileType::Socket => None,
        FileType::RegularFile => Some("a regular file"),
        FileType::Directory => Some("a directory"),
        FileType::Fifo => Some("a pipe or FIFO"),
        FileType::CharacterDevice => Some("a character device"),
        FileType::BlockDevice => Some("a block device"),
        _ => Some("not a socket"),
    };
    if let Some(kind) = kind {
        return Err(format!("is {kind}"));
    }
    let fail = |what: &str, e: rustix::io::Errno| format!("cannot be examined ({what}): {e}");
    let domain = sockopt::socket_domain(fd).map_err(|e| fail("SO_DOMAIN", e))?;
    if domain != AddressFamily::UNIX {
        let name = match domain {
            AddressFamily::INET => "an AF_INET socket".to_owned(),
            AddressFamily::INET6 => "an AF_INET6 socket".to_owned(),
            AddressFamily::NETLINK => "an AF_NETLINK socket".to_owned(),
            other => format!("a socket of family {}", other.as_raw()),
        };
        return Err(format!("is {name}, not AF_UNIX"));
    }
    let kind = sockopt::socket_type(fd).map_err(|e| fail("SO_TYPE", e))?;
    if kind != SocketType::STREAM {
        let name = match kind {
            SocketType::DGRAM => "SOCK_DGRAM",
            SocketType::SEQPACKET => "SOCK_SEQPACKET",
            _ => "not SOCK_STREAM",
        };
        return Err(format!("is a UNIX socket of type {name}, not SOCK_STREAM"));
    }
    if !sockopt::socket_acceptconn(fd).map_err(|e| fail("SO_ACCEPTCONN", e))? {
        return Err("is a UNIX stream socket that is not listening".to_owned());
    }
    Ok(())
}

/// Where a listener listens, for logs: its path, `@name` when abstract.
pub fn listener_name(listener: &UnixListener) -> Option<String> {
    let addr = listener.local_addr().ok()?;
    if let Some(path) = addr.as_pathname() {
        return Some(path.display().to_string());
    }
    addr.as_abstract_name()
        .map(|n| format!("@{}", String::from_utf8_lossy(n)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    const ME: u32 = 4242;

    fn examine(fd: &impl AsFd) -> Result<(), String> {
        check_listener(fd.as_fd())
    }

    fn pick(pid: &str, fds: &str, names: Option<&str>) -> Result<Option<RawFd>, ActivationError> {
        control_fd(Some(pid), Some(fds), names, ME)
    }

    #[test]
    fn the_control_descriptor_follows_sd_listen_fds() {
        assert_eq!(control_fd(None, Some("1"), None, ME).unwrap(), None);
        assert_eq!(control_fd(Some("4242"), None, None, ME).unwrap(), None);
        // Another process's sockets, or none at all.
        assert_eq!(pick("4243", "1", None).unwrap(), None);
        assert_eq!(pick("4242", "0", None).unwrap(), None);
        assert_eq!(pick("4242", "1", None).unwrap(), Some(3));
        assert_eq!(pick("4242", "2", None).unwrap(), Some(3));
        assert_eq!(pick("4242", "1", Some("pestod.socket")).unwrap(), Some(3));
        assert_eq!(pick("4242", "2", Some("v2:control")).unwrap(), Some(4));
        assert_eq!(pick("4242", "3", Some("a:b:control")).unwrap(), Some(5));
    }

    #[test]
    fn a_garbled_environment_is_an_error() {
        assert!(matches!(
            pick("x", "1", None),
            Err(ActivationError::BadPid(_))
        ));
        for bad in ["-1", "one", "", "2147483645"] {
            assert!(
                matches!(pick("4242", bad, None), Err(ActivationError::BadCount(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            pick("4242", "2", Some("control")),
            Err(ActivationError::NameCount { names: 1, fds: 2 })
        ));
        let e = pick("4242", "2", Some("a:b")).unwrap_err();
        assert!(e.to_string().contains("FileDescriptorName=control"), "{e}");
    }

    #[test]
    fn only_a_listening_unix_stream_socket_will_do() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("s")).unwrap();
        assert_eq!(examine(&listener), Ok(()));
        let (stream, _) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(examine(&stream).unwrap_err().contains("not listening"));
        let dgram = UnixDatagram::unbound().unwrap();
        assert!(examine(&dgram).unwrap_err().contains("SOCK_DGRAM"));
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(examine(&tcp).unwrap_err().contains("AF_INET"));
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        assert_eq!(examine(&file).unwrap_err(), "is a regular file");
    }

    #[test]
    fn notifications_reach_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let abstract_name = format!("pesto-test-notify-{}", std::process::id());
        let by_path = UnixDatagram::bind(&path).unwrap();
        let by_name =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&abstract_name).unwrap())
                .unwrap();
        let at_name = format!("@{abstract_name}");
        for (addr, socket) in [
            (path.as_os_str(), &by_path),
            (OsStr::new(&at_name), &by_name),
        ] {
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let n = Notifier::new(addr).unwrap();
            n.ready("up\nand running").unwrap();
            let mut buf = [0u8; 256];
            let len = socket.recv(&mut buf).unwrap();
            assert_eq!(&buf[..len], b"READY=1\nSTATUS=up and running");
            n.stopping("bye").unwrap();
            let len = socket.recv(&mut buf).unwrap();
            assert_eq!(&buf[..len], b"STOPPING=1\nSTATUS=bye");
        }
    }

    #[test]
    fn other_notify_addresses_are_refused() {
        for bad in ["vsock:2:1234", "relative/path"] {
            assert!(matches!(
                Notifier::new(OsStr::new(bad)),
                Err(NotifyError::Address(_))
            ));
        }
    }
}
