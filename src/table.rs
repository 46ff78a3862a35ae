//! Rule tables: one per pif, validated rule by rule as upstream's
//! `fwd_rule_add()` does, plus the checks upstream leaves out.
//!
//! A [`Table`] only ever holds rules that passed [`Table::add`], so anything
//! holding one can rely on it: ports in range, no conflicts, within limits.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::owner::Owner;
use crate::rule::{Caps, Flags, PifId, Proto, Rule};

/// Most rules one pif's table may hold (version 3, announced in the hello):
/// room for a host with thousands of published ports.
pub const MAX_RULES: usize = 16384;
/// Most rules per pif in version 2's structures (upstream `MAX_FWD_RULES`):
/// what an upstream peer can take.
pub const MAX_RULES_V2: usize = 255;
/// Most listening sockets one pif's table may need (upstream `MAX_LISTEN_SOCKS`).
pub const MAX_SOCKETS: u32 = 65536 * 5;

/// Why a rule cannot go into a table. Each message names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// Listening port 0.
    #[error("rule {0}: listening port 0 cannot be forwarded")]
    PortZero(Rule),
    /// `first > last`.
    #[error("rule {rule}: invalid port range {first}-{last}", first = .0.first, last = .0.last, rule = .0)]
    BadRange(Rule),
    /// Target port 0, or a target range past 65535.
    #[error("rule {0}: target ports must be within 1-65535")]
    TargetRange(Rule),
    /// Flag bits this version does not know.
    #[error("rule {rule}: unknown flags 0x{bits:02x}", bits = .0.flags.unknown(), rule = .0)]
    UnknownFlags(Rule),
    /// Dual-stack flag on a specific address.
    #[error("rule {0}: dual-stack rule must listen on the wildcard address '::'")]
    DualStackAddress(Rule),
    /// Dual-stack rule on a pif without both families.
    #[error("rule {0}: dual-stack rule needs a pif with both IPv4 and IPv6")]
    DualStackCaps(Rule),
    /// Dual-stack rule with a target address (a target has one family).
    #[error("rule {0}: a dual-stack rule cannot have a target address")]
    DualStackTarget(Rule),
    /// An address family the pif does not have.
    #[error("rule {rule}: {family} is not enabled on this pif", rule = .0, family = if .0.addr.is_ipv4() { "IPv4" } else { "IPv6" })]
    FamilyDisabled(Rule),
    /// A protocol the pif does not forward.
    #[error("rule {rule}: {proto} is not enabled on this pif", rule = .0, proto = .0.proto)]
    ProtoDisabled(Rule),
    /// The scan flag on a pif that cannot scan.
    #[error("rule {0}: 'auto' (scan) is not available on this pif")]
    ScanDisabled(Rule),
    /// An interface name on a pif without `SO_BINDTODEVICE`.
    #[error("rule {0}: binding to an interface is not available on this pif")]
    IfnameDisabled(Rule),
    /// Listening on a multicast address.
    #[error("rule {0}: cannot listen on a multicast address")]
    MulticastListen(Rule),
    /// A multicast, broadcast or unspecified target address.
    #[error("rule {0}: target address must be a unicast address")]
    BadTarget(Rule),
    /// The new rule wants ports that an existing one has.
    #[error("rule {new} conflicts with existing rule {existing}{of}", of = OfOwner(.owner.as_ref()))]
    Conflict {
        /// The rule being added.
        new: Box<Rule>,
        /// The rule already in the table.
        existing: Box<Rule>,
        /// The owner of the rule already in the table, if it has one.
        owner: Option<Owner>,
    },
    /// More than [`MAX_RULES`] rules.
    #[error("too many rules (at most {max})", max = MAX_RULES)]
    TooManyRules,
    /// More than [`MAX_SOCKETS`] listening sockets.
    #[error("rule {0}: rules would need more than {max} listening sockets", max = MAX_SOCKETS)]
    TooManySockets(Rule),
    /// A delete named a rule that is not in the table.
    #[error("no rule {0} to delete")]
    NotFound(Rule),
    /// A delete named a rule that overlaps an existing one without matching it.
    #[error("rule {new} to delete overlaps {existing} but does not match it")]
    DeleteMismatch {
        /// The rule to delete.
        new: Box<Rule>,
        /// The rule in the table it overlaps.
        existing: Box<Rule>,
    },
}

