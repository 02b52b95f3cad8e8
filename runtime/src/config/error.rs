//! Config errors: every problem names its key path, line and column, and one run reports all.
//!
//! [`ConfigProblem`] is one finding; [`ConfigErrors`] is every finding of one parse or
//! validation, sorted by position, and prints one line per problem as
//! `FILE:LINE:COL: key.path: message` (the format editors and `grep -n` users expect).
//! Lines and columns are 1-based; columns count characters, not bytes. A problem about a config
//! that did not come from a file (built in code, then [`super::Config::validate`]d) has line and
//! column 0.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

/// One problem in a config. Problems sort by position, then key, then message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key path, e.g. `parallel.pp` or `cluster.sim.link_gbps`; `(syntax)` for a TOML
    /// syntax error, which has no key.
    pub key: String,
    /// 1-based line (0 when the config has no source text).
    pub line: usize,
    /// 1-based column in characters (0 when the config has no source text).
    pub column: usize,
    /// What is wrong, phrased for the operator.
    pub message: String,
}

impl Ord for ConfigProblem {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.line, self.column, &self.key, &self.message).cmp(&(
            other.line,
            other.column,
            &other.key,
            &other.message,
        ))
    }
}

impl PartialOrd for ConfigProblem {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.line, self.column, self.key, self.message
        )
    }
}

/// Every problem found in one config, sorted by position (then key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.origin, .problems))]
pub struct ConfigErrors {
    /// Where the config came from (a file path, or a name such as `<config>`).
    pub origin: String,
    /// The problems, never empty when returned as an error.
    pub problems: Vec<ConfigProblem>,
}

impl ConfigErrors {
    /// Wraps `problems` (sorting them) with their origin.
    pub fn new(origin: impl Into<String>, mut problems: Vec<ConfigProblem>) -> Self {
        problems.sort();
        problems.dedup();
        ConfigErrors {
            origin: origin.into(),
            problems,
        }
    }

    /// Number of problems.
    pub fn len(&self) -> usize {
        self.problems.len()
    }

    /// Whether there are no problems (never true for a returned error).
    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// The problems in position order.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigProblem> {
        self.problems.iter()
    }

    /// The key paths of the problems, in position order.
    pub fn keys(&self) -> Vec<&str> {
        self.problems.iter().map(|p| p.key.as_str()).collect()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigProblem;
    type IntoIter = std::slice::Iter<'a, ConfigProblem>;

    fn into_iter(self) -> Self::IntoIter {
        self.problems.iter()
    }
}

fn render(origin: &str, problems: &[ConfigProblem]) -> String {
    let lines: Vec<String> = problems.iter().map(|p| format!("{origin}:{p}")).collect();
    lines.join("\n")
}

/// Why [`super::Config::load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{}: cannot read config: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read but is not a valid config.
    #[error(transparent)]
    Invalid(#[from] ConfigErrors),
}

/// A 1-based line and character column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    /// 1-based line; 0 = unknown.
    pub line: usize,
    /// 1-based column in characters; 0 = unknown.
    pub column: usize,
}

impl Pos {
    /// The position used when there is no source text.
    pub const UNKNOWN: Pos = Pos { line: 0, column: 0 };
}

/// Maps byte offsets of a source text to line/column positions.
#[derive(Debug, Clone)]
pub(crate) struct LineIndex<'a> {
    src: &'a str,
    /// Byte offset of the start of each line.
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub(crate) fn new(src: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(src.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { src, starts }
    }

    /// The position of byte `offset` (clamped to the text; snapped back to a char boundary).
    pub(crate) fn pos(&self, offset: usize) -> Pos {
        let mut offset = offset.min(self.src.len());
        while !self.src.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts.get(line - 1).copied().unwrap_or(0);
        let column = self.src.get(start..offset).map_or(0, |s| s.chars().count()) + 1;
        Pos { line, column }
    }

    /// The position of the start of `span`, if any.
    pub(crate) fn span_pos(&self, span: Option<Range<usize>>) -> Option<Pos> {
        span.map(|s| self.pos(s.start))
    }
}

/// Builds a problem at `pos`.
pub(crate) fn problem(
    pos: Pos,
    key: impl Into<String>,
    message: impl Into<String>,
) -> ConfigProblem {
    ConfigProblem {
        line: pos.line,
        column: pos.column,
        key: key.into(),
        message: message.into(),
    }
}
