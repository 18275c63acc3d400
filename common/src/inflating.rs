//! Inflating stored gzip that arrives as an async stream (an object being read), on a blocking
//! thread so the runtime never runs the codec: to learn the content's digest, or to serve the
//! content itself to a client that takes no gzip.

use std::io::{self, Write};

use bytes::Bytes;
use futures::Stream;
use tokio::sync::mpsc;

use crate::blob::{self, BlobError, ChannelReader, Chunk, Digest};

/// Chunks queued each way between the stream and the inflating thread.
const QUEUE: usize = 8;

/// The digest and length of the content `stream` (stored gzip) inflates to.
pub async fn digest_of<S>(stream: S) -> Result<(Digest, u64), BlobError>
where
    S: Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel(QUEUE);
    let feeder = async move { blob::feed(stream, &tx).await };
    let inflater =
        tokio::task::spawn_blocking(move || blob::inflate(ChannelReader::new(rx), io::sink()));
    let ((), result) = tokio::join!(feeder, inflater);
    result.map_err(|e| BlobError::Interrupted(e.to_string()))?
}

/// The content `stream` (stored gzip) inflates to, checked against `digest` as it goes. The last
/// chunk is held back until the whole content is proven: a body that fails at its very end (a
/// gzip trailer cut off, another digest) reaches the client short, as a failure.
pub fn content_of<S>(stream: S, digest: Digest) -> impl Stream<Item = io::Result<Bytes>> + Send
where
    S: Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static,
{
    let (in_tx, in_rx) = mpsc::channel::<Chunk>(QUEUE);
    let (out_tx, out_rx) = mpsc::channel::<io::Result<Bytes>>(QUEUE);
    tokio::spawn(async move { blob::feed(stream, &in_tx).await });
    tokio::task::spawn_blocking(move || {
        let mut out = io::BufWriter::with_capacity(
            64 * 1024,
            HoldLast {
                tx: out_tx.clone(),
                held: None,
            },
        );
        let checked = match blob::inflate(ChannelReader::new(in_rx), &mut out) {
            Ok((d, _)) if d == digest => out.flush().map_err(|e| e.to_string()),
            Ok((d, _)) => Err(format!("stored content inflates to {d}, not {digest}")),
            Err(e) => Err(e.to_string()),
        };
        // Without flushing what is buffered: on an error, the body must come out short.
        let (mut last, _) = out.into_parts();
        let end = match checked {
            Ok(()) => last.held.take().map(Ok),
            Err(e) => Some(Err(io::Error::other(e))),
        };
        if let Some(end) = end {
            let _ = out_tx.blocking_send(end);
        }
    });
    futures::stream::unfold(
        out_rx,
        |mut rx| async move { rx.recv().await.map(|v| (v, rx)) },
    )
}

/// Sends all but the last chunk written, which waits until the whole content is proven;
/// complete, a client would take a body that should have failed and reuse the connection
/// that the server is closing.
struct HoldLast {
    tx: mpsc::Sender<io::Result<Bytes>>,
    held: Option<Bytes>,
}

impl Write for HoldLast {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(ready) = self.held.replace(Bytes::copy_from_slice(buf)) {
            self.tx
                .blocking_send(Ok(ready))
                .map_err(|_| io::Error::other("client went away"))?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    fn chunks(gz: &[u8]) -> impl Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static {
        let parts: Vec<io::Result<Bytes>> = gz
            .chunks(7)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(parts)
    }

    #[tokio::test]
    async fn the_digest_and_the_content_of_a_stream() {
        let content = b"inflated off the runtime".repeat(100);
        let gz = blob::tests::gzip(&content, 6);
        let (d, n) = digest_of(chunks(&gz)).await.unwrap();
        assert_eq!(n, content.len() as u64);
        let out: Vec<Bytes> = content_of(chunks(&gz), d).try_collect().await.unwrap();
        assert_eq!(out.concat(), content);
        // Another digest: the stream ends in an error and its last chunk never comes.
        let other = Digest([7; 32]);
        let got: Vec<io::Result<Bytes>> = content_of(chunks(&gz), other).collect().await;
        let sent: usize = got
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(Bytes::len)
            .sum();
        assert!(got.last().is_some_and(|r| r.is_err()));
        assert!(sent < content.len());
    }

    use futures::StreamExt;
}
