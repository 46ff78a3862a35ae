//! pestod's command line: its options, merged with those of a
//! configuration file (`--config`), and the daemon's [`Options`] they make.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgMatches, Parser};

use super::PortArgs;
use crate::config::{ConfigError, ConfigFile};
use crate::control::ControlOptions;
use crate::control::state::Timeouts;
use crate::daemon::{Daemon, Options};
use crate::dataplane::{Settings, TcpSettings, UdpSettings};
use crate::netns::Netns;
use crate::rule::Caps;
use crate::spec::{Ephemeral, SpecOpt, parse_rules};
use crate::table::Table;
use crate::target::Targets;

/// Forward TCP and UDP ports to targets, with rules that change at run time.
#[derive(Debug, Parser)]
#[command(name = "pestod", version, after_help = AFTER_HELP, infer_long_args = true)]
pub struct DaemonArgs {
    /// Control socket path: `pesto PATH` changes the rules at run time
    /// (with socket activation, the socket systemd passes is served instead).
    #[arg(short = 'c', long = "control", value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// A second control socket that speaks protocol version 2, upstream
    /// passt's: for tools built for upstream pesto (same guards as -c).
    #[arg(long = "control-v2", value_name = "PATH")]
    pub control_v2: Option<PathBuf>,

    /// The rules to forward: -t/-u/-T/-U.
    #[command(flatten)]
    pub ports: PortArgs,

    /// Attach this network namespace (e.g. /run/netns/NAME,
    /// /proc/PID/ns/net): -t/-u rules then connect into it, -T/-U rules
    /// listen in it.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,

    /// Default target of rules without a target address, one per family
    /// [default: 127.0.0.1 and ::1].
    #[arg(long, value_name = "ADDR")]
    pub target: Vec<IpAddr>,

    /// Log at debug level.
    #[arg(short, long, conflicts_with = "quiet")]
    pub debug: bool,

    /// Log errors only.
    #[arg(short, long)]
    pub quiet: bool,

    /// Seconds without a datagram after which a UDP flow ends.
    #[arg(long, value_name = "SECS", default_value_t = 180,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub udp_timeout: u64,

    /// Most UDP flows at once; the oldest idle flow makes room for a new one.
    #[arg(long, value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_udp_flows: u64,

    /// Socket buffer size for each side of a TCP connection whose peer is a
    /// loopback address (0: the kernel's autotuning). Bounded buffers keep
    /// local transfers in the CPU caches; other peers always autotune.
    #[arg(long, value_name = "BYTES", default_value_t = 512 << 10,
          value_parser = clap::value_parser!(u64).range(0..=(1 << 30)))]
    pub tcp_loopback_buffer: u64,

    /// Do not try the other family's loopback when a rule without a target
    /// address finds its loopback target refusing (by default an IPv6
    /// client reaches a service that listens on 127.0.0.1 only, and an
    /// IPv4 client one on ::1 only).
    #[arg(long)]
    pub no_target_fallback: bool,

    /// Seconds that TCP connections in flight may go on after SIGINT or SIGTERM.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    pub shutdown_grace: f64,

    /// Seconds the control server waits for each client message.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub step_timeout: f64,

    /// Seconds the control server waits for COMMIT or ROLLBACK after applying;
    /// then it rolls back.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub commit_timeout: f64,

    /// Most control connections at once; a newcomer takes the slot of the
    /// oldest one that has not sent its hello, else it gets BUSY at once.
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_clients: u64,

    /// Most control connections at once from one uid other than root and
    /// the daemon's own.
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_clients_per_uid: u64,

    /// Most owners one uid other than root and the daemon's own may have;
    /// past it, a transaction that makes another is refused (LIMIT).
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_owners_per_uid: u64,

    /// Seconds a new control connection has to send its client hello.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    pub hello_timeout: f64,

    /// File mode of the control socket, in octal (e.g. 0660 for a group).
    #[arg(long, value_name = "MODE", default_value = "0600")]
    pub control_mode: String,

    /// Only this uid (and the daemon's own) may use the control socket;
    /// repeatable, checked with SO_PEERCRED.
    #[arg(long, value_name = "UID")]
    pub allow_uid: Vec<u32>,

    /// Only peers of this primary gid (or an allowed uid) may use it;
    /// repeatable.
    #[arg(long, value_name = "GID")]
    pub allow_gid: Vec<u32>,

    /// Serve the counters (those of `pesto --stats`) over HTTP at
    /// http://ADDR:PORT/metrics, in the Prometheus text format. Off by
    /// default; anyone who can reach the port can read them.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,

    /// Most connections the metrics endpoint serves at once; more are
    /// closed as soon as they are accepted.
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub metrics_max_conns: u64,

    /// Read options and rules from this TOML file (docs/pestod.md,
    /// "Configuration file"); options given here win over the file's.
    /// SIGHUP reads its rules again.
    #[arg(long, value_name = "FILE", conflicts_with = "check_config")]
    pub config: Option<PathBuf>,

    /// Check this configuration file (with the other options) as start-up
    /// would, bind nothing, and exit 0 if it is valid, else 1.
    #[arg(long, value_name = "FILE")]
    pub check_config: Option<PathBuf>,

    /// Log lines as text, or as one JSON object a line.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Save the tables here on every commit, and start from them when the
    /// file exists (it then replaces the -t/-u/-T/-U rules).
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text, coloured only on a terminal.
    Text,
    /// One JSON object a line.
    Json,
}

