//! At-least-once offset tracking. A partition's commit point only moves past an offset
//! when that message and every earlier one of the partition has had its output (verdict,
//! dead letter, or nothing to publish) acknowledged. Messages are dispatched in offset
//! order per partition; acknowledgements arrive in any order.
//!
//! Each assignment of a partition gets a generation number: acknowledgements of messages
//! read under an earlier assignment (before a revoke) are ignored, so a partition that
//! moved away and came back cannot be committed past work it never finished.
//!
//! Work of a revoked partition may still be in the pipeline (channels, the scorer, the
//! producer's retry queue): it stays counted as in flight ("orphaned") until its late
//! acknowledgement or release arrives, so back-pressure sees everything the pipeline
//! holds. A commit point counts as committed only once the commit succeeded
//! ([`OffsetTracker::mark_committed`]); a failed commit is tried again.

use std::collections::{BTreeMap, BTreeSet};

/// (topic, partition)
pub type TopicPartition = (String, i32);

/// A message's output was acknowledged by the broker (or it had nothing to publish, or
/// its abandoned work is released after a revoke): the tracker may move past it.
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    pub tp: TopicPartition,
    pub offset: i64,
    /// The assignment the message was read under ([`OffsetTracker::dispatch`]).
    pub generation: u64,
}

#[derive(Debug, Default)]
struct PartitionState {
    generation: u64,
    /// Dispatched, not yet acknowledged.
    pending: BTreeSet<i64>,
    /// Offset after the highest dispatched one.
    next: Option<i64>,
    /// Last commit point handed out by `take_commits`.
    committed: Option<i64>,
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: BTreeMap<TopicPartition, PartitionState>,
    /// Still in the pipeline after their partition was revoked, by (partition, generation).
    orphaned: BTreeMap<(TopicPartition, u64), BTreeSet<i64>>,
    generation: u64,
}

impl OffsetTracker {
    /// Starts tracking newly assigned partitions (a fresh generation each time).
    pub fn assign(&mut self, tps: impl IntoIterator<Item = TopicPartition>) {
        for tp in tps {
            self.generation += 1;
            self.partitions.insert(tp, PartitionState { generation: self.generation, ..Default::default() });
        }
    }

    /// Stops tracking revoked partitions; late acknowledgements for them are ignored.
    pub fn revoke(&mut self, tps: impl IntoIterator<Item = TopicPartition>) {
        for tp in tps {
            if let Some(p) = self.partitions.remove(&tp) {
                if !p.pending.is_empty() {
                    self.orphaned.insert((tp, p.generation), p.pending);
                }
            }
        }
    }

    /// Whether work read under `generation` still belongs to this assignment (false once
    /// its partition was revoked: its output may then be abandoned).
    pub fn is_current(&self, tp: &TopicPartition, generation: u64) -> bool {
        self.partitions.get(tp).is_some_and(|p| p.generation == generation)
    }

    /// Records a consumed message; returns the generation its acknowledgement must carry,
    /// or None when the partition is not assigned (the message is then not processed).
    pub fn dispatch(&mut self, tp: &TopicPartition, offset: i64) -> Option<u64> {
        let p = self.partitions.get_mut(tp)?;
        p.pending.insert(offset);
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
        Some(p.generation)
    }

    /// Records an item that stands for the offsets `first..=last` (a skipped unreadable
    /// range): its acknowledgement moves the commit point past all of them.
    pub fn dispatch_range(&mut self, tp: &TopicPartition, first: i64, last: i64) -> Option<u64> {
        let p = self.partitions.get_mut(tp)?;
        p.pending.insert(first);
        p.next = Some(p.next.map_or(last + 1, |n| n.max(last + 1)));
        Some(p.generation)
    }

    /// With nothing pending, moves the commit point up to `position` (the consumer's
    /// position, past records the application never sees, such as transaction markers).
    /// The caller guarantees that every record before `position` was dispatched.
    pub fn advance_idle(&mut self, tp: &TopicPartition, position: i64) {
        if let Some(p) = self.partitions.get_mut(tp) {
            if p.pending.is_empty() && p.next.is_some_and(|n| position > n) {
                p.next = Some(position);
            }
        }
    }

    pub fn is_assigned(&self, tp: &TopicPartition) -> bool {
        self.partitions.contains_key(tp)
    }

    /// Acknowledges a message's output (or releases work abandoned after a revoke).
    /// Returns false when it belongs to an old generation: it then only leaves the
    /// in-flight count.
    pub fn ack(&mut self, tp: &TopicPartition, offset: i64, generation: u64) -> bool {
        match self.partitions.get_mut(tp) {
            Some(p) if p.generation == generation => p.pending.remove(&offset),
            _ => {
                let key = (tp.clone(), generation);
                if let Some(set) = self.orphaned.get_mut(&key) {
                    set.remove(&offset);
                    if set.is_empty() {
                        self.orphaned.remove(&key);
                    }
                }
                false
            }
        }
    }

    /// The offset to commit for a partition (the next one to read): the oldest
    /// unacknowledged offset, or one past the highest dispatched.
    pub fn commit_point(&self, tp: &TopicPartition) -> Option<i64> {
        let p = self.partitions.get(tp)?;
        p.pending.first().copied().or(p.next)
    }

