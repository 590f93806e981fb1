//! A `metrics` recorder built for cheap scrapes (see [`series`](super::series)).
//! (metrics-exporter-prometheus rebuilds and re-escapes every label set on every scrape:
//! `benches/render_cost.rs` shows both side by side.)

use std::sync::{Arc, Mutex};

#[cfg(test)]
use metrics::Label;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};

use metrics_util::registry::Registry;

use super::series::{Index, Inner, Layout};
use super::{render, retire};

/// The recorder: install it with [`Exporter::install`](super::Exporter::install), or hand it
/// to `metrics::set_global_recorder` yourself after taking its [`handle`](Self::handle).
pub struct PrometheusRecorder {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for PrometheusRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusRecorder").finish_non_exhaustive()
    }
}

impl PrometheusRecorder {
    pub(super) fn new(layout: Layout) -> Self {
        let index = Arc::new(Index::new(layout));
        let inner = Arc::new(Inner { registry: Registry::new(index.clone()), index, retired: Mutex::default() });
        retire::subscribe(&inner);
        PrometheusRecorder { inner }
    }

    /// Renders into any writer (tests stall one mid-render).
    #[cfg(test)]
    fn render_into_writer(&self, out: &mut impl std::fmt::Write) {
        render::render(&self.inner.index, out);
    }

    /// A handle that renders what this recorder holds.
    pub fn handle(&self) -> PrometheusHandle {
        PrometheusHandle { inner: Arc::clone(&self.inner) }
    }
}

impl metrics::Recorder for PrometheusRecorder {
    fn describe_counter(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.inner.index.describe(&key, &description);
    }

    fn describe_gauge(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.inner.index.describe(&key, &description);
    }

    fn describe_histogram(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.inner.index.describe(&key, &description);
    }

    fn register_counter(&self, key: &Key, _metadata: &Metadata<'_>) -> Counter {
        self.inner.registry.get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _metadata: &Metadata<'_>) -> Gauge {
        self.inner.registry.get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, key: &Key, _metadata: &Metadata<'_>) -> Histogram {
        self.inner.registry.get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

/// Renders the recorder's series in the Prometheus text format (version 0.0.4), families in
/// name order. Cheap to clone; serve it from your own HTTP route if you do not use
/// [`Exporter::with_http_listener`](super::Exporter::with_http_listener).
#[derive(Clone)]
pub struct PrometheusHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PrometheusHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusHandle").finish_non_exhaustive()
    }
}

impl PrometheusHandle {
    /// The whole exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_into(&mut out);
        out
    }

    /// Appends the exposition to `out` (reuse one buffer between scrapes). Series of pools
    /// whose watch has ended, and that nothing holds any more, are taken out first (at most
    /// once a second).
    pub fn render_into(&self, out: &mut String) {
        retire::sweep_if_due(&self.inner);
        render::render(&self.inner.index, out);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use metrics::Recorder as _;

    use super::*;

    /// A render's output that stops at its first write until told to go on (or 30 s passed).
    struct Stalled {
        started: Option<mpsc::Sender<()>>,
        go: mpsc::Receiver<()>,
        went_on_when_told: Option<bool>,
    }

    impl std::fmt::Write for Stalled {
        fn write_str(&mut self, _: &str) -> std::fmt::Result {
            if let Some(started) = self.started.take() {
                let _ = started.send(());
                self.went_on_when_told = Some(self.go.recv_timeout(Duration::from_secs(30)).is_ok());
            }
            Ok(())
        }
    }

    fn meta() -> Metadata<'static> {
        Metadata::new("t", metrics::Level::INFO, None)
    }

    #[test]
    fn a_registration_completes_during_a_slow_render() {
        let recorder = Arc::new(crate::export::Exporter::new().build_recorder());
        recorder.register_counter(&Key::from_name("before_total"), &meta()).increment(1);
        let (started, render_started) = mpsc::channel();
        let (go, gone) = mpsc::channel();
        let r = Arc::clone(&recorder);
        let render = std::thread::spawn(move || {
            let mut out = Stalled { started: Some(started), go: gone, went_on_when_told: None };
            r.render_into_writer(&mut out);
            out.went_on_when_told
        });
        render_started.recv().expect("the render started");
        // While the render is stalled: a new family, a new series of an old one, a description.
        recorder.describe_gauge("during".into(), None, "Registered during a render.".into());
        recorder.register_gauge(&Key::from_name("during"), &meta()).set(1.0);
        recorder.register_counter(&Key::from_parts("before_total", vec![Label::new("k", "v")]), &meta()).increment(1);
        let _ = go.send(());
        let went_on = render.join().expect("render thread");
        assert_eq!(went_on, Some(true), "the registrations waited for the render to end");
        let text = recorder.handle().render();
        assert!(text.contains("# HELP during Registered during a render.\n") && text.contains("during 1\n"), "{text}");
    }
}
