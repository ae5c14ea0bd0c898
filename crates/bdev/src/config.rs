//! SPDK's JSON configuration (`-c file.json`):
//!
//! ```json
//! {"subsystems": [{"subsystem": "bdev", "config": [
//!     {"method": "bdev_malloc_create",
//!      "params": {"name": "Malloc0", "num_blocks": 65536, "block_size": 4096}}
//! ]}]}
//! ```
//!
//! Method and parameter names are SPDK's, so an SPDK user's file for these modules works
//! unchanged. Loading is all or nothing: every entry is parsed and validated first (unknown
//! method, missing, unknown or wrongly typed parameter, duplicate name: each error names the
//! method and the parameter), then the bdevs are created in order; when one creation fails,
//! the bdevs created before it are unregistered again.
//!
//! Other subsystems (`accel`, `vhost_blk`, ...) are skipped with a debug log: they belong to
//! other layers. In the bdev subsystem, `bdev_set_options` and `bdev_wait_for_examine`, which
//! SPDK's `save_config` always writes, are accepted and ignored.
//!
//! A module adds its method with [`MethodTable::register`]: a parse function that turns the
//! parameters into a [`PendingBdev`], created in the second phase.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pollux_env::dma::DmaMemory;
use serde_json::{Map, Value};

use crate::error::BdevError;
use crate::modules::{malloc, null};
use crate::qos::{QosLimits, QosUpdate};
use crate::types::{BdevInfo, Uuid};
use crate::BdevRegistry;

/// A bdev validated from its parameters, not yet created.
pub trait PendingBdev: Send {
    /// The name it will get (`None`: the module picks a free one at creation).
    fn name(&self) -> Option<&str>;
    /// Creates and registers it.
    fn create(self: Box<Self>, ctx: &CreateContext<'_>) -> Result<BdevInfo, BdevError>;
}

/// What creations may use.
pub struct CreateContext<'a> {
    pub registry: &'a BdevRegistry,
    /// DMA memory for modules that allocate (malloc); `None` makes them fail clearly.
    pub dma: Option<&'a Arc<DmaMemory>>,
}

