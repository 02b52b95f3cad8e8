//! A small Rust scanner for `config_keys.rs`: which config struct fields a source file reads.
//!
//! It tokenizes (comments and the contents of string and char literals never match), drops items
//! under `#[cfg(test)]`, and then recognises a read of field `F` of a config table whose field
//! name in its parent is `L` (`checkpoint`, `sim`, `rope_scaling`) and whose type is `T`:
//! - `….L.F` (`cfg.checkpoint.keep`, also split over lines), not followed by an assignment;
//! - `X.F` where `X` is bound to the table in scope: `let X = &….L;` (also through
//!   `.clone().unwrap_or_default()`), a parameter `X: &T`,
//!   `if let Some(X) = &….L {…}` / `let Some(X) = … else`, or a `Some(X)` arm of
//!   `match &….L {…}`;
//! - `….L.M(` or `X.M(` where `M` is an accessor of `T` (in `runtime/src/config/`) that reads
//!   `self.F` (`cfg.supervision.peer_timeout()` reads `peer_timeout_ms`).

use std::collections::{BTreeMap, BTreeSet};

/// A token. Literals keep only what matching needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tok {
    Ident(String),
    /// A string literal's text (escapes left as written).
    Str(String),
    /// A number, char or byte literal.
    Lit,
    Punct(&'static str),
}

const PUNCT: &[&str] = &[
    "..=", "<<=", ">>=", "==", "!=", "<=", ">=", "=>", "::", "->", "+=", "-=", "*=", "/=", "%=",
    "^=", "&=", "|=", "..", "=", ".", ",", ";", ":", "&", "(", ")", "[", "]", "{", "}", "#", "!",
    "<", ">", "+", "-", "*", "/", "%", "^", "|", "?", "@", "$", "~",
];

/// Operators that write the place on their left.
const ASSIGN: &[&str] = &[
    "=", "+=", "-=", "*=", "/=", "%=", "^=", "&=", "|=", "<<=", ">>=",
];

/// Tokenizes Rust source. Unknown characters are skipped.
pub fn tokenize(src: &str) -> Vec<Tok> {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if ch == '"' {
            let start = i + 1;
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            let end = i.min(c.len());
            out.push(Tok::Str(c[start..end].iter().collect()));
            i += 1;
        } else if ch == '\'' {
            if at(i + 1) == '\\' {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push(Tok::Lit);
            } else if at(i + 2) == '\'' {
                i += 3;
                out.push(Tok::Lit);
            } else {
                // A lifetime or label: skip it whole.
                i += 1;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
            }
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            // `r"…"`, `r#"…"#`, `br"…"` (but not a raw identifier such as `r#type`).
            let hashes_ahead = (i..c.len()).take_while(|&k| c[k] == '#').count();
            let raw = (word == "r" || word == "br") && at(i + hashes_ahead) == '"';
            if raw {
                let mut hashes = 0;
                while at(i) == '#' {
                    hashes += 1;
                    i += 1;
                }
                i += 1; // the opening quote
                let start = i;
                loop {
                    if i >= c.len() {
                        break;
                    }
                    if c[i] == '"' && (1..=hashes).all(|h| at(i + h) == '#') {
                        break;
                    }
                    i += 1;
                }
                out.push(Tok::Str(c[start..i.min(c.len())].iter().collect()));
                i += 1 + hashes;
            } else if word == "b" && (at(i) == '"' || at(i) == '\'') {
                // A byte string or byte: the literal itself comes next.
            } else {
                out.push(Tok::Ident(word));
            }
        } else if ch.is_ascii_digit() {
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            if at(i) == '.' && at(i + 1).is_ascii_digit() {
                i += 1;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
            }
            out.push(Tok::Lit);
        } else {
            let rest: String = c[i..(i + 3).min(c.len())].iter().collect();
            match PUNCT.iter().find(|p| rest.starts_with(**p)) {
                Some(p) => {
                    out.push(Tok::Punct(p));
                    i += p.chars().count();
                }
                None => i += 1,
            }
        }
    }
    out
}

fn is_punct(t: Option<&Tok>, p: &str) -> bool {
    matches!(t, Some(Tok::Punct(q)) if *q == p)
}

