//! Progress of long `fabctl` operations (volume import/export).
//!
//! On a terminal (stderr) a bar redrawn in place, at most ten times a second:
//! `import vm1 [########------------]  40%  820 MiB / 2 GiB  180 MiB/s  ETA 7 s`.
//! Otherwise (a pipe, a log file) a plain line every few seconds, and one when done:
//! `fabctl: import vm1: 512 MiB / 2 GiB (25%), 180 MiB/s, ETA 8 s`.
//! The plain interval is 5 s; `FABCTL_PROGRESS_INTERVAL` (seconds, may be fractional) changes it.
//!
//! Also here: the parser of `qemu-img convert -p` output, which is `    (12.50/100%)\r`
//! repeated on stdout.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Default time between two plain progress lines.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Time between two redraws of the terminal bar.
const BAR_INTERVAL: Duration = Duration::from_millis(100);
const BAR_WIDTH: usize = 24;

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// A bar redrawn in place (`\r`), for a terminal.
    Bar,
    /// One line every `interval`, for a pipe or a file.
    Plain,
}

/// A progress display for one operation of `total` bytes.
pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    style: Style,
    interval: Duration,
    start: Instant,
    last: Option<Instant>,
    out: Box<dyn Write + Send>,
    finished: bool,
}

impl Progress {
    /// A display on stderr: a bar if stderr is a terminal, plain lines otherwise.
    pub fn new(label: impl Into<String>, total: u64) -> Progress {
        let style = if std::io::stderr().is_terminal() {
            Style::Bar
        } else {
            Style::Plain
        };
        let interval = std::env::var("FABCTL_PROGRESS_INTERVAL")
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e6)
            .map(Duration::from_secs_f64)
            .unwrap_or(DEFAULT_INTERVAL);
        Progress::with_output(label, total, style, interval, Box::new(std::io::stderr()))
    }

    /// A display with the given style and plain-line interval, written to `out`.
    pub fn with_output(
        label: impl Into<String>,
        total: u64,
        style: Style,
        interval: Duration,
        out: Box<dyn Write + Send>,
    ) -> Progress {
        Progress {
            label: label.into(),
            total,
            done: 0,
            style,
            interval,
            start: Instant::now(),
            last: None,
            out,
            finished: false,
        }
    }

    /// Records `done` bytes and shows them when it is time to.
    pub fn set(&mut self, done: u64) {
        self.done = done.min(self.total);
        let now = Instant::now();
        let due = match (self.style, self.last) {
            (_, None) => true,
            // The last plain line is finish()'s.
            (Style::Plain, Some(_)) if self.done == self.total => false,
            (Style::Bar, Some(t)) => now.duration_since(t) >= BAR_INTERVAL,
            (Style::Plain, Some(t)) => now.duration_since(t) >= self.interval,
        };
        if due {
            self.last = Some(now);
            self.draw(false);
        }
    }

    /// Sets the fraction done (`percent` of the total, clamped to 0..=100).
    pub fn set_percent(&mut self, percent: f64) {
        let p = if percent.is_finite() {
            percent.clamp(0.0, 100.0)
        } else {
            0.0
        };
        self.set((self.total as f64 * p / 100.0) as u64);
    }

    /// Shows the final state (everything done) and returns the time taken.
    pub fn finish(&mut self) -> Duration {
        self.done = self.total;
        self.draw(true);
        self.finished = true;
        self.start.elapsed()
    }

    /// Stops showing progress without claiming completion (on an error): the bar is
    /// cleared, a plain display writes nothing more.
    pub fn abandon(&mut self) {
        if !self.finished && self.style == Style::Bar && self.last.is_some() {
            let _ = write!(self.out, "\r\x1b[2K");
            let _ = self.out.flush();
        }
        self.finished = true;
    }

    fn draw(&mut self, last: bool) {
        let elapsed = self.start.elapsed();
        let r = match self.style {
            Style::Plain => {
                let line = if last {
                    plain_done_line(&self.label, self.total, elapsed)
                } else {
                    plain_line(&self.label, self.done, self.total, elapsed)
                };
                writeln!(self.out, "{line}")
            }
            Style::Bar => {
                let line = bar_line(&self.label, self.done, self.total, elapsed);
                if last {
                    write!(self.out, "\r\x1b[2K{line}\n")
                } else {
                    write!(self.out, "\r\x1b[2K{line}")
                }
            }
        };
        // Progress is advisory: a closed stderr must not fail the operation.
        let _ = r.and_then(|_| self.out.flush());
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.abandon();
    }
}

