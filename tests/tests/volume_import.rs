//! `fabctl volume import|export` against a real single-host fabric (volume-mgr + blockd
//! processes): a qcow2 made by qemu-img with patterns written by qemu-io goes into a volume
//! (`--create` sizes it from the image) and comes back out as raw and as qcow2, every copy
//! `qemu-img compare`-equal to the original; progress shows as plain lines when stderr is not
//! a terminal; bad input is one `fabctl:` line and a non-zero exit.

use fabric_tests::cluster::{bin, Fabric};
use fabric_tests::nbd::NbdServer;
use fabric_tests::{require, run, try_run};
use std::path::Path;
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;

/// What one fabctl run gave.
struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// `fabctl --manager URL ARGS…` with stdout and stderr captured apart (so stderr is a pipe,
/// not a terminal), bounded by `timeout(1)`; `env` is added to its environment.
fn fabctl(f: &Fabric, env: &[(&str, &str)], args: &[&str]) -> Out {
    let mut c = Command::new("timeout");
    c.args(["-s", "KILL", "180"])
        .arg(bin("fabctl"))
        .args(["--manager", &f.manager_url])
        .args(args)
        .env_remove("FABCTL_PROGRESS_INTERVAL")
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("running fabctl");
    Out {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn fabctl_ok(f: &Fabric, env: &[(&str, &str)], args: &[&str]) -> Out {
    let o = fabctl(f, env, args);
    assert!(
        o.ok,
        "fabctl {args:?} failed\nstdout: {}\nstderr: {}\n{}",
        o.stdout,
        o.stderr,
        f.logs()
    );
    o
}

/// A refused command: non-zero exit, nothing on stdout, exactly one `fabctl: …` line on
/// stderr that contains `want`.
fn refused(f: &Fabric, args: &[&str], want: &str) {
    let o = fabctl(f, &[], args);
    assert!(!o.ok, "fabctl {args:?} succeeded: {}{}", o.stdout, o.stderr);
    // (The note that --create made the volume comes before the error, if it got that far.)
    let lines: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("fabctl: created volume "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "fabctl {args:?}: want one error line, got:\n{}",
        o.stderr
    );
    assert!(
        lines[0].starts_with("fabctl: ") && lines[0].contains(want),
        "fabctl {args:?}: {:?} does not say {want:?}",
        lines[0]
    );
    assert!(o.stdout.trim().is_empty(), "stdout: {}", o.stdout);
}

/// `qemu-img compare` of two images (formats given): true when equal, false when they
/// differ; panics on any other failure (exit 2+).
fn compare(a: &str, a_fmt: &str, b: &str, b_fmt: &str) -> bool {
    let o = Command::new("qemu-img")
        .args(["compare", "-f", a_fmt, "-F", b_fmt, a, b])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    match o.status.code() {
        Some(0) => true,
        Some(1) => false,
        c => panic!(
            "qemu-img compare {a} {b}: exit {c:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    }
}

fn image_format(path: &Path) -> String {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path));
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    j["format"].as_str().unwrap().to_string()
}

/// The progress lines of one operation (`fabctl: LABEL: …`).
fn progress_lines<'a>(stderr: &'a str, label: &str) -> Vec<&'a str> {
    let prefix = format!("fabctl: {label}: ");
    stderr.lines().filter(|l| l.starts_with(&prefix)).collect()
}

