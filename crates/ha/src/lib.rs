//! Who is active among a gateway's replicas (pure: no clock, no socket).
//!
//! A replica is a state machine fed what happened (a tick, an advert heard
//! from a peer, its own links, the answer to an address probe, a planned
//! stop) and answering with what to do (send an advert, probe, take or
//! drop the addresses). The edges (a UDP socket, ARP, the data plane) sit
//! around it.
//!
//! - **Heartbeat.** Every replica advertises every `advert_ms` on the
//!   heartbeat path: its name, priority, whether it is active and its term.
//!   A standby that hears no active for `dead_ms` suspects it is gone.
//! - **Fence before taking.** A suspecting standby does not take the
//!   addresses on the heartbeat's word: it probes them on both segments
//!   (ARP "who has", as address conflict detection does). Any answer means
//!   someone still holds them (the heartbeat path is cut, or the active is
//!   frozen but its kernel forwards): it stays standby. Only silence, or an
//!   active that said it let go, hands it the addresses. So a partition of
//!   the heartbeat path alone never makes two replicas answer ARP for one
//!   address.
//! - **Terms.** Each takeover starts a term one above every term seen.
//!   Two actives that hear each other (a partition of both paths healed)
//!   keep the later term; equal terms, the higher priority, then the name.
//!   The loser drops its addresses at the first advert it hears. An
//!   active also probes for a second holder every `dead_ms`: one that
//!   answers while no advert is heard (the segments healed before the
//!   heartbeat path) makes it let go and start over with its skewed wait.
//! - **Planned stop.** The active drops its addresses first, then tells the
//!   peer in an advert naming it: the peer takes over at once, without
//!   waiting for a timeout or probing.
//! - **Own links.** A replica whose external or LAN link is down cannot
//!   serve: an active steps down (and says so, so the peer takes over at
//!   once); a standby never takes over.
//!
//! `wire` is an advert as one datagram on the heartbeat path.

pub mod wire;

/// Timers and identity of one replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub name: String,
    /// Higher wins a tie and takes over first after a start.
    pub priority: u8,
    pub advert_ms: u64,
    /// No advert from an active for this long: it is suspected gone.
    pub dead_ms: u64,
    /// How long a probe waits for an answer.
    pub probe_ms: u64,
}

impl Config {
    /// Defaults that give a takeover in well under a second: adverts every
    /// 100 ms, an active suspected after 300 ms, a probe of 100 ms.
    pub fn new(name: impl Into<String>, priority: u8) -> Config {
        Config { name: name.into(), priority, advert_ms: 100, dead_ms: 300, probe_ms: 100 }
    }

    /// What a fresh replica waits before it may take over when it hears no
    /// active: longer for a lower priority (VRRP's skew), so that two
    /// replicas starting together do not both take.
    fn start_wait(&self) -> u64 {
        self.dead_ms + self.advert_ms * u64::from(u8::MAX - self.priority) / u64::from(u8::MAX)
    }
}

/// What a replica says on the heartbeat path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    pub from: String,
    pub priority: u8,
    pub active: bool,
    /// The term of the addresses it holds, or of the last it held.
    pub term: u64,
    /// A planned stop: the replica named takes over now.
    pub handover_to: Option<String>,
}

/// What happened, for the replica to decide on. Times are milliseconds on
/// any monotonic clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Tick,
    Heard(Advert),
    /// Its own external and LAN links: both must be up to serve.
    Links {
        up: bool,
    },
    /// The probe asked for came back: `answered` when another host claims
    /// one of the addresses on either segment.
    Probed {
        answered: bool,
    },
    /// A planned stop (pod deleted, drained, upgraded), naming the peer
    /// that takes over.
    Stop {
        to: Option<String>,
    },
}

/// What the edges must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send(Advert),
    /// ARP-probe the addresses on both segments for `Config::probe_ms`.
    Probe,
    /// Commit the replicated connections, add the addresses, announce them.
    Take {
        term: u64,
    },
    /// Remove the addresses.
    Drop {
        why: &'static str,
    },
    /// Announce the addresses again (gratuitous ARP): another holder was
    /// heard, and lets go.
    Announce,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Standby,
    /// A suspecting standby waiting for its probe.
    Probing,
    Active,
    /// Stopped: it holds nothing and takes nothing.
    Stopped,
}

/// One replica's view.
#[derive(Clone, Debug)]
pub struct Replica {
    cfg: Config,
    role: Role,
    term: u64,
    links_up: bool,
    started: u64,
    /// When an active was last heard, if ever.
    active_heard: Option<u64>,
    /// The active heard last said it let go (a link down): no wait.
    released: bool,
    last_advert: Option<u64>,
    /// When an active last probed for a second holder.
    last_check: Option<u64>,
}

impl Replica {
    pub fn new(cfg: Config, now: u64) -> Replica {
        Replica {
            cfg,
            role: Role::Standby,
            term: 0,
            links_up: true,
            started: now,
            active_heard: None,
            released: false,
            last_advert: None,
            last_check: None,
        }
    }

