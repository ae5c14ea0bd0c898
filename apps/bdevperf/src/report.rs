//! Results as SPDK's bdevperf prints them (a table with `Job: <bdev> (Core Mask 0x1)`
//! lines, then `Total`), plus p50 / p99 / p99.9, and the same as JSON with SPDK's field
//! names (`--json`).

use pollux_bdev::{IoStats, LatencySummaryUs};
use pollux_env::cpumask::CpuMask;
use serde_json::json;

use crate::job::JobResult;

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub runtime_s: f64,
    pub iops: f64,
    pub mibps: f64,
    pub io_failed: u64,
    pub io_timeout: u64,
    pub latency: LatencySummaryUs,
}

fn row(stats: &IoStats, runtime_s: f64) -> Row {
    let runtime_s = runtime_s.max(1e-9);
    Row {
        runtime_s,
        iops: stats.ops_total() as f64 / runtime_s,
        mibps: stats.bytes_total() as f64 / runtime_s / (1u64 << 20) as f64,
        io_failed: stats.errors_total(),
        io_timeout: 0,
        latency: stats.latency_us(),
    }
}

pub fn core_mask(core: usize) -> String {
    std::iter::once(core).collect::<CpuMask>().to_string()
}

/// The job rows and the total row (jobs run concurrently: IOPS and bandwidth add up, the
/// latency distribution is the merged one).
pub fn rows(results: &[JobResult]) -> (Vec<Row>, Row) {
    let per_job: Vec<Row> = results.iter().map(|r| row(&r.stats, r.runtime_s)).collect();
    let mut merged = IoStats::default();
    for result in results {
        merged.merge(&result.stats);
    }
    let mut total = row(&merged, 1.0);
    total.iops = per_job.iter().map(|r| r.iops).sum();
    total.mibps = per_job.iter().map(|r| r.mibps).sum();
    total.runtime_s = per_job.iter().map(|r| r.runtime_s).fold(0.0, f64::max);
    (per_job, total)
}

pub fn print_table(results: &[JobResult]) {
    let (per_job, total) = rows(results);
    let header = format!(
        "{:<28}: {:>10} {:>12} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        " Device Information",
        "runtime(s)",
        "IOPS",
        "MiB/s",
        "Fail/s",
        "TO/s",
        "Average",
        "min",
        "max",
        "p50",
        "p99",
        "p99.9"
    );
    println!("{:>width$}", "Latency(us)", width = header.len());
    println!("{header}");
    for (result, row) in results.iter().zip(&per_job) {
        let spec = &result.spec;
        println!(" Job: {} (Core Mask {})", spec.bdev, core_mask(spec.core));
        println!(
            "\t workload: {}, depth: {}, IO size: {}",
            spec.workload, spec.queue_depth, spec.io_size_bytes
        );
        if let Some(error) = &result.error {
            println!(
                "\t Job: {} ended in about {:.2} seconds with error: {error}",
                spec.bdev, row.runtime_s
            );
        }
        println!(
            "{}",
            format_row(&format!("\t {:<20}", spec.bdev), row, true)
        );
    }
    println!("{}", "=".repeat(header.len()));
    println!(
        "{}",
        format_row(&format!("{:<28}", " Total"), &total, false)
    );
}

fn format_row(label: &str, row: &Row, with_runtime: bool) -> String {
    let runtime = if with_runtime {
        format!("{:>10.2}", row.runtime_s)
    } else {
        " ".repeat(10)
    };
    let l = &row.latency;
    format!(
        "{label}: {runtime} {:>12.2} {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
        row.iops,
        row.mibps,
        row.io_failed as f64 / row.runtime_s,
        row.io_timeout as f64 / row.runtime_s,
        l.avg,
        l.min,
        l.max,
        l.p50,
        l.p99,
        l.p99_9
    )
}

fn latency_json(object: &mut serde_json::Map<String, serde_json::Value>, row: &Row) {
    let l = &row.latency;
    for (key, value) in [
        ("avg_latency_us", l.avg),
        ("min_latency_us", l.min),
        ("max_latency_us", l.max),
        ("p50_latency_us", l.p50),
        ("p90_latency_us", l.p90),
        ("p99_latency_us", l.p99),
        ("p99_9_latency_us", l.p99_9),
    ] {
        object.insert(key.to_string(), json!(value));
    }
}

/// `{"results": [{"job": ..., "core_mask": ..., ...}], "total": {...}, "core_count": N}`.
pub fn to_json(results: &[JobResult], core_count: usize) -> serde_json::Value {
    let (per_job, total) = rows(results);
    let jobs: Vec<serde_json::Value> = results
        .iter()
        .zip(&per_job)
        .map(|(result, row)| {
            let spec = &result.spec;
            let mut object = json!({
                "job": spec.bdev,
                "core_mask": core_mask(spec.core),
                "workload": spec.workload.name(),
                "status": if result.error.is_some() { "failed" } else { "finished" },
                "queue_depth": spec.queue_depth,
                "io_size": spec.io_size_bytes,
                "runtime": row.runtime_s,
                "iops": row.iops,
                "mibps": row.mibps,
                "io_failed": row.io_failed,
                "io_timeout": row.io_timeout,
            });
            if let Some(map) = object.as_object_mut() {
                latency_json(map, row);
                if let Some(error) = &result.error {
                    map.insert("error".to_string(), json!(error));
                }
            }
            object
        })
        .collect();
    let mut total_object = json!({
        "runtime": total.runtime_s,
        "iops": total.iops,
        "mibps": total.mibps,
        "io_failed": total.io_failed,
        "io_timeout": total.io_timeout,
    });
    if let Some(map) = total_object.as_object_mut() {
        latency_json(map, &total);
    }
    json!({ "results": jobs, "total": total_object, "core_count": core_count })
}
