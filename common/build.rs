//! Finds ISA-L (Debian: libisal-dev) for the fast gzip inflater; without it, zlib-rs inflates.
//! `S3DEDUP_INFLATE=isa-l` makes a missing ISA-L an error (the Debian packages set it, so they
//! never ship the slower inflater by accident); `S3DEDUP_INFLATE=zlib-rs` skips the search.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(s3dedup_isal)");
    println!("cargo::rerun-if-env-changed=S3DEDUP_INFLATE");
    println!("cargo::rerun-if-changed=src/gunzip/isal.c");
    let want = std::env::var("S3DEDUP_INFLATE").unwrap_or_default();
    match want.as_str() {
        "zlib-rs" => return,
        "" | "isa-l" => {}
        other => panic!("S3DEDUP_INFLATE={other}: expected isa-l or zlib-rs"),
    }
    // The release this was tested with (Debian 12's).
    match pkg_config::Config::new()
        .atleast_version("2.30")
        .probe("libisal")
    {
        Ok(lib) => {
            cc::Build::new()
                .file("src/gunzip/isal.c")
                .includes(&lib.include_paths)
                .compile("s3dedup_isal");
            println!("cargo::rustc-cfg=s3dedup_isal");
        }
        Err(e) if want == "isa-l" => {
            panic!("S3DEDUP_INFLATE=isa-l, but ISA-L was not found ({e}): install libisal-dev")
        }
        Err(_) => println!(
            "cargo::warning=ISA-L not found (apt install libisal-dev): gzip is inflated with \
             zlib-rs, about 1.4x slower"
        ),
    }
}
