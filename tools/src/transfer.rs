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

/// The NBD URL of `volume`: `--nbd` if given, else a registered, up blockd's unix socket
/// (when it exists on this host) or its TCP address.
async fn nbd_url(client: &Client, volume: &str, over: Option<&str>) -> anyhow::Result<String> {
    if let Some(u) = over {
        if !(u.starts_with("nbd://") || u.starts_with("nbd+unix://")) {
            bail!("--nbd {u:?}: expected nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH");
        }
        return Ok(u.to_string());
    }
    let nodes = client.list_nodes().await?.items;
    let up: Vec<&api::Node> = nodes
        .iter()
        .filter(|n| n.state == api::NodeState::Up)
        .collect();
    if let Some(s) = up
        .iter()
        .filter_map(|n| n.nbd_socket.as_deref())
        .find(|s| Path::new(s).exists())
    {
        return Ok(format!("nbd+unix:///{volume}?socket={s}"));
    }
    match up.iter().find(|n| !n.nbd_address.is_empty()) {
        Some(n) => Ok(format!("nbd://{}/{volume}", n.nbd_address)),
        None => bail!("no blockd node is up to serve volume {volume} over NBD (fabctl node ls)"),
    }
}

/// Runs `qemu-img convert -p ARGS`, its progress shown as `label` over `total` bytes.
fn convert(args: &[&str], label: &str, total: u64) -> anyhow::Result<()> {
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
    progress.finish();
    Ok(())
}

pub struct ImportArgs<'a> {
    pub name: &'a str,
    pub file: &'a Path,
    pub format: ImageFormat,
    pub create: bool,
    pub replicas: Option<u32>,
    pub nbd: Option<&'a str>,
}

pub async fn import(client: &Client, a: ImportArgs<'_>) -> anyhow::Result<()> {
    if !a.file.is_file() {
        bail!("{}: no such file", a.file.display());
    }
    let (fmt, vsize) = image_info(a.file, a.format)?;
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
    let url = nbd_url(client, &vol.name, a.nbd).await?;
    let file = a.file.to_string_lossy();
    wait_export(&url).await?;
    convert(
        &["-n", "-f", &fmt, "-O", "raw", &file, &url],
        &format!("import {}", vol.name),
        vsize,
    )?;
    println!(
        "imported {} ({fmt}, {}) into volume {}",
        a.file.display(),
        human(vsize),
        vol.name
    );
    Ok(())
}

/// A freshly created volume may take a moment to be served: wait (bounded) until
/// `qemu-img info` opens the export.
async fn wait_export(url: &str) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    loop {
        let out = Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "raw", url])
            .output()
            .context("running qemu-img (is it installed?)")?;
        if out.status.success() {
            return Ok(());
        }
        if start.elapsed() > std::time::Duration::from_secs(15) {
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
    let url = nbd_url(client, &vol.name, nbd).await?;
    wait_export(&url).await?;
    let f = file.to_string_lossy();
    convert(
        &["-f", "raw", "-O", fmt, &url, &f],
        &format!("export {}", vol.name),
        vol.size,
    )?;
    println!(
        "exported volume {} ({}) to {} ({fmt})",
        vol.name,
        human(vol.size),
        file.display()
    );
    Ok(())
}
