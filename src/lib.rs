//! pesto: a port forwarder whose forwarding rules change at run time
//! through a transactional, concurrent control protocol.
//!
//! The modules, one per concept:
//! - [`rule`]: what a forwarding rule is, and the pifs that own tables;
//! - [`spec`]: the `-t`/`-u`/`-T`/`-U` port-spec syntax;
//! - [`table`]: a pif's rule table and the validation of its rules;
//! - [`owner`]: the owner labels that tenants put on their rules;
//! - [`scope`]: one owner's rules on one pif, replaced as a whole;
//! - [`lease`]: owners' rules that go when a process exits or a TTL ends;
//! - [`edit`]: upstream pesto's sequential `-A`/`-D`/`-C` table operations;
//! - [`codec`]: control-protocol messages to and from bytes;
//! - [`socket`]: what identifies a listening socket, and how one is made;
//! - [`netns`]: network namespaces, and making sockets inside one;
//! - [`target`]: where a rule's traffic goes, and loop detection;
//! - [`registry`]: the listening sockets, kept across table swaps;
//! - [`scan`]: what `auto` rules' targets listen on;
//! - [`dataplane`]: TCP relaying with splice(2), UDP flows;
//! - [`client`]: the client library, one transaction step by step;
//! - `cli` (feature `cli`): the options both binaries share, and pestod's;
//! - [`control`]: the control server, one transaction per connection;
//! - [`statefile`]: the committed tables, saved and restored;
//! - [`daemon`]: the daemon from start-up to shutdown;
//! - [`systemd`]: readiness notification and socket activation.
//!
//! ```
//! use pesto::rule::Caps;
//! use pesto::spec::{Ephemeral, SpecOpt, parse_rules};
//!
//! // HOST-like pif: IPv4, IPv6, TCP, UDP, interface names.
//! let caps = Caps::from_bits_retain(0x2f);
//! let rules = parse_rules(SpecOpt::Tcp, "2000-2010,~2005:3000", caps, Ephemeral::default());
//! assert!(rules.is_err()); // an exclusion takes no target
//! let rules = parse_rules(SpecOpt::Tcp, "2000-2010,~2005", caps, Ephemeral::default()).unwrap();
//! let shown: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
//! assert_eq!(shown, ["TCP [*]:2000-2004  =>  2000-2004 ", "TCP [*]:2006-2010  =>  2006-2010 "]);
//! ```

// Denied, not forbidden: taking ownership of the descriptor that systemd
// passes needs `unsafe`, allowed in that one function of `systemd` alone.
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "cli")]
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod edit;
#[doc(hidden)]
pub mod fuzzing;
pub mod lease;
#[cfg(feature = "cli")]
pub mod manual;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod netns;
pub mod owner;
pub mod registry;
pub mod rule;
pub mod scan;
pub mod scope;
pub mod socket;
pub mod spec;
pub mod statefile;
pub mod stats;
pub mod systemd;
pub mod table;
pub mod target;
pub mod throttle;
