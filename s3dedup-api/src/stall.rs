//! Disconnects clients that stop reading responses: a connection whose writes stay blocked
//! for `api.send_timeout_secs` fails, freeing its slot, its S3 stream and its buffers.
//!
//! Only *blocked* writes are timed. A slow handler (a long S3 upload before the answer) never
//! trips it, and neither does an idle keep-alive connection (that is the header timeout's job).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A connection whose writes fail after being blocked for `limit` (None: never).
pub struct StallGuard<T> {
    inner: T,
    limit: Option<Duration>,
    /// Armed while a write is blocked; cleared by any progress.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> StallGuard<T> {
    pub fn new(inner: T, limit: Option<Duration>) -> Self {
        StallGuard {
            inner,
            limit,
            timer: None,
        }
    }

    /// Turns a write's `Pending` into an error once it has lasted `limit`.
    fn on_write<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.timer = None;
            return r;
        }
        let Some(limit) = self.limit else {
            return r;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + limit)));
        ready!(timer.as_mut().poll(cx));
        self.timer = None;
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "client read nothing for {} s (api.send_timeout_secs)",
                limit.as_secs()
            ),
        )))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.on_write(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.on_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.on_write(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_blocked_write_fails_after_the_limit_and_progress_resets_it() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut g = StallGuard::new(a, Some(Duration::from_secs(10)));
        g.write_all(&[0; 1024]).await.unwrap();
        // The peer reads a little after 8 s: progress, so no timeout yet.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(8)).await;
            let mut buf = [0; 1024];
            b.read_exact(&mut buf).await.unwrap();
            b // keep the peer open but reading nothing more
        });
        g.write_all(&[0; 1024]).await.unwrap();
        let _peer = reader.await.unwrap();
        let start = Instant::now();
        let e = g.write_all(&[0; 1]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }
}
