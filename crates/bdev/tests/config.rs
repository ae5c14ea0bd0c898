//! SPDK-format configuration: what loads, and every error naming its method and parameter,
//! with nothing left half-configured.

mod common;

use std::path::Path;

use common::dma;
use pollux_bdev::config::{self, MethodTable};
use pollux_bdev::{BdevError, BdevRegistry};

fn load(text: &str, registry: &BdevRegistry) -> Result<Vec<String>, BdevError> {
    let memory = dma(8);
    config::load_str(
        text,
        Path::new("test.json"),
        registry,
        &MethodTable::with_builtin(),
        Some(&memory),
    )
}

fn bdev_config(entries: &str) -> String {
    format!(r#"{{"subsystems":[{{"subsystem":"bdev","config":[{entries}]}}]}}"#)
}

#[test]
fn spdk_config_creates_malloc_and_null() {
    let registry = BdevRegistry::new();
    let text = r#"{"subsystems": [
        {"subsystem": "accel", "config": []},
        {"subsystem": "bdev", "config": [
            {"method": "bdev_set_options", "params": {"bdev_io_pool_size": 65535}},
            {"method": "bdev_malloc_create",
             "params": {"name": "Malloc0", "num_blocks": 1024, "block_size": 4096,
                        "uuid": "1b2c3d4e-0000-4000-8000-00000000abcd", "optimal_io_boundary": 0}},
            {"method": "bdev_malloc_create", "params": {"num_blocks": 16, "block_size": 512}},
            {"method": "bdev_null_create",
             "params": {"name": "Null0", "num_blocks": 262144, "block_size": 512, "md_size": 0}},
            {"method": "bdev_wait_for_examine"}
        ]}
    ]}"#;
    let created = load(text, &registry).expect("config");
    assert_eq!(created, vec!["Malloc0", "Malloc1", "Null0"]);
    let malloc = registry.info("Malloc0").expect("Malloc0");
    assert_eq!((malloc.num_blocks, malloc.block_size_bytes), (1024, 4096));
    assert_eq!(
        malloc.uuid.to_string(),
        "1b2c3d4e-0000-4000-8000-00000000abcd"
    );
    assert_eq!(registry.info("Null0").expect("Null0").module, "null");

    // save_config writes entries that rebuild the same bdevs.
    let saved = registry.save_config();
    let file = serde_json::json!({ "subsystems": [saved] });
    let rebuilt = BdevRegistry::new();
    let memory = dma(8);
    config::apply(
        &file,
        Path::new("saved.json"),
        &rebuilt,
        &MethodTable::with_builtin(),
        Some(&memory),
    )
    .expect("saved config loads");
    for name in registry.names() {
        assert_eq!(
            registry.info(&name).expect("old"),
            rebuilt.info(&name).expect("new")
        );
    }
}

fn error_text(entries: &str) -> (String, BdevError) {
    let registry = BdevRegistry::new();
    let error = load(&bdev_config(entries), &registry).expect_err("must fail");
    assert!(registry.names().is_empty(), "nothing half-configured");
    (error.to_string(), error)
}