fn ident(t: Option<&Tok>) -> Option<&str> {
    match t {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

/// For each `{`, `(` or `[`, the index of its closing token (unbalanced ones close at the end).
fn matching(toks: &[Tok]) -> Vec<usize> {
    let mut close = vec![toks.len(); toks.len()];
    let mut stack = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        match t {
            Tok::Punct("{" | "(" | "[") => stack.push(i),
            Tok::Punct("}" | ")" | "]") => {
                if let Some(open) = stack.pop() {
                    close[open] = i;
                }
            }
            _ => {}
        }
    }
    close
}

/// The tokens without the items under `#[cfg(test)]` (a test module, function or impl).
pub fn without_test_items(toks: Vec<Tok>) -> Vec<Tok> {
    let close = matching(&toks);
    let attr = ["#", "[", "cfg", "(", "test", ")", "]"];
    let mut keep = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        let is_attr = attr
            .iter()
            .enumerate()
            .all(|(k, want)| match toks.get(i + k) {
                Some(Tok::Punct(p)) => p == want,
                Some(Tok::Ident(s)) => s == want,
                _ => false,
            });
        if !is_attr {
            keep.push(toks[i].clone());
            i += 1;
            continue;
        }
        // Skip the attribute and the item after it: up to a `;` or through a `{…}` block at
        // the item's own level.
        let mut j = i + attr.len();
        while j < toks.len() {
            match &toks[j] {
                Tok::Punct(";") => break,
                Tok::Punct("{") => {
                    j = close[j];
                    break;
                }
                Tok::Punct("(" | "[") => j = close[j] + 1,
                _ => j += 1,
            }
        }
        i = j + 1;
    }
    keep
}

/// A table the scan looks for: its field name in the parent (`L`) and its Rust type (`T`).
#[derive(Debug, Clone)]
pub struct Table<'a> {
    pub field: &'a str,
    pub ty: &'a str,
    /// Accessor methods of `T` and the fields each reads.
    pub accessors: &'a BTreeMap<String, BTreeSet<String>>,
}

/// `.L` at `i` (the `.`), optionally followed by calls that keep the table (`.as_ref()`,
/// `.as_deref()`, `.clone()`, `.unwrap_or_default()`, as in `cfg.cluster.sim.clone()
/// .unwrap_or_default()`): the index just past it.
fn path_ends_with_table(toks: &[Tok], i: usize, table: &str) -> Option<usize> {
    // toks[i] must be `.` and toks[i+1] the table's field name.
    if !is_punct(toks.get(i), ".") || ident(toks.get(i + 1)) != Some(table) {
        return None;
    }
    let mut after = i + 2;
    while is_punct(toks.get(after), ".")
        && matches!(
            ident(toks.get(after + 1)),
            Some("as_ref" | "as_deref" | "clone" | "unwrap_or_default")
        )
        && is_punct(toks.get(after + 2), "(")
        && is_punct(toks.get(after + 3), ")")
    {
        after += 4;
    }
    Some(after)
}

/// After `=` (and an optional `&` / `&mut`) at `i`: a simple path `a.b.….L` (optionally
/// `.as_ref()`); returns the index just past it.
fn simple_path_to_table(toks: &[Tok], mut i: usize, table: &str) -> Option<usize> {
    if is_punct(toks.get(i), "&") {
        i += 1;
    }
    if ident(toks.get(i)) == Some("mut") {
        i += 1;
    }
    ident(toks.get(i))?;
    i += 1;
    loop {
        if let Some(after) = path_ends_with_table(toks, i, table) {
            let next = toks.get(after);
            if !is_punct(next, ".") {
                return Some(after);
            }
        }
        if is_punct(toks.get(i), ".") && ident(toks.get(i + 1)).is_some() {
            i += 2;
        } else {
            return None;
        }
    }
}

/// A name bound to the table over a token range.
#[derive(Debug)]
struct Binding {
    name: String,
    from: usize,
    to: usize,
}

/// The end of the innermost `{…}` block around `i` (the file's end at top level).
fn block_ends(toks: &[Tok], close: &[usize]) -> Vec<usize> {
    let mut ends = Vec::with_capacity(toks.len());
    let mut stack: Vec<usize> = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        ends.push(stack.last().map_or(toks.len(), |&open| close[open]));
        match t {
            Tok::Punct("{") => stack.push(i),
            Tok::Punct("}") => {
                stack.pop();
            }
            _ => {}
        }
    }
    ends
}

