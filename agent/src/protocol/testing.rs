//! What the decoders' unit tests share: a decoder fed segment by segment, and the steps it
//! produced, read back.
use super::{Call, DbCall, Decoder, Out, Outcome, Segment, Step};
use crate::pipeline::PipelineStats;

pub struct Run<D> {
    pub d: D,
    pub steps: Vec<Step>,
    pub stats: PipelineStats,
}

impl<D: Decoder> Run<D> {
    pub fn new(d: D) -> Self {
        Self {
            d,
            steps: Vec::new(),
            stats: PipelineStats::default(),
        }
    }

    /// One plain segment (see [`Segment::plain`]).
    pub fn feed(&mut self, requests: bool, bytes: &[u8], missing: u64, ts: u64) {
        let mut out = Out {
            steps: &mut self.steps,
            stats: &mut self.stats,
        };
        self.d
            .feed(&Segment::plain(requests, bytes, missing, ts), &mut out);
    }

    pub fn take(&mut self) -> Vec<Step> {
        std::mem::take(&mut self.steps)
    }
}

/// The data-store calls begun, with their ids.
pub fn calls(steps: &[Step]) -> Vec<(u64, &DbCall)> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Begin {
                id,
                call: Call::Db(c),
                ..
            } => Some((*id, c)),
            _ => None,
        })
        .collect()
}

/// The exchanges ended: (id, end).
pub fn ended(steps: &[Step]) -> Vec<(u64, u64)> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::End { id, end_ns, .. } => Some((*id, *end_ns)),
            _ => None,
        })
        .collect()
}

/// The store errors reported: (id, code).
pub fn codes(steps: &[Step]) -> Vec<(u64, String)> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Outcome {
                id,
                outcome: Outcome::DbError { code, .. },
            } => Some((*id, code.clone())),
            _ => None,
        })
        .collect()
}
