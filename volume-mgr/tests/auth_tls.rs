//! The real volume-mgr binary with bearer tokens and with TLS: 401 without or with an unknown
//! token (with `WWW-Authenticate: Bearer`), 403 for a read-only token that writes, reads for
//! read-only and everything for admin; `/healthz` open. Over HTTPS (a certificate made by
//! `openssl req` for the test) curl and the `Client` work when they trust it, and plain HTTP
//! to the TLS port fails at once instead of hanging.

mod common;

use common::{bin, free_port, Mgr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use volume_mgr::client::{Client, ClientError};

const ADMIN: &str = "admin-token-0123456789abcdef";
const READER: &str = "reader-token-0123456789abcdef";

/// Starts volume-mgr with `extra` flags and waits until its port accepts connections.
fn start_raw(dir: &Path, extra: &[&str]) -> (Mgr, u16) {
    let port = free_port();
    let child = Command::new(bin())
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.join("state"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut m = Mgr {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(s) = m.child.try_wait().unwrap() {
            panic!("volume-mgr exited at start-up: {s}");
        }
        assert!(t.elapsed() < Duration::from_secs(30), "volume-mgr not up");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The port accepts before the state is open; /healthz answers once it is served.
    std::thread::sleep(Duration::from_millis(200));
    let _ = &mut m;
    (m, port)
}

fn curl(args: &[&str]) -> (String, String, bool) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

/// `curl -i` status line code, `WWW-Authenticate` header and body.
fn call(url: &str, method: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut args = vec!["-i", "-X", method, url];
    let h;
    if let Some(t) = token {
        h = format!("Authorization: Bearer {t}");
        args.extend(["-H", &h]);
    }
    if let Some(b) = body {
        args.extend(["-H", "Content-Type: application/json", "-d", b]);
    }
    let (out, err, ok) = curl(&args);
    assert!(ok, "curl {url}: {err}");
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

#[test]
fn tokens_and_roles() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[tokens]]\ntoken = \"{ADMIN}\"\nrole = \"admin\"\n[[tokens]]\ntoken = \"{READER}\"\nrole = \"read-only\"\n"
        ),
    )
    .unwrap();
    let (m, _) = start_raw(dir.path(), &["--tokens-file", tokens.to_str().unwrap()]);
    let u = |p: &str| format!("{}{p}", m.url);

    let (code, out) = call(&u("/healthz"), "GET", None, None);
    assert_eq!(code, 200, "{out}");
    for token in [None, Some("not-a-known-token-at-all")] {
        let (code, out) = call(&u("/v1/volumes"), "GET", token, None);
        assert_eq!(code, 401, "{out}");
        assert!(
            out.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{out}"
        );
        assert!(out.contains(r#""code":"unauthenticated""#), "{out}");
    }
    let (code, out) = call(&u("/metrics"), "GET", None, None);
    assert_eq!(code, 401, "{out}");
    let net = r#"{"name":"n1","vni":100,"subnet":"192.0.2.0/24"}"#;
    let (code, out) = call(&u("/v1/networks"), "POST", Some(READER), Some(net));
    assert_eq!(code, 403, "{out}");
    assert!(out.contains(r#""code":"forbidden""#), "{out}");
    let (code, out) = call(&u("/v1/networks/n1"), "DELETE", Some(READER), None);
    assert_eq!(code, 403, "{out}");
    let (code, out) = call(&u("/v1/networks"), "POST", Some(ADMIN), Some(net));
    assert_eq!(code, 201, "{out}");
    for p in [
        "/v1/networks",
        "/v1/networks/n1",
        "/metrics",
        "/v1/openapi.json",
    ] {
        let (code, out) = call(&u(p), "GET", Some(READER), None);
        assert_eq!(code, 200, "GET {p}: {out}");
    }

    // The client library: with a token, without.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = Client::new(vec![m.url.clone()]);
    match rt.block_on(c.list_networks()) {
        Err(ClientError::Api { status: 401, .. }) => {}
        other => panic!("expected 401, got {:?}", other.map(|l| l.items.len())),
    }
    let admin = c.clone().with_token(Some(ADMIN.into()));
    assert_eq!(rt.block_on(admin.list_networks()).unwrap().items.len(), 1);
    rt.block_on(admin.delete_network("n1")).unwrap();
    let reader = c.with_token(Some(READER.into()));
    match rt.block_on(reader.delete_network("n1")) {
        Err(ClientError::Api {
            status: 403, code, ..
        }) => assert_eq!(code, "forbidden"),
        other => panic!("expected 403, got {other:?}"),
    }
}

#[test]
fn https_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=fabric-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            // rustls (webpki) refuses a CA certificate as the server's own: a self-signed
            // server certificate says CA:FALSE (openssl req -x509 makes CA:TRUE by default).
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success(), "openssl req failed");
    let (_m, port) = start_raw(
        dir.path(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let https = format!("https://127.0.0.1:{port}");

    let (out, err, ok) = curl(&[
        "--cacert",
        cert.to_str().unwrap(),
        &format!("{https}/healthz"),
    ]);
    assert!(ok && out == "ok\n", "{out} {err}");
    // Without trusting the certificate curl refuses it.
    let (_, err, ok) = curl(&[&format!("{https}/healthz")]);
    assert!(!ok, "curl trusted an unknown certificate: {err}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = Client::new(vec![https.clone()])
        .with_ca_file(&cert)
        .unwrap();
    let info = rt.block_on(c.cluster()).unwrap();
    assert_eq!(info.cluster_id.len(), 32);
    let untrusting = Client::new(vec![https.clone()]);
    assert!(matches!(
        rt.block_on(untrusting.cluster()),
        Err(ClientError::Unreachable { .. })
    ));
    assert!(Client::new(vec![https])
        .with_ca_pem(b"not a certificate")
        .is_err());

    // Plain HTTP to the TLS port: a clean failure, quickly (no hang, no crash).
    let t = Instant::now();
    let (out, _, ok) = curl(&[&format!("http://127.0.0.1:{port}/healthz")]);
    assert!(!(ok && out == "ok\n"), "plain HTTP served: {out}");
    assert!(t.elapsed() < Duration::from_secs(8), "plain HTTP hung");
    let (out, err, ok) = curl(&[
        "--cacert",
        cert.to_str().unwrap(),
        &format!("https://127.0.0.1:{port}/healthz"),
    ]);
    assert!(
        ok && out == "ok\n",
        "still serving after a plain HTTP client: {out} {err}"
    );
}

#[test]
fn bad_tls_and_token_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(bin())
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "junk").unwrap();
    let j = junk.to_str().unwrap();
    let e = run(&["--tls-cert", j, "--tls-key", j]);
    assert!(e.contains("tls") && e.contains("junk.pem"), "{e}");
    let e = run(&["--tls-cert", "/nonexistent/c.pem", "--tls-key", j]);
    assert!(e.contains("/nonexistent/c.pem"), "{e}");
    let e = run(&["--tls-key", j]);
    assert!(e.contains("go together"), "{e}");
}
