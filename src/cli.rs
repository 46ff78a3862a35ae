//! The binaries' command lines, for the CLI only: what `pestod` and
//! `pesto` take, and what a configuration file adds to `pestod`'s.

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, Command};

use crate::spec::SpecOpt;

pub mod pestod;

/// The port-spec options `-t/-u/-T/-U`, the same in both binaries and
/// flattened into each (`#[command(flatten)]`). The texts are pestod's;
/// [`PortArgs::client_help`] gives pesto its own.
#[derive(Debug, Clone, Default, Args)]
pub struct PortArgs {
    /// TCP ports to forward (see docs/port-spec.md); repeatable.
    #[arg(short = 't', long = "tcp-ports", value_name = "SPEC")]
    pub tcp: Vec<String>,

    /// UDP ports to forward; repeatable.
    #[arg(short = 'u', long = "udp-ports", value_name = "SPEC")]
    pub udp: Vec<String>,

    /// TCP ports to forward from the namespace's loopback to the host's
    /// (needs --netns); repeatable.
    #[arg(short = 'T', long = "tcp-ns", value_name = "SPEC")]
    pub tcp_ns: Vec<String>,

    /// UDP ports to forward from the namespace's loopback to the host's.
    #[arg(short = 'U', long = "udp-ns", value_name = "SPEC")]
    pub udp_ns: Vec<String>,
}

/// The options' ids in `ArgMatches`, with the spec each one gives.
const IDS: [(&str, SpecOpt); 4] = [
    ("tcp", SpecOpt::Tcp),
    ("udp", SpecOpt::Udp),
    ("tcp_ns", SpecOpt::TcpNs),
    ("udp_ns", SpecOpt::UdpNs),
];

impl PortArgs {
    /// pesto's texts for the options, which change a running daemon's
    /// tables rather than forward.
    pub fn client_help(cmd: Command) -> Command {
        // In place: `mut_arg` would move each to the end, where completions
        // would list it.
        cmd.mut_args(|a| {
            let help = match a.get_id().as_str() {
                "tcp" => "TCP ports the daemon listens on (HOST table); see docs/port-spec.md",
                "udp" => "UDP ports the daemon listens on (HOST table)",
                "tcp_ns" => "TCP ports forwarded from the namespace to the host (SPLICE table)",
                "udp_ns" => "UDP ports forwarded from the namespace to the host (SPLICE table)",
                _ => return a,
            };
            a.help(help)
        })
    }

    /// Each spec with its index on the command line, so that a caller can
    /// put them in order among its own options: upstream applies them as
    /// given (`-u 53 -t 80` makes the UDP rule first).
    pub fn indexed(m: &ArgMatches) -> Vec<(usize, SpecOpt, String)> {
        let mut specs = Vec::new();
        for (id, opt) in IDS {
            // Defaults have indices too: only what the user typed counts.
            if m.value_source(id) != Some(ValueSource::CommandLine) {
                continue;
            }
            let (Some(at), Some(texts)) = (m.indices_of(id), m.get_many::<String>(id)) else {
                continue;
            };
            specs.extend(at.zip(texts).map(|(i, t)| (i, opt, t.clone())));
        }
        specs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[arg(short = 'A', action = clap::ArgAction::Append, num_args = 0,
              default_missing_value = "true")]
        add: Vec<bool>,
        #[command(flatten)]
        ports: PortArgs,
    }

    #[test]
    fn specs_keep_their_places_among_other_options() {
        use clap::CommandFactory;
        let m = Cli::command()
            .try_get_matches_from(["x", "-u", "53", "-A", "-t", "80", "-T", "5432"])
            .unwrap();
        let mut specs = PortArgs::indexed(&m);
        specs.sort_by_key(|(i, _, _)| *i);
        let add = m.indices_of("add").unwrap().next().unwrap();
        let at: Vec<(usize, SpecOpt)> = specs.iter().map(|(i, o, _)| (*i, *o)).collect();
        assert_eq!(at.len(), 3);
        assert_eq!(at[0].1, SpecOpt::Udp);
        assert!(at[0].0 < add && add < at[1].0);
        assert_eq!((at[1].1, at[2].1), (SpecOpt::Tcp, SpecOpt::TcpNs));
    }
}
