//! What may leave the agent. Credentials never do: the decoders keep only the headers spans
//! need, `Authorization`, `Proxy-Authorization`, `Cookie` and `Set-Cookie` (and any header
//! named with `--redact-header`) can never be captured, query values are replaced by
//! `REDACTED` unless asked otherwise, credentials in absolute URLs always are (per the
//! semantic conventions for `url.full`), and payload bodies are only ever counted.

use std::borrow::Cow;

/// Headers that are never captured, whatever the configuration says.
pub const ALWAYS_REDACTED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

pub const REDACTED: &str = "REDACTED";

#[derive(Clone, Copy, Debug, Default)]
pub struct Privacy {
    /// Export query values as they are (default: every value is `REDACTED`).
    pub keep_query_values: bool,
    /// Request headers exported as `http.request.header.<name>` (lower-case).
    pub captured: &'static [&'static str],
    /// The attribute key of each captured header, in the same order.
    pub captured_keys: &'static [&'static str],
    /// Also export the conventions' opt-in attributes (`--opt-in-attributes`).
    pub opt_in_attributes: bool,
    /// Export data-store query text with its literals (default: each literal is `?`).
    pub keep_db_literals: bool,
}

impl Privacy {
    /// Resolves the capture list against the deny lists; returns the headers refused.
    ///
    /// The names are leaked on purpose: they are configured once, live as long as the agent,
    /// and decoders and spans refer to them as `&'static str` without copying.
    pub fn new(
        capture: &[String],
        redact: &[String],
        keep_query_values: bool,
    ) -> (Self, Vec<String>) {
        let denied = |n: &str| {
            ALWAYS_REDACTED.contains(&n) || redact.iter().any(|r| r.eq_ignore_ascii_case(n))
        };
        let mut names: Vec<&'static str> = Vec::new();
        let mut refused = Vec::new();
        for raw in capture {
            let name = raw.trim().to_ascii_lowercase();
            if name.is_empty() || names.contains(&name.as_str()) {
                continue;
            }
            if denied(&name) {
                refused.push(name);
                continue;
            }
            names.push(Box::leak(name.into_boxed_str()));
        }
        let keys: Vec<&'static str> = names
            .iter()
            .map(|n| &*Box::leak(format!("http.request.header.{n}").into_boxed_str()))
            .collect();
        (
            Self {
                keep_query_values,
                captured: Box::leak(names.into_boxed_slice()),
                captured_keys: Box::leak(keys.into_boxed_slice()),
                opt_in_attributes: false,
                keep_db_literals: false,
            },
            refused,
        )
    }

    /// A query string as exported: each `key=value` becomes `key=REDACTED`.
    pub fn query(&self, q: &str) -> String {
        if self.keep_query_values {
            return q.to_string();
        }
        q.split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) if !v.is_empty() => format!("{k}={REDACTED}"),
                _ => pair.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&")
    }

    /// A request target as exported: query values redacted (see [`Self::query`]).
    pub fn target<'a>(&self, target: &'a str) -> Cow<'a, str> {
        match target.split_once('?') {
            Some((path, q)) => format!("{path}?{}", self.query(q)).into(),
            None => Cow::Borrowed(target),
        }
    }
}

/// An absolute URL with any `user:password@` replaced, as `url.full` requires.
pub fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{REDACTED}:{REDACTED}@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_can_never_be_captured() {
        let (p, refused) = Privacy::new(
            &[
                "X-Tenant".into(),
                "Authorization".into(),
                "COOKIE".into(),
                "x-internal-token".into(),
                "x-tenant".into(),
                " ".into(),
            ],
            &["X-Internal-Token".into()],
            false,
        );
        assert_eq!(p.captured, ["x-tenant"]);
        assert_eq!(p.captured_keys, ["http.request.header.x-tenant"]);
        assert_eq!(refused, ["authorization", "cookie", "x-internal-token"]);
    }

    #[test]
    fn query_values_are_redacted_by_default() {
        let p = Privacy::default();
        assert_eq!(
            p.query("token=abc&flag&empty=&id=3"),
            "token=REDACTED&flag&empty=&id=REDACTED"
        );
        assert_eq!(p.target("/a/b?x=1"), "/a/b?x=REDACTED");
        assert_eq!(p.target("/plain"), "/plain");
        let keep = Privacy {
            keep_query_values: true,
            ..Default::default()
        };
        assert_eq!(keep.target("/a?x=1"), "/a?x=1");
    }

    #[test]
    fn url_credentials_are_removed() {
        assert_eq!(
            without_credentials("http://bob:secret@api:8080/p?q=1"),
            "http://REDACTED:REDACTED@api:8080/p?q=1"
        );
        assert_eq!(
            without_credentials("http://api/p?email=a@b"),
            "http://api/p?email=a@b",
            "an @ after the authority is not userinfo"
        );
        assert_eq!(without_credentials("/relative"), "/relative");
    }
}
