//! A loopback TCP proxy that can freeze: while stalled it stops moving bytes either way but
//! keeps every connection open, like a hung server or a network that drops packets without
//! resetting anything. It can also cut the server side of every connection while the clients
//! still think theirs open. Used in front of PostgreSQL.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// How a cut reaches one connection: the connection answers once its server side is gone.
type CutRequests = mpsc::UnboundedSender<oneshot::Sender<()>>;

pub struct StallProxy {
    pub addr: SocketAddr,
    stalled: watch::Sender<bool>,
    open: Arc<Mutex<Vec<CutRequests>>>,
    connections: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl StallProxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stalled, watch) = watch::channel(false);
        let open = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        let (count, registry) = (connections.clone(), open.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                count.fetch_add(1, Relaxed);
                // Registered before anything can reach it: only cuts from now on apply.
                let (cut_tx, cuts) = mpsc::unbounded_channel();
                registry.lock().expect("cut registry").push(cut_tx);
                tokio::spawn(forward(client, target, watch.clone(), cuts));
            }
        });
        Ok(StallProxy {
            addr,
            stalled,
            open,
            connections,
            accept,
        })
    }

    /// Freezes (`true`) or resumes (`false`) every connection, old and new.
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }

    /// Closes the server side of every open connection without telling the clients: each
    /// finds its connection closed when it next sends a request. Returns once every connection
    /// has dropped its server side, so no request sent afterwards can still get through.
    pub async fn cut_upstream(&self) {
        let answers: Vec<_> = {
            let mut open = self.open.lock().expect("cut registry");
            open.retain(|c| !c.is_closed());
            open.iter()
                .filter_map(|c| {
                    let (done, answer) = oneshot::channel();
                    c.send(done).ok().map(|()| answer)
                })
                .collect()
        };
        // An error is a connection that ended meanwhile: cut too.
        for answer in answers {
            let _ = answer.await;
        }
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

/// Forwards `client` to `target` until either side ends or a cut arrives.
async fn forward(
    mut client: TcpStream, target: SocketAddr, stalled: watch::Receiver<bool>,
    mut cuts: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
) {
    // A cut is served before any byte moves: one that raced a request would otherwise let the
    // request through and drop its answer, and the client would wait out its deadline.
    let mut server = tokio::select! {
        biased;
        Some(done) = cuts.recv() => return dead_end(client, done, cuts).await,
        server = TcpStream::connect(target) => match server {
            Ok(s) => s,
            Err(_) => return,
        },
    };
    let done = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        // Either direction ending ends the pair (dropping the streams closes both).
        tokio::select! {
            biased;
            Some(done) = cuts.recv() => done,
            _ = pump(&mut cr, &mut sw, stalled.clone()) => return,
            _ = pump(&mut sr, &mut cw, stalled) => return,
        }
    };
    drop(server);
    dead_end(client, done, cuts).await;
}

/// The server side is gone: answers the cut, then closes `client` when it next sends
/// something, as after a failover or a NAT dropping the flow.
async fn dead_end(
    mut client: TcpStream, done: oneshot::Sender<()>,
    mut cuts: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
) {
    let _ = done.send(());
    let mut byte = [0u8; 1];
    loop {
        tokio::select! {
            Some(done) = cuts.recv() => {
                let _ = done.send(());
            }
            _ = client.read(&mut byte) => return,
        }
    }
}

/// Copies `from` to `to`, holding each chunk while the proxy is stalled.
async fn pump(
    from: &mut (impl AsyncReadExt + Unpin), to: &mut (impl AsyncWriteExt + Unpin),
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
