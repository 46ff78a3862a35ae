//! The sequential table operations of upstream `pesto`, as a pure function
//! on a [`Config`]: `-A`, `-D`, `-C PIF` and the port specs, in order.
//!
//! Rules of the game (upstream pesto(1), NOTES): a spec given while neither
//! `-A` nor `-D` is in force replaces its pif's table, which is cleared the
//! first time such a spec names it; `-A` makes the following specs add,
//! `-D` makes them delete; `-C PIF` clears a table at that point.
//! `-t`/`-u` edit the HOST pif's table, `-T`/`-U` SPLICE's.

use std::collections::BTreeSet;

use crate::owner::Owner;
use crate::rule::PifId;
use crate::scope::{self, ScopeUpdate};
use crate::spec::{Ephemeral, PortSpec, SpecError, SpecOpt};
use crate::table::{Config, RuleError, Table};

pub use crate::rule::{HOST_NAME, SPLICE_NAME};

/// One command-line operation, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `-A`: following specs add rules.
    Add,
    /// `-D`: following specs delete rules.
    Delete,
    /// `-C PIF`: clear that pif's table now.
    Clear(String),
    /// `-t`/`-u`/`-T`/`-U SPEC`.
    Spec(SpecOpt, String),
}

/// Why a sequence of operations cannot be applied. Nothing is applied then.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    /// A spec that does not parse or does not fit the pif.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// `-C` with a pif the server does not have.
    #[error("unknown pif '{0}' for -C (the server has: {1})")]
    UnknownPif(String, String),
    /// A spec for a pif the server does not have.
    #[error("cannot use {0}: the server has no {1} pif")]
    NoPif(SpecOpt, &'static str),
    /// `none` after rules of that protocol were given.
    #[error("'{0} none' conflicts with earlier rules of the same protocol")]
    NoneConflict(SpecOpt),
    /// The server listed a table that does not validate.
    #[error("the server listed an invalid table for {0}: {1}")]
    Listing(String, RuleError),
    /// A delete with `--owner` named another owner's rule.
    #[error("rule {rule} belongs to owner '{owner}', not to this owner")]
    NotYours {
        /// The rule.
        rule: Box<crate::rule::Rule>,
        /// Its owner.
        owner: Owner,
    },
    /// The owner's new rules do not fit beside the other owners'.
    #[error("{pif}: {error}")]
    Owned {
        /// The pif.
        pif: String,
        /// Why, naming the other rule and its owner.
        error: RuleError,
    },
    /// A rule of the spec cannot be added or deleted.
    #[error("cannot {verb} '{opt} {spec}': {error}", verb = if *.delete { "delete" } else { "add" })]
    Rule {
        /// The option.
        opt: SpecOpt,
        /// The spec text.
        spec: String,
        /// Whether it was a delete.
        delete: bool,
        /// What the table said.
        error: RuleError,
    },
}

#[derive(PartialEq)]
enum Mode {
    Replace,
    Add,
    Delete,
}

/// Applies `ops` to `config` in order and returns the pifs they touched (those
/// whose table the client must send). On error `config` is unchanged.
pub fn apply(
    config: &mut Config,
    ops: &[Op],
    eph: Ephemeral,
) -> Result<BTreeSet<PifId>, EditError> {
    apply_with(config, ops, eph, false)
}

/// What `--owner` does besides the operations: nothing more, declare the
/// owner's whole set (`--set`), or remove it (`--release`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerMode {
    /// `-A`, `-D`, `-C` and specs on the owner's rules only.
    Edit,
    /// The specs are the owner's complete rule set, on every pif.
    Set,
    /// The owner has no rules after this.
    Release,
}