const AFTER_HELP: &str = "\
Examples:
  pestod -t 8080:80                forward TCP port 8080 (every address) to 127.0.0.1:80 and [::1]:80
  pestod -t 2222:22 -u 5353:53     TCP 2222 to 22, UDP 5353 to 53
  pestod -t 127.0.0.1/8443:192.0.2.10/443
                                   forward 127.0.0.1:8443 to 192.0.2.10:443
  pestod --netns /run/netns/ctr -t 8080:80 -T 5432
                                   host port 8080 to port 80 in the namespace; port
                                   5432 on its loopback to the host's port 5432
  pestod -c /run/pestod.sock -t 8080:80
                                   ... and take rule changes from `pesto /run/pestod.sock`

A rule whose target would be its own listener (e.g. `-t 8080` with the
default targets) is refused: map it to another port or give a target.";

/// The port specs in command-line order, as upstream adds them: `-u 53
/// -t 80` makes the UDP rule first.
pub fn ordered_specs(m: &ArgMatches) -> Vec<(SpecOpt, String)> {
    let mut specs = PortArgs::indexed(m);
    specs.sort_by_key(|(i, _, _)| *i);
    specs.into_iter().map(|(_, o, t)| (o, t)).collect()
}

/// Why the options make no daemon: a message for the user, which names
/// the option (`--NAME: ...`) when one is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OptionError(pub String);

impl From<String> for OptionError {
    fn from(message: String) -> OptionError {
        OptionError(message)
    }
}