    /// Commit points that differ from the last successful commit.
    pub fn due_commits(&self) -> Vec<(TopicPartition, i64)> {
        self.partitions
            .iter()
            .filter_map(|(tp, p)| {
                let point = p.pending.first().copied().or(p.next)?;
                (p.committed != Some(point)).then(|| (tp.clone(), point))
            })
            .collect()
    }

    /// Records a successful commit (never before the broker confirmed it).
    pub fn mark_committed(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(p) = self.partitions.get_mut(tp) {
            if p.committed.is_none_or(|c| c < offset) {
                p.committed = Some(offset);
            }
        }
    }

    /// Commit points of the given partitions (for a synchronous commit on revoke).
    pub fn commits_for(&self, tps: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        tps.iter().filter_map(|tp| self.commit_point(tp).map(|o| (tp.clone(), o))).collect()
    }

    /// Messages dispatched and not yet acknowledged or released, over all partitions,
    /// including those of revoked partitions that are still in the pipeline.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|p| p.pending.len()).sum::<usize>()
            + self.orphaned.values().map(BTreeSet::len).sum::<usize>()
    }

    pub fn assigned(&self) -> Vec<TopicPartition> {
        self.partitions.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        ("images".to_string(), p)
    }

    #[test]
    fn commit_point_waits_for_every_earlier_message() {
        let mut t = OffsetTracker::default();
        t.assign([tp(0)]);
        let g = t.dispatch(&tp(0), 10).unwrap();
        t.dispatch(&tp(0), 11);
        t.dispatch(&tp(0), 12);
        assert_eq!(t.commit_point(&tp(0)), Some(10));
        // Out of order: 12 and 11 done, 10 still pending -> nothing moves.
        assert!(t.ack(&tp(0), 12, g));
        assert!(t.ack(&tp(0), 11, g));
        assert_eq!(t.commit_point(&tp(0)), Some(10));
        assert_eq!(t.in_flight(), 1);
        assert!(t.ack(&tp(0), 10, g));
        assert_eq!(t.commit_point(&tp(0)), Some(13));
        assert_eq!(t.due_commits(), vec![(tp(0), 13)]);
        assert_eq!(t.due_commits(), vec![(tp(0), 13)], "due until a commit succeeded");
        t.mark_committed(&tp(0), 13);
        assert!(t.due_commits().is_empty(), "an unchanged point is not committed twice");
    }

    #[test]
    fn acks_from_an_earlier_assignment_are_ignored() {
        let mut t = OffsetTracker::default();
        t.assign([tp(1)]);
        let old = t.dispatch(&tp(1), 5).unwrap();
        t.revoke([tp(1)]);
        assert_eq!(t.dispatch(&tp(1), 6), None, "not assigned: not processed");
        t.assign([tp(1)]);
        let new = t.dispatch(&tp(1), 5).unwrap();
        assert_ne!(old, new);
        assert_eq!(t.in_flight(), 2, "the revoked work is still in the pipeline");
        assert!(!t.is_current(&tp(1), old));
        assert!(!t.ack(&tp(1), 5, old));
        assert_eq!(t.in_flight(), 1, "its late acknowledgement leaves the in-flight count");
        assert_eq!(t.commit_point(&tp(1)), Some(5));
        assert!(t.ack(&tp(1), 5, new));
        assert_eq!(t.commit_point(&tp(1)), Some(6));
    }

    #[test]
    fn an_idle_partition_follows_the_position_past_markers_but_never_past_pending_work() {
        let mut t = OffsetTracker::default();
        t.assign([tp(0)]);
        t.advance_idle(&tp(0), 7);
        assert_eq!(t.commit_point(&tp(0)), None, "nothing read yet: the group's commit stands");
        let g = t.dispatch(&tp(0), 3).unwrap();
        t.advance_idle(&tp(0), 5);
        assert_eq!(t.commit_point(&tp(0)), Some(3), "pending work holds the point");
        t.ack(&tp(0), 3, g);
        assert_eq!(t.commit_point(&tp(0)), Some(4));
        // The transaction's commit marker at offset 4: the position is 5.
        t.advance_idle(&tp(0), 5);
        assert_eq!(t.commit_point(&tp(0)), Some(5));
        t.advance_idle(&tp(0), 2);
        assert_eq!(t.commit_point(&tp(0)), Some(5), "never backwards");
    }

    #[test]
    fn a_skipped_range_is_one_item_whose_ack_passes_the_whole_range() {
        let mut t = OffsetTracker::default();
        t.assign([tp(0)]);
        let g = t.dispatch_range(&tp(0), 10, 14).unwrap();
        assert_eq!(t.commit_point(&tp(0)), Some(10));
        assert_eq!(t.in_flight(), 1);
        t.ack(&tp(0), 10, g);
        assert_eq!(t.commit_point(&tp(0)), Some(15));
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::default();
        t.assign([tp(0), tp(1)]);
        let g0 = t.dispatch(&tp(0), 0).unwrap();
        let g1 = t.dispatch(&tp(1), 0).unwrap();
        t.dispatch(&tp(1), 1);
        t.ack(&tp(1), 0, g1);
        assert_eq!(t.commits_for(&[tp(0), tp(1)]), vec![(tp(0), 0), (tp(1), 1)]);
        t.ack(&tp(0), 0, g0);
        assert_eq!(t.commit_point(&tp(0)), Some(1));
    }
}
