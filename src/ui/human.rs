//! Output for people: every line prefixed with its build's name in the
//! build's own colour, so parallel builds stay readable; progress bars on a
//! terminal, occasional progress lines otherwise.

use super::Verbosity;
use anstyle::{AnsiColor, Color, Style};
use imgbuild_core::events::{BuildStatus, ProgressUnit};
use imgbuild_core::{Event, EventSink, Level, Stream};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PALETTE: [AnsiColor; 6] = [
    AnsiColor::Cyan,
    AnsiColor::Magenta,
    AnsiColor::Blue,
    AnsiColor::Green,
    AnsiColor::Yellow,
    AnsiColor::BrightCyan,
];

struct State {
    colours: HashMap<String, Style>,
    width: usize,
    bars: HashMap<(String, String), ProgressBar>,
    /// Without a terminal: when each task last printed a progress line.
    last_progress: HashMap<(String, String), (Instant, u64)>,
}

pub struct HumanSink {
    stream: Mutex<anstream::AutoStream<std::io::Stderr>>,
    progress: Option<MultiProgress>,
    verbosity: Verbosity,
    colour: bool,
    state: Mutex<State>,
}

impl HumanSink {
    pub fn new(color: anstream::ColorChoice, verbosity: Verbosity, builds: &[String]) -> Self {
        let stream = anstream::AutoStream::new(std::io::stderr(), color);
        let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let progress =
            interactive.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let colours = builds
            .iter()
            .enumerate()
            .map(|(i, name)| {
                (
                    name.clone(),
                    Style::new()
                        .fg_color(Some(Color::Ansi(PALETTE[i % PALETTE.len()])))
                        .bold(),
                )
            })
            .collect();
        let width = builds.iter().map(String::len).max().unwrap_or(0);
        let colour = stream.current_choice() != anstream::ColorChoice::Never;
        HumanSink {
            colour,
            stream: Mutex::new(stream),
            progress,
            verbosity,
            state: Mutex::new(State {
                colours,
                width,
                bars: HashMap::new(),
                last_progress: HashMap::new(),
            }),
        }
    }

    fn prefix(&self, state: &State, build: Option<&str>) -> String {
        match build {
            Some(build) if !build.is_empty() => {
                let style = state
                    .colours
                    .get(build)
                    .copied()
                    .unwrap_or_else(|| Style::new().bold());
                format!("{style}{build:>width$}{style:#} | ", width = state.width)
            }
            _ => String::new(),
        }
    }

    fn print(&self, line: String) {
        match &self.progress {
            // Printing through the progress bars keeps them from tearing.
            Some(progress) => {
                let text = if self.colour {
                    line
                } else {
                    anstream::adapter::strip_str(&line).to_string()
                };
                let _ = progress.println(text);
            }
            None => {
                let mut stream = self.stream.lock().expect("stderr lock poisoned");
                let _ = writeln!(stream, "{line}");
            }
        }
    }
}

const DIM: Style = Style::new().dimmed();
const BOLD: Style = Style::new().bold();
const WARN: Style = Style::new()
    .fg_color(Some(Color::Ansi(AnsiColor::Yellow)))
    .bold();
const ERROR: Style = Style::new()
    .fg_color(Some(Color::Ansi(AnsiColor::Red)))
    .bold();
const OK: Style = Style::new()
    .fg_color(Some(Color::Ansi(AnsiColor::Green)))
    .bold();

