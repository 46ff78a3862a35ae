//! What one more owner costs as owners pile up: a daemon with N owners
//! (one UDP rule each), then rounds of "add an owner, release it", each a
//! transaction of its own, timed as a client sees it.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example owners -- 500 1500 2000
//! cargo run --release --example owners -- --pestod OTHER/pestod 500 2000   # another build
//! ```
//!
//! For each N it starts `target/release/pestod` (or `--pestod`) with a
//! private control socket and a state file (saved at every commit, as in
//! production), makes N owners in transactions of 250 scopes, then prints
//! the median and the worst of 20 add-and-release rounds, in milliseconds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pesto::client::{Options, Session};
use pesto::owner::Owner;
use pesto::rule::{PifId, Proto, Rule};
use pesto::scope::ScopeUpdate;

fn rule(i: u32, port: u16) -> Rule {
    let addr = format!("127.{}.{}.{}", 1 + i / 62_500, (i / 250) % 250, i % 250 + 1);
    Rule::new(Proto::Udp, addr.parse().expect("address"), port, port, 9)
}

/// Commits one scoped transaction setting each (owner, rules).
async fn commit(sock: &Path, sets: Vec<(Owner, Vec<Rule>)>) -> Result<(), String> {
    let s = Session::connect(sock, Options::default())
        .await
        .map_err(|e| e.to_string())?;
    let scopes: Vec<ScopeUpdate> = sets
        .into_iter()
        .map(|(owner, rules)| ScopeUpdate {
            pif: PifId::HOST,
            generation: s.scope_generation(PifId::HOST, &owner),
            owner,
            rules,
            lease: None,
        })
        .collect();
    let applied = s
        .propose_scoped(&scopes)
        .await
        .map_err(|e| e.to_string())?
        .apply()
        .await
        .map_err(|e| e.to_string())?;
    applied.commit().await.map_err(|e| e.to_string())?;
    Ok(())
}

fn start(pestod: &Path, dir: &Path) -> Result<(Child, PathBuf), String> {
    let sock = dir.join("c.sock");
    let child = Command::new(pestod)
        .arg("-c")
        .arg(&sock)
        .arg("--state-file")
        .arg(dir.join("state"))
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", pestod.display()))?;
    for _ in 0..500 {
        if sock.exists() {
            return Ok((child, sock));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err("pestod did not make its socket".into())
}

async fn run(pestod: &Path, n: u32, port: u16) -> Result<(f64, f64), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (mut child, sock) = start(pestod, dir.path())?;
    let owner = |i: u32| Owner::new(&format!("o{i}")).map_err(|e| e.to_string());
    let mut i = 0;
    while i < n {
        let batch: Result<Vec<_>, String> = (i..(i + 250).min(n))
            .map(|k| Ok((owner(k)?, vec![rule(k, port)])))
            .collect();
        commit(&sock, batch?).await?;
        i += 250;
    }
    let mut times = Vec::new();
    for round in 0..20 {
        let o = owner(n + round)?;
        let t = Instant::now();
        commit(&sock, vec![(o.clone(), vec![rule(n + round, port)])]).await?;
        commit(&sock, vec![(o, Vec::new())]).await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = child.kill();
    let _ = child.wait();
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[times.len() - 1]))
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1).peekable();
    let mut pestod = PathBuf::from("target/release/pestod");
    let mut sizes = Vec::new();
    while let Some(a) = args.next() {
        if a == "--pestod" {
            pestod = args.next().ok_or("--pestod needs a path")?.into();
        } else {
            sizes.push(a.parse::<u32>().map_err(|e| format!("{a}: {e}"))?);
        }
    }
    if sizes.is_empty() {
        sizes = vec![500, 1500, 2000];
    }
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    println!("owners  add+release p50 ms  max ms");
    for n in sizes {
        let (p50, max) = rt.block_on(run(&pestod, n, 40_000))?;
        println!("{n:>6}  {p50:>18.1}  {max:>6.1}");
    }
    Ok(())
}
