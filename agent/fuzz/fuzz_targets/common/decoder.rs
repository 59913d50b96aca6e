//! Drives a protocol decoder with arbitrary bytes cut into syscall-sized segments, in both
//! directions, with uncaptured bytes, tails and lost events: it may desync, never panic or
//! grow without bound.
use kspan::{
    pipeline::PipelineStats,
    protocol::{Decoder, Out, Segment, Step},
};

pub fn drive(mut decoder: impl Decoder, data: &[u8]) {
    let mut steps: Vec<Step> = Vec::new();
    let mut stats = PipelineStats::default();
    let mut rest = data;
    let mut ts = 0;
    // Each segment: [control][len][len bytes]. Control: bit 0 direction, bit 7 uncaptured
    // bytes follow (bits 0-3 say how many), bit 6 events were lost before, bit 5 a tail.
    while let [control, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (payload, next) = tail.split_at(n);
        let missing = if control & 0x80 != 0 {
            (*control & 0x0f) as u64 * 97
        } else {
            0
        };
        ts += 1;
        let seg = Segment {
            gap: control & 0x40 != 0,
            tail: control & 0x20 != 0 && missing > 0,
            ..Segment::plain(control & 1 == 0, payload, missing, ts)
        };
        decoder.feed(
            &seg,
            &mut Out {
                steps: &mut steps,
                stats: &mut stats,
            },
        );
        steps.clear();
        rest = next;
    }
    decoder.close(
        ts + 1,
        &mut Out {
            steps: &mut steps,
            stats: &mut stats,
        },
    );
}