/// The operations of `--owner NAME`: `ops` applied to `owner`'s rules only,
/// every other owner's rules as they are. Returns the scopes that change,
/// each with the generation it was listed with (`generation(pif)`); none
/// if the owner already has what the operations ask for.
///
/// Unlike upstream's `-A`, adding a rule the owner already has is not an
/// error but nothing: a restarted container may declare again what it had.
/// Deleting another owner's rule is an error that names that owner, and so
/// is adding one that conflicts with it.
pub fn apply_owned(
    config: &Config,
    owner: &Owner,
    mode: OwnerMode,
    ops: &[Op],
    eph: Ephemeral,
    generation: impl Fn(PifId) -> u64,
) -> Result<Vec<ScopeUpdate>, EditError> {
    // The owner's own view: a table per pif with only its rules.
    let mut view = config.clone();
    for p in &mut view.pifs {
        let mine = scope::rules_of(&p.table, owner);
        p.table = Table::with_rules(p.table.caps(), mine)
            .map_err(|(_, error)| EditError::Listing(p.name.clone(), error))?;
    }
    let mut ops = ops.to_vec();
    if mode != OwnerMode::Edit {
        let clear = view.pifs.iter().map(|p| Op::Clear(p.name.clone()));
        let mut all: Vec<Op> = clear.collect();
        if mode == OwnerMode::Set {
            all.push(Op::Add);
            all.append(&mut ops);
        }
        ops = all;
    }
    let before = view.clone();
    if let Err(e) = apply_with(&mut view, &ops, eph, true) {
        return Err(name_other_owner(config, e));
    }
    let mut out = Vec::new();
    for (old, new) in before.pifs.iter().zip(&view.pifs) {
        let (a, b) = (old.table.rules(), new.table.rules());
        let same = a.len() == b.len() && {
            let b: std::collections::HashSet<&crate::rule::Rule> = b.iter().collect();
            a.iter().all(|r| b.contains(r))
        };
        if same {
            continue;
        }
        // Checked against every other owner's rules now, as the server will.
        if let Some(full) = config.by_id(new.id) {
            scope::replace(&full.table, owner, b).map_err(|(_, error)| EditError::Owned {
                pif: new.name.clone(),
                error,
            })?;
        }
        out.push(ScopeUpdate {
            pif: new.id,
            owner: owner.clone(),
            generation: generation(new.id),
            rules: b.to_vec(),
            lease: None,
        });
    }
    Ok(out)
}

/// A delete that found nothing in the owner's rules: if another owner has
/// the rule, say so.
fn name_other_owner(config: &Config, e: EditError) -> EditError {
    if let EditError::Rule {
        error: RuleError::NotFound(rule),
        ..
    } = &e
    {
        for p in &config.pifs {
            if let Some((_, Some(o))) = p.table.owned_rules().find(|(r, _)| *r == rule) {
                return EditError::NotYours {
                    rule: Box::new(rule.clone()),
                    owner: o.clone(),
                };
            }
        }
    }
    e
}

