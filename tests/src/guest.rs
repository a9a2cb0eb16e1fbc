//! A real QEMU guest: the kernel from Debian's `linux-image-amd64` package (fetched with
//! `apt-get download`, never installed on the host), its virtio modules, and a busybox
//! initramfs built here. The guest runs one named script from its kernel command line, prints
//! `FABRIC-…` markers on the serial console and powers off. KVM hangs on this machine, so it
//! runs under TCG. Kernel and initramfs are cached in `target/guest-cache`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Virtio modules in dependency order (Debian builds them as modules; see `depends=` in each).
const MODULES: [&str; 6] = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
];

/// The guest's /init. Scripts: `write` puts the 1 MiB pattern at 0, 16 MiB and 100 MiB of
/// /dev/vda (O_DIRECT, then fsync); `read` prints the md5 of those regions.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
  insmod /lib/modules/$m.ko || echo "FABRIC-ERROR insmod $m"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || echo "FABRIC-ERROR no /dev/vda"
yes fabric-pattern-0123456789abcdef | head -c 1048576 > /tmp/pattern
echo "FABRIC-PATTERN $(md5sum /tmp/pattern | cut -d' ' -f1)"
cmd=$(sed -n 's/.*fabric.cmd=\([a-z]*\).*/\1/p' /proc/cmdline)
case "$cmd" in
  write)
    for off in 0 16 100; do
      dd if=/tmp/pattern of=/dev/vda bs=1M seek=$off count=1 oflag=direct conv=fsync 2>/dev/null || echo "FABRIC-ERROR write $off"
    done
    sync
    echo "FABRIC-WROTE"
    ;;
  read)
    echo 3 > /proc/sys/vm/drop_caches
    for off in 0 16 100; do
      echo "FABRIC-READ $off $(dd if=/dev/vda bs=1M skip=$off count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
    done
    ;;
  *) echo "FABRIC-ERROR unknown command $cmd" ;;
esac
echo "FABRIC-DONE"
poweroff -f
"#;

/// Kernel and initramfs, ready to boot.
pub struct Assets {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The cache directory: `$FABRIC_GUEST_CACHE` or `<workspace>/target/guest-cache`.
pub fn cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("FABRIC_GUEST_CACHE") {
        return d.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-cache")
}

impl Assets {
    /// Fetches the kernel package (once) and builds the initramfs (once per init script).
    pub fn prepare() -> Assets {
        crate::require("busybox");
        crate::require("cpio");
        let cache = cache_dir();
        std::fs::create_dir_all(&cache).unwrap();
        let kdir = cache.join("kernel");
        if !kdir.join("ok").exists() {
            let deps = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]));
            let pkg = deps
                .lines()
                .filter_map(|l| l.trim().strip_prefix("Depends: "))
                .find(|p| p.starts_with("linux-image-"))
                .unwrap_or_else(|| {
                    panic!("cannot resolve linux-image-amd64 (run apt-get update): {deps}")
                })
                .to_string();
            let dl = cache.join("download");
            let _ = std::fs::remove_dir_all(&dl);
            std::fs::create_dir_all(&dl).unwrap();
            run(Command::new("apt-get")
                .args(["download", &pkg])
                .current_dir(&dl));
            let deb = std::fs::read_dir(&dl)
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
                .expect("downloaded .deb");
            let _ = std::fs::remove_dir_all(&kdir);
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&kdir));
            std::fs::write(kdir.join("ok"), &pkg).unwrap();
            let _ = std::fs::remove_dir_all(&dl);
        }
        let kernel = std::fs::read_dir(kdir.join("boot"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .expect("vmlinuz in the kernel package");
        let kver = kernel
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("vmlinuz-")
            .to_string();
        let initrd = cache.join(format!(
            "initramfs-{kver}-{:08x}.cpio.gz",
            crc(INIT.as_bytes())
        ));
        if !initrd.exists() {
            let root = cache.join("initramfs-root");
            let _ = std::fs::remove_dir_all(&root);
            for d in ["bin", "proc", "sys", "dev", "tmp", "lib/modules"] {
                std::fs::create_dir_all(root.join(d)).unwrap();
            }
            std::fs::copy(which("busybox"), root.join("bin/busybox")).unwrap();
            for m in MODULES {
                let src = kdir.join(format!("lib/modules/{kver}/kernel/{m}"));
                let name = Path::new(m).file_name().unwrap();
                std::fs::copy(&src, root.join("lib/modules").join(name))
                    .unwrap_or_else(|e| panic!("{}: {e}", src.display()));
            }
            let init = root.join("init");
            std::fs::write(&init, INIT).unwrap();
            run(Command::new("chmod").arg("755").arg(&init));
            let tmp = initrd.with_extension("tmp");
            let sh = format!(
                "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
                root.display(),
                tmp.display()
            );
            run(Command::new("sh").arg("-c").arg(sh));
            std::fs::rename(&tmp, &initrd).unwrap();
            let _ = std::fs::remove_dir_all(&root);
        }
        Assets { kernel, initrd }
    }

    /// Boots the guest with `drive` (a QEMU `-drive file=` value) running `script`; returns
    /// the serial console output. Panics if the guest does not finish within `timeout`.
    pub fn boot(&self, drive: &str, script: &str, timeout: Duration) -> String {
        crate::require("qemu-system-x86_64");
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "256",
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args([
                "-append",
                &format!("console=ttyS0 panic=-1 quiet fabric.cmd={script}"),
            ])
            .args([
                "-drive",
                &format!("file={drive},format=raw,if=virtio,cache=none"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-system-x86_64");
        let mut out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = std::io::Read::read_to_end(&mut out, &mut s);
            s
        });
        let t = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if t.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let console = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        let _ = std::io::stderr().write_all(
            format!(
                "guest {script} finished in {:.1} s\n",
                t.elapsed().as_secs_f64()
            )
            .as_bytes(),
        );
        assert!(status.is_some(), "guest {script} did not finish within {timeout:?}; console:\n{console}\nqemu stderr:\n{err}");
        assert!(
            console.contains("FABRIC-DONE"),
            "guest {script} did not complete; console:\n{console}\nqemu stderr:\n{err}"
        );
        assert!(
            !console.contains("FABRIC-ERROR"),
            "guest {script} reported an error; console:\n{console}"
        );
        console
    }
}

fn which(tool: &str) -> PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn crc(b: &[u8]) -> u32 {
    // FNV-1a: a content tag for the cache file name, nothing more.
    b.iter().fold(0x811c_9dc5u32, |h, &x| {
        (h ^ x as u32).wrapping_mul(0x0100_0193)
    })
}

/// The `FABRIC-<tag> …` lines of a console log.
pub fn markers<'a>(console: &'a str, tag: &str) -> Vec<&'a str> {
    let prefix = format!("FABRIC-{tag}");
    console
        .lines()
        .filter_map(|l| {
            l.trim_end_matches('\r')
                .find(&prefix)
                .map(|i| &l[i + prefix.len()..])
        })
        .map(|s| s.trim())
        .collect()
}
