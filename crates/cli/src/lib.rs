//! The start and end of every Pollux app's `main`: tracing from `RUST_LOG` on stderr (plain
//! text unless stderr is a terminal; the filter replaceable at run time), and an error printed
//! with its `source()` chain.
//!
//! A crate of its own rather than a module of `pollux-reactor`: the libraries log through
//! `tracing` only, and choosing a subscriber is the binary's business, so
//! `tracing-subscriber` stays out of every library's dependencies.

use std::io::IsTerminal;
use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

/// The installed filter, replaceable while the app runs (`log_set_level`).
pub struct LogFilter {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

impl std::fmt::Debug for LogFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogFilter")
            .field("current", &self.current())
            .finish()
    }
}

impl LogFilter {
    /// The filter in force, as `RUST_LOG` writes it (`info`, `pollux_vhost=debug,warn`).
    pub fn current(&self) -> String {
        self.current
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Replaces the filter with `directives` (`RUST_LOG`'s syntax); an invalid one changes
    /// nothing and says why.
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
        self.handle.reload(filter).map_err(|e| e.to_string())?;
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *current = directives.to_string();
        Ok(())
    }
}

/// Replaces the filter (see [`LogFilter::set`]).
pub type SetFilterFn = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
/// The filter in force (see [`LogFilter::current`]).
pub type GetFilterFn = Box<dyn Fn() -> String + Send + Sync>;

impl LogFilter {
    /// The setter and getter as closures, for the RPC layer's log methods
    /// (`pollux_rpc::LogHooks`), which know nothing of the subscriber.
    pub fn hooks(self: &std::sync::Arc<Self>) -> (SetFilterFn, GetFilterFn) {
        let (set, get) = (self.clone(), self.clone());
        (
            Box::new(move |directives: &str| set.set(directives)),
            Box::new(move || get.current()),
        )
    }
}

/// Whether log lines carry ANSI colour codes: only on a terminal, and not with `NO_COLOR`
/// set (<https://no-color.org>), so that a log file or a pipe stays plain text.
pub fn colour_logs(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|value| value.is_empty())
}

/// Installs the global subscriber: the filter from `RUST_LOG`, else `default_filter`
/// (`"warn"`, `"info"`), written to stderr so stdout stays the app's own output, coloured
/// only on a terminal ([`colour_logs`]). Returns the handle that changes the filter later.
///
/// # Panics
///
/// When a global subscriber is already installed (call it once, first thing in `main`).
pub fn init_logging(default_filter: &str) -> LogFilter {
    let (filter, directives) = match std::env::var("RUST_LOG") {
        Ok(text) => match EnvFilter::try_new(&text) {
            Ok(filter) => (filter, text),
            Err(_) => (EnvFilter::new(default_filter), default_filter.to_string()),
        },
        Err(_) => (EnvFilter::new(default_filter), default_filter.to_string()),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = colour_logs(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt::layer().with_writer(std::io::stderr).with_ansi(ansi))
        .init();
    LogFilter {
        handle,
        current: Mutex::new(directives),
    }
}

/// `error` and each of its causes, joined by `": "` (the form every app prints on failure).
pub use pollux_env::error_chain;

#[cfg(test)]
mod tests {
    use super::{colour_logs, error_chain};
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_logs(true, None));
        assert!(
            colour_logs(true, Some(OsStr::new(""))),
            "NO_COLOR empty: unset"
        );
        assert!(!colour_logs(true, Some(OsStr::new("1"))));
        assert!(!colour_logs(false, None), "a file or a pipe");
    }

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn the_chain_joins_every_cause() {
        let error = Layer(
            "open",
            Some(Box::new(Layer(
                "map BAR 0",
                Some(Box::new(Layer("EPERM", None))),
            ))),
        );
        assert_eq!(error_chain(&error), "open: map BAR 0: EPERM");
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }
}
