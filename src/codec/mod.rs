//! The wire codec: control-protocol messages to and from bytes, no IO.
//!
//! The structures shared with upstream passt's protocol version 2 are kept
//! byte-exact: every integer big-endian, names NUL-padded. docs/protocol.md
//! lays each one out. Each message type implements [`Wire`]; [`WireCodec`]
//! turns any of them into a tokio-util `Decoder`/`Encoder`, so a connection
//! switches what it expects next with `Framed::map_codec`.
//!
//! Decoding never panics and never trusts a count: every count is checked
//! against [`Limits`] before anything is read or allocated, and a buffer that
//! holds only part of a message is answered with "need more", not an error.

mod listing;
pub mod msg;
mod scoped;
pub mod v3;

use std::marker::PhantomData;
use std::net::{IpAddr, Ipv6Addr};

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::rule::{Flags, IFNAMSIZ, IfName, PifId, Proto, Rule, canonical_ip};
use crate::table::{MAX_RULES, MAX_RULES_V2, PIF_NAME_SIZE};

/// Magic that opens the server's hello.
pub const SERVER_MAGIC: [u8; 8] = *b"basil:s\0";
/// Magic that opens the client's hello (version 3).
pub const CLIENT_MAGIC: [u8; 8] = *b"basil:c\0";
/// Bytes of one rule on the wire.
pub const RULE_SIZE: usize = 56;
/// Bytes of the version-2 server hello.
pub const HELLO_V2_SIZE: usize = 20;
/// Bytes of a pif header in a listing: id, name, caps, rule count.
pub const PIF_HEADER_SIZE: usize = 1 + PIF_NAME_SIZE + 4 + 4;

/// Upstream passt's protocol version.
pub const VERSION_2: u32 = 2;

