//! Conflict detection by index against the pairwise definition it replaced
//! (`Rule::conflicts` with every rule of the table, in order), on random
//! tables of both families, wildcards, dual-stack rules and interface
//! names; and a scope replaced in place against the table built again.

use std::net::IpAddr;

use pesto::owner::Owner;
use pesto::rule::{Caps, Flags, IfName, Proto, Rule};
use pesto::scope;
use pesto::table::{MAX_RULES, MAX_SOCKETS, RuleError, Table, check_rule};
use proptest::prelude::*;

const ALL: Caps = Caps::from_bits_retain(0x3f);

/// The table as it was validated before the index: a list and a scan.
#[derive(Default)]
struct Pairwise {
    rules: Vec<(Rule, Option<Owner>)>,
    sockets: u32,
}

impl Pairwise {
    fn add(&mut self, rule: Rule, owner: Option<Owner>) -> Result<(), RuleError> {
        check_rule(&rule, ALL)?;
        if let Some((existing, o)) = self.rules.iter().find(|(r, _)| r.conflicts(&rule)) {
            return Err(RuleError::Conflict {
                new: Box::new(rule),
                existing: Box::new(existing.clone()),
                owner: o.clone(),
            });
        }
        if self.rules.len() >= MAX_RULES {
            return Err(RuleError::TooManyRules);
        }
        if self.sockets + rule.port_count() > MAX_SOCKETS {
            return Err(RuleError::TooManySockets(rule));
        }
        self.sockets += rule.port_count();
        self.rules.push((rule, owner));
        Ok(())
    }

