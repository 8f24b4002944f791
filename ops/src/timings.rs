//! Per-stage timings of a start, from tracing spans.
//!
//! Each stage of a start (the IPU's fetch, verify, key release, decrypt, unpack, file system,
//! base encryption, clone and export; the host's prepare, attach, mount, boot, device attach
//! and run) runs inside a span named [`SPAN`] (target [`TARGET`]) with a `stage` field: see
//! [`span`]. A [`TimingsLayer`] installed in the process's subscriber collects, for every
//! such span when it closes, its wall time (creation to close) and its busy time: the time a
//! thread was inside it and not inside another stage span entered within it (so a stage
//! nested in another is not counted twice). [`Timings::table`] renders what was collected as
//! the `--timings` table.
//!
//! A span marked `concurrent = true` ran at the same time as other stages (a layer's reading
//! and decryption, its decompression and its unpack each run on a thread of their own, fed
//! through streams): its busy time is what the table shows, and the table says so.
//!
//! Without a [`TimingsLayer`] the spans are at DEBUG level, so ordinary logging (INFO) does
//! not carry them and costs nothing.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The name of every stage span.
pub const SPAN: &str = "stage";
/// The target of every stage span (filter on it: `RUST_LOG=stage=debug`).
pub const TARGET: &str = "stage";

/// A span for `stage` (enter it for the stage's work).
#[macro_export]
macro_rules! stage_span {
    ($stage:expr) => {
        ::tracing::debug_span!(target: "stage", "stage", stage = $stage, concurrent = false)
    };
    ($stage:expr, concurrent) => {
        ::tracing::debug_span!(target: "stage", "stage", stage = $stage, concurrent = true)
    };
}

/// A span for `stage` (enter it for the stage's work).
pub fn span(stage: &'static str) -> tracing::Span {
    stage_span!(stage)
}

/// A span for `stage` that runs interleaved with another on the same thread (entered for
/// each of its slices of work).
pub fn concurrent_span(stage: &'static str) -> tracing::Span {
    stage_span!(stage, concurrent)
}

/// Runs `f` inside a span for `stage`.
pub fn time<T>(stage: &'static str, f: impl FnOnce() -> T) -> T {
    span(stage).in_scope(f)
}

/// One closed stage span.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub stage: String,
    /// From the span's creation to its close.
    pub wall: Duration,
    /// Inside the span and not inside a stage span entered within it, summed over the
    /// threads it was entered on.
    pub busy: Duration,
    /// Interleaved with another stage on its thread.
    pub concurrent: bool,
}

/// What the layer collected; clone it to read it while the layer keeps adding.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    records: Arc<Mutex<Vec<Record>>>,
}

/// A stage's row: totals over its spans.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub stage: String,
    /// Busy time for a concurrent stage, wall time otherwise (the two are the same for a
    /// stage entered once with nothing nested).
    pub time: Duration,
    pub concurrent: bool,
    /// How many spans (a stage per layer runs once per layer).
    pub spans: usize,
}

impl Timings {
    pub fn new() -> Self {
        Self::default()
    }

    /// The layer that fills this.
    pub fn layer(&self) -> TimingsLayer {
        TimingsLayer {
            timings: self.clone(),
        }
    }

    pub fn push(&self, record: Record) {
        self.records.lock().expect("not poisoned").push(record);
    }

    /// Everything collected so far, and forgets it.
    pub fn take(&self) -> Vec<Record> {
        std::mem::take(&mut *self.records.lock().expect("not poisoned"))
    }

    /// Everything collected so far.
    pub fn records(&self) -> Vec<Record> {
        self.records.lock().expect("not poisoned").clone()
    }

    /// Per stage, in order of first appearance: the sum of its spans' busy time (concurrent
    /// stages) or wall time (the others, less the stage spans nested in them).
    pub fn rows(records: &[Record]) -> Vec<Row> {
        let mut rows: Vec<Row> = Vec::new();
        for r in records {
            let time = if r.concurrent {
                r.busy
            } else {
                r.busy.min(r.wall)
            };
            match rows.iter_mut().find(|row| row.stage == r.stage) {
                Some(row) => {
                    row.time += time;
                    row.spans += 1;
                    row.concurrent |= r.concurrent;
                }
                None => rows.push(Row {
                    stage: r.stage.clone(),
                    time,
                    concurrent: r.concurrent,
                    spans: 1,
                }),
            }
        }
        rows
    }

