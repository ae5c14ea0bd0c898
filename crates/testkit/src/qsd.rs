//! qemu-storage-daemon (Debian's `qemu-system-common`) exporting a raw image file over
//! vhost-user-blk: a back-end nobody here wrote, for the virtio-user tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The daemon's binary, found through `$PATH`.
pub const QSD: &str = "qemu-storage-daemon";

/// Bound on the wait for the export's socket; never a performance assertion.
pub const SOCKET_WAIT: Duration = Duration::from_secs(20);

/// What the export looks like to the front-end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    /// Size of the sparse image file.
    pub image_bytes: u64,
    /// `num-queues=`; `None` leaves QEMU's default (one queue).
    pub num_queues: Option<u16>,
    /// `discard=unmap` on the file node, so that discards punch holes in the image.
    pub discard: bool,
    pub writable: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            image_bytes: 16 << 20,
            num_queues: None,
            discard: false,
            writable: true,
        }
    }
}

/// A running export in a temporary directory of its own (image and socket); dropping it
/// kills the daemon and removes the directory.
pub struct Export {
    child: Child,
    dir: PathBuf,
    image: PathBuf,
    socket: PathBuf,
}

impl Export {
    /// Starts the daemon and waits until its socket exists.
    ///
    /// # Panics
    ///
    /// When qemu-storage-daemon is not installed (the message says how to install it) or
    /// makes no socket within [`SOCKET_WAIT`].
    pub fn start(tag: &str, options: ExportOptions) -> Self {
        let export = Self::spawn(tag, options);
        export.wait_for_socket(SOCKET_WAIT);
        export
    }

    /// Starts the daemon without waiting for its socket, for the tests of a front-end that
    /// retries until the back-end listens.
    ///
    /// # Panics
    ///
    /// When qemu-storage-daemon is not installed; the message says how to install it.
    pub fn spawn(tag: &str, options: ExportOptions) -> Self {
        // The process id keeps concurrent test binaries apart; `tag` the tests of one binary.
        let dir = std::env::temp_dir().join(format!("pollux-qsd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let image = dir.join("disk.img");
        let socket = dir.join("vhost.sock");
        std::fs::File::create(&image)
            .and_then(|file| file.set_len(options.image_bytes))
            .expect("image");
        let mut blockdev = format!("driver=file,node-name=disk,filename={}", image.display());
        if options.discard {
            blockdev.push_str(",discard=unmap");
        }
        let mut export = format!(
            "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable={}",
            socket.display(),
            if options.writable { "on" } else { "off" }
        );
        if let Some(num_queues) = options.num_queues {
            export.push_str(&format!(",num-queues={num_queues}"));
        }
        let child = Command::new(QSD)
            .args(["--blockdev", &blockdev, "--export", &export])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "could not run {QSD} ({error}): these tests need QEMU's storage daemon; \
                     install Debian's qemu-system-common (scripts/install-deps.sh --test)"
                )
            });
        Self {
            child,
            dir,
            image,
            socket,
        }
    }

    /// Waits until the daemon has made its socket.
    ///
    /// # Panics
    ///
    /// When `timeout` passes first.
    pub fn wait_for_socket(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "{QSD} made no socket at {} within {timeout:?}",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The vhost-user socket: the front-end's `traddr`.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The raw image behind the export, for checking what reached the disk.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The export's own temporary directory (removed on drop), for a test's other files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sends `signal` by name (`STOP`, `CONT`, `KILL`) with kill(1), leaving the process to
    /// be reaped on drop: a stopped daemon keeps requests outstanding on the ring.
    ///
    /// # Panics
    ///
    /// When kill(1) fails.
    pub fn kill(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
