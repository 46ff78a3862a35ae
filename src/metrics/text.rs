//! The metrics text of one snapshot, made a chunk at a time: a scrape
//! holds its snapshot and at most one chunk, never the whole text (14 MB
//! for 16,000 rules), and the next chunk is made only when the connection
//! has taken the last one.
//!
//! Two formats, chosen by the scraper's `Accept` header: Prometheus' text
//! format 0.0.4 by default, OpenMetrics 1.0 when asked for. They differ in
//! what a counter's family is called (`x_total` in 0.0.4, `x` in
//! OpenMetrics) and in the closing `# EOF`. Written here rather than with
//! a metrics library because the text is streamed from one snapshot in
//! bounded chunks, which the libraries' encoders, writing the whole
//! registry at once, do not do.

use std::fmt::Write as _;

use hyper::body::Bytes;

use crate::rule::{Flags, Proto, Rule};
use crate::stats::{DaemonCounters, Labelled, RuleCounters};

/// About how many bytes a chunk holds: a chunk ends after the first line
/// that takes it past this.
pub const CHUNK: usize = 32 * 1024;

/// The endpoint's own figures (see [`super::MetricsServer`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    /// Connections served now.
    pub open: u64,
    /// Connections taken, in all.
    pub accepted: u64,
    /// Connections closed at once: the endpoint already served its most.
    pub refused_max_conns: u64,
    /// Connections closed at once: their descriptor was past the data
    /// plane's share, in the control plane's reserve.
    pub refused_descriptors: u64,
    /// Connections closed for not sending a request's head in time.
    pub timed_out_header: u64,
    /// Connections closed for moving no byte for the idle timeout.
    pub timed_out_idle: u64,
}

/// A figure of one rule.
type Field = fn(&RuleCounters) -> u64;

