//! Unit tests of `bench_report` (here, not in that file: the other crates' benches include it
//! with `#[path]`).
use crate::bench_report::*;
use serde_json::json;

#[test]
fn a_ratio_is_per_round_with_its_spread_and_target() {
    let f = ratio(
        "cold_start",
        "ours / seed",
        ("ours", &[100.0, 90.0, 120.0]),
        ("seed", &[100.0, 100.0, 100.0]),
        "ms",
        Some(Target::AtMost(0.9)),
    );
    assert_eq!(f["rounds"], json!([1.0, 0.9, 1.2]));
    assert_eq!(f["median"], json!(1.0));
    assert_eq!(f["value"], json!(1.0));
    assert_eq!(f["min"], json!(0.9));
    assert_eq!(f["max"], json!(1.2));
    assert_eq!(f["unit"], "ratio");
    assert_eq!(f["target"], "<= 0.9");
    assert_eq!(f["holds"], false);
    assert_eq!(f["ours"]["median"], json!(100.0));
    assert_eq!(f["baseline"]["name"], "seed");
    let v = value(
        "decrypt",
        "rate",
        "MB/s",
        &[3.0, 1.0, 2.0],
        Some(Target::AtLeast(2.0)),
    );
    assert_eq!(v["median"], json!(2.0));
    assert_eq!(v["holds"], true);
    assert!(value("x", "y", "ms", &[1.0], None).get("target").is_none());
}

#[test]
fn figures_round_trip_through_json_lines() {
    let a = value("a", "one", "ms", &[1.0, 2.0], None);
    let b = ratio("b", "two", ("x", &[2.0]), ("y", &[4.0]), "s", None);
    let text = format!("{a}\nnot json\n\n{b}\n[1]\n");
    let parsed = parse_lines(&text);
    assert_eq!(parsed, vec![a, b]);
}

#[test]
fn the_markdown_table_has_the_machine_every_figure_and_the_runs() {
    let machine = json!({"nproc": 2, "memory_gib": 23.4, "cpu": "Some CPU | x", "kernel": "6.1.0", "date": "2026-12-05 11:20 UTC"});
    let figures = vec![
        ratio(
            "cold_start",
            "ours / seed",
            ("ours", &[90.0, 80.0]),
            ("seed", &[100.0, 100.0]),
            "ms",
            Some(Target::AtMost(0.9)),
        ),
        value("warm_start", "p50", "ms", &[12.345], None),
        ratio(
            "containerd_pull",
            "hook / plain",
            ("hook", &[150.0]),
            ("plain", &[100.0]),
            "ms",
            Some(Target::AtMost(1.2)),
        ),
    ];
    let runs = vec![json!({"bench": "cold_start", "seconds": 42, "status": "ok"})];
    let md = markdown(&results(machine, runs, figures));
    let lines: Vec<&str> = md.lines().collect();
    assert!(
        lines[0].contains("2 CPUs of Some CPU \\| x, 23.4 GiB memory, Linux 6.1.0"),
        "{md}"
    );
    assert!(lines[0].contains("2026-12-05 11:20 UTC"), "{md}");
    assert!(lines[2].starts_with("| bench | figure | median |"), "{md}");
    assert_eq!(lines[4], "| cold_start | ours / seed | 0.90 | 0.80–0.90 | 2 | ours 90.0 ms vs seed 100 ms | <= 0.9 | yes |", "{md}");
    assert_eq!(
        lines[5], "| warm_start | p50 | 12.3 ms | 12.3–12.3 | 1 |  |  |  |",
        "{md}"
    );
    assert!(lines[6].ends_with("| <= 1.2 | **no** |"), "{md}");
    assert!(md.contains("| cold_start | 42 s | ok |"), "{md}");
}

#[test]
fn the_readme_section_is_replaced_between_its_markers() {
    let text = "# A\n<!-- bench:begin -->\nold\ntable\n<!-- bench:end -->\nrest\n";
    let new = replace_between(text, "<!-- bench:begin -->", "<!-- bench:end -->", "new\n").unwrap();
    assert_eq!(
        new,
        "# A\n<!-- bench:begin -->\nnew\n<!-- bench:end -->\nrest\n"
    );
    assert!(replace_between("no markers", "<a>", "<b>", "x").is_none());
}

#[test]
fn numbers_keep_about_three_digits() {
    assert_eq!(number(1234.6), "1235");
    assert_eq!(number(12.345), "12.3");
    assert_eq!(number(1.2345), "1.23");
    assert_eq!(number(0.01234), "0.012");
    assert_eq!(number(0.0), "0");
    assert_eq!(number(0.000107), "1.1e-4");
}
