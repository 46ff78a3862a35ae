//! Where forwarded traffic goes: a rule's target address, or the daemon's
//! default target for the peer's family, at the rule's mapped port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::netns::Netns;

use crate::rule::{Rule, canonical_ip};
use crate::socket;
use crate::stats::RuleStats;
use crate::throttle::Throttle;

/// The default targets, one per family, for rules without a target address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Targets {
    /// IPv4 default target.
    pub v4: Ipv4Addr,
    /// IPv6 default target.
    pub v6: Ipv6Addr,
}

impl Default for Targets {
    /// The loopback addresses: forward to services on this host.
    fn default() -> Targets {
        Targets {
            v4: Ipv4Addr::LOCALHOST,
            v6: Ipv6Addr::LOCALHOST,
        }
    }
}

impl Targets {
    /// Replaces the default of `addr`'s family.
    pub fn set(&mut self, addr: IpAddr) {
        match canonical_ip(addr) {
            IpAddr::V4(a) => self.v4 = a,
            IpAddr::V6(a) => self.v6 = a,
        }
    }

    /// The default target for a peer of `peer`'s family.
    pub fn for_peer(&self, peer: IpAddr) -> IpAddr {
        match canonical_ip(peer) {
            IpAddr::V4(_) => IpAddr::V4(self.v4),
            IpAddr::V6(_) => IpAddr::V6(self.v6),
        }
    }
}

/// Where a pif's sockets live and where its rules' targets are reached:
/// `None` is the daemon's own network namespace.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// The namespace of the listening sockets.
    pub listen: Option<Arc<Netns>>,
    /// The namespace the targets are reached from.
    pub connect: Option<Arc<Netns>>,
}

/// What a listening socket needs to forward: its rule, the targets in force
/// when the rule was installed, and the namespace they are reached from. A
/// table swap hands the listener a new route; connections already made keep
/// the target they were given.
#[derive(Debug, Clone)]
pub struct Route {
    /// The rule.
    pub rule: Rule,
    /// Default targets for a rule without a target address.
    pub defaults: Targets,
    /// The namespace targets are reached from (`None`: the daemon's own).
    pub connect_ns: Option<Arc<Netns>>,
    /// Connections reset because the target refused, logged at most once a
    /// second per rule.
    pub resets: Arc<Throttle>,
    /// The rule's traffic counters: the registry hands a rule that stays
    /// in its table the same ones across swaps.
    pub stats: Arc<RuleStats>,
}

impl PartialEq for Route {
    fn eq(&self, other: &Route) -> bool {
        self.rule == other.rule
            && self.defaults == other.defaults
            && match (&self.connect_ns, &other.connect_ns) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl Eq for Route {}

impl Route {
    /// The route of `rule`, to targets in the daemon's own namespace.
    pub fn new(rule: Rule, defaults: Targets) -> Route {
        Route {
            rule,
            defaults,
            connect_ns: None,
            resets: Arc::new(Throttle::new()),
            stats: Arc::new(RuleStats::default()),
        }
    }

    /// The same route, to targets reached from `ns`.
    pub fn connect_from(mut self, ns: Option<Arc<Netns>>) -> Route {
        self.connect_ns = ns;
        self
    }

    /// Where a connection from `peer` to listening port `port` goes.
    pub fn target(&self, peer: IpAddr, port: u16) -> SocketAddr {
        let addr = match self.rule.target {
            Some(t) => canonical_ip(t),
            None => self.defaults.for_peer(peer),
        };
        SocketAddr::new(addr, self.rule.target_port(port))
    }

    /// Where to try once more when `tried`, this rule's target for some
    /// peer, refused: the other family's loopback, for a rule without a
    /// target address whose defaults are both loopback. A service that
    /// listens on 127.0.0.1 only is then reached by IPv6 clients too (and
    /// one on ::1 only by IPv4 clients).
    pub fn fallback(&self, tried: SocketAddr) -> Option<SocketAddr> {
        if self.rule.target.is_some() || !tried.ip().is_loopback() {
            return None;
        }
        let other = match tried.ip() {
            IpAddr::V4(_) => IpAddr::V6(self.defaults.v6),
            IpAddr::V6(_) => IpAddr::V4(self.defaults.v4),
        };
        other
            .is_loopback()
            .then(|| SocketAddr::new(other, tried.port()))
    }

    /// The target addresses this rule can send to: its own, or the defaults
    /// for the families its listeners accept.
    pub fn target_addrs(&self) -> Vec<IpAddr> {
        if let Some(t) = self.rule.target {
            return vec![canonical_ip(t)];
        }
        let v4 = IpAddr::V4(self.defaults.v4);
        let v6 = IpAddr::V6(self.defaults.v6);
        if self.rule.is_dual_stack() {
            vec![v4, v6]
        } else if self.rule.addr.is_ipv4() {
            vec![v4]
        } else {
            vec![v6]
        }
    }
}

/// A rule that would forward to its own listening socket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "rule '{}' forwards {target} to itself: its own listener covers that address \
     and port (map to another port, e.g. 8080:80, or give another target)",
    rule.to_string().trim_end()
)]
pub struct LoopError {
    /// The rule.
    pub rule: Box<Rule>,
    /// The target that loops back (first port of the rule).
    pub target: SocketAddr,
}

