//! Data-store calls as spans: attributes, name and status per the OpenTelemetry database
//! conventions.
use std::net::SocketAddr;

use super::{
    privacy::Privacy,
    span::{AttrValue, ip_string},
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
}

impl DbExchange {
    /// `db.operation.name`: the protocol's (a Redis command) or the statement's first word.
    pub fn operation(&self) -> Option<String> {
        self.call
            .operation
            .clone()
            .or_else(|| sql::operation(&self.call.text))
    }

    /// `db.collection.name` when the statement names one table.
    pub fn collection(&self) -> Option<String> {
        match self.call.operation {
            Some(_) => None,
            None => sql::collection(&self.call.text),
        }
    }

    /// The conventions' name: `{operation} {collection}`, else the operation, else the system.
    pub fn span_name(&self) -> String {
        match (self.operation(), self.collection()) {
            (Some(op), Some(c)) => format!("{op} {c}"),
            (Some(op), None) => op,
            _ => self.call.system.to_string(),
        }
    }

    /// The text as exported: literals replaced unless configured otherwise. Redis commands are
    /// built sanitised by their decoder.
    pub fn query_text(&self, privacy: &Privacy) -> String {
        if privacy.keep_db_literals || self.call.operation.is_some() {
            self.call.text.clone()
        } else {
            sql::sanitize(&self.call.text)
        }
    }

    pub fn attributes(&self, privacy: &Privacy) -> Vec<(&'static str, AttrValue)> {
        let mut a: Vec<(&'static str, AttrValue)> = Vec::with_capacity(12);
        a.push(("db.system.name", AttrValue::Static(self.call.system)));
        let operation = self.operation();
        let collection = self.collection();
        if let Some(op) = operation {
            a.push(("db.operation.name", op.into()));
        }
        if let Some(c) = collection {
            a.push(("db.collection.name", c.into()));
        }
        if let Some(ns) = &self.call.namespace {
            a.push(("db.namespace", ns.as_str().into()));
        }
        if !self.call.text.is_empty() {
            a.push(("db.query.text", self.query_text(privacy).into()));
        }
        if self.call.batch > 1 {
            a.push(("db.operation.batch.size", (self.call.batch as i64).into()));
        }
        if let Some((code, _)) = &self.error {
            a.push(("db.response.status_code", code.as_str().into()));
            a.push(("error.type", code.as_str().into()));
        }
        if let Some(p) = self.peer {
            let ip = ip_string(p.ip());
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
