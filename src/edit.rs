//! The sequential table operations of upstream `pesto`, as a pure function
//! on a [`Config`]: `-A`, `-D`, `-C PIF` and the port specs, in order.
//!
//! Rules of the game (upstream pesto(1), NOTES): a spec given while neither
//! `-A` nor `-D` is in force replaces its pif's table, which is cleared the
//! first time such a spec names it; `-A` makes the following specs add,
//! `-D` makes them delete; `-C PIF` clears a table at that point.
//! `-t`/`-u` edit the HOST pif's table, `-T`/`-U` SPLICE's.

use std::collections::BTreeSet;

use crate::rule::PifId;
use crate::spec::{Ephemeral, PortSpec, SpecError, SpecOpt};
use crate::table::{Config, RuleError};

/// Name of the pif that `-t`/`-u` edit.
pub const HOST_NAME: &str = "HOST";
/// Name of the pif that `-T`/`-U` edit.
pub const SPLICE_NAME: &str = "SPLICE";

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