pub fn human(bytes: u64) -> String {
    volume_mgr::api::human_bytes(bytes)
}

fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        100
    } else {
        (done as u128 * 100 / total as u128) as u64
    }
}

/// Average rate in bytes per second, None before anything measurable happened.
fn rate(done: u64, elapsed: Duration) -> Option<f64> {
    let s = elapsed.as_secs_f64();
    (s > 0.05 && done > 0).then(|| done as f64 / s)
}

/// `0.4 s`, `8.0 s`, `42 s`, `2 min 5 s`, `1 h 3 min`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=9 => format!("{:.1} s", d.as_secs_f64()),
        10..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

fn rate_str(r: Option<f64>) -> String {
    match r {
        Some(r) => format!("{}/s", human(r as u64)),
        None => "-/s".into(),
    }
}

fn eta(done: u64, total: u64, r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 1.0 => {
            let secs = (total.saturating_sub(done)) as f64 / r;
            duration(Duration::from_secs_f64(secs.min(1e9)))
        }
        _ => "?".into(),
    }
}

/// `fabctl: import vm1: 512 MiB / 2 GiB (25%), 180 MiB/s, ETA 8 s`
pub fn plain_line(label: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let r = rate(done, elapsed);
    format!(
        "fabctl: {label}: {} / {} ({}%), {}, ETA {}",
        human(done),
        human(total),
        percent(done, total),
        rate_str(r),
        eta(done, total, r)
    )
}

/// `fabctl: import vm1: 2 GiB / 2 GiB (100%), 180 MiB/s, done in 11 s`
pub fn plain_done_line(label: &str, total: u64, elapsed: Duration) -> String {
    format!(
        "fabctl: {label}: {} / {} (100%), {}, done in {}",
        human(total),
        human(total),
        rate_str((total > 0 && !elapsed.is_zero()).then(|| total as f64 / elapsed.as_secs_f64())),
        duration(elapsed)
    )
}

/// `import vm1 [#########---------------]  40%  820 MiB / 2 GiB  180 MiB/s  ETA 7 s`
pub fn bar_line(label: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let pct = percent(done, total);
    let filled = (pct as usize * BAR_WIDTH / 100).min(BAR_WIDTH);
    let r = rate(done, elapsed);
    format!(
        "{label} [{}{}] {pct:>3}%  {} / {}  {}  ETA {}",
        "#".repeat(filled),
        "-".repeat(BAR_WIDTH - filled),
        human(done),
        human(total),
        rate_str(r),
        eta(done, total, r)
    )
}

/// Incremental parser of `qemu-img convert -p` output: feed it whatever the pipe gives;
/// it returns the complete percentages seen. Anything else (garbage, partial tokens,
/// values outside 0..=100) is ignored; the buffer of an unterminated token is bounded.
#[derive(Default, Debug)]
pub struct QemuProgressParser {
    buf: Vec<u8>,
}

/// Longest unterminated token kept; a real one is about 20 bytes.
const MAX_TOKEN: usize = 256;

impl QemuProgressParser {
    /// Consumes bytes; returns the percentages completed in them, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<f64> {
        let mut seen = Vec::new();
        for &b in bytes {
            if b == b'\r' || b == b'\n' {
                if let Some(p) = parse_token(&self.buf) {
                    seen.push(p);
                }
                self.buf.clear();
            } else if self.buf.len() < MAX_TOKEN {
                self.buf.push(b);
            } else {
                // Too long to be a progress token: drop it until the next delimiter, and
                // make sure the kept prefix cannot parse.
                self.buf.clear();
                self.buf.push(0);
            }
        }
        seen
    }
}

