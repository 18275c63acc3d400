//! A real S3 server process for the test suites: s3s-fs (objects as files on disk, SigV4
//! checked) on loopback, with TCP_NODELAY so small requests do not stall on delayed ACKs.
//! Prints `listening on ADDR` once ready, so tests can bind port 0 and read the address.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;

#[derive(Parser)]
struct Opt {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    #[arg(long, default_value = "test-access-key")]
    access_key: String,
    #[arg(long, default_value = "test-secret-key")]
    secret_key: String,
    /// Buckets to create at start (directories under the root).
    #[arg(long)]
    bucket: Vec<String>,
    /// Root directory of stored data.
    root: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opt = Opt::parse();
    for b in &opt.bucket {
        std::fs::create_dir_all(opt.root.join(b))
            .with_context(|| format!("creating bucket {b}"))?;
    }
    let fs = s3s_fs::FileSystem::new(&opt.root)
        .map_err(|e| anyhow::anyhow!("opening the root {}: {e:?}", opt.root.display()))?;
    let service = {
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(opt.access_key, opt.secret_key));
        b.build()
    };
    let listener = TcpListener::bind(&opt.listen).await.context("binding")?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let (socket, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => continue,
        };
        let _ = socket.set_nodelay(true);
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
