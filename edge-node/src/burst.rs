//! Refusals logged without flooding the log: a [`Burst`] says when to log.
//!
//! A guest or a device that keeps doing something the agent refuses (a kv
//! put over quota, an emit to an undeclared point, a message stamped in the
//! future) would otherwise write one log line per refusal. Every refusal is
//! still counted where it happens; the log gets the first refusal of a
//! burst and, when the next request is accepted, one line saying how many
//! the burst had.

/// Refusals since the last accepted request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Burst {
    refused: u64,
}

impl Burst {
    /// Records `n` refusals; `true` when they start a burst (log this one).
    pub fn refuse(&mut self, n: u64) -> bool {
        let first = self.refused == 0 && n > 0;
        self.refused = self.refused.saturating_add(n);
        first
    }

    /// Records an accepted request; `Some(n)` when it ends a burst of `n`
    /// refusals (log that).
    pub fn accept(&mut self) -> Option<u64> {
        (self.refused > 0).then(|| std::mem::take(&mut self.refused))
    }

    /// Refusals in the current burst.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_refusal_and_the_end_of_a_burst() {
        let mut b = Burst::default();
        assert_eq!(b.accept(), None);
        assert!(b.refuse(1));
        assert!(!b.refuse(1));
        assert!(!b.refuse(3));
        assert_eq!(b.refused(), 5);
        assert_eq!(b.accept(), Some(5));
        assert_eq!(b.accept(), None);
        assert!(!b.refuse(0));
        assert!(b.refuse(2));
    }
}
