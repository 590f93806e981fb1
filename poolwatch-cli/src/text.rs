//! Text helpers every other file uses: terminal-safe cleaning and short durations.

/// Text from a server or the network, safe for a terminal: control characters (escape
/// sequences, newlines that could forge report lines) and bidirectional overrides become `?`.
pub(crate) fn clean(s: &str) -> String {
    s.chars().map(|c| if unsafe_char(c) { '?' } else { c }).collect()
}

/// The whole printed report: every control character but the line breaks goes.
pub(crate) fn clean_output(s: &str) -> String {
    s.chars().map(|c| if c != '\n' && unsafe_char(c) { '?' } else { c }).collect()
}

fn unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `0.4 ms`, `12 s`, `3 m 20 s`.
pub(crate) fn dur(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{:.1} ms", seconds * 1000.0)
    } else if seconds < 120.0 {
        format!("{seconds:.0} s")
    } else if seconds < 7200.0 {
        let (m, s) = ((seconds / 60.0) as u64, (seconds % 60.0) as u64);
        if s == 0 { format!("{m} m") } else { format!("{m} m {s} s") }
    } else {
        format!("{:.1} h", seconds / 3600.0)
    }
}
