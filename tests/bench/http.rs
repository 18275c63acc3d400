//! The load generator's HTTP/1.1 client: hyper's connection API used directly, without
//! reqwest's pool, URL handling and layers. On a 2-core machine the generator shares the CPU
//! with the server it measures, so every microsecond it spends per request is one the server
//! under test does not get; this client spends about half what reqwest did.

use std::net::SocketAddr;
use std::sync::Mutex;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

type Sender = SendRequest<Full<Bytes>>;

/// Requests to one server, each on a new connection or on a reused one.
pub struct Http {
    addr: SocketAddr,
    host: String,
    keep_alive: bool,
    idle: Mutex<Vec<Sender>>,
}

impl Http {
    /// `base` is `http://HOST:PORT` with a literal IP address.
    pub fn new(base: &str, keep_alive: bool) -> anyhow::Result<Http> {
        let host = base
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        Ok(Http {
            addr: host
                .parse()
                .with_context(|| format!("{base}: not http://IP:PORT"))?,
            host,
            keep_alive,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// An idle connection if there is one (`true`), else a new one.
    async fn connection(&self) -> anyhow::Result<(Sender, bool)> {
        if self.keep_alive {
            let reused = self.idle.lock().ok().and_then(|mut idle| idle.pop());
            if let Some(s) = reused.filter(|s| !s.is_closed()) {
                return Ok((s, true));
            }
        }
        Ok((self.connect().await?, false))
    }

    async fn connect(&self) -> anyhow::Result<Sender> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        // Ends when the sender is dropped (a new-connection request closes it after its reply).
        tokio::spawn(conn);
        Ok(sender)
    }

    /// Sends one request and hands each chunk of the reply's body to `chunk`; the connection
    /// goes back to the pool only once the body has been read to its end.
    pub async fn send(
        &self, method: Method, path_and_query: &str, headers: &[(&str, &str)], body: Bytes,
        mut chunk: impl FnMut(&[u8]),
    ) -> anyhow::Result<StatusCode> {
        let request = || {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path_and_query)
                .header(hyper::header::HOST, &self.host);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            req.body(Full::new(body.clone()))
        };
        let (mut sender, reused) = self.connection().await?;
        let resp = match send_on(&mut sender, request()?).await {
            Ok(resp) => resp,
            // The server closed an idle connection (gunicorn does after 2 s) before it noticed
            // this request: once more on a new one, as reqwest's pool does.
            Err(_) if reused => {
                sender = self.connect().await?;
                send_on(&mut sender, request()?).await?
            }
            Err(e) => return Err(e.into()),
        };
        let status = resp.status();
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame?.data_ref() {
                chunk(data);
            }
        }
        if self.keep_alive
            && let Ok(mut idle) = self.idle.lock()
        {
            idle.push(sender);
        }
        Ok(status)
    }
}

async fn send_on(
    sender: &mut Sender, req: Request<Full<Bytes>>,
) -> hyper::Result<hyper::Response<hyper::body::Incoming>> {
    sender.ready().await?;
    sender.send_request(req).await
}
