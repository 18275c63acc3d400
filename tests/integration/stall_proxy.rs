//! A loopback TCP proxy that can freeze: while stalled it stops moving bytes either way but
//! keeps every connection open, like a hung server or a network that drops packets without
//! resetting anything. It can also cut the server side of every connection while the clients
//! still think theirs open. Used in front of PostgreSQL.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct StallProxy {
    pub addr: SocketAddr,
    stalled: watch::Sender<bool>,
    cut: watch::Sender<u64>,
    connections: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl StallProxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stalled, watch) = watch::channel(false);
        let (cut, cut_rx) = watch::channel(0u64);
        let connections = Arc::new(AtomicU64::new(0));
        let count = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                count.fetch_add(1, Relaxed);
                let watch = watch.clone();
                let mut cuts = cut_rx.clone();
                // Only cuts from now on apply to this connection.
                cuts.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    // Either direction ending ends the pair (dropping the halves closes both).
                    let cut = tokio::select! {
                        _ = pump(&mut cr, &mut sw, watch.clone()) => false,
                        _ = pump(&mut sr, &mut cw, watch) => false,
                        _ = cuts.changed() => true,
                    };
                    if cut {
                        // The server side is gone; the client learns it only when it next
                        // sends something, as after a failover or a NAT dropping the flow.
                        drop((sr, sw));
                        let _ = cr.read(&mut [0u8; 1]).await;
                    }
                });
            }
        });
        Ok(StallProxy {
            addr,
            stalled,
            cut,
            connections,
            accept,
        })
    }

    /// Freezes (`true`) or resumes (`false`) every connection, old and new.
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }

    /// Closes the server side of every open connection without telling the clients: each
    /// finds its connection closed when it next sends a request.
    pub fn cut_upstream(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Relaxed)
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to`, holding each chunk while the proxy is stalled.
async fn pump(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    mut stalled: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if stalled.wait_for(|s| !s).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just before a stall are held too: nothing crosses while stalled.
        if stalled.wait_for(|s| !s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
