//! The server against hostile and awkward clients: JSON-RPC errors with SPDK's codes,
//! requests in pieces and several per write, a request of several megabytes, a client that
//! sends one byte at a time, one that never reads its replies, many at once. None of them
//! may stall the reactor (its poller keeps counting) or another client (its calls succeed).

mod common;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{error_code, Options, Raw, Target};
use pollux_reactor::send_msg;
use pollux_rpc::{Allowed, RpcServerConfig};
use serde_json::{json, Value};

/// Waits until the target's poller has run `more` more times (the reactor is not stalled).
fn reactor_progresses(target: &Target, more: u64) {
    let start = target.ticks.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while target.ticks.load(Ordering::Relaxed) < start + more {
        assert!(
            Instant::now() < deadline,
            "the reactor's poller stopped running"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Another client is served while something else happens.
fn other_client_served(target: &Target) {
    assert_eq!(target.ok("spdk_get_version", None)["fields"]["major"], 0);
}

#[test]
fn malformed_json_is_a_parse_error_and_closes_the_connection() {
    let target = Target::start();
    let mut raw = Raw::connect(&target);
    raw.send(br#"{"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1, }"#);
    let response = raw.recv();
    assert_eq!(error_code(&response), -32700);
    assert!(response["id"].is_null());
    assert!(raw.closed_by_server());
    let mut raw = Raw::connect(&target);
    raw.send(b"hello");
    assert_eq!(error_code(&raw.recv()), -32700);
    other_client_served(&target);
}

#[test]
fn invalid_requests_unknown_methods_and_bad_params() {
    let target = Target::start();
    let mut raw = Raw::connect(&target);
    let cases: [(&[u8], i64, &str); 6] = [
        (
            br#"{"method": "spdk_get_version", "id": 1}"#,
            -32600,
            "jsonrpc",
        ),
        (
            br#"{"jsonrpc": "2.0", "method": 5, "id": 2}"#,
            -32600,
            "method",
        ),
        (
            br#"{"jsonrpc": "2.0", "method": "x", "id": [1]}"#,
            -32600,
            "id",
        ),
        (
            br#"[{"jsonrpc": "2.0", "method": "spdk_get_version", "id": 3}]"#,
            -32600,
            "batch",
        ),
        (
            br#"{"jsonrpc": "2.0", "method": "no_such_method", "id": 4}"#,
            -32601,
            "no_such_method",
        ),
        (
            br#"{"jsonrpc": "2.0", "method": "bdev_get_bdevs", "params": [1], "id": 5}"#,
            -32602,
            "params",
        ),
    ];
    for (request, code, needle) in cases {
        raw.send(request);
        let response = raw.recv();
        assert_eq!(error_code(&response), code, "{response}");
        let message = response["error"]["message"].as_str().expect("message");
        assert!(message.contains(needle), "{needle:?} in {message:?}");
    }
    // The connection survived all of them.
    raw.send(br#"{"jsonrpc": "2.0", "method": "spdk_get_version", "id": "last"}"#);
    let response = raw.recv();
    assert_eq!(response["id"], "last");
    assert!(response["result"]["version"].is_string());
    // A top-level scalar cannot be framed: invalid request, then closed.
    raw.send(b" 42 ");
    assert_eq!(error_code(&raw.recv()), -32600);
    assert!(raw.closed_by_server());
}

#[test]
fn notifications_get_no_answer() {
    let target = Target::start();
    let mut raw = Raw::connect(&target);
    raw.send(br#"{"jsonrpc": "2.0", "method": "bdev_null_create", "params": {"name": "N0", "num_blocks": 8, "block_size": 512}}"#);
    raw.send(br#"{"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 9}"#);
    let response = raw.recv();
    assert_eq!(response["id"], 9);
    assert_eq!(response["result"][0]["name"], "N0");
}

#[test]
fn several_requests_in_one_write_and_one_request_in_pieces() {
    let target = Target::start();
    let mut raw = Raw::connect(&target);
    let mut batch = Vec::new();
    for id in 0..5 {
        // Pretty-printed, no newline between them: as rpc.py writes.
        let request = json!({"jsonrpc": "2.0", "method": "spdk_get_version", "id": id});
        batch.extend(serde_json::to_vec_pretty(&request).expect("json"));
    }
    raw.send(&batch);
    let mut ids: Vec<i64> = (0..5)
        .map(|_| raw.recv()["id"].as_i64().expect("id"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, [0, 1, 2, 3, 4]);

    let request = serde_json::to_vec_pretty(
        &json!({"jsonrpc": "2.0", "method": "rpc_get_methods", "params": {"current": true}, "id": "split"}),
    )
    .expect("json");
    for piece in request.chunks(7) {
        raw.send(piece);
        std::thread::sleep(Duration::from_millis(1));
    }
    let response = raw.recv();
    assert_eq!(response["id"], "split");
    assert!(response["result"].is_array());
}

#[test]
fn a_request_of_several_megabytes_is_served_and_an_oversized_one_refused() {
    let target = Target::with(Options {
        config: RpcServerConfig {
            max_request_bytes: 16 << 20,
            ..RpcServerConfig::default()
        },
        ..Options::default()
    });
    let big_name = "x".repeat(6 << 20);
    let error = target.fails(
        "bdev_get_bdevs",
        Some(json!({"name": big_name})),
        -19,
        "xxxx",
    );
    assert!(error.message.len() > 6 << 20);
    other_client_served(&target);

    let mut raw = Raw::connect(&target);
    let huge = format!(
        r#"{{"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 1, "params": {{"name": "{}"}}}}"#,
        "y".repeat(17 << 20)
    );
    // The server answers and closes once the limit passes; the rest of the write may fail.
    let _ = raw.stream.write_all(huge.as_bytes());
    let response = raw.recv();
    assert_eq!(error_code(&response), -32600);
    assert!(response["error"]["message"]
        .as_str()
        .expect("message")
        .contains("limit"));
    other_client_served(&target);
}

#[test]
fn a_client_sending_one_byte_at_a_time_stalls_nobody() {
    let target = Target::start();
    let request = serde_json::to_vec_pretty(
        &json!({"jsonrpc": "2.0", "method": "spdk_get_version", "id": "slow"}),
    )
    .expect("json");
    let mut slow = Raw::connect(&target);
    let (half, rest) = request.split_at(request.len() / 2);
    for byte in half {
        slow.send(&[*byte]);
        std::thread::sleep(Duration::from_millis(2));
    }
    // Mid-request: the reactor runs and other clients are served.
    reactor_progresses(&target, 20);
    for _ in 0..5 {
        other_client_served(&target);
    }
    for byte in rest {
        slow.send(&[*byte]);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(slow.recv()["id"], "slow");
}

#[test]
fn a_client_that_never_reads_stalls_nobody() {
    let target = Target::start();
    target.ok(
        "bdev_null_create",
        Some(json!({"name": "Null0", "num_blocks": 8, "block_size": 512})),
    );
    let mut greedy = Raw::connect(&target);
    greedy.stream.set_nonblocking(true).expect("nonblocking");
    // Pipeline requests and never read: the replies (several MiB) fill the socket and the
    // server's buffer, and the server stops reading this client.
    let request = br#"{"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 1}"#;
    let mut sent = 0usize;
    let mut blocked_since: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    // Until the server has stopped reading this client for 300 ms (its writes block).
    while blocked_since.is_none_or(|since| since.elapsed() < Duration::from_millis(300)) {
        assert!(
            Instant::now() < deadline,
            "the server never pushed back ({sent} sent)"
        );
        match greedy.stream.write(request) {
            Ok(_) => {
                sent += 1;
                blocked_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                blocked_since.get_or_insert_with(Instant::now);
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    assert!(sent > 1000, "only {sent} requests went out");
    reactor_progresses(&target, 20);
    for _ in 0..10 {
        other_client_served(&target);
    }
    drop(greedy);
    other_client_served(&target);
}

#[test]
fn concurrent_clients() {
    let target = Target::start();
    std::thread::scope(|scope| {
        for client in 0..8 {
            let target = &target;
            scope.spawn(move || {
                let mut rpc = target.client();
                for round in 0..25 {
                    let name = format!("Null{client}_{round}");
                    let created = rpc
                        .call(
                            "bdev_null_create",
                            Some(json!({"name": name, "num_blocks": 8, "block_size": 512})),
                        )
                        .expect("create");
                    assert_eq!(created, Value::String(name.clone()));
                    let info = rpc
                        .call("bdev_get_bdevs", Some(json!({"name": name})))
                        .expect("get");
                    assert_eq!(info[0]["name"], name.as_str());
                    rpc.call("bdev_null_delete", Some(json!({"name": name})))
                        .expect("delete");
                }
            });
        }
    });
    assert!(target.registry.names().is_empty());
}

#[test]
fn handlers_answer_later_from_another_thread_and_dropped_calls_are_answered() {
    let target = Target::with(Options {
        extra: Some(Box::new(|methods| {
            methods
                .register("test_async", Allowed::Runtime, |ctx, call| {
                    let (params, reply) = call.into_parts();
                    let worker = ctx.create_thread("worker", None).expect("thread");
                    let value = params.value().cloned().unwrap_or(Value::Null);
                    let boxed = Box::new((reply, value));
                    send_msg(&worker, move |ctx| {
                        let (reply, value) = *boxed;
                        reply.ok(json!({"echo": value, "thread": ctx.name()}));
                        ctx.exit();
                    })
                    .expect("send");
                })
                .expect("register");
            methods
                .register("test_drop", Allowed::Runtime, |_ctx, call| drop(call))
                .expect("register");
            assert!(methods
                .register("test_drop", Allowed::Runtime, |_ctx, call| drop(call))
                .is_err());
        })),
        ..Options::default()
    });
    let answer = target.ok("test_async", Some(json!({"a": 1})));
    assert_eq!(answer, json!({"echo": {"a": 1}, "thread": "worker"}));
    target.fails("test_drop", None, -32603, "without a reply");
}

#[test]
fn a_second_server_on_a_live_socket_is_refused() {
    let target = Target::start();
    let methods = pollux_rpc::RpcMethods::new(pollux_rpc::RpcState::Runtime);
    let thread = target.app.thread_handles()[0].clone();
    let error = pollux_rpc::RpcServer::start(
        RpcServerConfig {
            socket_path: target.socket.clone(),
            ..RpcServerConfig::default()
        },
        methods,
        thread,
    )
    .expect_err("in use");
    assert!(error.to_string().contains("another process"), "{error}");
    other_client_served(&target);
}