impl RuleError {
    /// Whether the error comes from a size limit rather than the rule itself.
    pub fn is_limit(&self) -> bool {
        matches!(self, RuleError::TooManyRules | RuleError::TooManySockets(_))
    }
}

/// Checks one rule on its own against a pif's capabilities.
pub fn check_rule(rule: &Rule, caps: Caps) -> Result<(), RuleError> {
    let bad = |f: fn(Rule) -> RuleError| Err(f(rule.clone()));
    if rule.first > rule.last {
        return bad(RuleError::BadRange);
    }
    if rule.first == 0 {
        return bad(RuleError::PortZero);
    }
    if rule.to == 0 || rule.to_last().is_none() {
        return bad(RuleError::TargetRange);
    }
    if rule.flags.unknown() != 0 {
        return bad(RuleError::UnknownFlags);
    }
    if rule.is_dual_stack() {
        if rule.addr != IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) {
            return bad(RuleError::DualStackAddress);
        }
        if !caps.contains(Caps::IPV4 | Caps::IPV6) {
            return bad(RuleError::DualStackCaps);
        }
        if rule.target.is_some() {
            return bad(RuleError::DualStackTarget);
        }
    } else {
        let need = if rule.addr.is_ipv4() {
            Caps::IPV4
        } else {
            Caps::IPV6
        };
        if !caps.contains(need) {
            return bad(RuleError::FamilyDisabled);
        }
        if rule.addr.is_multicast() {
            return bad(RuleError::MulticastListen);
        }
    }
    let need = match rule.proto {
        Proto::Tcp => Caps::TCP,
        Proto::Udp => Caps::UDP,
    };
    if !caps.contains(need) {
        return bad(RuleError::ProtoDisabled);
    }
    if rule.flags.contains(Flags::SCAN) && !caps.contains(Caps::SCAN) {
        return bad(RuleError::ScanDisabled);
    }
    if rule.ifname.is_some() && !caps.contains(Caps::IFNAME) {
        return bad(RuleError::IfnameDisabled);
    }
    if let Some(t) = rule.target {
        let broadcast = matches!(t, IpAddr::V4(v4) if v4.is_broadcast());
        if t.is_multicast() || t.is_unspecified() || broadcast {
            return bad(RuleError::BadTarget);
        }
    }
    Ok(())
}

/// " of owner NAME" after a rule in a message, or nothing.
struct OfOwner<'a>(Option<&'a Owner>);

impl std::fmt::Display for OfOwner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(o) => write!(f, " of owner '{o}'"),
            None => Ok(()),
        }
    }
}

/// The rule table of one pif: its capabilities and its valid, conflict-free
/// rules, each with its owner, if it has one.
#[derive(Debug, Clone, Default)]
pub struct Table {
    caps: Caps,
    rules: Vec<Rule>,
    /// Beside `rules`, one for each.
    owners: Vec<Option<Owner>>,
    sockets: u32,
    /// Derived from `rules`: finds a conflict without looking at each rule.
    index: ConflictIndex,
}

/// Equal rules, owners and capabilities; the index follows from the rules.
impl PartialEq for Table {
    fn eq(&self, other: &Table) -> bool {
        self.caps == other.caps
            && self.sockets == other.sockets
            && self.rules == other.rules
            && self.owners == other.owners
    }
}

impl Eq for Table {}

impl Table {
    /// An empty table for a pif with these capabilities.
    pub fn new(caps: Caps) -> Table {
        Table {
            caps,
            rules: Vec::new(),
            owners: Vec::new(),
            sockets: 0,
            index: ConflictIndex::default(),
        }
    }

    /// A table holding `rules` with their owners, each validated in order as
    /// by [`Table::add_owned`]. On error, the index of the offending rule
    /// comes with it.
    pub fn with_owned_rules(
        caps: Caps,
        rules: impl IntoIterator<Item = (Rule, Option<Owner>)>,
    ) -> Result<Table, (usize, RuleError)> {
        let mut t = Table::new(caps);
        for (i, (r, o)) in rules.into_iter().enumerate() {
            t.add_owned(r, o).map_err(|e| (i, e))?;
        }
        Ok(t)
    }

    /// Each rule's owner, in the order of [`Table::rules`].
    pub fn owners(&self) -> &[Option<Owner>] {
        &self.owners
    }

