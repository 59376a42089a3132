//! photon-conformance's capture of tracing lines, and librdkafka's lines, which go through the
//! `log` crate, kept with them: the leak checks of tests/secrets.rs and tests/secured.rs read
//! both. Included by path (`#[path = "support/capture.rs"] mod capture;`).

use std::sync::Once;

pub(crate) use photon_conformance::capture::lines;

/// Installs both captures once per test binary (a process has one `log` logger).
pub(crate) fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        photon_conformance::capture::install();
        log::set_logger(&Log).expect("one logger");
        log::set_max_level(log::LevelFilter::Trace);
    });
}

struct Log;

impl log::Log for Log {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        photon_conformance::capture::keep(format!(
            "{} {} {}",
            record.level(),
            record.target(),
            record.args()
        ));
    }
    fn flush(&self) {}
}