/// Turns a method's parameters into a pending bdev, checking every one.
pub type ParseFn = fn(&Params<'_>) -> Result<Box<dyn PendingBdev>, BdevError>;

#[derive(Clone, Copy)]
enum Method {
    Create(ParseFn),
    /// `bdev_set_qos_limit`: applied once the bdevs exist.
    SetQos,
    Ignore,
}

/// SPDK's method for a bdev's rate limits (see [`crate::qos`]).
pub const QOS_METHOD: &str = "bdev_set_qos_limit";

/// `bdev_set_qos_limit`'s parameters, as SPDK names them: the bdev's `name` and at least one
/// limit (0 removes that limit; a limit left out stays as it is).
pub fn parse_qos_limit(params: &Params<'_>) -> Result<(String, QosUpdate), BdevError> {
    let mut known = vec!["name"];
    known.extend(QosLimits::NAMES);
    params.allow_only(&known)?;
    let name = params.required_str("name")?.to_string();
    let update = QosUpdate {
        rw_ios_per_sec: params.u64("rw_ios_per_sec")?,
        rw_mbytes_per_sec: params.u64("rw_mbytes_per_sec")?,
        r_mbytes_per_sec: params.u64("r_mbytes_per_sec")?,
        w_mbytes_per_sec: params.u64("w_mbytes_per_sec")?,
    };
    if update.is_empty() {
        return Err(params.invalid(
            "rw_ios_per_sec",
            "no rate limit given: set at least one of rw_ios_per_sec, rw_mbytes_per_sec, r_mbytes_per_sec, w_mbytes_per_sec (0: unlimited)",
        ));
    }
    update
        .check()
        .map_err(|(param, reason)| params.invalid(param, &reason))?;
    Ok((name, update))
}

/// The configuration methods known to this process; extensible per module.
#[derive(Clone)]
pub struct MethodTable {
    methods: BTreeMap<String, Method>,
}

impl Default for MethodTable {
    fn default() -> Self {
        Self::with_builtin()
    }
}

impl MethodTable {
    /// No method at all.
    pub fn empty() -> Self {
        Self {
            methods: BTreeMap::new(),
        }
    }

    /// Every module that ships with Pollux: `bdev_malloc_create`, `bdev_null_create`,
    /// `bdev_aio_create`, `bdev_uring_create` and `bdev_delay_create`; `bdev_set_qos_limit`;
    /// and the ignored `bdev_set_options` and `bdev_wait_for_examine`.
    pub fn with_builtin() -> Self {
        let mut table = Self::empty();
        table
            .methods
            .insert(malloc::METHOD.to_string(), Method::Create(malloc::parse));
        table
            .methods
            .insert(null::METHOD.to_string(), Method::Create(null::parse));
        table.methods.insert(
            crate::modules::aio::METHOD.to_string(),
            Method::Create(crate::modules::aio::parse),
        );
        table.methods.insert(
            crate::modules::uring::METHOD.to_string(),
            Method::Create(crate::modules::uring::parse),
        );
        table.methods.insert(
            crate::modules::delay::METHOD.to_string(),
            Method::Create(crate::modules::delay::parse),
        );
        table.methods.insert(QOS_METHOD.to_string(), Method::SetQos);
        for ignored in ["bdev_set_options", "bdev_wait_for_examine"] {
            table.methods.insert(ignored.to_string(), Method::Ignore);
        }
        table
    }

    /// Adds a module's method (`bdev_aio_create`, ...).
    pub fn register(&mut self, method: &str, parse: ParseFn) -> Result<(), BdevError> {
        if self.methods.contains_key(method) {
            return Err(BdevError::MethodTaken {
                method: method.to_string(),
            });
        }
        self.methods
            .insert(method.to_string(), Method::Create(parse));
        Ok(())
    }

    /// Forgets a method (a loader that must not reach some module, such as a fuzz target
    /// that may not open host files); `false` when it was not known.
    pub fn remove(&mut self, method: &str) -> bool {
        self.methods.remove(method).is_some()
    }

    /// The known method names, sorted.
    pub fn methods(&self) -> Vec<&str> {
        self.methods.keys().map(String::as_str).collect()
    }
}

/// One method's parameters, with typed accessors whose errors name the method and parameter.
pub struct Params<'a> {
    method: &'a str,
    map: Option<&'a Map<String, Value>>,
}

impl<'a> Params<'a> {
    /// `params` may be absent (no parameters) or an object.
    pub fn new(method: &'a str, params: Option<&'a Value>) -> Result<Self, BdevError> {
        let map = match params {
            None | Some(Value::Null) => None,
            Some(Value::Object(map)) => Some(map),
            Some(_) => {
                return Err(BdevError::WrongType {
                    method: method.to_string(),
                    param: "params".to_string(),
                    expected: "an object",
                })
            }
        };
        Ok(Self { method, map })
    }

    pub fn method(&self) -> &str {
        self.method
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.and_then(|m| m.get(key))
    }

    fn wrong_type(&self, key: &str, expected: &'static str) -> BdevError {
        BdevError::WrongType {
            method: self.method.to_string(),
            param: key.to_string(),
            expected,
        }
    }

    fn missing(&self, key: &'static str) -> BdevError {
        BdevError::MissingParam {
            method: self.method.to_string(),
            param: key,
        }
    }

    /// An [`BdevError::InvalidParam`] for `key`.
    pub fn invalid(&self, key: &'static str, reason: &str) -> BdevError {
        BdevError::InvalidParam {
            method: self.method.to_string(),
            param: key,
            reason: reason.to_string(),
            source: None,
        }
    }

