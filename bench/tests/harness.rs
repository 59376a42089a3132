//! The harness itself, run end to end on `memory://` with tiny sizes: every workload yields
//! its rows, ratios and targets are filled in, and the three files are written. No timing is
//! asserted here; speed is only ever reported.

use std::path::{Path, PathBuf};

use clap::Parser;
use photon_bench::measure::Role;
use photon_bench::{run, Options};

fn options(out: &Path, extra: &[&str]) -> Options {
    let mut args = vec![
        "photon-bench",
        "--append-events",
        "400",
        "--replay-events",
        "3000",
        "--loads",
        "3",
        "--load-lengths",
        "10,200",
        "--live-events",
        "20",
        "--commands",
        "320",
        "--command-lengths",
        "10,200",
        "--command-streams",
        "3",
        "--stream-commands",
        "30",
        "--quiet",
        "--out",
        out.to_str().expect("a UTF-8 path"),
    ];
    args.extend_from_slice(extra);
    Options::parse_from(args)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "photon-bench-{name}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_reports_photon_beside_its_baseline() {
    let out = scratch("all");
    let report = run(&options(&out, &[])).await.expect("the run succeeds");
    let rows = &report.measurements;
    let find = |workload: &str, role: Role| {
        rows.iter()
            .filter(|m| m.workload == workload && m.role == role)
            .count()
    };
    // Four append cases; loads per length for photon and the bare loop; one replay each.
    assert_eq!(find("append", Role::Photon), 4);
    assert_eq!(find("load", Role::Photon), 2);
    assert_eq!(find("load", Role::Baseline), 2);
    assert_eq!(find("replay", Role::Photon), 1);
    assert_eq!(find("replay", Role::Baseline), 1);
    assert_eq!(find("isolation", Role::Photon), 1);
    assert_eq!(find("live", Role::Photon), 1);
    // Short streams from 1 and 16 clients; streams of each command length, newton also
    // without its cache (a reference row).
    assert_eq!(find("commands", Role::Photon), 4);
    assert_eq!(find("commands", Role::Baseline), 4);
    assert_eq!(find("commands", Role::Reference), 2);
    assert!(rows
        .iter()
        .any(|m| m.workload == "commands" && m.case == "1 client, 200-event streams"));

    let replay = rows
        .iter()
        .find(|m| m.workload == "replay" && m.role == Role::Photon)
        .expect("a replay row");
    assert_eq!(replay.count, 3000, "every written event is replayed");
    assert!(
        replay.ratio.is_some(),
        "the replay is compared with the bare loop"
    );
    let live = rows
        .iter()
        .find(|m| m.workload == "live")
        .expect("a live row");
    assert_eq!(live.count, 20);
    assert!(live.p50_us.is_some() && live.p99_us.is_some());
    for m in rows
        .iter()
        .filter(|m| m.workload == "commands" && m.role == Role::Photon)
    {
        assert!(m.ratio.is_some(), "newton is compared with cqrs-es: {m:?}");
    }
    assert!(
        report.targets.iter().any(|t| t.target.contains("cqrs-es")),
        "{:?}",
        report.targets
    );
    assert!(
        report.targets.iter().any(|t| t
            .target
            .contains("within 2x of each other across stream lengths")),
        "{:?}",
        report.targets
    );

    let md = std::fs::read_to_string(out.join("RESULTS.md")).expect("RESULTS.md");
    assert!(
        md.contains("## memory") && md.contains("## Targets"),
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).expect("results.json"))
            .expect("valid JSON");
    assert_eq!(
        json["measurements"].as_array().map(Vec::len),
        Some(rows.len())
    );
    let svg = std::fs::read_to_string(out.join("chart.svg")).expect("chart.svg");
    assert!(
        svg.starts_with("<svg") && svg.contains("memory · replay"),
        "{svg}"
    );
    std::fs::remove_dir_all(out).ok();
}

#[tokio::test]
async fn an_unreachable_or_unknown_store_is_an_error_naming_its_url() {
    let out = scratch("bad");
    let e = run(&options(&out, &["--url", "nosuch://somewhere"]))
        .await
        .expect_err("an unknown scheme fails");
    assert!(e.to_string().contains("nosuch://"), "{e}");
    assert!(
        !out.join("RESULTS.md").exists(),
        "nothing is written for a failed run"
    );
    std::fs::remove_dir_all(out).ok();
}

#[tokio::test]
async fn the_duration_cap_stops_a_phase_and_says_so() {
    let out = scratch("cap");
    let report = run(&options(
        &out,
        &[
            "--workloads",
            "append",
            "--append-events",
            "20000",
            "--max-seconds",
            "0",
        ],
    ))
    .await
    .expect("the run succeeds");
    assert!(
        report.measurements.iter().all(|m| m.capped),
        "{:?}",
        report.measurements
    );
    let md = std::fs::read_to_string(out.join("RESULTS.md")).expect("RESULTS.md");
    assert!(md.contains("stopped by the duration cap"), "{md}");
    std::fs::remove_dir_all(out).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_run_merges_into_the_report_and_a_bad_one_is_refused() {
    let first = scratch("first");
    run(&options(&first, &["--workloads", "commands"]))
        .await
        .expect("the first run succeeds");
    let second = scratch("second");
    let earlier = first.join("results.json");
    let report = run(&options(
        &second,
        &[
            "--workloads",
            "live",
            "--merge",
            earlier.to_str().expect("UTF-8"),
        ],
    ))
    .await
    .expect("the second run succeeds");
    let workloads: Vec<&str> = report
        .measurements
        .iter()
        .map(|m| m.workload.as_str())
        .collect();
    assert!(
        workloads.contains(&"commands") && workloads.contains(&"live"),
        "{workloads:?}"
    );
    assert_eq!(report.commands.len(), 2);
    // Measuring a merged workload again replaces its rows instead of adding a second set.
    let third = scratch("third");
    let again = run(&options(
        &third,
        &[
            "--workloads",
            "commands",
            "--merge",
            second.join("results.json").to_str().expect("UTF-8"),
        ],
    ))
    .await
    .expect("the third run succeeds");
    let commands = again
        .measurements
        .iter()
        .filter(|m| m.workload == "commands")
        .count();
    assert_eq!(
        commands, 10,
        "four cases, newton and cqrs-es each, and two rows of newton without its cache, once"
    );
    assert!(again.measurements.iter().any(|m| m.workload == "live"));
    std::fs::remove_dir_all(third).ok();
    assert!(
        report
            .measurements
            .iter()
            .any(|m| m.workload == "commands" && m.ratio.is_some()),
        "ratios are worked out again over the merged rows"
    );

    let garbage = second.join("garbage.json");
    std::fs::write(&garbage, b"{ not json").expect("written");
    let e = run(&options(
        &second,
        &["--merge", garbage.to_str().expect("UTF-8")],
    ))
    .await
    .expect_err("garbage is refused");
    assert!(e.to_string().contains("not a results.json"), "{e}");
    let e = run(&options(&second, &["--merge", "/nonexistent/results.json"]))
        .await
        .expect_err("a missing file is refused");
    assert!(e.to_string().contains("/nonexistent/results.json"), "{e}");
    std::fs::remove_dir_all(first).ok();
    std::fs::remove_dir_all(second).ok();
}