#[test]
fn import_and_export_through_qemu_img() {
    for t in ["qemu-img", "qemu-io", "nbdinfo", "timeout", "script"] {
        require(t);
    }
    let f = Fabric::start("2G");
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();

    // A 96 MiB qcow2 with three patterns (start, middle, the last MiB) and holes between.
    let img = p("src.qcow2");
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", &img, "96M"]));
    run(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0xab 0 4M",
        "-c",
        "write -P 0x5c 40M 3M",
        "-c",
        "write -P 0x11 95M 1M",
        &img,
    ]));

    // Import with --create (format detected), progress every line (interval 0).
    let o = fabctl_ok(
        &f,
        &[("FABCTL_PROGRESS_INTERVAL", "0")],
        &["volume", "import", "vm1", &img, "--create"],
    );
    eprintln!("{}", o.stderr);
    let lines = progress_lines(&o.stderr, "import vm1");
    // qemu-img reports as it goes (how often depends on timing): at least the first line
    // (0%) and the final one; every line in between is well formed, percentages only grow.
    assert!(
        lines.len() >= 2,
        "want progress lines on stderr, got:\n{}",
        o.stderr
    );
    assert!(
        lines[0].starts_with("fabctl: import vm1: 0 B / 96 MiB (0%), ")
            && lines[0].contains(" ETA "),
        "{}",
        lines[0]
    );
    let pct = |l: &str| -> u64 {
        let p = l.split(['(', ')']).nth(1).unwrap_or("");
        p.strip_suffix('%')
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no percentage in {l:?}"))
    };
    for w in lines.windows(2) {
        assert!(pct(w[0]) <= pct(w[1]), "{w:?}");
    }
    for l in &lines[..lines.len() - 1] {
        assert!(l.contains(" / 96 MiB (") && l.contains("/s, ETA "), "{l:?}");
    }
    let last = lines.last().unwrap();
    assert!(
        last.starts_with("fabctl: import vm1: 96 MiB / 96 MiB (100%), ")
            && last.contains("done in"),
        "{last}"
    );
    assert!(
        !o.stderr.contains('\r') && !o.stderr.contains('\x1b'),
        "terminal control characters on a pipe: {:?}",
        o.stderr
    );
    assert!(o.stdout.contains("vm1"), "stdout: {}", o.stdout);

    // The created volume has the image's virtual size, and holds the image.
    let v = f.json(&["volume", "show", "vm1"]);
    assert_eq!(v["size"].as_u64(), Some(96 * MIB), "{v}");
    let vm1 = f.unix_url("vm1");
    assert!(compare(&img, "qcow2", &vm1, "raw"), "volume != image");
    let (ok, out) = try_run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0xab 0 4M",
        "-c",
        "read -P 0x5c 40M 3M",
        "-c",
        "read -P 0x11 95M 1M",
        "-c",
        "read -P 0 4M 36M",
        &vm1,
    ]));
    assert!(
        ok && !out.contains("verification failed"),
        "patterns in vm1: {out}"
    );

    // Export as raw, then as qcow2: both equal to the original.
    let raw = p("out.raw");
    let o = fabctl_ok(&f, &[], &["volume", "export", "vm1", &raw]);
    // Default interval: still a first and a last line.
    let lines = progress_lines(&o.stderr, "export vm1");
    assert!(lines.len() >= 2, "{}", o.stderr);
    assert!(lines.last().unwrap().contains("(100%)"), "{lines:?}");
    assert_eq!(image_format(Path::new(&raw)), "raw");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 96 * MIB);
    assert!(compare(&img, "qcow2", &raw, "raw"), "raw export != image");

    let q = p("out.qcow2");
    fabctl_ok(
        &f,
        &[],
        &[
            "volume",
            "export",
            "vm1",
            &q,
            "--format",
            "qcow2",
            "--nbd",
            &f.socket.to_string_lossy(),
        ],
    );
    assert_eq!(image_format(Path::new(&q)), "qcow2");
    assert!(compare(&img, "qcow2", &q, "qcow2"), "qcow2 export != image");

    // The comparison can fail: one changed byte in a copy of the raw export is seen.
    let bad = p("bad.raw");
    std::fs::copy(&raw, &bad).unwrap();
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x00 40M 512", &bad]));
    assert!(
        !compare(&img, "qcow2", &bad, "raw"),
        "compare missed a change"
    );

    // Raw import (explicit format) into an existing, larger volume, over TCP via --nbd.
    f.create_volume("big", "128M");
    fabctl_ok(
        &f,
        &[],
        &[
            "volume",
            "import",
            "big",
            &raw,
            "--format",
            "raw",
            "--nbd",
            &f.tcp_url("big"),
        ],
    );
    let (ok, out) = try_run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &raw,
        &f.unix_url("big"),
    ]));
    // The volume is larger: qemu-img compare says so but compares the common part (and the
    // rest must read as zeroes).
    assert!(ok, "raw import into a larger volume: {out}");

    // On a terminal (a pty from script(1)): a bar redrawn in place, no plain lines.
    let q = |a: &str| format!("'{}'", a.replace('\'', "'\\''"));
    let cmd = [
        bin("fabctl").to_string_lossy().into_owned(),
        "--manager".into(),
        f.manager_url.clone(),
        "volume".into(),
        "import".into(),
        "tty".into(),
        img.clone(),
        "--create".into(),
    ]
    .iter()
    .map(|a| q(a))
    .collect::<Vec<_>>()
    .join(" ");
    let out = run(Command::new("timeout")
        .args(["-s", "KILL", "180", "script", "-qec", &cmd, "/dev/null"])
        .env_remove("FABCTL_PROGRESS_INTERVAL"));
    assert!(
        out.contains("\r\x1b[2Kimport tty [") && out.contains("] 100%  96 MiB / 96 MiB"),
        "no bar on a terminal: {out:?}"
    );
    assert!(
        !out.contains("fabctl: import tty: "),
        "plain lines on a terminal: {out:?}"
    );
    assert!(
        compare(&img, "qcow2", &f.unix_url("tty"), "raw"),
        "import on a terminal"
    );

    // Bad input: one line, non-zero exit.
    refused(
        &f,
        &["volume", "import", "vm1", &p("missing.qcow2")],
        "missing.qcow2",
    );
    f.create_volume("small", "64M");
    refused(&f, &["volume", "import", "small", &img], "smaller");
    refused(&f, &["volume", "import", "nosuch", &img], "nosuch");
    refused(&f, &["volume", "export", "nosuch", &p("x.raw")], "nosuch");
    refused(
        &f,
        &[
            "volume", "import", "vm1", &img, "--format", "raw", "--nbd", "http://x",
        ],
        "--nbd",
    );
    // A file that is not the format it is said to be.
    refused(
        &f,
        &["volume", "import", "vm1", &raw, "--format", "qcow2"],
        "qcow2",
    );
    // A --create import that cannot reach the export leaves no volume behind.
    refused(
        &f,
        &[
            "volume",
            "import",
            "gone",
            &img,
            "--create",
            "--nbd",
            "127.0.0.1:1",
        ],
        "gone (created for it) deleted",
    );
    assert!(
        !f.fabctl(&["volume", "show", "gone"]).0,
        "volume gone is left"
    );
    // An export that cannot reach the export: one line, no file.
    refused(
        &f,
        &[
            "volume",
            "export",
            "vm1",
            &p("y.raw"),
            "--nbd",
            "127.0.0.1:1",
        ],
        "127.0.0.1:1",
    );
    assert!(!Path::new(&p("y.raw")).exists());
    // -o json: one object on stdout.
    let o = fabctl_ok(
        &f,
        &[],
        &["-o", "json", "volume", "import", "j", &img, "--create"],
    );
    let j: serde_json::Value =
        serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", o.stdout));
    assert_eq!(j["volume"], "j", "{j}");
    assert_eq!(j["format"], "qcow2", "{j}");
    assert_eq!(j["bytes"].as_u64(), Some(96 * MIB), "{j}");
    assert_eq!(j["created"], true, "{j}");

    // The refused import wrote nothing: vm1 still equals the image.
    assert!(
        compare(&img, "qcow2", &vm1, "raw"),
        "a refused import changed vm1"
    );
    // And the too-small volume was not created larger or written.
    let s = f.json(&["volume", "show", "small"]);
    assert_eq!(s["size"].as_u64(), Some(64 * MIB));
}
