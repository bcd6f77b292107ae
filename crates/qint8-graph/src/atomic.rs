//! Output files written whole or not at all, the one way every crate
//! writes its files (models, plans, caches, NPY tensors, reports).

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why [`write_atomically`] failed: what it was doing, to which file.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct WriteError {
    /// What failed: `"creating"` (the file, through its temporary file),
    /// `"opening"` (a device or FIFO), `"writing"` or
    /// `"renaming a temporary file onto"`.
    pub action: &'static str,
    /// The file asked for (never the temporary file).
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: std::io::Error,
}

/// Writes `path` whole or not at all: `fill` writes a new temporary file
/// beside it, which is flushed, synced and renamed onto `path`, so a reader
/// never sees a half-written file; on any error the temporary file is
/// removed and `path` is left as it was.
///
/// A `path` that exists and is neither a regular file nor a directory (a
/// character device such as `/dev/null`, a FIFO; symbolic links followed)
/// is written in place instead: renaming onto it would replace the device
/// node itself, which for `/dev/null` breaks every later program that
/// reads or writes it.
pub fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), WriteError> {
    let fail = |action, path: &Path, source| WriteError {
        action,
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = fs::metadata(path) {
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_dir() {
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| fail("opening", path, e))?;
            let mut w = BufWriter::new(file);
            return fill(&mut w)
                .and_then(|()| w.flush())
                .map_err(|e| fail("writing", path, e));
        }
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| {
            // The usual cause, said plainly (the OS names no path).
            let e = match dir.is_dir() {
                false if e.kind() == std::io::ErrorKind::NotFound => std::io::Error::new(
                    e.kind(),
                    format!("the folder {} does not exist", dir.display()),
                ),
                _ => e,
            };
            fail("creating", path, e)
        })?;
    let mut w = BufWriter::new(file);
    let written = fill(&mut w)
        .and_then(|()| w.flush())
        .and_then(|()| w.get_ref().sync_all());
    drop(w);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(fail("writing", path, e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(fail("renaming a temporary file onto", path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names in `dir`, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_file_is_replaced_whole_or_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.bin");
        write_atomically(&p, |w| w.write_all(b"first")).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"first");
        write_atomically(&p, |w| w.write_all(b"second")).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        // A failure half way leaves the old file and no temporary one.
        let e = write_atomically(&p, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(e.action, "writing");
        assert!(e.to_string().contains("disk full"), "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"second");
        assert_eq!(listing(dir.path()), ["out.bin"]);
        // Onto a directory: an error, the directory kept.
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        assert!(write_atomically(&sub, |w| w.write_all(b"x")).is_err());
        assert!(sub.is_dir());
        assert_eq!(listing(dir.path()), ["out.bin", "sub"]);
        // In a missing folder: an error naming the file and the folder.
        let target = dir.path().join("no/out.bin");
        let e = write_atomically(&target, |w| w.write_all(b"x")).unwrap_err();
        assert_eq!((e.action, e.path.as_path()), ("creating", target.as_path()));
        let folder = dir.path().join("no");
        assert!(
            e.to_string()
                .contains(&format!("the folder {} does not exist", folder.display())),
            "{e}"
        );
    }

    /// A FIFO stands for every special file (`/dev/null` among them, which
    /// a test should not risk): it is written in place and stays a FIFO.
    #[cfg(unix)]
    #[test]
    fn a_special_file_is_written_in_place_not_replaced() {
        use std::io::Read;
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("note: mkfifo is not available; skipped");
            return;
        }
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                File::open(fifo).unwrap().read_to_end(&mut got).unwrap();
                got
            })
        };
        write_atomically(&fifo, |w| w.write_all(b"through the pipe")).unwrap();
        // Checked before waiting on the reader, which a replaced FIFO
        // would leave blocked.
        assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        assert_eq!(listing(dir.path()), ["pipe"]);
    }
}
