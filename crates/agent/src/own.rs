//! The agent's own conditions as its cache keeps them. Three conditions
//! are twelve heap strings, about 750 bytes an object and most of its
//! cached size; the agent reads them only to tell whether what it would
//! write is there already and, when it writes, to keep the transition
//! time of a status that did not flip. So the cache keeps one short
//! string: each condition's status and transition time, and one digest of
//! everything they say.

use std::hash::{DefaultHasher, Hash, Hasher};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::CONDITIONS;

/// What the cache holds of the agent's conditions, in `CONDITIONS` order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Own {
    /// Each condition's status (its first letter) and transition time in
    /// seconds, when present.
    since: [Option<(char, i64)>; 3],
    /// Of all three, when all three are present.
    digest: Option<u64>,
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
fn letter(status: &str) -> char {
    match status {
        "True" => 'T',
        "False" => 'F',
        "Unknown" => 'U',
        _ => '?',
    }
}

impl Own {
    /// Read from conditions as the API server serves them.
    pub fn of(conditions: &[Condition]) -> Own {
        let find = |t: &str| conditions.iter().find(|c| c.type_ == t);
        let found = CONDITIONS.map(find);
        let since = found.map(|c| c.map(|c| (letter(&c.status), c.last_transition_time.0.as_second())));
        let digest = match found {
            [Some(a), Some(b), Some(c)] => {
                let said = [a, b, c].into_iter().map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str()));
                Some(digest(said, &[a, b, c].map(|c| c.observed_generation)))
            }
            _ => None,
        };
        Own { since, digest }
    }

    /// Whether the conditions say exactly `want` (in `CONDITIONS` order),
    /// each observing `generation`.
    pub fn says<'a>(&self, want: impl Iterator<Item = Said<'a>>, generation: Option<i64>) -> bool {
        self.digest == Some(digest(want, &[generation; 3]))
    }

    /// When condition `i` took `status`, if that is its status now.
    pub fn since(&self, i: usize, status: &str) -> Option<Time> {
        let (l, s) = self.since.get(i).copied().flatten()?;
        if l != letter(status) || l == '?' {
            return None;
        }
        Timestamp::from_second(s).ok().map(Time)
    }

    /// As one condition for the cache (`None` when the agent has none).
    pub fn pack(&self) -> Option<Condition> {
        if self.since.iter().all(Option::is_none) {
            return None;
        }
        let records: Vec<String> =
            self.since.iter().map(|s| s.map_or_else(|| "-".to_string(), |(l, t)| format!("{l}{t}"))).collect();
        let mut message = records.join(",");
        if let Some(d) = self.digest {
            message.push_str(&format!(";{d:016x}"));
        }
        message.shrink_to_fit();
        // An empty type: the cache keeps no other condition (a served one
        // always has a type), so it cannot be taken for another.
        Some(Condition {
            type_: String::new(),
            status: String::new(),
            reason: String::new(),
            message,
            observed_generation: None,
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        })
    }

    /// What the cache holds: its packed condition, or conditions as served.
    /// A packed one that does not parse holds nothing, so the status pass
    /// writes the conditions again.
    pub fn cached(conditions: &[Condition]) -> Own {
        match conditions {
            [c] if c.type_.is_empty() => Own::parse(&c.message).unwrap_or_default(),
            _ => Own::of(conditions),
        }
    }

    fn parse(message: &str) -> Option<Own> {
        let (records, digest) = match message.split_once(';') {
            Some((r, d)) => (r, Some(u64::from_str_radix(d, 16).ok()?)),
            None => (message, None),
        };
        let mut since = [None; 3];
        let mut parts = records.split(',');
        for s in &mut since {
            let part = parts.next()?;
            if part != "-" {
                let mut chars = part.chars();
                let l = chars.next()?;
                *s = Some((l, chars.as_str().parse().ok()?));
            }
        }
        parts.next().is_none().then_some(Own { since, digest })
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
    fn packed_conditions_tell_what_they_say_and_since_when() {
        let m = "spec.eip: 192.0.2.10 is held by FloatingIp/a, ünïcode, a\u{1f}b;c,d";
        for g in [None, Some(0), Some(7), Some(i64::MAX)] {
            let own = Own::of(&served(m, g));
            let packed = own.pack().expect("packs");
            assert!(packed.message.len() < 60, "{}", packed.message);
            let back = Own::cached(&[packed]);
            assert_eq!(back, own);
            assert!(back.says(said(m).into_iter(), g));
            assert_eq!(back.since(1, "True"), Some(at(1_764_700_001)));
            // A status that flips has no time to keep.
            assert_eq!(back.since(1, "False"), None);
        }
    }

    #[test]
    fn any_difference_in_what_is_said_is_told() {
        let own = Own::cached(&[Own::of(&served("m", Some(1))).pack().expect("packs")]);
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
        let own = Own::cached(&[Own::of(&conditions).pack().expect("packs")]);
        assert!(!own.says(said("m").into_iter(), Some(1)));
        assert_eq!(own.since(0, "False"), None);
        assert_eq!(own.since(2, "False"), Some(at(1_764_700_002)));
        assert_eq!(Own::of(&[]).pack(), None);
        assert_eq!(Own::cached(&[]), Own::default());
    }

    #[test]
    fn a_packed_condition_that_does_not_parse_holds_nothing() {
        for message in ["", "T1", "T1,F2", "T1,F2,T3,T4", "T1,F2,Tx", "T1,F2,T3;zz", "T1,,T3"] {
            let mut c = Own::of(&served("m", Some(1))).pack().expect("packs");
            c.message = message.into();
            assert_eq!(Own::cached(&[c]), Own::default(), "{message:?}");
        }
        // An odd status is kept but never matches a time.
        let mut odd = served("m", Some(1));
        odd[0].status = "Maybe".into();
        let own = Own::cached(&[Own::of(&odd).pack().expect("packs")]);
        assert_eq!(own.since(0, "Maybe"), None);
    }
}
