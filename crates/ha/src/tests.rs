//! Two replicas in a simulated world, 10 ms a step: a heartbeat path and
//! the segments (ARP) between them that fail and heal apart, processes
//! killed (their kernel keeps the addresses until they restart), frozen,
//! links down, planned stops. Whatever happens, two kernels never both
//! hold the addresses for longer than it takes the rules to notice while
//! the segments join them; once everything heals, exactly one holds them.

use proptest::prelude::*;

use super::*;

const STEP: u64 = 10;

/// One replica's process, kernel and links.
struct Node {
    replica: Replica,
    cfg: Config,
    /// Its process runs (kill -9 stops it; its kernel keeps what it held).
    alive: bool,
    /// SIGSTOP: no event is handled, the kernel goes on forwarding.
    frozen: bool,
    /// The kernel holds the addresses, with this term.
    holds: Option<u64>,
    links_up: bool,
    /// A probe asked for, answered at this time.
    probe_due: Option<u64>,
}

struct World {
    now: u64,
    nodes: [Node; 2],
    heartbeat: bool,
    segments: bool,
    /// Adverts in flight, delivered at the next step.
    wire: Vec<(usize, Advert)>,
}

impl World {
    fn new() -> World {
        let node = |name: &str, priority| {
            let cfg = Config::new(name, priority);
            Node {
                replica: Replica::new(cfg.clone(), 0),
                cfg,
                alive: true,
                frozen: false,
                holds: None,
                links_up: true,
                probe_due: None,
            }
        };
        World { now: 0, nodes: [node("a", 200), node("b", 100)], heartbeat: true, segments: true, wire: vec![] }
    }

    fn runs(&self, i: usize) -> bool {
        self.nodes[i].alive && !self.nodes[i].frozen
    }

    fn feed(&mut self, i: usize, event: Event) {
        if !self.runs(i) {
            return;
        }
        let now = self.now;
        let actions = self.nodes[i].replica.on(now, event);
        self.apply(i, actions);
    }

    fn apply(&mut self, i: usize, actions: Vec<Action>) {
        for a in actions {
            let n = &mut self.nodes[i];
            match a {
                Action::Send(adv) => self.wire.push((i, adv)),
                Action::Probe => n.probe_due = Some(self.now + n.cfg.probe_ms),
                Action::Take { term } => n.holds = Some(term),
                Action::Drop { .. } => n.holds = None,
                Action::Announce => {}
            }
        }
    }

    /// Whether the other replica's kernel answers ARP for the addresses on
    /// a segment `i` shares with it.
    fn answered(&self, i: usize) -> bool {
        let (me, other) = (&self.nodes[i], &self.nodes[1 - i]);
        self.segments && me.links_up && other.links_up && other.holds.is_some()
    }

    fn step(&mut self) {
        self.now += STEP;
        for (from, adv) in std::mem::take(&mut self.wire) {
            if self.heartbeat && self.runs(from) {
                self.feed(1 - from, Event::Heard(adv));
            }
        }
        for i in 0..2 {
            if self.nodes[i].probe_due.is_some_and(|t| t <= self.now) && self.runs(i) {
                self.nodes[i].probe_due = None;
                let answered = self.answered(i);
                self.feed(i, Event::Probed { answered });
            }
            self.feed(i, Event::Tick);
        }
    }

    /// Both kernels hold the addresses where the segments join them, and
    /// an agent runs that could let go. (Two killed or frozen agents whose
    /// kernels both hold stay so until one returns: nothing runs to act.)
    fn split(&self) -> bool {
        self.segments && self.nodes.iter().all(|n| n.holds.is_some() && n.links_up) && (0..2).any(|i| self.runs(i))
    }

    fn serving(&self) -> usize {
        self.nodes.iter().filter(|n| n.holds.is_some() && n.links_up).count()
    }

    fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
        self.nodes[i].probe_due = None;
    }

    /// The agent starts again: it resumes what its kernel holds.
    fn restart(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.alive = true;
        n.frozen = false;
        n.replica = match n.holds {
            Some(term) => Replica::resume(n.cfg.clone(), self.now, term),
            None => Replica::new(n.cfg.clone(), self.now),
        };
        let up = n.links_up;
        self.feed(i, Event::Links { up });
    }

    fn set_links(&mut self, i: usize, up: bool) {
        self.nodes[i].links_up = up;
        self.feed(i, Event::Links { up });
    }

    fn stop(&mut self, i: usize) {
        let to = Some(self.nodes[1 - i].cfg.name.clone());
        self.feed(i, Event::Stop { to });
    }

    fn run(&mut self, ms: u64) -> Result<(), String> {
        let window = Config::new("x", 0).dead_ms + 3 * Config::new("x", 0).probe_ms;
        let mut split_since: Option<u64> = None;
        for _ in 0..ms / STEP {
            self.step();
            match (self.split(), split_since) {
                (true, None) => split_since = Some(self.now),
                (true, Some(t)) if self.now - t > window => {
                    return Err(format!("both replicas held the addresses from {t} ms to {} ms", self.now));
                }
                (false, _) => split_since = None,
                _ => {}
            }
        }
        Ok(())
    }
}

#[test]
fn the_higher_priority_takes_first_and_the_other_stays_standby() {
    let mut w = World::new();
    w.run(2_000).unwrap();
    assert_eq!(w.nodes[0].replica.role(), Role::Active);
    assert_eq!(w.nodes[1].replica.role(), Role::Standby);
    assert_eq!((w.nodes[0].holds, w.nodes[1].holds), (Some(1), None));
}

