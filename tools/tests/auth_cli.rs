//! fabctl against a manager with tokens: `FABRIC_TOKEN` (or `--token`) is sent as a bearer
//! token; without it every command fails with one line and exit 1; a read-only token lists but
//! cannot create. The manager runs in-process (`volume_mgr::serve`) with tokens configured.

use std::process::Command;
use std::time::{Duration, Instant};
use volume_mgr::auth::{Role, Token};

const ADMIN: &str = "cli-admin-token-0123456789";
const READER: &str = "cli-reader-token-0123456789";

fn fabctl(url: &str, token: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fabctl"));
    c.env("FABRIC_MANAGER", url).env_remove("FABRIC_TOKEN");
    if let Some(t) = token {
        c.env("FABRIC_TOKEN", t);
    }
    c.args(args).output().unwrap()
}

#[test]
fn fabctl_sends_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    let cfg = volume_mgr::Config {
        listen: addr.to_string(),
        data_dir: dir.path().to_path_buf(),
        default_replicas: 1,
        tokens: vec![
            Token {
                token: ADMIN.into(),
                role: Role::Admin,
            },
            Token {
                token: READER.into(),
                role: Role::ReadOnly,
            },
        ],
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            volume_mgr::serve(cfg, l, async move {
                let _ = rx.await;
            })
            .await
        })
    });
    let url = format!("http://{addr}");
    let t = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "manager not up");
        std::thread::sleep(Duration::from_millis(20));
    }

    let o = fabctl(&url, None, &["net", "ls"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("fabctl: ") && err.contains("401") && err.contains("FABRIC_TOKEN"),
        "{err}"
    );
    let o = fabctl(&url, Some("wrong-token-0123456789"), &["net", "ls"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");

    let o = fabctl(
        &url,
        Some(ADMIN),
        &[
            "net",
            "create",
            "n1",
            "--vni",
            "100",
            "--subnet",
            "192.0.2.0/24",
        ],
    );
    assert!(o.status.success(), "{o:?}");
    let o = fabctl(&url, Some(READER), &["-o", "json", "net", "ls"]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("192.0.2.0/24"));
    let o = fabctl(
        &url,
        Some(READER),
        &[
            "net",
            "create",
            "n2",
            "--vni",
            "101",
            "--subnet",
            "198.51.100.0/24",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("forbidden"));
    // --token wins over nothing in the environment.
    let o = fabctl(&url, None, &["--token", READER, "net", "ls"]);
    assert!(o.status.success(), "{o:?}");

    let _ = tx.send(());
    server.join().unwrap().unwrap();
}
