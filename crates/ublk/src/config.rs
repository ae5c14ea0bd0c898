//! The `ublk` subsystem of SPDK's JSON configuration, and the parameters of the `ublk_*`
//! methods (one parser for a `-c` file and for RPC, so a parameter means the same in both):
//!
//! ```json
//! {"subsystem": "ublk", "config": [
//!     {"method": "ublk_create_target", "params": {"cpumask": "0x3"}},
//!     {"method": "ublk_start_disk",
//!      "params": {"bdev_name": "Malloc0", "ublk_id": 0, "num_queues": 2, "queue_depth": 128}}
//! ]}
//! ```

use pollux_env::cpumask::CpuMask;
use serde_json::Value;

use crate::target::{StartOptions, DEFAULT_NUM_QUEUES, DEFAULT_QUEUE_DEPTH};

pub const CREATE_TARGET: &str = "ublk_create_target";
pub const DESTROY_TARGET: &str = "ublk_destroy_target";
pub const START_DISK: &str = "ublk_start_disk";
pub const RECOVER_DISK: &str = "ublk_recover_disk";
pub const STOP_DISK: &str = "ublk_stop_disk";
pub const GET_DISKS: &str = "ublk_get_disks";

/// A parameter refused, named with its method.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{method}: parameter {param:?}: {reason}")]
pub struct ParamError {
    pub method: String,
    pub param: String,
    pub reason: String,
}

/// One entry of the `ublk` subsystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    CreateTarget { cpumask: Option<CpuMask> },
    StartDisk(StartOptions),
}

fn object<'a>(
    method: &str,
    params: Option<&'a Value>,
    known: &[&str],
) -> Result<Option<&'a serde_json::Map<String, Value>>, ParamError> {
    let err = |param: &str, reason: String| ParamError {
        method: method.to_string(),
        param: param.to_string(),
        reason,
    };
    match params {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => {
            if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
                return Err(err(
                    unknown,
                    format!("unknown parameter (known: {})", known.join(", ")),
                ));
            }
            Ok(Some(map))
        }
        Some(_) => Err(err("params", "must be an object".to_string())),
    }
}

fn get_u32(
    method: &str,
    map: Option<&serde_json::Map<String, Value>>,
    key: &str,
) -> Result<Option<u32>, ParamError> {
    match map.and_then(|m| m.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| ParamError {
                method: method.to_string(),
                param: key.to_string(),
                reason: format!("must be an integer 0..=4294967295, got {v}"),
            }),
    }
}

fn get_str<'a>(
    method: &str,
    map: Option<&'a serde_json::Map<String, Value>>,
    key: &str,
) -> Result<Option<&'a str>, ParamError> {
    match map.and_then(|m| m.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(ParamError {
            method: method.to_string(),
            param: key.to_string(),
            reason: format!("must be a string, got {v}"),
        }),
    }
}

fn required<T>(method: &str, key: &str, value: Option<T>) -> Result<T, ParamError> {
    value.ok_or_else(|| ParamError {
        method: method.to_string(),
        param: key.to_string(),
        reason: "missing".to_string(),
    })
}

/// `ublk_create_target` {cpumask?}.
pub fn parse_create_target(
    method: &str,
    params: Option<&Value>,
) -> Result<Option<CpuMask>, ParamError> {
    let map = object(method, params, &["cpumask", "disable_user_copy"])?;
    // SPDK's switch; Pollux uses kernel copy unless a disk asks for user copy, so only SPDK's
    // default (false) is accepted.
    match map.and_then(|m| m.get("disable_user_copy")) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(v) => {
            return Err(ParamError {
                method: method.to_string(),
                param: "disable_user_copy".to_string(),
                reason: format!(
                    "only false is implemented (user copy is per disk: ublk_start_disk's user_copy), got {v}"
                ),
            })
        }
    }
    match get_str(method, map, "cpumask")? {
        None => Ok(None),
        Some(text) => CpuMask::parse(text).map(Some).map_err(|e| ParamError {
            method: method.to_string(),
            param: "cpumask".to_string(),
            reason: e.to_string(),
        }),
    }
}