/// A message that does not decode. Each names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The hello does not start with the expected magic.
    #[error("bad magic {0:02x?}: not a pesto control socket")]
    BadMagic([u8; 8]),
    /// A NUL-padded name with no NUL or with bytes after it.
    #[error("{0} field is not NUL-terminated and zero-padded")]
    NotTerminated(&'static str),
    /// A name that is not UTF-8 or not a valid name.
    #[error("invalid {field} {value:?}")]
    BadName {
        /// Which field.
        field: &'static str,
        /// What it held, lossily decoded.
        value: String,
    },
    /// A count past its limit.
    #[error("{what} count {count} exceeds the limit of {max}")]
    TooMany {
        /// What was counted.
        what: &'static str,
        /// The count received.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// A protocol number other than TCP or UDP.
    #[error("unknown protocol number {0} in rule")]
    UnknownProto(u8),
    /// Flag bits this version does not know.
    #[error("unknown rule flags 0x{0:02x}")]
    UnknownFlags(u8),
    /// The same pif twice in one message.
    #[error("pif {0} appears twice")]
    DuplicatePif(u8),
    /// A hello with sizes that this implementation does not share.
    #[error("server uses {what} {got}, expected {want}")]
    Geometry {
        /// Which size.
        what: &'static str,
        /// What the server said.
        got: u32,
        /// What we use.
        want: u32,
    },
    /// A message type or value that is out of place or unknown.
    #[error("{0}")]
    Malformed(String),
    /// The transport failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Outcome of a decode attempt that did not produce a value.
#[derive(Debug)]
pub enum DecodeError {
    /// The buffer ends inside the message: wait for more bytes.
    Incomplete,
    /// The bytes are not a valid message.
    Bad(CodecError),
}

impl From<CodecError> for DecodeError {
    fn from(e: CodecError) -> Self {
        DecodeError::Bad(e)
    }
}

/// Result of decoding one field or message.
pub type DecodeResult<T> = Result<T, DecodeError>;

/// Bounds a decoder enforces before allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most pifs in one listing or update.
    pub max_pifs: usize,
    /// Most rules in one pif's table. A version-2 listing never takes
    /// more than [`MAX_RULES_V2`], whatever this says.
    pub max_rules: usize,
}

impl Default for Limits {
    /// Version 3's: what pestod announces and takes.
    fn default() -> Limits {
        Limits {
            max_pifs: 8,
            max_rules: MAX_RULES,
        }
    }
}

impl Limits {
    /// Upstream's limits, for version 2's peers.
    pub fn v2() -> Limits {
        Limits {
            max_rules: MAX_RULES_V2,
            ..Limits::default()
        }
    }

    /// Most rules in one UPDATE_SCOPED, all its scopes together: those of
    /// the largest whole-table UPDATE, every pif full. More could never be
    /// applied (each pif holds at most `max_rules`), and without this bound
    /// 256 scopes of `max_rules` each make a 224 MB message.
    pub fn max_scoped_rules(&self) -> usize {
        self.max_pifs.saturating_mul(self.max_rules)
    }
}

/// A cursor over received bytes that reports running out as `Incomplete`.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// After `Incomplete`: how long the buffer must be before a new attempt
    /// can get further.
    wanted: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader {
            buf,
            pos: 0,
            wanted: 0,
        }
    }
    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }
    /// After an `Incomplete`, the buffer length below which decoding again
    /// would stop at the same place: the end of the field that was missing.
    /// Decoders read every count before waiting for what it counts, so this
    /// grows by whole tables, and a message dribbled in is parsed a bounded
    /// number of times, not once per byte.
    pub fn wanted(&self) -> usize {
        self.wanted
    }
    /// Moves to `pos`, which a decode of the same buffer reached before;
    /// at most the buffer's end.
    fn seek(&mut self, pos: usize) {
        self.pos = pos.min(self.buf.len());
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// Fails with `Incomplete` unless `n` more bytes are there.
    pub fn need(&mut self, n: usize) -> DecodeResult<()> {
        if self.remaining() < n {
            self.wanted = self.pos.saturating_add(n);
            Err(DecodeError::Incomplete)
        } else {
            Ok(())
        }
    }
    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> DecodeResult<&'a [u8]> {
        self.need(n)?;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> DecodeResult<[u8; N]> {
        let mut a = [0; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    /// A byte.
    pub fn u8(&mut self) -> DecodeResult<u8> {
        Ok(self.array::<1>()?[0])
    }
    /// A big-endian u16.
    pub fn u16(&mut self) -> DecodeResult<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    /// Up to `n` of the next bytes, without consuming them.
    pub fn peek(&self, n: usize) -> &'a [u8] {
        let end = self.pos.saturating_add(n).min(self.buf.len());
        self.buf.get(self.pos..end).unwrap_or_default()
    }
    /// Fails as soon as the bytes received so far differ from `magic`, so
    /// that a peer speaking something else is told at once, not after a
    /// timeout.
    pub fn magic(&mut self, magic: &[u8; 8]) -> DecodeResult<()> {
        let head = self.peek(magic.len());
        if !magic.starts_with(head) {
            let mut got = [0u8; 8];
            for (g, h) in got.iter_mut().zip(head) {
                *g = *h;
            }
            return Err(CodecError::BadMagic(got).into());
        }
        if head.len() < magic.len() {
            // Byte by byte, so that the first wrong byte is refused at once.
            self.wanted = self.pos + head.len() + 1;
            return Err(DecodeError::Incomplete);
        }
        self.array::<8>().map(|_| ())
    }
    /// A big-endian u32.
    pub fn u32(&mut self) -> DecodeResult<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    /// A big-endian u64.
    pub fn u64(&mut self) -> DecodeResult<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    /// A big-endian i32.
    pub fn i32(&mut self) -> DecodeResult<i32> {
        Ok(i32::from_be_bytes(self.array()?))
    }
}

/// A message with a fixed wire layout.
pub trait Wire: Sized {
    /// Reads one message from `r`; `Incomplete` if `r` ends inside it.
    fn decode(r: &mut Reader<'_>, limits: &Limits) -> DecodeResult<Self>;
    /// Appends the message's bytes to `out`.
    fn encode(&self, out: &mut BytesMut);
    /// As [`Wire::decode`], for a buffer that only grew since the attempt
    /// that left `resume`: a message of many parts goes on from the last
    /// part it decoded whole instead of its first byte, and leaves in
    /// `resume` how far it got when it runs out. The default parses from
    /// the start, which costs a bounded number of parses for a message of
    /// at most a few tables (each waited for whole, see [`Reader::wanted`]).
    fn decode_resuming(
        r: &mut Reader<'_>,
        limits: &Limits,
        resume: &mut Resume,
    ) -> DecodeResult<Self> {
        let _ = resume;
        Self::decode(r, limits)
    }
}

/// What earlier attempts decoded of a message that has not all arrived, so
/// that the next attempt need not parse it again. Only UPDATE_SCOPED, whose
/// scopes may be up to [`v3::MAX_SCOPES`], keeps anything.
#[derive(Debug, Default)]
pub struct Resume {
    /// UPDATE_SCOPED: the scopes decoded whole so far.
    pub(crate) scoped: Option<scoped::ScopedSoFar>,
}

impl Resume {
    /// Where the next attempt starts reading (0: from the start).
    fn at(&self) -> usize {
        self.scoped.as_ref().map_or(0, |s| s.next)
    }
}

/// Decodes one `T` from the start of `buf`, returning it and its length.
pub fn decode_from<T: Wire>(buf: &[u8], limits: &Limits) -> DecodeResult<(T, usize)> {
    let mut r = Reader::new(buf);
    let v = T::decode(&mut r, limits)?;
    Ok((v, r.position()))
}

/// Encodes one message into a fresh buffer.
pub fn encode_to_vec<T: Wire>(msg: &T) -> Vec<u8> {
    let mut b = BytesMut::new();
    msg.encode(&mut b);
    b.to_vec()
}

/// A tokio-util codec that decodes `D` and encodes any [`Wire`] message.
///
/// It remembers how many bytes the message needs at least (the fixed fields,
/// then each table once its count is read) and does not parse again until
/// they are there, and what it decoded whole of a message of many parts
/// ([`Resume`]): a message costs O(its length) to decode however it is
/// split, instead of a parse from its first byte for every read or part.
/// Between calls the buffer may only grow at its end, as `Framed`'s does.
#[derive(Debug)]
pub struct WireCodec<D> {
    limits: Limits,
    /// Bytes the buffer must hold before the next parse; 0 between messages.
    wanted: usize,
    /// What the parses of the message so far decoded whole.
    resume: Resume,
    /// Bytes the parses went over, for the tests that prove them linear.
    #[cfg(test)]
    scanned: usize,
    _decodes: PhantomData<fn() -> D>,
}

impl<D> WireCodec<D> {
    /// A codec enforcing `limits`.
    pub fn new(limits: Limits) -> WireCodec<D> {
        WireCodec {
            limits,
            wanted: 0,
            resume: Resume::default(),
            #[cfg(test)]
            scanned: 0,
            _decodes: PhantomData,
        }
    }

    /// The buffer length the next parse waits for (0: none pending).
    pub fn wanted(&self) -> usize {
        self.wanted
    }

    /// The same limits, decoding another message type next.
    pub fn expect<E>(&self) -> WireCodec<E> {
        WireCodec::new(self.limits)
    }
}

impl<D: Wire> Decoder for WireCodec<D> {
    type Item = D;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<D>, CodecError> {
        if src.len() < self.wanted {
            // A parse would stop where the last one did.
            return Ok(None);
        }
        if self.resume.at() > src.len() {
            // Not the buffer the last parse saw: start again.
            self.resume = Resume::default();
        }
        let mut r = Reader::new(src);
        #[cfg(test)]
        let start = self.resume.at();
        let decoded = D::decode_resuming(&mut r, &self.limits, &mut self.resume);
        #[cfg(test)]
        {
            self.scanned += r.position().saturating_sub(start);
        }
        match decoded {
            Ok(msg) => {
                let len = r.position();
                self.wanted = 0;
                self.resume = Resume::default();
                src.advance(len);
                Ok(Some(msg))
            }
            Err(DecodeError::Incomplete) => {
                // Never 0 here: an attempt that ran out wanted one more byte
                // at least. Bounded by the limits the counts were checked
                // against.
                self.wanted = r.wanted().max(src.len() + 1);
                src.reserve(self.wanted - src.len());
                Ok(None)
            }
            Err(DecodeError::Bad(e)) => {
                self.wanted = 0;
                self.resume = Resume::default();
                Err(e)
            }
        }
    }

    /// The peer closed (or half-closed) its side: bytes of a message cut
    /// off are a malformed message, answered with PROTOCOL while the peer
    /// can still read, not a failed transport.
    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<D>, CodecError> {
        match self.decode(src)? {
            Some(msg) => Ok(Some(msg)),
            None if src.is_empty() => Ok(None),
            None => Err(CodecError::Malformed(format!(
                "the connection closed inside a message, after {} byte(s) of it",
                src.len()
            ))),
        }
    }
}

impl<D, M: Wire> Encoder<&M> for WireCodec<D> {
    type Error = CodecError;

    fn encode(&mut self, msg: &M, dst: &mut BytesMut) -> Result<(), CodecError> {
        msg.encode(dst);
        Ok(())
    }
}

fn put_addr(out: &mut BytesMut, addr: IpAddr) {
    let v6 = match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    out.put_slice(&v6.octets());
}

/// Writes `s` NUL-padded into a field of `size` bytes; `s` is shorter.
fn put_padded(out: &mut BytesMut, s: &str, size: usize) {
    let b = s.as_bytes();
    let n = b.len().min(size - 1);
    out.put_slice(&b[..n]);
    out.put_bytes(0, size - n);
}

/// Reads a NUL-padded field: text up to the first NUL, zeros after it.
pub fn get_padded<'a>(field: &'static str, raw: &'a [u8]) -> Result<&'a str, CodecError> {
    let end = raw
        .iter()
        .position(|&b| b == 0)
        .ok_or(CodecError::NotTerminated(field))?;
    if raw[end..].iter().any(|&b| b != 0) {
        return Err(CodecError::NotTerminated(field));
    }
    std::str::from_utf8(&raw[..end]).map_err(|_| CodecError::BadName {
        field,
        value: String::from_utf8_lossy(&raw[..end]).into_owned(),
    })
}

impl Wire for Rule {
    fn decode(r: &mut Reader<'_>, _: &Limits) -> DecodeResult<Rule> {
        let addr = canonical_ip(IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)));
        let target = Ipv6Addr::from(r.array::<16>()?);
        let ifname_raw = r.array::<IFNAMSIZ>()?;
        let first = r.u16()?;
        let last = r.u16()?;
        let to = r.u16()?;
        let proto_n = r.u8()?;
        let flags_n = r.u8()?;
        let proto = Proto::from_number(proto_n).ok_or(CodecError::UnknownProto(proto_n))?;
        let flags = Flags::from_bits_retain(flags_n);
        if flags.unknown() != 0 {
            return Err(CodecError::UnknownFlags(flags_n).into());
        }
        let ifname = match get_padded("interface name", &ifname_raw)? {
            "" => None,
            name => Some(IfName::new(name).map_err(|_| CodecError::BadName {
                field: "interface name",
                value: name.to_owned(),
            })?),
        };
        let target = (!target.is_unspecified()).then(|| canonical_ip(IpAddr::V6(target)));
        Ok(Rule {
            addr,
            target,
            ifname,
            first,
            last,
            to,
            proto,
            flags,
        })
    }

    fn encode(&self, out: &mut BytesMut) {
        out.reserve(RULE_SIZE);
        put_addr(out, self.addr);
        match self.target {
            Some(t) => put_addr(out, t),
            None => out.put_bytes(0, 16),
        }
        put_padded(
            out,
            self.ifname.as_ref().map_or("", |n| n.as_str()),
            IFNAMSIZ,
        );
        out.put_u16(self.first);
        out.put_u16(self.last);
        out.put_u16(self.to);
        out.put_u8(self.proto.number());
        out.put_u8(self.flags.bits());
    }
}