fn apply_with(
    config: &mut Config,
    ops: &[Op],
    eph: Ephemeral,
    idempotent_add: bool,
) -> Result<BTreeSet<PifId>, EditError> {
    let mut work = config.clone();
    let mut touched = BTreeSet::new();
    let mut cleared: BTreeSet<PifId> = BTreeSet::new();
    let mut mode = Mode::Replace;
    for op in ops {
        match op {
            Op::Add => mode = Mode::Add,
            Op::Delete => mode = Mode::Delete,
            Op::Clear(name) => {
                let names = work
                    .pifs
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                let pif = work
                    .by_name_mut(name)
                    .ok_or_else(|| EditError::UnknownPif(name.clone(), names))?;
                pif.table.clear();
                touched.insert(pif.id);
                cleared.insert(pif.id);
            }
            Op::Spec(opt, text) => {
                let pif_name = if opt.is_namespace() {
                    SPLICE_NAME
                } else {
                    HOST_NAME
                };
                let pif = work
                    .by_name_mut(pif_name)
                    .ok_or(EditError::NoPif(*opt, pif_name))?;
                touched.insert(pif.id);
                if mode == Mode::Replace && cleared.insert(pif.id) {
                    pif.table.clear();
                }
                let spec = PortSpec::parse(*opt, text)?;
                if spec == PortSpec::None {
                    if pif.table.rules().iter().any(|r| r.proto == opt.proto()) {
                        return Err(EditError::NoneConflict(*opt));
                    }
                    continue;
                }
                let rules = spec
                    .rules(pif.table.caps(), eph)
                    .map_err(|problem| SpecError {
                        opt: *opt,
                        spec: text.clone(),
                        problem,
                    })?;
                let delete = mode == Mode::Delete;
                for rule in rules {
                    let res = if delete {
                        pif.table.delete(&rule)
                    } else if idempotent_add && pif.table.rules().contains(&rule) {
                        Ok(())
                    } else {
                        pif.table.add(rule)
                    };
                    res.map_err(|error| EditError::Rule {
                        opt: *opt,
                        spec: text.clone(),
                        delete,
                        error,
                    })?;
                }
            }
        }
    }
    *config = work;
    Ok(touched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::{Caps, Proto, Rule};
    use crate::table::PifTable;

    fn tcp(port: u16) -> Rule {
        Rule::dual_stack(Proto::Tcp, port, port, port)
    }

    fn config(rules: &[(u16, Option<&str>)]) -> Config {
        let caps = Caps::from_bits_retain(0x2f);
        let owned = rules
            .iter()
            .map(|(p, o)| (tcp(*p), o.map(|o| Owner::new(o).unwrap())));
        Config {
            pifs: vec![PifTable {
                id: PifId::HOST,
                name: HOST_NAME.into(),
                table: Table::with_owned_rules(caps, owned).unwrap(),
            }],
        }
    }

    fn run(
        c: &Config,
        owner: &str,
        mode: OwnerMode,
        ops: &[Op],
    ) -> Result<Vec<ScopeUpdate>, EditError> {
        let owner = Owner::new(owner).unwrap();
        apply_owned(c, &owner, mode, ops, Ephemeral::default(), |_| 7)
    }

    fn add(port: u16) -> Vec<Op> {
        vec![Op::Add, Op::Spec(SpecOpt::Tcp, port.to_string())]
    }

    #[test]
    fn owners_add_idempotently_and_touch_only_their_rules() {
        let c = config(&[(1, Some("a")), (2, Some("b")), (3, None)]);
        let up = run(&c, "a", OwnerMode::Edit, &add(4)).unwrap();
        assert_eq!(up.len(), 1);
        assert_eq!(up[0].rules, [tcp(1), tcp(4)]);
        assert_eq!(up[0].generation, 7);
        // Again: nothing to change.
        assert!(run(&c, "a", OwnerMode::Edit, &add(1)).unwrap().is_empty());
        // A repeated --set is nothing too; a different one replaces.
        let set = |p: u16| vec![Op::Spec(SpecOpt::Tcp, p.to_string())];
        assert!(run(&c, "a", OwnerMode::Set, &set(1)).unwrap().is_empty());
        assert_eq!(
            run(&c, "a", OwnerMode::Set, &set(9)).unwrap()[0].rules,
            [tcp(9)]
        );
        assert_eq!(run(&c, "a", OwnerMode::Release, &[]).unwrap()[0].rules, []);
        assert!(run(&c, "z", OwnerMode::Release, &[]).unwrap().is_empty());
    }

    #[test]
    fn other_owners_rules_are_named_not_touched() {
        let c = config(&[(1, Some("a")), (2, Some("b"))]);
        let del = [Op::Delete, Op::Spec(SpecOpt::Tcp, "2".into())];
        let e = run(&c, "a", OwnerMode::Edit, &del).unwrap_err();
        assert!(e.to_string().contains("owner 'b'"), "{e}");
        let e = run(&c, "a", OwnerMode::Edit, &add(2)).unwrap_err();
        assert!(e.to_string().contains("of owner 'b'"), "{e}");
    }
}