    /// A replica restarted while its kernel still holds the addresses of
    /// `term` (kill -9 of the agent: its namespace, and the translation,
    /// stayed): it goes on holding them, and the usual rules settle any
    /// other holder.
    pub fn resume(cfg: Config, now: u64, term: u64) -> Replica {
        Replica { role: Role::Active, term, ..Replica::new(cfg, now) }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn term(&self) -> u64 {
        self.term
    }

    pub fn holds(&self) -> bool {
        self.role == Role::Active
    }

    fn advert(&self) -> Advert {
        Advert {
            from: self.cfg.name.clone(),
            priority: self.cfg.priority,
            active: self.role == Role::Active,
            term: self.term,
            handover_to: None,
        }
    }

    /// Whether `a`, active like us, outranks us.
    fn outranked_by(&self, a: &Advert) -> bool {
        (a.term, a.priority, a.from.as_str()) > (self.term, self.cfg.priority, self.cfg.name.as_str())
    }

    fn take(&mut self, out: &mut Vec<Action>) {
        self.role = Role::Active;
        self.released = false;
        out.push(Action::Take { term: self.term });
        out.push(Action::Send(self.advert()));
    }

    fn drop(&mut self, to: Role, why: &'static str, out: &mut Vec<Action>) {
        if self.role == Role::Active {
            out.push(Action::Drop { why });
        }
        self.role = to;
    }

    /// Feeds one event at `now`; returns what to do.
    pub fn on(&mut self, now: u64, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if self.role == Role::Stopped {
            return out;
        }
        match event {
            Event::Tick => {}
            Event::Heard(a) if a.from == self.cfg.name => {}
            Event::Heard(a) => {
                // Compared with our own term before it learns theirs.
                let outranked = self.outranked_by(&a);
                self.term = self.term.max(a.term);
                if a.handover_to.as_deref() == Some(self.cfg.name.as_str()) {
                    // It dropped its addresses before it said so.
                    if self.links_up && self.role != Role::Active {
                        self.term += 1;
                        self.take(&mut out);
                    }
                } else if a.active {
                    self.active_heard = Some(now);
                    self.released = false;
                    match self.role {
                        Role::Active if outranked => {
                            self.drop(Role::Standby, "another replica holds a later term", &mut out)
                        }
                        // Two holders (a partition healed): the other lets
                        // go at this advert of ours; neighbours that last
                        // heard it must learn the addresses are ours.
                        Role::Active => out.push(Action::Announce),
                        Role::Probing => self.role = Role::Standby,
                        _ => {}
                    }
                } else if self.active_heard.is_some() && !self.released {
                    // The peer is not active: if it was the one we heard,
                    // it let go. (Its adverts as a standby say the same.)
                    self.released = true;
                }
            }
            Event::Links { up } => {
                self.links_up = up;
                if !up {
                    if self.role == Role::Active {
                        self.drop(Role::Standby, "a link of this replica is down", &mut out);
                        out.push(Action::Send(self.advert()));
                    } else {
                        self.role = Role::Standby;
                    }
                }
            }
            Event::Probed { answered } => match self.role {
                Role::Probing if answered || !self.links_up => {
                    // Someone holds the addresses: wait a full period.
                    self.role = Role::Standby;
                    self.active_heard = Some(now);
                    self.released = false;
                }
                Role::Probing => {
                    self.term += 1;
                    self.take(&mut out);
                }
                Role::Active
                    if answered && self.active_heard.is_none_or(|t| now.saturating_sub(t) >= self.cfg.dead_ms) =>
                {
                    // Another host answers for our addresses and we hear
                    // no advert of it (both paths were cut, and the
                    // segments healed first): both let go, and take again
                    // after their skewed start wait, the higher priority
                    // first.
                    self.drop(Role::Standby, "another host answers for the addresses", &mut out);
                    self.active_heard = None;
                    self.released = false;
                    self.started = now;
                }
                _ => {}
            },
            Event::Stop { to } => {
                let was_active = self.role == Role::Active;
                self.drop(Role::Stopped, "planned stop", &mut out);
                if was_active {
                    out.push(Action::Send(Advert { active: false, handover_to: to, ..self.advert() }));
                }
                return out;
            }
        }
        self.timers(now, &mut out);
        out
    }

    fn timers(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.role == Role::Standby && self.links_up {
            let silent = match self.active_heard {
                _ if self.released => true,
                Some(t) => now.saturating_sub(t) >= self.cfg.dead_ms,
                None => now.saturating_sub(self.started) >= self.cfg.start_wait(),
            };
            if silent {
                self.role = Role::Probing;
                out.push(Action::Probe);
            }
        }
        // An active looks for a second holder it cannot hear.
        if self.role == Role::Active && self.last_check.is_none_or(|t| now.saturating_sub(t) >= self.cfg.dead_ms) {
            self.last_check = Some(now);
            out.push(Action::Probe);
        }
        if self.last_advert.is_none_or(|t| now.saturating_sub(t) >= self.cfg.advert_ms) {
            self.last_advert = Some(now);
            out.push(Action::Send(self.advert()));
        }
    }
}

#[cfg(test)]
mod tests;
