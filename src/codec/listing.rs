//! The listing conversions: the model's tables to and from the pifs a
//! listing carries. They live on the codec's side, so that the tables know
//! nothing of the wire.

use super::PifListing;
use crate::rule::PifId;
use crate::table::{Config, MAX_RULES_V2, PifTable, RuleError, Table};

impl Config {
    /// Builds validated tables from a listing; the error names the pif and
    /// the index of the first rule that fails validation.
    pub fn from_listing(pifs: &[PifListing]) -> Result<Config, (PifId, usize, RuleError)> {
        let pifs = pifs
            .iter()
            .map(|p| {
                let table =
                    Table::with_rules(p.caps, p.rules.clone()).map_err(|(i, e)| (p.id, i, e))?;
                Ok(PifTable {
                    id: p.id,
                    name: p.name.clone(),
                    table,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Config { pifs })
    }

    /// The listing for a version-2 peer: upstream takes at most
    /// [`MAX_RULES_V2`] rules per pif, so a bigger table shows its first
    /// [`MAX_RULES_V2`] rules, in table order, and a warning is logged.
    pub fn to_listing_v2(&self) -> Vec<PifListing> {
        let mut pifs = self.to_listing();
        for p in &mut pifs {
            if p.rules.len() > MAX_RULES_V2 {
                tracing::warn!(
                    pif = %p.name,
                    rules = p.rules.len(),
                    "a version-2 listing shows only the first {MAX_RULES_V2} rules"
                );
                p.rules.truncate(MAX_RULES_V2);
            }
        }
        pifs
    }

    /// The listing of these tables, for the codec.
    pub fn to_listing(&self) -> Vec<PifListing> {
        self.pifs
            .iter()
            .map(|p| PifListing {
                id: p.id,
                name: p.name.clone(),
                caps: p.table.caps(),
                rules: p.table.rules().to_vec(),
            })
            .collect()
    }
}