    /// Refuses any parameter not in `known` (as SPDK's JSON decoder does).
    pub fn allow_only(&self, known: &[&str]) -> Result<(), BdevError> {
        match self
            .map
            .and_then(|m| m.keys().find(|k| !known.contains(&k.as_str())))
        {
            Some(unknown) => Err(BdevError::UnknownParam {
                method: self.method.to_string(),
                param: unknown.clone(),
            }),
            None => Ok(()),
        }
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>, BdevError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.wrong_type(key, "a string")),
        }
    }

    pub fn required_str(&self, key: &'static str) -> Result<&'a str, BdevError> {
        self.str(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>, BdevError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => value
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "an unsigned integer")),
        }
    }

    pub fn required_u64(&self, key: &'static str) -> Result<u64, BdevError> {
        self.u64(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, BdevError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.wrong_type(key, "a boolean")),
        }
    }

    pub fn i64(&self, key: &str) -> Result<Option<i64>, BdevError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => value
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "an integer")),
        }
    }

    pub fn uuid(&self, key: &'static str) -> Result<Option<Uuid>, BdevError> {
        self.str(key)?
            .map(|text| {
                text.parse()
                    .map_err(|e: crate::UuidParseError| self.invalid(key, &e.to_string()))
            })
            .transpose()
    }

    /// A required block size: a power of two from 512 to 65536 bytes.
    pub fn required_block_size(&self, key: &'static str) -> Result<u32, BdevError> {
        let value = self.required_u64(key)?;
        u32::try_from(value)
            .ok()
            .filter(|v| v.is_power_of_two() && (512..=65536).contains(v))
            .ok_or_else(|| {
                self.invalid(
                    key,
                    &format!("must be a power of two from 512 to 65536 bytes, got {value}"),
                )
            })
    }

    /// Metadata (`md_size`, `md_interleave`) and protection information (`dif_*`) are not
    /// supported: accepted only at SPDK's defaults (0 / false).
    pub fn refuse_metadata(&self) -> Result<(), BdevError> {
        let unsupported = "is not supported by Pollux (metadata and DIF): use 0 or leave it out";
        if self.u64("md_size")?.is_some_and(|v| v != 0) {
            return Err(self.invalid("md_size", unsupported));
        }
        if self.i64("dif_type")?.is_some_and(|v| v != 0) {
            return Err(self.invalid("dif_type", unsupported));
        }
        if self.i64("dif_pi_format")?.is_some_and(|v| v != 0) {
            return Err(self.invalid("dif_pi_format", unsupported));
        }
        self.bool("md_interleave")?;
        self.bool("dif_is_head_of_md")?;
        Ok(())
    }
}

/// Reads and applies a config file; returns the names of the bdevs created.
pub fn load_file(
    path: &Path,
    registry: &BdevRegistry,
    table: &MethodTable,
    dma: Option<&Arc<DmaMemory>>,
) -> Result<Vec<String>, BdevError> {
    let text = std::fs::read_to_string(path).map_err(|source| BdevError::ConfigRead {
        path: path.to_path_buf(),
        source,
    })?;
    load_str(&text, path, registry, table, dma)
}

/// Applies a config held in memory; `path` names it in errors.
pub fn load_str(
    text: &str,
    path: &Path,
    registry: &BdevRegistry,
    table: &MethodTable,
    dma: Option<&Arc<DmaMemory>>,
) -> Result<Vec<String>, BdevError> {
    let value: Value = serde_json::from_str(text).map_err(|source| BdevError::ConfigJson {
        path: path.to_path_buf(),
        source,
    })?;
    apply(&value, path, registry, table, dma)
}

fn shape(path: &Path, reason: &str) -> BdevError {
    BdevError::ConfigShape {
        path: PathBuf::from(path),
        reason: reason.to_string(),
    }
}

