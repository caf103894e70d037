//! Progress for people: indicatif bars on a terminal, plain log lines otherwise, nothing with
//! `--quiet`.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Reporter for one run: the overall bar and the run's lines; [`Progress::stage`] gives each
/// running stage its own reporter (several at once with `--jobs`).
pub struct Progress {
    mode: Mode,
    overall: Option<ProgressBar>,
    multi: Option<MultiProgress>,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Bars,
    Lines,
    Quiet,
}

/// What a running stage reports: its work units and what it says about itself.
pub struct StageProgress<'a> {
    run: &'a Progress,
    bar: Option<ProgressBar>,
    state: Mutex<PlainState>,
}

struct PlainState {
    label: String,
    /// What the stage says about itself now: loss, tokens/s.
    detail: String,
    len: u64,
    pos: u64,
    last: Instant,
}

const LINE_EVERY: Duration = Duration::from_secs(10);

/// The bars being drawn now, if any: log lines are printed above them, not through them.
static BARS: Mutex<Option<MultiProgress>> = Mutex::new(None);

/// Where the `tracing` subscriber writes (`RUST_LOG=info`): stderr, with the progress bars
/// cleared while a line is written and drawn again below it.
pub fn log_writer() -> LogWriter {
    LogWriter
}

/// See [`log_writer`]. The subscriber writes each event with one `write_all`.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bars = BARS.lock().ok().and_then(|b| b.clone());
        match bars {
            Some(m) => m.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl Progress {
    pub fn new(total: usize, quiet: bool) -> Progress {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bars
        } else {
            Mode::Lines
        };
        let (multi, overall) = if mode == Mode::Bars {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let bar = multi.add(ProgressBar::new(total as u64));
            bar.set_style(
                ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} instances {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix("pipeline");
            if let Ok(mut bars) = BARS.lock() {
                *bars = Some(multi.clone());
            }
            (Some(multi), Some(bar))
        } else {
            (None, None)
        };
        Progress { mode, overall, multi }
    }

    /// A silent reporter (for tests and library use).
    pub fn hidden() -> Progress {
        Progress::new(0, true)
    }

    /// A line about the run (instance started, cached, finished).
    pub fn line(&self, msg: &str) {
        match self.mode {
            Mode::Quiet => {}
            Mode::Lines => eprintln!("{msg}"),
            Mode::Bars => {
                if let Some(m) = &self.multi {
                    let _ = m.println(msg);
                }
            }
        }
    }

    pub(crate) fn instance_done(&self) {
        if let Some(b) = &self.overall {
            b.inc(1);
        }
    }

    /// The reporter of a stage starting now; its bar goes when it is dropped.
    pub fn stage(&self, label: &str) -> StageProgress<'_> {
        let bar = match (self.mode, &self.multi) {
            (Mode::Bars, Some(m)) => {
                let bar = m.add(ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg} ({elapsed}, ETA {eta})")
                        .expect("valid template")
                        .progress_chars("=> "),
                );
                bar.set_prefix("stage");
                bar.set_message(label.to_string());
                Some(bar)
            }
            _ => None,
        };
        let state =
            PlainState { label: label.to_string(), detail: String::new(), len: 0, pos: 0, last: Instant::now() };
        StageProgress { run: self, bar, state: Mutex::new(state) }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.overall {
            b.finish_and_clear();
        }
        if self.multi.is_some() {
            if let Ok(mut bars) = BARS.lock() {
                *bars = None;
            }
        }
    }
}

impl StageProgress<'_> {
    /// A line about the stage (printed above the bars).
    pub fn line(&self, msg: &str) {
        self.run.line(msg)
    }

    /// Total work units of the stage (steps, windows…).
    pub fn set_length(&self, len: u64) {
        self.state.lock().expect("progress lock").len = len;
        if let Some(bar) = &self.bar {
            bar.set_length(len);
        }
    }

    /// Work units done so far.
    pub fn set_position(&self, pos: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
        }
        let mut st = self.state.lock().expect("progress lock");
        st.pos = pos;
        if self.run.mode == Mode::Lines && st.last.elapsed() >= LINE_EVERY {
            st.last = Instant::now();
            let detail = if st.detail.is_empty() { String::new() } else { format!(" · {}", st.detail) };
            eprintln!("    {}: {}/{}{detail}", st.label, st.pos, st.len);
        }
    }

    /// What the stage reports about itself (e.g. `loss 2.31 · 5400 tok/s`), shown beside its bar
    /// and in its periodic lines.
    pub fn set_detail(&self, detail: &str) {
        let mut st = self.state.lock().expect("progress lock");
        st.detail = detail.to_string();
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{} · {detail}", st.label));
        }
    }

    pub fn inc(&self, n: u64) {
        let pos = self.state.lock().expect("progress lock").pos + n;
        self.set_position(pos);
    }
}

impl Drop for StageProgress<'_> {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
