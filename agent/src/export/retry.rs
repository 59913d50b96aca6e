//! The exporter specification's retry rules, shared by the OTLP and Zipkin exporters: retry
//! only what may succeed later, with exponential backoff and jitter, honouring the collector's
//! own delay; give up after a few attempts (the batch is then counted as failed).
use std::{future::Future, time::Duration};

use bytes::Bytes;

/// What one attempt came to.
#[derive(Debug)]
pub enum Attempt {
    /// Accepted; the response body.
    Accepted(Bytes),
    /// Worth sending again, after `after` when the collector said how long to wait.
    Retryable {
        reason: String,
        after: Option<Duration>,
    },
    /// The collector refused the data itself: sending it again would fail the same way.
    Refused(String),
}

/// Attempts per batch, the first included.
const MAX_ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A collector asking for a longer pause than this gets the batch counted as failed instead:
/// holding it would stall every later batch.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Runs `send` until an attempt is accepted (its response body) or retrying is over (why).
pub async fn run<F, Fut>(mut send: F) -> Result<Bytes, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Attempt>,
{
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1.. {
        let (reason, after) = match send().await {
            Attempt::Accepted(body) => return Ok(body),
            Attempt::Refused(reason) => return Err(reason),
            Attempt::Retryable { reason, after } => (reason, after),
        };
        let wait = match after {
            Some(a) if a > MAX_RETRY_AFTER => {
                return Err(format!("{reason}; the collector asked to wait {a:?}"));
            }
            Some(a) => a,
            None => {
                // Full backoff halved at random, so agents on many nodes do not retry in step.
                let jittered = backoff.mul_f64(rand::random_range(0.5..1.0));
                backoff = (backoff * 3 / 2).min(MAX_BACKOFF);
                jittered
            }
        };
        if attempt >= MAX_ATTEMPTS {
            return Err(format!("{reason} ({attempt} attempts)"));
        }
        log::debug!("export: {reason}; retrying in {wait:?}");
        tokio::time::sleep(wait).await;
    }
    unreachable!("the loop returns")
}

/// An HTTP exporter's answer: 429, 502, 503 and 504 are retryable (honouring `Retry-After`);
/// other failures are not.
pub fn http(status: u16, retry_after: Option<&str>, body: Bytes) -> Attempt {
    match status {
        200..=299 => Attempt::Accepted(body),
        429 | 502 | 503 | 504 => Attempt::Retryable {
            reason: format!("HTTP {status}"),
            after: retry_after.and_then(seconds),
        },
        _ => Attempt::Refused(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
        )),
    }
}

/// What an HTTP exporter's request came to: no answer, or the answer's status as [`http`]
/// classifies it.
pub async fn http_answer(sent: reqwest::Result<reqwest::Response>) -> Attempt {
    let resp = match sent {
        Ok(r) => r,
        Err(e) => return unanswered(e),
    };
    let status = resp.status().as_u16();
    let after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.bytes().await.unwrap_or_default();
    http(status, after.as_deref(), body)
}

/// A request that got no answer (connection refused or reset, or timed out) may get one later.
pub fn unanswered(e: impl std::fmt::Display) -> Attempt {
    Attempt::Retryable {
        reason: e.to_string(),
        after: None,
    }
}

/// `Retry-After` in seconds (an HTTP date is left to the backoff).
fn seconds(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_specified_http_codes_are_retried() {
        for code in [429, 502, 503, 504] {
            assert!(matches!(
                http(code, Some("2"), Bytes::new()),
                Attempt::Retryable { after: Some(d), .. } if d == Duration::from_secs(2)
            ));
        }
        for code in [400, 401, 403, 404, 413, 500] {
            assert!(
                matches!(http(code, None, Bytes::new()), Attempt::Refused(_)),
                "{code}"
            );
        }
        assert_eq!(seconds("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_and_stop() {
        let mut calls = 0;
        let start = tokio::time::Instant::now();
        let out = run(|| {
            calls += 1;
            async { unanswered("refused") }
        })
        .await;
        assert_eq!(calls, MAX_ATTEMPTS);
        assert!(out.unwrap_err().contains("5 attempts"));
        // 4 waits of at least half of 1, 1.5, 2.25 and 3.375 s.
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(4_060), "{waited:?}");
        assert!(waited <= Duration::from_millis(8_125), "{waited:?}");

        let mut calls = 0;
        let out = run(|| {
            calls += 1;
            let n = calls;
            async move {
                match n {
                    1 => http(503, Some("1"), Bytes::new()),
                    _ => Attempt::Accepted(Bytes::from_static(b"ok")),
                }
            }
        })
        .await;
        assert_eq!((calls, out), (2, Ok(Bytes::from_static(b"ok"))));

        let mut calls = 0;
        let out = run(|| {
            calls += 1;
            async { http(400, None, Bytes::from_static(b"bad data")) }
        })
        .await;
        assert_eq!(calls, 1, "a refused batch is not sent again");
        assert_eq!(out, Err("HTTP 400: bad data".to_string()));

        let out = run(|| async { http(429, Some("3600"), Bytes::new()) }).await;
        assert!(out.unwrap_err().contains("asked to wait"));
    }
}