impl EventSink for HumanSink {
    fn emit(&self, event: &Event) {
        let mut state = self.state.lock().expect("ui lock poisoned");
        let prefix = self.prefix(&state, event.build());
        let quiet = self.verbosity == Verbosity::Quiet;
        let line = match event {
            Event::RunStarted { run_id, builds } => {
                if quiet {
                    return;
                }
                format!(
                    "{BOLD}imgbuild{BOLD:#} run {run_id}: building {}",
                    builds.join(", ")
                )
            }
            Event::BuildStarted { builder, .. } => {
                if quiet {
                    return;
                }
                format!("{prefix}{BOLD}==> starting {builder} build{BOLD:#}")
            }
            Event::StepStarted { step, .. } => {
                if quiet {
                    return;
                }
                format!("{prefix}{BOLD}==> {step}{BOLD:#}")
            }
            Event::StepFinished {
                step, duration_ms, ..
            } => {
                if self.verbosity < Verbosity::Verbose {
                    return;
                }
                format!(
                    "{prefix}{DIM}    {step} took {:.1}s{DIM:#}",
                    *duration_ms as f64 / 1000.0
                )
            }
            Event::Message { level, message, .. } => match level {
                Level::Info if quiet => return,
                Level::Info => format!("{prefix}    {message}"),
                Level::Warn => format!("{prefix}{WARN}warning:{WARN:#} {message}"),
                Level::Error => format!("{prefix}{ERROR}error:{ERROR:#} {message}"),
            },
            Event::Output { stream, line, .. } => {
                if quiet {
                    return;
                }
                match stream {
                    Stream::Stdout => format!("{prefix}    {DIM}>{DIM:#} {line}"),
                    Stream::Stderr => format!("{prefix}    {DIM}!{DIM:#} {line}"),
                }
            }
            Event::Progress { .. } => {
                self.progress_event(&mut state, event, &prefix);
                return;
            }
            Event::CleanupFailed { step, error, .. } => {
                format!("{prefix}{ERROR}cleanup of {step} failed:{ERROR:#} {error}")
            }
            Event::TestStarted {
                name, index, total, ..
            } => {
                if quiet {
                    return;
                }
                format!("{prefix}{BOLD}==> test {index} of {total}: {name}{BOLD:#}")
            }
            Event::TestFinished {
                name,
                passed,
                exit_code,
                duration_ms,
                attempts,
                output_tail,
                error,
                ..
            } => {
                let secs = *duration_ms as f64 / 1000.0;
                let tries = if *attempts > 1 {
                    format!(" after {attempts} attempts")
                } else {
                    String::new()
                };
                if *passed {
                    if quiet {
                        return;
                    }
                    format!("{prefix}    {OK}test passed:{OK:#} {name} ({secs:.1}s{tries})")
                } else {
                    // Always shown, even with -q: it is why the build fails.
                    // The error names the command; the exit code and the
                    // tail are repeated on their own lines to be found.
                    let code = match exit_code {
                        Some(code) => format!("exit code {code}"),
                        None => "no exit code".to_owned(),
                    };
                    let mut text = format!(
                        "{prefix}{ERROR}test failed:{ERROR:#} {name} ({code}, {secs:.1}s{tries})"
                    );
                    // With an exit code, the error only names the uploaded
                    // temporary script; the build's summary names the test's
                    // own commands. Without one (a timeout, a lost
                    // connection), the error is the reason.
                    if let (None, Some(error)) = (exit_code, error) {
                        let first = error.lines().next().unwrap_or_default();
                        text.push_str(&format!("\n{prefix}    {first}"));
                    }
                    for line in output_tail {
                        text.push_str(&format!("\n{prefix}    {DIM}|{DIM:#} {line}"));
                    }
                    text
                }
            }
            Event::Artifact { .. } => return,
            Event::StepsCached { steps, key, .. } => {
                if quiet {
                    return;
                }
                format!(
                    "{prefix}    {OK}cached:{OK:#} the first {steps} provisioner(s) from the step cache ({})",
                    &key[..key.len().min(12)]
                )
            }
            Event::MachineReady {
                restored, millis, ..
            } => {
                if quiet {
                    return;
                }
                let how = if *restored {
                    "restored from a saved state"
                } else {
                    "booted"
                };
                format!(
                    "{prefix}    machine {how}, SSH after {:.1}s",
                    *millis as f64 / 1000.0
                )
            }
            Event::BuildSkipped {
                version,
                artifact_id,
                ..
            } => format!(
                "{prefix}{OK}unchanged{OK:#}: same inputs as version {version} ({artifact_id}), which stands; nothing was built"
            ),
            Event::BuildFinished {
                status,
                duration_ms,
                error,
                ..
            } => {
                let secs = *duration_ms as f64 / 1000.0;
                match status {
                    BuildStatus::Succeeded => {
                        format!("{prefix}{OK}build finished{OK:#} in {secs:.1}s")
                    }
                    BuildStatus::Cancelled => format!(
                        "{prefix}{WARN}build cancelled{WARN:#} after {secs:.1}s; everything it created was cleaned up"
                    ),
                    BuildStatus::Failed => format!(
                        "{prefix}{ERROR}build failed{ERROR:#} after {secs:.1}s: {}",
                        error.as_deref().unwrap_or("unknown error")
                    ),
                }
            }
            Event::RunFinished { .. } => return,
        };
        drop(state);
        self.print(line);
    }
}

impl HumanSink {
    fn progress_event(&self, state: &mut State, event: &Event, prefix: &str) {
        let &Event::Progress {
            ref build,
            ref task,
            done,
            total,
            unit,
        } = event
        else {
            return;
        };
        if self.verbosity == Verbosity::Quiet {
            return;
        }
        let key = (build.to_owned(), task.to_owned());
        let finished = total.is_some_and(|t| done >= t);
        if let Some(progress) = &self.progress {
            let bar = state.bars.entry(key.clone()).or_insert_with(|| {
                let bar = match total {
                    Some(total) => ProgressBar::new(total),
                    None => ProgressBar::new_spinner(),
                };
                let amount = match unit {
                    ProgressUnit::Percent => "{pos}%",
                    ProgressUnit::Bytes => "{bytes}/{total_bytes} {bytes_per_sec}",
                };
                let template = format!("{prefix}    {{msg}} [{{bar:30}}] {amount} ({{eta}})");
                bar.set_style(
                    ProgressStyle::with_template(&template)
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                bar.set_message(task.to_owned());
                progress.add(bar)
            });
            bar.set_position(done);
            if finished {
                bar.finish_and_clear();
                state.bars.remove(&key);
            }
            return;
        }
        // No terminal (CI logs): a line at most every 10 s, and at the end.
        let now = Instant::now();
        let entry = state
            .last_progress
            .entry(key.clone())
            .or_insert((now - Duration::from_secs(3600), u64::MAX));
        if (now.duration_since(entry.0) >= Duration::from_secs(10) && entry.1 != done) || finished {
            *entry = (now, done);
            let amount = match (unit, total) {
                (ProgressUnit::Percent, _) => format!("{done}%"),
                (ProgressUnit::Bytes, Some(total)) => {
                    format!("{} of {}", human_bytes(done), human_bytes(total))
                }
                (ProgressUnit::Bytes, None) => human_bytes(done),
            };
            let line = format!("{prefix}    {task}: {amount}");
            let mut stream = self.stream.lock().expect("stderr lock poisoned");
            let _ = writeln!(stream, "{line}");
        }
        if finished {
            state.last_progress.remove(&key);
        }
    }
}

fn human_bytes(bytes: u64) -> String {
    imgbuild_provisioners::file::human_bytes(bytes)
}
