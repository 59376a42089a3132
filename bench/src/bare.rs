//! The limit for an in-process store on this machine: a bare loop over the same payloads in a
//! `Vec`, decoding each into the same view. photon-memory's rows are read against it.

use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::domain::{self, Balances};
use crate::measure::{Latencies, Measurement, Role};
use crate::photon::load_case;
use crate::{progress, system, BoxError, Sizes};

const SUBJECT: &str = "bare Vec loop";

/// Folds `payloads` into a new view, decoding each.
fn fold(payloads: &[Bytes]) -> Result<Balances, BoxError> {
    let mut view = Balances::default();
    for p in payloads {
        view.apply_bytes(p)?;
    }
    Ok(view)
}

/// The replay baseline's events: `events` fresh payloads, built before any clock starts.
pub fn replay_set(events: u64) -> Vec<Bytes> {
    let bar = progress::bar(events, "building the bare loop's payloads");
    // Laid out as photon-memory keeps them: copied one after the other into 256 KiB buffers.
    // Payloads that are each their own allocation, interleaved with the encoder's freed
    // buffers, made this loop's speed vary by 1.5x from run to run with the heap's layout.
    let mut payloads = Vec::with_capacity(events as usize);
    let mut buffer = BytesMut::new();
    while (payloads.len() as u64) < events {
        let n = (events - payloads.len() as u64).min(100_000) as usize;
        for p in domain::payloads(n) {
            if buffer.capacity() - buffer.len() < p.len() {
                buffer = BytesMut::with_capacity(256 * 1024);
            }
            buffer.extend_from_slice(&p);
            payloads.push(buffer.split().freeze());
        }
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    payloads
}

/// The replay baseline: the payloads decoded into the view, one after the other.
pub fn replay(payloads: &[Bytes]) -> Result<Measurement, BoxError> {
    let events = payloads.len() as u64;
    system::reset_peak();
    let before = system::rss();
    let started = Instant::now();
    let view = fold(payloads)?;
    let elapsed = started.elapsed();
    let peak = system::peak_rss();
    let mut m = Measurement::throughput(
        "memory",
        "replay",
        format!("{events} events"),
        SUBJECT,
        Role::Baseline,
        view.events(),
        elapsed,
    );
    m.peak_rss_mib = peak.map(system::mib);
    if let (Some(b), Some(p)) = (before, peak) {
        m = m.note(format!(
            "resident memory grew {:.0} MiB during the loop",
            system::mib(p.saturating_sub(b))
        ));
    }
    Ok(m)
}

/// The aggregate-load baseline: decoding a stream's payloads from a `Vec` into the view.
pub fn load(sizes: &Sizes) -> Result<Vec<Measurement>, BoxError> {
    let mut rows = Vec::new();
    for &length in &sizes.load_lengths {
        let streams: Vec<Vec<Bytes>> = (0..sizes.loads)
            .map(|_| domain::payloads(length as usize))
            .collect();
        let mut latencies = Latencies::default();
        let started = Instant::now();
        for s in &streams {
            let t0 = Instant::now();
            let view = fold(s)?;
            latencies.record(t0.elapsed());
            std::hint::black_box(view);
        }
        rows.push(
            Measurement::throughput(
                "memory",
                "load",
                load_case(length),
                SUBJECT,
                Role::Baseline,
                sizes.loads,
                started.elapsed(),
            )
            .with_latency(&latencies)
            .latency_only(),
        );
    }
    Ok(rows)
}
