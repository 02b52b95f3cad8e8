//! The schema walk: checks a span-carrying TOML document against `schema.rs`, collecting
//! every problem (unknown sections and keys, wrong types, integers that do not fit).
//!
//! serde with `deny_unknown_fields` stops at the first error; this walk does not. It visits every
//! key of the parsed [`toml_edit::Document`] (which remembers byte spans), and for each bad key
//! records a problem at the key's (or value's) line and column and marks the key for removal.
//! After the walk, `mod.rs` removes the marked keys, so the rest of the document deserializes
//! cleanly into the typed structs (rejected keys fall back to their defaults) and the cross-field
//! rules can still run and report their own problems in the same pass. Rules that read a
//! rejected key are skipped (see [`Walk::is_tainted`]), so a wrong value is not reported twice.

use std::collections::{BTreeMap, BTreeSet};

use toml_edit::{Item, Key, TableLike, Value};

use super::error::{ConfigProblem, LineIndex, Pos, problem};
use super::schema::{self, Field, SECTIONS, Ty, quoted_list};

/// What the walk found.
#[derive(Debug, Default)]
pub(crate) struct Walk {
    /// Schema problems (unknown keys, wrong types).
    pub(crate) problems: Vec<ConfigProblem>,
    /// Position of every key present in the file, by dotted path (sections included).
    pub(crate) positions: BTreeMap<String, Pos>,
    /// Dotted paths whose value was rejected; they take their defaults.
    pub(crate) tainted: BTreeSet<String>,
    /// Paths (as segments) to remove from the document before deserializing.
    pub(crate) removals: Vec<Vec<String>>,
}

impl Walk {
    /// Whether `key` or any table above it was rejected.
    pub(crate) fn is_tainted(&self, key: &str) -> bool {
        let mut prefix = key;
        loop {
            if self.tainted.contains(prefix) {
                return true;
            }
            match prefix.rfind('.') {
                Some(i) => prefix = &prefix[..i],
                None => return false,
            }
        }
    }

    /// Records a rejected value at `path`: a problem, a taint and a removal.
    fn reject(&mut self, path: &[&str], pos: Pos, message: String) {
        let key = path.join(".");
        self.problems.push(problem(pos, key.clone(), message));
        self.tainted.insert(key);
        self.removals
            .push(path.iter().map(|s| (*s).to_owned()).collect());
    }

    /// Records an unknown key at `path` (not a taint: nothing reads it).
    fn unknown(&mut self, path: &[&str], pos: Pos, message: String) {
        self.problems.push(problem(pos, path.join("."), message));
        self.removals
            .push(path.iter().map(|s| (*s).to_owned()).collect());
    }
}

/// Walks the root table of a parsed document.
pub(crate) fn walk(root: &dyn TableLike, lines: &LineIndex<'_>) -> Walk {
    let mut w = Walk::default();
    for (name, item) in root.iter() {
        let key_pos = key_pos(root.get_key_value(name).map(|(k, _)| k), item, lines);
        w.positions.insert(name.to_owned(), key_pos);
        let Some(section) = schema::section(name) else {
            let names: Vec<&str> = SECTIONS.iter().map(|s| s.name).collect();
            let msg = format!("unknown section `{name}`; {}", suggest(name, &names));
            w.unknown(&[name], key_pos, msg);
            continue;
        };
        match item.as_table_like() {
            Some(table) => walk_table(&mut w, &[name], table, section.fields, lines),
            None => {
                let at = item_pos(item, lines).unwrap_or(key_pos);
                let msg = format!("expected a table ([{name}]), found {}", item.type_name());
                w.reject(&[name], at, msg);
            }
        }
    }
    w
}

/// Walks one table whose keys are `fields`, at dotted `path`.
fn walk_table(
    w: &mut Walk,
    path: &[&str],
    table: &dyn TableLike,
    fields: &[Field],
    lines: &LineIndex<'_>,
) {
    for (name, item) in table.iter() {
        let mut key_path = path.to_vec();
        key_path.push(name);
        let dotted = key_path.join(".");
        let key_pos = key_pos(table.get_key_value(name).map(|(k, _)| k), item, lines);
        w.positions.insert(dotted.clone(), key_pos);
        let Some(field) = fields.iter().find(|f| f.name == name) else {
            let names: Vec<&str> = fields.iter().map(|f| f.name).collect();
            let msg = format!(
                "unknown key `{name}` in [{}]; {}",
                path.join("."),
                suggest(name, &names)
            );
            w.unknown(&key_path, key_pos, msg);
            continue;
        };
        let at = item_pos(item, lines).unwrap_or(key_pos);
        if let Ty::Table(sub) = field.ty {
            match item.as_table_like() {
                Some(t) => walk_table(w, &key_path, t, sub, lines),
                None => w.reject(&key_path, at, mismatch(&field.ty, item.type_name())),
            }
            continue;
        }
        let Item::Value(value) = item else {
            w.reject(&key_path, at, mismatch(&field.ty, item.type_name()));
            continue;
        };
        if let Err(msg) = check_value(&field.ty, value) {
            w.reject(&key_path, at, msg);
        }
    }
}