/// `ublk_start_disk` {bdev_name, ublk_id, num_queues?, queue_depth?, user_copy?}. Ranges are
/// the target's to check (it names the disk).
pub fn parse_start_disk(method: &str, params: Option<&Value>) -> Result<StartOptions, ParamError> {
    let map = object(
        method,
        params,
        &[
            "bdev_name",
            "ublk_id",
            "num_queues",
            "queue_depth",
            "user_copy",
        ],
    )?;
    let bdev_name = required(method, "bdev_name", get_str(method, map, "bdev_name")?)?;
    if bdev_name.is_empty() {
        return Err(ParamError {
            method: method.to_string(),
            param: "bdev_name".to_string(),
            reason: "empty".to_string(),
        });
    }
    let ublk_id = required(method, "ublk_id", get_u32(method, map, "ublk_id")?)?;
    let user_copy = match map.and_then(|m| m.get("user_copy")) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(ParamError {
                method: method.to_string(),
                param: "user_copy".to_string(),
                reason: format!("must be a boolean, got {v}"),
            })
        }
    };
    Ok(StartOptions {
        bdev_name: bdev_name.to_string(),
        ublk_id,
        num_queues: get_u32(method, map, "num_queues")?.unwrap_or(DEFAULT_NUM_QUEUES),
        queue_depth: get_u32(method, map, "queue_depth")?.unwrap_or(DEFAULT_QUEUE_DEPTH),
        user_copy,
    })
}

/// `ublk_recover_disk` {bdev_name, ublk_id}.
pub fn parse_recover_disk(
    method: &str,
    params: Option<&Value>,
) -> Result<(String, u32), ParamError> {
    let map = object(method, params, &["bdev_name", "ublk_id"])?;
    let bdev_name = required(method, "bdev_name", get_str(method, map, "bdev_name")?)?;
    let ublk_id = required(method, "ublk_id", get_u32(method, map, "ublk_id")?)?;
    Ok((bdev_name.to_string(), ublk_id))
}

/// `ublk_stop_disk` {ublk_id}.
pub fn parse_stop_disk(method: &str, params: Option<&Value>) -> Result<u32, ParamError> {
    let map = object(method, params, &["ublk_id"])?;
    required(method, "ublk_id", get_u32(method, map, "ublk_id")?)
}

/// `ublk_get_disks` {ublk_id?}.
pub fn parse_get_disks(method: &str, params: Option<&Value>) -> Result<Option<u32>, ParamError> {
    let map = object(method, params, &["ublk_id"])?;
    get_u32(method, map, "ublk_id")
}

/// The entries of the `ublk` subsystem of a config, in order, checked whole.
pub fn parse(value: &Value) -> Result<Vec<Entry>, ParamError> {
    let shape = |reason: &str| ParamError {
        method: "config".to_string(),
        param: "ublk".to_string(),
        reason: reason.to_string(),
    };
    let Some(subsystems) = value.get("subsystems").and_then(Value::as_array) else {
        return Err(shape("no \"subsystems\" array at the top level"));
    };
    let mut out = Vec::new();
    for subsystem in subsystems {
        if subsystem.get("subsystem").and_then(Value::as_str) != Some("ublk") {
            continue;
        }
        let entries = match subsystem.get("config") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(entries)) => entries,
            Some(_) => return Err(shape("the ublk subsystem's \"config\" must be an array")),
        };
        for (index, entry) in entries.iter().enumerate() {
            let Some(method) = entry.get("method").and_then(Value::as_str) else {
                return Err(shape(&format!("entry {index} has no \"method\" string")));
            };
            match method {
                CREATE_TARGET => out.push(Entry::CreateTarget {
                    cpumask: parse_create_target(method, entry.get("params"))?,
                }),
                START_DISK => out.push(Entry::StartDisk(parse_start_disk(method, entry.get("params"))?)),
                other => {
                    return Err(shape(&format!(
                        "entry {index}: unknown method {other:?} (known: {CREATE_TARGET}, {START_DISK})"
                    )))
                }
            }
        }
    }
    if out
        .iter()
        .skip(1)
        .any(|e| matches!(e, Entry::CreateTarget { .. }))
        || (!out.is_empty() && !matches!(out[0], Entry::CreateTarget { .. }))
    {
        return Err(shape("ublk_create_target must come once, first"));
    }
    Ok(out)
}

