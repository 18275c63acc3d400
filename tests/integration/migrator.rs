//! `s3dedup-migrator` importing Filetracker v1 and v2 directories beside a running API.

use std::path::Path;
use std::process::Command;

use reqwest::StatusCode;
use s3dedup_tests::*;

fn set_mtime(path: &Path, version: i64, symlink: bool) {
    let mut c = Command::new("touch");
    if symlink {
        c.arg("-h");
    }
    let ok = c
        .arg("-d")
        .arg(format!("@{version}"))
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "touch {}", path.display());
}

fn migrate(api: &Api, source: &str) -> (bool, String) {
    let out = api
        .sibling("s3dedup-migrator")
        .args(["--source", source])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

async fn assert_file(api: &Api, path: &str, content: &[u8], version: i64) {
    let url = api.url(&format!("/files{}", path.replace(' ', "%20")));
    let r = reqwest::get(&url).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{path}");
    let lm = r.headers()["last-modified"].to_str().unwrap().to_owned();
    let got = chrono::DateTime::parse_from_rfc2822(&lm)
        .unwrap()
        .timestamp();
    assert_eq!(got, version, "{path}: version preserved");
    assert_eq!(gunzip(&r.bytes().await.unwrap()), content, "{path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_directory_is_imported_with_versions_and_idempotently() {
    let api = Api::start(Backend::Local).unwrap();
    let src = tempfile::tempdir().unwrap();
    let files: Vec<(&str, Vec<u8>, i64)> = vec![
        ("/a.txt", b"first".to_vec(), 1_500_000_000),
        (
            "/dir/sub/b c.txt",
            unique_content("v1", 100_000),
            1_600_000_000,
        ),
        ("/dir/zażółć.txt", b"first".to_vec(), 1_600_000_001),
        ("/empty", Vec::new(), 1_000),
    ];
    for (p, c, v) in &files {
        let f = src.path().join("files").join(&p[1..]);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, c).unwrap();
        set_mtime(&f, *v, false);
    }
    let source = format!("v1:{}", src.path().display());
    let (ok, out) = migrate(&api, &source);
    assert!(ok, "{out}");
    assert!(out.contains("4 files migrated"), "{out}");
    for (p, c, v) in &files {
        assert_file(&api, p, c, *v).await;
    }
    let (ok, out) = migrate(&api, &source);
    assert!(
        ok && out.contains("0 files migrated") && out.contains("4 already present"),
        "{out}"
    );
    // A path stored in s3dedup at a newer version is left alone.
    reqwest::Client::new()
        .put(api.url(&format!("/files/a.txt?last_modified={}", lm(1_700_000_000))))
        .body("newer")
        .send()
        .await
        .unwrap();
    set_mtime(&src.path().join("files/a.txt"), 1_650_000_000, false);
    let (ok, out) = migrate(&api, &source);
    assert!(ok && out.contains("0 files migrated"), "{out}");
    assert_file(&api, "/a.txt", b"newer", 1_700_000_000).await;
    // "first" (two paths), the big file, the empty one and "newer": duplicates stored once.
    assert_eq!(api.local_objects().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_directory_is_imported_verified_and_decoded() {
    let api = Api::start(Backend::Local).unwrap();
    let src = tempfile::tempdir().unwrap();
    let root = src.path();
    let add = |name: &str, content: &[u8], version: i64, corrupt: bool| {
        let hex = sha256_hex(content);
        let blob = root.join("blobs").join(&hex[..2]).join(&hex);
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        let mut gz = gzip(content);
        if corrupt {
            let n = gz.len();
            gz[n - 5] ^= 0x55; // breaks the CRC / length trailer
        }
        std::fs::write(&blob, gz).unwrap();
        // v2 stores non-ASCII names double-encoded.
        let stored: String = name.bytes().map(char::from).collect();
        let link = root.join("links").join(&stored[1..]);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let depth = name.matches('/').count();
        let rel = format!("{}blobs/{}/{hex}", "../".repeat(depth), &hex[..2]);
        std::os::unix::fs::symlink(&rel, &link).unwrap();
        set_mtime(&link, version, true);
    };
    let big = unique_content("v2", 300_000);
    add("/p/one.txt", &big, 1_600_000_000, false);
    add("/p/dup.txt", &big, 1_600_000_005, false);
    add("/żółw/ąę ść.txt", b"polish", 1_600_000_010, false);
    add("/bad.txt", b"this blob is corrupt", 1_600_000_020, true);
    let (ok, out) = migrate(&api, &format!("v2:{}", root.display()));
    assert!(!ok, "a corrupt blob makes the run exit 1: {out}");
    assert!(
        out.contains("3 files migrated") && out.contains("1 failed"),
        "{out}"
    );
    assert!(
        out.contains("failed: /bad.txt ("),
        "the failure is listed by path: {out}"
    );
    assert_file(&api, "/p/one.txt", &big, 1_600_000_000).await;
    assert_file(&api, "/p/dup.txt", &big, 1_600_000_005).await;
    assert_file(
        &api,
        "/%C5%BC%C3%B3%C5%82w/%C4%85%C4%99 %C5%9B%C4%87.txt",
        b"polish",
        1_600_000_010,
    )
    .await;
    let r = reqwest::get(api.url("/files/bad.txt")).await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "the corrupt file is not imported"
    );
    assert_eq!(api.local_objects().len(), 2);
}