/// Checks a scalar or array value against `ty`; `Err` carries the message.
fn check_value(ty: &Ty, value: &Value) -> Result<(), String> {
    let found = value.type_name();
    match (ty, value) {
        (Ty::Bool, Value::Boolean(_)) => Ok(()),
        (Ty::Float, Value::Float(_) | Value::Integer(_)) => Ok(()),
        (Ty::Str, Value::String(_)) => Ok(()),
        (Ty::Int { min, max }, Value::Integer(i)) => {
            let i = *i.value();
            if i < *min && *min == 0 {
                Err(format!("expected a non-negative integer, found {i}"))
            } else if i < *min || i > *max {
                Err(format!("{i} is out of range ({min}..={max})"))
            } else {
                Ok(())
            }
        }
        (Ty::Int { .. }, Value::Float(x)) => Err(format!(
            "expected an integer, found the float {}",
            x.value()
        )),
        (Ty::Enum(names), Value::String(s)) => {
            let s = s.value();
            if names.contains(&s.as_str()) {
                Ok(())
            } else {
                Err(format!("unknown value {s:?}; {}", suggest_value(s, names)))
            }
        }
        (Ty::StrArray, Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                if !item.is_str() {
                    return Err(format!(
                        "element {i}: expected a string, found {}",
                        item.type_name()
                    ));
                }
            }
            Ok(())
        }
        (Ty::UsizeList, Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let bad = match item {
                    Value::Integer(n) if usize::try_from(*n.value()).is_ok() => continue,
                    // Negative, or past `usize::MAX` on a 32-bit target.
                    Value::Integer(n) => format!("element {i} is {}", n.value()),
                    Value::Float(x) => format!("element {i} is the float {}", x.value()),
                    other => format!("element {i} is {}", article(other.type_name())),
                };
                return Err(format!("expected {}; {bad}", ty.describe()));
            }
            Ok(())
        }
        _ => Err(mismatch(ty, found)),
    }
}

/// "expected X, found Y".
fn mismatch(ty: &Ty, found: &str) -> String {
    format!("expected {}, found {}", ty.describe(), article(found))
}

/// "a string", "an integer", "an array".
fn article(type_name: &str) -> String {
    let vowel = type_name.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {type_name}", if vowel { "an" } else { "a" })
}

/// Where a key is: its own span, else its value's span, else the start of the file.
fn key_pos(key: Option<&Key>, item: &Item, lines: &LineIndex<'_>) -> Pos {
    key.and_then(|k| lines.span_pos(k.span()))
        .or_else(|| item_pos(item, lines))
        .unwrap_or(Pos { line: 1, column: 1 })
}

/// Where a value (or table) is, if the parser recorded it.
fn item_pos(item: &Item, lines: &LineIndex<'_>) -> Option<Pos> {
    lines.span_pos(item.span())
}

/// "did you mean `x`?" for a close name, else the list of known names.
fn suggest(name: &str, known: &[&str]) -> String {
    match closest(name, known) {
        Some(best) => format!("did you mean `{best}`?"),
        None => format!("known keys: {}", known.join(", ")),
    }
}

/// Like [`suggest`] for enum values.
fn suggest_value(value: &str, known: &[&str]) -> String {
    let list = format!("expected one of {}", quoted_list(known));
    match closest(value, known) {
        Some(best) => format!("{list} (did you mean {best:?}?)"),
        None => list,
    }
}

/// The known name nearest to `name` by edit distance, if near enough to be a typo.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    let lower = name.to_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&lower, k), *k))
        .filter(|(d, k)| *d <= (k.chars().count() / 3).max(2) && *d < k.chars().count())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over characters.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if ca == *cb {
                diag
            } else {
                1 + diag.min(up).min(row[j])
            };
            diag = up;
        }
    }
    row[b.len()]
}

/// Removes `path` from a mutable document's root table (missing paths are ignored).
pub(crate) fn remove_path(root: &mut dyn TableLike, path: &[String]) {
    match path {
        [] => {}
        [last] => {
            root.remove(last);
        }
        [first, rest @ ..] => {
            if let Some(table) = root.get_mut(first).and_then(Item::as_table_like_mut) {
                remove_path(table, rest);
            }
        }
    }
}
