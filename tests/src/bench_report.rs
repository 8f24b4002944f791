//! Machine-readable benchmark figures, and the tables `scripts/bench.sh` renders from them.
//!
//! Every benchmark prints its human-readable text and, when `BENCH_JSON` names a file, also
//! appends one JSON object per figure to it (one per line):
//!
//! ```json
//! {"bench": "cold_start", "figure": "ours / seed", "unit": "ratio", "value": 0.84,
//!  "ours": {"name": "ours", "median": 412.0, "unit": "ms"},
//!  "baseline": {"name": "seed", "median": 490.0, "unit": "ms"},
//!  "rounds": [0.8, 0.84, 0.9], "median": 0.84, "min": 0.8, "max": 0.9,
//!  "target": "<= 0.9", "holds": true}
//! ```
//!
//! `rounds` are the per-round values (the per-round ratios for a ratio), `value` their median.
//! `target` and `holds` are absent when the figure has no target.
//!
//! Only `std` and `serde_json`: the benchmarks of the other crates include this file with
//! `#[path]`, so that every bench writes the same shape.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::Write as _;

use serde_json::{json, Value};

/// A target a figure is held to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    AtMost(f64),
    AtLeast(f64),
}

impl Target {
    pub fn holds(self, value: f64) -> bool {
        match self {
            Target::AtMost(t) => value <= t,
            Target::AtLeast(t) => value >= t,
        }
    }

    pub fn text(self) -> String {
        match self {
            Target::AtMost(t) => format!("<= {t}"),
            Target::AtLeast(t) => format!(">= {t}"),
        }
    }
}

/// The median of `v` (the upper one of an even count, as the benches print), 0 when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The `p` quantile (0..=1) of `v`, nearest rank; 0 when empty.
pub fn quantile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// A figure from per-round values (`rounds`, in `unit`), its value their median.
pub fn value(
    bench: &str,
    figure: &str,
    unit: &str,
    rounds: &[f64],
    target: Option<Target>,
) -> Value {
    let m = median(rounds);
    let mut v = json!({
        "bench": bench,
        "figure": figure,
        "unit": unit,
        "value": m,
        "rounds": rounds,
        "median": m,
        "min": if rounds.is_empty() { 0.0 } else { min(rounds) },
        "max": if rounds.is_empty() { 0.0 } else { max(rounds) },
    });
    if let Some(t) = target {
        v["target"] = json!(t.text());
        v["holds"] = json!(t.holds(m));
    }
    v
}

/// A ratio of `ours` to `baseline`, measured in the same rounds (in `unit`): the per-round
/// ratios, their median and spread, and each side's median.
pub fn ratio(
    bench: &str,
    figure: &str,
    (ours_name, ours): (&str, &[f64]),
    (baseline_name, baseline): (&str, &[f64]),
    unit: &str,
    target: Option<Target>,
) -> Value {
    let ratios: Vec<f64> = ours.iter().zip(baseline).map(|(o, b)| o / b).collect();
    let mut v = value(bench, figure, "ratio", &ratios, target);
    v["ours"] = json!({"name": ours_name, "median": median(ours), "unit": unit, "rounds": ours});
    v["baseline"] = json!({"name": baseline_name, "median": median(baseline), "unit": unit, "rounds": baseline});
    v
}

/// Appends `figure` to the file `BENCH_JSON` names (nothing when it is unset).
pub fn emit(figure: &Value) {
    let Some(path) = std::env::var_os("BENCH_JSON") else {
        return;
    };
    let mut line = figure.to_string();
    line.push('\n');
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("BENCH_JSON {}: {e}", std::path::Path::new(&path).display());
    }
}

/// The figures of a JSON-lines file (lines that are not JSON objects skipped).
pub fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(Value::is_object)
        .collect()
}

/// A number as the tables show it: three significant digits or so.
pub fn number(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else if a >= 0.001 {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}

/// The machine a run was on, as the table's header says it.
pub fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "memory_gib": (mem_kib as f64 / 1_048_576.0 * 10.0).round() / 10.0,
        "cpu": cpu,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "date": date,
    })
}

/// The whole result: the machine, how long each bench took, every figure.
pub fn results(machine: Value, runs: Vec<Value>, figures: Vec<Value>) -> Value {
    json!({"machine": machine, "runs": runs, "figures": figures})
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The Markdown of `results` (from [`results`]): the machine, then one row per figure:
/// bench, figure, median, the per-round spread, each side's median for a ratio, the target
/// and whether it holds; then how long each bench ran.
pub fn markdown(results: &Value) -> String {
    let m = &results["machine"];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Run on {} ({} CPUs of {}, {} GiB memory, Linux {}) by `scripts/bench.sh`; \
         medians of the rounds, min–max of the per-round values (per-round ratios for a ratio).",
        m["date"].as_str().unwrap_or("?"),
        m["nproc"],
        cell(m["cpu"].as_str().unwrap_or("?")),
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or("?"),
    );
    out.push('\n');
    out.push_str(
        "| bench | figure | median | spread (min–max) | rounds | compared | target | holds |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---|---|---|\n");
    let empty = Vec::new();
    for f in results["figures"].as_array().unwrap_or(&empty) {
        let unit = f["unit"].as_str().unwrap_or("");
        let with_unit = |v: f64| {
            if unit == "ratio" {
                number(v)
            } else {
                format!("{} {unit}", number(v))
            }
        };
        let num = |k: &str| f[k].as_f64().unwrap_or(0.0);
        let compared = match (f.get("ours"), f.get("baseline")) {
            (Some(o), Some(b)) => format!(
                "{} {} {} vs {} {} {}",
                cell(o["name"].as_str().unwrap_or("")),
                number(o["median"].as_f64().unwrap_or(0.0)),
                o["unit"].as_str().unwrap_or(""),
                cell(b["name"].as_str().unwrap_or("")),
                number(b["median"].as_f64().unwrap_or(0.0)),
                b["unit"].as_str().unwrap_or(""),
            ),
            _ => String::new(),
        };
        let holds = match f.get("holds").and_then(Value::as_bool) {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}–{} | {} | {} | {} | {} |",
            cell(f["bench"].as_str().unwrap_or("")),
            cell(f["figure"].as_str().unwrap_or("")),
            with_unit(num("median")),
            number(num("min")),
            number(num("max")),
            f["rounds"].as_array().map_or(0, Vec::len),
            compared,
            cell(f["target"].as_str().unwrap_or("")),
            holds,
        );
    }
    if let Some(runs) = results["runs"].as_array().filter(|r| !r.is_empty()) {
        out.push('\n');
        out.push_str("| bench | took | status |\n|---|---:|---|\n");
        for r in runs {
            let _ = writeln!(
                out,
                "| {} | {} s | {} |",
                cell(r["bench"].as_str().unwrap_or("")),
                r["seconds"].as_u64().unwrap_or(0),
                cell(r["status"].as_str().unwrap_or("")),
            );
        }
    }
    out
}

/// `text` with the part between `begin` and `end` (marker lines, kept) replaced by `body`;
/// `None` when the markers are missing.
pub fn replace_between(text: &str, begin: &str, end: &str, body: &str) -> Option<String> {
    let b = text.find(begin)? + begin.len();
    let e = b + text[b..].find(end)?;
    Some(format!(
        "{}\n{}\n{}",
        &text[..b],
        body.trim_end(),
        &text[e..]
    ))
}
