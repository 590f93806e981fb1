//! Captures this test binary's `tracing` output in memory, as an app's log would show it.

use std::io::Write;
use std::sync::{Mutex, Once};

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once) a global fmt subscriber that writes to memory, with `filter`
/// (an `EnvFilter` directive such as `poolwatch=debug`) for the first caller.
pub fn capture(filter: &str) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_ansi(false)
            .with_writer(|| Capture)
            .init();
    });
}

/// The log lines captured so far that contain `needle`.
pub fn lines_with(needle: &str) -> Vec<String> {
    let logs = LOGS.lock().expect("log buffer");
    String::from_utf8_lossy(&logs).lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
}