#[test]
fn a_killed_active_whose_kernel_is_gone_is_replaced_within_half_a_second() {
    let mut w = World::new();
    w.run(2_000).unwrap();
    // The node dies: its process and its kernel's addresses with it.
    w.kill(0);
    w.nodes[0].holds = None;
    w.nodes[0].links_up = false;
    let t = w.now;
    while w.nodes[1].holds.is_none() {
        w.step();
        assert!(w.now - t < 1_000, "no takeover within a second");
    }
    assert!(w.now - t <= 500, "took {} ms", w.now - t);
    assert_eq!(w.nodes[1].holds, Some(2), "a new term");
}

#[test]
fn a_cut_heartbeat_path_alone_never_makes_a_second_holder() {
    let mut w = World::new();
    w.run(2_000).unwrap();
    w.heartbeat = false;
    w.run(5_000).unwrap();
    assert_eq!((w.nodes[0].holds.is_some(), w.nodes[1].holds.is_some()), (true, false));
    // The same for a frozen active: its kernel still forwards and answers.
    w.heartbeat = true;
    w.nodes[0].frozen = true;
    w.run(5_000).unwrap();
    assert_eq!((w.nodes[0].holds.is_some(), w.nodes[1].holds.is_some()), (true, false));
}

#[test]
fn a_planned_stop_hands_over_without_a_timeout() {
    let mut w = World::new();
    w.run(2_000).unwrap();
    w.stop(0);
    assert_eq!(w.nodes[0].holds, None, "the old active lets go first");
    let t = w.now;
    while w.nodes[1].holds.is_none() {
        w.step();
    }
    assert!(w.now - t <= 2 * STEP, "took {} ms", w.now - t);
}

#[test]
fn an_active_whose_link_goes_down_hands_over_at_once() {
    let mut w = World::new();
    w.run(2_000).unwrap();
    w.set_links(0, false);
    assert_eq!(w.nodes[0].holds, None);
    let t = w.now;
    while w.nodes[1].holds.is_none() {
        w.step();
    }
    assert!(w.now - t <= 200, "took {} ms", w.now - t);
}

/// Whichever notices first settles it: an advert heard (the later term
/// keeps the addresses) or a probe answered (the holder that probes lets
/// go). Either way one holder remains, within a second.
#[test]
fn after_a_full_partition_heals_one_keeps_the_addresses() {
    let mut w = World::new();
    w.run(2_000).unwrap();
    w.heartbeat = false;
    w.segments = false;
    w.run(2_000).unwrap();
    assert!(w.nodes[1].holds.is_some(), "on its own segment, b took over");
    w.heartbeat = true;
    w.segments = true;
    w.run(1_000).unwrap();
    assert_eq!(w.serving(), 1);
    // The heartbeat path heals first: the later term, b's, keeps them.
    let mut w = World::new();
    w.run(2_000).unwrap();
    w.heartbeat = false;
    w.segments = false;
    w.run(2_000).unwrap();
    w.heartbeat = true;
    w.run(STEP * 3).unwrap();
    w.segments = true;
    w.run(1_000).unwrap();
    assert_eq!((w.nodes[0].holds, w.nodes[1].holds.is_some()), (None, true), "b's term is later");
}

#[derive(Clone, Debug)]
enum Fault {
    Heartbeat(bool),
    Segments(bool),
    Kill(usize),
    Restart(usize),
    Freeze(usize, bool),
    Links(usize, bool),
    Stop(usize),
    Wait(u64),
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        any::<bool>().prop_map(Fault::Heartbeat),
        any::<bool>().prop_map(Fault::Segments),
        (0..2usize).prop_map(Fault::Kill),
        (0..2usize).prop_map(Fault::Restart),
        (0..2usize, any::<bool>()).prop_map(|(i, f)| Fault::Freeze(i, f)),
        (0..2usize, any::<bool>()).prop_map(|(i, u)| Fault::Links(i, u)),
        (0..2usize).prop_map(Fault::Stop),
        (1..100u64).prop_map(|n| Fault::Wait(n * STEP)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Any sequence of faults: never two holders for longer than the
    /// rules take while the segments join them, and once all heals, one.
    #[test]
    fn one_holder_whatever_fails(faults in prop::collection::vec(fault(), 1..40)) {
        let mut w = World::new();
        w.run(1_000).map_err(TestCaseError::fail)?;
        for f in faults {
            match f {
                Fault::Heartbeat(up) => w.heartbeat = up,
                Fault::Segments(up) => w.segments = up,
                Fault::Kill(i) => w.kill(i),
                Fault::Restart(i) => w.restart(i),
                Fault::Freeze(i, on) => w.nodes[i].frozen = on && w.nodes[i].alive,
                Fault::Links(i, up) => w.set_links(i, up),
                Fault::Stop(i) => {
                    // A planned stop is followed by the replica's return
                    // (a new pod), as an upgrade does.
                    w.stop(i);
                    w.run(50).map_err(TestCaseError::fail)?;
                    w.kill(i);
                    w.restart(i);
                }
                Fault::Wait(ms) => w.run(ms).map_err(TestCaseError::fail)?,
            }
            w.run(STEP).map_err(TestCaseError::fail)?;
        }
        // Everything heals.
        w.heartbeat = true;
        w.segments = true;
        for i in 0..2 {
            if !w.nodes[i].alive { w.restart(i); }
            w.nodes[i].frozen = false;
            w.set_links(i, true);
        }
        w.run(3_000).map_err(TestCaseError::fail)?;
        prop_assert_eq!(w.serving(), 1, "{:?}", w.nodes.iter().map(|n| (n.replica.role(), n.holds)).collect::<Vec<_>>());
        let roles: Vec<Role> = w.nodes.iter().map(|n| n.replica.role()).collect();
        prop_assert!(roles.contains(&Role::Active) && roles.contains(&Role::Standby), "{roles:?}");
    }
}
