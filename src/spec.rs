//! The port-spec parser: the `-t`/`-u`/`-T`/`-U` option syntax of passt and
//! pesto, turned into rules. See docs/port-spec.md for the syntax.
//!
//! Parsing ([`PortSpec::parse`]) needs only the text; turning a spec into
//! rules ([`PortSpec::rules`]) also needs the pif's capabilities and the
//! host's ephemeral port range, which decide the default address and what
//! `all` means.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::rule::{Caps, Flags, IfName, IfNameError, Proto, Rule, canonical_ip, wildcard};

/// Which option a spec came with: protocol and side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpecOpt {
    /// `-t`: TCP, listening on the host side (pif HOST).
    Tcp,
    /// `-u`: UDP, listening on the host side (pif HOST).
    Udp,
    /// `-T`: TCP, listening in the namespace (pif SPLICE).
    TcpNs,
    /// `-U`: UDP, listening in the namespace (pif SPLICE).
    UdpNs,
}

impl SpecOpt {
    /// The option for a short option letter.
    pub fn from_letter(c: char) -> Option<SpecOpt> {
        match c {
            't' => Some(SpecOpt::Tcp),
            'u' => Some(SpecOpt::Udp),
            'T' => Some(SpecOpt::TcpNs),
            'U' => Some(SpecOpt::UdpNs),
            _ => None,
        }
    }

    /// The short option letter.
    pub fn letter(self) -> char {
        match self {
            SpecOpt::Tcp => 't',
            SpecOpt::Udp => 'u',
            SpecOpt::TcpNs => 'T',
            SpecOpt::UdpNs => 'U',
        }
    }

    /// The protocol the option forwards.
    pub fn proto(self) -> Proto {
        match self {
            SpecOpt::Tcp | SpecOpt::TcpNs => Proto::Tcp,
            SpecOpt::Udp | SpecOpt::UdpNs => Proto::Udp,
        }
    }

    /// Whether the option's rules listen inside the namespace (SPLICE).
    pub fn is_namespace(self) -> bool {
        matches!(self, SpecOpt::TcpNs | SpecOpt::UdpNs)
    }
}

impl fmt::Display for SpecOpt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-{}", self.letter())
    }
}

/// The host's ephemeral port range, which `all` and exclude-only specs skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ephemeral {
    /// First ephemeral port.
    pub first: u16,
    /// Last ephemeral port, inclusive.
    pub last: u16,
}

impl Default for Ephemeral {
    /// RFC 6335's range, as upstream assumes when it cannot read the sysctl.
    fn default() -> Ephemeral {
        Ephemeral {
            first: 49152,
            last: 65535,
        }
    }
}

/// Where Linux keeps the ephemeral range.
pub const PORT_RANGE_SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_port_range";

impl Ephemeral {
    /// Parses the sysctl's text, e.g. `"32768\t60999\n"`.
    pub fn parse(text: &str) -> Option<Ephemeral> {
        let mut it = text.split_whitespace();
        let first = it.next()?.parse().ok()?;
        let last = it.next()?.parse().ok()?;
        (it.next().is_none() && first <= last).then_some(Ephemeral { first, last })
    }

    /// Reads the running kernel's range, falling back to RFC 6335's.
    pub fn probe() -> Ephemeral {
        std::fs::read_to_string(PORT_RANGE_SYSCTL)
            .ok()
            .and_then(|t| Ephemeral::parse(&t))
            .unwrap_or_default()
    }
}

/// A spec that could not be parsed or expanded, with the option and text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid port spec '{opt} {spec}': {problem}")]
pub struct SpecError {
    /// The option the spec came with.
    pub opt: SpecOpt,
    /// The spec as given.
    pub spec: String,
    /// What is wrong with it.
    pub problem: SpecProblem,
}

