//! What spans need of SQL text: its literals replaced by `?` (they carry user data), the
//! operation, and the table when the statement names exactly one.
use std::sync::Arc;

/// What spans read of a statement's text, worked out together.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub operation: Option<Arc<str>>,
    pub collection: Option<Arc<str>>,
    /// The text with its literals replaced.
    pub sanitized: Arc<str>,
}

impl Facts {
    pub fn of(sql: &str) -> Self {
        Self {
            operation: operation(sql).map(Arc::from),
            collection: collection(sql).map(Arc::from),
            sanitized: sanitize(sql).into(),
        }
    }

    /// Bytes its strings hold.
    pub fn heap_bytes(&self) -> usize {
        let opt = |s: &Option<Arc<str>>| s.as_ref().map_or(0, |s| s.len());
        opt(&self.operation) + opt(&self.collection) + self.sanitized.len()
    }
}

/// The text with every string, numeric and hex literal replaced by `?`. Comments, identifiers
/// (quoted ones too) and placeholders (`$1`, `?`) are kept.
pub fn sanitize(sql: &str) -> String {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    // Start of the run of bytes copied as they are.
    let mut kept = 0;
    let literal = |out: &mut String, from: usize, to: usize, kept: &mut usize| {
        // A prefix letter may already belong to the literal before (`1e'x'`).
        let from = from.max(*kept);
        out.push_str(&sql[*kept..from]);
        out.push('?');
        *kept = to;
    };
    while i < b.len() {
        let c = b[i];
        let prev_ident = i > 0 && is_ident(b[i - 1]);
        match c {
            b'\'' => {
                // E'…', X'…', B'…', N'…' prefixes are part of the literal.
                let from = if prev_ident
                    && i >= 1
                    && matches!(b[i - 1] | 0x20, b'e' | b'x' | b'b' | b'n')
                    && (i < 2 || !is_ident(b[i - 2]))
                {
                    i - 1
                } else {
                    i
                };
                let to = quoted_end(b, i, b'\'');
                literal(&mut out, from, to, &mut kept);
                i = to;
            }
            b'"' | b'`' => i = quoted_end(b, i, c),
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|&x| x == b'\n')
                    .map_or(b.len(), |p| i + p);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = sql[i + 2..].find("*/").map_or(b.len(), |p| i + 2 + p + 2);
            }
            b'$' if !prev_ident => match dollar_tag(b, i) {
                // `$$…$$` or `$tag$…$tag$`: a string.
                Some(tag_len) => {
                    let tag = &sql[i..i + tag_len];
                    let to = sql[i + tag_len..]
                        .find(tag)
                        .map_or(b.len(), |p| i + tag_len + p + tag_len);
                    literal(&mut out, i, to, &mut kept);
                    i = to;
                }
                // `$1`: a placeholder.
                None => i = skip_while(b, i + 1, |x| x.is_ascii_digit()),
            },
            b'0'..=b'9' if !prev_ident => {
                let to = if c == b'0' && matches!(b.get(i + 1), Some(b'x' | b'X')) {
                    skip_while(b, i + 2, |x| x.is_ascii_hexdigit())
                } else {
                    let mut j = skip_while(b, i, |x| x.is_ascii_digit() || x == b'.');
                    if matches!(b.get(j), Some(b'e' | b'E')) {
                        let sign = matches!(b.get(j + 1), Some(b'+' | b'-')) as usize;
                        j = skip_while(b, j + 1 + sign, |x| x.is_ascii_digit());
                    }
                    j
                };
                literal(&mut out, i, to, &mut kept);
                i = to;
            }
            _ if is_ident(c) => i = skip_while(b, i, is_ident),
            _ => i += 1,
        }
    }
    out.push_str(&sql[kept.min(sql.len())..]);
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

fn skip_while(b: &[u8], mut i: usize, f: impl Fn(u8) -> bool) -> usize {
    while i < b.len() && f(b[i]) {
        i += 1;
    }
    i
}

/// End (exclusive) of a quoted run starting at `i`, where a doubled quote is an escape.
fn quoted_end(b: &[u8], i: usize, quote: u8) -> usize {
    let mut j = i + 1;
    while j < b.len() {
        if b[j] == b'\\' && quote == b'\'' {
            j += 2;
            continue;
        }
        if b[j] == quote {
            if b.get(j + 1) == Some(&quote) {
                j += 2;
                continue;
            }
            return j + 1;
        }
        j += 1;
    }
    b.len()
}

/// Length of a dollar-quote tag (`$$`, `$tag$`) at `i`.
fn dollar_tag(b: &[u8], i: usize) -> Option<usize> {
    let end = skip_while(b, i + 1, |x| x.is_ascii_alphabetic() || x == b'_');
    (b.get(end) == Some(&b'$')).then_some(end + 1 - i)
}

/// Words of the statement, upper-cased, after leading comments and parentheses.
fn words(sql: &str) -> impl Iterator<Item = &str> {
    let mut rest = sql.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map_or("", |(_, r)| r).trim_start();
        } else if let Some(r) = rest.strip_prefix('(') {
            rest = r.trim_start();
        } else {
            break;
        }
    }
    rest.split(|c: char| c.is_ascii_whitespace() || c == '(' || c == ')' || c == ',' || c == ';')
        .filter(|w| !w.is_empty())
}

