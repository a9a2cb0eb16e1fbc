//! `fabctl volume import|export`: copies an image file into or out of a volume with
//! `qemu-img convert` against the volume's NBD export, showing `qemu-img -p` progress through
//! [`crate::progress`].

use anyhow::{bail, Context};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use volume_mgr::api;
use volume_mgr::client::Client;

use crate::human;
use crate::progress::{Progress, QemuProgressParser};

#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
    /// Whatever `qemu-img info` detects.
    Auto,
}

/// The image's (format, virtual size) from `qemu-img info --output=json`.
fn image_info(file: &Path, format: ImageFormat) -> anyhow::Result<(String, u64)> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["info", "--output=json"]);
    match format {
        ImageFormat::Raw => {
            cmd.args(["-f", "raw"]);
        }
        ImageFormat::Qcow2 => {
            cmd.args(["-f", "qcow2"]);
        }
        ImageFormat::Auto => {}
    }
    let out = cmd
        .arg(file)
        .output()
        .context("running qemu-img (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "qemu-img info {}: {}",
            file.display(),
            last_line(&out.stderr)
        );
    }
    let j: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("qemu-img info: unexpected output")?;
    let fmt = j["format"]
        .as_str()
        .context("qemu-img info: no format")?
        .to_string();
    let size = j["virtual-size"]
        .as_u64()
        .context("qemu-img info: no virtual-size")?;
    Ok((fmt, size))
}

fn last_line(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("failed")
        .trim()
        .to_string()
}

/// The NBD URL of `volume`: from `--nbd` if given, else from the node records: the lease
/// holder's blockd if it is up (another gateway would take the lease over and fence the
/// holder, e.g. a running VM's), else an up blockd whose unix socket exists on this host,
/// else the first up blockd's TCP address.
async fn nbd_url(client: &Client, volume: &str, over: Option<&str>) -> anyhow::Result<String> {
    if let Some(u) = over {
        return nbd_override(u, volume).map_err(anyhow::Error::msg);
    }
    let nodes = client.list_nodes().await?.items;
    let holder = match client.get_lease(volume).await {
        Ok(l) => Some(l.holder),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e.into()),
    };
    pick_nbd(&nodes, holder.as_deref(), volume, |s| Path::new(s).exists())
        .map_err(anyhow::Error::msg)
}

/// `--nbd`: a whole URL (`nbd://HOST:PORT/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`), a
/// unix socket path (`/run/fabric/nbd.sock`) or a TCP address (`HOST:PORT`); the export
/// name is the volume's when not in the URL.
fn nbd_override(u: &str, volume: &str) -> Result<String, String> {
    let u = u.trim();
    if u.starts_with("nbd://") || u.starts_with("nbd+unix://") {
        return Ok(u.to_string());
    }
    if u.starts_with('/') {
        return Ok(format!("nbd+unix:///{volume}?socket={u}"));
    }
    let port_ok = u
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
    if port_ok && !u.contains('/') && !u.contains(char::is_whitespace) {
        return Ok(format!("nbd://{u}/{volume}"));
    }
    Err(format!(
        "--nbd {u:?}: expected nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH, a socket path or HOST:PORT"
    ))
}

/// The choice of [`nbd_url`], without I/O: `local_socket` says whether a socket path exists
/// here.
fn pick_nbd(
    nodes: &[api::Node],
    holder: Option<&str>,
    volume: &str,
    local_socket: impl Fn(&str) -> bool,
) -> Result<String, String> {
    let up: Vec<&api::Node> = nodes
        .iter()
        .filter(|n| n.state == api::NodeState::Up)
        .collect();
    let url = |n: &api::Node| -> Option<String> {
        match n.nbd_socket.as_deref().filter(|s| local_socket(s)) {
            Some(s) => Some(format!("nbd+unix:///{volume}?socket={s}")),
            None if !n.nbd_address.is_empty() => Some(format!("nbd://{}/{volume}", n.nbd_address)),
            None => None,
        }
    };
    if let Some(h) = holder.and_then(|h| up.iter().find(|n| n.name == h)) {
        if let Some(u) = url(h) {
            return Ok(u);
        }
    }
    if let Some(n) = up
        .iter()
        .find(|n| n.nbd_socket.as_deref().is_some_and(&local_socket))
    {
        if let Some(u) = url(n) {
            return Ok(u);
        }
    }
    up.iter().find_map(|n| url(n)).ok_or_else(|| {
        format!("no blockd node is up to serve volume {volume} over NBD (see fabctl node ls)")
    })
}

