//! The lines the suites report for the run's summary.

use std::io::Write;
use std::path::Path;

/// A result line for the people reading the test run: printed to stderr and, when `TESTS_REPORT`
/// names a file (tests/run-all.sh sets it), appended there so the run's summary shows it even
/// though cargo hides a passing test's output.
pub fn report(line: &str) {
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("TESTS_REPORT") {
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            eprintln!("cannot append to {}: {e}", Path::new(&path).display());
        }
    }
}
