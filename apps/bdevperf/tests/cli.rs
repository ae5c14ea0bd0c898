//! bdevperf end to end: the binary on the default malloc bdev and on configs, verify passing
//! and failing, every workload, and clear errors.

use std::path::PathBuf;
use std::process::{Command, Output};

fn bdevperf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bdevperf"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("bdevperf runs")
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn config(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
        .display()
        .to_string()
}

fn temp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("bdevperf-test-{}-{name}", std::process::id()))
}

#[test]
fn verify_on_default_malloc_passes_and_writes_json() {
    let json_path = temp_file("verify.json");
    let json_arg = json_path.display().to_string();
    let output = bdevperf(&[
        "-q", "8", "-o", "4k", "-w", "verify", "-t", "1", "--json", &json_arg,
    ]);
    let (stdout, stderr) = text(&output);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("Job: Malloc0 (Core Mask 0x1)"), "{stdout}");
    assert!(stdout.contains(" Total"), "{stdout}");
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json written"))
            .expect("valid json");
    let _ = std::fs::remove_file(&json_path);
    let job = &value["results"][0];
    assert_eq!(job["job"], "Malloc0");
    assert_eq!(job["core_mask"], "0x1");
    assert_eq!(job["workload"], "verify");
    assert_eq!(job["queue_depth"], 8);
    assert_eq!(job["io_size"], 4096);
    assert_eq!(job["io_failed"], 0);
    assert_eq!(job["io_timeout"], 0);
    assert!(job["iops"].as_f64().expect("iops") > 0.0);
    for field in [
        "runtime",
        "mibps",
        "avg_latency_us",
        "min_latency_us",
        "max_latency_us",
        "p50_latency_us",
        "p99_latency_us",
        "p99_9_latency_us",
    ] {
        assert!(job[field].is_number(), "{field} in {job}");
    }
    assert!(value["total"]["iops"].as_f64().expect("total") > 0.0);
    let latency = |field: &str| job[field].as_f64().expect(field);
    let ordered = [
        "min_latency_us",
        "p50_latency_us",
        "p90_latency_us",
        "p99_latency_us",
        "p99_9_latency_us",
    ];
    for pair in ordered.windows(2) {
        assert!(latency(pair[0]) <= latency(pair[1]), "{pair:?} in {job}");
    }
    // Percentiles are bucket upper edges (6.25 % wide at most), so p99.9 may pass max a bit.
    assert!(
        latency("p99_9_latency_us") <= latency("max_latency_us") * 1.07,
        "{job}"
    );
    assert!(latency("min_latency_us") <= latency("avg_latency_us"));
    assert!(latency("avg_latency_us") <= latency("max_latency_us"));
}

#[test]
fn corrupted_block_fails_verify_naming_bdev_and_lba() {
    let output = bdevperf(&[
        "-q",
        "4",
        "-o",
        "4k",
        "-w",
        "verify",
        "-t",
        "1",
        "--corrupt-lba",
        "40",
    ]);
    let (stdout, stderr) = text(&output);
    assert!(!output.status.success(), "verify must fail:\n{stdout}");
    assert!(
        stderr.contains("verify failed on bdev \"Malloc0\" at LBA 40"),
        "stderr:\n{stderr}"
    );
}

#[test]
fn null_config_randread_with_target() {
    let null = config("null.json");
    let output = bdevperf(&[
        "-q", "128", "-o", "4k", "-w", "randread", "-t", "1", "-c", &null, "-T", "Null0", "-S", "1",
    ]);
    let (stdout, stderr) = text(&output);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("Job: Null0 (Core Mask 0x1)"), "{stdout}");
    assert!(
        stdout.contains("workload: randread, depth: 128, IO size: 4096"),
        "{stdout}"
    );
}

