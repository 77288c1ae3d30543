//! Source locations and compiler-style rendering of Dockerfile diagnostics.
//!
//! Owns the `file:line:column` triple every frontend error carries and the
//! snippet (the offending line plus a caret) shown under the message. It never
//! decides what is an error; the parser, instruction checker and planner do.

use std::fmt;

use serde::Serialize;

/// A point in a Dockerfile, with the text of its line for rendering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Location {
    /// File name as given to [`crate::frontend::parse`].
    pub file: String,
    /// 1-based line number.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    /// The source line (without its newline), for the snippet.
    pub source_line: String,
}

impl Location {
    /// The offending line with a caret under `column`, like rustc prints it.
    pub fn snippet(&self) -> String {
        let num = self.line.to_string();
        let pad = " ".repeat(num.len());
        // Tabs before the caret are kept as tabs so the caret lines up in a
        // terminal whatever its tab width.
        let lead: String = self
            .source_line
            .chars()
            .take(self.column.saturating_sub(1))
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        format!(
            "{pad} |\n{num} | {}\n{pad} | {lead}^",
            self.source_line.trim_end_matches(['\r', '\n'])
        )
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// The lines of a source file, for turning (line, column) into a [`Location`].
#[derive(Debug, Clone, Default)]
pub struct SourceMap {
    file: String,
    text: String,
    line_starts: Vec<usize>,
}

impl SourceMap {
    /// Index `text` (already decoded) under the name `file`.
    pub fn new(file: &str, text: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        SourceMap {
            file: file.to_string(),
            text: text.to_string(),
            line_starts,
        }
    }

    /// The file name.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Text of 1-based line `line`, without its line ending; empty past the end.
    pub fn line(&self, line: usize) -> &str {
        let Some(&start) = self.line_starts.get(line.wrapping_sub(1)) else {
            return "";
        };
        let end = self
            .line_starts
            .get(line)
            .copied()
            .unwrap_or(self.text.len());
        self.text
            .get(start..end)
            .unwrap_or("")
            .trim_end_matches(['\n', '\r'])
    }

    /// A location at `line`, `column` (both 1-based).
    pub fn at(&self, line: usize, column: usize) -> Location {
        Location {
            file: self.file.clone(),
            line,
            column: column.max(1),
            source_line: self.line(line).to_string(),
        }
    }

    /// A location at the first occurrence of `needle` on lines `start..=end`,
    /// or at the start of line `start`.
    pub fn find_in(&self, start: usize, end: usize, needle: &str) -> Location {
        if !needle.is_empty() {
            for line in start..=end.max(start) {
                if self.line(line).contains(needle) {
                    return self.find(line, needle);
                }
            }
        }
        self.find(start, "")
    }

    /// A location at the first occurrence of `needle` on `line`, or at the
    /// first non-blank character of the line when it is not there (for
    /// instance because the token came from a continuation line).
    pub fn find(&self, line: usize, needle: &str) -> Location {
        let text = self.line(line);
        let byte = if needle.is_empty() {
            None
        } else {
            text.find(needle)
        };
        let byte = byte.unwrap_or_else(|| text.len() - text.trim_start().len());
        let column = text.get(..byte).map_or(0, |s| s.chars().count()) + 1;
        self.at(line, column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippet_points_at_column() {
        let map = SourceMap::new("Dockerfile", "FROM a\nCOPY --bogus x y\n");
        let loc = map.find(2, "--bogus");
        assert_eq!(loc.to_string(), "Dockerfile:2:6");
        assert_eq!(loc.snippet(), "  |\n2 | COPY --bogus x y\n  |      ^");
    }

    #[test]
    fn out_of_range_line_is_empty() {
        let map = SourceMap::new("D", "FROM a");
        assert_eq!(map.line(0), "");
        assert_eq!(map.line(7), "");
        assert_eq!(map.line(1), "FROM a");
    }
}
