//! The seal that proves a text state file whole.
//!
//! A sealed file starts with [`FIRST_LINE`] and ends with an end line,
//! `# end: rules R, owners O, fnv1a64 HHHHHHHHHHHHHHHH`: the number of
//! `[[rule]]` and `[[owner]]` lines before it, and the FNV-1a 64 hash of
//! every byte before it, in 16 lowercase hex digits, then a newline and
//! nothing after. Both lines are TOML comments, so the file still reads as
//! a configuration file.
//!
//! FNV-1a rather than a CRC: the seal finds a file cut short or changed
//! by accident (a copy that stopped, a disk that lied, an edit), not a
//! forger, who could recompute either; FNV-1a is ten lines with no new
//! dependency, and a cut is caught by the missing end line before any hash.

/// The first line of a sealed state file (without its newline).
pub const FIRST_LINE: &str = "# pestod state file, sealed: its last line counts the [[rule]] and \
                              [[owner]] lines and checksums every byte before it (FNV-1a 64).";

/// How the first line of a state file of earlier versions begins: they
/// have no seal.
pub const UNSEALED_FIRST_LINE: &str =
    "# pestod state file: the committed tables, written by pestod ";

/// How the end line begins.
const END: &str = "# end: ";

/// The 64-bit FNV-1a hash of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The `[[rule]]` and `[[owner]]` lines of `text`.
fn tally(text: &str) -> (usize, usize) {
    text.lines().fold((0, 0), |(r, o), l| match l.trim() {
        "[[rule]]" => (r + 1, o),
        "[[owner]]" => (r, o + 1),
        _ => (r, o),
    })
}

/// The end line that seals `body` (with its newline).
fn end_line(body: &str) -> String {
    let (rules, owners) = tally(body);
    format!(
        "{END}rules {rules}, owners {owners}, fnv1a64 {:016x}\n",
        fnv1a64(body.as_bytes())
    )
}

/// `body` sealed: [`FIRST_LINE`], `body`, and the end line.
pub fn seal(body: &str) -> String {
    let mut text = format!("{FIRST_LINE}\n{body}");
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let end = end_line(&text);
    text.push_str(&end);
    text
}

/// What [`check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seal {
    /// Sealed, and whole.
    Whole,
    /// A file of an earlier version, which has no seal: whether it is
    /// whole cannot be known.
    Unsealed,
}

/// Checks that `text` is a whole sealed state file, or an unsealed one of
/// an earlier version. The error says what is wrong, starting with the
/// line (`line 12: ...`).
pub fn check(text: &str) -> Result<Seal, String> {
    if text.is_empty() {
        return Err(
            "line 1: the file is empty, where a state file has at least its \
                    first and end lines"
                .into(),
        );
    }
    let sealed = text
        .strip_prefix(FIRST_LINE)
        .is_some_and(|rest| rest.starts_with('\n'));
    if !sealed {
        // Only a whole first line of the earlier writer: a sealed file cut
        // inside its first line is not taken for one.
        let first = text.split_inclusive('\n').next().unwrap_or_default();
        if first.starts_with(UNSEALED_FIRST_LINE) && first.ends_with('\n') {
            return Ok(Seal::Unsealed);
        }
        return Err(format!(
            "line 1 is not a state file's first line, which reads '{FIRST_LINE}'"
        ));
    }
    let mut at = 0;
    let mut n = 0;
    for line in text.split_inclusive('\n') {
        n += 1;
        if line.starts_with(END) {
            let rest = text.get(at + line.len()..).unwrap_or_default();
            let Some(end) = line.strip_suffix('\n') else {
                return Err(format!("line {n}: the end line is cut short"));
            };
            if !rest.is_empty() {
                return Err(format!(
                    "line {}: {} bytes after the end line (line {n})",
                    n + 1,
                    rest.len()
                ));
            }
            return verify(text.get(..at).unwrap_or_default(), end, n);
        }
        at += line.len();
    }
    let place = if text.ends_with('\n') {
        "after"
    } else {
        "inside"
    };
    Err(format!(
        "line {n}: the file ends {place} this line, without its end line ('{END}rules ...'): \
         it was cut short"
    ))
}

/// Checks end line `end` (line `n`) against `body`, what comes before it.
fn verify(body: &str, end: &str, n: usize) -> Result<Seal, String> {
    let parsed = end.strip_prefix(END).and_then(|s| {
        let s = s.strip_prefix("rules ")?;
        let (rules, s) = s.split_once(", owners ")?;
        let (owners, hash) = s.split_once(", fnv1a64 ")?;
        let hex = hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit());
        Some((
            rules.parse::<usize>().ok()?,
            owners.parse::<usize>().ok()?,
            u64::from_str_radix(hash, 16).ok().filter(|_| hex)?,
        ))
    });
    let Some((rules, owners, hash)) = parsed else {
        let shown: String = end.chars().take(80).collect();
        return Err(format!(
            "line {n}: the end line reads '{shown}', not \
             '{END}rules N, owners N, fnv1a64 HHHHHHHHHHHHHHHH'"
        ));
    };
    let (r, o) = tally(body);
    if (r, o) != (rules, owners) {
        return Err(format!(
            "line {n}: the end line counts rules {rules}, owners {owners}, but the lines \
             before it have rules {r}, owners {o}"
        ));
    }
    let actual = fnv1a64(body.as_bytes());
    if actual != hash {
        return Err(format!(
            "line {n}: the end line's checksum is {hash:016x}, but the bytes before it give \
             {actual:016x}: they changed after it was written (after an edit by hand, put \
             that checksum in the end line)"
        ));
    }
    Ok(Seal::Whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_is_the_published_one() {
        // The reference values of the FNV authors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn every_cut_and_change_is_found() {
        let text = seal("# header\n\n[[rule]]\ntcp = \"80\"\n\n[[owner]]\nname = \"a\"\nuid = 1\n");
        assert_eq!(check(&text), Ok(Seal::Whole));
        let end = text.lines().last().unwrap_or_default();
        assert!(
            end.starts_with("# end: rules 1, owners 1, fnv1a64 "),
            "{end}"
        );
        for cut in 0..text.len() {
            let e = check(&text[..cut]).expect_err(&format!("cut at {cut}"));
            assert!(e.starts_with("line "), "{e}");
        }
        let e = check(&format!("{text}\n")).unwrap_err();
        assert!(e.contains("after the end line"), "{e}");
        let e = check(&text.replace("uid = 1", "uid = 2")).unwrap_err();
        assert!(e.starts_with("line 10:") && e.contains("checksum"), "{e}");
        let e = check(&text.replace("\n[[owner]]\n", "\n[[rule]]\n")).unwrap_err();
        assert!(e.contains("counts rules 1, owners 1"), "{e}");
        let old = "# pestod state file: the committed tables, written by pestod 0.1.0 on every \
                   commit.\n\n[[rule]]\ntcp = \"80\"\n";
        assert_eq!(check(old), Ok(Seal::Unsealed));
        assert!(check("[[rule]]\ntcp = \"80\"\n").is_err());
    }
}