    fn delete(&mut self, rule: &Rule) -> Result<(), RuleError> {
        for (i, (r, _)) in self.rules.iter().enumerate() {
            if r == rule {
                self.sockets -= r.port_count();
                self.rules.remove(i);
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
}

/// Few addresses, so that rules meet: wildcards of both families, the
/// dual-stack wildcard, hosts of both families, an IPv4-mapped IPv6 one.
fn addr() -> impl Strategy<Value = (IpAddr, bool)> {
    let a = |s: &str| s.parse::<IpAddr>().unwrap();
    prop_oneof![
        Just((a("::"), true)),
        Just((a("::"), false)),
        Just((a("0.0.0.0"), false)),
        Just((a("127.0.0.1"), false)),
        Just((a("127.0.0.2"), false)),
        Just((a("10.1.2.3"), false)),
        Just((a("::1"), false)),
        Just((a("2001:db8::1"), false)),
        Just((a("::ffff:127.0.0.1"), false)),
    ]
}

prop_compose! {
    fn rule()(
        (addr, dual) in addr(),
        ifname in proptest::option::of(prop_oneof![Just("lo"), Just("eth0")]),
        first in 1u16..80,
        len in prop_oneof![4 => 0u16..6, 1 => 0u16..200],
        udp in any::<bool>(),
    ) -> Rule {
        let proto = if udp { Proto::Udp } else { Proto::Tcp };
        let mut r = Rule::new(proto, addr, first, first + len, 1000 + first);
        if dual {
            r.flags |= Flags::DUAL_STACK_ANY;
        }
        r.ifname = ifname.map(|n| IfName::new(n).unwrap());
        r
    }
}

fn owner() -> impl Strategy<Value = Option<Owner>> {
    proptest::option::of(prop_oneof![Just("a"), Just("b"), Just("c")])
        .prop_map(|o| o.map(|o| Owner::new(o).unwrap()))
}

#[derive(Debug, Clone)]
enum Op {
    Add(Rule, Option<Owner>),
    /// Deletes the rule, or the n-th rule of the table if there is one.
    Delete(Rule, usize),
    /// Drops every rule of an owner.
    Release(Option<Owner>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (rule(), owner()).prop_map(|(r, o)| Op::Add(r, o)),
        2 => (rule(), 0usize..40).prop_map(|(r, i)| Op::Delete(r, i)),
        1 => owner().prop_map(Op::Release),
    ]
}

fn listed(t: &Table) -> Vec<(Rule, Option<Owner>)> {
    t.owned_rules()
        .map(|(r, o)| (r.clone(), o.cloned()))
        .collect()
}

/// The old `scope::replace`: the whole new table, validated from scratch.
fn replace_again(t: &Table, owner: &Owner, rules: &[Rule]) -> Result<Table, (usize, RuleError)> {
    let mut entries: Vec<(Rule, Option<Owner>, usize)> = Vec::new();
    let mut kept = Vec::new();
    for (r, o) in t.owned_rules() {
        if o != Some(owner) {
            entries.push((r.clone(), o.cloned(), 0));
        } else if let Some(i) = rules.iter().position(|x| x == r) {
            kept.push(i);
            entries.push((r.clone(), Some(owner.clone()), i));
        }
    }
    for (i, r) in rules.iter().enumerate() {
        if let Some(first) = rules.iter().position(|x| x == r).filter(|f| *f != i) {
            let _ = first;
            return Err((
                i,
                RuleError::Conflict {
                    new: Box::new(r.clone()),
                    existing: Box::new(r.clone()),
                    owner: Some(owner.clone()),
                },
            ));
        }
    }
    for (i, r) in rules.iter().enumerate() {
        if !kept.contains(&i) {
            entries.push((r.clone(), Some(owner.clone()), i));
        }
    }
    let origins: Vec<usize> = entries.iter().map(|e| e.2).collect();
    Table::with_owned_rules(ALL, entries.into_iter().map(|(r, o, _)| (r, o)))
        .map_err(|(at, e)| (origins[at], e))
}

/// The owners whose sets differ, by the definition: every owner's set of
/// rules in each table.
fn changed_by_sets(old: &Table, new: &Table) -> std::collections::BTreeSet<Owner> {
    use std::collections::{BTreeMap, BTreeSet};
    let sets = |t: &Table| {
        let mut m: BTreeMap<Owner, BTreeSet<String>> = BTreeMap::new();
        for (r, o) in t.owned_rules() {
            if let Some(o) = o {
                m.entry(o.clone()).or_default().insert(format!("{r:?}"));
            }
        }
        m
    };
    let (a, b) = (sets(old), sets(new));
    a.keys()
        .chain(b.keys())
        .filter(|o| a.get(*o) != b.get(*o))
        .cloned()
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The owners a swap moves: by an ordered walk and a check of the few
    /// it passes over, the same as comparing every owner's set; for scoped
    /// changes, and for whole tables in another order.
    #[test]
    fn changed_owners_agrees_with_sets(
        base in proptest::collection::vec((rule(), owner()), 0..60),
        new in proptest::collection::vec(rule(), 0..4),
        shuffle in proptest::collection::vec(any::<prop::sample::Index>(), 0..60),
        who in prop_oneof![Just("a"), Just("b")],
    ) {
        let mut t = Table::new(ALL);
        for (r, o) in base {
            let _ = t.add_owned(r, o);
        }
        let who = Owner::new(who).unwrap();
        if let Ok(n) = scope::replace(&t, &who, &new) {
            prop_assert_eq!(scope::changed_owners(&t, &n), changed_by_sets(&t, &n));
        }
        // Some rules, some twice over, in another order, owners kept.
        let mut picked: Vec<(Rule, Option<Owner>)> = Vec::new();
        let all = listed(&t);
        if !all.is_empty() {
            for ix in shuffle {
                let e = ix.get(&all).clone();
                if !picked.contains(&e) {
                    picked.push(e);
                }
            }
        }
        let n = Table::with_owned_rules(ALL, picked).unwrap();
        prop_assert_eq!(scope::changed_owners(&t, &n), changed_by_sets(&t, &n));
        prop_assert_eq!(scope::changed_owners(&n, &t), changed_by_sets(&n, &t));
    }

    /// Every add, delete and release gives what the pairwise check gave,
    /// errors (and the rule and owner they name) included.
    #[test]
    fn index_agrees_with_pairwise(ops in proptest::collection::vec(op(), 0..120)) {
        let mut t = Table::new(ALL);
        let mut m = Pairwise::default();
        for op in ops {
            match op {
                Op::Add(r, o) => {
                    prop_assert_eq!(t.add_owned(r.clone(), o.clone()), m.add(r, o));
                }
                Op::Delete(r, i) => {
                    let r = t.rules().get(i).cloned().unwrap_or(r);
                    prop_assert_eq!(t.delete(&r), m.delete(&r));
                }
                Op::Release(o) => {
                    t.retain(|_, x| x != o.as_ref());
                    m.rules.retain(|(r, x)| {
                        let keep = x != &o;
                        if !keep {
                            m.sockets -= r.port_count();
                        }
                        keep
                    });
                }
            }
            prop_assert_eq!(listed(&t), m.rules.clone());
            prop_assert_eq!(t.socket_count(), m.sockets);
        }
        // Built in one go, the same table.
        let again = Table::with_owned_rules(ALL, listed(&t)).unwrap();
        prop_assert_eq!(&again, &t);
    }

    /// A table built from random rules, in one go, refuses the same rule
    /// with the same error as the pairwise check.
    #[test]
    fn with_rules_agrees_with_pairwise(rules in proptest::collection::vec(rule(), 0..150)) {
        let mut m = Pairwise::default();
        let want = rules
            .iter()
            .enumerate()
            .try_for_each(|(i, r)| m.add(r.clone(), None).map_err(|e| (i, e)));
        match (Table::with_rules(ALL, rules), want) {
            (Ok(t), Ok(())) => prop_assert_eq!(listed(&t), m.rules),
            (Err(got), Err(want)) => prop_assert_eq!(got, want),
            (got, want) => prop_assert!(false, "index {:?}, pairwise {:?}", got, want),
        }
    }

    /// A scope replaced in place is the table validated again from scratch,
    /// with the same errors.
    #[test]
    fn replace_in_place_agrees_with_rebuilding(
        base in proptest::collection::vec((rule(), owner()), 0..60),
        new in proptest::collection::vec(rule(), 0..8),
        who in prop_oneof![Just("a"), Just("b")],
    ) {
        let mut t = Table::new(ALL);
        for (r, o) in base {
            let _ = t.add_owned(r, o);
        }
        let who = Owner::new(who).unwrap();
        // Also the owner's own rules, some kept, in another order.
        let mut rules: Vec<Rule> = scope::rules_of(&t, &who).into_iter().rev().step_by(2).collect();
        rules.extend(new);
        prop_assert_eq!(scope::replace(&t, &who, &rules), replace_again(&t, &who, &rules));
    }
}

/// Many hosts on one port, then a wildcard: found through the per-port
/// counts of every host of the family, and gone once the hosts go.
#[test]
fn a_wildcard_meets_any_host_of_its_family() {
    let mut t = Table::new(ALL);
    for i in 1..=200u8 {
        let a: IpAddr = format!("127.0.0.{i}").parse().unwrap();
        t.add(Rule::new(Proto::Udp, a, 5000, 5000, 6000)).unwrap();
    }
    let any4 = Rule::new(Proto::Udp, "0.0.0.0".parse().unwrap(), 4990, 5010, 4990);
    let any6 = Rule::new(Proto::Udp, "::".parse().unwrap(), 4990, 5010, 4990);
    let dual = Rule::dual_stack(Proto::Udp, 5000, 5000, 5001);
    assert!(matches!(
        t.clone().add(any4.clone()),
        Err(RuleError::Conflict { .. })
    ));
    assert!(matches!(
        t.clone().add(dual.clone()),
        Err(RuleError::Conflict { .. })
    ));
    t.clone().add(any6).unwrap();
    t.retain(|r, _| r.addr != "127.0.0.7".parse::<IpAddr>().unwrap());
    assert!(t.clone().add(any4.clone()).is_err());
    t.retain(|_, _| false);
    t.add(any4).unwrap();
    t.add(Rule::new(Proto::Udp, "::1".parse().unwrap(), 5000, 5000, 1))
        .unwrap();
    assert!(t.add(dual).is_err());
}
