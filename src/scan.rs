//! `auto` rules: which ports the target side listens on, read from
//! /proc/net/{tcp,tcp6,udp,udp6} as the target's namespace sees them.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

use crate::rule::Proto;

/// A thread's own view of /proc/net: its network namespace's.
pub const SELF_NET: &str = "/proc/thread-self/net";

/// How often the listeners are read again.
pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The ports something listens on (TCP) or is bound to (UDP).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listening {
    /// TCP ports in LISTEN state.
    pub tcp: BTreeSet<u16>,
    /// UDP ports bound and not connected.
    pub udp: BTreeSet<u16>,
}

impl Listening {
    /// Whether `port` of `proto` has a listener.
    pub fn has(&self, proto: Proto, port: u16) -> bool {
        match proto {
            Proto::Tcp => self.tcp.contains(&port),
            Proto::Udp => self.udp.contains(&port),
        }
    }

    /// Reads the four tables under `net` (e.g. /proc/thread-self/net): a
    /// thread's own view, which is its network namespace's.
    pub fn read(net: &Path) -> io::Result<Listening> {
        let mut out = Listening::default();
        for (file, proto) in [
            ("tcp", Proto::Tcp),
            ("tcp6", Proto::Tcp),
            ("udp", Proto::Udp),
            ("udp6", Proto::Udp),
        ] {
            let text = match std::fs::read_to_string(net.join(file)) {
                Ok(t) => t,
                // No IPv6 on this host.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let set = match proto {
                Proto::Tcp => &mut out.tcp,
                Proto::Udp => &mut out.udp,
            };
            set.extend(parse(&text, proto));
        }
        Ok(out)
    }
}

/// The listening ports of one /proc/net table: `local_address` is
/// `HEXADDR:HEXPORT`, `st` is 0A for a TCP listener and 07 for an unconnected
/// UDP socket.
fn parse(text: &str, proto: Proto) -> impl Iterator<Item = u16> + '_ {
    let state = match proto {
        Proto::Tcp => "0A",
        Proto::Udp => "07",
    };
    text.lines().skip(1).filter_map(move |line| {
        let mut f = line.split_whitespace();
        let local = f.nth(1)?;
        let st = f.nth(1)?;
        if st != state {
            return None;
        }
        let (_, port) = local.rsplit_once(':')?;
        u16::from_str_radix(port, 16).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listeners_only() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1
   1: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 1235 1
";
        assert_eq!(parse(tcp, Proto::Tcp).collect::<Vec<_>>(), [8080]);
        let udp = "  sl  local_address rem_address   st
 10: 00000000:0035 00000000:0000 07 00000000:00000000
 11: 0100007F:0036 0100007F:0035 01 00000000:00000000
";
        assert_eq!(parse(udp, Proto::Udp).collect::<Vec<_>>(), [53]);
    }

    #[test]
    fn reads_this_namespace() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Listening::read(Path::new("/proc/thread-self/net")).unwrap();
        assert!(seen.has(Proto::Tcp, port));
    }
}
