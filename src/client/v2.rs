//! The version-2 side of [`transact`](super::transact): upstream passt's
//! exchange has no answer, so an update is sent and then checked by
//! listing again that the client's own change is active.

use std::path::Path;
use std::time::Duration;

use super::{Change, ClientError, Options, Outcome, Session, TransactOptions, Transaction};
use crate::codec::Update;
use crate::codec::VERSION_2;
use crate::codec::v3::Status;
use crate::rule::{PifId, Rule};

/// One attempt against a version-2 server: the update computed, sent, and
/// checked by listing again. There is nothing to retry: no generations.
pub(super) async fn attempt_v2<F>(
    path: &Path,
    opts: Options,
    t: TransactOptions,
    session: Session,
    plan: &mut F,
    attempt: u32,
) -> Result<Transaction, ClientError>
where
    F: FnMut(&Session, u32) -> Result<Change, ClientError>,
{
    if t.keep_partial {
        return Err(ClientError::NotInV2(
            "keep a table whose ports did not all bind (--keep-partial): it never says what bound",
        ));
    }
    let done =
        |ack: &str, outcome| Transaction::ended(attempt, Status::ok(ack), VERSION_2, outcome);
    let update = match plan(&session, attempt)? {
        Change::Whole(update) => update,
        Change::Scoped(_) => return Err(ClientError::NotInV2("keep rule owners")),
        Change::Nothing => {
            return Ok(done("nothing to change", Outcome::Unchanged));
        }
    };
    // Upstream sends every pif, changed or not, in the server's order.
    let update = Update {
        tables: session
            .pifs
            .iter()
            .map(|p| {
                let rules = match update.tables.iter().find(|(id, _)| *id == p.id) {
                    Some((_, rules)) => rules.clone(),
                    None => session
                        .rules
                        .iter()
                        .find(|r| r.id == p.id)
                        .map(|r| r.rules.clone())
                        .unwrap_or_default(),
                };
                (p.id, rules)
            })
            .collect(),
    };
    if t.dry_run {
        // Version 2 has no validation without applying.
        return Ok(done(
            "valid here; the version-2 server was not asked",
            Outcome::CheckedHere,
        ));
    }
    let change = OwnChange::between(&session, &update);
    session.send_v2(&update).await?;
    // Upstream applies the update once the connection that sent it closes,
    // and serves one client at a time; pestod's version-2 socket may wait
    // its step timeout for a transaction in flight. As long as one step.
    // Other clients may change the tables meanwhile: what is checked is
    // this client's own change, not the whole table.
    verify_v2(path, opts, &change, opts.step_timeout).await?;
    Ok(done(
        "sent, and its changes listed back",
        Outcome::ListedBack,
    ))
}

/// What a version-2 update changes against the listing it was made from:
/// the rules it adds and those it deletes, by pif. Upstream's update
/// carries whole tables, but the change is what its client meant: other
/// clients' rules may come and go around it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnChange {
    /// By pif: (pif, its name, rules added, rules deleted).
    pub pifs: Vec<(PifId, String, Vec<Rule>, Vec<Rule>)>,
}

impl OwnChange {
    /// The change `update` makes to what `session` listed.
    pub fn between(session: &Session, update: &Update) -> OwnChange {
        let pifs = update
            .tables
            .iter()
            .filter_map(|(id, sent)| {
                let listed: &[Rule] = session
                    .rules
                    .iter()
                    .find(|r| r.id == *id)
                    .map_or(&[], |r| &r.rules);
                let name = session
                    .pifs
                    .iter()
                    .find(|p| p.id == *id)
                    .map_or_else(|| format!("pif {id}"), |p| p.name.clone());
                let added = rules_minus(sent, listed);
                let deleted = rules_minus(listed, sent);
                (!added.is_empty() || !deleted.is_empty()).then_some((*id, name, added, deleted))
            })
            .collect();
        OwnChange { pifs }
    }

    /// How the tables `session` lists fall short of the change, for people:
    /// empty if every added rule is there and no deleted one is.
    fn shortfall(&self, session: &Session) -> Vec<String> {
        let mut out = Vec::new();
        for (id, name, added, deleted) in &self.pifs {
            let have: &[Rule] = session
                .rules
                .iter()
                .find(|r| r.id == *id)
                .map_or(&[], |r| &r.rules);
            let missing = added
                .iter()
                .filter(|r| !have.contains(r))
                .map(|r| format!("missing {}", r.to_string().trim_end()));
            let still = deleted
                .iter()
                .filter(|r| have.contains(r))
                .map(|r| format!("still there {}", r.to_string().trim_end()));
            let all: Vec<String> = missing.chain(still).collect();
            if !all.is_empty() {
                out.push(format!("{name}: {}", all.join(", ")));
            }
        }
        out
    }
}

/// The rules of `a` not in `b`, each rule of `b` matching one equal rule
/// of `a`, in `a`'s order.
fn rules_minus(a: &[Rule], b: &[Rule]) -> Vec<Rule> {
    let mut left: Vec<&Rule> = b.iter().collect();
    a.iter()
        .filter(|r| match left.iter().position(|l| l == r) {
            Some(i) => {
                left.swap_remove(i);
                false
            }
            None => true,
        })
        .cloned()
        .collect()
}

/// Lists `path` until `change` is active (every rule it adds is there, none
/// it deletes is), for at most `patience`; else [`ClientError::NotActive`]
/// with the rules that fall short.
pub async fn verify_v2(
    path: &Path,
    opts: Options,
    change: &OwnChange,
    patience: Duration,
) -> Result<(), ClientError> {
    let deadline = tokio::time::Instant::now() + patience;
    let opts = Options {
        read_only: true,
        reserve: false,
        ..opts
    };
    loop {
        let session = Session::connect(path, opts).await?;
        let short = change.shortfall(&session);
        if short.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ClientError::NotActive(format!(
                "{} (listed for {patience:?}; the server may still apply it later)",
                short.join("; ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