/// Reads a rule count and that many rules, checking the count first.
fn get_rules(r: &mut Reader<'_>, limits: &Limits) -> DecodeResult<Vec<Rule>> {
    let count = get_rule_count(r, limits)?;
    get_rule_table(r, limits, count)
}

/// Reads a table's rule count, refused past the limit before anything waits
/// for the rules.
fn get_rule_count(r: &mut Reader<'_>, limits: &Limits) -> DecodeResult<usize> {
    let count = r.u32()?;
    if count as usize > limits.max_rules {
        return Err(CodecError::TooMany {
            what: "rule",
            count: count.into(),
            max: limits.max_rules as u64,
        }
        .into());
    }
    Ok(count as usize)
}

/// Reads the `count` rules of a table whose count was checked.
fn get_rule_table(r: &mut Reader<'_>, limits: &Limits, count: usize) -> DecodeResult<Vec<Rule>> {
    // Wait for the whole table before parsing any of it.
    r.need(count * RULE_SIZE)?;
    (0..count).map(|_| Rule::decode(r, limits)).collect()
}

fn put_rules(out: &mut BytesMut, rules: &[Rule]) {
    // Tables hold at most MAX_RULES rules, far below u32::MAX.
    const _: () = assert!(MAX_RULES < u32::MAX as usize);
    out.put_u32(rules.len() as u32);
    out.reserve(rules.len() * RULE_SIZE);
    for rule in rules {
        rule.encode(out);
    }
}

