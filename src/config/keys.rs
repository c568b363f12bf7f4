//! Unknown keys, all of them at once. serde's `deny_unknown_fields` stops at the first unknown key
//! (and names its place badly), so the file's tree is walked first against the keys each raw
//! struct lists (`raw::*::KEYS`): every unknown key is reported with its path and, when a known
//! key is close, the one that was probably meant; it is then removed so that the rest of the file
//! still deserializes and every bad value is reported together with the unknown keys.

use config::{Value, ValueKind};

use super::problems::Problems;
use super::raw::{RawConfig, Shape};

/// The whole file.
pub(super) const ROOT: Shape = Shape::Keys(RawConfig::KEYS);

/// `parent.name`, or `name` at the top.
pub(super) fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    }
}

/// Removes every unknown key under `value` (found at `path`), with a problem for each.
pub(super) fn strip_unknown(
    p: &mut Problems,
    value: &mut Value,
    shape: &'static Shape,
    path: &str,
) {
    match (shape, &mut value.kind) {
        (Shape::Keys(keys) | Shape::LeafOr(keys), ValueKind::Table(table)) => {
            // The table does not keep the file's order; sorted, the report is at least stable.
            let mut names: Vec<String> = table.keys().cloned().collect();
            names.sort();
            for name in names {
                let at = join(path, &name);
                match keys.iter().find(|(k, _)| *k == name) {
                    Some((_, inner)) => {
                        if let Some(child) = table.get_mut(&name) {
                            strip_unknown(p, child, inner, &at);
                        }
                    }
                    None => {
                        table.remove(&name);
                        p.add(at, unknown_key(&name, keys));
                    }
                }
            }
        }
        (Shape::Named(inner), ValueKind::Table(table)) => {
            let mut names: Vec<String> = table.keys().cloned().collect();
            names.sort();
            for name in names {
                if let Some(child) = table.get_mut(&name) {
                    strip_unknown(p, child, inner, &join(path, &name));
                }
            }
        }
        (Shape::List(inner), ValueKind::Array(items)) => {
            for (i, item) in items.iter_mut().enumerate() {
                strip_unknown(p, item, inner, &format!("{path}[{i}]"));
            }
        }
        // Anything else is a value, or has the wrong type, which deserializing reports.
        _ => {}
    }
}

fn unknown_key(name: &str, keys: &[(&'static str, Shape)]) -> String {
    match closest(name, keys) {
        Some(k) => format!("unknown key; did you mean `{k}`?"),
        None => format!(
            "unknown key (the keys here are {})",
            keys.iter()
                .map(|(k, _)| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The known key `name` was most likely meant to be: within two edits, and never one that shares
/// less with it than it changes.
pub(super) fn closest(name: &str, keys: &[(&'static str, Shape)]) -> Option<&'static str> {
    let name = name.to_ascii_lowercase();
    keys.iter()
        .map(|(k, _)| (edit_distance(&name, k), *k))
        .filter(|(d, k)| *d <= 2 && *d < name.chars().count().min(k.len()))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Edits from `a` to `b`: inserting, deleting or replacing a character, or swapping two
/// neighbours (the commonest typo, `budgte`), each counts one.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // d[i][j]: edits from the first i characters of a to the first j of b.
    let mut d = vec![vec![0; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    d[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let replace = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + replace);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::*;
    use serde::de::{self, Deserialize, Visitor};

    /// A deserializer that only asks for a struct's field names: serde hands them to
    /// `deserialize_struct`, and this is the one place they can be read.
    struct FieldNames<'a>(&'a mut Option<&'static [&'static str]>);

    impl<'de> de::Deserializer<'de> for FieldNames<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = Some(fields);
            Err(de::Error::custom("fields read"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    fn fields<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
        let mut out = None;
        let _ = T::deserialize(FieldNames(&mut out));
        let mut v = out.expect("a struct").to_vec();
        v.sort();
        v
    }

    /// A value of the right kind for a key of `shape`: every key may be absent or null, except
    /// sections, which are maps.
    fn placeholder(shape: &Shape) -> serde_json::Value {
        match shape {
            Shape::Leaf | Shape::LeafOr(_) => serde_json::Value::Null,
            Shape::Keys(_) | Shape::Named(_) => serde_json::json!({}),
            Shape::List(_) => serde_json::json!([]),
        }
    }

    /// Each list names exactly its struct's fields, with a shape the struct accepts, and the
    /// struct still refuses anything else.
    fn in_sync<T: for<'de> Deserialize<'de>>(keys: &[(&'static str, Shape)]) {
        let mut listed: Vec<&str> = keys.iter().map(|(k, _)| *k).collect();
        listed.sort();
        assert_eq!(
            listed,
            fields::<T>(),
            "{}::KEYS and its fields differ",
            std::any::type_name::<T>()
        );
        let mut doc: serde_json::Map<String, serde_json::Value> = keys
            .iter()
            .map(|(k, s)| (k.to_string(), placeholder(s)))
            .collect();
        if let Err(e) = serde_json::from_value::<T>(doc.clone().into()) {
            panic!("{}: {e}", std::any::type_name::<T>());
        }
        doc.insert("not_a_key".into(), serde_json::Value::Null);
        assert!(serde_json::from_value::<T>(doc.into()).is_err());
    }

    #[test]
    fn key_lists_match_the_raw_structs() {
        in_sync::<RawConfig>(RawConfig::KEYS);
        in_sync::<RawServer>(RawServer::KEYS);
        in_sync::<RawServerTls>(RawServerTls::KEYS);
        in_sync::<RawAdmin>(RawAdmin::KEYS);
        in_sync::<RawLog>(RawLog::KEYS);
        in_sync::<RawUpstream>(RawUpstream::KEYS);
        in_sync::<RawUpstreamTls>(RawUpstreamTls::KEYS);
        in_sync::<RawPool>(RawPool::KEYS);
        in_sync::<RawCircuit>(RawCircuit::KEYS);
        in_sync::<RawRoute>(RawRoute::KEYS);
        in_sync::<RawMatch>(RawMatch::KEYS);
        in_sync::<RawAdaptive>(RawAdaptive::KEYS);
        in_sync::<RawQueue>(RawQueue::KEYS);
        in_sync::<RawOverload>(RawOverload::KEYS);
        in_sync::<RawFallback>(RawFallback::KEYS);
        in_sync::<RawRetry>(RawRetry::KEYS);
        in_sync::<RawAuth>(RawAuth::KEYS);
        in_sync::<RawApiKeys>(RawApiKeys::KEYS);
        in_sync::<RawBasic>(RawBasic::KEYS);
    }

    #[test]
    fn suggestions_are_close_keys_only() {
        let route = RawRoute::KEYS;
        assert_eq!(closest("budgte", route), Some("budget"));
        assert_eq!(closest("concurency", route), Some("concurrency"));
        assert_eq!(closest("Budget", route), Some("budget"));
        assert_eq!(closest("timeout", route), None);
        assert_eq!(closest("x", route), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("budgte", "budget"), 1);
        assert_eq!(closest("mxa", RawAdaptive::KEYS), Some("max"));
    }
}