    /// The `--timings` table of `records` against `total` (the whole command's wall time):
    /// stage, milliseconds, share of the total.
    pub fn table(records: &[Record], total: Duration) -> String {
        let rows = Self::rows(records);
        let width = rows
            .iter()
            .map(|r| r.stage.len() + usize::from(r.concurrent))
            .chain([5])
            .max()
            .unwrap_or(5);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<width$}  {:>10}  {:>6}",
            "stage", "wall ms", "share"
        );
        let share = |d: Duration| {
            if total.is_zero() {
                0.0
            } else {
                100.0 * d.as_secs_f64() / total.as_secs_f64()
            }
        };
        for r in &rows {
            let name = if r.concurrent {
                format!("{}*", r.stage)
            } else {
                r.stage.clone()
            };
            let _ = writeln!(
                out,
                "{name:<width$}  {:>10.1}  {:>5.1}%",
                r.time.as_secs_f64() * 1e3,
                share(r.time)
            );
        }
        let _ = writeln!(
            out,
            "{:<width$}  {:>10.1}  {:>5.1}%",
            "total",
            total.as_secs_f64() * 1e3,
            100.0
        );
        if rows.iter().any(|r| r.concurrent) {
            let _ = writeln!(
                out,
                "* busy time: these stages run at the same time, on threads of their own fed \
                 through streams, so these are the times measured inside each (waiting for \
                 the stage before included), not separate wall-clock phases"
            );
        }
        out
    }
}

/// Collects closed stage spans into its [`Timings`].
pub struct TimingsLayer {
    timings: Timings,
}

/// A stage span's clock, in its extensions.
struct Clock {
    stage: String,
    concurrent: bool,
    created: Instant,
    busy: Duration,
    /// The threads it is running on (entered and innermost there), since when: a span may
    /// be entered on several threads (a client that carries the caller's span to its own).
    running: Vec<(ThreadId, Instant)>,
}

impl Clock {
    fn resume(&mut self, now: Instant) {
        let me = std::thread::current().id();
        if !self.running.iter().any(|(t, _)| *t == me) {
            self.running.push((me, now));
        }
    }

    fn pause(&mut self, now: Instant) {
        let me = std::thread::current().id();
        if let Some(at) = self.running.iter().position(|(t, _)| *t == me) {
            let (_, since) = self.running.swap_remove(at);
            self.busy += now - since;
        }
    }
}

thread_local! {
    /// The stage spans entered on this thread, innermost last.
    static ENTERED: RefCell<Vec<Id>> = const { RefCell::new(Vec::new()) };
}

#[derive(Default)]
struct Fields {
    stage: Option<String>,
    concurrent: bool,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "stage" {
            self.stage = Some(value.to_string());
        }
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        if field.name() == "concurrent" {
            self.concurrent = value;
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "stage" {
            self.stage = Some(format!("{value:?}").trim_matches('"').to_string());
        }
    }
}

impl<S> Layer<S> for TimingsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != SPAN || attrs.metadata().target() != TARGET {
            return;
        }
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let (Some(stage), Some(span)) = (fields.stage, ctx.span(id)) else {
            return;
        };
        span.extensions_mut().insert(Clock {
            stage,
            concurrent: fields.concurrent,
            created: Instant::now(),
            busy: Duration::ZERO,
            running: Vec::new(),
        });
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        if span.extensions().get::<Clock>().is_none() {
            return;
        }
        let now = Instant::now();
        ENTERED.with(|entered| {
            let mut entered = entered.borrow_mut();
            if let Some(outer) = entered.last().and_then(|o| ctx.span(o)) {
                let mut ext = outer.extensions_mut();
                if let Some(clock) = ext.get_mut::<Clock>() {
                    clock.pause(now);
                }
            }
            entered.push(id.clone());
        });
        let mut ext = span.extensions_mut();
        if let Some(clock) = ext.get_mut::<Clock>() {
            clock.resume(now);
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let now = Instant::now();
        {
            let mut ext = span.extensions_mut();
            let Some(clock) = ext.get_mut::<Clock>() else {
                return;
            };
            clock.pause(now);
        }
        ENTERED.with(|entered| {
            let mut entered = entered.borrow_mut();
            let Some(at) = entered.iter().rposition(|e| e == id) else {
                return;
            };
            entered.remove(at);
            // The innermost one left: the one around it runs again.
            if at == entered.len() {
                if let Some(outer) = entered.last().and_then(|o| ctx.span(o)) {
                    let mut ext = outer.extensions_mut();
                    if let Some(clock) = ext.get_mut::<Clock>() {
                        clock.resume(now);
                    }
                }
            }
        });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(clock) = span.extensions_mut().remove::<Clock>() else {
            return;
        };
        self.timings.push(Record {
            stage: clock.stage,
            wall: clock.created.elapsed(),
            busy: clock.busy,
            concurrent: clock.concurrent,
        });
    }
}

/// Whether `metadata` is a stage span's: the only callsites a [`TimingsLayer`] needs (as its
/// per-layer filter, it leaves every other span and event disabled unless another layer wants
/// them).
pub fn is_stage(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.target() == TARGET && metadata.name() == SPAN
}

