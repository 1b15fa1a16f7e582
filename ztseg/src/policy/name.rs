//! DNS names in rules: `to = "api.example.com"` and `to = "*.example.com"`.
//!
//! A name is written as the DNS carries it, in ASCII: lower case letters, digits, `-` and `_`,
//! labels of 1-63 characters separated by dots, at least two labels, at most 253 characters,
//! no trailing dot. Internationalised names are written in their punycode form (`xn--...`):
//! a rule never goes through IDNA, so what is reviewed is what is matched.
//!
//! `*` is allowed only as the whole first label, over a parent of at least two labels:
//! `*.example.com`. What it matches depends on the list:
//! - in an **allow**, exactly one label below the parent: `*.example.com` matches
//!   `api.example.com`, not `example.com` and not `a.b.example.com` (as a TLS wildcard
//!   certificate does). A name at any depth under a domain takes one rule per level, which
//!   keeps what a wildcard can carry small (and the proxy also budgets the distinct names an
//!   agent queries under each wildcard);
//! - in a **deny**, the name and everything below it: a deny of `example.com` or of
//!   `*.example.com` refuses `a.b.example.com` too (a deny errs on the side of refusing).

use std::fmt;

/// Longest name (RFC 1035: 255 octets on the wire, 253 characters written).
const MAX_NAME: usize = 253;
/// Longest label.
const MAX_LABEL: usize = 63;

/// Whether `b` may stand in a label of a name: a lower-case letter, a digit, `-` or `_`. The
/// policy check holds rules to it, and the DNS proxy the names agents ask (lower-cased first).
pub fn label_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
}

/// A name or a wildcard of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamePattern {
    /// One name.
    Exact(String),
    /// `*.PARENT`: the string is the parent.
    Wildcard(String),
}

impl NamePattern {
    /// Parses and checks a name as written in a rule; the error says what is wrong and how to
    /// write it instead.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "*" || text == "*." {
            return Err(
                "`*` alone would match every name; name the domain, e.g. \"*.example.com\"".to_owned()
            );
        }
        if !text.is_ascii() {
            return Err(
                "is not ASCII; write an internationalised name in its punycode form (xn--...)".to_owned()
            );
        }
        if text.ends_with('.') {
            return Err(format!(
                "ends with a dot; write it without: {:?} (every name is taken as fully qualified)",
                text.trim_end_matches('.')
            ));
        }
        if text.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(format!(
                "has upper case letters; write names in lower case: {:?}",
                text.to_ascii_lowercase()
            ));
        }
        let (wildcard, rest) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        if rest.contains('*') {
            return Err(
                "has `*` other than as the whole first label; only \"*.parent.domain\" is a wildcard"
                    .to_owned(),
            );
        }
        if text.len() > MAX_NAME {
            return Err(format!("is {} characters long; a name has at most {MAX_NAME}", text.len()));
        }
        let labels: Vec<&str> = rest.split('.').collect();
        for label in &labels {
            if label.is_empty() {
                return Err("has an empty label (two dots in a row, or a leading dot)".to_owned());
            }
            if label.len() > MAX_LABEL {
                return Err(format!(
                    "has a label of {} characters; a label has at most {MAX_LABEL}",
                    label.len()
                ));
            }
            if let Some(bad) = label.bytes().find(|b| !label_byte(*b)) {
                return Err(format!(
                    "has {:?} in a label; a label has letters, digits, '-' and '_' only",
                    char::from(bad)
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(format!("has the label {label:?}, which starts or ends with '-'"));
            }
        }
        if labels.last().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
            return Err("ends in a numeric label, so it reads as an address, not a name; write an IPv4 address with four parts".to_owned());
        }
        if wildcard {
            if labels.len() < 2 {
                return Err(format!(
                    "is a wildcard over the top-level domain {rest:?}, which would match names of every owner; name the domain, e.g. \"*.example.{rest}\""
                ));
            }
            return Ok(Self::Wildcard(rest.to_owned()));
        }
        if labels.len() < 2 {
            return Err(format!(
                "is a single label; give the fully qualified name (e.g. \"{text}.corp.example\"): resolvers append search domains before they ask"
            ));
        }
        Ok(Self::Exact(text.to_owned()))
    }

    /// Whether an allow of this pattern admits `name` (lower case, no trailing dot): the name
    /// itself, or for a wildcard exactly one label below its parent.
    pub fn allows(&self, name: &str) -> bool {
        match self {
            Self::Exact(exact) => name == exact,
            Self::Wildcard(parent) => name
                .strip_suffix(parent.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        }
    }

    /// Whether a deny of this pattern refuses `name`: the name and everything below it (for a
    /// wildcard, everything below its parent).
    pub fn denies(&self, name: &str) -> bool {
        let below = |domain: &str| {
            name.strip_suffix(domain)
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|head| !head.is_empty())
        };
        match self {
            Self::Exact(exact) => name == exact || below(exact),
            Self::Wildcard(parent) => below(parent),
        }
    }

    pub fn is_wildcard(&self) -> bool {
        matches!(self, Self::Wildcard(_))
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Wildcard(parent) => write!(f, "*.{parent}"),
        }
    }
}

