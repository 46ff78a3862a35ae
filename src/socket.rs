//! Listening sockets: what identifies one, and how one is made.
//!
//! All socket options live here, so that the rest of the code never cares how
//! a socket was set up: `SO_REUSEADDR` for TCP listeners, `IPV6_V6ONLY` off
//! for dual-stack rules and on for every other IPv6 rule, `SO_BINDTODEVICE`
//! for `%IFACE`, non-blocking and close-on-exec from the start.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::rule::{IfName, PifId, Proto, Rule};

/// Listen backlog; the kernel caps it at `net.core.somaxconn`.
const BACKLOG: i32 = 4096;

/// Receive buffer asked for UDP sockets.
pub const UDP_BUFFER: usize = 4 << 20;

/// What makes two listening sockets interchangeable: a socket is reused for
/// another rule only if every field matches, so a socket bound to a device or
/// to one family is never handed to a rule that wants something else.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketKey {
    /// The pif whose namespace the socket lives in.
    pub pif: PifId,
    /// Protocol.
    pub proto: Proto,
    /// Bound address (`::` for a dual-stack socket).
    pub addr: IpAddr,
    /// Whether an IPv6 socket also accepts IPv4 (`IPV6_V6ONLY` off).
    pub dual_stack: bool,
    /// Device the socket is bound to.
    pub ifname: Option<IfName>,
    /// Bound port.
    pub port: u16,
}

impl SocketKey {
    /// The key of `rule`'s socket for `port`.
    pub fn new(pif: PifId, rule: &Rule, port: u16) -> SocketKey {
        SocketKey {
            pif,
            proto: rule.proto,
            addr: rule.addr,
            dual_stack: rule.is_dual_stack(),
            ifname: rule.ifname.clone(),
            port,
        }
    }

    /// The address to bind.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }
}

impl fmt::Display for SocketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.proto)?;
        match (self.dual_stack, self.addr) {
            (true, _) => f.write_str("[*]")?,
            (false, IpAddr::V4(a)) => write!(f, "{a}")?,
            (false, IpAddr::V6(a)) => write!(f, "[{a}]")?,
        }
        if let Some(ifname) = &self.ifname {
            write!(f, "%{ifname}")?;
        }
        write!(f, ":{}", self.port)
    }
}

/// A bound socket, ready to be handed to tokio.
#[derive(Debug)]
pub enum Bound {
    /// A listening TCP socket.
    Tcp(std::net::TcpListener),
    /// A bound UDP socket.
    Udp(std::net::UdpSocket),
}

/// Creates, configures and binds the socket for `key` (and listens, for TCP).
pub fn bind(key: &SocketKey) -> io::Result<Bound> {
    let domain = match key.addr {
        IpAddr::V4(_) => Domain::IPV4,
        IpAddr::V6(_) => Domain::IPV6,
    };
    let (ty, proto) = match key.proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(domain, ty.nonblocking().cloexec(), Some(proto))?;
    match key.proto {
        // Rebinding a port whose old connections sit in TIME_WAIT must work.
        Proto::Tcp => socket.set_reuse_address(true)?,
        // Room for bursts while the forwarder is not scheduled; the kernel
        // caps it at net.core.rmem_max, and memory is used only when queued.
        Proto::Udp => {
            let _ = socket.set_recv_buffer_size(UDP_BUFFER);
        }
    }
    if key.addr.is_ipv6() {
        socket.set_only_v6(!key.dual_stack)?;
    }
    if key.proto == Proto::Udp && key.addr.is_unspecified() {
        // Before bind(2): a datagram queued without its local address
        // would be answered from the wrong one.
        report_local_address(&socket, key);
    }
    if let Some(ifname) = &key.ifname {
        socket.bind_device(Some(ifname.as_str().as_bytes()))?;
    }
    socket.bind(&SockAddr::from(key.socket_addr()))?;
    Ok(match key.proto {
        Proto::Tcp => {
            socket.listen(BACKLOG)?;
            Bound::Tcp(socket.into())
        }
        Proto::Udp => Bound::Udp(socket.into()),
    })
}

/// Asks a wildcard-bound UDP socket to report each datagram's local
/// address, so that replies go out from the address the peer sent to (a
/// host with several addresses would otherwise answer from its primary one,
/// and a connected peer would drop the answer). Best effort: without it
/// the kernel picks the source, as for any socket.
fn report_local_address(socket: &Socket, key: &SocketKey) {
    use nix::sys::socket::{setsockopt, sockopt};
    match key.addr {
        IpAddr::V4(_) => {
            let _ = setsockopt(socket, sockopt::Ipv4PacketInfo, &true);
        }
        IpAddr::V6(_) => {
            // A dual-stack socket: IPv4 datagrams also report ipi_spec_dst,
            // the address to answer a subnet broadcast from.
            if key.dual_stack {
                let _ = setsockopt(socket, sockopt::Ipv4PacketInfo, &true);
            }
            let _ = setsockopt(socket, sockopt::Ipv6RecvPacketInfo, &true);
        }
    }
}

/// An unconnected, non-blocking TCP socket of `target`'s family, to connect
/// to it (made here so that it can be made inside a namespace).
pub fn tcp_for(target: SocketAddr) -> io::Result<std::net::TcpStream> {
    let s = Socket::new(
        Domain::for_address(target),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    Ok(s.into())
}

/// A non-blocking UDP socket of `target`'s family, connected to it.
pub fn udp_connected(target: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(
        Domain::for_address(target),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    let _ = s.set_recv_buffer_size(UDP_BUFFER);
    s.connect(&SockAddr::from(target))?;
    Ok(s.into())
}

/// Whether this host can make IPv6 sockets at all.
pub fn ipv6_available() -> bool {
    Socket::new(Domain::IPV6, Type::DGRAM.cloexec(), None).is_ok()
}

/// Whether `addr` is an address of this host (in the caller's namespace):
/// only a local address can be bound.
pub fn is_local(addr: IpAddr) -> bool {
    addr.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(addr, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::Proto;

    #[test]
    fn key_display_names_family_and_device() {
        let mut rule = Rule::dual_stack(Proto::Tcp, 80, 80, 8080);
        let key = SocketKey::new(PifId::HOST, &rule, 80);
        assert_eq!(key.to_string(), "TCP [*]:80");
        rule = Rule::new(Proto::Udp, "::1".parse().unwrap(), 53, 53, 53);
        rule.ifname = Some(IfName::new("lo").unwrap());
        assert_eq!(
            SocketKey::new(PifId::HOST, &rule, 53).to_string(),
            "UDP [::1]%lo:53"
        );
    }

    #[test]
    fn dual_stack_and_v6_only_are_different_keys() {
        let dual = Rule::dual_stack(Proto::Tcp, 80, 80, 80);
        let v6 = Rule::new(Proto::Tcp, "::".parse().unwrap(), 80, 80, 80);
        assert_ne!(
            SocketKey::new(PifId::HOST, &dual, 80),
            SocketKey::new(PifId::HOST, &v6, 80)
        );
    }

    #[test]
    fn binds_ephemeral_ports_on_loopback() {
        let rule = Rule::new(Proto::Tcp, "127.0.0.1".parse().unwrap(), 0, 0, 0);
        let key = SocketKey::new(PifId::HOST, &rule, 0);
        let Bound::Tcp(l) = bind(&key).unwrap() else {
            panic!("not TCP")
        };
        assert!(l.local_addr().unwrap().port() != 0);
        assert!(is_local("127.0.0.1".parse().unwrap()));
        assert!(!is_local("192.0.2.1".parse().unwrap()));
    }
}