/// Reads a pif id that must not repeat one already in `seen`; `None` at the
/// terminating zero.
fn get_pif_id(r: &mut Reader<'_>, seen: &[u8], limits: &Limits) -> DecodeResult<Option<PifId>> {
    let id = r.u8()?;
    if id == 0 {
        return Ok(None);
    }
    if seen.contains(&id) {
        return Err(CodecError::DuplicatePif(id).into());
    }
    if seen.len() >= limits.max_pifs {
        return Err(CodecError::TooMany {
            what: "pif",
            count: seen.len() as u64 + 1,
            max: limits.max_pifs as u64,
        }
        .into());
    }
    Ok(Some(PifId(id)))
}

/// The server's first 20 bytes: magic, version, pif name size, IFNAMSIZ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloV2 {
    /// Protocol version the server speaks.
    pub version: u32,
    /// Size of pif name fields (128).
    pub pif_name_size: u32,
    /// Size of interface name fields (16).
    pub ifnamsiz: u32,
}

impl HelloV2 {
    /// The hello for `version` with this implementation's field sizes.
    pub fn new(version: u32) -> HelloV2 {
        HelloV2 {
            version,
            pif_name_size: PIF_NAME_SIZE as u32,
            ifnamsiz: IFNAMSIZ as u32,
        }
    }

