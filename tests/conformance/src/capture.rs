//! Every tracing event and span field of this process (the store's and its driver's),
//! formatted, at every level, kept in memory: the secrets tests of each backend look for
//! credentials in it. Global, since a driver's tasks run on the runtime's workers.

use std::fmt;
use std::sync::{Mutex, Once};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs the capture as the global subscriber, once per process.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::registry().with(Capture);
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
    });
}

/// Every line captured so far.
pub fn lines() -> Vec<String> {
    LINES.lock().unwrap().clone()
}

/// Adds `line`, for other sources of log lines (a `log` logger) that a test captures too.
pub fn keep(line: String) {
    LINES.lock().unwrap().push(line);
}

struct Capture;

/// `name=value` for each field, values by `Debug` (what a formatter would print).
struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push_str(&format!(" {}={value}", field.name()));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .push_str(&format!(" {}={value} ({value:?})", field.name()));
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields(format!(
            "{} {}",
            event.metadata().level(),
            event.metadata().target()
        ));
        event.record(&mut fields);
        keep(fields.0);
    }
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        let mut fields = Fields(format!("span {}", attrs.metadata().name()));
        attrs.record(&mut fields);
        keep(fields.0);
    }
    fn on_record(&self, _: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut fields = Fields("span record".into());
        values.record(&mut fields);
        keep(fields.0);
    }
}