impl TimingsLayer {
    /// This layer with [`is_stage`] as its per-layer filter.
    pub fn filtered<S>(self) -> impl Layer<S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        self.with_filter(tracing_subscriber::filter::filter_fn(is_stage))
    }
}

/// Installs a global subscriber that only collects stage timings (for a process that logs
/// nothing else through tracing); `None` when one is installed already.
pub fn install() -> Option<Timings> {
    use tracing_subscriber::layer::SubscriberExt;
    let timings = Timings::new();
    let subscriber = tracing_subscriber::registry().with(timings.layer().filtered());
    tracing::subscriber::set_global_default(subscriber)
        .ok()
        .map(|()| timings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_table_shows_every_stage_its_share_and_the_total() {
        let records = vec![
            Record {
                stage: "verify".into(),
                wall: ms(10),
                busy: ms(10),
                concurrent: false,
            },
            Record {
                stage: "decrypt".into(),
                wall: ms(80),
                busy: ms(30),
                concurrent: true,
            },
            Record {
                stage: "unpack".into(),
                wall: ms(80),
                busy: ms(50),
                concurrent: true,
            },
            Record {
                stage: "decrypt".into(),
                wall: ms(20),
                busy: ms(10),
                concurrent: true,
            },
        ];
        let t = Timings::table(&records, ms(200));
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("stage") && lines[0].contains("wall ms"),
            "{t}"
        );
        assert!(
            lines[1].starts_with("verify ")
                && lines[1].contains("10.0")
                && lines[1].ends_with("5.0%"),
            "{t}"
        );
        // Two layers' decryption summed, busy time.
        assert!(
            lines[2].starts_with("decrypt*")
                && lines[2].contains("40.0")
                && lines[2].ends_with("20.0%"),
            "{t}"
        );
        assert!(
            lines[3].starts_with("unpack*") && lines[3].ends_with("25.0%"),
            "{t}"
        );
        assert!(
            lines[4].starts_with("total") && lines[4].contains("200.0"),
            "{t}"
        );
        assert!(lines[5].starts_with("* busy time"), "{t}");
        let rows = Timings::rows(&records);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].spans, 2);
        // No concurrent stage: no note.
        assert!(!Timings::table(&records[..1], ms(10)).contains('*'));
        // A zero total does not divide by zero.
        assert!(Timings::table(&records, Duration::ZERO).contains("0.0%"));
    }

    #[test]
    fn the_layer_collects_stages_and_a_nested_stage_is_not_counted_twice() {
        let timings = Timings::new();
        let subscriber = tracing_subscriber::registry().with(timings.layer());
        tracing::subscriber::with_default(subscriber, || {
            time("verify", || std::thread::sleep(ms(20)));
            let unpack = concurrent_span("unpack");
            let decrypt = concurrent_span("decrypt");
            unpack.in_scope(|| {
                for _ in 0..3 {
                    decrypt.in_scope(|| std::thread::sleep(ms(10)));
                    std::thread::sleep(ms(5));
                }
            });
            drop((unpack, decrypt));
            // Not a stage span: ignored.
            tracing::debug_span!("other").in_scope(|| ());
        });
        let records = timings.records();
        let stages: Vec<&str> = records.iter().map(|r| r.stage.as_str()).collect();
        assert_eq!(stages, ["verify", "unpack", "decrypt"]);
        let by = |s: &str| records.iter().find(|r| r.stage == s).unwrap();
        assert!(by("verify").busy >= ms(20));
        assert!(!by("verify").concurrent && by("unpack").concurrent);
        assert!(by("decrypt").busy >= ms(30));
        // The unpacker's own time excludes the reads that decrypted.
        assert!(by("unpack").busy >= ms(15), "{:?}", by("unpack"));
        assert!(by("unpack").busy < ms(30), "{:?}", by("unpack"));
        assert!(by("unpack").wall >= ms(45));
        assert_eq!(timings.take().len(), 3);
        // A span carried to another thread (a client's worker) and entered there too: its
        // time on the first thread is still counted.
        let subscriber = tracing_subscriber::registry().with(timings.layer());
        tracing::subscriber::with_default(subscriber, || {
            let release = span("key_release");
            release.in_scope(|| {
                let carried = release.clone();
                std::thread::spawn(move || carried.in_scope(|| std::thread::sleep(ms(5))))
                    .join()
                    .unwrap();
                std::thread::sleep(ms(20));
            });
        });
        let records = timings.take();
        assert_eq!(records.len(), 1);
        assert!(records[0].busy >= ms(25), "{records:?}");
        let rows = Timings::rows(&records);
        assert!(rows[0].time <= records[0].wall, "{rows:?}");
        assert!(timings.records().is_empty());
    }
}
