//! Which goroutine an outgoing call of a Go process was made for, from what the Go runtime
//! probes report: who created each goroutine, and for whom a client connection's writer
//! goroutine writes. Go moves goroutines between threads and net/http writes a request from
//! the connection's own goroutine, so neither the thread nor the writing goroutine tells the
//! request; the goroutine that asked, and its creators, do.
use rustc_hash::FxHashMap as HashMap;

use crate::capture::event::GoEvent;

/// Facts kept over all processes (about 5 MiB), and processes followed; beyond, everything is
/// forgotten at once (the cost is calls left unlinked for a while, never a wrong link: a
/// goroutine whose creator is unknown matches nothing).
const MAX_ENTRIES: usize = 131_072;
const MAX_PROCESSES: usize = 1024;
/// Creators followed from a goroutine upwards.
pub const MAX_DEPTH: usize = 8;

#[derive(Default)]
struct Lineage {
    /// Goroutine → (its creator, when it was created). A `g` is reused once its goroutine
    /// exits, and a reuse overwrites the entry.
    parent: HashMap<u64, (u64, u64)>,
    /// Writer goroutine → the client connection (`*persistConn`) it writes for.
    writes_for: HashMap<u64, u64>,
    /// Client connection → the goroutine whose request it carries now.
    caller: HashMap<u64, u64>,
}

#[derive(Default)]
pub struct Goroutines {
    procs: HashMap<u32, Lineage>,
    /// Entries in all the tables of `procs`.
    entries: usize,
}

/// One step up from the goroutine that made a call: goroutine `g` may own the call if it was
/// already serving a request at `since_ns` (when the step below it was created).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub g: u64,
    pub since_ns: u64,
}

impl Goroutines {
    pub fn observe(&mut self, tgid: u32, g: u64, ev: GoEvent, ts_ns: u64) {
        let new_process = !self.procs.contains_key(&tgid);
        if self.entries >= MAX_ENTRIES || (new_process && self.procs.len() >= MAX_PROCESSES) {
            self.procs.clear();
            self.entries = 0;
        }
        let l = self.procs.entry(tgid).or_default();
        let added = match ev {
            GoEvent::Spawned { parent } => l.parent.insert(g, (parent, ts_ns)).is_none(),
            GoEvent::Writes { conn } => l.writes_for.insert(g, conn).is_none(),
            GoEvent::Calls { conn } => l.caller.insert(conn, g).is_none(),
        };
        self.entries += usize::from(added);
    }

    /// Whether process `tgid`'s goroutines are followed (its Go runtime is probed).
    pub fn follows(&self, tgid: u32) -> bool {
        self.procs.contains_key(&tgid)
    }

    /// Process `tgid` is another program now (exec).
    pub fn forget(&mut self, tgid: u32) {
        if let Some(l) = self.procs.remove(&tgid) {
            let held = l.parent.len() + l.writes_for.len() + l.caller.len();
            self.entries = self.entries.saturating_sub(held);
        }
    }

    /// The goroutine a syscall of `g` was made for: the caller whose request it writes, when
    /// `g` is a client connection's writer; else `g` itself.
    pub fn acting(&self, tgid: u32, g: u64) -> u64 {
        let Some(l) = self.procs.get(&tgid) else {
            return g;
        };
        l.writes_for
            .get(&g)
            .and_then(|conn| l.caller.get(conn))
            .copied()
            .unwrap_or(g)
    }

    /// `g` and its creators, nearest first, as far as they are known (at most `MAX_DEPTH`).
    pub fn lineage(&self, tgid: u32, g: u64) -> impl Iterator<Item = Step> + '_ {
        let l = self.procs.get(&tgid);
        let first = Step {
            g,
            since_ns: u64::MAX,
        };
        std::iter::successors(Some(first), move |s| {
            let (parent, created) = *l?.parent.get(&s.g)?;
            Some(Step {
                g: parent,
                since_ns: created,
            })
        })
        .take(MAX_DEPTH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lineage_walks_creators_with_their_creation_times() {
        let mut g = Goroutines::default();
        assert!(!g.follows(7));
        g.observe(7, 0x200, GoEvent::Spawned { parent: 0x100 }, 50);
        g.observe(7, 0x300, GoEvent::Spawned { parent: 0x200 }, 60);
        assert!(g.follows(7));
        let steps: Vec<Step> = g.lineage(7, 0x300).collect();
        assert_eq!(
            steps,
            [
                Step {
                    g: 0x300,
                    since_ns: u64::MAX
                },
                Step {
                    g: 0x200,
                    since_ns: 60
                },
                Step {
                    g: 0x100,
                    since_ns: 50
                },
            ]
        );
        assert_eq!(
            g.lineage(8, 0x300).count(),
            1,
            "another process knows nothing"
        );
    }

    #[test]
    fn memory_is_bounded_by_forgetting_everything() {
        let mut g = Goroutines::default();
        for i in 0..MAX_ENTRIES as u64 {
            g.observe(7, 0x1000 + i, GoEvent::Spawned { parent: 0x1 }, i);
        }
        assert_eq!(g.lineage(7, 0x1000).count(), 2);
        g.observe(8, 0x2, GoEvent::Spawned { parent: 0x1 }, 0);
        assert_eq!(g.lineage(7, 0x1000).count(), 1, "forgotten at the bound");
        assert!(!g.follows(7) && g.follows(8));
        assert_eq!(g.entries, 1);
    }

    #[test]
    fn a_reused_goroutine_has_its_new_creator() {
        let mut g = Goroutines::default();
        g.observe(7, 0x200, GoEvent::Spawned { parent: 0x100 }, 50);
        g.observe(7, 0x200, GoEvent::Spawned { parent: 0x150 }, 90);
        let steps: Vec<u64> = g.lineage(7, 0x200).map(|s| s.g).collect();
        assert_eq!(steps, [0x200, 0x150]);
    }

    #[test]
    fn a_cycle_from_stale_entries_ends_at_the_depth_limit() {
        let mut g = Goroutines::default();
        g.observe(7, 0x200, GoEvent::Spawned { parent: 0x100 }, 50);
        g.observe(7, 0x100, GoEvent::Spawned { parent: 0x200 }, 40);
        assert_eq!(g.lineage(7, 0x200).count(), MAX_DEPTH);
    }

    #[test]
    fn a_connection_writer_acts_for_the_goroutine_whose_request_it_carries() {
        let mut g = Goroutines::default();
        g.observe(7, 0x900, GoEvent::Writes { conn: 0xc0 }, 10);
        assert_eq!(g.acting(7, 0x900), 0x900, "no request handed over yet");
        g.observe(7, 0x100, GoEvent::Calls { conn: 0xc0 }, 20);
        assert_eq!(g.acting(7, 0x900), 0x100);
        g.observe(7, 0x500, GoEvent::Calls { conn: 0xc0 }, 30);
        assert_eq!(
            g.acting(7, 0x900),
            0x500,
            "the next request on the connection"
        );
        assert_eq!(g.acting(7, 0x100), 0x100);
        g.forget(7);
        assert_eq!(g.acting(7, 0x900), 0x900);
    }
}
