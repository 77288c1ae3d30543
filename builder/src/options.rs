//! buildx-style option strings: `key=value,key=value`, as `--output`,
//! `RUN --mount`, `--cache-to`, `--cache-from` and `--secret` take them.
//!
//! One CSV record per string: fields are separated by commas, and a field
//! in double quotes may hold commas (`"name=a,b"`), with `""` inside quotes
//! standing for one quote. Two quoting dialects are in use, chosen by the
//! caller with [`Quotes`]; see there for why.
//!
//! This module only splits text. What the keys mean, which are allowed and
//! how their values are checked is the caller's business.

/// Why an option string could not be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A double quote was opened and never closed.
    #[error("unterminated double quote in {0:?}; close it or double it (\"\") inside quotes")]
    UnterminatedQuote(String),
    /// A field without `=` where the caller needs `key=value`.
    #[error("{item:?} is not key=value")]
    NotKeyValue {
        /// The field at fault, quotes removed.
        item: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// How double quotes are read.
///
/// The two dialects accept the same common inputs (`"k=a,b"`, `k=v,k2=v2`)
/// and differ on quotes inside a field: `target=a"b` is a literal quote
/// with [`Quotes::FieldStart`] and an unterminated quote with
/// [`Quotes::Anywhere`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quotes {
    /// Go's `encoding/csv` with lazy quotes, as BuildKit reads `--mount`: a
    /// quote opens a quoted field only as the field's first character;
    /// anywhere else it is an ordinary character. Text after the closing
    /// quote, up to the comma, is kept.
    FieldStart,
    /// A quote anywhere opens or closes a quoted stretch, so a value alone
    /// may be quoted (`name="a,b"`), as kiln's `--output` allows.
    Anywhere,
}

/// Split `s` into its fields, quotes removed. An empty string is one empty
/// field, and a trailing comma gives a trailing empty field, as in CSV.
pub fn split(s: &str, quotes: Quotes) -> Result<Vec<String>> {
    match quotes {
        Quotes::FieldStart => split_field_start(s),
        Quotes::Anywhere => split_anywhere(s),
    }
}

/// Split `s` into `(key, value)` pairs at each field's first `=`; a field
/// without `=` is an error naming it. Keys and values are returned as
/// written (no trimming, no case folding).
pub fn pairs(s: &str, quotes: Quotes) -> Result<Vec<(String, String)>> {
    split(s, quotes)?
        .into_iter()
        .map(|field| match field.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => Err(Error::NotKeyValue { item: field }),
        })
        .collect()
}

fn split_field_start(s: &str) -> Result<Vec<String>> {
    let mut fields = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(Error::UnterminatedQuote(s.to_string())),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
        }
        // The unquoted field, or what follows a closing quote: kept as is
        // up to the comma.
        while let Some(c) = chars.next_if(|&c| c != ',') {
            field.push(c);
        }
        fields.push(field);
        if chars.next().is_none() {
            return Ok(fields);
        }
    }
}

fn split_anywhere(s: &str) -> Result<Vec<String>> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if quoted {
        return Err(Error::UnterminatedQuote(s.to_string()));
    }
    fields.push(cur);
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(s: &str) -> Vec<String> {
        let a = split(s, Quotes::FieldStart).unwrap();
        assert_eq!(a, split(s, Quotes::Anywhere).unwrap(), "{s}");
        a
    }

    #[test]
    fn plain_and_quoted_fields_split_alike_in_both_dialects() {
        assert_eq!(both("type=cache,target=/c"), ["type=cache", "target=/c"]);
        assert_eq!(both("\"target=/a,b\",ro"), ["target=/a,b", "ro"]);
        assert_eq!(both("\"a\"\"b\""), ["a\"b"]);
        assert_eq!(both("\"a\"x,y"), ["ax", "y"]);
        assert_eq!(both(""), [""]);
        assert_eq!(both("a,"), ["a", ""]);
        assert_eq!(both(",,"), ["", "", ""]);
    }

    #[test]
    fn dialects_differ_on_quotes_inside_a_field() {
        assert_eq!(
            split("id=a\"b,x", Quotes::FieldStart).unwrap(),
            ["id=a\"b", "x"]
        );
        assert_eq!(
            split("id=a\"b,x", Quotes::Anywhere),
            Err(Error::UnterminatedQuote("id=a\"b,x".into()))
        );
        assert_eq!(
            split("name=\"a,b\",push=true", Quotes::Anywhere).unwrap(),
            ["name=a,b", "push=true"]
        );
        assert_eq!(
            split("name=\"a,b\",push=true", Quotes::FieldStart).unwrap(),
            ["name=\"a", "b\"", "push=true"]
        );
        assert_eq!(split("dest=a\"\"b", Quotes::Anywhere).unwrap(), ["dest=ab"]);
    }

    #[test]
    fn an_open_quote_is_an_error_naming_the_string() {
        for q in [Quotes::FieldStart, Quotes::Anywhere] {
            let e = split("a,\"b", q).unwrap_err();
            assert_eq!(e, Error::UnterminatedQuote("a,\"b".into()));
            assert!(e.to_string().contains("\"a,\\\"b\""), "{e}");
        }
    }

    #[test]
    fn pairs_split_at_the_first_equals_and_name_a_bare_item() {
        assert_eq!(
            pairs("type=oci,\"dest=a=b,c\"", Quotes::Anywhere).unwrap(),
            [
                ("type".to_string(), "oci".to_string()),
                ("dest".to_string(), "a=b,c".to_string())
            ]
        );
        assert_eq!(
            pairs(" Key =v", Quotes::FieldStart).unwrap(),
            [(" Key ".to_string(), "v".to_string())]
        );
        let e = pairs("type=oci,dest", Quotes::Anywhere).unwrap_err();
        assert_eq!(
            e,
            Error::NotKeyValue {
                item: "dest".into()
            }
        );
        assert_eq!(e.to_string(), "\"dest\" is not key=value");
        assert!(matches!(
            pairs("a=1,", Quotes::Anywhere),
            Err(Error::NotKeyValue { item }) if item.is_empty()
        ));
    }
}