/// Interrupt mode: uring jobs sleep on their ring's completion eventfd, malloc jobs (no fd)
/// keep polling while I/O is in flight; both must finish their runs with no I/O lost.
#[test]
fn interrupt_mode_runs_uring_randread_and_malloc_verify() {
    let file = temp_file("interrupt-uring.img");
    std::fs::write(&file, vec![0u8; 4 << 20]).expect("backing file");
    let config_path = temp_file("interrupt-uring.json");
    let uring_config = serde_json::json!({ "subsystems": [{ "subsystem": "bdev", "config": [
        { "method": "bdev_uring_create",
          "params": { "name": "Uring0", "filename": file.display().to_string(), "block_size": 4096 } }
    ]}]});
    std::fs::write(&config_path, uring_config.to_string()).expect("config file");
    let config_arg = config_path.display().to_string();
    let uring = bdevperf(&[
        "-q",
        "32",
        "-o",
        "4k",
        "-w",
        "randread",
        "-t",
        "1",
        "-c",
        &config_arg,
        "--no-huge",
        "--interrupt-mode",
    ]);
    let _ = std::fs::remove_file(&config_path);
    let _ = std::fs::remove_file(&file);
    let (stdout, stderr) = text(&uring);
    assert!(
        uring.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("Job: Uring0 (Core Mask 0x1)"), "{stdout}");

    let verify = bdevperf(&[
        "-q",
        "8",
        "-o",
        "4k",
        "-w",
        "verify",
        "-t",
        "1",
        "--no-huge",
        "--interrupt-mode",
    ]);
    let (stdout, stderr) = text(&verify);
    assert!(
        verify.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("Job: Malloc0 (Core Mask 0x1)"), "{stdout}");
}

#[test]
fn every_workload_runs_on_malloc() {
    let malloc = config("malloc.json");
    for workload in [
        &["-w", "read"][..],
        &["-w", "write"],
        &["-w", "randwrite"],
        &["-w", "rw", "-M", "50"],
        &["-w", "randrw", "-M", "70"],
        &["-w", "flush"],
        &["-w", "unmap"],
        &["-w", "write_zeroes"],
        &["-w", "reset"],
    ] {
        let mut args = vec!["-q", "16", "-o", "8k", "-t", "1", "-c", &malloc];
        args.extend_from_slice(workload);
        let output = bdevperf(&args);
        let (stdout, stderr) = text(&output);
        assert!(
            output.status.success(),
            "{workload:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
        assert!(stdout.contains("Job: Malloc0 (Core Mask 0x1)"), "{stdout}");
    }
}

#[test]
fn clear_errors() {
    let output = bdevperf(&["-q", "8", "-o", "4q", "-w", "read", "-t", "1"]);
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(stderr.contains("invalid I/O size \"4q\""), "{stderr}");

    let output = bdevperf(&["-q", "8", "-o", "4k", "-w", "read", "-t", "1", "-T", "Nope"]);
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(stderr.contains("-T Nope: no such bdev"), "{stderr}");

    // The null bdev does not support flush (as SPDK's): the job fails and says so.
    let null = config("null.json");
    let output = bdevperf(&["-q", "8", "-o", "4k", "-w", "flush", "-t", "1", "-c", &null]);
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(stderr.contains("does not support flush"), "{stderr}");

    let bad_config = temp_file("bad.json");
    std::fs::write(
        &bad_config,
        r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_malloc_create","params":{"num_blocks":16}}]}]}"#,
    )
    .expect("write config");
    let bad = bad_config.display().to_string();
    let output = bdevperf(&["-q", "8", "-o", "4k", "-w", "read", "-t", "1", "-c", &bad]);
    let _ = std::fs::remove_file(&bad_config);
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains("bdev_malloc_create: missing required parameter \"block_size\""),
        "{stderr}"
    );

    let output = bdevperf(&[
        "-q",
        "8",
        "-o",
        "4k",
        "-w",
        "read",
        "-t",
        "1",
        "-c",
        "/nonexistent.json",
    ]);
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains("cannot read config file /nonexistent.json"),
        "{stderr}"
    );

    // An I/O size that is not a multiple of the block size.
    let malloc = config("malloc.json");
    let output = bdevperf(&[
        "-q", "8", "-o", "512", "-w", "read", "-t", "1", "-c", &malloc,
    ]);
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains("not a multiple of its block size 4096"),
        "{stderr}"
    );
}

#[test]
fn nvme_config_without_a_vfio_device_fails_naming_the_method_and_traddr() {
    // configs/nvme.json names 0000:00:04.0, which is not bound to vfio-pci on a build host
    // (in a guest whose controller is, the same command runs the benchmark).
    let nvme = config("nvme.json");
    let output = bdevperf(&[
        "-c", &nvme, "-q", "32", "-o", "4k", "-w", "verify", "-t", "1",
    ]);
    let (stdout, stderr) = text(&output);
    if output.status.success() {
        // A machine with that controller bound to vfio-pci: the run itself must be clean.
        assert!(stdout.contains("Job: Nvme0n1"), "{stdout}");
        return;
    }
    assert!(
        stderr.contains("bdev_nvme_attach_controller") && stderr.contains("\"traddr\""),
        "stderr:\n{stderr}"
    );
    assert!(stderr.contains("0000:00:04.0"), "stderr:\n{stderr}");
}
