//! Command-line parities with upstream passt and pesto that tools rely on.

mod common;

use std::process::Command;

use common::*;

/// Rules given at start-up keep their command-line order, as upstream
/// adds them: a `-u` before a `-t` lists first.
#[test]
fn start_up_rules_keep_their_order() {
    let p = free_ports(3);
    let (a, b, c) = (
        format!("127.0.0.1/{p}:9"),
        format!("127.0.0.1/{}:9", p + 1),
        format!("127.0.0.1/{}:9", p + 2),
    );
    let d = Daemon::start(&["-u", &a, "-t", &b, "-u", &c]);
    let out = d.pesto(&["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rules = v["pifs"][0]["rules"].as_array().unwrap();
    let order: Vec<(String, u64)> = rules
        .iter()
        .map(|r| {
            (
                r["proto"].as_str().unwrap().to_owned(),
                r["first"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            ("UDP".into(), u64::from(p)),
            ("TCP".into(), u64::from(p) + 1),
            ("UDP".into(), u64::from(p) + 2)
        ]
    );
}

/// Long options take unique prefixes, as getopt_long does upstream.
#[test]
fn long_options_take_unique_prefixes() {
    let p = free_ports(1);
    let spec = format!("127.0.0.1/{p}:9");
    let d = Daemon::start(&["--tcp-p", &spec, "--step", "5"]);
    let out = d.pesto(&["--dry", "-A", "--tcp-p", &format!("127.0.0.1/{}:9", p + 1)]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let listed = d.pesto(&[]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains(&format!("TCP [127.0.0.1]:{p}  =>  9 ")),
        "{text}"
    );
    // An ambiguous prefix is a usage error, as with getopt_long:
    // --tcp-ports, --tcp-ns.
    let (status, log) = pestod_exit(&["--tcp", &spec]);
    assert_eq!(status.code(), Some(1), "{log}");
}

/// `pesto --version` exits 0 (tools probe for pesto with it); so does
/// pestod's. A usage error exits 1 in both, as their docs say.
#[test]
fn version_and_usage_errors() {
    for bin in [env!("CARGO_BIN_EXE_pesto"), env!("CARGO_BIN_EXE_pestod")] {
        let out = Command::new(bin).arg("--version").output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{bin}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("0."), "{bin}");
        let out = Command::new(bin).arg("--no-such-option").output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{bin}: {out:?}");
    }
}

/// Man pages and completions come from the clap definitions: every option
/// of `--help` is there.
#[test]
fn man_pages_and_completions_are_generated() {
    for (bin, section, option) in [
        (env!("CARGO_BIN_EXE_pestod"), "8", "\\-\\-metrics"),
        (env!("CARGO_BIN_EXE_pesto"), "1", "\\-\\-stats"),
    ] {
        let out = std::process::Command::new(bin)
            .arg("--generate-man")
            .output()
            .unwrap();
        assert!(out.status.success());
        let man = String::from_utf8_lossy(&out.stdout);
        assert!(
            man.contains(&format!(" {section} ")) && man.contains(".TH"),
            "{man}"
        );
        assert!(man.contains(option), "{bin}: {option} missing");
        for shell in ["bash", "zsh", "fish"] {
            let out = std::process::Command::new(bin)
                .args(["--generate-completions", shell])
                .output()
                .unwrap();
            assert!(
                out.status.success() && !out.stdout.is_empty(),
                "{bin} {shell}"
            );
        }
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pesto"))
        .args(["--generate-completions", "nosuchshell"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

/// A reader that goes early (`pesto SOCK | head`) ends pesto quietly with
/// a non-zero status, for every kind of output: no panic, no backtrace.
#[test]
fn a_closed_output_pipe_ends_pesto_quietly() {
    let p = free_ports(1);
    let d = Daemon::start(&["-t", &format!("127.0.0.1/{p}:9")]);
    for args in [
        &[][..],
        &["--stats"],
        &["--json"],
        &["--export"],
        &["--owners"],
    ] {
        // The pipe's reader is gone before pesto writes a byte.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_pesto"))
            .args(args)
            .arg(&d.sock)
            .stdout(writer)
            .output()
            .expect("run pesto");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
    }
}
