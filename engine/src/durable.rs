//! Writes that survive a crash or a power cut: a file written under a temporary name is synced,
//! renamed into place, and the directory holding the new name is synced too (a rename is only
//! durable once its directory entry is). Filesystems that cannot sync a directory (procfs, some
//! network and FUSE filesystems answer EINVAL or ENOTSUP) are taken as they are; any other
//! failure is an error.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Syncs the entries of the directory `dir` (the names created, renamed or removed in it).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    match File::open(dir)?.sync_all() {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP)) => Ok(()),
        other => other,
    }
}

/// Moves the finished file `tmp` to `dest` durably: syncs its data, renames it over `dest`
/// (which is replaced whole or not at all), and syncs `dest`'s directory.
pub fn persist(tmp: &Path, dest: &Path) -> io::Result<()> {
    File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, dest)?;
    sync_dir(dest.parent().unwrap_or(Path::new(".")))
}

/// A file written beside its destination under a temporary name (`.NAME.partial-PID`), which
/// [`PartialFile::commit`] flushes and [`persist`]s over the destination. Dropped uncommitted
/// (a run that failed half-way), it removes the temporary file: the destination is either the
/// old file or the whole new one.
pub struct PartialFile {
    out: Option<BufWriter<File>>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl PartialFile {
    pub fn create(dest: &Path) -> io::Result<Self> {
        let name = dest.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a file name", dest.display()),
            )
        })?;
        let tmp = dest.with_file_name(format!(
            ".{}.partial-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = File::create(&tmp)?;
        Ok(PartialFile {
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            tmp,
            dest: dest.to_path_buf(),
        })
    }

    /// The file's writer (buffered).
    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.out.as_mut().expect("present until commit")
    }

    /// Flushes the data and moves the file durably to its destination.
    pub fn commit(mut self) -> io::Result<()> {
        let out = self.out.take().expect("present until commit");
        out.into_inner().map_err(|e| e.into_error())?.flush()?;
        persist(&self.tmp, &self.dest)
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        // committed or not, no temporary file stays behind (after a commit it is already gone)
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_file_appears_whole_on_commit_and_not_at_all_otherwise() {
        let dir = std::env::temp_dir().join(format!("moe-edge-partial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("out");
        std::fs::write(&dest, b"old").unwrap();
        let mut f = PartialFile::create(&dest).unwrap();
        f.writer().write_all(b"half").unwrap();
        drop(f);
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary left"
        );
        let mut f = PartialFile::create(&dest).unwrap();
        f.writer().write_all(b"new").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        assert!(PartialFile::create(Path::new("/")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_persisted_file_replaces_the_old_one_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("moe-edge-durable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (tmp, dest) = (dir.join(".out.partial"), dir.join("out"));
        std::fs::write(&dest, b"old").unwrap();
        std::fs::write(&tmp, b"new").unwrap();
        persist(&tmp, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert!(!tmp.exists());
        // a missing temporary is an error, and the destination is untouched
        let err = persist(&tmp, &dest).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn directories_that_cannot_be_synced_are_accepted_and_missing_ones_are_not() {
        sync_dir(&std::env::temp_dir()).unwrap();
        // procfs answers EINVAL to fsync of a directory: not a failure of the write
        let proc_err = File::open("/proc/self").unwrap().sync_all().unwrap_err();
        assert_eq!(proc_err.raw_os_error(), Some(libc::EINVAL));
        sync_dir(Path::new("/proc/self")).unwrap();
        let missing = sync_dir(Path::new("/nonexistent/moe-edge")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
