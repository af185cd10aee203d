//! Identity patterns of host groups, compiled once at load and matched without allocating.
//!
//! A host's identity is the first URI SAN of its certificate (`fwnp://host/web-01`, a SPIFFE
//! ID `spiffe://example.org/host/web-01`) or else its first DNS SAN (`web-01.example.org`).
//! A pattern with `://` matches URI identities of the same scheme; any other pattern matches
//! DNS identities.
//!
//! - A URI is split after `SCHEME://` into segments at `/`: the authority (for SPIFFE, the
//!   trust domain) and then each path segment. A DNS name is split into labels at `.`.
//! - A pattern segment is matched against exactly one identity segment. In it, `*` stands for
//!   any run of characters (none included) that does not cross a `/` (URI) or a `.` (DNS).
//!   `web-*` matches `web-01` and `web-`, never `web-01/admin`.
//! - A segment that is exactly `**` stands for one or more whole segments: `spiffe://example.org/**`
//!   matches every SPIFFE ID of that trust domain with a path, and `**.example.org` every name
//!   under `example.org` (but not `example.org` itself). At most one `**` per pattern.
//! - The scheme, the URI authority and DNS names compare without regard to ASCII case; URI
//!   paths are case-sensitive. A trailing `.` of a DNS name is ignored.
//! - An identity with an empty segment (`fwnp://host//x`, `a..b`) matches no pattern.

use std::fmt;

/// Why an identity pattern does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    /// The pattern is empty.
    #[error("an identity pattern cannot be empty")]
    Empty,
    /// Whitespace or a control character.
    #[error("an identity pattern cannot contain whitespace or control characters")]
    Whitespace,
    /// The scheme is not `[a-z][a-z0-9+.-]*`, or holds a wildcard.
    #[error("the URI scheme {0:?} is not valid (and cannot hold wildcards)")]
    BadScheme(String),
    /// An empty segment or label, as in `a//b`, `a..b` or a trailing `/`.
    #[error("the pattern has an empty segment (\"//\", \"..\" or a trailing separator)")]
    EmptySegment,
    /// `**` mixed with other characters inside one segment.
    #[error("\"**\" must be a whole segment on its own (as in \"spiffe://example.org/**\")")]
    DoubleStarInSegment,
    /// More than one `**`.
    #[error("a pattern may hold only one \"**\"")]
    SeveralDoubleStars,
    /// A character a DNS name cannot hold.
    #[error("{0:?} cannot appear in a DNS name pattern (letters, digits, -, _, * and .)")]
    BadDnsCharacter(char),
}

/// One segment (URI) or label (DNS) of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Matches exactly this text.
    Literal(String),
    /// `*` alone: any non-empty segment.
    Any,
    /// Text with at least one `*`.
    Glob(String),
}

impl Segment {
    fn compile(text: &str, lower: bool) -> Result<Segment, PatternError> {
        if text.is_empty() {
            return Err(PatternError::EmptySegment);
        }
        if text.contains("**") {
            return Err(PatternError::DoubleStarInSegment);
        }
        let text = if lower {
            text.to_ascii_lowercase()
        } else {
            text.to_owned()
        };
        Ok(if text == "*" {
            Segment::Any
        } else if text.contains('*') {
            Segment::Glob(text)
        } else {
            Segment::Literal(text)
        })
    }

    /// Whether the identity segment matches; `fold` compares ASCII case-insensitively (the
    /// pattern side is already lower case then).
    fn matches(&self, segment: &str, fold: bool) -> bool {
        if segment.is_empty() {
            return false;
        }
        match self {
            Segment::Any => true,
            Segment::Literal(text) => {
                if fold {
                    text.eq_ignore_ascii_case(segment)
                } else {
                    text == segment
                }
            }
            Segment::Glob(pattern) => glob(pattern.as_bytes(), segment.as_bytes(), fold),
        }
    }
}

/// Wildcard match of `*` (any run of bytes) over one segment, linear-time with one backtrack
/// point, as classic glob matchers do.
fn glob(pattern: &[u8], text: &[u8], fold: bool) -> bool {
    let same = |p: u8, t: u8| {
        if fold {
            p == t.to_ascii_lowercase()
        } else {
            p == t
        }
    };
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while let Some(&tc) = text.get(t) {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&pc) if same(pc, tc) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .is_some_and(|rest| rest.iter().all(|&b| b == b'*'))
}

