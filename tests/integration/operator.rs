//! The programs as an operator runs them by hand and as systemd starts them: which configuration
//! and secrets they find, what they refuse to create, `--check-config`, root, and every socket
//! systemd passes. (The packages and units themselves: tests/systemd/e2e.sh.)

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use s3dedup_tests::*;

/// A program with none of the caller's `S3DEDUP_*` settings, outside systemd.
fn program(name: &str) -> Command {
    let mut cmd = Command::new(bin(name));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("S3DEDUP_")) {
        cmd.env_remove(k);
    }
    for k in [
        "JOURNAL_STREAM",
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "CREDENTIALS_DIRECTORY",
    ] {
        cmd.env_remove(k);
    }
    cmd.env("RUST_LOG", "info");
    cmd
}

/// Runs `name` on the store `place` names (`("--config", file)` or `("--data-dir", dir)`).
fn run_on(name: &str, place: (&str, &Path), args: &[&str]) -> Output {
    program(name)
        .arg(place.0)
        .arg(place.1)
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A Filetracker v1 directory with one file, `/byhand/three.txt`.
fn v1_dir(root: &Path) -> PathBuf {
    let dir = root.join("v1");
    std::fs::create_dir_all(dir.join("files/byhand")).unwrap();
    std::fs::write(dir.join("files/byhand/three.txt"), b"imported by hand\n").unwrap();
    dir
}

/// An S3 configuration in `etc/s3dedup.toml` naming its secret as the units do
/// (`secrets_s3-secret`), and that secret in `etc/secrets/s3-secret`.
fn s3_config(root: &Path, s3: &S3Server, secret: &str) -> PathBuf {
    let etc = root.join("etc");
    std::fs::create_dir_all(etc.join("secrets")).unwrap();
    std::fs::write(etc.join("secrets/s3-secret"), format!("{secret}\n")).unwrap();
    let config = etc.join("s3dedup.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[store]\nbackend = \"s3\"\n[store.s3]\nbucket = \"{S3_BUCKET}\"\n\
             endpoint = \"{}\"\naccess_key_id = \"{S3_ACCESS_KEY}\"\n\
             secret_access_key_file = \"secrets_s3-secret\"\n",
            root.join("data").display(),
            s3.endpoint()
        ),
    )
    .unwrap();
    config
}

#[test]
fn the_cleaner_never_creates_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let out = run_on("s3dedup-cleaner", ("--data-dir", &missing), &["--stats"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("no s3dedup store") && t.contains(&*missing.to_string_lossy()),
        "{t}"
    );
    assert!(
        !missing.exists(),
        "the cleaner created {}",
        missing.display()
    );

    // With no flags at all, where an admin happens to be: the built-in defaults name
    // ./s3dedup-data, which is not there and is not made.
    if !Path::new("/etc/s3dedup/s3dedup.toml").exists() {
        let out = program("s3dedup-cleaner")
            .arg("--stats")
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains("built-in defaults"), "{}", text(&out));
        assert!(!dir.path().join("s3dedup-data").exists());
    }
}