    /// The rules with their owners.
    pub fn owned_rules(&self) -> impl Iterator<Item = (&Rule, Option<&Owner>)> + '_ {
        self.rules
            .iter()
            .zip(self.owners.iter().map(Option::as_ref))
    }

    /// A table holding `rules`, each validated in order as by [`Table::add`].
    /// On error, the index of the offending rule comes with it.
    pub fn with_rules(caps: Caps, rules: Vec<Rule>) -> Result<Table, (usize, RuleError)> {
        let mut t = Table::new(caps);
        t.rules.reserve(rules.len().min(MAX_RULES));
        t.owners.reserve(rules.len().min(MAX_RULES));
        for (i, r) in rules.into_iter().enumerate() {
            t.add(r).map_err(|e| (i, e))?;
        }
        Ok(t)
    }

    /// The pif's capabilities.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// The rules, in the order they were added.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Listening sockets the rules need: one per port per rule.
    pub fn socket_count(&self) -> u32 {
        self.sockets
    }

    /// Whether the table has no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Validates `rule` and appends it, with no owner.
    pub fn add(&mut self, rule: Rule) -> Result<(), RuleError> {
        self.add_owned(rule, None)
    }

    /// Validates `rule` and appends it, owned by `owner`.
    pub fn add_owned(&mut self, rule: Rule, owner: Option<Owner>) -> Result<(), RuleError> {
        check_rule(&rule, self.caps)?;
        if self.index.conflicts(&rule) {
            // Rare, and the end of a validation: the first conflicting rule
            // in table order, as upstream names it.
            let found = self.owned_rules().find(|(r, _)| r.conflicts(&rule));
            debug_assert!(found.is_some(), "index and rules disagree on {rule}");
            if let Some((existing, owner)) = found {
                return Err(RuleError::Conflict {
                    existing: Box::new(existing.clone()),
                    owner: owner.cloned(),
                    new: Box::new(rule),
                });
            }
        }
        if self.rules.len() >= MAX_RULES {
            return Err(RuleError::TooManyRules);
        }
        let sockets = self.sockets + rule.port_count();
        if sockets > MAX_SOCKETS {
            return Err(RuleError::TooManySockets(rule));
        }
        self.sockets = sockets;
        self.index.insert(&rule);
        self.rules.push(rule);
        self.owners.push(owner);
        Ok(())
    }

    /// Keeps only the rules (with their owners) for which `keep` is true,
    /// in their order. Removing rules never makes a conflict, so nothing is
    /// validated again.
    pub fn retain(&mut self, mut keep: impl FnMut(&Rule, Option<&Owner>) -> bool) {
        let rules = std::mem::take(&mut self.rules);
        let owners = std::mem::take(&mut self.owners);
        self.rules.reserve(rules.len());
        self.owners.reserve(owners.len());
        for (r, o) in rules.into_iter().zip(owners) {
            if keep(&r, o.as_ref()) {
                self.rules.push(r);
                self.owners.push(o);
            } else {
                self.sockets -= r.port_count();
                self.index.remove(&r);
            }
        }
    }

    /// Removes the rule equal to `rule`, keeping the order of the others.
    ///
    /// As upstream: a rule that overlaps `rule` without being equal to it is
    /// an error, and so is a missing rule.
    pub fn delete(&mut self, rule: &Rule) -> Result<(), RuleError> {
        for (i, r) in self.rules.iter().enumerate() {
            if r == rule {
                self.sockets -= r.port_count();
                self.index.remove(r);
                self.rules.remove(i);
                self.owners.remove(i);
                return Ok(());
            }
            if r.conflicts(rule) {
                return Err(RuleError::DeleteMismatch {
                    new: Box::new(rule.clone()),
                    existing: Box::new(r.clone()),
                });
            }
        }
        Err(RuleError::NotFound(rule.clone()))
    }

    /// Removes every rule.
    pub fn clear(&mut self) {
        self.rules.clear();
        self.owners.clear();
        self.sockets = 0;
        self.index = ConflictIndex::default();
    }
}

