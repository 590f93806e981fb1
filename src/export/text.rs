//! The Prometheus text format (0.0.4): names, escaping, values.

use std::fmt::Write;

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`: anything else becomes `_`.
pub(super) fn metric_name(name: &str) -> String {
    name.char_indices()
        .map(
            |(i, c)| {
                if c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()) { c } else { '_' }
            },
        )
        .collect()
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`: anything else becomes `_`.
fn label_name(name: &str) -> String {
    name.char_indices()
        .map(|(i, c)| if c.is_ascii_alphabetic() || c == '_' || (i > 0 && c.is_ascii_digit()) { c } else { '_' })
        .collect()
}

/// Appends `key="value"`, the value escaped (`\`, `"`, newline).
pub(super) fn push_label(out: &mut String, key: &str, value: &str) {
    out.push_str(&label_name(key));
    out.push_str("=\"");
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A `# HELP` text: `\` and newline escaped.
pub(super) fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

pub(super) fn push_u64(out: &mut impl Write, v: u64) {
    let _ = write!(out, "{v}");
}

pub(super) fn push_f64(out: &mut impl Write, v: f64) {
    let _ = if v.is_nan() {
        out.write_str("NaN")
    } else if v.is_infinite() {
        out.write_str(if v > 0.0 { "+Inf" } else { "-Inf" })
    } else {
        write!(out, "{v}")
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_valid() {
        assert_eq!(metric_name("db.client.connection.count"), "db_client_connection_count");
        assert_eq!(metric_name("9lives:x"), "_lives:x");
        assert_eq!(label_name("a:b-c"), "a_b_c");
        assert_eq!(label_name("0x"), "_x");
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut s = String::new();
        push_label(&mut s, "k", "a\\b\"c\nd");
        assert_eq!(s, r#"k="a\\b\"c\nd""#);
        assert_eq!(escape_help("x\\y\nz \"q\""), "x\\\\y\\nz \"q\"");
    }

    #[test]
    fn special_floats_use_the_format_s_spelling() {
        let mut s = String::new();
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.25, 3.0] {
            push_f64(&mut s, v);
            s.push(' ');
        }
        assert_eq!(s, "NaN +Inf -Inf 0.25 3 ");
    }
}
