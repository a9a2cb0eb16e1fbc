//! A real QEMU guest: the kernel from Debian's `linux-image-amd64` package (fetched with
//! `apt-get download`, never installed on the host), its virtio modules (with their
//! dependencies, in load order), and a busybox initramfs built here. The guest runs one named
//! script from its kernel command line (`fabric.script=NAME fabric.args=A,B,…`), prints
//! `FABRIC-…` markers on the serial console, ends with `FABRIC-RESULT: ok NAME` (or
//! `FABRIC-RESULT: fail NAME rc=N`) and powers off. KVM hangs on this machine, so QEMU runs
//! under TCG. Kernel and initramfs are cached in `$FABRIC_GUEST_CACHE` or
//! `<workspace>/target/guest-cache` (the initramfs by content hash).

use crate::{run, Proc};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The modules the guest needs; their dependencies are found from each module's `depends=`.
pub const WANTED_MODULES: [&str; 3] = ["virtio_pci", "virtio_blk", "virtio_net"];

/// Size of one pattern region (the scripts take offsets in MiB).
pub const REGION: usize = 1 << 20;

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "FABRIC-BOOT uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m.ko || echo "FABRIC-ERROR insmod $m"
done
script=; args=
for w in $(cat /proc/cmdline); do
  case "$w" in
    fabric.script=*) script=${w#fabric.script=} ;;
    fabric.args=*) args=${w#fabric.args=} ;;
  esac
done
if [ -f "/scripts/$script" ]; then
  sh "/scripts/$script" $(echo "$args" | tr , ' ')
  rc=$?
else
  echo "FABRIC-ERROR no script '$script'"
  rc=127
fi
sync
if [ $rc -eq 0 ]; then
  echo "FABRIC-RESULT: ok $script uptime=$(cut -d' ' -f1 /proc/uptime)"
else
  echo "FABRIC-RESULT: fail $script rc=$rc"
fi
poweroff -f
"#;

/// Helpers every script sources first.
const LIB: &str = r#"
# need_disk: waits (up to 10 s) for /dev/vda.
need_disk() {
  i=0
  while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  [ -b /dev/vda ] || { echo "FABRIC-ERROR no /dev/vda"; exit 2; }
}
# pattern SEED OFF: the 1 MiB region for OFF (MiB); the host builds the same bytes.
pattern() { yes "fabric $1 $2 0123456789" | head -c 1048576; }
"#;

/// Built-in scripts (file name, body). Offsets are in MiB; regions are 1 MiB.
const SCRIPTS: [(&str, &str); 3] = [
    (
        "write-pattern",
        r#". /lib/fabric.sh
need_disk
seed=$1; shift
for off in "$@"; do
  pattern $seed $off > /tmp/p
  dd if=/tmp/p of=/dev/vda bs=1M seek=$off count=1 oflag=direct conv=fsync 2>/tmp/err || { echo "FABRIC-ERROR write $off: $(cat /tmp/err)"; exit 1; }
  echo "FABRIC-WROTE $off $(md5sum < /tmp/p | cut -d' ' -f1)"
done
sync
"#,
    ),
    (
        "verify-pattern",
        r#". /lib/fabric.sh
need_disk
seed=$1; shift
echo 3 > /proc/sys/vm/drop_caches
bad=0
for off in "$@"; do
  want=$(pattern $seed $off | md5sum | cut -d' ' -f1)
  got=$(dd if=/dev/vda bs=1M skip=$off count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  if [ "$got" = "$want" ]; then st=ok; else st=BAD; bad=1; fi
  echo "FABRIC-READ $off $got $st"
done
exit $bad
"#,
    ),
    (
        "disk-info",
        r#". /lib/fabric.sh
need_disk
echo "FABRIC-DISK size=$(cat /sys/block/vda/size) model=$(cat /sys/block/vda/device/modalias 2>/dev/null)"
"#,
    ),
];

/// The bytes of the `pattern SEED OFF` region, as the guest's scripts build them.
pub fn pattern(seed: &str, off_mib: u64) -> Vec<u8> {
    let line = format!("fabric {seed} {off_mib} 0123456789\n");
    let mut v = Vec::with_capacity(REGION + line.len());
    while v.len() < REGION {
        v.extend_from_slice(line.as_bytes());
    }
    v.truncate(REGION);
    v
}

/// The cache directory: `$FABRIC_GUEST_CACHE` or `<workspace>/target/guest-cache`.
pub fn cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("FABRIC_GUEST_CACHE") {
        return d.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-cache")
}

/// A Debian kernel package unpacked in the cache.
pub struct Kernel {
    /// e.g. `linux-image-6.1.0-56-amd64`
    pub package: String,
    /// e.g. `6.1.0-56-amd64`
    pub version: String,
    pub vmlinuz: PathBuf,
    /// What QEMU boots: the uncompressed ELF `vmlinux` (PVH entry, which skips the slow
    /// in-guest decompression under TCG: ~3 s instead of ~6.5 s a boot) when it could be
    /// extracted and the kernel has CONFIG_PVH, else `vmlinuz`.
    pub boot_image: PathBuf,
    /// Where the package is unpacked (`boot/`, `lib/modules/…`).
    pub root: PathBuf,
}

impl Kernel {
    /// The kernel `linux-image-amd64` depends on: unpacked from the cache, or fetched with
    /// `apt-get download` and unpacked with `dpkg-deb -x`. With no apt lists (offline), the
    /// newest kernel already in the cache is used.
    pub fn fetch() -> Kernel {
        let cache = cache_dir();
        std::fs::create_dir_all(&cache).unwrap();
        let pkg = match resolve_package() {
            Ok(p) => p,
            Err(e) => cached_packages(&cache).pop().unwrap_or_else(|| {
                panic!("{e}; run `apt-get update` (or .ci/run) so apt-get download can fetch it")
            }),
        };
        let root = cache.join(&pkg);
        if !root.join(".complete").exists() {
            let tmp = cache.join(format!(".{pkg}.{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(tmp.join("deb")).unwrap();
            run(Command::new("apt-get")
                .args(["download", "-q", &pkg])
                .current_dir(tmp.join("deb")));
            let deb = files(&tmp.join("deb"))
                .into_iter()
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
                .unwrap_or_else(|| panic!("apt-get download {pkg} left no .deb"));
            run(Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(tmp.join("root")));
            std::fs::write(tmp.join("root/.complete"), &pkg).unwrap();
            let _ = std::fs::remove_dir_all(&root);
            // Another process may have won the race; theirs is as good as ours.
            if std::fs::rename(tmp.join("root"), &root).is_err() {
                assert!(
                    root.join(".complete").exists(),
                    "cannot unpack {pkg} into the cache"
                );
            }
            let _ = std::fs::remove_dir_all(&tmp);
        }
        let vmlinuz = files(&root.join("boot"))
            .into_iter()
            .find(|p| file_name(p).starts_with("vmlinuz-"))
            .unwrap_or_else(|| panic!("no boot/vmlinuz-* in {pkg}"));
        let version = file_name(&vmlinuz)
            .trim_start_matches("vmlinuz-")
            .to_string();
        let boot_image = pvh_image(&root, &version, &vmlinuz).unwrap_or_else(|| vmlinuz.clone());
        Kernel {
            package: pkg,
            version,
            vmlinuz,
            boot_image,
            root,
        }
    }

    fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.version)
    }

    /// `names` and everything they depend on, in load order (dependencies first), each with
    /// its file. Modules built into the kernel (`modules.builtin`) are left out.
    pub fn modules(&self, names: &[&str]) -> Vec<(String, PathBuf)> {
        let dir = self.modules_dir();
        let mut index = BTreeMap::new();
        let mut stack = vec![dir.join("kernel")];
        while let Some(d) = stack.pop() {
            for p in files(&d) {
                if p.is_dir() {
                    stack.push(p);
                } else if let Some(n) = module_name(&p) {
                    index.insert(n, p);
                }
            }
        }
        let builtin: Vec<String> = std::fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| module_name(Path::new(l)))
            .collect();
        let mut order = Vec::new();
        for n in names {
            self.visit(&norm(n), &index, &builtin, &mut order, &mut Vec::new());
        }
        order
    }

    fn visit(
        &self,
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &[String],
        order: &mut Vec<(String, PathBuf)>,
        path: &mut Vec<String>,
    ) {
        if order.iter().any(|(n, _)| n == name) || builtin.iter().any(|b| b == name) {
            return;
        }
        assert!(
            !path.iter().any(|p| p == name),
            "module dependency cycle: {path:?}"
        );
        let file = index.get(name).unwrap_or_else(|| {
            panic!(
                "module {name} is neither a module nor built into {} ({path:?})",
                self.package
            )
        });
        path.push(name.to_string());
        for dep in depends(&module_bytes(file)) {
            self.visit(&dep, index, builtin, order, path);
        }
        path.pop();
        order.push((name.to_string(), file.clone()));
    }
}

/// `root/vmlinux`: the ELF kernel inside the bzImage (as scripts/extract-vmlinux finds it),
/// made once; None when the kernel lacks CONFIG_PVH or no payload decompresses to an ELF.
fn pvh_image(root: &Path, version: &str, vmlinuz: &Path) -> Option<PathBuf> {
    if std::env::var_os("FABRIC_GUEST_BZIMAGE").is_some() {
        return None;
    }
    let config = std::fs::read_to_string(root.join(format!("boot/config-{version}"))).ok()?;
    if !config.lines().any(|l| l == "CONFIG_PVH=y") {
        return None;
    }
    let out = root.join("vmlinux");
    if out.exists() {
        return Some(out);
    }
    let bz = std::fs::read(vmlinuz).ok()?;
    let formats: [(&[u8], &str, &[&str]); 3] = [
        (b"\xfd7zXZ\0", "xz", &["-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dc"]),
        (b"\x1f\x8b\x08", "gzip", &["-dc"]),
    ];
    for (magic, tool, args) in formats {
        let Some(at) = bz.windows(magic.len()).position(|w| w == magic) else {
            continue;
        };
        let tmp = tempfile::NamedTempFile::new_in(root).ok()?;
        std::fs::write(tmp.path(), &bz[at..]).ok()?;
        let Ok(o) = Command::new(tool)
            .args(args)
            .stdin(std::fs::File::open(tmp.path()).ok()?)
            .stderr(Stdio::null())
            .output()
        else {
            continue;
        };
        // Trailing bytes after the payload make some tools exit non-zero: judge the output.
        if o.stdout.starts_with(b"\x7fELF") {
            let part = tempfile::NamedTempFile::new_in(root).ok()?;
            std::fs::write(part.path(), &o.stdout).ok()?;
            part.persist(&out).ok()?;
            return Some(out);
        }
    }
    None
}

fn resolve_package() -> Result<String, String> {
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("apt-cache: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_string)
        .ok_or_else(|| "apt-cache depends linux-image-amd64 names no linux-image-*".to_string())
}

fn cached_packages(cache: &Path) -> Vec<String> {
    let mut v: Vec<String> = files(cache)
        .into_iter()
        .filter(|p| p.join(".complete").exists())
        .map(|p| file_name(&p))
        .filter(|n| n.starts_with("linux-image-"))
        .collect();
    v.sort_by_key(|n| version_key(n));
    v
}

fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter_map(|x| x.parse().ok())
        .collect()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn norm(n: &str) -> String {
    n.replace('-', "_")
}

/// `virtio-rng.ko.xz` -> `virtio_rng`; None for files that are not modules.
fn module_name(p: &Path) -> Option<String> {
    let n = p.file_name()?.to_string_lossy().into_owned();
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|s| n.strip_suffix(s))
        .map(norm)
}

/// The module's ELF bytes, decompressed on the host (busybox insmod takes plain .ko only).
fn module_bytes(p: &Path) -> Vec<u8> {
    let n = file_name(p);
    let tool = if n.ends_with(".xz") {
        "xz"
    } else if n.ends_with(".zst") {
        "zstd"
    } else if n.ends_with(".gz") {
        "gzip"
    } else {
        return std::fs::read(p).unwrap();
    };
    crate::require(tool);
    let out = Command::new(tool).arg("-dc").arg(p).output().unwrap();
    assert!(out.status.success(), "{tool} -dc {}", p.display());
    out.stdout
}

/// The `depends=` field of a module's `.modinfo` section.
fn depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(i) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[i + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(norm)
        .collect()
}

fn fnv(h: &mut u64, b: &[u8]) {
    for &x in b {
        *h = (*h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// Kernel and initramfs, ready to boot.
pub struct Assets {
    pub kernel: Kernel,
    pub initrd: PathBuf,
    /// Module names in load order.
    pub modules: Vec<String>,
}

static DEFAULT: OnceLock<Assets> = OnceLock::new();
static BUILD: Mutex<()> = Mutex::new(());

impl Assets {
    /// The kernel and an initramfs with the built-in scripts (built once per process, cached
    /// on disk by content).
    pub fn get() -> &'static Assets {
        DEFAULT.get_or_init(|| Assets::with_scripts(&[]))
    }

    /// Kernel and an initramfs holding the built-in scripts plus `extra` (name, shell body);
    /// a script runs as `sh /scripts/NAME ARGS…` and may `. /lib/fabric.sh` for helpers.
    pub fn with_scripts(extra: &[(&str, &str)]) -> Assets {
        let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        crate::require("busybox");
        crate::require("cpio");
        crate::require("gzip");
        let kernel = Kernel::fetch();
        let modules = kernel.modules(&WANTED_MODULES);
        let busybox = std::fs::read(which("busybox")).unwrap();
        let scripts: Vec<(&str, &str)> = SCRIPTS
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .collect();
        let mods: Vec<(String, Vec<u8>)> = modules
            .iter()
            .map(|(n, p)| (n.clone(), module_bytes(p)))
            .collect();
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for part in [INIT.as_bytes(), LIB.as_bytes(), &busybox] {
            fnv(&mut h, part);
            fnv(&mut h, &[0xff]);
        }
        for (n, b) in &scripts {
            fnv(&mut h, n.as_bytes());
            fnv(&mut h, b.as_bytes());
        }
        for (n, b) in &mods {
            fnv(&mut h, n.as_bytes());
            fnv(&mut h, b);
        }
        let cache = cache_dir();
        let initrd = cache.join(format!("initramfs-{}-{h:016x}.cpio.gz", kernel.version));
        if !initrd.exists() {
            let tmp = tempfile::Builder::new()
                .prefix(".initramfs-")
                .tempdir_in(&cache)
                .unwrap();
            let root = tmp.path().join("root");
            for d in ["bin", "proc", "sys", "dev", "tmp", "lib/modules", "scripts"] {
                std::fs::create_dir_all(root.join(d)).unwrap();
            }
            std::fs::write(root.join("bin/busybox"), &busybox).unwrap();
            let mut order = String::new();
            for (n, b) in &mods {
                std::fs::write(root.join(format!("lib/modules/{n}.ko")), b).unwrap();
                order += n;
                order.push('\n');
            }
            std::fs::write(root.join("lib/modules/order"), order).unwrap();
            std::fs::write(root.join("lib/fabric.sh"), LIB).unwrap();
            for (n, b) in &scripts {
                assert!(
                    !n.is_empty()
                        && n.bytes()
                            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
                    "bad script name {n:?}"
                );
                std::fs::write(root.join("scripts").join(n), b).unwrap();
            }
            std::fs::write(root.join("init"), INIT).unwrap();
            run(Command::new("chmod")
                .arg("755")
                .arg(root.join("init"))
                .arg(root.join("bin/busybox")));
            let out = tmp.path().join("initramfs.cpio.gz");
            run(Command::new("sh").arg("-c").arg(format!(
                "cd '{}' && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1 > '{}'",
                root.display(),
                out.display()
            )));
            std::fs::rename(&out, &initrd).unwrap();
        }
        Assets {
            kernel,
            initrd,
            modules: modules.into_iter().map(|(n, _)| n).collect(),
        }
    }

    /// Boots the guest with `drive` (a QEMU `-drive file=` value such as
    /// `nbd+unix:///VOL?socket=SOCK` or `nbd://127.0.0.1:PORT/VOL`, attached as a raw virtio
    /// disk with cache=none) running `script ARGS…`. The serial console goes to a file; the
    /// process group is SIGKILLed after `timeout` (the returned console then has
    /// `timed_out`). Args must not hold spaces or commas.
    pub fn boot(
        &self,
        drive: Option<&str>,
        script: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Console {
        crate::require("qemu-system-x86_64");
        for a in args {
            assert!(
                !a.is_empty() && !a.contains([' ', ',', '"']),
                "bad guest arg {a:?}"
            );
        }
        let dir = tempfile::Builder::new().prefix("guest-").tempdir().unwrap();
        let serial = dir.path().join("serial.log");
        let stderr = dir.path().join("qemu.stderr");
        let mut append = format!("console=ttyS0 panic=-1 quiet fabric.script={script}");
        if !args.is_empty() {
            append += &format!(" fabric.args={}", args.join(","));
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "256", "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.kernel.boot_image)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", &append]);
        if let Some(d) = drive {
            cmd.args([
                "-drive",
                &format!("file={d},format=raw,if=virtio,cache=none"),
            ]);
        }
        cmd.stdout(std::fs::File::create(&serial).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let t = Instant::now();
        let mut qemu = Proc::spawn("qemu-system-x86_64", &mut cmd);
        let mut timed_out = false;
        let status = loop {
            if let Some(s) = qemu.try_wait() {
                break Some(s);
            }
            if t.elapsed() > timeout {
                timed_out = true;
                qemu.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let elapsed = t.elapsed();
        let c = Console {
            text: String::from_utf8_lossy(&std::fs::read(&serial).unwrap()).replace('\r', ""),
            stderr: std::fs::read_to_string(&stderr).unwrap_or_default(),
            script: script.to_string(),
            elapsed,
            timed_out,
            status,
            dir,
        };
        eprintln!(
            "guest {script} {}: {:.1} s (kernel reached init at {} s)",
            if timed_out { "TIMED OUT" } else { "finished" },
            elapsed.as_secs_f64(),
            c.markers("BOOT")
                .first()
                .map(|s| s.trim_start_matches("uptime="))
                .unwrap_or("?")
        );
        c
    }
}

/// What a guest printed on its serial console.
pub struct Console {
    pub text: String,
    /// QEMU's own stderr.
    pub stderr: String,
    pub script: String,
    pub elapsed: Duration,
    pub timed_out: bool,
    pub status: Option<std::process::ExitStatus>,
    dir: tempfile::TempDir,
}

impl Console {
    /// The text after `FABRIC-<tag>` on each line that has it.
    pub fn markers(&self, tag: &str) -> Vec<&str> {
        markers(&self.text, tag)
    }

    /// The `FABRIC-RESULT:` line's text (`ok NAME …` / `fail NAME rc=N`).
    pub fn result(&self) -> Option<&str> {
        self.markers("RESULT:").pop()
    }

    /// Where the serial log is (removed when the console is dropped).
    pub fn serial_log(&self) -> PathBuf {
        self.dir.path().join("serial.log")
    }

    /// The script finished in time, reported ok, and no `FABRIC-ERROR` was printed.
    pub fn ok(&self) -> bool {
        !self.timed_out
            && self.result().is_some_and(|r| r.starts_with("ok "))
            && self.markers("ERROR").is_empty()
    }

    /// Panics (with the console) unless `ok()`.
    pub fn expect_ok(&self) -> &Self {
        assert!(
            self.ok(),
            "guest script {} failed (timed out: {}, qemu exit: {:?}, result: {:?}); console:\n{}\nqemu stderr:\n{}",
            self.script,
            self.timed_out,
            self.status,
            self.result(),
            self.text,
            self.stderr
        );
        self
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

/// The `FABRIC-<tag> …` lines of a console log (text after the tag, trimmed).
pub fn markers<'a>(console: &'a str, tag: &str) -> Vec<&'a str> {
    let prefix = format!("FABRIC-{tag}");
    console
        .lines()
        .filter_map(|l| l.find(&prefix).map(|i| l[i + prefix.len()..].trim()))
        .collect()
}

/// The `agent` guest script: defines `dhcp IF` (busybox udhcpc, then prints `FABRIC-NET
/// ip=ADDR/LEN mac=MAC`), prints `FABRIC-AGENT ready` and then runs the shell commands the host
/// sends on the second serial port (ttyS1, see [`Running`]), one per line `ID COMMAND…`: each
/// output line comes back on the console as `FABRIC-OUT ID …`, then `FABRIC-DONE ID rc=N`.
/// The command `exit` ends the script (and the guest powers off).
pub const AGENT: &str = r#". /lib/fabric.sh
ip link set lo up
cat > /tmp/udhcpc.sh <<'EOS'
#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    ;;
esac
exit 0
EOS
chmod 755 /tmp/udhcpc.sh
dhcp() {
  i=0
  while [ ! -e /sys/class/net/$1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  ip link set $1 up || return 2
  udhcpc -q -n -t 20 -T 2 -O mtu -i $1 -s /tmp/udhcpc.sh > /tmp/dhcp.log 2>&1 || { cat /tmp/dhcp.log; return 1; }
  echo "FABRIC-NET ip=$(ip -o -4 addr show dev $1 | sed -n 's/.* inet \([0-9.]*\/[0-9]*\).*/\1/p') mac=$(cat /sys/class/net/$1/address)"
}
i=0
while [ ! -c /dev/ttyS1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
stty -F /dev/ttyS1 -echo -icrnl -onlcr 2>/dev/null
echo "FABRIC-AGENT ready"
exec 3< /dev/ttyS1
while read -r id cmd <&3; do
  [ -n "$id" ] || continue
  [ "$cmd" = exit ] && { echo "FABRIC-DONE $id rc=0"; exit 0; }
  eval "$cmd" > /tmp/out 2>&1 < /dev/null
  rc=$?
  sed "s/^/FABRIC-OUT $id /" /tmp/out
  echo "FABRIC-DONE $id rc=$rc"
done
echo "FABRIC-ERROR agent: ttyS1 closed"
exit 1
"#;

/// What `Assets::start` runs: QEMU and where it is.
pub struct GuestSpec<'a> {
    /// Run QEMU inside this network namespace (`ip netns exec NS …`), so a `-netdev tap`
    /// it creates appears there.
    pub netns: Option<&'a str>,
    /// A `-drive file=` value (raw virtio disk, cache=none), as for [`Assets::boot`].
    pub drive: Option<&'a str>,
    /// More QEMU arguments (e.g. the NIC: `-netdev tap,…` and `-device virtio-net-pci,…`).
    pub qemu_args: &'a [String],
    pub script: &'a str,
    pub args: &'a [&'a str],
}

/// A guest that runs while the test talks to it: the console (ttyS0) goes to a file that can
/// be watched; a second serial port (ttyS1) is a unix socket the test writes command lines to
/// (the [`AGENT`] script reads them). QEMU is SIGKILLed on drop (or by [`Running::kill`], a
/// power cut).
pub struct Running {
    proc: Proc,
    dir: tempfile::TempDir,
    ctl: Option<std::os::unix::net::UnixStream>,
    next: u32,
    pub name: String,
    pub started: Instant,
}

impl Assets {
    /// Starts a guest and returns at once (see [`Running`]); `name` is for messages.
    pub fn start(&self, name: &str, spec: &GuestSpec) -> Running {
        crate::require("qemu-system-x86_64");
        for a in spec.args {
            assert!(
                !a.is_empty() && !a.contains([' ', ',', '"']),
                "bad guest arg {a:?}"
            );
        }
        let dir = tempfile::Builder::new().prefix("guest-").tempdir().unwrap();
        let ctl = dir.path().join("ctl.sock");
        let mut append = format!("console=ttyS0 panic=-1 quiet fabric.script={}", spec.script);
        if !spec.args.is_empty() {
            append += &format!(" fabric.args={}", spec.args.join(","));
        }
        let mut cmd = match spec.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        cmd.args(["-accel", "tcg", "-m", "256", "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio", "-no-reboot"])
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=off", ctl.display()))
            .arg("-kernel")
            .arg(&self.kernel.boot_image)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", &append]);
        if let Some(d) = spec.drive {
            cmd.args([
                "-drive",
                &format!("file={d},format=raw,if=virtio,cache=none"),
            ]);
        }
        cmd.args(spec.qemu_args)
            .stdout(std::fs::File::create(dir.path().join("serial.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("qemu.stderr")).unwrap());
        let proc = Proc::spawn(&format!("qemu {name}"), &mut cmd);
        Running {
            proc,
            dir,
            ctl: None,
            next: 1,
            name: name.to_string(),
            started: Instant::now(),
        }
    }
}

impl Running {
    /// The console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(
            &std::fs::read(self.dir.path().join("serial.log")).unwrap_or_default(),
        )
        .replace('\r', "")
    }

    /// QEMU's own stderr.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu.stderr")).unwrap_or_default()
    }

    /// Whether QEMU still runs.
    pub fn alive(&mut self) -> bool {
        self.proc.try_wait().is_none()
    }

    /// Waits (up to `timeout`) for a `FABRIC-<tag>` line; its text, or None when QEMU ended
    /// or the time ran out first.
    pub fn wait_marker(&mut self, tag: &str, timeout: Duration) -> Option<String> {
        let t = Instant::now();
        loop {
            let text = self.console();
            if let Some(m) = markers(&text, tag).first() {
                return Some(m.to_string());
            }
            if !self.alive() || t.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `command` (one line of shell, no newline) in the guest's [`AGENT`] and waits up to
    /// `timeout` for it: Ok((exit code, output)), or Err(why) when the guest is gone, the
    /// command channel fails or the time runs out.
    pub fn exec(&mut self, command: &str, timeout: Duration) -> Result<(i32, String), String> {
        use std::io::Write;
        assert!(!command.contains('\n'), "one line only: {command:?}");
        let t = Instant::now();
        if self.ctl.is_none() {
            let path = self.dir.path().join("ctl.sock");
            loop {
                match std::os::unix::net::UnixStream::connect(&path) {
                    Ok(s) => {
                        self.ctl = Some(s);
                        break;
                    }
                    Err(e) => {
                        if !self.alive() || t.elapsed() > timeout {
                            return Err(format!("cannot connect to {}: {e}", path.display()));
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
        let id = self.next;
        self.next += 1;
        let line = format!("{id} {command}\n");
        self.ctl
            .as_mut()
            .unwrap()
            .write_all(line.as_bytes())
            .map_err(|e| format!("sending {command:?}: {e}"))?;
        let done = format!("FABRIC-DONE {id} rc=");
        let out = format!("FABRIC-OUT {id} ");
        loop {
            let text = self.console();
            if let Some(rc) = text.lines().find_map(|l| {
                l.find(&done)
                    .map(|i| l[i + done.len()..].trim().to_string())
            }) {
                let output: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.find(&out).map(|i| &l[i + out.len()..]))
                    .collect();
                let rc = rc.parse().map_err(|_| format!("bad rc {rc:?}"))?;
                return Ok((rc, output.join("\n")));
            }
            if !self.alive() {
                return Err(format!("guest {} ended during {command:?}", self.name));
            }
            if t.elapsed() > timeout {
                return Err(format!("{command:?} did not finish in {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Running::exec`] that must succeed (exit 0); returns the output; panics with the
    /// console otherwise.
    pub fn exec_ok(&mut self, command: &str, timeout: Duration) -> String {
        match self.exec(command, timeout) {
            Ok((0, out)) => out,
            r => panic!(
                "guest {}: {command:?} -> {r:?}\n{}",
                self.name,
                self.describe()
            ),
        }
    }

    /// SIGKILLs QEMU (a power cut).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// The console and QEMU's stderr, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "guest {} console:\n{}\nqemu stderr:\n{}",
            self.name,
            self.console(),
            self.stderr()
        )
    }
}
