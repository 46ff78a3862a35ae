//! The port-spec syntax: every example of upstream's pesto(1)/passt(1) list,
//! the extensions (target addresses), and every error path.

use pesto::edit::{self, EditError, Op};
use pesto::rule::{Caps, Flags, PifId, Rule};
use pesto::spec::{Ephemeral, SpecOpt, SpecProblem, parse_rules};
use pesto::table::{Config, PifTable, RuleError, Table};

const ALL: Caps = Caps::from_bits_retain(0x3f);
const NO_SCAN: Caps = Caps::from_bits_retain(0x2f);
const EPH: Ephemeral = Ephemeral {
    first: 32768,
    last: 60999,
};

/// The rules of a spec, displayed, one per line.
fn show(opt: SpecOpt, spec: &str, caps: Caps) -> Vec<String> {
    parse_rules(opt, spec, caps, EPH)
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|r| r.to_string())
        .collect()
}

fn t(spec: &str) -> Vec<String> {
    show(SpecOpt::Tcp, spec, ALL)
}

fn problem(opt: SpecOpt, spec: &str, caps: Caps) -> SpecProblem {
    parse_rules(opt, spec, caps, EPH).unwrap_err().problem
}

#[test]
fn upstream_examples() {
    assert_eq!(
        t("all"),
        [
            "TCP [*]:1-32767  =>  1-32767  (best effort)",
            "TCP [*]:61000-65535  =>  61000-65535  (best effort)"
        ]
    );
    assert_eq!(
        t("::1/all"),
        [
            "TCP [::1]:1-32767  =>  1-32767  (best effort)",
            "TCP [::1]:61000-65535  =>  61000-65535  (best effort)"
        ]
    );
    assert_eq!(
        t("127.0.0.1/all")[0],
        "TCP [127.0.0.1]:1-32767  =>  1-32767  (best effort)"
    );
    assert_eq!(t("22"), ["TCP [*]:22  =>  22 "]);
    assert_eq!(t("22:23"), ["TCP [*]:22  =>  23 "]);
    assert_eq!(t("22,25"), ["TCP [*]:22  =>  22 ", "TCP [*]:25  =>  25 "]);
    assert_eq!(t("22-80"), ["TCP [*]:22-80  =>  22-80 "]);
    assert_eq!(t("22-80:32-90"), ["TCP [*]:22-80  =>  32-90 "]);
    assert_eq!(t("192.0.2.1/22"), ["TCP [192.0.2.1]:22  =>  22 "]);
    assert_eq!(t("192.0.2.1/5"), ["TCP [192.0.2.1]:5  =>  5 "]);
    assert_eq!(t("192.0.2.1%eth0/22"), ["TCP [192.0.2.1]%eth0:22  =>  22 "]);
    assert_eq!(t("%eth0/22"), ["TCP [*]%eth0:22  =>  22 "]);
    assert_eq!(
        t("2000-5000,~3000-3010"),
        [
            "TCP [*]:2000-2999  =>  2000-2999 ",
            "TCP [*]:3011-5000  =>  3011-5000 "
        ]
    );
    assert_eq!(
        t("192.0.2.1/20-30,~25"),
        [
            "TCP [192.0.2.1]:20-24  =>  20-24 ",
            "TCP [192.0.2.1]:26-30  =>  26-30 "
        ]
    );
    assert_eq!(
        t("5-25,~10-20"),
        ["TCP [*]:5-9  =>  5-9 ", "TCP [*]:21-25  =>  21-25 "]
    );
    assert_eq!(
        t("~20000-20010"),
        [
            "TCP [*]:1-19999  =>  1-19999  (best effort)",
            "TCP [*]:20011-32767  =>  20011-32767  (best effort)",
            "TCP [*]:61000-65535  =>  61000-65535  (best effort)"
        ]
    );
    assert_eq!(
        t("~25"),
        [
            "TCP [*]:1-24  =>  1-24  (best effort)",
            "TCP [*]:26-32767  =>  26-32767  (best effort)",
            "TCP [*]:61000-65535  =>  61000-65535  (best effort)"
        ]
    );
    assert_eq!(
        t("auto"),
        [
            "TCP [*]:1-32767  =>  1-32767  (best effort) (auto-scan)",
            "TCP [*]:61000-65535  =>  61000-65535  (best effort) (auto-scan)"
        ]
    );
    assert_eq!(
        t("::1/auto")[0],
        "TCP [::1]:1-32767  =>  1-32767  (best effort) (auto-scan)"
    );
    assert_eq!(
        t("192.0.2.2/auto")[0],
        "TCP [192.0.2.2]:1-32767  =>  1-32767  (best effort) (auto-scan)"
    );
    assert_eq!(
        t("8000-8010,auto"),
        ["TCP [*]:8000-8010  =>  8000-8010  (auto-scan)"]
    );
    assert_eq!(show(SpecOpt::Udp, "53", ALL), ["UDP [*]:53  =>  53 "]);
    assert_eq!(parse_rules(SpecOpt::Tcp, "none", ALL, EPH).unwrap(), vec![]);
}

