//! `tests/schemathesis.sh`: schemathesis (from PyPI, installed with pip if missing) fuzzes a
//! live volume-mgr (embedded store, tokens configured) against its own OpenAPI document and
//! finds no 5xx, no answer outside the documented schema, status codes or content types, no
//! accepted schema-violating request and no ignored authentication. Bounded: a few examples
//! per operation (`ST_MAX_EXAMPLES`, default 10 here), killed after 5 minutes.

use fabric_tests::cluster::bin;
use std::path::Path;
use std::process::Command;

#[test]
fn schemathesis_finds_nothing() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemathesis.sh");
    let examples = std::env::var("ST_MAX_EXAMPLES").unwrap_or_else(|_| "10".into());
    let t = std::time::Instant::now();
    let out = Command::new("timeout")
        .args(["--kill-after=10", "300", "bash"])
        .arg(&script)
        .arg(bin("volume-mgr"))
        .env("ST_MAX_EXAMPLES", examples)
        .output()
        .expect("run tests/schemathesis.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found problems (exit {:?}, {:?}):\n{stdout}\n{stderr}",
        out.status.code(),
        t.elapsed()
    );
    assert!(
        stdout.contains("generated") && stdout.contains("passed"),
        "no schemathesis summary:\n{stdout}\n{stderr}"
    );
    eprintln!("schemathesis: {:?}", t.elapsed());
}