/// What is wrong with a port spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecProblem {
    /// Nothing after the address.
    #[error("no ports given (use 'all' for every port)")]
    Empty,
    /// An empty entry between commas.
    #[error("empty entry in the port list")]
    EmptyChunk,
    /// The listening address does not parse.
    #[error("bad listening address '{0}'")]
    BadAddress(String),
    /// The interface name is not usable.
    #[error(transparent)]
    BadIfName(#[from] IfNameError),
    /// `-T`/`-U` with an address or interface.
    #[error(
        "a listening address or interface is not allowed with -T or -U (they listen on the namespace's loopback)"
    )]
    AddressNotAllowed,
    /// A port number that does not parse or is past 65535.
    #[error("bad port '{0}' (ports are 0-65535)")]
    BadPort(String),
    /// A range whose last port is below its first.
    #[error("bad port range '{0}' (first must not exceed last)")]
    BadRange(String),
    /// A target range of another length than its listening range.
    #[error("target range '{target}' has {target_len} ports but '{listen}' has {listen_len}")]
    RangeLength {
        /// Listening range text.
        listen: String,
        /// Its length.
        listen_len: u32,
        /// Target range text.
        target: String,
        /// Its length.
        target_len: u32,
    },
    /// The target address does not parse.
    #[error("bad target address '{0}'")]
    BadTarget(String),
    /// An entry that is none of the known forms.
    #[error("unrecognised entry '{0}'")]
    BadChunk(String),
    /// `auto` on a pif that cannot scan.
    #[error("'auto' needs a pif that can scan its target (one with a namespace)")]
    ScanUnsupported,
    /// An interface name on a pif that cannot bind to devices.
    #[error("binding to an interface is not supported on this pif")]
    IfnameUnsupported,
}

/// One include entry: `FIRST[-LAST][:TARGET]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Include {
    first: u16,
    last: u16,
    to: u16,
    target: Option<IpAddr>,
}

/// A set of ports, as a bitmap: exclusions are applied port by port.
#[derive(Clone, PartialEq, Eq)]
struct PortSet(Box<[u64; 1024]>);

impl PortSet {
    fn new() -> PortSet {
        PortSet(Box::new([0; 1024]))
    }
    fn insert_range(&mut self, first: u16, last: u16) {
        for p in first..=last {
            self.0[usize::from(p) / 64] |= 1 << (p % 64);
        }
    }
    fn contains(&self, p: u16) -> bool {
        self.0[usize::from(p) / 64] & (1 << (p % 64)) != 0
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n: u32 = self.0.iter().map(|w| w.count_ones()).sum();
        write!(f, "PortSet({n} ports)")
    }
}

/// A parsed port spec, not yet tied to a pif.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// `none`: forward nothing for this protocol.
    None,
    /// Ports to forward.
    Ports(Ports),
}

/// The ports part of a spec, with its listening address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports {
    opt: SpecOpt,
    /// `None`: every address (dual-stack where the pif allows).
    addr: Option<IpAddr>,
    ifname: Option<IfName>,
    includes: Vec<Include>,
    excludes: PortSet,
    /// No include entries: every non-ephemeral port, best effort.
    all: bool,
    /// Target address given as `all:TADDR`.
    all_target: Option<IpAddr>,
    scan: bool,
}

impl PortSpec {
    /// Parses a spec given with `opt`.
    pub fn parse(opt: SpecOpt, text: &str) -> Result<PortSpec, SpecError> {
        let err = |problem| SpecError {
            opt,
            spec: text.to_owned(),
            problem,
        };
        if text == "none" {
            return Ok(PortSpec::None);
        }
        let (listen, ports) = split_listen(text).map_err(err)?;
        let (addr, ifname) = match listen {
            Some(_) if opt.is_namespace() => return Err(err(SpecProblem::AddressNotAllowed)),
            Some((addr, ifname)) => (addr, ifname),
            None => (None, None),
        };
        let mut spec = Ports {
            opt,
            addr,
            ifname,
            includes: Vec::new(),
            excludes: PortSet::new(),
            all: false,
            all_target: None,
            scan: false,
        };
        parse_ports(&mut spec, ports).map_err(err)?;
        Ok(PortSpec::Ports(spec))
    }

    /// The rules this spec means on a pif with `caps`, in upstream's order.
    /// `None` gives no rules.
    pub fn rules(&self, caps: Caps, eph: Ephemeral) -> Result<Vec<Rule>, SpecProblem> {
        match self {
            PortSpec::None => Ok(Vec::new()),
            PortSpec::Ports(p) => p.rules(caps, eph),
        }
    }
}