/// The daemon's options from the command line and the file's rules.
pub fn options(
    args: &DaemonArgs,
    specs: &[(SpecOpt, String)],
    file: Option<&ConfigFile>,
) -> Result<Options, OptionError> {
    let netns = match &args.netns {
        Some(path) => Some(Netns::open(path).map_err(|e| e.to_string())?),
        None => None,
    };
    if netns.is_none() && !(args.ports.tcp_ns.is_empty() && args.ports.udp_ns.is_empty()) {
        return Err(OptionError(
            "-T and -U forward out of a namespace: give it with --netns".to_owned(),
        ));
    }
    let caps = Daemon::host_caps(netns.is_some());
    let eph = Ephemeral::probe();
    let mut host = Table::new(caps);
    let mut splice = Table::new(Daemon::splice_caps());
    for (opt, text) in specs {
        let opt = *opt;
        let table = if opt.is_namespace() {
            &mut splice
        } else {
            &mut host
        };
        let rules = parse_rules(opt, text, table.caps(), eph).map_err(|e| e.to_string())?;
        for rule in rules {
            table.add(rule).map_err(|e| format!("{opt} {text}: {e}"))?;
        }
    }
    let mut leases = std::collections::BTreeMap::new();
    let mut uids = Vec::new();
    if let Some(file) = file {
        let (hc, sc) = (host.caps(), splice.caps());
        let rules = file
            .rules(
                |pif| {
                    if pif == crate::rule::PifId::SPLICE {
                        sc
                    } else {
                        hc
                    }
                },
                eph,
            )
            .map_err(|e| e.to_string())?;
        for (pif, rules) in rules.tables {
            let table = if pif == crate::rule::PifId::SPLICE {
                &mut splice
            } else {
                &mut host
            };
            for (rule, owner) in rules {
                let text = rule.to_string();
                table
                    .add_owned(rule, owner)
                    .map_err(|e| format!("{}: {}: {e}", file.path.display(), text.trim_end()))?;
            }
        }
        leases = rules.leases;
        uids = rules.uids.into_iter().collect();
    }
    if netns.is_none() && !splice.is_empty() {
        return Err(OptionError(
            "-T and -U forward out of a namespace: give it with --netns".to_owned(),
        ));
    }
    let targets = targets(&args.target, caps)?;
    for ((_, name, place), table) in Daemon::pifs(netns.as_ref()).iter().zip([&host, &splice]) {
        Daemon::routes(table, targets, place).map_err(|(_, e)| format!("{name}: {e}"))?;
    }
    let secs = |name: &str, v: f64, min: f64| {
        if v.is_finite() && (min..=3600.0).contains(&v) {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(format!("--{name}: give {min} to 3600 seconds"))
        }
    };
    let shutdown_grace = secs("shutdown-grace", args.shutdown_grace, 0.0)?;
    let timeouts = Timeouts {
        step: secs("step-timeout", args.step_timeout, 0.001)?,
        commit: secs("commit-timeout", args.commit_timeout, 0.001)?,
    };
    Ok(Options {
        host,
        splice,
        netns,
        targets,
        dataplane: Settings {
            tcp: TcpSettings {
                loopback_buffer: usize::try_from(args.tcp_loopback_buffer).unwrap_or(usize::MAX),
                target_fallback: !args.no_target_fallback,
            },
            udp: UdpSettings {
                idle_timeout: Duration::from_secs(args.udp_timeout),
                max_flows: usize::try_from(args.max_udp_flows).unwrap_or(usize::MAX),
            },
        },
        shutdown_grace,
        control: args.control.clone(),
        control_v2: args.control_v2.clone(),
        timeouts,
        state_file: args.state_file.clone(),
        metrics: args.metrics,
        metrics_max_conns: usize::try_from(args.metrics_max_conns).unwrap_or(usize::MAX),
        leases,
        uids,
        control_options: ControlOptions {
            max_clients: usize::try_from(args.max_clients).unwrap_or(usize::MAX),
            mode: control_mode(&args.control_mode)?,
            allow_uids: args.allow_uid.clone(),
            allow_gids: args.allow_gid.clone(),
            hello_timeout: secs("hello-timeout", args.hello_timeout, 0.001)?,
            max_clients_per_uid: usize::try_from(args.max_clients_per_uid).unwrap_or(usize::MAX),
            max_owners_per_uid: usize::try_from(args.max_owners_per_uid).unwrap_or(usize::MAX),
        },
    })
}