/// The text format of a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus' text exposition format, version 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics only when it
    /// names it, as Prometheus does when it prefers it; anything else
    /// (none, `text/plain`, `*/*`) gets the 0.0.4 text every parser reads.
    pub fn from_accept(accept: Option<&str>) -> Format {
        let wants = |a: &str| {
            a.split(',').any(|part| {
                let mut fields = part.split(';');
                let kind = fields.next().unwrap_or("").trim();
                let refused = fields.any(|f| {
                    let f = f.trim();
                    f.strip_prefix("q=")
                        .is_some_and(|q| q.trim().parse::<f32>() == Ok(0.0))
                });
                kind.eq_ignore_ascii_case("application/openmetrics-text") && !refused
            })
        };
        if accept.is_some_and(wants) {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// The `Content-Type` of a reply in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// What a per-rule family is.
struct Family {
    name: &'static str,
    help: &'static str,
    counter: bool,
    /// The protocol whose rules have this family; `None`: every rule.
    proto: Option<Proto>,
    field: Field,
}

/// The per-rule families, in the order they are written.
const FAMILIES: [Family; 9] = [
    Family {
        name: "tcp_connections_open",
        help: "TCP connections open now",
        proto: Some(Proto::Tcp),
        counter: false,
        field: |c| c.tcp_active,
    },
    Family {
        name: "udp_flows_open",
        help: "UDP flows open now",
        proto: Some(Proto::Udp),
        counter: false,
        field: |c| c.udp_active,
    },
    Family {
        name: "tcp_connections",
        help: "TCP connections accepted",
        proto: Some(Proto::Tcp),
        counter: true,
        field: |c| c.tcp_total,
    },
    Family {
        name: "received_bytes",
        help: "Bytes from clients to the target",
        proto: None,
        counter: true,
        field: |c| c.bytes_in,
    },
    Family {
        name: "sent_bytes",
        help: "Bytes from the target back to clients",
        proto: None,
        counter: true,
        field: |c| c.bytes_out,
    },
    Family {
        name: "udp_flows",
        help: "UDP flows opened",
        proto: Some(Proto::Udp),
        counter: true,
        field: |c| c.udp_total,
    },
    Family {
        name: "received_datagrams",
        help: "Datagrams from peers to the target",
        proto: Some(Proto::Udp),
        counter: true,
        field: |c| c.datagrams_in,
    },
    Family {
        name: "sent_datagrams",
        help: "Datagrams from the target to peers",
        proto: Some(Proto::Udp),
        counter: true,
        field: |c| c.datagrams_out,
    },
    Family {
        name: "dropped_datagrams",
        help: "Datagrams dropped: no flow could be opened",
        proto: Some(Proto::Udp),
        counter: true,
        field: |c| c.dropped,
    },
];

/// One rule's counters and labels.
#[derive(Debug)]
struct Row {
    pif: usize,
    rule: Rule,
    counters: RuleCounters,
}

/// Where the text is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The daemon's and the endpoint's figures.
    Head,
    /// Per-rule family `family`, at row `row`.
    Rules { family: usize, row: usize },
    /// Failed connects, at row `row`.
    Failures { row: usize },
    /// The `# EOF` line.
    Eof,
    /// Nothing left.
    Done,
}

/// The text of one snapshot, to be taken a chunk at a time.
#[derive(Debug)]
pub struct Text {
    daemon: DaemonCounters,
    endpoint: EndpointCounters,
    pifs: Vec<String>,
    rows: Vec<Row>,
    format: Format,
    step: Step,
}

impl Text {
    /// The text of `snapshot` (counters and labels of one moment) and of
    /// the endpoint's `endpoint` figures, in `format`.
    pub fn new(snapshot: Labelled, endpoint: EndpointCounters, format: Format) -> Text {
        let mut pifs = Vec::with_capacity(snapshot.pifs.len());
        let mut rows = Vec::new();
        for (i, ((name, rules), stats)) in snapshot
            .pifs
            .into_iter()
            .zip(snapshot.stats.pifs)
            .enumerate()
        {
            pifs.push(name);
            rows.extend(
                rules
                    .into_iter()
                    .zip(stats.rules)
                    .map(|(rule, counters)| Row {
                        pif: i,
                        rule,
                        counters,
                    }),
            );
        }
        Text {
            daemon: snapshot.stats.daemon,
            endpoint,
            pifs,
            rows,
            format,
            step: Step::Head,
        }
    }

    /// Whether every chunk has been taken.
    pub fn is_done(&self) -> bool {
        self.step == Step::Done
    }

    /// The next chunk, `None` after the last.
    pub fn next_chunk(&mut self) -> Option<Bytes> {
        if self.is_done() {
            return None;
        }
        let mut out = String::with_capacity(CHUNK + 1024);
        while out.len() < CHUNK && !self.is_done() {
            self.step = self.line(&mut out);
        }
        if self.is_done() {
            // The text is all out: let the snapshot go before the
            // connection has even sent it.
            self.rows = Vec::new();
        }
        Some(Bytes::from(out))
    }

    /// Writes what comes at `self.step` (a line or a few) and says what
    /// comes after. Writing to a String cannot fail.
    fn line(&self, out: &mut String) -> Step {
        match self.step {
            Step::Head => {
                self.head(out);
                Step::Rules { family: 0, row: 0 }
            }
            Step::Rules { family, row } => {
                let Some(f) = FAMILIES.get(family) else {
                    return Step::Failures { row: 0 };
                };
                if row == 0 {
                    header(out, self.format, f.name, f.help, f.counter);
                }
                let Some(r) = self.rows.get(row) else {
                    return Step::Rules {
                        family: family + 1,
                        row: 0,
                    };
                };
                if f.proto.is_none_or(|p| p == r.rule.proto) {
                    sample(
                        out,
                        f.name,
                        f.counter,
                        &self.labels(r),
                        (f.field)(&r.counters),
                    );
                }
                Step::Rules {
                    family,
                    row: row + 1,
                }
            }
            Step::Failures { row } => {
                if row == 0 {
                    header(
                        out,
                        self.format,
                        "connect_failures",
                        "Failed connects to the target, by errno",
                        true,
                    );
                }
                let Some(r) = self.rows.get(row) else {
                    return Step::Eof;
                };
                if !r.counters.connect_failed.is_empty() {
                    let labels = self.labels(r);
                    for (errno, n) in &r.counters.connect_failed {
                        let labels = format!("{labels},errno=\"{errno}\"");
                        sample(out, "connect_failures", true, &labels, *n);
                    }
                }
                Step::Failures { row: row + 1 }
            }
            Step::Eof => {
                if self.format == Format::OpenMetrics {
                    out.push_str("# EOF\n");
                }
                Step::Done
            }
            Step::Done => Step::Done,
        }
    }

    /// The labels of a row: `pif`, `proto`, `listen` and `ports`, which
    /// name a rule uniquely (rules of a pif never overlap).
    fn labels(&self, r: &Row) -> String {
        rule_labels(self.pifs.get(r.pif).map_or("", String::as_str), &r.rule)
    }

    /// The daemon's figures, then the endpoint's.
    fn head(&self, out: &mut String) {
        let d = &self.daemon;
        let format = self.format;
        let header =
            |out: &mut String, name, help, counter| header(out, format, name, help, counter);
        let one = |out: &mut String, name, help, counter, v| {
            header(out, name, help, counter);
            sample(out, name, counter, "", v);
        };
        header(
            out,
            "build_info",
            "The pestod build serving this endpoint",
            false,
        );
        let mut version = String::from("version=\"");
        escape(&mut version, env!("CARGO_PKG_VERSION"));
        version.push('"');
        sample(out, "build_info", false, &version, 1);
        one(
            out,
            "uptime_seconds",
            "Seconds since pestod started",
            false,
            d.uptime,
        );
        one(out, "open_files", "Descriptors open now", false, d.fds_open);
        one(
            out,
            "open_files_limit",
            "The open-files limit",
            false,
            d.fds_limit,
        );
        one(
            out,
            "refused",
            "TCP connections and UDP flows refused for want of descriptors",
            true,
            d.refused,
        );
        header(out, "transactions", "Control transactions by outcome", true);
        for (outcome, n) in [
            ("committed", d.committed),
            ("rolled_back", d.rolled_back),
            ("stale", d.stale),
            ("busy", d.busy),
            ("denied", d.denied),
            ("timed_out", d.timed_out),
            ("invalid", d.invalid),
            ("protocol", d.protocol),
        ] {
            sample(
                out,
                "transactions",
                true,
                &format!("outcome=\"{outcome}\""),
                n,
            );
        }
        let e = &self.endpoint;
        one(
            out,
            "metrics_connections_open",
            "Connections to this endpoint open now",
            false,
            e.open,
        );
        one(
            out,
            "metrics_connections",
            "Connections to this endpoint served",
            true,
            e.accepted,
        );
        header(
            out,
            "metrics_refused",
            "Connections to this endpoint closed as soon as accepted",
            true,
        );
        sample(
            out,
            "metrics_refused",
            true,
            "reason=\"max_conns\"",
            e.refused_max_conns,
        );
        sample(
            out,
            "metrics_refused",
            true,
            "reason=\"descriptors\"",
            e.refused_descriptors,
        );
        header(
            out,
            "metrics_timed_out",
            "Connections to this endpoint closed for want of progress",
            true,
        );
        sample(
            out,
            "metrics_timed_out",
            true,
            "reason=\"header\"",
            e.timed_out_header,
        );
        sample(
            out,
            "metrics_timed_out",
            true,
            "reason=\"idle\"",
            e.timed_out_idle,
        );
    }
}

/// The labels that name `rule` of pif `pif`, escaped.
fn rule_labels(pif: &str, rule: &Rule) -> String {
    let mut s = String::from("pif=\"");
    escape(&mut s, pif);
    let proto = match rule.proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    };
    let _ = write!(s, "\",proto=\"{proto}\",listen=\"");
    if rule.flags.contains(Flags::DUAL_STACK_ANY) {
        s.push('*');
    } else {
        let _ = write!(s, "{}", rule.addr);
    }
    if let Some(ifname) = &rule.ifname {
        s.push('%');
        escape(&mut s, ifname.as_str());
    }
    let _ = if rule.first == rule.last {
        write!(s, "\",ports=\"{}\"", rule.first)
    } else {
        write!(s, "\",ports=\"{}-{}\"", rule.first, rule.last)
    };
    s
}

