//! UPDATE_SCOPED's body: up to 256 scopes, decoded one after the other so
//! that a decode that runs out of bytes goes on from the last scope it
//! decoded whole ([`super::Resume`]), and capped at the rules of the
//! largest whole-table UPDATE ([`Limits::max_scoped_rules`]).

use bytes::{BufMut, BytesMut};

use super::{CodecError, DecodeResult, Limits, Reader, get_rule_count, get_rule_table, put_rules};
use super::{MAX_SCOPES, get_owner, msg, put_owner};
use crate::lease::Lease;
use crate::rule::PifId;
use crate::scope::ScopeUpdate;

/// UPDATE_SCOPED decoded so far: its scope count, the scopes that arrived
/// whole, their rules in all, and where the next scope starts.
#[derive(Debug)]
pub(crate) struct ScopedSoFar {
    count: usize,
    scopes: Vec<ScopeUpdate>,
    rules: usize,
    /// Buffer offset of the next scope's first byte.
    pub(crate) next: usize,
}

/// UPDATE_SCOPED: a u32 scope count, then per scope the pif id, the
/// owner, the u64 generation the client read and the scope's rules.
pub(super) fn get_scoped(r: &mut Reader<'_>, limits: &Limits) -> DecodeResult<Vec<ScopeUpdate>> {
    let mut so_far = get_scoped_count(r)?;
    get_scoped_rest(r, limits, &mut so_far)
}

/// UPDATE_SCOPED's scope count, checked.
pub(super) fn get_scoped_count(r: &mut Reader<'_>) -> DecodeResult<ScopedSoFar> {
    let count = r.u32()? as usize;
    if count > MAX_SCOPES {
        return Err(CodecError::TooMany {
            what: "scope",
            count: count as u64,
            max: MAX_SCOPES as u64,
        }
        .into());
    }
    Ok(ScopedSoFar {
        count,
        scopes: Vec::with_capacity(count),
        rules: 0,
        next: r.position(),
    })
}

/// The scopes after those in `so_far`, which records each as it is decoded
/// whole, so that a decode that runs out of bytes can go on from there.
pub(super) fn get_scoped_rest(
    r: &mut Reader<'_>,
    limits: &Limits,
    so_far: &mut ScopedSoFar,
) -> DecodeResult<Vec<ScopeUpdate>> {
    while so_far.scopes.len() < so_far.count {
        let scope = get_scope(r, limits, so_far.rules)?;
        if so_far
            .scopes
            .iter()
            .any(|s| s.pif == scope.pif && s.owner == scope.owner)
        {
            return Err(CodecError::Malformed(format!(
                "scope of owner '{}' on pif {} given twice",
                scope.owner, scope.pif
            ))
            .into());
        }
        so_far.rules += scope.rules.len();
        so_far.scopes.push(scope);
        so_far.next = r.position();
    }
    Ok(std::mem::take(&mut so_far.scopes))
}

/// One scope of an UPDATE_SCOPED whose earlier scopes hold `before` rules:
/// its rule count is refused past the message's cap
/// ([`Limits::max_scoped_rules`]) before anything waits for the rules.
fn get_scope(r: &mut Reader<'_>, limits: &Limits, before: usize) -> DecodeResult<ScopeUpdate> {
    let pif = match r.u8()? {
        0 => return Err(CodecError::Malformed("scope of pif 0".into()).into()),
        id => PifId(id),
    };
    let owner = get_owner(r)?;
    let generation = r.u64()?;
    let (kind, value) = (r.u8()?, r.u32()?);
    let lease = Lease::from_wire(kind, value).map_err(CodecError::Malformed)?;
    let count = get_rule_count(r, limits)?;
    let total = before.saturating_add(count);
    if total > limits.max_scoped_rules() {
        return Err(CodecError::TooMany {
            what: "scoped update rule",
            count: total as u64,
            max: limits.max_scoped_rules() as u64,
        }
        .into());
    }
    let rules = get_rule_table(r, limits, count)?;
    Ok(ScopeUpdate {
        pif,
        owner,
        generation,
        rules,
        lease,
    })
}

