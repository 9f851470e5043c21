//! containerd's filter syntax for `List`, hand-written (no Rust crate parses it):
//! `field[.field…][ op value][, …]`, selectors joined by `,` must all match, several
//! filter strings match when any does. Operators `==`, `!=`, `~=` (regular expression);
//! a bare field path tests presence. Fields and values may be double-quoted. Snapshot
//! fields: `kind`, `name`, `parent`, `labels.<key>`.

use regex::Regex;

use crate::api::{Info, SnapshotError};

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// Any of several filters (empty: everything).
#[derive(Debug, Default)]
pub struct Filters(Vec<Vec<Selector>>);

fn bad(filter: &str, reason: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::InvalidArgument(format!("filter {filter:?}: {reason}"))
}

struct Lexer<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Lexer<'a> {
    fn skip_space(&mut self) {
        while self.text[self.at..].starts_with([' ', '\t']) {
            self.at += 1;
        }
    }

    fn done(&mut self) -> bool {
        self.skip_space();
        self.at >= self.text.len()
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_space();
        if self.text[self.at..].starts_with(token) {
            self.at += token.len();
            true
        } else {
            false
        }
    }

    /// A quoted string (with `\"` and `\\` escapes) or a run of characters up to one of
    /// `stops`.
    fn word(&mut self, stops: &[char]) -> Result<String, String> {
        self.skip_space();
        let rest = &self.text[self.at..];
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = quoted.char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        self.at += 1 + i + 1;
                        return Ok(out);
                    }
                    '\\' => match chars.next() {
                        Some((_, escaped)) => out.push(escaped),
                        None => break,
                    },
                    c => out.push(c),
                }
            }
            return Err("unterminated quoted string".into());
        }
        let len = rest
            .find(|c: char| stops.contains(&c))
            .unwrap_or(rest.len());
        let word = rest[..len].trim_end();
        if word.is_empty() {
            return Err(format!("expected a field or value at offset {}", self.at));
        }
        self.at += len;
        Ok(word.to_owned())
    }
}

fn parse_one(filter: &str) -> Result<Vec<Selector>, SnapshotError> {
    let mut lexer = Lexer {
        text: filter,
        at: 0,
    };
    let mut selectors = Vec::new();
    loop {
        let mut path = vec![
            lexer
                .word(&['.', '=', '!', '~', ',', ' '])
                .map_err(|e| bad(filter, e))?,
        ];
        while lexer.eat(".") {
            path.push(
                lexer
                    .word(&['.', '=', '!', '~', ',', ' '])
                    .map_err(|e| bad(filter, e))?,
            );
        }
        let value_stops = [','];
        let op = if lexer.eat("==") {
            Op::Equal(lexer.word(&value_stops).map_err(|e| bad(filter, e))?)
        } else if lexer.eat("!=") {
            Op::NotEqual(lexer.word(&value_stops).map_err(|e| bad(filter, e))?)
        } else if lexer.eat("~=") {
            let pattern = lexer.word(&value_stops).map_err(|e| bad(filter, e))?;
            Op::Matches(Regex::new(&pattern).map_err(|e| bad(filter, e))?)
        } else {
            Op::Present
        };
        match path[0].as_str() {
            "kind" | "name" | "parent" if path.len() == 1 => {}
            "labels" if path.len() >= 2 => {}
            _ => return Err(bad(filter, format!("unknown field {:?}", path.join(".")))),
        }
        selectors.push(Selector { path, op });
        if lexer.done() {
            return Ok(selectors);
        }
        if !lexer.eat(",") {
            return Err(bad(
                filter,
                format!("unexpected text at offset {}", lexer.at),
            ));
        }
    }
}

impl Filters {
    pub fn parse(filters: &[String]) -> Result<Self, SnapshotError> {
        filters
            .iter()
            .filter(|f| !f.trim().is_empty())
            .map(|f| parse_one(f))
            .collect::<Result<_, _>>()
            .map(Filters)
    }

    pub fn matches(&self, info: &Info) -> bool {
        self.0.is_empty() || self.0.iter().any(|all| all.iter().all(|s| s.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let value: Option<&str> = match self.path[0].as_str() {
            "kind" => Some(info.kind.name()),
            "name" => Some(&info.name),
            "parent" => Some(&info.parent),
            // Label keys may contain dots: the rest of the path is the key.
            _ => info
                .labels
                .get(&self.path[1..].join("."))
                .map(String::as_str),
        };
        match (&self.op, value) {
            (Op::Present, value) => {
                value.is_some_and(|v| !v.is_empty() || self.path[0] == "labels")
            }
            (Op::Equal(want), Some(v)) => v == want,
            (Op::NotEqual(want), Some(v)) => v != want,
            (Op::NotEqual(_), None) => true,
            (Op::Matches(re), Some(v)) => re.is_match(v),
            (_, None) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Kind;

    fn info() -> Info {
        Info {
            kind: Kind::Committed,
            name: "sha256:abc".into(),
            parent: "p".into(),
            labels: [
                (
                    "containerd.io/snapshot.ref".to_owned(),
                    "sha256:abc".to_owned(),
                ),
                ("x".to_owned(), "1".to_owned()),
            ]
            .into(),
            ..Info::default()
        }
    }

    fn matches(filters: &[&str]) -> bool {
        let owned: Vec<String> = filters.iter().map(|s| (*s).to_owned()).collect();
        Filters::parse(&owned).expect("parses").matches(&info())
    }

    #[test]
    fn selectors_and_alternatives() {
        assert!(matches(&[]));
        assert!(matches(&["kind==committed"]));
        assert!(!matches(&["kind==active"]));
        assert!(matches(&["kind==active", "name==sha256:abc"]));
        assert!(matches(&["kind==committed,parent==p"]));
        assert!(!matches(&["kind==committed,parent!=p"]));
        assert!(matches(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:abc"#
        ]));
        assert!(matches(&["labels.containerd.io/snapshot.ref"]));
        assert!(!matches(&["labels.missing"]));
        assert!(matches(&["labels.missing!=1"]));
        assert!(matches(&["name~=^sha256:[a-f]+$"]));
        assert!(matches(&[r#"name=="sha256:abc""#]));
    }

    #[test]
    fn malformed_filters_are_named() {
        for (filter, says) in [
            ("colour==red", "unknown field"),
            ("name==", "expected a field or value"),
            (r#"name=="open"#, "unterminated"),
            ("name~=(", "regex"),
            ("name==a,", "expected a field"),
            ("labels.x y", "unexpected text"),
            ("labels", "unknown field"),
        ] {
            let err = Filters::parse(&[filter.to_owned()])
                .expect_err(filter)
                .to_string();
            assert!(
                err.contains(&format!("{filter:?}")) && err.to_lowercase().contains(says),
                "{filter}: {err}"
            );
        }
    }
}