/// An error about an option (`--NAME: ...`) whose value came from the
/// configuration file, said with the file, its line and the key.
pub fn in_file(error: &OptionError, m: &ArgMatches, file: Option<&ConfigFile>) -> String {
    use clap::parser::ValueSource;
    let msg = &error.0;
    let Some(file) = file else {
        return msg.to_owned();
    };
    let Some(body) = msg.strip_prefix("--") else {
        return msg.to_owned();
    };
    let name = body.split([' ', ':']).next().unwrap_or_default();
    let rest = body.split_once(": ").map_or(body, |(_, r)| r);
    let id = name.replace('-', "_");
    let from_cli = m.value_source(&id) == Some(ValueSource::CommandLine);
    match file.key_line(name) {
        Some(_) if !from_cli => file.option_error(name, rest.to_owned()).to_string(),
        _ => msg.to_owned(),
    }
}

/// Takes the file's value of each option the command line did not give.
pub fn merge_file(
    args: &mut DaemonArgs,
    m: &ArgMatches,
    file: &ConfigFile,
) -> Result<(), ConfigError> {
    use clap::parser::ValueSource;
    let f = &file.options;
    let given = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
    let bad = |key: &str, message: String| file.option_error(key, message);
    let range = |key: &str, v: u64, lo: u64, hi: u64| {
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(bad(key, format!("{v} is not in {lo} to {hi}")))
        }
    };
    macro_rules! take {
        ($field:ident, $id:literal, $conv:expr) => {
            if !given($id) {
                if let Some(v) = &f.$field {
                    args.$field = $conv(v.clone())?;
                }
            }
        };
    }
    fn some<T>(v: T) -> Result<Option<T>, ConfigError> {
        Ok(Some(v))
    }
    fn same<T>(v: T) -> Result<T, ConfigError> {
        Ok(v)
    }
    take!(control, "control", some);
    take!(control_v2, "control_v2", some);
    take!(netns, "netns", some);
    take!(target, "target", same);
    take!(debug, "debug", same);
    take!(quiet, "quiet", same);
    take!(udp_timeout, "udp_timeout", |v| range(
        "udp-timeout",
        v,
        1,
        u64::MAX
    ));
    take!(max_udp_flows, "max_udp_flows", |v| range(
        "max-udp-flows",
        v,
        1,
        1_000_000
    ));
    take!(tcp_loopback_buffer, "tcp_loopback_buffer", |v| {
        range("tcp-loopback-buffer", v, 0, 1 << 30)
    });
    take!(no_target_fallback, "no_target_fallback", same);
    take!(shutdown_grace, "shutdown_grace", same);
    take!(step_timeout, "step_timeout", same);
    take!(commit_timeout, "commit_timeout", same);
    take!(max_clients, "max_clients", |v| range(
        "max-clients",
        v,
        1,
        100_000
    ));
    take!(max_clients_per_uid, "max_clients_per_uid", |v| range(
        "max-clients-per-uid",
        v,
        1,
        100_000
    ));
    take!(max_owners_per_uid, "max_owners_per_uid", |v| range(
        "max-owners-per-uid",
        v,
        1,
        1_000_000
    ));
    take!(hello_timeout, "hello_timeout", same);
    take!(control_mode, "control_mode", same);
    take!(allow_uid, "allow_uid", same);
    take!(allow_gid, "allow_gid", same);
    take!(state_file, "state_file", some);
    take!(metrics, "metrics", some);
    take!(metrics_max_conns, "metrics_max_conns", |v| range(
        "metrics-max-conns",
        v,
        1,
        1024
    ));
    take!(log_format, "log_format", |v: String| {
        <LogFormat as clap::ValueEnum>::from_str(&v, false)
            .map_err(|_| bad("log-format", format!("'{v}': give text or json")))
    });
    Ok(())
}

/// An octal file mode for the control socket: owner read and write at least,
/// never anything for others beyond what is asked.
fn control_mode(text: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("--control-mode {text}: give an octal mode such as 0660"))?;
    if mode & 0o600 != 0o600 {
        return Err(format!(
            "--control-mode {text}: the owner needs read and write (0600 at least)"
        ));
    }
    Ok(mode)
}