pub(super) fn put_scoped(out: &mut BytesMut, scopes: &[ScopeUpdate]) {
    out.put_u8(msg::UPDATE_SCOPED);
    out.put_u32(scopes.len() as u32);
    for sc in scopes {
        out.put_u8(sc.pif.0);
        put_owner(out, &sc.owner);
        out.put_u64(sc.generation);
        let (kind, value) = Lease::to_wire(sc.lease);
        out.put_u8(kind);
        out.put_u32(value);
        put_rules(out, &sc.rules);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::v3::ClientMsg;
    use crate::codec::{DecodeError, RULE_SIZE, decode_from, encode_to_vec};
    use crate::owner::{MAX_OWNER, Owner};
    use crate::rule::{Proto, Rule};

    /// `n` scopes of `rules` rules each, owner `o000`, `o001`... on pif
    /// `1 + i % 8`: each scope takes 23 bytes and its rules.
    fn scoped(n: usize, rules: usize) -> ClientMsg {
        let set: Vec<Rule> = (0..rules as u16)
            .map(|i| Rule::dual_stack(Proto::Tcp, 1000 + i, 1000 + i, 2000 + i))
            .collect();
        ClientMsg::UpdateScoped(
            (0..n)
                .map(|i| ScopeUpdate {
                    pif: PifId(1 + (i % 8) as u8),
                    owner: Owner::new(&format!("o{i:03}")).unwrap(),
                    generation: i as u64,
                    rules: set.clone(),
                    lease: None,
                })
                .collect(),
        )
    }

    /// Decodes `bytes` through one codec, `piece` bytes per read: the
    /// message, and the bytes its parses went over.
    fn dribble(bytes: &[u8], piece: usize) -> (ClientMsg, usize) {
        let mut codec = crate::codec::WireCodec::<ClientMsg>::new(Limits::default());
        let mut buf = BytesMut::new();
        for chunk in bytes.chunks(piece) {
            buf.extend_from_slice(chunk);
            if let Some(m) = tokio_util::codec::Decoder::decode(&mut codec, &mut buf).unwrap() {
                assert!(buf.is_empty());
                return (m, codec.scanned);
            }
        }
        panic!("incomplete");
    }

    #[test]
    fn a_dribbled_scoped_update_is_parsed_in_linear_time() {
        // The most scopes, 64 rules each: 938 KB.
        let m = scoped(MAX_SCOPES, 64);
        let b = encode_to_vec(&m);
        for piece in [1, 1024] {
            let (got, scanned) = dribble(&b, piece);
            assert_eq!(got, m);
            // Each scope is parsed whole once; what is parsed again is the
            // start of a scope whose rules have not all arrived. Before,
            // each part of a scope parsed the message again from its first
            // byte: 942,813,958 bytes (1,021 times the message) a byte at a
            // time, 120,899,457 (131 times) in 1 KiB reads. Now 943,878 and
            // 929,332.
            assert!(
                scanned < b.len() + MAX_SCOPES * 8 * (1 + 1 + MAX_OWNER + 8 + 5 + 4),
                "{scanned} bytes parsed for a message of {} in pieces of {piece}",
                b.len()
            );
        }
        // Cut anywhere, or with bad scopes late in it, as the other
        // messages: the same result, refused at the same byte.
        let small = encode_to_vec(&scoped(5, 2));
        crate::codec::tests::same_however_split::<ClientMsg>(&small, 5 * 12 + 4);
        let scope = (small.len() - 5) / 5;
        assert_eq!(scope, 23 + 2 * RULE_SIZE);
        let mut dup = small.clone();
        // The fourth scope's owner label becomes the third's: "o002".
        dup[5 + 3 * scope + 1 + 1 + 3] = b'2';
        dup[5 + 3 * scope] = dup[5 + 2 * scope];
        assert!(matches!(
            decode_from::<ClientMsg>(&dup, &Limits::default()),
            Err(DecodeError::Bad(CodecError::Malformed(_)))
        ));
        crate::codec::tests::same_however_split::<ClientMsg>(&dup, 5 * 12 + 4);
        let mut proto = small.clone();
        proto[5 + 4 * scope + 1 + 5 + 8 + 5 + 4 + RULE_SIZE + 54] = 1;
        assert!(matches!(
            decode_from::<ClientMsg>(&proto, &Limits::default()),
            Err(DecodeError::Bad(CodecError::UnknownProto(1)))
        ));
        crate::codec::tests::same_however_split::<ClientMsg>(&proto, 5 * 12 + 4);
    }

    #[test]
    fn a_scoped_update_past_its_rule_cap_is_refused_at_the_count() {
        let lim = Limits::default();
        assert_eq!(lim.max_scoped_rules(), 8 * crate::table::MAX_RULES);
        // The largest: as many rules as every pif full, in the most scopes.
        let per = lim.max_scoped_rules() / MAX_SCOPES;
        let largest = encode_to_vec(&scoped(MAX_SCOPES, per));
        assert!(decode_from::<ClientMsg>(&largest, &lim).is_ok());
        // One rule more, in the last scope: refused at its count, before
        // its rules.
        let over = encode_to_vec(&scoped(MAX_SCOPES, per + 1));
        let scope = (over.len() - 5) / MAX_SCOPES;
        let last_count = 5 + (MAX_SCOPES - 1) * scope + 1 + 5 + 8 + 5 + 4;
        let msg = match decode_from::<ClientMsg>(&over[..last_count], &lim) {
            Err(DecodeError::Bad(e @ CodecError::TooMany { .. })) => e.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            msg,
            format!(
                "scoped update rule count {} exceeds the limit of {}",
                MAX_SCOPES * (per + 1),
                lim.max_scoped_rules()
            )
        );
        // A byte short of that count it still waits.
        assert!(matches!(
            decode_from::<ClientMsg>(&over[..last_count - 1], &lim),
            Err(DecodeError::Incomplete)
        ));
        // Nine full tables: refused at the ninth count, 7.3 MB into the
        // 8.3 MB message, whatever its scope count declares.
        let nine = encode_to_vec(&scoped(9, crate::table::MAX_RULES));
        let ninth = 5 + 8 * (23 + crate::table::MAX_RULES * RULE_SIZE) + 23;
        assert!(matches!(
            decode_from::<ClientMsg>(&nine[..ninth], &lim),
            Err(DecodeError::Bad(CodecError::TooMany { .. }))
        ));
    }
}
