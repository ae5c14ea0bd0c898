//! The filter `init_logging` installs is replaced at run time (`log_set_level`), and a bad
//! one changes nothing. A process of its own: it installs the global subscriber.

#[test]
fn the_filter_is_replaced_while_running_and_a_bad_one_is_refused() {
    let filter = pollux_cli::init_logging("warn");
    filter.set("warn").expect("warn");
    assert!(!tracing::enabled!(tracing::Level::INFO));
    assert!(tracing::enabled!(tracing::Level::WARN));
    filter.set("debug").expect("debug");
    assert!(tracing::enabled!(tracing::Level::DEBUG));
    assert_eq!(filter.current(), "debug");
    let error = filter.set("x=loud").expect_err("not a level");
    assert!(!error.is_empty());
    assert_eq!(filter.current(), "debug", "unchanged");
    assert!(tracing::enabled!(tracing::Level::DEBUG));
    filter.set("error").expect("error");
    assert!(!tracing::enabled!(tracing::Level::WARN));
}
