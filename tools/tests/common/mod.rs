//! Shared by the CLI tests: a real volume-mgr (the binary next to fabctl, else in-process;
//! see cli.rs) and the real fabctl binary, with the checks every command's output gets.
#![allow(dead_code)] // each test file uses a part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub enum Manager {
    Process(Child),
    InProcess(
        Option<tokio::sync::oneshot::Sender<()>>,
        Option<std::thread::JoinHandle<()>>,
    ),
}

pub struct Mgr {
    pub url: String,
    _kind: Manager,
    _dir: tempfile::TempDir,
}

impl Drop for Mgr {
    fn drop(&mut self) {
        match &mut self._kind {
            Manager::Process(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Manager::InProcess(stop, t) => {
                if let Some(s) = stop.take() {
                    let _ = s.send(());
                }
                if let Some(t) = t.take() {
                    let _ = t.join();
                }
            }
        }
    }
}

pub fn fabctl_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_fabctl"))
}

pub fn volume_mgr_bin() -> Option<PathBuf> {
    // FABRIC_TEST_MANAGER=in-process forces the fallback (to test it).
    if std::env::var("FABRIC_TEST_MANAGER").is_ok_and(|v| v == "in-process") {
        return None;
    }
    let p = fabctl_bin().parent()?.join("volume-mgr");
    p.is_file().then_some(p)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn start_manager() -> Mgr {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let kind = match volume_mgr_bin() {
        Some(bin) => Manager::Process(
            Command::new(bin)
                .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
                .arg(dir.path())
                .args(["--default-replicas", "1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ),
        None => {
            eprintln!("cli test: no volume-mgr binary next to fabctl; running it in-process");
            let cfg = volume_mgr::Config {
                listen: format!("127.0.0.1:{port}"),
                data_dir: dir.path().to_path_buf(),
                default_replicas: 1,
                ..Default::default()
            };
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let t = std::thread::spawn(move || {
                let rt = tokio::runtime::Runtime::new().unwrap();
                rt.block_on(async move {
                    let l = tokio::net::TcpListener::bind(&cfg.listen).await.unwrap();
                    volume_mgr::serve(cfg, l, async move {
                        let _ = rx.await;
                    })
                    .await
                    .unwrap();
                });
            });
            Manager::InProcess(Some(tx), Some(t))
        }
    };
    let m = Mgr {
        url,
        _kind: kind,
        _dir: dir,
    };
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "volume-mgr did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    m
}

pub fn fabctl(m: &Mgr, args: &[&str]) -> Output {
    Command::new(fabctl_bin())
        .env_remove("FABRIC_MANAGER")
        .args(["--manager", &m.url])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

pub fn ok(m: &Mgr, args: &[&str]) -> String {
    let o = fabctl(m, args);
    assert!(
        o.status.success(),
        "fabctl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

pub fn json(m: &Mgr, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["-o", "json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok(m, &a)).unwrap()
}

/// Fails with exit 1 and exactly one line `fabctl: …` on stderr, nothing on stdout; returns it.
pub fn fails(o: Output) -> String {
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(o.stdout.is_empty());
    assert!(
        err.starts_with("fabctl: ") && err.ends_with('\n') && err.lines().count() == 1,
        "{err:?}"
    );
    err.trim_end().to_string()
}

/// The start column of each header in a table's first line.
pub fn columns(table: &str) -> Vec<usize> {
    let head = table.lines().next().unwrap();
    let mut cols = vec![0];
    let b = head.as_bytes();
    for i in 1..b.len() {
        if b[i] != b' ' && b[i - 1] == b' ' {
            cols.push(i);
        }
    }
    cols
}

pub fn assert_aligned(table: &str, cells: &[&str]) {
    let cols = columns(table);
    let row = table
        .lines()
        .find(|l| l.starts_with(cells[0]))
        .unwrap_or_else(|| panic!("no row {} in\n{table}", cells[0]));
    for (c, want) in cols.iter().zip(cells) {
        assert!(
            row[*c..].starts_with(want),
            "{want:?} not at column {c}:\n{table}"
        );
    }
}
