//! Man pages and shell completions, made from each binary's own clap
//! definition so that they never drift from `--help`.
//!
//! `pestod --generate-man > pestod.8`, `pesto --generate-man > pesto.1`,
//! `pesto --generate-completions bash > pesto.bash` (bash, zsh, fish,
//! elvish, powershell). Both options are hidden from `--help`, and taken
//! only as the first argument, before the command line is checked, so
//! that they work without the options a run needs.

use std::io::Write;
use std::process::ExitCode;

/// If the first argument asks for a man page or completions, writes them
/// to standard output for `cmd` (a man page of `section`) and returns the
/// exit code; else `None`, and the program goes on.
pub fn generate_if_asked(cmd: clap::Command, section: &str) -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    let first = args.next()?;
    // Made whole first, then written: a closed pipe is an error to report,
    // not a panic inside the generator.
    let mut text: Vec<u8> = Vec::new();
    let made = match first.to_str()? {
        "--generate-man" => clap_mangen::Man::new(cmd)
            .section(section)
            .render(&mut text)
            .map_err(|e| e.to_string()),
        "--generate-completions" => {
            let shell = args.next().and_then(|s| s.to_str().map(str::to_owned));
            match shell.as_deref().map(str::parse::<clap_complete::Shell>) {
                Some(Ok(shell)) => {
                    let mut cmd = cmd;
                    let name = cmd.get_name().to_owned();
                    clap_complete::generate(shell, &mut cmd, name, &mut text);
                    Ok(())
                }
                _ => Err(
                    "--generate-completions takes a shell: bash, zsh, fish, elvish or powershell"
                        .to_owned(),
                ),
            }
        }
        _ => return None,
    };
    let done = made.and_then(|()| {
        let mut out = std::io::stdout().lock();
        out.write_all(&text)
            .and_then(|()| out.flush())
            .map_err(|e| format!("writing to standard output: {e}"))
    });
    Some(match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    })
}