/// Rejects a rule whose target lands on its own listener: the same port, at
/// an address the listener receives.
///
/// A wildcard listener receives every local address; one bound to a device
/// other than `lo` never sees traffic this host sends to itself. Chains across
/// several rules are not detected.
pub fn check_loop(route: &Route) -> Result<(), LoopError> {
    check_loop_with(route, &mut socket::is_local)
}

/// [`check_loop`], asking `is_local` whether a target is a local address.
fn check_loop_with(
    route: &Route,
    is_local: &mut impl FnMut(IpAddr) -> bool,
) -> Result<(), LoopError> {
    let rule = &route.rule;
    if rule.to != rule.first {
        return Ok(());
    }
    for target in route.target_addrs() {
        if listener_covers(rule, target, is_local) {
            return Err(LoopError {
                rule: Box::new(rule.clone()),
                target: SocketAddr::new(target, rule.to),
            });
        }
    }
    Ok(())
}

/// The routes of a table's rules placed as `place` says, refusing a rule
/// that forwards to itself; the error comes with the rule's index. Only a
/// pif that listens and connects in the daemon's own namespace can loop.
pub fn routes(
    table: &crate::table::Table,
    targets: Targets,
    place: &Placement,
) -> Result<Vec<Arc<Route>>, (usize, LoopError)> {
    routes_of(table.rules(), targets, place)
}

/// [`routes`] of some rules only: those a scoped update adds, checked for
/// loops before APPLY builds the whole table's.
pub fn routes_of<'a>(
    rules: impl IntoIterator<Item = &'a Rule>,
    targets: Targets,
    place: &Placement,
) -> Result<Vec<Arc<Route>>, (usize, LoopError)> {
    let same_place = place.listen.is_none() && place.connect.is_none();
    // Asking the kernel is a bind: once per target address, not per rule.
    let mut local: std::collections::HashMap<IpAddr, bool> = std::collections::HashMap::new();
    let mut is_local = |a: IpAddr| *local.entry(a).or_insert_with(|| socket::is_local(a));
    rules
        .into_iter()
        .enumerate()
        .map(|(i, rule)| {
            let route = Route::new(rule.clone(), targets).connect_from(place.connect.clone());
            if same_place {
                check_loop_with(&route, &mut is_local).map_err(|e| (i, e))?;
            }
            Ok(Arc::new(route))
        })
        .collect()
}

