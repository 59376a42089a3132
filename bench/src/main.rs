//! The `photon-bench` command: see the library's documentation and `bench/README.md`.

use clap::Parser;
use photon_bench::{report, run, BoxError, Options};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let o = Options::parse();
    let report = run(&o).await?;
    println!();
    print!("{}", report::markdown(&report, None));
    println!(
        "(written to {}: RESULTS.md, results.json, chart.svg)",
        o.out.display()
    );
    Ok(())
}
