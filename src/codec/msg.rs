//! Version 3's message types: the first byte of every message after the
//! hellos.

/// Server: the pif list (step 3).
pub const PIFS: u8 = 0x01;
/// Server: each pif's rules and generation (step 4).
pub const RULES: u8 = 0x02;
/// Server: an acknowledgement or an error.
pub const STATUS: u8 = 0x03;
/// Server: what an apply bound (step 8).
pub const REPORT: u8 = 0x04;
/// Client: new tables (step 5).
pub const UPDATE: u8 = 0x10;
/// Client: make the proposed tables active (step 7).
pub const APPLY: u8 = 0x11;
/// Client: keep the applied tables (step 9).
pub const COMMIT: u8 = 0x12;
/// Client: go back to the tables before the apply (step 9).
pub const ROLLBACK: u8 = 0x13;
/// Server: each pif's rules with their owners and the scopes'
/// generations (step 4, to a client with the [`super::v3::OWNERS`] flag).
pub const RULES_OWNED: u8 = 0x05;
/// Client: new rule sets of (pif, owner) scopes (step 5).
pub const UPDATE_SCOPED: u8 = 0x14;
/// Server: what each listed rule really has, and which pifs hold
/// applied, uncommitted changes (step 4, after the rules, to a client
/// with the [`super::v3::HEALTH`] flag).
pub const HEALTH: u8 = 0x06;
/// Server: the ports that went through close-and-rebind (step 8, after
/// the report, to a client with the [`super::v3::MOVES`] flag).
pub const MOVED: u8 = 0x07;
/// Server: the daemon's and each rule's counters (step 4, after the
/// rules and HEALTH, to a client with the [`super::v3::STATS`] flag).
pub const STATS: u8 = 0x08;
