//! Pollux reactor framework (in progress).