fn listener_covers(rule: &Rule, target: IpAddr, is_local: &mut impl FnMut(IpAddr) -> bool) -> bool {
    let target = canonical_ip(target);
    let family_ok = rule.is_dual_stack() || rule.addr.is_ipv4() == target.is_ipv4();
    if !family_ok {
        return false;
    }
    if !rule.addr.is_unspecified() {
        return canonical_ip(rule.addr) == target;
    }
    let sees_local = rule.ifname.as_ref().is_none_or(|i| i.as_str() == "lo");
    sees_local && is_local(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::{IfName, Proto};

    fn route(rule: Rule) -> Route {
        Route::new(rule, Targets::default())
    }

    #[test]
    fn dual_stack_rule_picks_the_peer_family() {
        let r = route(Rule::dual_stack(Proto::Tcp, 8000, 8010, 9000));
        let v4: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(r.target(v4, 8003), "127.0.0.1:9003".parse().unwrap());
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(r.target(v6, 8010), "[::1]:9010".parse().unwrap());
    }

    #[test]
    fn falls_back_to_the_other_loopback_only() {
        let r = route(Rule::dual_stack(Proto::Tcp, 8080, 8080, 80));
        let v6 = r.target("::1".parse().unwrap(), 8080);
        assert_eq!(r.fallback(v6), Some("127.0.0.1:80".parse().unwrap()));
        assert_eq!(
            r.fallback("127.0.0.1:80".parse().unwrap()),
            Some("[::1]:80".parse().unwrap())
        );
        // A default that is not loopback, or a rule's own target: no.
        let mut targets = Targets::default();
        targets.set("192.0.2.1".parse().unwrap());
        let r2 = Route::new(Rule::dual_stack(Proto::Tcp, 8080, 8080, 80), targets);
        assert_eq!(r2.fallback("[::1]:80".parse().unwrap()), None);
        let mut rule = Rule::new(Proto::Tcp, "::".parse().unwrap(), 8080, 8080, 80);
        rule.target = Some("::1".parse().unwrap());
        assert_eq!(route(rule).fallback("[::1]:80".parse().unwrap()), None);
    }

    #[test]
    fn explicit_target_wins() {
        let mut rule = Rule::dual_stack(Proto::Udp, 53, 53, 5353);
        rule.target = Some("::ffff:192.0.2.7".parse().unwrap());
        let r = route(rule);
        assert_eq!(
            r.target("::1".parse().unwrap(), 53),
            "192.0.2.7:5353".parse().unwrap()
        );
    }

    #[test]
    fn same_port_to_loopback_is_a_loop() {
        let e = check_loop(&route(Rule::dual_stack(Proto::Tcp, 8080, 8080, 8080))).unwrap_err();
        assert_eq!(e.target, "127.0.0.1:8080".parse().unwrap());
        assert!(e.to_string().contains("TCP [*]:8080  =>  8080'"), "{e}");
        // Another port, another address, or a device that never sees local
        // traffic: no loop.
        assert!(check_loop(&route(Rule::dual_stack(Proto::Tcp, 8080, 8080, 80))).is_ok());
        let mut rule = Rule::new(Proto::Tcp, "127.0.0.2".parse().unwrap(), 80, 80, 80);
        assert!(check_loop(&route(rule.clone())).is_ok());
        rule.target = Some("127.0.0.2".parse().unwrap());
        assert!(check_loop(&route(rule)).is_err());
        let mut rule = Rule::new(Proto::Udp, "0.0.0.0".parse().unwrap(), 80, 80, 80);
        rule.target = Some("192.0.2.1".parse().unwrap());
        assert!(check_loop(&route(rule.clone())).is_ok());
        rule.target = None;
        rule.ifname = Some(IfName::new("eth0").unwrap());
        assert!(check_loop(&route(rule)).is_ok());
        // An IPv6-only listener is judged on the IPv6 default only.
        let mut targets = Targets::default();
        targets.set("2001:db8::1".parse().unwrap());
        let rule = Rule::new(Proto::Tcp, "::".parse().unwrap(), 80, 80, 80);
        assert!(check_loop(&Route::new(rule.clone(), targets)).is_ok());
        assert!(check_loop(&route(rule)).is_err());
    }
}
