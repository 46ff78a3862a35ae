//! Scopes: the complete rule set of one owner on one pif, the unit a tenant
//! changes. Pure functions over tables, without sockets: the server builds
//! a scoped transaction's new table with them, at validation and again at
//! apply, from whatever the other owners have then.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::lease::Lease;
use crate::owner::Owner;
use crate::rule::{PifId, Rule};
use crate::table::{RuleError, Table};

/// A scope's new rules, as a client proposes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeUpdate {
    /// The pif.
    pub pif: PifId,
    /// The owner.
    pub owner: Owner,
    /// The scope's generation the client read (0: the owner had no rules
    /// there). The update is STALE if the scope changed since.
    pub generation: u64,
    /// The owner's complete rule set on the pif after the transaction.
    pub rules: Vec<Rule>,
    /// A new lease for the owner's rules; `None` keeps the one it has (and
    /// renews a TTL).
    pub lease: Option<Lease>,
}

/// The rules `owner` has in `table`, in table order.
pub fn rules_of(table: &Table, owner: &Owner) -> Vec<Rule> {
    table
        .owned_rules()
        .filter(|(_, o)| *o == Some(owner))
        .map(|(r, _)| r.clone())
        .collect()
}

/// `table` with `owner`'s rules replaced by `rules`.
///
/// The owner's rules that stay keep their places, its others go, and its new
/// ones follow at the end; every other rule stays as it is. A table whose
/// owner already has exactly `rules` comes back equal, so a repeated
/// declaration changes nothing. On error, the index into `rules` of the
/// rule at fault (a conflict names the other rule and its owner).
pub fn replace(table: &Table, owner: &Owner, rules: &[Rule]) -> Result<Table, (usize, RuleError)> {
    replace_in(table.clone(), owner, rules)
}

/// [`replace`] in a table the caller no longer needs: no copy of it.
pub fn replace_in(
    mut new: Table,
    owner: &Owner,
    rules: &[Rule],
) -> Result<Table, (usize, RuleError)> {
    // Each rule's first place in `rules`.
    let mut index: HashMap<&Rule, usize> = HashMap::with_capacity(rules.len());
    for (i, r) in rules.iter().enumerate() {
        index.entry(r).or_insert(i);
    }
    // A rule given twice: the second is a conflict with the first.
    if let Some(dup) =
        (0..rules.len()).find(|i| rules.get(*i).and_then(|r| index.get(r)) != Some(i))
    {
        let rule = rules.get(dup).cloned();
        if let Some(rule) = rule {
            return Err((
                dup,
                RuleError::Conflict {
                    new: Box::new(rule.clone()),
                    existing: Box::new(rule),
                    owner: Some(owner.clone()),
                },
            ));
        }
    }
    // Changed in place rather than built again: the rules that stay were
    // valid together and stay so, and only the owner's new ones are
    // checked, each in O(log n). The result and its errors are those of
    // validating the whole new table in order: the same rules come before
    // each new one.
    let mut kept: HashSet<usize> = HashSet::new();
    new.retain(|r, o| o != Some(owner) || index.get(r).is_some_and(|&i| kept.insert(i)));
    for (i, r) in rules.iter().enumerate() {
        if !kept.contains(&i) {
            new.add_owned(r.clone(), Some(owner.clone()))
                .map_err(|e| (i, e))?;
        }
    }
    Ok(new)
}

/// `table` with the rule sets of several owners put back to `old`: every
/// one of their current rules taken out first, then the old ones added.
/// Done owner by owner instead, a rule that moved from one owner to another
/// would conflict with itself on the way back. On error, the owner whose
/// rules no longer fit, with the error.
pub fn restore(mut table: Table, old: &[(&Owner, &[Rule])]) -> Result<Table, (Owner, RuleError)> {
    for (owner, _) in old {
        table.retain(|_, o| o != Some(*owner));
    }
    for (owner, rules) in old {
        table = replace_in(table, owner, rules).map_err(|(_, e)| ((*owner).clone(), e))?;
    }
    Ok(table)
}

/// The owners whose rule sets differ between two tables of one pif: their
/// scopes' generations move.
pub fn changed_owners(old: &Table, new: &Table) -> BTreeSet<Owner> {
    // A rule is in a table at most once (it conflicts with itself), so an
    // owner's set changed exactly when one of its (rule, owner) pairs is in
    // one table only. Walking both in order, a pair that is in one table
    // only is never matched: the owners of the pairs passed over are a
    // superset of the changed ones, found with comparisons, no hashing. A
    // scoped change (rules gone, rules added at the end) passes over just
    // those. Only these candidates are then compared as sets.
    let (a, b) = (old.rules(), new.rules());
    let (ao, bo) = (old.owners(), new.owners());
    let mut candidates: BTreeSet<&Owner> = BTreeSet::new();
    let (mut i, mut j) = (0, 0);
    while let (Some(r), Some(s)) = (a.get(i), b.get(j)) {
        let (o, p) = (
            ao.get(i).and_then(Option::as_ref),
            bo.get(j).and_then(Option::as_ref),
        );
        if r == s && o == p {
            j += 1;
        } else if let Some(o) = o {
            candidates.insert(o);
        }
        i += 1;
    }
    candidates.extend(ao.get(i..).unwrap_or_default().iter().flatten());
    candidates.extend(bo.get(j..).unwrap_or_default().iter().flatten());
    if candidates.is_empty() {
        return BTreeSet::new();
    }
    fn sets<'t>(t: &'t Table, only: &BTreeSet<&Owner>) -> HashMap<&'t Owner, HashSet<&'t Rule>> {
        let mut m: HashMap<&Owner, HashSet<&Rule>> = HashMap::new();
        for (r, o) in t.owned_rules() {
            if let Some(o) = o.filter(|o| only.contains(o)) {
                m.entry(o).or_default().insert(r);
            }
        }
        m
    }
    let (sa, sb) = (sets(old, &candidates), sets(new, &candidates));
    candidates
        .into_iter()
        .filter(|o| sa.get(o) != sb.get(o))
        .cloned()
        .collect()
}