/// Where a rule listens, as far as conflicts go (see [`Rule::conflicts`]).
///
/// Two rules of one protocol and overlapping ports conflict exactly when
/// their addresses overlap: one is the dual-stack wildcard, or they are the
/// same address, or they are of one family and one of them is that family's
/// wildcard. So, by class:
///
/// - `Dual` overlaps every class;
/// - `Any(family)` overlaps `Dual`, `Any` of its family and every `Host` of
///   its family, not the other family;
/// - `Host(a)` overlaps `Dual`, `Any` of its family and `Host(a)` only.
///
/// Every two rules of one class overlap in address, so the rules of one
/// (protocol, class) in a table never share a port: their ranges, sorted by
/// first port, are sorted by last port too, and the only one that can
/// overlap `first..=last` is the last one starting at or before `last`. One
/// ordered-map lookup per class to ask. Hosts are many classes; a wildcard
/// asks each host of its family with rules in the table, one lookup each:
/// O(h log n) for h such addresses, which is one or a few in practice.
/// Interface names do not count, as upstream's check ignores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    /// The dual-stack wildcard: every address of both families.
    Dual,
    /// A family's wildcard (`true`: IPv4 `0.0.0.0`, `false`: IPv6 `::`).
    Any(bool),
    /// One address that is not a wildcard.
    Host(IpAddr),
}

impl Class {
    fn of(rule: &Rule) -> Class {
        match rule.match_addr() {
            None => Class::Dual,
            Some(a) if a.is_unspecified() => Class::Any(a.is_ipv4()),
            Some(a) => Class::Host(a),
        }
    }
}

/// The conflict index of a table: O(log n) to check, add or remove a rule,
/// so validating a table of n rules is O(n log n), not pairwise O(n²).
#[derive(Clone, Default)]
struct ConflictIndex {
    /// For each (protocol, class), the port ranges, first port to last.
    ranges: BTreeMap<(Proto, Class, u16), u16>,
    /// The host addresses that have rules, per protocol, with how many.
    hosts: BTreeMap<(Proto, IpAddr), usize>,
}

impl std::fmt::Debug for ConflictIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConflictIndex")
            .field("ranges", &self.ranges.len())
            .field("hosts", &self.hosts.len())
            .finish()
    }
}

impl ConflictIndex {
    /// Whether some rule of class `class` overlaps `rule`'s protocol and ports.
    fn class_overlaps(&self, rule: &Rule, class: Class) -> bool {
        let (p, first, last) = (rule.proto, rule.first, rule.last);
        self.ranges
            .range((p, class, 0)..=(p, class, last))
            .next_back()
            .is_some_and(|(_, &end)| end >= first)
    }

    /// Whether some host rule of a family overlaps `rule`'s protocol and ports.
    fn hosts_overlap(&self, rule: &Rule, v4: bool) -> bool {
        self.hosts
            .range((rule.proto, IpAddr::from([0u8; 4]))..)
            .take_while(|((p, _), _)| *p == rule.proto)
            .filter(|((_, a), _)| a.is_ipv4() == v4)
            .any(|((_, a), _)| self.class_overlaps(rule, Class::Host(*a)))
    }

    /// Whether `rule` conflicts with a rule of the table (see [`Class`]).
    fn conflicts(&self, rule: &Rule) -> bool {
        match Class::of(rule) {
            Class::Dual => {
                [Class::Dual, Class::Any(true), Class::Any(false)]
                    .into_iter()
                    .any(|c| self.class_overlaps(rule, c))
                    || self.hosts_overlap(rule, true)
                    || self.hosts_overlap(rule, false)
            }
            Class::Any(v4) => {
                self.class_overlaps(rule, Class::Dual)
                    || self.class_overlaps(rule, Class::Any(v4))
                    || self.hosts_overlap(rule, v4)
            }
            c @ Class::Host(a) => {
                self.class_overlaps(rule, Class::Dual)
                    || self.class_overlaps(rule, Class::Any(a.is_ipv4()))
                    || self.class_overlaps(rule, c)
            }
        }
    }

    /// Adds a rule that does not conflict.
    fn insert(&mut self, rule: &Rule) {
        let class = Class::of(rule);
        self.ranges
            .insert((rule.proto, class, rule.first), rule.last);
        if let Class::Host(a) = class {
            *self.hosts.entry((rule.proto, a)).or_insert(0) += 1;
        }
    }

    /// Removes a rule of the table.
    fn remove(&mut self, rule: &Rule) {
        let class = Class::of(rule);
        self.ranges.remove(&(rule.proto, class, rule.first));
        if let Class::Host(a) = class {
            if let Some(n) = self.hosts.get_mut(&(rule.proto, a)) {
                *n -= 1;
                if *n == 0 {
                    self.hosts.remove(&(rule.proto, a));
                }
            }
        }
    }
}