#[test]
fn errors_name_the_method_and_the_parameter() {
    let (text, error) = error_text(r#"{"method": "bdev_foo_create", "params": {}}"#);
    assert!(matches!(error, BdevError::UnknownMethod { .. }));
    assert!(
        text.contains("bdev_foo_create") && text.contains("bdev_malloc_create"),
        "{text}"
    );

    let (text, error) = error_text(
        r#"{"method": "bdev_malloc_create", "params": {"name": "M", "block_size": 512}}"#,
    );
    assert!(matches!(
        error,
        BdevError::MissingParam {
            param: "num_blocks",
            ..
        }
    ));
    assert!(
        text.contains("bdev_malloc_create") && text.contains("num_blocks"),
        "{text}"
    );

    let (text, error) = error_text(
        r#"{"method": "bdev_null_create", "params": {"name": "N", "num_blocks": "many", "block_size": 512}}"#,
    );
    assert!(matches!(error, BdevError::WrongType { .. }));
    assert!(
        text.contains("bdev_null_create") && text.contains("num_blocks"),
        "{text}"
    );

    let (text, _) = error_text(
        r#"{"method": "bdev_null_create", "params": {"name": 7, "num_blocks": 8, "block_size": 512}}"#,
    );
    assert!(
        text.contains("\"name\"") && text.contains("string"),
        "{text}"
    );

    let (text, error) = error_text(
        r#"{"method": "bdev_null_create", "params": {"num_blocks": 8, "block_size": 512}}"#,
    );
    assert!(
        matches!(error, BdevError::MissingParam { param: "name", .. }),
        "{text}"
    );

    let (text, error) = error_text(
        r#"{"method": "bdev_null_create", "params": {"name": "N", "num_blocks": 8, "block_size": 512, "colour": "red"}}"#,
    );
    assert!(matches!(error, BdevError::UnknownParam { .. }));
    assert!(text.contains("colour"), "{text}");

    let (text, _) = error_text(
        r#"{"method": "bdev_malloc_create", "params": {"num_blocks": 8, "block_size": 1000}}"#,
    );
    assert!(
        text.contains("block_size") && text.contains("1000"),
        "{text}"
    );

    let (text, _) = error_text(
        r#"{"method": "bdev_null_create", "params": {"name": "N", "num_blocks": 8, "block_size": 512, "md_size": 8}}"#,
    );
    assert!(text.contains("md_size"), "{text}");

    let (text, _) = error_text(
        r#"{"method": "bdev_malloc_create", "params": {"num_blocks": 8, "block_size": 512, "uuid": "nope"}}"#,
    );
    assert!(text.contains("uuid"), "{text}");
}

#[test]
fn duplicate_names_are_refused_before_anything_is_created() {
    let (text, error) = error_text(
        r#"{"method": "bdev_malloc_create", "params": {"name": "D", "num_blocks": 8, "block_size": 512}},
           {"method": "bdev_null_create", "params": {"name": "D", "num_blocks": 8, "block_size": 512}}"#,
    );
    assert!(matches!(error, BdevError::DuplicateName { .. }));
    assert!(
        text.contains("bdev_null_create") && text.contains("\"D\""),
        "{text}"
    );

    let registry = BdevRegistry::new();
    load(
        &bdev_config(r#"{"method": "bdev_null_create", "params": {"name": "E", "num_blocks": 8, "block_size": 512}}"#),
        &registry,
    )
    .expect("first load");
    let error = load(
        &bdev_config(
            r#"{"method": "bdev_null_create", "params": {"name": "F", "num_blocks": 8, "block_size": 512}},
               {"method": "bdev_malloc_create", "params": {"name": "E", "num_blocks": 8, "block_size": 512}}"#,
        ),
        &registry,
    )
    .expect_err("E exists");
    assert!(error.to_string().contains("existing bdev"), "{error}");
    assert_eq!(registry.names(), vec!["E".to_string()], "F was not created");
}

#[test]
fn a_failed_creation_deletes_what_was_created() {
    // The third bdev needs more DMA memory than the 8 MiB the test gives: creation fails after
    // two bdevs exist, and both are deleted again.
    let (text, error) = error_text(
        r#"{"method": "bdev_null_create", "params": {"name": "N", "num_blocks": 8, "block_size": 512}},
           {"method": "bdev_malloc_create", "params": {"name": "Small", "num_blocks": 8, "block_size": 512}},
           {"method": "bdev_malloc_create", "params": {"name": "Huge", "num_blocks": 65536, "block_size": 4096}}"#,
    );
    assert!(matches!(error, BdevError::Create { .. }), "{text}");
    assert!(
        text.contains("bdev_malloc_create") && text.contains("Huge"),
        "{text}"
    );
}

#[test]
fn unreadable_and_malformed_files_are_clear_errors() {
    let registry = BdevRegistry::new();
    let missing = Path::new("/nonexistent/pollux/bdev.json");
    let error = config::load_file(missing, &registry, &MethodTable::with_builtin(), None)
        .expect_err("missing file");
    assert!(matches!(error, BdevError::ConfigRead { .. }));
    assert!(
        error.to_string().contains("/nonexistent/pollux/bdev.json"),
        "{error}"
    );

    let error = load("{not json", &registry).expect_err("bad json");
    assert!(matches!(error, BdevError::ConfigJson { .. }));
    let error = load(r#"{"subsystem": "bdev"}"#, &registry).expect_err("no subsystems");
    assert!(error.to_string().contains("subsystems"), "{error}");
    let error =
        load(&bdev_config(r#"{"params": {"name": "x"}}"#), &registry).expect_err("no method");
    assert!(error.to_string().contains("method"), "{error}");

    // Malloc needs DMA memory; without it the error says so.
    let error = config::load_str(
        &bdev_config(
            r#"{"method": "bdev_malloc_create", "params": {"num_blocks": 8, "block_size": 512}}"#,
        ),
        Path::new("x.json"),
        &registry,
        &MethodTable::with_builtin(),
        None,
    )
    .expect_err("no dma");
    assert!(
        format!("{error:#}").contains("bdev_malloc_create"),
        "{error}"
    );
    assert!(registry.names().is_empty());
}

#[test]
fn modules_can_add_methods() {
    fn parse_nothing(
        params: &config::Params<'_>,
    ) -> Result<Box<dyn config::PendingBdev>, BdevError> {
        Err(params.invalid("filename", "test method"))
    }
    let mut table = MethodTable::with_builtin();
    table
        .register("bdev_test_create", parse_nothing)
        .expect("new method");
    assert!(matches!(
        table.register("bdev_test_create", parse_nothing),
        Err(BdevError::MethodTaken { .. })
    ));
    let registry = BdevRegistry::new();
    let error = config::load_str(
        &bdev_config(
            r#"{"method": "bdev_test_create", "params": {"name": "A", "filename": "/dev/x"}}"#,
        ),
        Path::new("x.json"),
        &registry,
        &table,
        None,
    )
    .expect_err("test method refuses");
    assert!(
        error
            .to_string()
            .contains("bdev_test_create: parameter \"filename\""),
        "{error}"
    );
}
