//! The gateway agent's own conditions as natgw holds them. Three
//! conditions are twelve heap strings, about 750 bytes an object; the agent
//! reads them only to tell whether what it would write is there already
//! and, when it writes, to keep the transition time of a status that did
//! not flip. So a held object keeps each condition's status and transition
//! time, and one digest of everything they say.

use std::hash::{DefaultHasher, Hash, Hasher};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The conditions the gateway agent owns on Eips and rules, in the order
/// `Own` keeps them.
pub const AGENT_CONDITIONS: [&str; 3] = ["Programmed", "Conflict", "Ready"];

/// What is held of the agent's conditions, in `AGENT_CONDITIONS` order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Own {
    /// Each condition's status as a letter (0 when the condition is
    /// absent) and its transition time in seconds. Kept apart rather than
    /// as options of pairs: 40 bytes an object instead of 64.
    letters: [u8; 3],
    secs: [i64; 3],
    /// Of all three, when all three are present.
    digest: Option<std::num::NonZeroU64>,
}

/// One condition's status, reason and message.
pub type Said<'a> = (&'a str, &'a str, &'a str);

fn digest<'a>(said: impl Iterator<Item = Said<'a>>, generation: &[Option<i64>; 3]) -> u64 {
    // Deterministic within a process, which is all it is compared in.
    let mut h = DefaultHasher::new();
    for ((status, reason, message), g) in said.zip(generation) {
        (status, reason, message, g).hash(&mut h);
    }
    h.finish()
}

/// The status's letter: only True, False and Unknown are told apart.
fn letter(status: &str) -> u8 {
    match status {
        "True" => b'T',
        "False" => b'F',
        "Unknown" => b'U',
        _ => b'?',
    }
}

/// A digest as held: one of 0 is taken as 1 (a status written once more
/// in 2^64 is the cost).
fn held(d: u64) -> std::num::NonZeroU64 {
    std::num::NonZeroU64::new(d).unwrap_or(std::num::NonZeroU64::MIN)
}

impl Own {
    /// Read from conditions as the API server serves them.
    pub fn of(conditions: &[Condition]) -> Own {
        let find = |t: &str| conditions.iter().find(|c| c.type_ == t);
        let found = AGENT_CONDITIONS.map(find);
        let letters = found.map(|c| c.map_or(0, |c| letter(&c.status)));
        let secs = found.map(|c| c.map_or(0, |c| c.last_transition_time.0.as_second()));
        let digest = match found {
            [Some(a), Some(b), Some(c)] => {
                let said = [a, b, c].into_iter().map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str()));
                Some(held(digest(said, &[a, b, c].map(|c| c.observed_generation))))
            }
            _ => None,
        };
        Own { letters, secs, digest }
    }

    /// Whether the conditions say exactly `want` (in `AGENT_CONDITIONS` order),
    /// each observing `generation`.
    pub fn says<'a>(&self, want: impl Iterator<Item = Said<'a>>, generation: Option<i64>) -> bool {
        self.digest == Some(held(digest(want, &[generation; 3])))
    }

    /// When condition `i` took `status`, if that is its status now.
    pub fn since(&self, i: usize, status: &str) -> Option<Time> {
        let (l, s) = (*self.letters.get(i)?, *self.secs.get(i)?);
        if l == 0 || l != letter(status) || l == b'?' {
            return None;
        }
        Timestamp::from_second(s).ok().map(Time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn condition(t: &str, status: &str, reason: &str, message: &str, g: Option<i64>, s: i64) -> Condition {
        Condition {
            type_: t.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: g,
            last_transition_time: at(s),
        }
    }

    fn served(message: &str, g: Option<i64>) -> Vec<Condition> {
        vec![
            condition("Programmed", "False", "Conflict", message, g, 1_764_700_000),
            condition("Conflict", "True", "Conflict", message, g, 1_764_700_001),
            condition("Ready", "False", "Conflict", message, g, 1_764_700_002),
        ]
    }

    fn said(message: &str) -> [Said<'_>; 3] {
        [("False", "Conflict", message), ("True", "Conflict", message), ("False", "Conflict", message)]
    }

    #[test]
    fn held_conditions_tell_what_they_say_and_since_when() {
        let m = "spec.eip: 192.0.2.10 is held by FloatingIp/a, ünïcode, a\u{1f}b;c,d";
        for g in [None, Some(0), Some(7), Some(i64::MAX)] {
            let own = Own::of(&served(m, g));
            assert!(own.says(said(m).into_iter(), g));
            assert_eq!(own.since(1, "True"), Some(at(1_764_700_001)));
            // A status that flips has no time to keep.
            assert_eq!(own.since(1, "False"), None);
        }
        // Conditions of other managers, in any order, change nothing.
        let mut mixed = served(m, Some(1));
        mixed.insert(1, condition("Bound", "True", "Other", "x", None, 5));
        mixed.reverse();
        assert_eq!(Own::of(&mixed), Own::of(&served(m, Some(1))));
    }

    #[test]
    fn any_difference_in_what_is_said_is_told() {
        let own = Own::of(&served("m", Some(1)));
        assert!(own.says(said("m").into_iter(), Some(1)));
        assert!(!own.says(said("m").into_iter(), Some(2)), "generation");
        assert!(!own.says(said("m ").into_iter(), Some(1)), "message");
        let mut other = said("m");
        other[2].1 = "Pending";
        assert!(!own.says(other.into_iter(), Some(1)), "reason");
        other = said("m");
        other[0].0 = "True";
        assert!(!own.says(other.into_iter(), Some(1)), "status");
        // Reason and message swapped between fields are not the same.
        let swapped = Own::of(&[
            condition("Programmed", "False", "ab", "c", Some(1), 0),
            condition("Conflict", "True", "Conflict", "m", Some(1), 0),
            condition("Ready", "False", "Conflict", "m", Some(1), 0),
        ]);
        assert!(!swapped.says([("False", "a", "bc"), said("m")[1], said("m")[2]].into_iter(), Some(1)));
    }

    #[test]
    fn missing_conditions_are_written_again_and_present_ones_keep_their_time() {
        let mut conditions = served("m", Some(1));
        conditions.remove(0);
        let own = Own::of(&conditions);
        assert!(!own.says(said("m").into_iter(), Some(1)));
        assert_eq!(own.since(0, "False"), None);
        assert_eq!(own.since(2, "False"), Some(at(1_764_700_002)));
        assert_eq!(Own::of(&[]), Own::default());
        // An odd status is kept but never matches a time.
        let mut odd = served("m", Some(1));
        odd[0].status = "Maybe".into();
        assert_eq!(Own::of(&odd).since(0, "Maybe"), None);
    }
}