    /// Checks that the field sizes are the ones this implementation uses.
    pub fn check_geometry(&self) -> Result<(), CodecError> {
        let check = |what, got, want: usize| {
            if got == want as u32 {
                Ok(())
            } else {
                Err(CodecError::Geometry {
                    what,
                    got,
                    want: want as u32,
                })
            }
        };
        check("pif name size", self.pif_name_size, PIF_NAME_SIZE)?;
        check("IFNAMSIZ", self.ifnamsiz, IFNAMSIZ)
    }
}

impl Wire for HelloV2 {
    fn decode(r: &mut Reader<'_>, _: &Limits) -> DecodeResult<HelloV2> {
        r.magic(&SERVER_MAGIC)?;
        Ok(HelloV2 {
            version: r.u32()?,
            pif_name_size: r.u32()?,
            ifnamsiz: r.u32()?,
        })
    }

    fn encode(&self, out: &mut BytesMut) {
        out.put_slice(&SERVER_MAGIC);
        out.put_u32(self.version);
        out.put_u32(self.pif_name_size);
        out.put_u32(self.ifnamsiz);
    }
}

/// One pif as a listing shows it: id, name, capabilities and rules.
///
/// The rules are as received, not validated: a client shows what the
/// server has even if it would not accept it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PifListing {
    /// Pif id.
    pub id: PifId,
    /// Pif name.
    pub name: String,
    /// Capability bits.
    pub caps: crate::rule::Caps,
    /// The pif's rules.
    pub rules: Vec<Rule>,
}

fn get_pif_header(r: &mut Reader<'_>) -> DecodeResult<(String, crate::rule::Caps)> {
    let raw = r.bytes(PIF_NAME_SIZE)?;
    let name = get_padded("pif name", raw)?;
    if name.is_empty() {
        return Err(CodecError::BadName {
            field: "pif name",
            value: String::new(),
        }
        .into());
    }
    let caps = crate::rule::Caps::from_bits_retain(r.u32()?);
    Ok((name.to_owned(), caps))
}

fn put_pif_header(out: &mut BytesMut, id: PifId, name: &str, caps: crate::rule::Caps) {
    out.put_u8(id.0);
    put_padded(out, name, PIF_NAME_SIZE);
    out.put_u32(caps.bits());
}

/// Version 2's listing: every pif with its rules, ended by a zero pif id.
///
/// Upstream takes at most [`MAX_RULES_V2`] rules per pif: decoding refuses
/// more, and encoding writes a pif's first [`MAX_RULES_V2`] rules only (see
/// [`crate::table::Config::to_listing_v2`], which says so in the log).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListingV2 {
    /// The pifs, in the server's order.
    pub pifs: Vec<PifListing>,
}

