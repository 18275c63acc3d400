//! The manual pages and shell completions the packages ship, made from what the programs
//! already say, so that they cannot drift: a program's page and completions from its command
//! line (what `--help` prints), `s3dedup.toml(5)` from the configuration reference
//! (`docs/configuration.md`, rendered from its Markdown).

use std::fmt::Write as _;

/// The configuration reference, as the repository has it.
const CONFIGURATION_MD: &str = include_str!("../../docs/configuration.md");

/// What every page points at.
const SEE_ALSO: &[&str] = &[
    "s3dedup-api(1)",
    "s3dedup-cleaner(1)",
    "s3dedup-migrator(1)",
    "s3dedup.toml(5)",
];

/// `name(1)`: the command line as `--help` describes it, then where its files are and what
/// else to read.
pub fn program_page(cmd: clap::Command) -> std::io::Result<Vec<u8>> {
    let name = cmd.get_name().to_owned();
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd)
        .section("1")
        .manual("s3dedup")
        .render(&mut out)?;
    let mut tail = String::from(
        ".SH FILES\n.TP\n.I /etc/s3dedup/s3dedup.toml\nThe configuration, read when no \
         \\fB\\-\\-config\\fR is given (see \\fBs3dedup.toml\\fR(5)).\n.TP\n\
         .I /etc/s3dedup/secrets/\nSecret files; the units pass them in with \
         \\fBLoadCredential=\\fR, and a program run by hand reads them from here.\n.TP\n\
         .I /var/lib/s3dedup/\nThe SQLite metadata, local objects and the upload spool.\n\
         .SH DOCUMENTATION\n/usr/share/doc/s3dedup/ (README.md, README.Debian, docs/).\n\
         .SH SEE ALSO\n",
    );
    let others: Vec<String> = SEE_ALSO
        .iter()
        .filter(|p| !p.starts_with(&format!("{name}(")))
        .map(|p| {
            let (page, section) = p.split_once('(').unwrap_or((p, ")"));
            format!("\\fB{page}\\fR({section}")
        })
        .collect();
    let _ = writeln!(
        tail,
        "{}, \\fBsystemctl\\fR(1), \\fBsystemd.socket\\fR(5)",
        others.join(", ")
    );
    out.extend_from_slice(tail.as_bytes());
    Ok(out)
}