/// The default targets: at most one `--target` per family, each a unicast
/// address of a family this host has.
fn targets(given: &[IpAddr], caps: Caps) -> Result<Targets, String> {
    let mut targets = Targets::default();
    let (mut v4, mut v6) = (false, false);
    for &addr in given {
        let addr = crate::rule::canonical_ip(addr);
        if addr.is_unspecified()
            || addr.is_multicast()
            || addr == IpAddr::from([255, 255, 255, 255])
        {
            return Err(format!("--target {addr}: not a unicast address"));
        }
        let seen = if addr.is_ipv4() { &mut v4 } else { &mut v6 };
        if std::mem::replace(seen, true) {
            return Err(format!("--target {addr}: one target per address family"));
        }
        if addr.is_ipv6() && !caps.contains(Caps::IPV6) {
            return Err(format!("--target {addr}: this host has no IPv6"));
        }
        targets.set(addr);
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::path::Path;

    fn parsed(argv: &[&str], file: &str) -> (DaemonArgs, ArgMatches, ConfigFile) {
        let m = DaemonArgs::command()
            .try_get_matches_from(std::iter::once("pestod").chain(argv.iter().copied()))
            .unwrap();
        let args = <DaemonArgs as clap::FromArgMatches>::from_arg_matches(&m).unwrap();
        let file = ConfigFile::parse(Path::new("/etc/pestod.toml"), file.to_owned()).unwrap();
        (args, m, file)
    }

    #[test]
    fn the_file_fills_what_the_command_line_left() {
        let (mut args, m, file) = parsed(
            &["--udp-timeout", "5"],
            "udp-timeout = 60\nmax-clients = 7\ncontrol-mode = \"0660\"\nlog-format = \"json\"\n",
        );
        merge_file(&mut args, &m, &file).unwrap();
        // Given on the command line: it wins.
        assert_eq!(args.udp_timeout, 5);
        assert_eq!(args.max_clients, 7);
        assert_eq!(args.control_mode, "0660");
        assert_eq!(args.log_format, LogFormat::Json);
        // Neither: the default.
        assert_eq!(args.max_udp_flows, 4096);
    }

    #[test]
    fn a_value_out_of_range_names_its_key_and_line() {
        let (mut args, m, file) = parsed(&[], "debug = true\nmax-clients = 0\n");
        let e = merge_file(&mut args, &m, &file).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("max-clients"));
        assert_eq!(e.line, Some(2));
        assert!(e.to_string().contains("0 is not in 1 to 100000"), "{e}");
        let (mut args, m, file) = parsed(&[], "log-format = \"xml\"\n");
        let e = merge_file(&mut args, &m, &file).unwrap_err();
        assert!(e.to_string().contains("'xml': give text or json"), "{e}");
    }

    #[test]
    fn an_option_error_is_said_with_the_file_when_it_came_from_there() {
        let (mut args, m, file) = parsed(&[], "control-mode = \"0400\"\n");
        merge_file(&mut args, &m, &file).unwrap();
        let e = options(&args, &[], Some(&file)).unwrap_err();
        assert!(e.0.starts_with("--control-mode 0400: "), "{e}");
        let said = in_file(&e, &m, Some(&file));
        assert!(
            said.contains("/etc/pestod.toml") && said.contains("control-mode"),
            "{said}"
        );
        // From the command line: said as it is.
        let (mut args, m, file) = parsed(&["--control-mode", "0400"], "debug = true\n");
        merge_file(&mut args, &m, &file).unwrap();
        let e = options(&args, &[], Some(&file)).unwrap_err();
        assert_eq!(in_file(&e, &m, Some(&file)), e.0);
    }

    #[test]
    fn namespace_specs_need_a_namespace() {
        let (args, _, _) = parsed(&["-T", "5432"], "");
        let specs = [(SpecOpt::TcpNs, "5432".to_owned())];
        let e = options(&args, &specs, None).unwrap_err();
        assert!(e.0.contains("give it with --netns"), "{e}");
    }
}