/// Runs `qemu-img convert -p ARGS`, its progress shown as `label` over `total` bytes.
fn convert(args: &[&str], label: &str, total: u64) -> anyhow::Result<std::time::Duration> {
    let mut child = Command::new("qemu-img")
        .arg("convert")
        .arg("-p")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running qemu-img (is it installed?)")?;
    let mut stderr = child.stderr.take().context("qemu-img stderr")?;
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let mut stdout = child.stdout.take().context("qemu-img stdout")?;
    let mut progress = Progress::new(label, total);
    let mut parser = QemuProgressParser::default();
    let mut buf = [0u8; 512];
    loop {
        match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(p) = parser.feed(&buf[..n]).last() {
                    progress.set_percent(*p);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let status = child.wait().context("waiting for qemu-img")?;
    let err = err_thread.join().unwrap_or_default();
    if !status.success() {
        progress.abandon();
        bail!("qemu-img convert: {}", last_line(&err));
    }
    Ok(progress.finish())
}

pub struct ImportArgs<'a> {
    pub name: &'a str,
    pub file: &'a Path,
    pub format: ImageFormat,
    pub create: bool,
    pub replicas: Option<u32>,
    pub nbd: Option<&'a str>,
    /// Print the result as JSON.
    pub json: bool,
}

/// A path qemu-img cannot take for a protocol (`nbd:…`, `file:…`): absolute.
fn plain_path(p: &Path) -> anyhow::Result<String> {
    let abs = std::path::absolute(p).with_context(|| format!("{}", p.display()))?;
    abs.to_str()
        .map(String::from)
        .with_context(|| format!("{}: not a UTF-8 path", p.display()))
}

pub async fn import(client: &Client, a: ImportArgs<'_>) -> anyhow::Result<()> {
    if !a.file.is_file() {
        bail!("{}: no such file", a.file.display());
    }
    let file = plain_path(a.file)?;
    let (fmt, vsize) = image_info(Path::new(&file), a.format)?;
    let mut created = false;
    let vol = match client.get_volume(a.name).await {
        Ok(v) => v,
        Err(e) if e.is_not_found() && a.create => {
            // Volumes are whole 4 KiB blocks.
            let size = vsize.div_ceil(4096).max(1) * 4096;
            let v = client
                .create_volume(&api::CreateVolume {
                    name: a.name.to_string(),
                    size,
                    replicas: a.replicas,
                    min_replicas: None,
                })
                .await?;
            created = true;
            eprintln!(
                "fabctl: created volume {} ({}) for the image",
                v.name,
                human(v.size)
            );
            v
        }
        Err(e) if e.is_not_found() => {
            bail!("volume {} does not exist (--create makes it)", a.name)
        }
        Err(e) => return Err(e.into()),
    };
    if vol.size < vsize {
        bail!(
            "volume {} is {} ({} bytes), smaller than the image's virtual size {} ({} bytes)",
            vol.name,
            human(vol.size),
            vol.size,
            human(vsize),
            vsize
        );
    }
    let copy = async {
        let url = nbd_url(client, &vol.name, a.nbd).await?;
        wait_export(&url, created).await?;
        convert(
            &["-n", "-f", &fmt, "-O", "raw", &file, &url],
            &format!("import {}", vol.name),
            vsize,
        )
    };
    let took = match copy.await {
        Ok(t) => t,
        Err(e) if created => {
            // Do not leave a half-written volume behind that --create made.
            return Err(match client.delete_volume(&vol.name).await {
                Ok(()) => e.context(format!("volume {} (created for it) deleted", vol.name)),
                Err(d) => e.context(format!(
                    "volume {} (created for it) could not be deleted: {d}",
                    vol.name
                )),
            });
        }
        Err(e) => return Err(e),
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "volume": vol.name,
                "file": file,
                "format": fmt,
                "bytes": vsize,
                "created": created,
                "seconds": took.as_secs_f64(),
            })
        );
    } else {
        println!(
            "imported {} ({fmt}, {}) into volume {} in {}",
            a.file.display(),
            human(vsize),
            vol.name,
            crate::progress::duration(took)
        );
    }
    Ok(())
}

