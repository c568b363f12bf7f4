//! Environment overrides (`BREAKWATER__ROUTES__0__BUDGET=3s`), checked against the known keys
//! before they are applied, so that a mistake in one is reported under the variable's name: the
//! operator looks for it in the task definition, not in the file. Problems with a value a
//! variable set name the variable too ([`EnvSources::attribute`]).

use config::{Value, ValueKind};

use super::keys::{closest, join, ROOT};
use super::problems::Problems;
use super::raw::Shape;
use super::{Problem, ENV_PREFIX};

/// One level of a variable's path: a key, or a list item's number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
    Key(String),
    Index(usize),
}

/// `BREAKWATER__ROUTES__0__BUDGET` → `routes`, `0`, `budget`; `None` for unrelated variables
/// and for ones with an empty level (`BREAKWATER__A____B`).
pub(super) fn segments(var: &str) -> Option<Vec<Segment>> {
    let rest = var.strip_prefix(ENV_PREFIX)?;
    if rest.is_empty() {
        return None;
    }
    rest.split("__")
        .map(|part| match part {
            "" => None,
            p if p.chars().all(|c| c.is_ascii_digit()) => p.parse().ok().map(Segment::Index),
            p => Some(Segment::Key(p.to_ascii_lowercase())),
        })
        .collect()
}

/// `routes[0].budget`.
pub(super) fn render(path: &[Segment]) -> String {
    path.iter().fold(String::new(), |at, s| match s {
        Segment::Key(k) => join(&at, k),
        Segment::Index(i) => format!("{at}[{i}]"),
    })
}

/// Which variable set which key, for naming it in problems about that key.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EnvSources(Vec<(String, String)>);

impl EnvSources {
    /// The variable that set `key` or a key above it.
    pub fn variable_for(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(path, _)| {
                key == path
                    || key
                        .strip_prefix(path.as_str())
                        .is_some_and(|rest| rest.starts_with(['.', '[']))
            })
            .map(|(_, var)| var.as_str())
    }

    /// Adds the variable's name to every problem about a value one set.
    pub fn attribute(&self, problems: &mut [Problem]) {
        for p in problems {
            if let Some(var) = self.variable_for(&p.key) {
                if !p.message.contains(var) {
                    p.message = format!("{} (set by {var})", p.message);
                }
            }
        }
    }
}

/// Applies every `BREAKWATER__*` variable of `env` to the file's tree. A variable that names no
/// key, or a list item the file does not have, is reported under its own name and not applied.
pub(super) fn apply(
    p: &mut Problems,
    tree: &mut Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> EnvSources {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    // Stable order for the report.
    vars.sort();
    let mut sources = EnvSources::default();
    for (var, value) in vars {
        let Some(path) = segments(&var) else {
            p.add(
                &var,
                "not a key: `__` separates levels, and no level may be empty",
            );
            continue;
        };
        if let Err(message) = check(&var, &path, tree) {
            p.add(&var, message);
            continue;
        }
        set(tree, &path, value);
        sources.0.push((render(&path), var));
    }
    sources
}

/// Whether `path` names a key the configuration has, and only list items the file has.
fn check(var: &str, path: &[Segment], tree: &Value) -> Result<(), String> {
    let mut shape = &ROOT;
    let mut node = Some(tree);
    for (depth, seg) in path.iter().enumerate() {
        let here = render(&path[..depth]);
        let at = render(&path[..=depth]);
        shape = match (shape, seg) {
            (Shape::Keys(keys) | Shape::LeafOr(keys), Segment::Key(k)) => {
                match keys.iter().find(|(name, _)| name == k) {
                    Some((_, inner)) => inner,
                    None => {
                        let hint = match closest(k, keys) {
                            Some(meant) => {
                                format!("; did you mean {}?", respell(var, depth, meant))
                            }
                            None => String::new(),
                        };
                        return Err(format!("sets `{at}`, which is not a key{hint}"));
                    }
                }
            }
            (Shape::Named(inner), _) => inner,
            (Shape::List(inner), Segment::Index(i)) => {
                let len = match node.map(|n| &n.kind) {
                    Some(ValueKind::Array(items)) => items.len(),
                    _ => 0,
                };
                if *i >= len {
                    return Err(format!(
                        "sets `{}`, but the file has {}; a variable can change a list item the file has, not add one",
                        render(path),
                        match len {
                            0 => format!("no items in `{here}`"),
                            1 => format!("1 item in `{here}` (`{here}[0]`)"),
                            n => format!("{n} items in `{here}` (`{here}[0]` to `{here}[{}]`)", n - 1),
                        }
                    ));
                }
                inner
            }
            (Shape::List(_), Segment::Key(k)) => {
                return Err(format!(
                    "`{here}` is a list: the level after it must be an item number, not `{k}`"
                ))
            }
            (Shape::Keys(_) | Shape::LeafOr(_), Segment::Index(i)) => {
                return Err(format!("sets `{here}[{i}]`, but `{here}` is not a list"))
            }
            (Shape::Leaf, _) => {
                return Err(format!(
                    "sets `{at}`, but `{here}` is a single value: set `{}` itself",
                    var_for(var, depth)
                ))
            }
        };
        node = node.and_then(|n| child(n, seg));
    }
    Ok(())
}

fn child<'a>(node: &'a Value, seg: &Segment) -> Option<&'a Value> {
    match (&node.kind, seg) {
        (ValueKind::Table(t), Segment::Key(k)) => t.get(k),
        (ValueKind::Table(t), Segment::Index(i)) => t.get(&i.to_string()),
        (ValueKind::Array(items), Segment::Index(i)) => items.get(*i),
        _ => None,
    }
}

