//! The `vhost_blk` subsystem of SPDK's JSON configuration:
//!
//! ```json
//! {"subsystem": "vhost_blk", "config": [
//!     {"method": "vhost_create_blk_controller",
//!      "params": {"ctrlr": "vhost.0", "dev_name": "Malloc0", "cpumask": "0x1",
//!                 "readonly": false, "packed_ring": true, "packed_ring_recovery": true}}
//! ]}
//! ```
//!
//! Parsed and checked whole before anything is created (as the bdev layer's config).
//! `vhost_controller_set_coalescing` (which SPDK's `save_config` writes after each
//! controller) sets the coalescing of a controller created earlier in the file.

use std::path::Path;

use pollux_env::cpumask::CpuMask;
use serde_json::Value;

use crate::blk::CoalescingSettings;
use crate::target::ControllerOptions;

/// The method that creates a controller.
pub const CREATE_METHOD: &str = "vhost_create_blk_controller";
/// The method that sets a controller's interrupt coalescing.
pub const COALESCING_METHOD: &str = "vhost_controller_set_coalescing";

/// Why the `vhost_blk` subsystem of a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: reading")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not JSON")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    Shape { path: String, reason: String },
    #[error("{path}: vhost_blk entry {index}: unknown method {method:?} (known: {CREATE_METHOD}, vhost_controller_set_coalescing)")]
    UnknownMethod {
        path: String,
        index: usize,
        method: String,
    },
    #[error("{path}: {CREATE_METHOD} entry {index}: parameter {param:?}: {reason}")]
    Param {
        path: String,
        index: usize,
        param: String,
        reason: String,
    },
}

/// The controllers the `vhost_blk` subsystem of `value` asks for, in order.
pub fn parse(value: &Value, path: &Path) -> Result<Vec<ControllerOptions>, ConfigError> {
    let path_text = path.display().to_string();
    let shape = |reason: &str| ConfigError::Shape {
        path: path_text.clone(),
        reason: reason.to_string(),
    };
    let subsystems = value
        .get("subsystems")
        .and_then(Value::as_array)
        .ok_or_else(|| shape("no \"subsystems\" array at the top level"))?;
    let mut out = Vec::new();
    for subsystem in subsystems {
        if subsystem.get("subsystem").and_then(Value::as_str) != Some("vhost_blk") {
            continue;
        }
        let entries = match subsystem.get("config") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(entries)) => entries,
            Some(_) => {
                return Err(shape(
                    "the vhost_blk subsystem's \"config\" must be an array",
                ))
            }
        };
        for (index, entry) in entries.iter().enumerate() {
            let method = entry.get("method").and_then(Value::as_str).ok_or_else(|| {
                shape(&format!("vhost_blk entry {index} has no \"method\" string"))
            })?;
            match method {
                CREATE_METHOD => out.push(parse_create(entry.get("params"), &path_text, index)?),
                COALESCING_METHOD => {
                    let (ctrlr, settings) =
                        parse_coalescing(entry.get("params"), &path_text, index)?;
                    let Some(controller) = out.iter_mut().find(|c| c.ctrlr == ctrlr) else {
                        return Err(ConfigError::Param {
                            path: path_text,
                            index,
                            param: "ctrlr".to_string(),
                            reason: format!("no controller {ctrlr:?} is created before this entry"),
                        });
                    };
                    controller.coalescing = Some(settings);
                }
                other => {
                    return Err(ConfigError::UnknownMethod {
                        path: path_text,
                        index,
                        method: other.to_string(),
                    })
                }
            }
        }
    }
    let mut names: Vec<&str> = out.iter().map(|o| o.ctrlr.as_str()).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(shape(&format!("controller {:?} is created twice", pair[0])));
    }
    Ok(out)
}

/// `vhost_create_blk_controller`'s parameters, checked.
pub fn parse_create(
    params: Option<&Value>,
    path: &str,
    index: usize,
) -> Result<ControllerOptions, ConfigError> {
    let bad = |param: &str, reason: &str| ConfigError::Param {
        path: path.to_string(),
        index,
        param: param.to_string(),
        reason: reason.to_string(),
    };
    let map = params
        .and_then(Value::as_object)
        .ok_or_else(|| bad("params", "must be an object"))?;
    const KNOWN: [&str; 8] = [
        "ctrlr",
        "dev_name",
        "cpumask",
        "readonly",
        "packed_ring",
        "packed_ring_recovery",
        "transport",
        "num_queues",
    ];
    if let Some(unknown) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(bad(unknown, "unknown parameter"));
    }
    let string = |key: &str| -> Result<Option<&str>, ConfigError> {
        match map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(bad(key, "must be a string")),
        }
    };
    let boolean = |key: &str| -> Result<bool, ConfigError> {
        match map.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(bad(key, "must be a boolean")),
        }
    };
    let ctrlr = string("ctrlr")?.ok_or_else(|| bad("ctrlr", "missing"))?;
    let dev_name = string("dev_name")?.ok_or_else(|| bad("dev_name", "missing"))?;
    let cpumask = string("cpumask")?
        .map(|text| {
            text.parse::<CpuMask>()
                .map_err(|e| bad("cpumask", &e.to_string()))
        })
        .transpose()?;
    if let Some(transport) = string("transport")? {
        if transport != "vhost_user_blk" {
            return Err(bad("transport", "only vhost_user_blk is supported"));
        }
    }
    let num_queues = match map.get("num_queues") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| bad("num_queues", "must be an integer up to 256"))?,
        ),
    };
    Ok(ControllerOptions {
        ctrlr: ctrlr.to_string(),
        dev_name: dev_name.to_string(),
        cpumask,
        readonly: boolean("readonly")?,
        packed_ring: boolean("packed_ring")?,
        // SPDK's default is false: packed rings are then not tracked across a reconnect.
        packed_ring_recovery: boolean("packed_ring_recovery")?,
        num_queues,
        coalescing: None,
    })
}