/// Longest pif name on the wire, NUL included (upstream `PIF_NAME_SIZE`).
pub const PIF_NAME_SIZE: usize = 128;

/// A pif with its table, as the server lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PifTable {
    /// Pif id.
    pub id: PifId,
    /// Pif name, e.g. `HOST`.
    pub name: String,
    /// The rules.
    pub table: Table,
}

/// Each pif's id with its rules and their owners, in order.
pub type OwnedTables = Vec<(PifId, Vec<(Rule, Option<Owner>)>)>;

/// Every pif's table: what a listing carries and an update changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// The pifs in the order the server lists them.
    pub pifs: Vec<PifTable>,
}

impl Config {
    /// The pif with this name.
    pub fn by_name(&self, name: &str) -> Option<&PifTable> {
        self.pifs.iter().find(|p| p.name == name)
    }

    /// The pif with this name, to change.
    pub fn by_name_mut(&mut self, name: &str) -> Option<&mut PifTable> {
        self.pifs.iter_mut().find(|p| p.name == name)
    }

    /// The pif with this id.
    pub fn by_id(&self, id: PifId) -> Option<&PifTable> {
        self.pifs.iter().find(|p| p.id == id)
    }

    /// The pif with this id, to change.
    pub fn by_id_mut(&mut self, id: PifId) -> Option<&mut PifTable> {
        self.pifs.iter_mut().find(|p| p.id == id)
    }

    /// Each pif's id with its rules and their owners, in order: what a
    /// state file or an export writes.
    pub fn owned_tables(&self) -> OwnedTables {
        self.pifs
            .iter()
            .map(|p| {
                let rules = p
                    .table
                    .owned_rules()
                    .map(|(r, o)| (r.clone(), o.cloned()))
                    .collect();
                (p.id, rules)
            })
            .collect()
    }
}

