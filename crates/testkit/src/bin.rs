//! The workspace's binaries, for tests in crates that cannot name them with
//! `env!("CARGO_BIN_EXE_...")` (that works only for a binary of the test's own package).

use std::path::PathBuf;

/// The environment variable that overrides where `name` is: `pollux-vhost` -> `POLLUX_VHOST`.
pub fn override_var(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

/// The built binary `name`: the path in `$NAME` (upper case, `-` as `_`: `$POLLUX_VHOST`)
/// when set, else `<target>/<profile>/name` next to the running test, which follows
/// `CARGO_TARGET_DIR` and the profile the test was built with.
///
/// # Panics
///
/// When the binary is not there: it must be built first (`cargo build --workspace --bins`,
/// as scripts/test.sh does).
pub fn workspace_binary(name: &str) -> PathBuf {
    let var = override_var(name);
    if let Some(path) = std::env::var_os(&var) {
        return PathBuf::from(path);
    }
    // <target>/<profile>/deps/<this test> -> <target>/<profile>/<name>
    let exe = std::env::current_exe().expect("test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build it first (cargo build --workspace --bins, as scripts/test.sh \
         does) or set {var} to its path",
        path.display()
    );
    path
}

#[cfg(test)]
mod tests {
    use super::override_var;

    #[test]
    fn the_override_is_the_name_in_upper_case() {
        assert_eq!(override_var("pollux-vhost"), "POLLUX_VHOST");
        assert_eq!(override_var("pollux-rpc"), "POLLUX_RPC");
    }
}