/// Parses and expands in one step.
pub fn parse_rules(
    opt: SpecOpt,
    text: &str,
    caps: Caps,
    eph: Ephemeral,
) -> Result<Vec<Rule>, SpecError> {
    PortSpec::parse(opt, text)?
        .rules(caps, eph)
        .map_err(|problem| SpecError {
            opt,
            spec: text.to_owned(),
            problem,
        })
}

type Listen = (Option<IpAddr>, Option<IfName>);

/// Splits `[ADDR[%IFACE]/]PORTS`. The ports part may itself hold a `/` (a
/// target `TADDR/TPORT`), so the first `/` ends a listening address only if
/// what stands before it reads as one.
fn split_listen(text: &str) -> Result<(Option<Listen>, &str), SpecProblem> {
    let Some(slash) = text.find('/') else {
        return Ok((None, text));
    };
    let (prefix, rest) = (&text[..slash], &text[slash + 1..]);
    match parse_listen(prefix) {
        Ok(l) => Ok((Some(l), rest)),
        Err(e) => {
            // `8080:198.51.100.7/80`: a ports list with a target, no address.
            let looks_like_ports = prefix.split_once(':').is_some_and(|(l, _)| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit() || b"-,~".contains(&b))
            });
            if looks_like_ports && !prefix.contains('%') {
                Ok((None, text))
            } else {
                Err(e)
            }
        }
    }
}

fn parse_listen(prefix: &str) -> Result<Listen, SpecProblem> {
    let (addr, ifname) = match prefix.split_once('%') {
        Some((a, i)) => (a, Some(IfName::new(i)?)),
        None => (prefix, None),
    };
    if addr.is_empty() || addr == "*" {
        return Ok((None, ifname));
    }
    let ip = parse_ip(addr).ok_or_else(|| SpecProblem::BadAddress(addr.to_owned()))?;
    Ok((Some(ip), ifname))
}

/// An IPv4 or IPv6 address, brackets allowed around either.
fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s);
    s.parse::<IpAddr>().ok().map(canonical_ip)
}

fn parse_port(s: &str) -> Result<u16, SpecProblem> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 5 {
        return Err(SpecProblem::BadPort(s.to_owned()));
    }
    s.parse().map_err(|_| SpecProblem::BadPort(s.to_owned()))
}

/// `FIRST[-LAST]`.
fn parse_range(s: &str) -> Result<(u16, u16), SpecProblem> {
    let (first, last) = match s.split_once('-') {
        Some((f, l)) => (parse_port(f)?, parse_port(l)?),
        None => {
            let p = parse_port(s)?;
            (p, p)
        }
    };
    if first > last {
        return Err(SpecProblem::BadRange(s.to_owned()));
    }
    Ok((first, last))
}

fn is_range(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'-')
}

fn parse_ports(spec: &mut Ports, text: &str) -> Result<(), SpecProblem> {
    if text.is_empty() {
        return Err(SpecProblem::Empty);
    }
    if text == "all" {
        spec.all = true;
        return Ok(());
    }
    if let Some(t) = text.strip_prefix("all:") {
        spec.all = true;
        spec.all_target = Some(parse_ip(t).ok_or_else(|| SpecProblem::BadTarget(t.to_owned()))?);
        return Ok(());
    }
    for chunk in text.split(',') {
        if chunk.is_empty() {
            return Err(SpecProblem::EmptyChunk);
        } else if chunk == "auto" {
            spec.scan = true;
        } else if let Some(x) = chunk.strip_prefix('~') {
            let (first, last) = parse_range(x)?;
            spec.excludes.insert_range(first, last);
        } else if chunk.starts_with(|c: char| c.is_ascii_digit()) {
            spec.includes.push(parse_include(chunk)?);
        } else {
            return Err(SpecProblem::BadChunk(chunk.to_owned()));
        }
    }
    spec.all = spec.includes.is_empty();
    Ok(())
}