/// Upstream pesto's layout: each pif's name indented by two spaces, then
/// its rules by four, one per line.
impl std::fmt::Display for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for pif in &self.pifs {
            writeln!(f, "  {}", pif.name)?;
            for (rule, owner) in pif.table.owned_rules() {
                match owner {
                    // Upstream's line, then the owner.
                    Some(o) => writeln!(f, "    {rule} owner {o}")?,
                    None => writeln!(f, "    {rule}")?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::IfName;

    const ALL: Caps = Caps::from_bits_retain(0x3f);

    fn tcp(addr: &str, first: u16, last: u16, to: u16) -> Rule {
        Rule::new(Proto::Tcp, addr.parse().unwrap(), first, last, to)
    }

    #[test]
    fn accepts_plain_rules() {
        let mut t = Table::new(ALL);
        t.add(Rule::dual_stack(Proto::Tcp, 22, 22, 22)).unwrap();
        t.add(tcp("127.0.0.1", 80, 90, 8080)).unwrap();
        t.add(Rule::dual_stack(Proto::Udp, 22, 22, 22)).unwrap();
        assert_eq!(t.rules().len(), 3);
        assert_eq!(t.socket_count(), 13);
    }

    #[test]
    fn rejects_each_bad_rule() {
        let caps4 = Caps::IPV4 | Caps::TCP;
        type Case = (Rule, Caps, fn(&RuleError) -> bool);
        let cases: Vec<Case> = vec![
            (tcp("127.0.0.1", 0, 1, 1), ALL, |e| {
                matches!(e, RuleError::PortZero(_))
            }),
            (tcp("127.0.0.1", 5, 4, 1), ALL, |e| {
                matches!(e, RuleError::BadRange(_))
            }),
            (tcp("127.0.0.1", 5, 5, 0), ALL, |e| {
                matches!(e, RuleError::TargetRange(_))
            }),
            (tcp("127.0.0.1", 5, 10, 65535), ALL, |e| {
                matches!(e, RuleError::TargetRange(_))
            }),
            (
                {
                    let mut r = tcp("127.0.0.1", 5, 5, 5);
                    r.flags = Flags::from_bits_retain(8);
                    r
                },
                ALL,
                |e| matches!(e, RuleError::UnknownFlags(_)),
            ),
            (
                {
                    let mut r = tcp("::1", 5, 5, 5);
                    r.flags = Flags::DUAL_STACK_ANY;
                    r
                },
                ALL,
                |e| matches!(e, RuleError::DualStackAddress(_)),
            ),
            (Rule::dual_stack(Proto::Tcp, 5, 5, 5), caps4, |e| {
                matches!(e, RuleError::DualStackCaps(_))
            }),
            (
                {
                    let mut r = Rule::dual_stack(Proto::Tcp, 5, 5, 5);
                    r.target = Some("192.0.2.1".parse().unwrap());
                    r
                },
                ALL,
                |e| matches!(e, RuleError::DualStackTarget(_)),
            ),
            (tcp("::1", 5, 5, 5), caps4, |e| {
                matches!(e, RuleError::FamilyDisabled(_))
            }),
            (
                Rule::new(Proto::Udp, "127.0.0.1".parse().unwrap(), 5, 5, 5),
                caps4,
                |e| matches!(e, RuleError::ProtoDisabled(_)),
            ),
            (
                {
                    let mut r = tcp("127.0.0.1", 5, 5, 5);
                    r.flags = Flags::SCAN;
                    r
                },
                caps4,
                |e| matches!(e, RuleError::ScanDisabled(_)),
            ),
            (
                {
                    let mut r = tcp("127.0.0.1", 5, 5, 5);
                    r.ifname = Some(IfName::new("lo").unwrap());
                    r
                },
                caps4,
                |e| matches!(e, RuleError::IfnameDisabled(_)),
            ),
            (tcp("224.0.0.1", 5, 5, 5), ALL, |e| {
                matches!(e, RuleError::MulticastListen(_))
            }),
            (
                {
                    let mut r = tcp("127.0.0.1", 5, 5, 5);
                    r.target = Some("224.0.0.1".parse().unwrap());
                    r
                },
                ALL,
                |e| matches!(e, RuleError::BadTarget(_)),
            ),
        ];
        for (rule, caps, is) in cases {
            let mut t = Table::new(caps);
            let err = t.add(rule.clone()).expect_err(&rule.to_string());
            assert!(is(&err), "{rule}: unexpected {err:?}");
            assert!(t.is_empty());
            // Every error must read as a sentence naming the rule.
            assert!(err.to_string().contains(&rule.to_string()), "{err}");
        }
    }

    #[test]
    fn conflict_names_both_rules() {
        let mut t = Table::new(ALL);
        t.add(tcp("0.0.0.0", 10, 20, 10)).unwrap();
        let err = t.add(tcp("127.0.0.1", 20, 25, 20)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("TCP [127.0.0.1]:20-25") && msg.contains("TCP [0.0.0.0]:10-20"));
        // Other family's wildcard does not conflict.
        t.add(tcp("::", 10, 20, 10)).unwrap();
        // Dual-stack conflicts with both.
        assert!(t.add(Rule::dual_stack(Proto::Tcp, 15, 15, 15)).is_err());
    }

    #[test]
    fn limits() {
        let mut t = Table::new(ALL);
        for p in 1..=MAX_RULES as u16 {
            t.add(tcp("127.0.0.1", p, p, p)).unwrap();
        }
        assert_eq!(
            t.add(tcp("127.0.0.1", 60000, 60000, 60000)),
            Err(RuleError::TooManyRules)
        );
        let mut t = Table::new(ALL);
        for a in 1..=5 {
            t.add(tcp(&format!("127.0.0.{a}"), 1, 65535, 1)).unwrap();
        }
        assert_eq!(t.socket_count(), MAX_SOCKETS - 5);
        let err = t.add(tcp("127.0.0.9", 1, 6, 1)).unwrap_err();
        assert!(matches!(err, RuleError::TooManySockets(_)) && err.is_limit());
    }

    #[test]
    fn delete_matches_exactly() {
        let mut t = Table::new(ALL);
        t.add(tcp("127.0.0.1", 10, 20, 10)).unwrap();
        t.add(tcp("127.0.0.1", 30, 30, 30)).unwrap();
        assert!(matches!(
            t.delete(&tcp("127.0.0.1", 10, 15, 10)),
            Err(RuleError::DeleteMismatch { .. })
        ));
        assert!(matches!(
            t.delete(&tcp("127.0.0.1", 40, 40, 40)),
            Err(RuleError::NotFound(_))
        ));
        t.delete(&tcp("127.0.0.1", 10, 20, 10)).unwrap();
        assert_eq!(t.rules(), &[tcp("127.0.0.1", 30, 30, 30)]);
        assert_eq!(t.socket_count(), 1);
    }
}