/// Whether `text`, which is no address, is meant as a name (so its errors speak of names).
pub fn looks_like_name(text: &str) -> bool {
    !text.is_empty()
        && !text.contains('/')
        && !text.contains(':')
        && text.bytes().any(|b| b.is_ascii_alphabetic() || b == b'*' || !b.is_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(s: &str) -> NamePattern {
        NamePattern::Exact(s.to_owned())
    }

    #[test]
    fn names_and_wildcards_parse() {
        assert_eq!(NamePattern::parse("api.example.com"), Ok(exact("api.example.com")));
        assert_eq!(NamePattern::parse("xn--bcher-kva.example"), Ok(exact("xn--bcher-kva.example")));
        assert_eq!(NamePattern::parse("_svc.db-1.corp.example"), Ok(exact("_svc.db-1.corp.example")));
        assert_eq!(NamePattern::parse("*.example.com"), Ok(NamePattern::Wildcard("example.com".into())));
        assert_eq!(NamePattern::parse("*.co.uk"), Ok(NamePattern::Wildcard("co.uk".into())));
        assert_eq!(NamePattern::parse("*.example.com").unwrap().to_string(), "*.example.com");
    }

    #[test]
    fn what_is_refused_says_why() {
        let cases = [
            ("*", "every name"),
            ("*.", "every name"),
            ("*.com", "top-level domain"),
            ("a.*.example.com", "first label"),
            ("*x.example.com", "first label"),
            ("**.example.com", "first label"),
            ("api.example.com.", "ends with a dot"),
            ("API.example.com", "lower case: \"api.example.com\""),
            ("bücher.example", "punycode"),
            ("a..example", "empty label"),
            (".example.com", "empty label"),
            ("-a.example", "starts or ends with '-'"),
            ("a b.example", "' ' in a label"),
            ("localhost", "single label"),
            ("db", "single label"),
            ("10.0.5", "numeric label"),
        ];
        for (text, needle) in cases {
            let err = NamePattern::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let long_label = format!("{}.example", "a".repeat(64));
        assert!(NamePattern::parse(&long_label).unwrap_err().contains("at most 63"));
        let long_name = format!("{}example", "abcdefghi.".repeat(25));
        assert!(NamePattern::parse(&long_name).unwrap_err().contains("at most 253"));
    }

    #[test]
    fn an_allowed_wildcard_matches_one_label_and_not_its_parent() {
        let w = NamePattern::parse("*.example.com").unwrap();
        assert!(w.allows("api.example.com"));
        assert!(!w.allows("example.com"));
        assert!(!w.allows("a.b.example.com"));
        assert!(!w.allows("notexample.com"));
        assert!(!w.allows("api.example.com.evil"));
        assert!(!w.allows(".example.com"));
        let e = exact("api.example.com");
        assert!(e.allows("api.example.com"));
        assert!(!e.allows("x.api.example.com"));
        assert!(!e.allows("pi.example.com"));
    }

    #[test]
    fn a_deny_covers_the_name_and_everything_below() {
        let e = exact("evil.example");
        assert!(e.denies("evil.example") && e.denies("a.evil.example") && e.denies("a.b.evil.example"));
        assert!(!e.denies("notevil.example") && !e.denies("example"));
        let w = NamePattern::parse("*.evil.example").unwrap();
        assert!(w.denies("a.evil.example") && w.denies("a.b.evil.example"));
        assert!(!w.denies("evil.example"));
    }
}