/// Applies a parsed config: phase one parses and validates every bdev entry, phase two
/// creates them, undoing the creations when one fails.
pub fn apply(
    value: &Value,
    path: &Path,
    registry: &BdevRegistry,
    table: &MethodTable,
    dma: Option<&Arc<DmaMemory>>,
) -> Result<Vec<String>, BdevError> {
    let subsystems = value
        .get("subsystems")
        .ok_or_else(|| shape(path, "no \"subsystems\" array at the top level"))?
        .as_array()
        .ok_or_else(|| shape(path, "\"subsystems\" must be an array"))?;
    let mut pending: Vec<(String, Box<dyn PendingBdev>)> = Vec::new();
    let mut limits: Vec<(String, QosUpdate)> = Vec::new();
    for subsystem in subsystems {
        let name = subsystem
            .get("subsystem")
            .and_then(Value::as_str)
            .ok_or_else(|| shape(path, "a subsystem entry has no \"subsystem\" string"))?;
        if name != "bdev" {
            tracing::debug!(
                subsystem = name,
                "config: subsystem skipped by the bdev layer"
            );
            continue;
        }
        let entries = match subsystem.get("config") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(entries)) => entries,
            Some(_) => {
                return Err(shape(
                    path,
                    "the bdev subsystem's \"config\" must be an array",
                ))
            }
        };
        for (index, entry) in entries.iter().enumerate() {
            let method_name = entry.get("method").and_then(Value::as_str).ok_or_else(|| {
                shape(
                    path,
                    &format!("entry {index} of the bdev subsystem has no \"method\" string"),
                )
            })?;
            let method = table.methods.get(method_name).copied().ok_or_else(|| {
                BdevError::UnknownMethod {
                    method: method_name.to_string(),
                    index,
                    known: table.methods().join(", "),
                }
            })?;
            let params = Params::new(method_name, entry.get("params"))?;
            match method {
                Method::Create(parse) => {
                    let bdev = parse(&params)?;
                    pending.push((method_name.to_string(), bdev));
                }
                Method::SetQos => {
                    let (name, update) = parse_qos_limit(&params)?;
                    let earlier = pending.iter().any(|(_, b)| b.name() == Some(name.as_str()));
                    if !earlier && !registry.contains(&name) {
                        return Err(params.invalid(
                            "name",
                            &format!("no bdev {name:?} exists or is created before entry {index}"),
                        ));
                    }
                    limits.push((name, update));
                }
                Method::Ignore => {
                    tracing::debug!(method = method_name, "config: method accepted and ignored");
                }
            }
        }
    }
    // Names: unique in the file and not yet registered.
    for (index, (method, bdev)) in pending.iter().enumerate() {
        let Some(name) = bdev.name() else { continue };
        if registry.contains(name) {
            return Err(BdevError::DuplicateName {
                method: method.clone(),
                name: name.to_string(),
                where_: " (an existing bdev has it)",
            });
        }
        if pending[..index]
            .iter()
            .any(|(_, earlier)| earlier.name() == Some(name))
        {
            return Err(BdevError::DuplicateName {
                method: method.clone(),
                name: name.to_string(),
                where_: " (an earlier entry of the file has it)",
            });
        }
    }
    let ctx = CreateContext { registry, dma };
    let mut created: Vec<String> = Vec::new();
    for (method, bdev) in pending {
        let name = bdev.name().unwrap_or("(default name)").to_string();
        match bdev.create(&ctx) {
            Ok(info) => created.push(info.name),
            Err(source) => {
                for done in created.iter().rev() {
                    if let Err(error) = registry.unregister(done) {
                        tracing::error!(bdev = %done, %error, "config rollback: could not delete bdev");
                    }
                }
                return Err(BdevError::Create {
                    method,
                    name,
                    source: Box::new(source),
                });
            }
        }
    }
    for (name, update) in &limits {
        // Checked in phase one; a bdev that went away since is reported, not fatal.
        if let Err(error) = registry.set_qos_limits(name, update) {
            tracing::error!(bdev = %name, %error, "config: bdev_set_qos_limit not applied");
        }
    }
    tracing::info!(path = %path.display(), bdevs = ?created, "bdev config applied");
    Ok(created)
}