/// `    (12.50/100%)` -> 12.5
fn parse_token(t: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(t).ok()?.trim();
    let inner = s.strip_prefix('(')?.strip_suffix("/100%)")?;
    let v: f64 = inner.trim().parse().ok()?;
    (v.is_finite() && (0.0..=100.0).contains(&v)).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn none() -> Vec<f64> {
        Vec::new()
    }

    #[test]
    fn qemu_img_progress_is_parsed() {
        let mut p = QemuProgressParser::default();
        assert_eq!(p.feed(b"    (0.00/100%)\r"), [0.0]);
        assert_eq!(
            p.feed(b"    (12.50/100%)\r    (25.00/100%)\r"),
            [12.5, 25.0]
        );
        // Split across reads.
        assert_eq!(p.feed(b"    (37.5"), none());
        assert_eq!(p.feed(b"0/100%)\r"), [37.5]);
        assert_eq!(p.feed(b"    (100.00/100%)\n"), [100.0]);
    }

    #[test]
    fn qemu_img_garbage_is_ignored() {
        let mut p = QemuProgressParser::default();
        for g in [
            &b"qemu-img: warning: something\n"[..],
            b"(abc/100%)\r",
            b"(150.00/100%)\r",
            b"(-1/100%)\r",
            b"(NaN/100%)\r",
            b"(inf/100%)\r",
            b"(50.00/200%)\r",
            b"50.00/100%)\r",
            b"\xff\xfe(\x80/100%)\r",
            b"\r\r\n\n",
            b"",
        ] {
            assert_eq!(p.feed(g), none(), "{g:?}");
        }
        // Garbage then a real token in the same read: the real one wins.
        assert_eq!(p.feed(b"junk\r    (42.00/100%)\rmore junk\r"), [42.0]);
        // An endless token is bounded and never parses, even if it ends like one.
        let mut long = vec![b'x'; 100_000];
        long.extend_from_slice(b"(10.00/100%)\r");
        assert_eq!(p.feed(&long), none());
        assert!(p.buf.len() <= MAX_TOKEN);
        assert_eq!(p.feed(b"(11.00/100%)\r"), [11.0]);
    }

    #[test]
    fn lines_read_well() {
        let s = Duration::from_secs(4);
        assert_eq!(
            plain_line("import vm1", 512 << 20, 2 << 30, s),
            "fabctl: import vm1: 512 MiB / 2 GiB (25%), 128 MiB/s, ETA 12 s"
        );
        assert_eq!(
            plain_line("export vm1", 0, 1 << 30, Duration::ZERO),
            "fabctl: export vm1: 0 B / 1 GiB (0%), -/s, ETA ?"
        );
        assert_eq!(
            plain_done_line("import vm1", 2 << 30, Duration::from_secs(16)),
            "fabctl: import vm1: 2 GiB / 2 GiB (100%), 128 MiB/s, done in 16 s"
        );
        assert_eq!(
            bar_line("import vm1", 1 << 30, 2 << 30, s),
            "import vm1 [############------------]  50%  1 GiB / 2 GiB  256 MiB/s  ETA 4.0 s"
        );
        assert_eq!(duration(Duration::from_millis(400)), "0.4 s");
        assert_eq!(duration(Duration::from_secs(42)), "42 s");
        assert_eq!(duration(Duration::from_secs(125)), "2 min 5 s");
        assert_eq!(duration(Duration::from_secs(3780)), "1 h 3 min");
        // A zero-byte total is complete, not a division by zero.
        assert_eq!(
            plain_line("x", 0, 0, s),
            "fabctl: x: 0 B / 0 B (100%), -/s, ETA ?"
        );
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plain_lines_are_rate_limited() {
        let sink = Sink::default();
        let mut p = Progress::with_output(
            "import v",
            1000,
            Style::Plain,
            Duration::from_secs(3600),
            Box::new(sink.clone()),
        );
        p.set(0);
        for i in 1..100 {
            p.set(i * 10);
        }
        p.set_percent(250.0);
        assert_eq!(p.done, 1000);
        p.finish();
        drop(p);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[0].starts_with("fabctl: import v: 0 B / 1000 B (0%)"));
        assert!(lines[1].starts_with("fabctl: import v: 1000 B / 1000 B (100%)"));

        // Interval 0: every update is a line, but 100% only once (finish's).
        let sink = Sink::default();
        let mut p = Progress::with_output(
            "export v",
            1000,
            Style::Plain,
            Duration::ZERO,
            Box::new(sink.clone()),
        );
        for d in [0, 500, 1000] {
            p.set(d);
        }
        p.finish();
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let pcts: Vec<&str> = out
            .lines()
            .map(|l| l.split(['(', ')']).nth(1).unwrap_or(""))
            .collect();
        assert_eq!(pcts, ["0%", "50%", "100%"], "{out}");
        assert!(out.lines().last().unwrap().contains("done in"), "{out}");
        assert!(!out.contains('\r'));
    }

    #[test]
    fn bar_redraws_in_place_and_clears_on_abandon() {
        let sink = Sink::default();
        let mut p = Progress::with_output(
            "export v",
            100,
            Style::Bar,
            DEFAULT_INTERVAL,
            Box::new(sink.clone()),
        );
        p.set(10);
        p.abandon();
        drop(p);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(out.starts_with("\r\x1b[2Kexport v ["), "{out:?}");
        assert!(out.ends_with("\r\x1b[2K"), "{out:?}");
        assert!(!out.contains('\n'));
    }
}