/// Owners for a whole-table update from a client that sends none: a rule
/// identical to one in `current` keeps that rule's owner, the others have
/// none. So an owner-unaware client that adds one rule does not strip every
/// tenant of its rules.
pub fn carry_owners(current: &Table, rules: Vec<Rule>) -> Vec<(Rule, Option<Owner>)> {
    let owners: HashMap<&Rule, &Owner> = current
        .owned_rules()
        .filter_map(|(r, o)| o.map(|o| (r, o)))
        .collect();
    rules
        .into_iter()
        .map(|r| {
            let o = owners.get(&r).map(|o| (*o).clone());
            (r, o)
        })
        .collect()
}

/// The owners of a table with their rule counts, by name.
pub fn owners(table: &Table) -> std::collections::BTreeMap<Owner, usize> {
    let mut m = std::collections::BTreeMap::new();
    for o in table.owners().iter().flatten() {
        *m.entry(o.clone()).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::{Caps, Proto};

    fn caps() -> Caps {
        Caps::from_bits_retain(0x2f)
    }

    fn tcp(port: u16) -> Rule {
        Rule::new(Proto::Tcp, "127.0.0.1".parse().unwrap(), port, port, port)
    }

    fn owner(s: &str) -> Owner {
        Owner::new(s).unwrap()
    }

    fn table(rules: &[(u16, Option<&str>)]) -> Table {
        Table::with_owned_rules(caps(), rules.iter().map(|(p, o)| (tcp(*p), o.map(owner)))).unwrap()
    }

    #[test]
    fn restoring_puts_a_moved_rule_back_with_its_owner() {
        // One transaction moved port 1 from a to b; its undo must not trip
        // over the rule on the way back.
        let moved = table(&[(1, Some("b")), (2, None)]);
        let (a, b) = (owner("a"), owner("b"));
        let back = restore(moved, &[(&a, &[tcp(1)][..]), (&b, &[][..])]).unwrap();
        let got: Vec<(u16, Option<&str>)> = back
            .owned_rules()
            .map(|(r, o)| (r.first, o.map(Owner::as_str)))
            .collect();
        assert_eq!(got, [(2, None), (1, Some("a"))]);
    }

    #[test]
    fn replacing_a_scope_keeps_the_others_and_the_places_that_stay() {
        let t = table(&[(1, Some("a")), (2, Some("b")), (3, Some("a")), (4, None)]);
        let new = replace(&t, &owner("a"), &[tcp(5), tcp(3)]).unwrap();
        let got: Vec<(u16, Option<&str>)> = new
            .owned_rules()
            .map(|(r, o)| (r.first, o.map(Owner::as_str)))
            .collect();
        assert_eq!(
            got,
            [(2, Some("b")), (3, Some("a")), (4, None), (5, Some("a"))]
        );
        assert_eq!(changed_owners(&t, &new), BTreeSet::from([owner("a")]));
    }

    #[test]
    fn the_same_set_again_changes_nothing() {
        let t = table(&[(1, Some("a")), (2, Some("b")), (3, Some("a"))]);
        let again = replace(&t, &owner("a"), &[tcp(3), tcp(1)]).unwrap();
        assert_eq!(again, t);
        assert!(changed_owners(&t, &again).is_empty());
        // Releasing: an empty set.
        let gone = replace(&t, &owner("a"), &[]).unwrap();
        assert_eq!(rules_of(&gone, &owner("a")), []);
        assert_eq!(rules_of(&gone, &owner("b")), [tcp(2)]);
    }

    #[test]
    fn a_conflict_names_the_other_owner_and_the_index() {
        let t = table(&[(1, Some("a")), (2, Some("b"))]);
        let (i, e) = replace(&t, &owner("a"), &[tcp(7), tcp(2)]).unwrap_err();
        assert_eq!(i, 1);
        assert!(e.to_string().contains("of owner 'b'"), "{e}");
        let (i, _) = replace(&t, &owner("a"), &[tcp(7), tcp(8), tcp(7)]).unwrap_err();
        assert_eq!(i, 2);
    }

    #[test]
    fn unaware_whole_table_updates_keep_owners_of_identical_rules() {
        let t = table(&[(1, Some("a")), (2, None)]);
        let carried = carry_owners(&t, vec![tcp(2), tcp(1), tcp(9)]);
        let owners: Vec<Option<&str>> = carried
            .iter()
            .map(|(_, o)| o.as_ref().map(Owner::as_str))
            .collect();
        assert_eq!(owners, [None, Some("a"), None]);
        assert_eq!(scope_counts(&t), [("a".to_owned(), 1)]);
    }

    fn scope_counts(t: &Table) -> Vec<(String, usize)> {
        owners(t)
            .into_iter()
            .map(|(o, n)| (o.to_string(), n))
            .collect()
    }
}