#[test]
fn check_config_explains_and_connects_to_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(etc.join("secrets")).unwrap();
    std::fs::write(etc.join("secrets/s3-secret"), "x\n").unwrap();
    let good = etc.join("good.toml");
    // An S3 server nobody runs: checking must not try it.
    std::fs::write(
        &good,
        "[store]\nbackend = \"s3\"\n[store.s3]\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:1\"\n\
         access_key_id = \"k\"\nsecret_access_key_file = \"secrets_s3-secret\"\n",
    )
    .unwrap();
    let started = Instant::now();
    let out = run_on("s3dedup-api", ("--config", &good), &["--check-config"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for want in [
        "configuration OK",
        "s3 bucket b at http://127.0.0.1:1",
        "secrets: s3 read",
    ] {
        assert!(t.contains(want), "{want:?} not in {t}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));

    // A key in the wrong place: exit 2, naming it and the file.
    let bad = etc.join("bad.toml");
    std::fs::write(&bad, "listen = \"0.0.0.0:9999\"\n").unwrap();
    let out = run_on("s3dedup-api", ("--config", &bad), &["--check-config"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("`listen`") && t.contains(&*bad.to_string_lossy()),
        "{t}"
    );

    // A secret that is not where the configuration says: exit 2, naming where it looked.
    std::fs::remove_file(etc.join("secrets/s3-secret")).unwrap();
    let out = run_on("s3dedup-cleaner", ("--config", &good), &["--check-config"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains(&*etc.join("secrets/s3-secret").to_string_lossy()),
        "{t}"
    );
}

#[test]
fn secrets_named_for_the_units_are_found_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start().unwrap();
    let config = s3_config(dir.path(), &s3, S3_SECRET_KEY);
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let v1 = v1_dir(dir.path());

    // By hand: no $CREDENTIALS_DIRECTORY; the secret is read beside the configuration.
    let out = run_on(
        "s3dedup-migrator",
        ("--config", &config),
        &["--source", &format!("v1:{}", v1.display())],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = run_on("s3dedup-cleaner", ("--config", &config), &["--stats"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("files:                      1"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains(&*config.to_string_lossy()),
        "says which configuration it read: {}",
        text(&out)
    );

    // As the units run it: the same name in $CREDENTIALS_DIRECTORY wins over the file beside
    // the configuration (here a wrong one, so the S3 server would refuse it).
    let creds = dir.path().join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("secrets_s3-secret"), S3_SECRET_KEY).unwrap();
    std::fs::write(dir.path().join("etc/secrets/s3-secret"), "wrong").unwrap();
    // --verify reads every object's head from S3, so the secret is used.
    let verify = |creds: Option<&Path>| {
        let mut cmd = program("s3dedup-cleaner");
        cmd.arg("--config").arg(&config).arg("--verify");
        if let Some(c) = creds {
            cmd.env("CREDENTIALS_DIRECTORY", c);
        }
        cmd.output().unwrap()
    };
    let out = verify(Some(&creds));
    assert!(out.status.success(), "{}", text(&out));
    // And the secret is really used: the wrong one is the S3 server's refusal.
    let out = verify(None);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("403"), "{}", text(&out));
}

#[test]
fn as_root_the_tools_work_as_the_data_directory_owner() {
    let Some((dir, data)) = store_owned_by_nobody() else {
        return;
    };
    let v1 = v1_dir(dir.path());
    for p in walk(&v1) {
        set_mode(&p, 0o644);
    }
    for d in [v1.clone(), v1.join("files"), v1.join("files/byhand")] {
        set_mode(&d, 0o755);
    }

    let out = run_on(
        "s3dedup-migrator",
        ("--data-dir", &data),
        &["--source", &format!("v1:{}", v1.display())],
    );
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    let out = run_on(
        "s3dedup-cleaner",
        ("--data-dir", &data),
        &["--verify", "--deep"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let mut owned_by_root = Vec::new();
    let mut stack = vec![data.clone()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.uid() != NOBODY {
            owned_by_root.push(p.clone());
        }
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert!(
        owned_by_root.is_empty(),
        "not the owner's: {owned_by_root:?}"
    );
    assert!(
        said.contains("running as the data directory's owner"),
        "{said}"
    );
}

#[test]
fn a_source_its_user_cannot_read_is_named_as_such() {
    let Some((dir, data)) = store_owned_by_nobody() else {
        return;
    };
    // As filetracker-server leaves its data directory: 0700 for its own user (root here).
    let old = dir.path().join("filetracker");
    std::fs::create_dir_all(old.join("links")).unwrap();
    set_mode(&old, 0o700);

    let out = run_on(
        "s3dedup-migrator",
        ("--data-dir", &data),
        &["--source", &format!("v2:{}", old.display())],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("permission denied reading") && text(&out).contains("uid 65534"),
        "{}",
        text(&out)
    );
}

/// nobody:nogroup, who owns the test stores as s3dedup owns /var/lib/s3dedup.
const NOBODY: u32 = 65534;

/// A directory anyone may enter, with a `data` store directory owned by nobody; `None` (the
/// test skipped) unless this runs as root, as CI does.
fn store_owned_by_nobody() -> Option<(tempfile::TempDir, PathBuf)> {
    if !nix_is_root() {
        eprintln!("skipped: needs root (CI runs as root)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(NOBODY), Some(NOBODY)).unwrap();
    Some((dir, data))
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `s3dedup-api` on a fresh data directory under `dir`, started by `systemd-socket-activate`
/// with `flags` (its sockets), which passes them as systemd does (LISTEN_FDS).
fn socket_activated(dir: &Path, flags: &[String]) -> Command {
    let tool = Path::new("/usr/bin/systemd-socket-activate");
    assert!(
        tool.exists(),
        "needs systemd-socket-activate (apt-get install systemd), as tests/run-all.sh installs"
    );
    let mut cmd = Command::new(tool);
    cmd.args(flags)
        .arg("--setenv=RUST_LOG=info")
        .arg(bin("s3dedup-api"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null());
    cmd
}

#[test]
fn every_socket_systemd_passes_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let sock = dir.path().join("api.sock");
    let listen = [
        format!("--listen=127.0.0.1:{port}"),
        format!("--listen={}", sock.display()),
    ];
    let child = socket_activated(dir.path(), &listen)
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let _api = Proc {
        child,
        name: "s3dedup-api".into(),
    };
    let log = || std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    let request = b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let tcp = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        match raw_request(tcp, request) {
            Ok(r) if !r.is_empty() => break r,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => panic!("no answer on TCP: {other:?}\n{}", log()),
        }
    };
    assert!(first.starts_with("HTTP/1.1 200"), "{first}\n{}", log());
    // The second socket, which an API serving only the first would leave unanswered.
    let unix = {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(unix.starts_with("HTTP/1.1 200"), "{unix:?}\n{}", log());
    let l = log();
    assert!(
        l.contains(&format!("127.0.0.1:{port}")) && l.contains(&*sock.to_string_lossy()),
        "the listening line names both: {l}"
    );
}

#[test]
fn a_socket_that_cannot_be_served_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = ["--datagram".into(), format!("--listen=127.0.0.1:{port}")];
    let child = socket_activated(dir.path(), &listen)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut api = Proc {
        child,
        name: "s3dedup-api".into(),
    };
    // A datagram socket is handed over on its first packet.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let _ = udp.send_to(b"x", ("127.0.0.1", port));
        if let Some(status) = api.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "s3dedup-api kept running on a datagram socket"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    use std::io::Read;
    api.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("fd 3") && err.contains("only listening stream sockets"),
        "{err}"
    );
}
