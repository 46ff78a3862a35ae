//! The rule model: what one forwarding rule says, and the pifs that own tables.
//!
//! Everything here is plain data. The wire layout lives in [`crate::codec`],
//! validation in [`crate::table`], the option syntax in [`crate::spec`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Transport protocol of a rule, with its IP protocol number as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP, protocol number 6.
    Tcp,
    /// UDP, protocol number 17.
    Udp,
}

impl Proto {
    /// The IP protocol number (`IPPROTO_TCP`, `IPPROTO_UDP`).
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }

    /// The protocol for an IP protocol number, if pesto forwards it.
    pub const fn from_number(n: u8) -> Option<Proto> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            _ => None,
        }
    }

    /// Upper-case name, as upstream prints it.
    pub const fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Rule flags, one byte on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u8);

impl Flags {
    /// Listen on every IPv4 and IPv6 address with one dual-stack socket.
    pub const DUAL_STACK_ANY: Flags = Flags(1);
    /// Best effort: failing to bind some ports is not an error.
    pub const WEAK: Flags = Flags(2);
    /// Forward a port only while the target side listens on it.
    pub const SCAN: Flags = Flags(4);
    /// Every flag this version knows.
    pub const ALL: Flags = Flags(7);

    /// No flags.
    pub const fn empty() -> Flags {
        Flags(0)
    }
    /// Flags from their wire byte, unknown bits included (validation rejects those).
    pub const fn from_bits_retain(bits: u8) -> Flags {
        Flags(bits)
    }
    /// The wire byte.
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    /// Bits that this version does not know.
    pub const fn unknown(self) -> u8 {
        self.0 & !Self::ALL.0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Flags {
    fn bitor_assign(&mut self, rhs: Flags) {
        self.0 |= rhs.0;
    }
}

/// Size of an interface name field on the wire, NUL included (Linux `IFNAMSIZ`).
pub const IFNAMSIZ: usize = 16;

/// A network interface name: 1 to 15 bytes, as Linux accepts them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfName(String);

/// Why a string is not a usable interface name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IfNameError {
    /// Empty name.
    #[error("interface name is empty")]
    Empty,
    /// Longer than the kernel allows.
    #[error("interface name '{0}' is too long (at most {max} bytes)", max = IFNAMSIZ - 1)]
    TooLong(String),
    /// A byte the kernel refuses in a device name.
    #[error("interface name '{0}' contains '/', ':', whitespace or a NUL byte")]
    BadChar(String),
}

impl IfName {
    /// Checks a name the way the kernel's `dev_valid_name()` does.
    pub fn new(name: &str) -> Result<IfName, IfNameError> {
        if name.is_empty() {
            return Err(IfNameError::Empty);
        }
        if name.len() >= IFNAMSIZ {
            return Err(IfNameError::TooLong(name.to_owned()));
        }
        if name == "."
            || name == ".."
            || name
                .bytes()
                .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
        {
            return Err(IfNameError::BadChar(name.to_owned()));
        }
        Ok(IfName(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One forwarding rule: a range of ports of one protocol, from a listening
/// address (and optionally an interface) to a target.
///
/// Port `n` of `first..=last` goes to port `to + (n - first)` of the target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Listening address. With [`Flags::DUAL_STACK_ANY`] this is `::` and the
    /// rule listens on every IPv4 and IPv6 address.
    pub addr: IpAddr,
    /// Target address; `None` means the forwarder's default target.
    pub target: Option<IpAddr>,
    /// Interface to bind the listening sockets to (`SO_BINDTODEVICE`).
    pub ifname: Option<IfName>,
    /// First listening port.
    pub first: u16,
    /// Last listening port, inclusive.
    pub last: u16,
    /// Target port of `first`.
    pub to: u16,
    /// Protocol.
    pub proto: Proto,
    /// Flags.
    pub flags: Flags,
}

impl Rule {
    /// A rule for `first..=last` to `to..`, listening on `addr`, with no flags.
    pub fn new(proto: Proto, addr: IpAddr, first: u16, last: u16, to: u16) -> Rule {
        Rule {
            addr,
            target: None,
            ifname: None,
            first,
            last,
            to,
            proto,
            flags: Flags::empty(),
        }
    }

    /// A dual-stack wildcard rule: every IPv4 and IPv6 address.
    pub fn dual_stack(proto: Proto, first: u16, last: u16, to: u16) -> Rule {
        let mut r = Rule::new(proto, IpAddr::V6(Ipv6Addr::UNSPECIFIED), first, last, to);
        r.flags = Flags::DUAL_STACK_ANY;
        r
    }

    /// Whether this rule listens on both families with one socket per port.
    pub fn is_dual_stack(&self) -> bool {
        self.flags.contains(Flags::DUAL_STACK_ANY)
    }

    /// Whether bind failures on some ports are tolerated.
    pub fn is_weak(&self) -> bool {
        self.flags.contains(Flags::WEAK)
    }

    /// Whether the rule forwards only ports the target listens on.
    pub fn is_scan(&self) -> bool {
        self.flags.contains(Flags::SCAN)
    }

    /// Number of ports, hence of listening sockets, the rule needs.
    pub fn port_count(&self) -> u32 {
        u32::from(self.last).saturating_sub(u32::from(self.first)) + 1
    }

    /// Last target port, if the range does not run past 65535.
    pub fn to_last(&self) -> Option<u16> {
        self.to.checked_add(self.last.checked_sub(self.first)?)
    }

    /// Target port for listening port `port`, which the caller knows is in range.
    pub fn target_port(&self, port: u16) -> u16 {
        self.to.wrapping_add(port.wrapping_sub(self.first))
    }

    /// The address the rule matches on, `None` for "every address".
    pub fn match_addr(&self) -> Option<IpAddr> {
        if self.is_dual_stack() {
            None
        } else {
            Some(self.addr)
        }
    }

    /// Whether two rules would want some of the same (protocol, address, port).
    ///
    /// The wildcard of a family overlaps every address of that family, and the
    /// dual-stack wildcard overlaps every address. Interface names are not
    /// considered, as upstream does not: that errs on the side of refusing.
    pub fn conflicts(&self, other: &Rule) -> bool {
        self.proto == other.proto
            && addrs_overlap(self.match_addr(), other.match_addr())
            && self.first <= other.last
            && other.first <= self.last
    }
}

/// Normalise an address: an IPv4-mapped IPv6 address is IPv4.
pub fn canonical_ip(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn addrs_overlap(a: Option<IpAddr>, b: Option<IpAddr>) -> bool {
    match (a, b) {
        (None, _) | (_, None) => true,
        (Some(a), Some(b)) => {
            a == b || (a.is_ipv4() == b.is_ipv4() && (a.is_unspecified() || b.is_unspecified()))
        }
    }
}

/// Writes an address as upstream does inside brackets: `*` for dual-stack.
fn fmt_listen(rule: &Rule, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match rule.match_addr() {
        None => f.write_str("*"),
        Some(a) => write!(f, "{a}"),
    }
}

/// One line per rule, byte-identical to upstream's `fwd_rule_fmt()`, e.g.
/// `TCP [*]:22  =>  22 ` or
/// `UDP [::1]%lo:1000-1010  =>  192.0.2.1:2000-2010  (best effort)`.
///
/// A target address is written before the target port, IPv6 in brackets.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [", self.proto)?;
        fmt_listen(self, f)?;
        f.write_str("]")?;
        if let Some(ifname) = &self.ifname {
            write!(f, "%{ifname}")?;
        }
        write!(f, ":{}", self.first)?;
        if self.first != self.last {
            write!(f, "-{}", self.last)?;
        }
        f.write_str("  =>  ")?;
        match self.target {
            Some(IpAddr::V4(a)) => write!(f, "{a}:")?,
            Some(IpAddr::V6(a)) => write!(f, "[{a}]:")?,
            None => {}
        }
        write!(f, "{}", self.to)?;
        if self.first != self.last {
            // Same arithmetic as upstream: wraps rather than fails on a bad rule.
            let to_last = self.to.wrapping_add(self.last.wrapping_sub(self.first));
            write!(f, "-{to_last}")?;
        }
        f.write_str(" ")?;
        if self.is_weak() {
            f.write_str(" (best effort)")?;
        }
        if self.is_scan() {
            f.write_str(" (auto-scan)")?;
        }
        Ok(())
    }
}

/// Capability bits of a pif, as upstream's `FWD_CAP_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Caps(u32);

impl Caps {
    /// IPv4 rules allowed.
    pub const IPV4: Caps = Caps(1);
    /// IPv6 rules allowed.
    pub const IPV6: Caps = Caps(2);
    /// TCP rules allowed.
    pub const TCP: Caps = Caps(4);
    /// UDP rules allowed.
    pub const UDP: Caps = Caps(8);
    /// The scan flag (`auto`) allowed.
    pub const SCAN: Caps = Caps(16);
    /// Interface names (`SO_BINDTODEVICE`) allowed.
    pub const IFNAME: Caps = Caps(32);

    /// Capabilities from their wire value, unknown bits kept.
    pub const fn from_bits_retain(bits: u32) -> Caps {
        Caps(bits)
    }
    /// The wire value.
    pub const fn bits(self) -> u32 {
        self.0
    }
    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Caps) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Caps {
    type Output = Caps;
    fn bitor(self, rhs: Caps) -> Caps {
        Caps(self.0 | rhs.0)
    }
}

impl fmt::Display for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Caps::IPV4, "IPv4"),
            (Caps::IPV6, "IPv6"),
            (Caps::TCP, "TCP"),
            (Caps::UDP, "UDP"),
            (Caps::SCAN, "scan"),
            (Caps::IFNAME, "ifname"),
        ];
        let mut first = true;
        for (cap, name) in names {
            if self.contains(cap) {
                if !first {
                    f.write_str(" ")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

/// Pif id: the interface a table belongs to, numbered as upstream passt does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PifId(pub u8);

impl PifId {
    /// No pif; on the wire it ends a list.
    pub const NONE: PifId = PifId(0);
    /// The host side: rules listen in the daemon's own namespace.
    pub const HOST: PifId = PifId(1);
    /// The namespace side: rules listen inside an attached namespace.
    pub const SPLICE: PifId = PifId(3);
}

/// Name of the HOST pif (upstream's), which `-t`/`-u` edit.
pub const HOST_NAME: &str = "HOST";
/// Name of the SPLICE pif (upstream's), which `-T`/`-U` edit.
pub const SPLICE_NAME: &str = "SPLICE";

impl fmt::Display for PifId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The IPv4 or IPv6 wildcard address.
pub fn wildcard(v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_matches_upstream_spacing() {
        let r = Rule::dual_stack(Proto::Tcp, 22, 22, 22);
        assert_eq!(r.to_string(), "TCP [*]:22  =>  22 ");
        let mut r = Rule::new(Proto::Udp, "::1".parse().unwrap(), 1000, 1010, 2000);
        r.ifname = Some(IfName::new("lo").unwrap());
        r.target = Some("192.0.2.1".parse().unwrap());
        r.flags = Flags::WEAK | Flags::SCAN;
        assert_eq!(
            r.to_string(),
            "UDP [::1]%lo:1000-1010  =>  192.0.2.1:2000-2010  (best effort) (auto-scan)"
        );
        r.target = Some("2001:db8::1".parse().unwrap());
        r.flags = Flags::empty();
        assert_eq!(
            r.to_string(),
            "UDP [::1]%lo:1000-1010  =>  [2001:db8::1]:2000-2010 "
        );
    }

    #[test]
    fn conflicts_follow_wildcards() {
        let any = Rule::dual_stack(Proto::Tcp, 10, 20, 10);
        let v4 = Rule::new(Proto::Tcp, "127.0.0.1".parse().unwrap(), 20, 20, 20);
        let v4any = Rule::new(Proto::Tcp, "0.0.0.0".parse().unwrap(), 15, 15, 15);
        let v6 = Rule::new(Proto::Tcp, "::1".parse().unwrap(), 15, 15, 15);
        let v6any = Rule::new(Proto::Tcp, "::".parse().unwrap(), 15, 15, 15);
        assert!(any.conflicts(&v4));
        assert!(v4any.conflicts(&any));
        assert!(!v4.conflicts(&v4any)); // ports differ
        assert!(!v4any.conflicts(&v6));
        assert!(v6any.conflicts(&v6));
        assert!(!v6any.conflicts(&v4any));
        let udp = Rule::dual_stack(Proto::Udp, 10, 20, 10);
        assert!(!udp.conflicts(&any));
    }

    #[test]
    fn ifname_rules() {
        assert!(IfName::new("eth0").is_ok());
        assert!(IfName::new("").is_err());
        assert!(IfName::new("0123456789abcdef").is_err());
        assert!(IfName::new("0123456789abcde").is_ok());
        assert!(IfName::new("a b").is_err());
        assert!(IfName::new("a/b").is_err());
    }
}