/// Applies a parsed `ublk` subsystem: the target, then each disk. Blocking (disks start on
/// the calling thread; call off the reactors). On an error the disks this call started are
/// stopped and a target it created destroyed.
pub fn apply(target: &crate::UblkTarget, entries: &[Entry]) -> Result<(), crate::UblkError> {
    let mut started = Vec::new();
    let mut created = false;
    let undo = |started: &[u32], created: bool| {
        for id in started.iter().rev() {
            if let Err(error) = target.stop_disk(*id) {
                tracing::error!(ublk_id = id, error = %crate::error_chain(&error), "ublk: config rollback");
            }
        }
        if created {
            let _ = target.destroy_target();
        }
    };
    for entry in entries {
        let result = match entry {
            Entry::CreateTarget { cpumask } => {
                target.create_target(*cpumask).map(|()| created = true)
            }
            Entry::StartDisk(options) => target.start_disk(options).map(|id| started.push(id)),
        };
        if let Err(error) = result {
            undo(&started, created);
            return Err(error);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn start_disk_params() {
        let o = parse_start_disk(
            START_DISK,
            Some(&json!({"bdev_name": "Malloc0", "ublk_id": 1})),
        )
        .expect("valid");
        assert_eq!((o.num_queues, o.queue_depth, o.user_copy), (1, 128, false));
        let e = parse_start_disk(START_DISK, Some(&json!({"ublk_id": 1}))).expect_err("no bdev");
        assert_eq!(
            e.to_string(),
            "ublk_start_disk: parameter \"bdev_name\": missing"
        );
        let e = parse_start_disk(START_DISK, Some(&json!({"bdev_name": "M", "ublk_id": -1})))
            .expect_err("negative");
        assert_eq!(e.param, "ublk_id");
        let e = parse_start_disk(
            START_DISK,
            Some(&json!({"bdev_name": "M", "ublk_id": 0, "queue_depth": "x"})),
        )
        .expect_err("string depth");
        assert_eq!(e.param, "queue_depth");
        let e = parse_start_disk(
            START_DISK,
            Some(&json!({"bdev_name": "M", "ublk_id": 0, "bogus": 1})),
        )
        .expect_err("unknown");
        assert_eq!(e.param, "bogus");
        let e = parse_start_disk(START_DISK, None).expect_err("no params");
        assert_eq!(e.param, "bdev_name");
    }

    #[test]
    fn other_params() {
        assert_eq!(
            parse_stop_disk(STOP_DISK, Some(&json!({"ublk_id": 4}))),
            Ok(4)
        );
        assert_eq!(
            parse_stop_disk(STOP_DISK, None).map_err(|e| e.param),
            Err("ublk_id".to_string())
        );
        assert_eq!(parse_get_disks(GET_DISKS, None), Ok(None));
        assert_eq!(
            parse_get_disks(GET_DISKS, Some(&json!({"ublk_id": 2}))),
            Ok(Some(2))
        );
        assert_eq!(
            parse_recover_disk(RECOVER_DISK, Some(&json!({"bdev_name": "M", "ublk_id": 2}))),
            Ok(("M".to_string(), 2))
        );
        assert!(
            parse_create_target(CREATE_TARGET, Some(&json!({"cpumask": "0x3"})))
                .expect("ok")
                .is_some()
        );
        assert!(
            parse_create_target(CREATE_TARGET, Some(&json!({"disable_user_copy": false}))).is_ok()
        );
        assert_eq!(
            parse_create_target(CREATE_TARGET, Some(&json!({"disable_user_copy": true})))
                .map_err(|e| e.param),
            Err("disable_user_copy".to_string())
        );
        assert_eq!(
            parse_create_target(CREATE_TARGET, Some(&json!({"cpumask": "zz"})))
                .map_err(|e| e.param),
            Err("cpumask".to_string())
        );
    }

    #[test]
    fn the_subsystem_of_a_config() {
        let config = json!({"subsystems": [
            {"subsystem": "bdev", "config": []},
            {"subsystem": "ublk", "config": [
                {"method": "ublk_create_target", "params": {"cpumask": "0x1"}},
                {"method": "ublk_start_disk", "params": {"bdev_name": "Malloc0", "ublk_id": 0, "num_queues": 2}}
            ]}
        ]});
        let entries = parse(&config).expect("valid");
        assert_eq!(entries.len(), 2);
        assert!(matches!(&entries[1], Entry::StartDisk(o) if o.num_queues == 2));
        let disk_first = json!({"subsystems": [{"subsystem": "ublk", "config": [
            {"method": "ublk_start_disk", "params": {"bdev_name": "Malloc0", "ublk_id": 0}}
        ]}]});
        assert!(parse(&disk_first).is_err());
        let unknown = json!({"subsystems": [{"subsystem": "ublk", "config": [
            {"method": "ublk_frobnicate"}
        ]}]});
        assert!(parse(&unknown)
            .expect_err("unknown")
            .to_string()
            .contains("ublk_frobnicate"));
    }
}