/// Checks that `qemu-img info` opens the export; a freshly created volume (`patient`) may take
/// a moment to be served, so then it retries for up to 15 s.
async fn wait_export(url: &str, patient: bool) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    loop {
        let out = Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "raw", url])
            .output()
            .context("running qemu-img (is it installed?)")?;
        if out.status.success() {
            return Ok(());
        }
        if !patient || start.elapsed() > std::time::Duration::from_secs(15) {
            bail!("NBD export {url}: {}", last_line(&out.stderr));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

pub async fn export(
    client: &Client,
    name: &str,
    file: &Path,
    format: ImageFormat,
    nbd: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let fmt = match format {
        ImageFormat::Raw => "raw",
        ImageFormat::Qcow2 => "qcow2",
        ImageFormat::Auto => bail!("--format auto is for import; export takes raw or qcow2"),
    };
    let vol = client.get_volume(name).await.map_err(|e| {
        if e.is_not_found() {
            anyhow::anyhow!("volume {name} does not exist")
        } else {
            e.into()
        }
    })?;
    if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!("{}: no such directory", parent.display());
        }
    }
    let f = plain_path(file)?;
    let url = nbd_url(client, &vol.name, nbd).await?;
    wait_export(&url, false).await?;
    let took = convert(
        &["-f", "raw", "-O", fmt, &url, &f],
        &format!("export {}", vol.name),
        vol.size,
    )?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "volume": vol.name,
                "file": f,
                "format": fmt,
                "bytes": vol.size,
                "seconds": took.as_secs_f64(),
            })
        );
    } else {
        println!(
            "exported volume {} ({}) to {} ({fmt}) in {}",
            vol.name,
            human(vol.size),
            file.display(),
            crate::progress::duration(took)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, up: bool, sock: Option<&str>, addr: &str) -> api::Node {
        api::Node {
            name: name.into(),
            address: "127.0.0.1:1".into(),
            nbd_address: addr.into(),
            nbd_socket: sock.map(String::from),
            zone: name.into(),
            state: if up {
                api::NodeState::Up
            } else {
                api::NodeState::Down
            },
            last_heartbeat_ms: 0,
            registered_ms: 0,
        }
    }

    #[test]
    fn nbd_is_picked_from_the_node_records() {
        let local = |s: &str| s == "/here.sock";
        let nodes = [
            node("a", true, Some("/elsewhere.sock"), "10.0.0.1:10809"),
            node("b", true, Some("/here.sock"), "10.0.0.2:10809"),
            node("c", false, Some("/here.sock"), "10.0.0.3:10809"),
        ];
        // No lease: the local socket.
        assert_eq!(
            pick_nbd(&nodes, None, "v", local).unwrap(),
            "nbd+unix:///v?socket=/here.sock"
        );
        // The lease holder wins, over TCP when its socket is not here.
        assert_eq!(
            pick_nbd(&nodes, Some("a"), "v", local).unwrap(),
            "nbd://10.0.0.1:10809/v"
        );
        // A holder that is down is passed over.
        assert_eq!(
            pick_nbd(&nodes, Some("c"), "v", local).unwrap(),
            "nbd+unix:///v?socket=/here.sock"
        );
        // No local socket: the first up node's TCP address.
        assert_eq!(
            pick_nbd(&nodes, None, "v", |_| false).unwrap(),
            "nbd://10.0.0.1:10809/v"
        );
        // Nobody up.
        let down = [node("c", false, Some("/here.sock"), "10.0.0.3:10809")];
        assert!(pick_nbd(&down, None, "v", local)
            .unwrap_err()
            .contains("no blockd node is up"));
        // Up but nothing to reach it by.
        let bare = [node("d", true, None, "")];
        assert!(pick_nbd(&bare, Some("d"), "v", local).is_err());
    }

    #[test]
    fn nbd_override_forms() {
        assert_eq!(nbd_override("nbd://h:1/x", "v").unwrap(), "nbd://h:1/x");
        assert_eq!(
            nbd_override("/run/fabric/nbd.sock", "v").unwrap(),
            "nbd+unix:///v?socket=/run/fabric/nbd.sock"
        );
        assert_eq!(
            nbd_override("127.0.0.1:10809", "v").unwrap(),
            "nbd://127.0.0.1:10809/v"
        );
        for bad in [
            "", "http://x", "h:", ":1", "h:0", "h:99999", "h:1/x", "a b:1",
        ] {
            assert!(nbd_override(bad, "v").is_err(), "{bad}");
        }
    }
}