fn bindings(toks: &[Tok], table: &Table<'_>) -> Vec<Binding> {
    let close = matching(toks);
    let ends = block_ends(toks, &close);
    let mut out = Vec::new();
    // `block_end`: the end of the innermost block around token `i`.
    for (i, &block_end) in ends.iter().enumerate() {
        // let X = &a.b.L;
        if ident(toks.get(i)) == Some("let") {
            let mut j = i + 1;
            if ident(toks.get(j)) == Some("mut") {
                j += 1;
            }
            if let (Some(name), true) = (ident(toks.get(j)), is_punct(toks.get(j + 1), "="))
                && let Some(after) = simple_path_to_table(toks, j + 2, table.field)
                && is_punct(toks.get(after), ";")
            {
                out.push(Binding {
                    name: name.to_owned(),
                    from: after,
                    to: block_end,
                });
            }
        }
        // X: &T / X: &mut path::T / X: T, as a parameter: its scope is the function body.
        if let (Some(name), true) = (ident(toks.get(i)), is_punct(toks.get(i + 1), ":")) {
            let mut j = i + 2;
            if is_punct(toks.get(j), "&") {
                j += 1;
            }
            if ident(toks.get(j)) == Some("mut") {
                j += 1;
            }
            while ident(toks.get(j)).is_some() && is_punct(toks.get(j + 1), "::") {
                j += 2;
            }
            if ident(toks.get(j)) == Some(table.ty)
                && !is_punct(toks.get(j + 1), "::")
                && let Some(body) = fn_body_after_param(toks, j + 1)
            {
                out.push(Binding {
                    name: name.to_owned(),
                    from: i,
                    to: close[body],
                });
            }
        }
        // if let Some(X) = &a.L { … }   /   let Some(X) = &a.L else { … };
        if ident(toks.get(i)) == Some("Some")
            && is_punct(toks.get(i + 1), "(")
            && is_punct(toks.get(i + 3), ")")
            && is_punct(toks.get(i + 4), "=")
            && let Some(name) = ident(toks.get(i + 2))
            && let Some(after) = simple_path_to_table(toks, i + 5, table.field)
        {
            let to = if is_punct(toks.get(after), "{") {
                close[after]
            } else {
                block_end
            };
            out.push(Binding {
                name: name.to_owned(),
                from: after,
                to,
            });
        }
        // match &a.L { None => …, Some(X) => … }
        if ident(toks.get(i)) == Some("match")
            && let Some(after) = simple_path_to_table(toks, i + 1, table.field)
            && is_punct(toks.get(after), "{")
        {
            let end = close[after];
            let mut k = after + 1;
            while k < end {
                match &toks[k] {
                    Tok::Punct("{" | "(" | "[") => k = close[k] + 1,
                    Tok::Ident(s)
                        if s == "Some"
                            && is_punct(toks.get(k + 1), "(")
                            && is_punct(toks.get(k + 3), ")") =>
                    {
                        if let Some(name) = ident(toks.get(k + 2)) {
                            out.push(Binding {
                                name: name.to_owned(),
                                from: k,
                                to: end,
                            });
                        }
                        k += 4;
                    }
                    _ => k += 1,
                }
            }
        }
    }
    out
}

/// From just after a parameter's type at `i`: the `{` of the function body, if `i` is inside a
/// parameter list (the list closes before any `{`, `}` or `;`, and a `{` follows it).
fn fn_body_after_param(toks: &[Tok], mut i: usize) -> Option<usize> {
    let mut depth = 1usize;
    while i < toks.len() {
        match &toks[i] {
            Tok::Punct("(" | "[") => depth += 1,
            Tok::Punct(")" | "]") => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Tok::Punct("{" | "}" | ";") => return None,
            _ => {}
        }
        i += 1;
    }
    (i + 1..toks.len()).find_map(|j| match &toks[j] {
        Tok::Punct("{") => Some(Some(j)),
        Tok::Punct(";" | "}") => Some(None),
        _ => None,
    })?
}

/// Whether `toks[i]` (the token after a field or method name) starts a write of that place.
fn is_write(toks: &[Tok], i: usize) -> bool {
    matches!(toks.get(i), Some(Tok::Punct(p)) if ASSIGN.contains(p))
}

