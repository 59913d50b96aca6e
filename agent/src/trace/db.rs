//! Data-store calls as spans: attributes, name and status per the OpenTelemetry database
//! conventions.
use std::{net::SocketAddr, sync::Arc};

use rustc_hash::FxHashMap as HashMap;

use super::{
    privacy::Privacy,
    span::{AttrValue, ip_shared},
};
use crate::protocol::{DbCall, sql};

/// Everything known about one data-store call when its span is built.
#[derive(Clone, Debug, Default)]
pub struct DbExchange {
    pub call: DbCall,
    /// Error code and message from the store.
    pub error: Option<(String, String)>,
    pub peer: Option<SocketAddr>,
    pub partial: bool,
    /// What spans read of the SQL text, shared by every call of the same text.
    pub sql: Option<Arc<sql::Facts>>,
}

impl DbExchange {
    /// `db.operation.name`: the protocol's (a Redis command) or the statement's first word.
    pub fn operation(&self) -> Option<Arc<str>> {
        if self.call.operation.is_some() {
            return self.call.operation.clone();
        }
        match &self.sql {
            Some(f) => f.operation.clone(),
            None => sql::operation(&self.call.text).map(Arc::from),
        }
    }

    /// `db.collection.name` when the statement names one table.
    pub fn collection(&self) -> Option<Arc<str>> {
        match (&self.call.operation, &self.sql) {
            (Some(_), _) => None,
            (None, Some(f)) => f.collection.clone(),
            (None, None) => sql::collection(&self.call.text).map(Arc::from),
        }
    }

    /// The conventions' name: `{operation} {collection}`, else the operation, else the system.
    pub fn span_name(&self) -> String {
        match (self.operation(), self.collection()) {
            (Some(op), Some(c)) => {
                // Not `format!`: its machinery cost more than the rest of the name's making.
                let mut name = String::with_capacity(op.len() + 1 + c.len());
                name.push_str(&op);
                name.push(' ');
                name.push_str(&c);
                name
            }
            (Some(op), None) => op.to_string(),
            _ => self.call.system.to_string(),
        }
    }

    /// The text as exported: literals replaced unless configured otherwise. Redis commands are
    /// built sanitised by their decoder.
    pub fn query_text(&self, privacy: &Privacy) -> AttrValue {
        if privacy.keep_db_literals || self.call.operation.is_some() {
            self.call.text.clone().into()
        } else if let Some(f) = &self.sql {
            f.sanitized.clone().into()
        } else {
            sql::sanitize(&self.call.text).into()
        }
    }

    pub fn attributes(&self, privacy: &Privacy) -> Vec<(&'static str, AttrValue)> {
        let mut a: Vec<(&'static str, AttrValue)> = Vec::with_capacity(12);
        a.push(("db.system.name", AttrValue::Static(self.call.system)));
        if let Some(op) = self.operation() {
            a.push(("db.operation.name", op.into()));
        }
        if let Some(c) = self.collection() {
            a.push(("db.collection.name", c.into()));
        }
        if let Some(ns) = &self.call.namespace {
            a.push(("db.namespace", ns.clone().into()));
        }
        if !self.call.text.is_empty() {
            a.push(("db.query.text", self.query_text(privacy)));
        }
        if self.call.batch > 1 {
            a.push(("db.operation.batch.size", (self.call.batch as i64).into()));
        }
        if let Some((code, _)) = &self.error {
            a.push(("db.response.status_code", code.as_str().into()));
            a.push(("error.type", code.as_str().into()));
        }
        if let Some(p) = self.peer {
            let ip = ip_shared(p.ip());
            a.push(("server.address", ip.clone().into()));
            a.push(("server.port", (p.port() as i64).into()));
            a.push(("network.peer.address", ip.into()));
            a.push(("network.peer.port", (p.port() as i64).into()));
        }
        if self.partial {
            a.push(("kspan.partial", true.into()));
        }
        a
    }

    /// The status description when the store answered with an error.
    pub fn error(&self) -> Option<String> {
        self.error
            .as_ref()
            .map(|(code, msg)| format!("{} error {code}: {msg}", self.call.system))
    }
}

/// Bytes of statement facts kept (texts and their facts); beyond it the cache starts over.
const FACTS_CACHE_BYTES: usize = 1 << 20;

/// The facts of statements seen lately, by text: a prepared statement runs many times with the
/// same text, which is then parsed once, not three times per call (name, attributes, metrics).
#[derive(Default)]
pub struct FactsCache {
    by_text: HashMap<Box<str>, Arc<sql::Facts>>,
    bytes: usize,
}

impl FactsCache {
    /// The facts of `call`'s SQL text; `None` for commands named by their protocol (Redis).
    pub fn get(&mut self, call: &DbCall) -> Option<Arc<sql::Facts>> {
        if call.operation.is_some() || call.text.is_empty() {
            return None;
        }
        if let Some(f) = self.by_text.get(&*call.text) {
            return Some(f.clone());
        }
        let facts = Arc::new(sql::Facts::of(&call.text));
        // Key, facts, and the table's entry with the allocations' headers.
        let cost = call.text.len() + facts.heap_bytes() + 96;
        if self.bytes + cost > FACTS_CACHE_BYTES {
            self.by_text = HashMap::default();
            self.bytes = 0;
        }
        if cost <= FACTS_CACHE_BYTES {
            self.by_text
                .insert(call.text.as_ref().into(), facts.clone());
            self.bytes += cost;
        }
        Some(facts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(text: &str) -> DbCall {
        DbCall {
            system: "postgresql",
            text: text.into(),
            ..Default::default()
        }
    }

    /// A statement's span reads the same with its facts cached as worked out on the spot, and
    /// the same text shares one set of facts.
    #[test]
    fn cached_facts_give_the_same_span() {
        let mut cache = FactsCache::default();
        let text = "SELECT abalance FROM pgbench_accounts WHERE aid = $1 AND b = 'x'";
        let bare = DbExchange {
            call: call(text),
            ..Default::default()
        };
        let cached = DbExchange {
            sql: cache.get(&bare.call),
            ..bare.clone()
        };
        let privacy = Privacy::default();
        assert_eq!(cached.span_name(), "SELECT pgbench_accounts");
        assert_eq!(cached.span_name(), bare.span_name());
        assert_eq!(cached.attributes(&privacy), bare.attributes(&privacy));
        assert_eq!(
            (cached.operation(), cached.collection()),
            (bare.operation(), bare.collection())
        );
        let again = cache.get(&call(text)).expect("facts");
        assert!(Arc::ptr_eq(cached.sql.as_ref().expect("facts"), &again));
        let redis = DbCall {
            operation: Some("GET".into()),
            text: "GET ?".into(),
            ..Default::default()
        };
        assert!(cache.get(&redis).is_none(), "Redis names its own commands");
    }

    /// Distinct texts (literals inlined) keep the cache within its bytes.
    #[test]
    fn the_facts_cache_is_bounded_in_bytes() {
        let mut cache = FactsCache::default();
        for i in 0..20_000 {
            let text = format!(
                "SELECT * FROM t WHERE id = {i} AND pad = '{}'",
                "x".repeat(100)
            );
            cache.get(&call(&text)).expect("facts");
            assert!(cache.bytes <= FACTS_CACHE_BYTES);
        }
        assert!(cache.by_text.len() < 20_000);
    }
}
