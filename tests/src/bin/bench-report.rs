//! `bench-report FIGURES RUNS OUT_DIR [README]`: the figures the benchmarks appended to
//! FIGURES (`BENCH_JSON`, one JSON object per line) and the benches' run times in RUNS (one
//! `{"bench", "seconds", "status"}` per line), written as `OUT_DIR/results.json` and
//! `OUT_DIR/results.md`, with the machine they ran on; with README, its section between
//! `<!-- bench:begin -->` and `<!-- bench:end -->` replaced by the table. Run by
//! `scripts/bench.sh`.

use std::path::Path;
use std::process::ExitCode;

use integration_tests::bench_report::{machine, markdown, parse_lines, replace_between, results};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(3..=4).contains(&args.len()) {
        eprintln!("usage: bench-report FIGURES RUNS OUT_DIR [README]");
        return ExitCode::from(2);
    }
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let all = results(
        machine(),
        parse_lines(&read(&args[1])),
        parse_lines(&read(&args[0])),
    );
    let out = Path::new(&args[2]);
    let md = markdown(&all);
    let written = std::fs::create_dir_all(out)
        .and_then(|()| {
            std::fs::write(
                out.join("results.json"),
                serde_json::to_string_pretty(&all).expect("JSON") + "\n",
            )
        })
        .and_then(|()| std::fs::write(out.join("results.md"), &md));
    if let Err(e) = written {
        eprintln!("bench-report: {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    print!("{md}");
    if let Some(readme) = args.get(3) {
        let text = read(readme);
        match replace_between(&text, "<!-- bench:begin -->", "<!-- bench:end -->", &md) {
            Some(new) => {
                if let Err(e) = std::fs::write(readme, new) {
                    eprintln!("bench-report: {readme}: {e}");
                    return ExitCode::FAILURE;
                }
            }
            None => eprintln!("bench-report: {readme} has no bench markers; not updated"),
        }
    }
    ExitCode::SUCCESS
}
