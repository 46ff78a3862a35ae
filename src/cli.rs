//! The binaries' command lines, for the CLI only: what `pestod` and
//! `pesto` take, and what a configuration file adds to `pestod`'s.

pub mod pestod;