#[test]
fn target_addresses() {
    assert_eq!(
        t("192.0.2.1%eth0/8080:198.51.100.7/80"),
        ["TCP [192.0.2.1]%eth0:8080  =>  198.51.100.7:80 "]
    );
    // No listening address: the wildcard of the target's family.
    assert_eq!(
        t("8080:198.51.100.7/80"),
        ["TCP [0.0.0.0]:8080  =>  198.51.100.7:80 "]
    );
    assert_eq!(
        t("8080-8081:198.51.100.7"),
        ["TCP [0.0.0.0]:8080-8081  =>  198.51.100.7:8080-8081 "]
    );
    assert_eq!(
        t("443:[2001:db8::2]/8443"),
        ["TCP [::]:443  =>  [2001:db8::2]:8443 "]
    );
    assert_eq!(t("::1/443:::2/8443"), ["TCP [::1]:443  =>  [::2]:8443 "]);
    assert_eq!(
        t("127.0.0.1/all:127.0.0.2")[0],
        "TCP [127.0.0.1]:1-32767  =>  127.0.0.2:1-32767  (best effort)"
    );
    assert_eq!(t("[127.0.0.1]/22"), ["TCP [127.0.0.1]:22  =>  22 "]);
    assert_eq!(t("*/22"), ["TCP [*]:22  =>  22 "]);
    assert_eq!(t("[::ffff:127.0.0.1]/22"), ["TCP [127.0.0.1]:22  =>  22 "]);
}

#[test]
fn default_address_follows_pif_families() {
    let v4 = Caps::IPV4 | Caps::TCP;
    let v6 = Caps::IPV6 | Caps::TCP;
    assert_eq!(show(SpecOpt::Tcp, "22", v4), ["TCP [0.0.0.0]:22  =>  22 "]);
    assert_eq!(show(SpecOpt::Tcp, "22", v6), ["TCP [::]:22  =>  22 "]);
    let r = &parse_rules(SpecOpt::Tcp, "22", ALL, EPH).unwrap()[0];
    assert!(r.flags.contains(Flags::DUAL_STACK_ANY));
}

#[test]
fn namespace_options_bind_loopback() {
    assert_eq!(show(SpecOpt::TcpNs, "80", ALL), ["TCP [*]%lo:80  =>  80 "]);
    assert_eq!(show(SpecOpt::UdpNs, "53", ALL), ["UDP [*]%lo:53  =>  53 "]);
    // Without SO_BINDTODEVICE: one rule per loopback address.
    let caps = Caps::IPV4 | Caps::IPV6 | Caps::TCP;
    assert_eq!(
        show(SpecOpt::TcpNs, "80-81", caps),
        [
            "TCP [127.0.0.1]:80-81  =>  80-81 ",
            "TCP [::1]:80-81  =>  80-81 "
        ]
    );
    assert_eq!(
        problem(SpecOpt::TcpNs, "127.0.0.1/80", ALL),
        SpecProblem::AddressNotAllowed
    );
}

#[test]
fn errors_name_the_problem() {
    use SpecProblem::*;
    let cases: &[(&str, SpecProblem)] = &[
        ("", Empty),
        ("127.0.0.1/", Empty),
        ("22,,25", EmptyChunk),
        ("300.1.1.1/22", BadAddress("300.1.1.1".into())),
        ("fe80::zz/22", BadAddress("fe80::zz".into())),
        ("65536", BadPort("65536".into())),
        ("22a", BadPort("22a".into())),
        ("-5", BadChunk("-5".into())),
        ("+5", BadChunk("+5".into())),
        ("80-22", BadRange("80-22".into())),
        ("~80-22", BadRange("80-22".into())),
        (
            "22-80:32",
            RangeLength {
                listen: "22-80".into(),
                listen_len: 59,
                target: "32".into(),
                target_len: 1,
            },
        ),
        ("22:1.2.3/80", BadTarget("1.2.3".into())),
        ("all:nowhere", BadTarget("nowhere".into())),
        ("bogus", BadChunk("bogus".into())),
        ("autox", BadChunk("autox".into())),
        ("22,all", BadChunk("all".into())),
    ];
    for (spec, want) in cases {
        let err = parse_rules(SpecOpt::Tcp, spec, ALL, EPH).unwrap_err();
        assert_eq!(&err.problem, want, "spec {spec:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("invalid port spec '-t {spec}'")),
            "{msg}"
        );
    }
    assert_eq!(problem(SpecOpt::Tcp, "auto", NO_SCAN), ScanUnsupported);
    assert_eq!(
        problem(SpecOpt::Tcp, "%eth0/22", Caps::from_bits_retain(0x0f)),
        IfnameUnsupported
    );
    assert!(matches!(
        problem(SpecOpt::Tcp, "%0123456789abcdef/22", ALL),
        BadIfName(_)
    ));
}