/// `var` with its level `depth` replaced by `key`.
fn respell(var: &str, depth: usize, key: &str) -> String {
    let rest = &var[ENV_PREFIX.len()..];
    let parts: Vec<String> = rest
        .split("__")
        .enumerate()
        .map(|(i, part)| {
            if i == depth {
                key.to_ascii_uppercase()
            } else {
                part.to_string()
            }
        })
        .collect();
    format!("{ENV_PREFIX}{}", parts.join("__"))
}

/// The variable for the first `depth` levels of `var`.
fn var_for(var: &str, depth: usize) -> String {
    let rest = &var[ENV_PREFIX.len()..];
    let parts: Vec<&str> = rest.split("__").take(depth).collect();
    format!("{ENV_PREFIX}{}", parts.join("__"))
}

/// Sets `path` (checked) to the variable's text, making the maps on the way; the text is read as
/// a number, flag or list when the key wants one.
fn set(tree: &mut Value, path: &[Segment], value: String) {
    let mut node = tree;
    for seg in path {
        node = match seg {
            Segment::Index(i) if matches!(node.kind, ValueKind::Array(_)) => {
                let ValueKind::Array(items) = &mut node.kind else {
                    unreachable!()
                };
                &mut items[*i]
            }
            seg => {
                let key = match seg {
                    Segment::Key(k) => k.clone(),
                    Segment::Index(i) => i.to_string(),
                };
                if !matches!(node.kind, ValueKind::Table(_)) {
                    node.kind = ValueKind::Table(Default::default());
                }
                let ValueKind::Table(table) = &mut node.kind else {
                    unreachable!()
                };
                table
                    .entry(key)
                    .or_insert_with(|| Value::new(None, ValueKind::Nil))
            }
        };
    }
    *node = Value::new(None, ValueKind::String(value));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respelling_keeps_the_other_levels() {
        assert_eq!(
            respell("BREAKWATER__ROUTES__0__BUDGTE", 2, "budget"),
            "BREAKWATER__ROUTES__0__BUDGET"
        );
        assert_eq!(
            var_for("BREAKWATER__ROUTES__0__BUDGET__X", 3),
            "BREAKWATER__ROUTES__0__BUDGET"
        );
    }

    #[test]
    fn a_variable_names_its_key_and_those_below() {
        let s = EnvSources(vec![("routes[0].concurrency".into(), "V".into())]);
        assert_eq!(s.variable_for("routes[0].concurrency"), Some("V"));
        assert_eq!(s.variable_for("routes[0].concurrency.min"), Some("V"));
        assert_eq!(s.variable_for("routes[0].concurrency_x"), None);
        assert_eq!(s.variable_for("routes[0]"), None);
    }
}
