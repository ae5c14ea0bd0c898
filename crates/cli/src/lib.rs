//! The start and end of every Pollux app's `main`: tracing from `RUST_LOG` on stderr, and an
//! error printed with its `source()` chain.
//!
//! A crate of its own rather than a module of `pollux-reactor`: the libraries log through
//! `tracing` only, and choosing a subscriber is the binary's business, so
//! `tracing-subscriber` stays out of every library's dependencies.

use std::io::IsTerminal;

/// When log lines carry ANSI colour codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    /// `tracing-subscriber`'s default (colour unless `NO_COLOR` is set), whatever stderr is.
    Default,
    /// Only when stderr is a terminal, so that logs captured by the VM scripts stay plain
    /// text for `grep`.
    WhenTerminal,
}

/// Installs the global subscriber: the filter from `RUST_LOG`, else `default_filter`
/// (`"warn"`, `"info"`), written to stderr so stdout stays the app's own output.
///
/// # Panics
///
/// When a global subscriber is already installed (call it once, first thing in `main`).
pub fn init_logging(default_filter: &str, colour: Colour) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match colour {
        Colour::Default => builder.init(),
        Colour::WhenTerminal => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// `error` and each of its causes, joined by `": "` (the form every app prints on failure).
pub use pollux_env::error_chain;

#[cfg(test)]
mod tests {
    use super::error_chain;

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