/// `vhost_controller_set_coalescing`'s parameters: `ctrlr`, `delay_base_us`,
/// `iops_threshold` (SPDK's names), checked.
pub fn parse_coalescing(
    params: Option<&Value>,
    path: &str,
    index: usize,
) -> Result<(String, CoalescingSettings), ConfigError> {
    let bad = |param: &str, reason: &str| ConfigError::Param {
        path: path.to_string(),
        index,
        param: param.to_string(),
        reason: reason.to_string(),
    };
    let map = params
        .and_then(Value::as_object)
        .ok_or_else(|| bad("params", "must be an object"))?;
    if let Some(unknown) = map
        .keys()
        .find(|k| !["ctrlr", "delay_base_us", "iops_threshold"].contains(&k.as_str()))
    {
        return Err(bad(unknown, "unknown parameter"));
    }
    let ctrlr = map
        .get("ctrlr")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("ctrlr", "missing or not a string"))?;
    let number = |key: &str| -> Result<u32, ConfigError> {
        map.get(key)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(key, "missing or not an unsigned 32-bit integer"))
    };
    let settings = CoalescingSettings {
        delay_base_us: number("delay_base_us")?,
        iops_threshold: number("iops_threshold")?,
    };
    if settings.delay_base_us != 0 && settings.iops_threshold == 0 {
        return Err(bad(
            "iops_threshold",
            "must be above 0 when delay_base_us is set",
        ));
    }
    Ok((ctrlr.to_string(), settings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_spdk_entries_and_refuses_bad_ones() {
        let config = json!({"subsystems": [
            {"subsystem": "bdev", "config": []},
            {"subsystem": "vhost_blk", "config": [
                {"method": "vhost_create_blk_controller",
                 "params": {"ctrlr": "vhost.0", "dev_name": "Malloc0", "cpumask": "0x1", "readonly": true}},
                {"method": "vhost_controller_set_coalescing",
                 "params": {"ctrlr": "vhost.0", "delay_base_us": 0, "iops_threshold": 60000}}
            ]}
        ]});
        let parsed = parse(&config, Path::new("t.json")).expect("valid");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].ctrlr, "vhost.0");
        assert!(parsed[0].readonly && !parsed[0].packed_ring);
        assert_eq!(
            parsed[0].coalescing,
            Some(CoalescingSettings {
                delay_base_us: 0,
                iops_threshold: 60000
            })
        );
        let bad = json!({"subsystems": [{"subsystem": "vhost_blk", "config": [
            {"method": "vhost_create_blk_controller", "params": {"ctrlr": "x", "dev_name": "y", "bogus": 1}}
        ]}]});
        assert!(matches!(
            parse(&bad, Path::new("t.json")),
            Err(ConfigError::Param { .. })
        ));
        let missing = json!({"subsystems": [{"subsystem": "vhost_blk", "config": [
            {"method": "vhost_create_blk_controller", "params": {"ctrlr": "x"}}
        ]}]});
        assert!(parse(&missing, Path::new("t.json")).is_err());
        let twice = json!({"subsystems": [{"subsystem": "vhost_blk", "config": [
            {"method": "vhost_create_blk_controller", "params": {"ctrlr": "x", "dev_name": "a"}},
            {"method": "vhost_create_blk_controller", "params": {"ctrlr": "x", "dev_name": "b"}}
        ]}]});
        assert!(parse(&twice, Path::new("t.json")).is_err());
        let recovery = |on: bool| {
            json!({"subsystems": [{"subsystem": "vhost_blk", "config": [
                {"method": "vhost_create_blk_controller",
                 "params": {"ctrlr": "x", "dev_name": "a", "packed_ring": true, "packed_ring_recovery": on}}
            ]}]})
        };
        let parsed = parse(&recovery(false), Path::new("t.json")).expect("recovery off");
        assert!(!parsed[0].packed_ring_recovery);
        let parsed = parse(&recovery(true), Path::new("t.json")).expect("recovery on");
        assert!(parsed[0].packed_ring && parsed[0].packed_ring_recovery);
        let not_bool = json!({"subsystems": [{"subsystem": "vhost_blk", "config": [
            {"method": "vhost_create_blk_controller",
             "params": {"ctrlr": "x", "dev_name": "a", "packed_ring_recovery": "yes"}}
        ]}]});
        assert!(matches!(
            parse(&not_bool, Path::new("t.json")),
            Err(ConfigError::Param { param, .. }) if param == "packed_ring_recovery"
        ));
    }
}
