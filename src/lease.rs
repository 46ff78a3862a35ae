//! Leases: an owner's rules that go by themselves, when a process exits or
//! when nobody renewed them in time, so that a crashed tenant does not
//! leave its ports forwarded.
//!
//! The kinds and their wire form are here; the daemon's side (watching,
//! expiring as a transaction) is in [`crate::control::state`].

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use tokio::io::unix::AsyncFd;

/// How an owner's rules are tied to something that ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// Until the process with this pid exits.
    Pid(u32),
    /// Until this many seconds pass without a transaction of the owner.
    Ttl(u32),
}

/// Wire codes of [`Lease`] in UPDATE_SCOPED (0: no new lease).
pub mod kind {
    /// No new lease: the owner keeps the one it has (a TTL is renewed).
    pub const NONE: u8 = 0;
    /// [`super::Lease::Pid`].
    pub const PID: u8 = 1;
    /// [`super::Lease::Ttl`].
    pub const TTL: u8 = 2;
}

/// Longest TTL, in seconds: a day.
pub const MAX_TTL: u32 = 86_400;

impl Lease {
    /// The wire form: kind and value.
    pub fn to_wire(lease: Option<Lease>) -> (u8, u32) {
        match lease {
            None => (kind::NONE, 0),
            Some(Lease::Pid(p)) => (kind::PID, p),
            Some(Lease::Ttl(s)) => (kind::TTL, s),
        }
    }

    /// From the wire form; `Err` names what is wrong.
    pub fn from_wire(kind: u8, value: u32) -> Result<Option<Lease>, String> {
        match kind {
            kind::NONE if value == 0 => Ok(None),
            kind::NONE => Err(format!("no lease with a value of {value}")),
            kind::PID if value > 0 && value <= i32::MAX as u32 => Ok(Some(Lease::Pid(value))),
            kind::PID => Err(format!("pid {value} cannot be a process")),
            kind::TTL if value > 0 && value <= MAX_TTL => Ok(Some(Lease::Ttl(value))),
            kind::TTL => Err(format!("lease of {value} s: give 1 to {MAX_TTL}")),
            k => Err(format!("unknown lease kind {k}")),
        }
    }
}

impl std::fmt::Display for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lease::Pid(p) => write!(f, "pid {p}"),
            Lease::Ttl(s) => write!(f, "ttl {s} s"),
        }
    }
}

/// The start time of process `pid` (field 22 of /proc/PID/stat, in clock
/// ticks since boot): with the pid, it names one process even after the pid
/// is reused. `None` if there is no such process.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from
    // the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A pidfd for `pid`, readable once the process exits.
pub fn pidfd(pid: u32) -> io::Result<AsyncFd<OwnedFd>> {
    let raw = i32::try_from(pid).map_err(|_| io::Error::from(rustix::io::Errno::SRCH))?;
    let pid = rustix::process::Pid::from_raw(raw).ok_or(rustix::io::Errno::SRCH)?;
    let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK)?;
    // Deprecated because a borrowed descriptor could be closed while the
    // reactor still watches it; here the AsyncFd owns it and closes it only
    // after deregistering, which is the condition `register` asks for.
    #[allow(deprecated)]
    AsyncFd::new(fd)
}

/// Waits until the process behind `fd` exits.
pub async fn exited(fd: &AsyncFd<OwnedFd>) {
    // A pidfd stays readable once the process is gone; an error means the
    // same for us: nothing left to wait for.
    let _ = fd.readable().await;
}

/// How long a TTL lease lasts.
pub fn ttl(secs: u32) -> Duration {
    Duration::from_secs(u64::from(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_round_trips_and_refuses_nonsense() {
        for l in [None, Some(Lease::Pid(42)), Some(Lease::Ttl(30))] {
            let (k, v) = Lease::to_wire(l);
            assert_eq!(Lease::from_wire(k, v), Ok(l));
        }
        assert!(Lease::from_wire(kind::PID, 0).is_err());
        assert!(Lease::from_wire(kind::TTL, 0).is_err());
        assert!(Lease::from_wire(kind::TTL, MAX_TTL + 1).is_err());
        assert!(Lease::from_wire(9, 1).is_err());
    }

    #[test]
    fn this_process_has_a_start_time() {
        assert!(start_time(std::process::id()).is_some());
        assert!(start_time(u32::MAX).is_none());
    }

    #[tokio::test]
    async fn a_pidfd_tells_when_a_child_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.1")
            .spawn()
            .unwrap();
        let fd = pidfd(child.id()).unwrap();
        exited(&fd).await;
        child.wait().unwrap();
    }
}