/// `s3dedup.toml(5)`, from the configuration reference.
pub fn config_page(version: &str) -> String {
    let mut roff = format!(
        ".TH S3DEDUP.TOML 5 \"\" \"s3dedup {version}\" \"s3dedup\"\n.SH NAME\n\
         s3dedup.toml \\- configuration of the s3dedup Filetracker store\n"
    );
    roff.push_str(&markdown_to_roff(CONFIGURATION_MD));
    roff.push_str(".SH SEE ALSO\n");
    let _ = writeln!(
        roff,
        "{}",
        SEE_ALSO[..3]
            .iter()
            .map(|p| {
                let (page, section) = p.split_once('(').unwrap_or((p, ")"));
                format!("\\fB{page}\\fR({section}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    roff
}

/// Completions of `cmd` for `shell`.
pub fn completions(shell: clap_complete::Shell, mut cmd: clap::Command) -> Vec<u8> {
    let name = cmd.get_name().to_owned();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut out);
    out
}

/// The Markdown the reference uses, as roff: headings, paragraphs, `- ` lists, fenced code,
/// and tables (one tagged paragraph per row: the first cell as the tag, the others after it).
fn markdown_to_roff(md: &str) -> String {
    let mut out = String::new();
    let mut lines = md.lines().peekable();
    let mut header: Vec<String> = Vec::new();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_end();
        if trimmed.starts_with("# ") {
            // The page's title is in .TH; what follows the document's heading describes it.
            out.push_str(".SH DESCRIPTION\n");
        } else if let Some(title) = trimmed.strip_prefix("## ") {
            let _ = writeln!(out, ".SH {}", inline(&title.to_uppercase()));
        } else if let Some(title) = trimmed.strip_prefix("### ") {
            let _ = writeln!(out, ".SS {}", inline(title));
        } else if trimmed.starts_with("```") {
            out.push_str(".PP\n.RS\n.nf\n");
            for code in lines.by_ref() {
                if code.trim_end().starts_with("```") {
                    break;
                }
                let _ = writeln!(out, "{}", escape(code));
            }
            out.push_str(".fi\n.RE\n");
        } else if trimmed.starts_with('|') {
            // The row under the header.
            if trimmed
                .chars()
                .all(|ch| matches!(ch, '|' | '-' | ':' | ' '))
            {
                continue;
            }
            let cells: Vec<String> = trimmed
                .trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_owned())
                .collect();
            if header.is_empty() {
                header = cells;
                continue;
            }
            let _ = writeln!(out, ".TP\n{}", inline(&cells[0]));
            let rest: Vec<String> = cells[1..]
                .iter()
                .zip(header.iter().skip(1))
                .filter(|(c, _)| !c.is_empty())
                .map(|(c, h)| {
                    if h == "meaning" || h.is_empty() {
                        inline(c)
                    } else {
                        format!("{}: {}.", inline(h), inline(c))
                    }
                })
                .collect();
            let _ = writeln!(out, "{}", rest.join("\n"));
            if !lines.peek().is_some_and(|l| l.starts_with('|')) {
                header.clear();
            }
        } else if let Some(item) = trimmed.strip_prefix("- ") {
            let mut text = item.to_owned();
            while let Some(next) = lines.peek() {
                if next.starts_with("  ") && !next.trim().is_empty() {
                    text.push(' ');
                    text.push_str(next.trim());
                    lines.next();
                } else {
                    break;
                }
            }
            let _ = writeln!(out, ".IP \\(bu 2\n{}", inline(&text));
        } else if trimmed.is_empty() {
            continue;
        } else {
            let mut text = trimmed.to_owned();
            while let Some(next) = lines.peek() {
                let n = next.trim_end();
                if n.is_empty()
                    || n.starts_with(['#', '|'])
                    || n.starts_with("```")
                    || n.starts_with("- ")
                {
                    break;
                }
                text.push(' ');
                text.push_str(n);
                lines.next();
            }
            let _ = writeln!(out, ".PP\n{}", inline(&text));
        }
    }
    out
}

/// Inline Markdown: `code` in bold, links as their text with the target after it.
fn inline(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c == '`'
            && let Some(end) = rest[1..].find('`')
        {
            let _ = write!(out, "\\fB{}\\fR", escape_inline(&rest[1..=end]));
            rest = &rest[end + 2..];
            continue;
        }
        if c == '['
            && let Some(close) = rest.find("](")
            && let Some(end) = rest[close..].find(')')
        {
            let label = &rest[1..close];
            let target = &rest[close + 2..close + end];
            out.push_str(&inline(label));
            if !target.starts_with('#') {
                let _ = write!(out, " ({})", escape_inline(target));
            }
            rest = &rest[close + end + 1..];
            continue;
        }
        if c == '*' && rest.starts_with("**") {
            rest = &rest[2..];
            continue;
        }
        out.push_str(&escape_inline(&rest[..c.len_utf8()]));
        rest = &rest[c.len_utf8()..];
    }
    // A line may not start with a control character.
    if out.starts_with(['.', '\'']) {
        out.insert_str(0, "\\&");
    }
    out
}

fn escape_inline(text: &str) -> String {
    text.replace('\\', "\\e").replace('-', "\\-")
}

/// A code line: verbatim, with roff's own characters escaped.
fn escape(line: &str) -> String {
    let mut s = line.replace('\\', "\\e");
    if s.starts_with(['.', '\'']) {
        s.insert_str(0, "\\&");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configuration_key_is_in_the_page() {
        let page = config_page("0");
        for line in CONFIGURATION_MD.lines() {
            if let Some(key) = line.strip_prefix("| `").and_then(|l| l.split('`').next()) {
                let want = format!(".TP\n\\fB{}\\fR", escape_inline(key));
                assert!(page.contains(&want), "{key} missing");
            }
        }
        assert!(page.starts_with(".TH S3DEDUP.TOML 5"));
        // Nothing that roff would take as a request slipped through.
        let requests = ["TH", "SH", "SS", "PP", "TP", "IP", "RS", "RE", "nf", "fi"];
        for l in page.lines().filter(|l| l.starts_with(['.', '\''])) {
            let request = l[1..].split(' ').next().unwrap_or("");
            assert!(requests.contains(&request), "stray request: {l}");
        }
    }

    #[test]
    fn markdown_inline_and_blocks() {
        let roff = markdown_to_roff(
            "# T\n\nSome `a-b` and [docs](x.md).\nnext line\n\n- one\n  two\n\n```toml\n.x = 1\n```\n",
        );
        assert_eq!(
            roff,
            ".SH DESCRIPTION\n.PP\nSome \\fBa\\-b\\fR and docs (x.md). next line\n\
             .IP \\(bu 2\none two\n.PP\n.RS\n.nf\n\\&.x = 1\n.fi\n.RE\n"
        );
    }

    #[test]
    fn tables_become_tagged_paragraphs() {
        let roff = markdown_to_roff(
            "| key | default | meaning |\n|---|---|---|\n| `a.b` | `1` | what |\n",
        );
        assert_eq!(roff, ".TP\n\\fBa.b\\fR\ndefault: \\fB1\\fR.\nwhat\n");
    }
}
