//! `s3dedup-cleaner`: not implemented yet; refuses to run rather than pretend to succeed.

fn main() -> std::process::ExitCode {
    eprintln!("s3dedup-cleaner: not implemented yet");
    std::process::ExitCode::FAILURE
}