/// `FIRST[-LAST][:TFIRST[-TLAST] | :TADDR | :TADDR/TFIRST[-TLAST]]`.
fn parse_include(chunk: &str) -> Result<Include, SpecProblem> {
    let (range, target) = match chunk.split_once(':') {
        Some((r, t)) => (r, Some(t)),
        None => (chunk, None),
    };
    let (first, last) = parse_range(range)?;
    let mut inc = Include {
        first,
        last,
        to: first,
        target: None,
    };
    let Some(target) = target else {
        return Ok(inc);
    };
    let (taddr, tports) = if is_range(target) {
        (None, Some(target))
    } else {
        match target.rsplit_once('/') {
            Some((a, p)) => (Some(a), Some(p)),
            None => (Some(target), None),
        }
    };
    if let Some(a) = taddr {
        inc.target = Some(parse_ip(a).ok_or_else(|| SpecProblem::BadTarget(a.to_owned()))?);
    }
    if let Some(p) = tports {
        let (tfirst, tlast) = parse_range(p)?;
        if tlast - tfirst != last - first {
            return Err(SpecProblem::RangeLength {
                listen: range.to_owned(),
                listen_len: u32::from(last - first) + 1,
                target: p.to_owned(),
                target_len: u32::from(tlast - tfirst) + 1,
            });
        }
        inc.to = tfirst;
    }
    Ok(inc)
}

impl Ports {
    fn rules(&self, caps: Caps, eph: Ephemeral) -> Result<Vec<Rule>, SpecProblem> {
        if self.scan && !caps.contains(Caps::SCAN) {
            return Err(SpecProblem::ScanUnsupported);
        }
        if self.ifname.is_some() && !caps.contains(Caps::IFNAME) {
            return Err(SpecProblem::IfnameUnsupported);
        }
        // -T/-U listen on the namespace's loopback: bound to `lo` where the
        // pif can bind to devices, else on 127.0.0.1 and ::1 (as upstream).
        let listens: Vec<Listen> = if !self.opt.is_namespace() {
            vec![(self.addr, self.ifname.clone())]
        } else if caps.contains(Caps::IFNAME) {
            vec![(None, IfName::new("lo").ok())]
        } else {
            let mut v = Vec::new();
            if caps.contains(Caps::IPV4) {
                v.push((Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), None));
            }
            if caps.contains(Caps::IPV6) {
                v.push((Some(IpAddr::V6(Ipv6Addr::LOCALHOST)), None));
            }
            v
        };
        let mut flags = if self.scan {
            Flags::SCAN
        } else {
            Flags::empty()
        };
        // `all` is an include of every port that also skips ephemeral ones.
        let all_entry;
        let all_excludes;
        let (entries, excludes) = if self.all {
            flags |= Flags::WEAK;
            all_entry = [Include {
                first: 1,
                last: 65535,
                to: 1,
                target: self.all_target,
            }];
            let mut set = self.excludes.clone();
            set.insert_range(eph.first, eph.last);
            all_excludes = set;
            (&all_entry[..], &all_excludes)
        } else {
            (&self.includes[..], &self.excludes)
        };
        let mut out = Vec::new();
        for (addr, ifname) in &listens {
            for inc in entries {
                let mut rule = Rule::new(self.opt.proto(), wildcard(false), 0, 0, 0);
                rule.ifname = ifname.clone();
                rule.target = inc.target;
                rule.flags = flags;
                match (addr, inc.target) {
                    (Some(a), _) => rule.addr = *a,
                    // A target has one family: listen on that family's wildcard.
                    (None, Some(t)) => rule.addr = wildcard(t.is_ipv4()),
                    (None, None) if caps.contains(Caps::IPV4 | Caps::IPV6) => {
                        rule.flags |= Flags::DUAL_STACK_ANY
                    }
                    (None, None) if caps.contains(Caps::IPV4) => rule.addr = wildcard(true),
                    (None, None) if caps.contains(Caps::IPV6) => rule.addr = wildcard(false),
                    // No family at all: let validation say so.
                    (None, None) => rule.flags |= Flags::DUAL_STACK_ANY,
                }
                range_except(&mut out, &rule, inc.first, inc.last, inc.to, excludes);
            }
        }
        Ok(out)
    }
}