/// Segments before the `**` (or all of them), and those after it when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segments {
    head: Vec<Segment>,
    tail: Option<Vec<Segment>>,
}

impl Segments {
    fn compile(text: &str, separator: char, lower: bool) -> Result<Segments, PatternError> {
        let mut head = Vec::new();
        let mut tail: Option<Vec<Segment>> = None;
        for part in text.split(separator) {
            if part == "**" {
                if tail.is_some() {
                    return Err(PatternError::SeveralDoubleStars);
                }
                tail = Some(Vec::new());
                continue;
            }
            let segment = Segment::compile(part, lower)?;
            match tail.as_mut() {
                Some(tail) => tail.push(segment),
                None => head.push(segment),
            }
        }
        Ok(Segments { head, tail })
    }

    /// Matches a split identity; `fold_first` folds case in the first segment only (the URI
    /// authority), `fold_all` in every segment (DNS).
    fn matches(&self, split: &Split<'_>, fold_first: bool, fold_all: bool) -> bool {
        let count = split.count;
        let tail_len = self.tail.as_ref().map(Vec::len);
        match tail_len {
            None if count != self.head.len() => return false,
            Some(tail_len) if count < self.head.len() + 1 + tail_len => return false,
            _ => {}
        }
        let fold = |index: usize| fold_all || (fold_first && index == 0);
        match split.parts() {
            Some(parts) => {
                let head_ok = parts
                    .iter()
                    .zip(&self.head)
                    .enumerate()
                    .all(|(index, (segment, pattern))| pattern.matches(segment, fold(index)));
                head_ok
                    && match (&self.tail, tail_len) {
                        (Some(tail), Some(tail_len)) => {
                            // The segments `**` stands for must not be empty either.
                            let middle_end = count - tail_len;
                            parts
                                .get(self.head.len()..middle_end)
                                .is_some_and(|middle| middle.iter().all(|s| !s.is_empty()))
                                && parts.get(middle_end..).is_some_and(|rest| {
                                    rest.iter().zip(tail).all(|(segment, pattern)| {
                                        pattern.matches(segment, fold_all)
                                    })
                                })
                        }
                        _ => true,
                    }
            }
            None => self.matches_long(split, fold_first, fold_all),
        }
    }

    /// [`Segments::matches`] for identities with more segments than [`Split`] keeps.
    fn matches_long(&self, split: &Split<'_>, fold_first: bool, fold_all: bool) -> bool {
        let (text, separator, count) = (split.text, split.separator, split.count);
        let head_ok =
            text.split(separator)
                .zip(&self.head)
                .enumerate()
                .all(|(index, (segment, pattern))| {
                    pattern.matches(segment, fold_all || (fold_first && index == 0))
                });
        if !head_ok {
            return false;
        }
        match &self.tail {
            None => true,
            Some(tail) => {
                let middle_ok = text
                    .split(separator)
                    .skip(self.head.len())
                    .take(count - self.head.len() - tail.len())
                    .all(|segment| !segment.is_empty());
                middle_ok
                    && text
                        .rsplit(separator)
                        .zip(tail.iter().rev())
                        .all(|(segment, pattern)| pattern.matches(segment, fold_all))
            }
        }
    }
}

/// How many segments of an identity are kept split on the stack.
const SPLIT_SEGMENTS: usize = 16;

/// An identity's text split once per request at its separator, without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Split<'a> {
    text: &'a str,
    separator: char,
    /// The first segments (all of them when `count <= SPLIT_SEGMENTS`).
    first: [&'a str; SPLIT_SEGMENTS],
    count: usize,
}