impl Wire for ListingV2 {
    fn decode(r: &mut Reader<'_>, limits: &Limits) -> DecodeResult<ListingV2> {
        let mut pifs: Vec<PifListing> = Vec::new();
        let mut seen = Vec::new();
        while let Some(id) = get_pif_id(r, &seen, limits)? {
            seen.push(id.0);
            let (name, caps) = get_pif_header(r)?;
            if pifs.iter().any(|p| p.name == name) {
                return Err(
                    CodecError::Malformed(format!("pif name '{name}' appears twice")).into(),
                );
            }
            let v2 = Limits {
                max_rules: limits.max_rules.min(MAX_RULES_V2),
                ..*limits
            };
            let rules = get_rules(r, &v2)?;
            pifs.push(PifListing {
                id,
                name,
                caps,
                rules,
            });
        }
        Ok(ListingV2 { pifs })
    }

    fn encode(&self, out: &mut BytesMut) {
        for p in &self.pifs {
            put_pif_header(out, p.id, &p.name, p.caps);
            put_rules(out, p.rules.get(..MAX_RULES_V2).unwrap_or(&p.rules));
        }
        out.put_u8(0);
    }
}

/// The client's new tables: for each pif, id and its whole table; a zero
/// pif id ends the list. Shared by versions 2 and 3.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    /// Pifs and their new rules.
    pub tables: Vec<(PifId, Vec<Rule>)>,
}

impl Wire for Update {
    fn decode(r: &mut Reader<'_>, limits: &Limits) -> DecodeResult<Update> {
        let mut tables = Vec::new();
        let mut seen = Vec::new();
        while let Some(id) = get_pif_id(r, &seen, limits)? {
            seen.push(id.0);
            tables.push((id, get_rules(r, limits)?));
        }
        Ok(Update { tables })
    }

    fn encode(&self, out: &mut BytesMut) {
        for (id, rules) in &self.tables {
            out.put_u8(id.0);
            put_rules(out, rules);
        }
        out.put_u8(0);
    }
}

/// Most scopes in one UPDATE_SCOPED.
const MAX_SCOPES: usize = 256;

/// An owner label: a length byte, then the bytes.
fn get_owner(r: &mut Reader<'_>) -> DecodeResult<crate::owner::Owner> {
    let len = usize::from(r.u8()?);
    let raw = r.bytes(len)?;
    Ok(crate::owner::Owner::from_bytes(raw).map_err(|e| CodecError::Malformed(e.to_string()))?)
}