/// Appends a copy of `template` for each run of ports in `first..=last`
/// that `excludes` does not hold, mapped so that `first` goes to `to`.
fn range_except(
    out: &mut Vec<Rule>,
    template: &Rule,
    first: u16,
    last: u16,
    to: u16,
    excludes: &PortSet,
) {
    let skip = |p: u16| excludes.contains(p);
    let delta = to.wrapping_sub(first);
    let mut base = u32::from(first);
    let last = u32::from(last);
    while base <= last {
        // Ports are u16; `base` and `end` stay within 0..=65536.
        if skip(base as u16) {
            base += 1;
            continue;
        }
        let mut end = base;
        while end < last && !skip((end + 1) as u16) {
            end += 1;
        }
        let mut r = template.clone();
        r.first = base as u16;
        r.last = end as u16;
        r.to = (base as u16).wrapping_add(delta);
        out.push(r);
        base = end + 1;
    }
}

/// The spec that gives back exactly `rule`, less its best-effort flag (no
/// spec sets that for one rule alone: see [`crate::config`]), for the
/// protocol the rule has: `-t`/`-u` on HOST, `-T`/`-U` on SPLICE. Used to
/// export live tables as a configuration file.
pub fn spec_of(rule: &Rule) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let addr = crate::rule::canonical_ip(rule.addr);
    let listen = if rule.is_dual_stack() {
        String::new()
    } else {
        match addr {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        }
    };
    match &rule.ifname {
        Some(i) => {
            let _ = write!(out, "{listen}%{i}/");
        }
        None if !listen.is_empty() => {
            let _ = write!(out, "{listen}/");
        }
        None => {}
    }
    let _ = write!(out, "{}", rule.first);
    if rule.last != rule.first {
        let _ = write!(out, "-{}", rule.last);
    }
    let to_last = rule.target_port(rule.last);
    let same_ports = rule.to == rule.first;
    match rule.target.map(crate::rule::canonical_ip) {
        Some(t) => {
            let t = match t {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("[{a}]"),
            };
            let _ = write!(out, ":{t}");
            if !same_ports {
                let _ = write!(out, "/{}", rule.to);
                if rule.last != rule.first {
                    let _ = write!(out, "-{to_last}");
                }
            }
        }
        None if !same_ports => {
            let _ = write!(out, ":{}", rule.to);
            if rule.last != rule.first {
                let _ = write!(out, "-{to_last}");
            }
        }
        None => {}
    }
    if rule.is_scan() {
        out.push_str(",auto");
    }
    out
}

#[cfg(test)]
mod spec_of_tests {
    use super::*;

    /// Every rule the spec language can give comes back from its spec.
    #[test]
    fn specs_give_back_their_rules() {
        let caps = Caps::from_bits_retain(0x3f);
        let eph = Ephemeral::default();
        for (opt, text) in [
            (SpecOpt::Tcp, "8080:80"),
            (SpecOpt::Tcp, "22"),
            (SpecOpt::Udp, "5353:53"),
            (SpecOpt::Tcp, "8000-8010:9000-9010"),
            (SpecOpt::Tcp, "127.0.0.1/8443:192.0.2.10/443"),
            (SpecOpt::Tcp, "8080:198.51.100.7"),
            (SpecOpt::Tcp, "443:[2001:db8::2]/8443"),
            (SpecOpt::Tcp, "192.0.2.1%eth0/22"),
            (SpecOpt::Tcp, "%eth0/22"),
            (SpecOpt::Tcp, "[::1]/8080:127.0.0.1/80"),
            (SpecOpt::Tcp, "[::]/8080:80"),
            (SpecOpt::Tcp, "0.0.0.0/8080:80"),
            (SpecOpt::Tcp, "8000-8010,auto"),
            (SpecOpt::Tcp, "127.0.0.1/20-30:40-50"),
        ] {
            for rule in parse_rules(opt, text, caps, eph).unwrap() {
                let spec = spec_of(&rule);
                let back = parse_rules(opt, &spec, caps, eph)
                    .unwrap_or_else(|e| panic!("{text} -> {spec}: {e}"));
                assert_eq!(back, vec![rule.clone()], "{text} -> {spec}");
            }
        }
    }
}
