//! Group commit: one thread takes every job queued while it was busy and handles them together,
//! so a burst of writers pays for one expensive step (a transaction commit, a disk flush) instead
//! of one each. The queue is bounded; callers wait asynchronously to join it.

use tokio::sync::mpsc;

/// Starts the thread `name`; `handle` gets each group (never empty, at most `max_group` jobs).
/// The thread ends when every returned sender is dropped.
pub fn spawn<J, H>(
    name: &str, capacity: usize, max_group: usize, mut handle: H,
) -> std::io::Result<mpsc::Sender<J>>
where
    J: Send + 'static,
    H: FnMut(Vec<J>) + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel(capacity);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut group = vec![first];
                while group.len() < max_group {
                    match rx.try_recv() {
                        Ok(job) => group.push(job),
                        Err(_) => break,
                    }
                }
                handle(group);
            }
        })?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn jobs_queued_while_busy_are_handled_together() {
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        let tx = super::spawn(
            "group-test",
            64,
            8,
            move |g: Vec<oneshot::Sender<usize>>| {
                // Slow enough that the other jobs queue up behind the first group.
                std::thread::sleep(std::time::Duration::from_millis(50));
                let n = g.len();
                seen_tx.send(n).unwrap();
                for reply in g {
                    let _ = reply.send(n);
                }
            },
        )
        .unwrap();
        let jobs = (0..20).map(|_| {
            let tx = tx.clone();
            async move {
                let (reply, answer) = oneshot::channel();
                tx.send(reply).await.unwrap();
                answer.await.unwrap()
            }
        });
        let sizes = futures::future::join_all(jobs).await;
        drop(tx);
        let groups: Vec<usize> = seen_rx.iter().collect();
        assert_eq!(groups.iter().sum::<usize>(), 20);
        assert!(groups.iter().all(|&n| n <= 8), "{groups:?}");
        assert!(groups.len() <= 5, "jobs were not grouped: {groups:?}");
        assert!(sizes.iter().all(|&n| n >= 1));
    }
}
