//! How far a run may say it got. Files finish out of order (a large one does not hold up the
//! small ones behind it), but a checkpoint means "everything up to here is done": it is the
//! position of the last file that finished with every file before it finished too, and it
//! never passes a file that failed, so a run resumed after a kill tries that file again.

use std::collections::BTreeMap;

/// Files in the order the source gave them (`0, 1, 2, …`), as they finish.
#[derive(Debug, Default)]
pub(super) struct InOrder {
    /// The first file not yet known finished.
    next: u64,
    /// Files finished after a gap: whether each failed, and its position.
    waiting: BTreeMap<u64, (bool, Option<String>)>,
    /// A file that failed was reached in order: the checkpoint stays where it is.
    blocked: bool,
    position: Option<String>,
}

impl InOrder {
    /// Records that file `seq` finished (`failed` or not), with the position a checkpoint
    /// after it records (none for a source without a fixed order).
    pub(super) fn finished(&mut self, seq: u64, failed: bool, position: Option<String>) {
        self.waiting.insert(seq, (failed, position));
        while let Some((failed, position)) = self.waiting.remove(&self.next) {
            self.blocked |= failed;
            if !self.blocked {
                self.position = position.or(self.position.take());
            }
            self.next += 1;
        }
    }

    /// Where a checkpoint may say the run got, if anywhere.
    pub(super) fn position(&self) -> Option<&str> {
        self.position.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    #[test]
    fn a_slow_file_holds_the_checkpoint_not_the_files_after_it() {
        let mut c = InOrder::default();
        c.finished(1, false, pos("b"));
        c.finished(2, false, pos("c"));
        assert_eq!(c.position(), None, "file 0 is still in flight");
        c.finished(0, false, pos("a"));
        assert_eq!(c.position(), Some("c"));
        c.finished(4, false, pos("e"));
        assert_eq!(c.position(), Some("c"));
        c.finished(3, false, pos("d"));
        assert_eq!(c.position(), Some("e"));
    }

    #[test]
    fn never_past_a_file_that_failed() {
        let mut c = InOrder::default();
        c.finished(0, false, pos("a"));
        c.finished(2, false, pos("c"));
        c.finished(1, true, pos("b"));
        assert_eq!(c.position(), Some("a"));
        c.finished(3, false, pos("d"));
        assert_eq!(
            c.position(),
            Some("a"),
            "not even once the files after it finish"
        );
    }
}