/// Whether the tokens read field `field` of `table` (directly, through a binding, or through
/// an accessor that reads it).
pub fn reads(toks: &[Tok], table: &Table<'_>, field: &str) -> bool {
    let methods: Vec<&str> = table
        .accessors
        .iter()
        .filter(|(_, fields)| fields.contains(field))
        .map(|(m, _)| m.as_str())
        .collect();
    // `receiver . name` at i (i = the receiver's `.`-less start) read as a field or accessor.
    let member_read = |j: usize| -> bool {
        // toks[j] is `.`, toks[j+1] the member.
        match ident(toks.get(j + 1)) {
            Some(m) if m == field => !is_write(toks, j + 2),
            Some(m) => methods.contains(&m) && is_punct(toks.get(j + 2), "("),
            None => false,
        }
    };
    let binds = bindings(toks, table);
    for i in 0..toks.len() {
        // ….L.F
        if is_punct(toks.get(i), ".")
            && ident(toks.get(i + 1)) == Some(table.field)
            && is_punct(toks.get(i + 2), ".")
            && member_read(i + 2)
        {
            return true;
        }
        // X.F with X bound to the table here.
        if let Some(name) = ident(toks.get(i))
            && (i == 0 || !is_punct(toks.get(i - 1), "."))
            && is_punct(toks.get(i + 1), ".")
            && binds
                .iter()
                .any(|b| b.name == name && b.from <= i && i <= b.to)
            && member_read(i + 1)
        {
            return true;
        }
    }
    false
}

/// The struct `ty`'s TOML key → Rust field names (a `#[serde(rename = "…")]` is the key), from
/// the tokens of the file that defines it.
pub fn struct_fields(toks: &[Tok], ty: &str) -> Option<BTreeMap<String, String>> {
    let close = matching(toks);
    let start = (0..toks.len()).find(|&i| {
        ident(toks.get(i)) == Some("struct")
            && ident(toks.get(i + 1)) == Some(ty)
            && is_punct(toks.get(i + 2), "{")
    })? + 2;
    let end = close[start];
    let mut fields = BTreeMap::new();
    let mut rename: Option<String> = None;
    let mut i = start + 1;
    while i < end {
        if is_punct(toks.get(i), "#") && is_punct(toks.get(i + 1), "[") {
            let attr_end = close[i + 1];
            for k in i + 2..attr_end {
                if ident(toks.get(k)) == Some("rename")
                    && is_punct(toks.get(k + 1), "=")
                    && let Some(Tok::Str(s)) = toks.get(k + 2)
                {
                    rename = Some(s.clone());
                }
            }
            i = attr_end + 1;
        } else if ident(toks.get(i)) == Some("pub")
            && let Some(name) = ident(toks.get(i + 1))
            && is_punct(toks.get(i + 2), ":")
        {
            fields.insert(
                rename.take().unwrap_or_else(|| name.to_owned()),
                name.to_owned(),
            );
            i += 3;
        } else if matches!(toks.get(i), Some(Tok::Punct("(" | "[" | "{"))) {
            i = close[i] + 1;
        } else {
            i += 1;
        }
    }
    Some(fields)
}

/// The `&self` methods of every `impl ty { … }` in the tokens, with the fields of `fields`
/// each one reads as `self.field`.
pub fn accessors(
    toks: &[Tok],
    ty: &str,
    fields: &BTreeSet<String>,
) -> BTreeMap<String, BTreeSet<String>> {
    let close = matching(toks);
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for i in 0..toks.len() {
        if !(ident(toks.get(i)) == Some("impl")
            && ident(toks.get(i + 1)) == Some(ty)
            && is_punct(toks.get(i + 2), "{"))
        {
            continue;
        }
        let end = close[i + 2];
        for k in i + 3..end {
            let is_method = ident(toks.get(k)) == Some("fn")
                && is_punct(toks.get(k + 2), "(")
                && is_punct(toks.get(k + 3), "&")
                && ident(toks.get(k + 4)) == Some("self");
            let Some(name) = ident(toks.get(k + 1)).filter(|_| is_method) else {
                continue;
            };
            let Some(body) = (k..end).find(|&j| is_punct(toks.get(j), "{")) else {
                continue;
            };
            let read: BTreeSet<String> = (body..close[body])
                .filter(|&j| ident(toks.get(j)) == Some("self") && is_punct(toks.get(j + 1), "."))
                .filter_map(|j| ident(toks.get(j + 2)))
                .filter(|f| fields.contains(*f))
                .map(str::to_owned)
                .collect();
            if !read.is_empty() {
                out.entry(name.to_owned()).or_default().extend(read);
            }
        }
    }
    out
}
