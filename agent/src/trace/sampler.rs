//! Head sampling: which finished spans are exported (`OTEL_TRACES_SAMPLER`, `_ARG`).
//!
//! The decision depends only on the sampling state the traffic carried (or the span inherited)
//! and the trace id, and is made when the span is exported, after linking settled its trace.
//! So every span of a trace gets the same answer, on this agent and on any other, and the
//! ratio test matches OpenTelemetry SDKs' (`TraceIdRatioBased`: the low 64 bits of the trace
//! id). RED metrics count every request whatever the sampler says.
use super::context::Sampling;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    /// Follows a carried decision (`sampled=1`/`0`, debug); decides by `root` otherwise.
    ParentBased(Root),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
}

impl Default for Sampler {
    /// OpenTelemetry's default.
    fn default() -> Self {
        Sampler::ParentBased(Root::AlwaysOn)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SamplerError {
    #[error(
        "unknown traces sampler {0:?}: use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
    )]
    Name(String),
    #[error("bad traces sampler argument {0:?}: expected a ratio between 0 and 1")]
    Ratio(String),
}

impl Sampler {
    /// Parses an `OTEL_TRACES_SAMPLER` name and its `OTEL_TRACES_SAMPLER_ARG`.
    pub fn parse(name: &str, arg: Option<&str>) -> Result<Self, SamplerError> {
        let ratio = || match arg.map(str::trim) {
            None | Some("") => Ok(1.0),
            Some(a) => a
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| SamplerError::Ratio(a.to_string())),
        };
        Ok(match name.trim() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatio(ratio()?),
            "parentbased_always_on" => Sampler::ParentBased(Root::AlwaysOn),
            "parentbased_always_off" => Sampler::ParentBased(Root::AlwaysOff),
            "parentbased_traceidratio" => Sampler::ParentBased(Root::TraceIdRatio(ratio()?)),
            other => return Err(SamplerError::Name(other.to_string())),
        })
    }

    /// Whether a span in `trace_id` with this sampling state is exported. B3 debug always is,
    /// except under `always_off`.
    pub fn exports(self, sampling: Sampling, trace_id: u128) -> bool {
        match (self, sampling) {
            (Sampler::AlwaysOff, _) => false,
            (_, Sampling::Debug) => true,
            (Sampler::AlwaysOn, _) => true,
            (Sampler::TraceIdRatio(r), _) => ratio_keeps(r, trace_id),
            (Sampler::ParentBased(_), Sampling::Sampled) => true,
            (Sampler::ParentBased(_), Sampling::NotSampled) => false,
            (Sampler::ParentBased(root), Sampling::Unset) => match root {
                Root::AlwaysOn => true,
                Root::AlwaysOff => false,
                Root::TraceIdRatio(r) => ratio_keeps(r, trace_id),
            },
        }
    }
}

/// OpenTelemetry's `TraceIdRatioBased`: the low 64 bits of the trace id, halved, against the
/// ratio of 2^63.
fn ratio_keeps(ratio: f64, trace_id: u128) -> bool {
    let bound = (ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64;
    ((trace_id as u64) >> 1) < bound
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_standard_names() {
        assert_eq!(
            Sampler::parse("parentbased_traceidratio", Some("0.25")),
            Ok(Sampler::ParentBased(Root::TraceIdRatio(0.25)))
        );
        assert_eq!(
            Sampler::parse("traceidratio", None),
            Ok(Sampler::TraceIdRatio(1.0))
        );
        assert_eq!(Sampler::parse(" always_off ", None), Ok(Sampler::AlwaysOff));
        assert!(matches!(
            Sampler::parse("jaeger_remote", None),
            Err(SamplerError::Name(_))
        ));
        for bad in ["1.5", "-0.1", "half", "NaN"] {
            assert!(
                matches!(
                    Sampler::parse("traceidratio", Some(bad)),
                    Err(SamplerError::Ratio(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn decisions() {
        use Sampling::*;
        let half = Sampler::ParentBased(Root::TraceIdRatio(0.5));
        let (low, high) = (1u128, (u64::MAX as u128) | (7 << 64));
        assert!(half.exports(Unset, low));
        assert!(!half.exports(Unset, high));
        assert!(half.exports(Sampled, high), "the parent's decision wins");
        assert!(!half.exports(NotSampled, low));
        assert!(half.exports(Debug, high));
        assert!(
            Sampler::AlwaysOn.exports(NotSampled, low),
            "ignores the parent"
        );
        assert!(!Sampler::AlwaysOff.exports(Debug, low));
        assert!(!Sampler::ParentBased(Root::AlwaysOff).exports(Unset, low));
        assert!(Sampler::default().exports(Unset, high));
        assert!(!Sampler::TraceIdRatio(0.0).exports(Sampled, low));
        // The ratio holds over many random trace ids.
        let kept = (0..100_000u128)
            .filter(|i| {
                Sampler::TraceIdRatio(0.1).exports(
                    Unset,
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
                )
            })
            .count();
        assert!((9_000..11_000).contains(&kept), "{kept}");
    }
}
