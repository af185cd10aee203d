//! The policy file as TOML deserializes it, before any meaning is checked: every value keeps
//! its span so that a later check can point at the line it complains about.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    #[serde(default)]
    pub(crate) defaults: Option<Spanned<RawDefaults>>,
    #[serde(default)]
    pub(crate) applications: BTreeMap<Spanned<String>, Spanned<StringList>>,
    #[serde(default, rename = "group")]
    pub(crate) groups: Vec<Spanned<RawGroup>>,
    #[serde(default, rename = "rule")]
    pub(crate) rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    pub(crate) rate_limit: Option<Spanned<RawRateLimit>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDefaults {
    pub(crate) lifetime: Option<Spanned<DurationValue>>,
    pub(crate) min_lifetime: Option<Spanned<DurationValue>>,
    pub(crate) max_lifetime: Option<Spanned<DurationValue>>,
    pub(crate) max_leases: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGroup {
    pub(crate) name: Spanned<String>,
    pub(crate) description: Option<String>,
    pub(crate) identities: Option<Spanned<StringList>>,
    pub(crate) addresses: Option<Spanned<StringList>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub(crate) name: Spanned<String>,
    pub(crate) description: Option<String>,
    pub(crate) groups: Spanned<StringList>,
    pub(crate) allow: Option<Spanned<StringList>>,
    pub(crate) deny: Option<Spanned<StringList>>,
    pub(crate) from: Option<Spanned<StringList>>,
    pub(crate) lifetime: Option<Spanned<DurationValue>>,
    pub(crate) min_lifetime: Option<Spanned<DurationValue>>,
    pub(crate) max_lifetime: Option<Spanned<DurationValue>>,
    pub(crate) max_leases: Option<Spanned<i64>>,
    pub(crate) third_party: Option<Spanned<bool>>,
    pub(crate) third_party_addresses: Option<Spanned<StringList>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub(crate) requests_per_second: Spanned<i64>,
    pub(crate) burst: Option<Spanned<i64>>,
}

/// A duration as written: a human text (`"10m"`) or a bare integer of seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DurationValue {
    Text(String),
    Seconds(i64),
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\", \"10m\" or \"1h\", or a number of seconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationValue, E> {
                Ok(DurationValue::Text(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DurationValue, E> {
                Ok(DurationValue::Seconds(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DurationValue, E> {
                Ok(DurationValue::Seconds(i64::try_from(v).unwrap_or(i64::MAX)))
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// One string or a list of strings, each with its span (a single string gets the span of the
/// whole value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StringList {
    One(String),
    Many(Vec<Spanned<String>>),
}

impl StringList {
    /// The strings with their spans; `whole` is the span of the value itself.
    pub(crate) fn items(&self, whole: &Range<usize>) -> Vec<(String, Range<usize>)> {
        match self {
            StringList::One(text) => vec![(text.clone(), whole.clone())],
            StringList::Many(items) => items
                .iter()
                .map(|item| (item.get_ref().clone(), item.span()))
                .collect(),
        }
    }
}

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor;
        impl<'de> Visitor<'de> for ListVisitor {
            type Value = StringList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringList, E> {
                Ok(StringList::One(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StringList, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<String>>()? {
                    items.push(item);
                }
                Ok(StringList::Many(items))
            }
        }
        deserializer.deserialize_any(ListVisitor)
    }
}
