//! pesto: a port forwarder whose forwarding rules change at run time
//! through a transactional, concurrent control protocol.
//!
//! The modules, one per concept:
//! - [`rule`]: what a forwarding rule is, and the pifs that own tables;
//! - [`spec`]: the `-t`/`-u`/`-T`/`-U` port-spec syntax;
//! - [`table`]: a pif's rule table and the validation of its rules;
//! - [`edit`]: upstream pesto's sequential `-A`/`-D`/`-C` table operations;
//! - [`codec`]: control-protocol messages to and from bytes.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod edit;
pub mod rule;
pub mod spec;
pub mod table;