/// The `# HELP` and `# TYPE` lines of family `name`: in 0.0.4 a counter's
/// family is named as its samples are, with `_total`; in OpenMetrics
/// without it.
fn header(out: &mut String, format: Format, name: &str, help: &str, counter: bool) {
    let kind = if counter { "counter" } else { "gauge" };
    let suffix = if counter && format == Format::Prometheus {
        "_total"
    } else {
        ""
    };
    let _ = write!(
        out,
        "# HELP pestod_{name}{suffix} {help}.\n# TYPE pestod_{name}{suffix} {kind}\n"
    );
}

/// One sample of family `name`; `labels` are escaped already.
fn sample(out: &mut String, name: &str, counter: bool, labels: &str, v: u64) {
    let suffix = if counter { "_total" } else { "" };
    let _ = if labels.is_empty() {
        writeln!(out, "pestod_{name}{suffix} {v}")
    } else {
        writeln!(out, "pestod_{name}{suffix}{{{labels}}} {v}")
    };
}

/// `value` as a label value: backslash, quote and newline escaped.
fn escape(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::v3::{PifStats, Stats};
    use crate::rule::{PifId, Proto};

    fn snapshot(n: u16) -> Labelled {
        let rules: Vec<Rule> = (0..n)
            .map(|i| {
                let port = 20_000 + i;
                Rule::new(Proto::Tcp, [127, 0, 0, 1].into(), port, port, 80)
            })
            .collect();
        let counters = (0..n)
            .map(|i| RuleCounters {
                tcp_total: u64::from(i),
                connect_failed: if i == 1 { vec![(111, 2)] } else { vec![] },
                ..RuleCounters::default()
            })
            .collect();
        Labelled {
            stats: Stats {
                daemon: DaemonCounters::default(),
                pifs: vec![PifStats {
                    id: PifId(1),
                    rules: counters,
                }],
            },
            pifs: vec![("HOST".to_owned(), rules)],
        }
    }

    fn whole(mut t: Text) -> (String, usize) {
        let (mut s, mut chunks) = (String::new(), 0);
        while let Some(c) = t.next_chunk() {
            assert!(c.len() < CHUNK + 1024, "a chunk of {} bytes", c.len());
            s.push_str(std::str::from_utf8(&c).expect("utf-8"));
            chunks += 1;
        }
        (s, chunks)
    }

    const ZERO: EndpointCounters = EndpointCounters {
        open: 0,
        accepted: 0,
        refused_max_conns: 0,
        refused_descriptors: 0,
        timed_out_header: 0,
        timed_out_idle: 0,
    };

    #[test]
    fn every_family_once_then_eof() {
        let (s, chunks) = whole(Text::new(snapshot(3), ZERO, Format::OpenMetrics));
        assert_eq!(chunks, 1);
        assert!(s.ends_with("# EOF\n"), "{s}");
        assert_eq!(
            s.matches("# TYPE pestod_tcp_connections counter").count(),
            1
        );
        assert!(
            s.contains(
                "pestod_tcp_connections_total{pif=\"HOST\",proto=\"tcp\",listen=\"127.0.0.1\",ports=\"20002\"} 2\n"
            ),
            "{s}"
        );
        assert!(
            s.contains("pestod_connect_failures_total{pif=\"HOST\",proto=\"tcp\",listen=\"127.0.0.1\",ports=\"20001\",errno=\"111\"} 2\n"),
            "{s}"
        );
        // TCP rules have no UDP series.
        assert!(!s.contains("pestod_udp_flows_open{"), "{s}");
        assert!(s.contains("# TYPE pestod_udp_flows_open gauge\n"), "{s}");
        assert!(
            s.contains("pestod_metrics_refused_total{reason=\"max_conns\"} 0\n"),
            "{s}"
        );
    }

    #[test]
    fn a_large_table_comes_in_bounded_chunks() {
        let (s, chunks) = whole(Text::new(snapshot(2000), ZERO, Format::Prometheus));
        assert!(chunks > 10, "{chunks} chunks");
        // Each family's lines stay together, under their one header.
        assert_eq!(
            s.matches("# TYPE pestod_sent_bytes_total counter").count(),
            1
        );
        assert_eq!(s.matches("pestod_sent_bytes_total{").count(), 2000);
        assert!(!s.contains("# EOF"));
    }

    #[test]
    fn the_classic_format_names_each_family_as_its_samples() {
        let (s, _) = whole(Text::new(snapshot(2), ZERO, Format::Prometheus));
        // Every sample's name has its HELP and TYPE, under that very name.
        for line in s.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            assert!(s.contains(&format!("# HELP {name} ")), "no HELP for {name}");
            assert!(s.contains(&format!("# TYPE {name} ")), "no TYPE for {name}");
        }
        assert!(s.contains(&format!(
            "pestod_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn the_accept_header_picks_the_format() {
        use Format::*;
        for (accept, want) in [
            (None, Prometheus),
            (Some("text/plain;version=0.0.4"), Prometheus),
            (Some("*/*"), Prometheus),
            (
                Some("application/openmetrics-text;version=1.0.0"),
                OpenMetrics,
            ),
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                OpenMetrics,
            ),
            (Some("Application/OpenMetrics-Text; q=0"), Prometheus),
        ] {
            assert_eq!(Format::from_accept(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn labels_name_interface_ranges_and_every_address() {
        let mut r = Rule::new(Proto::Udp, "::".parse().expect("addr"), 53, 60, 53);
        r.flags = Flags::DUAL_STACK_ANY;
        r.ifname = Some(crate::rule::IfName::new("eth0").expect("ifname"));
        assert_eq!(
            rule_labels("HOST", &r),
            "pif=\"HOST\",proto=\"udp\",listen=\"*%eth0\",ports=\"53-60\""
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut s = String::new();
        escape(&mut s, "a\"b\\c\nd");
        assert_eq!(s, "a\\\"b\\\\c\\nd");
    }
}