/// The statement's operation (`SELECT`, `INSERT`, …), upper-cased.
pub fn operation(sql: &str) -> Option<String> {
    let w = words(sql).next()?;
    w.bytes()
        .all(|c| c.is_ascii_alphabetic())
        .then(|| w.to_ascii_uppercase())
}

/// The one table a simple statement names (`FROM t`, `INTO t`, `UPDATE t`); `None` when it
/// names several (joins, several FROM items) or the text is not that simple.
pub fn collection(sql: &str) -> Option<String> {
    let mut w = words(sql);
    let op = w.next()?.to_ascii_uppercase();
    let marker = match op.as_str() {
        "SELECT" | "DELETE" => "FROM",
        "INSERT" | "REPLACE" => "INTO",
        "UPDATE" => return table(w.next()?).filter(|_| !joined(sql)),
        _ => return None,
    };
    let table_word = w.skip_while(|x| !x.eq_ignore_ascii_case(marker)).nth(1)?;
    let rest_after = sql
        .to_ascii_uppercase()
        .split_once(&format!(" {marker} "))
        .map(|(_, r)| r.to_string())
        .unwrap_or_default();
    let several = joined(sql) || from_list(&rest_after);
    table(table_word).filter(|_| !several)
}

fn joined(sql: &str) -> bool {
    sql.to_ascii_uppercase()
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .any(|w| w == "JOIN")
}

/// A comma right after the first FROM item (`FROM a, b`).
fn from_list(after_from: &str) -> bool {
    let item = after_from.trim_start();
    let end = item
        .find(|c: char| c.is_ascii_whitespace() || c == ',' || c == ';')
        .unwrap_or(item.len());
    let rest = item[end..].trim_start();
    // `FROM a x, b`: skip one alias word.
    let rest = match rest.chars().next() {
        Some(c) if c.is_ascii_alphabetic() => {
            let w = rest
                .split(|c: char| c.is_ascii_whitespace() || c == ',')
                .next()
                .unwrap_or("");
            if matches!(
                w,
                "WHERE" | "GROUP" | "ORDER" | "LIMIT" | "VALUES" | "SET" | "ON"
            ) {
                rest
            } else {
                rest[w.len()..].trim_start()
            }
        }
        _ => rest,
    };
    rest.starts_with(',')
}

/// A table name as the conventions want it: as written, without quotes; schema kept.
fn table(word: &str) -> Option<String> {
    let t: String = word.chars().filter(|c| !matches!(c, '"' | '`')).collect();
    (!t.is_empty()
        && t.chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '.' || c == '$'))
    .then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_become_placeholders() {
        let cases = [
            (
                "SELECT * FROM t WHERE a = 'x' AND b = 42",
                "SELECT * FROM t WHERE a = ? AND b = ?",
            ),
            ("SELECT 'it''s', 1.5e-3, 0xFF, -7", "SELECT ?, ?, ?, -?"),
            (
                "INSERT INTO t2 (c1) VALUES ($1, $2)",
                "INSERT INTO t2 (c1) VALUES ($1, $2)",
            ),
            ("SELECT $$body$$, $tag$x$tag$", "SELECT ?, ?"),
            (
                "SELECT \"col1\" FROM t3 -- 'comment'\n",
                "SELECT \"col1\" FROM t3 -- 'comment'\n",
            ),
            ("SELECT E'a\\'b', X'0f' /* 12 */", "SELECT ?, ? /* 12 */"),
            (
                "UPDATE `t` SET v = 'secret' WHERE id = 3",
                "UPDATE `t` SET v = ? WHERE id = ?",
            ),
            ("SELECT 'unterminated", "SELECT ?"),
            // Found by the postgres fuzz target: the exponent ate the prefix letter.
            ("SELECT 1.e'x'", "SELECT ??"),
        ];
        for (sql, want) in cases {
            assert_eq!(sanitize(sql), want, "{sql}");
        }
    }

    #[test]
    fn operation_and_collection() {
        let cases = [
            (
                "select * from orders where id = 1",
                Some("SELECT"),
                Some("orders"),
            ),
            (
                "INSERT INTO public.items (a) VALUES (1)",
                Some("INSERT"),
                Some("public.items"),
            ),
            ("UPDATE \"Cart\" SET n = 2", Some("UPDATE"), Some("Cart")),
            ("DELETE FROM t WHERE x", Some("DELETE"), Some("t")),
            (
                "SELECT * FROM a JOIN b ON a.id = b.id",
                Some("SELECT"),
                None,
            ),
            ("SELECT * FROM a, b", Some("SELECT"), None),
            ("SELECT * FROM a x, b y", Some("SELECT"), None),
            ("SELECT * FROM a WHERE x = 1", Some("SELECT"), Some("a")),
            ("SELECT 1", Some("SELECT"), None),
            ("BEGIN", Some("BEGIN"), None),
            ("/* app */ (SELECT 1 FROM t)", Some("SELECT"), Some("t")),
            ("", None, None),
        ];
        for (sql, op, coll) in cases {
            assert_eq!(operation(sql).as_deref(), op, "{sql}");
            assert_eq!(collection(sql).as_deref(), coll, "{sql}");
        }
    }
}