#[test]
fn ephemeral_range_parsing() {
    assert_eq!(Ephemeral::parse("32768\t60999\n"), Some(EPH));
    assert_eq!(
        Ephemeral::parse("1 2"),
        Some(Ephemeral { first: 1, last: 2 })
    );
    assert_eq!(Ephemeral::parse("60999 32768"), None);
    assert_eq!(Ephemeral::parse("x y"), None);
    assert_eq!(Ephemeral::parse("1 2 3"), None);
    let probed = Ephemeral::probe();
    assert!(probed.first <= probed.last);
}

fn config() -> Config {
    let host = PifTable {
        id: PifId::HOST,
        name: "HOST".into(),
        table: Table::new(ALL),
    };
    let splice = PifTable {
        id: PifId::SPLICE,
        name: "SPLICE".into(),
        table: Table::new(ALL),
    };
    Config {
        pifs: vec![host, splice],
    }
}

fn run(config: &mut Config, args: &[(&str, &str)]) -> Result<Vec<PifId>, EditError> {
    let ops: Vec<Op> = args
        .iter()
        .map(|(o, v)| match *o {
            "-A" => Op::Add,
            "-D" => Op::Delete,
            "-C" => Op::Clear(v.to_string()),
            o => Op::Spec(
                SpecOpt::from_letter(o.chars().nth(1).unwrap()).unwrap(),
                v.to_string(),
            ),
        })
        .collect();
    edit::apply(config, &ops, EPH).map(|s| s.into_iter().collect())
}

fn rules(config: &Config, pif: &str) -> Vec<String> {
    config
        .by_name(pif)
        .unwrap()
        .table
        .rules()
        .iter()
        .map(Rule::to_string)
        .collect()
}

#[test]
fn sequential_operations_as_upstream_notes() {
    let mut c = config();
    run(&mut c, &[("-t", "1000"), ("-u", "5000"), ("-T", "3000")]).unwrap();
    // pesto -A -t 2000 -C HOST -A -T 3001 -t 2001 -D -u 5000
    let touched = run(
        &mut c,
        &[
            ("-A", ""),
            ("-t", "2000"),
            ("-C", "HOST"),
            ("-A", ""),
            ("-T", "3001"),
            ("-t", "2001"),
        ],
    )
    .unwrap();
    assert_eq!(touched, vec![PifId::HOST, PifId::SPLICE]);
    assert_eq!(rules(&c, "HOST"), ["TCP [*]:2001  =>  2001 "]);
    assert_eq!(
        rules(&c, "SPLICE"),
        ["TCP [*]%lo:3000  =>  3000 ", "TCP [*]%lo:3001  =>  3001 "]
    );

    // A replace clears a table once, then adds.
    run(&mut c, &[("-t", "1"), ("-t", "2"), ("-u", "3")]).unwrap();
    assert_eq!(
        rules(&c, "HOST"),
        [
            "TCP [*]:1  =>  1 ",
            "TCP [*]:2  =>  2 ",
            "UDP [*]:3  =>  3 "
        ]
    );
    assert_eq!(rules(&c, "SPLICE").len(), 2, "SPLICE untouched");

    // -t none with UDP rules only is fine and clears the table; after -t rules it conflicts.
    run(&mut c, &[("-u", "3"), ("-t", "none")]).unwrap();
    assert_eq!(rules(&c, "HOST"), ["UDP [*]:3  =>  3 "]);
    let before = c.clone();
    assert!(matches!(
        run(&mut c, &[("-t", "5"), ("-t", "none")]),
        Err(EditError::NoneConflict(_))
    ));
    assert_eq!(c, before, "a failed edit changes nothing");
}

#[test]
fn edit_errors() {
    let mut c = config();
    run(&mut c, &[("-t", "1000-1010")]).unwrap();
    let before = c.clone();
    let e = run(&mut c, &[("-A", ""), ("-t", "1005")]).unwrap_err();
    assert!(
        matches!(
            &e,
            EditError::Rule {
                error: RuleError::Conflict { .. },
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "cannot add '-t 1005': rule TCP [*]:1005  =>  1005  conflicts with existing rule TCP [*]:1000-1010  =>  1000-1010 "
    );
    let e = run(&mut c, &[("-D", ""), ("-t", "1005")]).unwrap_err();
    assert!(matches!(
        e,
        EditError::Rule {
            error: RuleError::DeleteMismatch { .. },
            ..
        }
    ));
    let e = run(&mut c, &[("-D", ""), ("-t", "2000")]).unwrap_err();
    assert!(matches!(
        e,
        EditError::Rule {
            error: RuleError::NotFound(_),
            ..
        }
    ));
    let e = run(&mut c, &[("-C", "TAP")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown pif 'TAP' for -C (the server has: HOST, SPLICE)"
    );
    assert_eq!(c, before);

    let mut host_only = Config {
        pifs: vec![config().pifs.remove(0)],
    };
    let e = run(&mut host_only, &[("-T", "80")]).unwrap_err();
    assert_eq!(e.to_string(), "cannot use -T: the server has no SPLICE pif");
}
