//! Writing a GGUF the commands make (`export-lora`, `convert-lora`) without
//! losing what was there: the inputs are never the output, and the file is
//! replaced whole or not at all.

use anyhow::{bail, Context, Result};
use gemma3_gguf::GgufWriter;

/// Refuses an output that names a directory (ends in a separator, `.` or
/// `..`), that exists and is not a regular file, that is one of `inputs`
/// (what each is, and its path: written over, it would be lost), or that
/// cannot be written ([`check_writable`]): each before a long job starts.
pub(crate) fn check_output(
    output: &std::path::Path,
    inputs: &[(&str, &std::path::Path)],
) -> Result<()> {
    let text = output.as_os_str().as_encoded_bytes();
    if text
        .last()
        .is_some_and(|&b| std::path::is_separator(b as char))
        || !matches!(
            output.components().next_back(),
            Some(std::path::Component::Normal(_))
        )
    {
        bail!(
            "the output {} names a directory, not a file",
            output.display()
        );
    }
    let Ok(meta) = std::fs::metadata(output) else {
        return check_writable(output);
    };
    if !meta.is_file() {
        bail!(
            "the output {} exists and is not a regular file",
            output.display()
        );
    }
    let out = std::fs::canonicalize(output).ok();
    if let Some((what, p)) = inputs
        .iter()
        .find(|(_, p)| std::fs::canonicalize(p).ok() == out)
    {
        bail!("the output {} is {what}, {}", output.display(), p.display());
    }
    check_writable(output)
}

/// The new file `path` is first written as, beside it: its name (the first
/// 100 characters, so that a name near the system's limit still has room)
/// with a dot before it and this process's id after it.
fn temporary(path: &std::path::Path) -> std::path::PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let name: String = name
        .unwrap_or_else(|| "out".into())
        .chars()
        .take(100)
        .collect();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Refuses an output that cannot be written (its directory missing, not a
/// directory, or not writable): creates the temporary file [`write_new`]
/// would and removes it, so that a long job finds out before it starts.
fn check_writable(path: &std::path::Path) -> Result<()> {
    let tmp = temporary(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .with_context(|| format!("cannot write the output {}", path.display()))?;
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}

/// `out` written to `path` whole or not at all: to a new file beside it
/// (created, never opened through an existing name or link, so two exports
/// at once each write their own), flushed to disk, checked by `check`, then
/// renamed over `path`; on failure the temporary file is removed and
/// whatever was at `path` stays.
pub(crate) fn write_new(
    out: &GgufWriter,
    path: &std::path::Path,
    check: impl FnOnce(&std::path::Path) -> Result<()>,
) -> Result<()> {
    let tmp = temporary(path);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|f| {
            out.write_to(&f)?;
            f.sync_all()
        })
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| check(&tmp))
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