impl<'a> Split<'a> {
    fn new(text: &'a str, separator: char) -> Split<'a> {
        let mut first = [""; SPLIT_SEGMENTS];
        let mut count = 0;
        for segment in text.split(separator) {
            if let Some(slot) = first.get_mut(count) {
                *slot = segment;
            }
            count += 1;
        }
        Split {
            text,
            separator,
            first,
            count,
        }
    }

    /// All segments, if they fit.
    fn parts(&self) -> Option<&[&'a str]> {
        self.first.get(..self.count)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Uri { scheme: String, segments: Segments },
    Dns(Segments),
}

/// A compiled identity pattern (see the module documentation for the rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdentityPattern {
    text: String,
    kind: Kind,
}

impl IdentityPattern {
    /// Compiles a pattern.
    pub(crate) fn compile(text: &str) -> Result<IdentityPattern, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(PatternError::Whitespace);
        }
        let kind = match text.split_once("://") {
            Some((scheme, rest)) => {
                let valid_scheme = scheme
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphabetic())
                    && scheme
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'.' | b'-'));
                if !valid_scheme {
                    return Err(PatternError::BadScheme(scheme.to_owned()));
                }
                // The authority folds case and the path does not: compile the authority in
                // lower case and the rest as written.
                let (authority, path) = match rest.split_once('/') {
                    Some((authority, path)) => (authority, Some(path)),
                    None => (rest, None),
                };
                let mut segments = Segments::compile(authority, '/', true)?;
                if let Some(path) = path {
                    let path_segments = Segments::compile(path, '/', false)?;
                    if segments.tail.is_some() && path_segments.tail.is_some() {
                        return Err(PatternError::SeveralDoubleStars);
                    }
                    match segments.tail.as_mut() {
                        Some(tail) => {
                            tail.extend(path_segments.head);
                        }
                        None => {
                            segments.head.extend(path_segments.head);
                            segments.tail = path_segments.tail;
                        }
                    }
                }
                Kind::Uri {
                    scheme: scheme.to_ascii_lowercase(),
                    segments,
                }
            }
            None => {
                let name = text.strip_suffix('.').unwrap_or(text);
                if let Some(bad) = name
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '*' | '.')))
                {
                    return Err(PatternError::BadDnsCharacter(bad));
                }
                Kind::Dns(Segments::compile(name, '.', true)?)
            }
        };
        Ok(IdentityPattern {
            text: text.to_owned(),
            kind,
        })
    }

    /// The pattern as written.
    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the identity matches.
    pub(crate) fn matches(&self, identity: &IdentityView<'_>) -> bool {
        match (&self.kind, identity) {
            (Kind::Uri { scheme, segments }, IdentityView::Uri { scheme: s, rest }) => {
                scheme.eq_ignore_ascii_case(s) && segments.matches(rest, true, false)
            }
            (Kind::Dns(segments), IdentityView::Dns(labels)) => {
                segments.matches(labels, true, true)
            }
            _ => false,
        }
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// An identity split once per request into what patterns look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdentityView<'a> {
    /// `SCHEME://REST`, REST split at `/`.
    Uri { scheme: &'a str, rest: Split<'a> },
    /// A DNS name without its trailing dot, split at `.`.
    Dns(Split<'a>),
}

impl<'a> IdentityView<'a> {
    pub(crate) fn new(identity: &'a str) -> IdentityView<'a> {
        match identity.split_once("://") {
            Some((scheme, rest)) => IdentityView::Uri {
                scheme,
                rest: Split::new(rest, '/'),
            },
            None => {
                let name = identity.strip_suffix('.').unwrap_or(identity);
                IdentityView::Dns(Split::new(name, '.'))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, identity: &str) -> bool {
        IdentityPattern::compile(pattern)
            .unwrap()
            .matches(&IdentityView::new(identity))
    }

    #[test]
    fn uri_patterns() {
        assert!(matches("fwnp://host/web-01", "fwnp://host/web-01"));
        assert!(!matches("fwnp://host/web-01", "fwnp://host/web-02"));
        assert!(matches("fwnp://host/web-*", "fwnp://host/web-01"));
        assert!(matches("fwnp://host/web-*", "fwnp://host/web-"));
        assert!(!matches("fwnp://host/web-*", "fwnp://host/web-01/x"));
        assert!(!matches("fwnp://host/web-*", "fwnp://host/db-01"));
        assert!(matches("fwnp://host/*", "fwnp://host/db-01"));
        assert!(!matches("fwnp://host/*", "fwnp://host//"));
        assert!(!matches("fwnp://host/*", "fwnp://host/"));
        assert!(!matches("fwnp://host/web-*", "spiffe://host/web-01"));
        assert!(matches("FWNP://HOST/web-*", "fwnp://host/web-01"));
        assert!(!matches("fwnp://host/WEB-*", "fwnp://host/web-01"));
        assert!(matches("*-*-x", "a-b-x"));
        assert!(!matches("*-*-x", "a-x"));
    }

    #[test]
    fn spiffe_patterns_and_double_star() {
        let web = "spiffe://example.org/host/web-*";
        assert!(matches(web, "spiffe://example.org/host/web-7"));
        assert!(!matches(web, "spiffe://example.com/host/web-7"));
        assert!(!matches(web, "spiffe://example.org/ns/host/web-7"));
        let all = "spiffe://example.org/**";
        assert!(matches(all, "spiffe://example.org/a"));
        assert!(matches(all, "spiffe://example.org/a/b/c"));
        assert!(!matches(all, "spiffe://example.org"));
        assert!(!matches(all, "spiffe://example.org/a//c"));
        assert!(!matches(all, "spiffe://other.org/a"));
        let middle = "spiffe://example.org/**/web";
        assert!(matches(middle, "spiffe://example.org/ns/x/web"));
        assert!(!matches(middle, "spiffe://example.org/web"));
        assert!(matches("spiffe://**", "spiffe://td/a"));
        assert!(matches(
            "spiffe://*.example.org/x",
            "spiffe://prod.example.org/x"
        ));
        assert!(!matches(
            "spiffe://*.example.org/x",
            "spiffe://example.org/x"
        ));
    }

    #[test]
    fn long_identities_match_like_short_ones() {
        let deep = format!("spiffe://example.org/{}web", "a/".repeat(40));
        assert!(matches("spiffe://example.org/**/web", &deep));
        assert!(matches("spiffe://example.org/a/**", &deep));
        assert!(!matches("spiffe://example.org/b/**", &deep));
        assert!(!matches("spiffe://example.org/**/db", &deep));
        assert!(!matches("spiffe://example.org/a/*", &deep));
        let holed = format!("spiffe://example.org/{}/web", "a/".repeat(40));
        assert!(!matches("spiffe://example.org/**/web", &holed));
        let labels = format!("{}example.org", "x.".repeat(30));
        assert!(matches("**.example.org", &labels));
        assert!(matches("X.**", &labels));
        assert!(!matches("*.example.org", &labels));
    }

    #[test]
    fn dns_patterns() {
        assert!(matches("web-01.example.org", "web-01.example.org"));
        assert!(matches("web-01.example.org", "WEB-01.Example.ORG."));
        assert!(matches("web-*.example.org", "web-01.example.org"));
        assert!(!matches("web-*.example.org", "web-01.eu.example.org"));
        assert!(matches("**.example.org", "a.b.example.org"));
        assert!(matches("**.example.org", "a.example.org"));
        assert!(!matches("**.example.org", "example.org"));
        assert!(!matches("**.example.org", "a..example.org"));
        assert!(matches("**", "anything.at.all"));
        assert!(!matches("**", "fwnp://host/x"));
        assert!(!matches("web.example.org", "fwnp://web.example.org"));
    }

    #[test]
    fn bad_patterns() {
        let err = |p: &str| IdentityPattern::compile(p).unwrap_err();
        assert_eq!(err(""), PatternError::Empty);
        assert_eq!(err("a b"), PatternError::Whitespace);
        assert_eq!(err("spiffe://x/a**"), PatternError::DoubleStarInSegment);
        assert_eq!(err("spiffe://x/**/a/**"), PatternError::SeveralDoubleStars);
        assert_eq!(err("spiffe://**/**"), PatternError::SeveralDoubleStars);
        assert_eq!(err("spiffe://x//a"), PatternError::EmptySegment);
        assert_eq!(err("spiffe://x/a/"), PatternError::EmptySegment);
        assert_eq!(err("a..b"), PatternError::EmptySegment);
        assert_eq!(
            err("sp*ffe://x/a"),
            PatternError::BadScheme("sp*ffe".into())
        );
        assert_eq!(err("web/01"), PatternError::BadDnsCharacter('/'));
    }
}
