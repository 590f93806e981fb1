//! Captures the spans poolwatch opens and the events it logs (name, level, fields) through a
//! global `tracing` subscriber installed once per test binary, as an app would install its own.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// One span as opened: its name, level and fields (values as text).
#[derive(Debug, Clone)]
pub struct CapturedSpan {
    /// e.g. `poolwatch.heartbeat`.
    pub name: String,
    /// e.g. `WARN`.
    pub level: Level,
    /// Field name → value.
    pub fields: BTreeMap<String, String>,
}

static SPANS: Mutex<Vec<CapturedSpan>> = Mutex::new(Vec::new());
static EVENTS: Mutex<Vec<CapturedSpan>> = Mutex::new(Vec::new());
static SQLX_EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs the capturing subscriber (once) and returns every event sqlx logged so far (its
/// statement log included), each as its fields' text.
pub fn sqlx_events() -> Vec<String> {
    install();
    SQLX_EVENTS.lock().unwrap().clone()
}

/// Installs the capturing subscriber (once) and returns every poolwatch event (log line) at
/// `level` so far; `name` is the event's `message`.
pub fn events_at(level: Level) -> Vec<CapturedSpan> {
    install();
    EVENTS.lock().unwrap().iter().filter(|e| e.level == level).cloned().collect()
}

/// Installs the capturing subscriber (once) and returns every span named `name` so far.
pub fn spans_named(name: &str) -> Vec<CapturedSpan> {
    install();
    SPANS.lock().unwrap().iter().filter(|s| s.name == name).cloned().collect()
}

/// Installs the capturing subscriber (once per test binary).
pub fn install() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let subscriber = tracing_subscriber::registry().with(Capture);
        tracing::subscriber::set_global_default(subscriber).expect("install the span capture");
    });
}

struct Capture;

impl<S: Subscriber> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        let meta = attrs.metadata();
        if !meta.target().starts_with("poolwatch") {
            return;
        }
        let mut fields = Fields(BTreeMap::new());
        attrs.record(&mut fields);
        let span = CapturedSpan { name: meta.name().to_owned(), level: *meta.level(), fields: fields.0 };
        SPANS.lock().unwrap().push(span);
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        if meta.target().starts_with("sqlx") {
            let mut fields = Fields(BTreeMap::new());
            event.record(&mut fields);
            SQLX_EVENTS.lock().unwrap().push(format!("{:?}", fields.0));
            return;
        }
        if !meta.target().starts_with("poolwatch") {
            return;
        }
        let mut fields = Fields(BTreeMap::new());
        event.record(&mut fields);
        let message = fields.0.get("message").cloned().unwrap_or_default();
        EVENTS.lock().unwrap().push(CapturedSpan { name: message, level: *meta.level(), fields: fields.0 });
    }
}

struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}
