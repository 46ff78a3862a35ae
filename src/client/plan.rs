//! What `pesto` plans from the operations of its command line, so that a
//! program gets the same transaction as the CLI: the change to send, the
//! tables before it and the tables the server will make of it.

use super::{Change, ClientError, Session};
use crate::edit::{Op, OwnerMode};
use crate::lease::Lease;
use crate::owner::Owner;
use crate::scope::{self, ScopeUpdate};
use crate::table::Config;

/// A change as `pesto` asks for it: sequential operations, optionally on
/// the rules of one owner, with its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The operations, in command-line order.
    pub ops: Vec<Op>,
    /// The owner whose rules change; none: the whole tables.
    pub owner: Option<Owner>,
    /// How the operations treat the owner's rules.
    pub mode: OwnerMode,
    /// The lease the owner's scopes carry.
    pub lease: Option<Lease>,
    /// Renew the owner's lease even if its rules stay as they are.
    pub renew: bool,
}

/// What a [`Request`] makes of a session's state.
#[derive(Debug, Clone)]
pub struct Plan {
    /// What to send.
    pub change: Change,
    /// The tables as listed.
    pub before: Config,
    /// The tables as the server will make them (it builds them again from
    /// its own tables at APPLY): to show, and to name the report's rules.
    pub after: Config,
}

impl Request {
    /// Whether it changes anything beyond the rules: a lease or a renewal
    /// is a change even when the rules stay.
    pub fn touches(&self) -> bool {
        self.lease.is_some() || self.renew
    }

    /// Whether it only reads: no operation, no owner's set or release, no
    /// lease to carry.
    pub fn is_read_only(&self) -> bool {
        self.ops.is_empty() && self.mode == OwnerMode::Edit && !self.touches()
    }

    /// The change against `session`, whose tables are `before`.
    pub fn plan(&self, session: &Session, before: Config) -> Result<Plan, ClientError> {
        let Some(owner) = &self.owner else {
            let (update, after) = session.edit(&self.ops)?;
            return Ok(Plan {
                change: Change::Whole(update),
                before,
                after,
            });
        };
        let mut scopes = session.edit_owned(owner, self.mode, &self.ops)?;
        if self.touches() && scopes.is_empty() {
            // Nothing else changes: the owner's rules as they are carry the
            // lease, or the renewal.
            scopes = session.renewal_scopes(&before, owner);
        }
        for s in &mut scopes {
            s.lease = self.lease;
        }
        let after = predict(&before, owner, &scopes);
        let change = if scopes.is_empty() {
            Change::Nothing
        } else {
            Change::Scoped(scopes)
        };
        Ok(Plan {
            change,
            before,
            after,
        })
    }
}

impl Session {
    /// The scopes of a renewal: `owner`'s rules in `config` as they are, one
    /// scope per pif where it has some, at their current generations.
    pub fn renewal_scopes(&self, config: &Config, owner: &Owner) -> Vec<ScopeUpdate> {
        config
            .pifs
            .iter()
            .filter_map(|p| {
                let rules = scope::rules_of(&p.table, owner);
                (!rules.is_empty()).then(|| ScopeUpdate {
                    pif: p.id,
                    owner: owner.clone(),
                    generation: self.scope_generation(p.id, owner),
                    rules,
                    lease: None,
                })
            })
            .collect()
    }

    /// The live tables as a configuration file that `pestod --config`
    /// takes, under a comment of `header` lines: each rule with its owner,
    /// and each owner's uid and lease.
    pub fn export(&self, header: &str) -> Result<String, ClientError> {
        let config = self.config()?;
        let named: std::collections::BTreeSet<&Owner> = config
            .pifs
            .iter()
            .flat_map(|p| p.table.owners().iter().flatten())
            .collect();
        let uids = named
            .iter()
            .filter_map(|o| Some(((*o).clone(), self.owner_uid(o)?)));
        let leases = named
            .iter()
            .filter_map(|o| Some(((*o).clone(), self.lease(o)?, None)));
        Ok(crate::config::export_config(header, &config, uids, leases))
    }
}

/// The tables after `scopes` replace `owner`'s rules in `before`, as the
/// server will make them if nothing else changes meanwhile. A scope the
/// tables cannot take leaves its pif as it is: the server will say why.
pub fn predict(before: &Config, owner: &Owner, scopes: &[ScopeUpdate]) -> Config {
    let mut after = before.clone();
    for sc in scopes {
        if let Some(p) = after.by_id_mut(sc.pif)
            && let Ok(t) = scope::replace(&p.table, owner, &sc.rules)
        {
            p.table = t;
        }
    }
    after
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::{Caps, PifId};
    use crate::spec::{Ephemeral, SpecOpt, parse_rules};
    use crate::table::{PifTable, Table};

    fn config(rules: &[(&str, Option<&str>)]) -> Config {
        let caps = Caps::from_bits_retain(0x3f);
        let mut table = Table::new(caps);
        for (spec, owner) in rules {
            for r in parse_rules(SpecOpt::Tcp, spec, caps, Ephemeral::default()).unwrap() {
                table
                    .add_owned(r, owner.map(|o| Owner::new(o).unwrap()))
                    .unwrap();
            }
        }
        Config {
            pifs: vec![PifTable {
                id: PifId::HOST,
                name: "HOST".into(),
                table,
            }],
        }
    }

    #[test]
    fn predict_replaces_only_the_owners_rules() {
        let before = config(&[("8080:80", None), ("9090:90", Some("a"))]);
        let owner = Owner::new("a").unwrap();
        let want = config(&[("8080:80", None), ("7070:70", Some("a"))]);
        let scope = ScopeUpdate {
            pif: PifId::HOST,
            owner: owner.clone(),
            generation: 0,
            rules: scope::rules_of(&want.pifs[0].table, &owner),
            lease: None,
        };
        assert_eq!(predict(&before, &owner, &[scope]), want);
        assert_eq!(predict(&before, &owner, &[]), before);
    }

    #[test]
    fn read_only_is_no_op_no_mode_no_lease() {
        let mut r = Request {
            ops: Vec::new(),
            owner: None,
            mode: OwnerMode::Edit,
            lease: None,
            renew: false,
        };
        assert!(r.is_read_only());
        r.renew = true;
        assert!(!r.is_read_only() && r.touches());
        r.renew = false;
        r.lease = Some(Lease::Ttl(5));
        assert!(!r.is_read_only());
    }
}