fn put_owner(out: &mut BytesMut, o: &crate::owner::Owner) {
    out.put_u8(o.as_str().len() as u8);
    out.put_slice(o.as_str().as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_layout() {
        let mut r = Rule::new(
            Proto::Tcp,
            "127.0.0.1".parse().unwrap(),
            18081,
            18081,
            18091,
        );
        r.ifname = Some(IfName::new("lo").unwrap());
        let b = encode_to_vec(&r);
        assert_eq!(b.len(), RULE_SIZE);
        assert_eq!(
            &b[..16],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
        );
        assert_eq!(&b[16..32], &[0; 16]);
        assert_eq!(&b[32..35], b"lo\0");
        assert_eq!(&b[48..], &[0x46, 0xa1, 0x46, 0xa1, 0x46, 0xab, 6, 0]);
        let (back, n) = decode_from::<Rule>(&b, &Limits::default()).unwrap();
        assert_eq!((back, n), (r, RULE_SIZE));
    }

    #[test]
    fn incomplete_is_not_an_error() {
        let l = ListingV2 {
            pifs: vec![PifListing {
                id: PifId::HOST,
                name: "HOST".into(),
                caps: crate::rule::Caps::from_bits_retain(0x2f),
                rules: vec![Rule::dual_stack(Proto::Udp, 53, 53, 53)],
            }],
        };
        let b = encode_to_vec(&l);
        for cut in 0..b.len() {
            assert!(matches!(
                decode_from::<ListingV2>(&b[..cut], &Limits::default()),
                Err(DecodeError::Incomplete)
            ));
        }
        assert_eq!(
            decode_from::<ListingV2>(&b, &Limits::default()).unwrap().0,
            l
        );
    }

    #[test]
    fn counts_are_checked_before_waiting() {
        let mut b = vec![1u8];
        b.extend_from_slice(&(MAX_RULES as u32 + 1).to_be_bytes());
        assert!(matches!(
            decode_from::<Update>(&b, &Limits::default()),
            Err(DecodeError::Bad(CodecError::TooMany { .. }))
        ));
    }

    #[test]
    fn bad_fields_are_errors() {
        let good = encode_to_vec(&Rule::dual_stack(Proto::Tcp, 1, 1, 1));
        let lim = Limits::default();
        let mut b = good.clone();
        b[54] = 1; // protocol ICMP
        assert!(matches!(
            decode_from::<Rule>(&b, &lim),
            Err(DecodeError::Bad(CodecError::UnknownProto(1)))
        ));
        let mut b = good.clone();
        b[55] = 0x80;
        assert!(matches!(
            decode_from::<Rule>(&b, &lim),
            Err(DecodeError::Bad(CodecError::UnknownFlags(0x80)))
        ));
        let mut b = good.clone();
        b[32..48].copy_from_slice(&[b'x'; 16]);
        assert!(matches!(
            decode_from::<Rule>(&b, &lim),
            Err(DecodeError::Bad(CodecError::NotTerminated(_)))
        ));
        let mut b = good;
        b[32] = b'a';
        b[34] = b'b'; // "a\0b": garbage after the NUL
        assert!(matches!(
            decode_from::<Rule>(&b, &lim),
            Err(DecodeError::Bad(CodecError::NotTerminated(_)))
        ));
    }

    /// Feeds `bytes` to a fresh [`WireCodec`] in pieces cut at `cuts`, and
    /// returns what it decoded (with the bytes left over), or the error, with
    /// the number of parses it ran: a call with fewer bytes than it asked
    /// for returns at once and is not counted.
    fn feed<T: Wire>(bytes: &[u8], cuts: &[usize]) -> (Result<(T, usize), String>, usize) {
        let mut codec = WireCodec::<T>::new(Limits::default());
        let mut buf = BytesMut::new();
        let mut parses = 0;
        let mut from = 0;
        for &to in cuts.iter().chain([&bytes.len()]) {
            buf.extend_from_slice(&bytes[from..to]);
            from = to;
            if buf.len() >= codec.wanted() {
                parses += 1;
            }
            match codec.decode(&mut buf) {
                Ok(Some(msg)) => return (Ok((msg, from - buf.len())), parses),
                Ok(None) => assert!(codec.wanted() > buf.len(), "waits for nothing"),
                Err(e) => return (Err(e.to_string()), parses),
            }
        }
        (Err("incomplete".into()), parses)
    }

    /// What a decode of the whole of `bytes` at once gives, as `feed` does.
    fn at_once<T: Wire>(bytes: &[u8]) -> Result<(T, usize), String> {
        match decode_from::<T>(bytes, &Limits::default()) {
            Ok(v) => Ok(v),
            Err(DecodeError::Incomplete) => Err("incomplete".into()),
            Err(DecodeError::Bad(e)) => Err(e.to_string()),
        }
    }

    /// Decoding `bytes` gives the same result cut at any one byte, and
    /// dribbled a byte at a time, with at most `max_parses` parses then.
    pub(super) fn same_however_split<T: Wire + PartialEq + std::fmt::Debug>(
        bytes: &[u8],
        max_parses: usize,
    ) {
        let whole = at_once::<T>(bytes);
        for cut in 0..=bytes.len() {
            let (got, _) = feed::<T>(bytes, &[cut]);
            assert_eq!(got, whole, "cut at {cut} of {}", bytes.len());
        }
        let every: Vec<usize> = (1..bytes.len()).collect();
        let (got, parses) = feed::<T>(bytes, &every);
        assert_eq!(got, whole, "byte by byte");
        assert!(
            parses <= max_parses,
            "{parses} parses for {} bytes byte by byte",
            bytes.len()
        );
        // Where it fails, it fails at the same byte as a parse of each
        // prefix would: the checks are made as early as before.
        if whole.is_err() {
            let first_bad = (1..=bytes.len()).find(|&n| {
                matches!(
                    decode_from::<T>(&bytes[..n], &Limits::default()),
                    Err(DecodeError::Bad(_))
                )
            });
            if let Some(n) = first_bad {
                let early: Vec<usize> = (1..n).collect();
                let (got, _) = feed::<T>(&bytes[..n], &early);
                assert_eq!(got, whole, "refused at byte {n}");
            }
        }
    }

    fn vector(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/upstream-v2")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn upstream_messages_decode_the_same_however_split() {
        for name in [
            "client-update-add.bin",
            "client-update-addr.bin",
            "client-update-del2.bin",
            "client-update-on1-clear.bin",
            "client-update-on1-del.bin",
            "client-update-on1-replace.bin",
            "client-update-udprange.bin",
            "client-update-v6.bin",
        ] {
            let b = vector(name);
            assert!(at_once::<Update>(&b).is_ok(), "{name}");
            // Per pif: its id, its count, its table; then the final zero.
            same_however_split::<Update>(&b, 3 * 8 + 2);
        }
        for n in [1, 2] {
            let b = vector(&format!("server-listing-{n}.bin"));
            same_however_split::<HelloV2>(&b[..HELLO_V2_SIZE], 16);
            let b = &b[HELLO_V2_SIZE..];
            assert!(at_once::<ListingV2>(b).is_ok(), "listing {n}");
            same_however_split::<ListingV2>(b, 4 * 8 + 2);
        }
    }

    /// A full table on each of the most pifs: the largest update.
    fn largest_update() -> Update {
        let rules: Vec<Rule> = (0..MAX_RULES as u16)
            .map(|i| Rule::dual_stack(Proto::Tcp, 1000 + i, 1000 + i, 2000 + i))
            .collect();
        Update {
            tables: (1..=Limits::default().max_pifs as u8)
                .map(|id| (PifId(id), rules.clone()))
                .collect(),
        }
    }

    #[test]
    fn largest_update_dribbled_is_parsed_a_bounded_number_of_times() {
        let b = encode_to_vec(&largest_update());
        let every: Vec<usize> = (1..b.len()).collect();
        let (got, parses) = feed::<Update>(&b, &every);
        assert_eq!(got, Ok((largest_update(), b.len())));
        // Before: one parse per byte, 114,265 of them.
        assert!(parses <= 3 * 8 + 2, "{parses} parses");
        // Cut in two, at a prime step (every byte is the other tests' job
        // on smaller messages; a cut here costs a whole parse, of 16,384
        // rules on each of 8 pifs: 14 cuts, about 6 s unoptimised).
        for cut in (0..=b.len()).step_by(524_309) {
            assert_eq!(feed::<Update>(&b, &[cut]).0, got, "cut at {cut}");
        }
    }

    #[test]
    fn bad_updates_are_refused_at_the_same_byte_however_split() {
        let good = encode_to_vec(&Update {
            tables: vec![
                (PifId(1), vec![Rule::dual_stack(Proto::Tcp, 1, 1, 1)]),
                (PifId(3), vec![Rule::dual_stack(Proto::Udp, 2, 3, 4)]),
            ],
        });
        // A rule of the second table with an unknown protocol.
        let mut proto = good.clone();
        proto[1 + 4 + RULE_SIZE + 1 + 4 + 54] = 1;
        // The first pif again.
        let mut dup = good.clone();
        dup[1 + 4 + RULE_SIZE] = 1;
        // A count past the limit, in the second table.
        let mut count = good.clone();
        count[1 + 4 + RULE_SIZE + 1..][..4].copy_from_slice(&(MAX_RULES as u32 + 1).to_be_bytes());
        for b in [proto, dup, count] {
            assert!(at_once::<Update>(&b).is_err());
            same_however_split::<Update>(&b, 3 * 8 + 2);
        }
    }

    #[test]
    fn messages_in_a_row_decode_one_after_the_other() {
        let one = encode_to_vec(&largest_update());
        let mut both = one.clone();
        both.extend_from_slice(&one);
        let mut codec = WireCodec::<Update>::new(Limits::default());
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in both.chunks(1000) {
            buf.extend_from_slice(chunk);
            while let Some(u) = codec.decode(&mut buf).unwrap() {
                got.push(u);
            }
        }
        assert_eq!(got, vec![largest_update(), largest_update()]);
        assert!(buf.is_empty());
    }

    #[test]
    fn a_wrong_magic_is_refused_at_its_first_byte() {
        let mut codec = WireCodec::<HelloV2>::new(Limits::default());
        let mut buf = BytesMut::from(&b"basil:"[..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"x");
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::BadMagic(_))
        ));
    }
}
