//! An opened expert file: header and table read and validated against the file size at open;
//! everything read with explicit positioned reads (no memory map), so that a file truncated or
//! changed by another process gives an I/O error or a checksum mismatch instead of SIGBUS; tensor
//! data dropped from the page cache after each read, so that the expert cache's budget bounds the
//! memory the experts really take.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::format::{Entry, Header, TensorKind, ENTRY_BYTES, HEADER_BYTES, MAX_ENTRIES, NO_EXPERT};
use crate::error::{Error, Result};

/// The validated table of an expert file.
#[derive(Debug)]
pub struct PackFile {
    pub path: PathBuf,
    file: File,
    pub entries: Vec<Entry>,
    /// (layer, expert, kind) -> index into `entries`
    index: HashMap<(u32, u32, u16), usize>,
}

impl PackFile {
    /// Opens and validates `path`: header, table checksum, and every entry's offset and length
    /// against the file size.
    pub fn open(path: &Path) -> Result<Self> {
        let corrupt = |m: String| Error::CorruptPack(format!("{}: {m}", path.display()));
        let file = crate::files::open_regular(path)?;
        let size = file.metadata().map_err(Error::io(path))?.len();
        if size < HEADER_BYTES as u64 {
            return Err(corrupt(format!(
                "file is {size} bytes, shorter than its header"
            )));
        }
        let read = |offset: u64, len: u64, what: &str| -> Result<Vec<u8>> {
            let mut buf = zeroed(len as usize).map_err(|e| corrupt(format!("the {what}: {e}")))?;
            file.read_exact_at(&mut buf, offset)
                .map_err(|e| corrupt(format!("reading the {what}: {e}")))?;
            Ok(buf)
        };
        let header = Header::decode(&read(0, HEADER_BYTES as u64, "header")?)
            .map_err(|e| corrupt(e.to_string()))?;
        if header.file_bytes != size {
            return Err(corrupt(format!(
                "file is {size} bytes but its header says {} (truncated or extended)",
                header.file_bytes
            )));
        }
        if header.entry_count > MAX_ENTRIES {
            return Err(corrupt(format!(
                "the table claims {} entries, more than the {MAX_ENTRIES} a pack may have",
                header.entry_count
            )));
        }
        let table_len = u64::from(header.entry_count).saturating_mul(ENTRY_BYTES as u64);
        if header
            .table_offset
            .checked_add(table_len)
            .is_none_or(|end| end > size)
        {
            return Err(corrupt("table runs past the end of the file".into()));
        }
        // bounded by the file's size, checked above
        let table = read(header.table_offset, table_len, "table")?;
        if crc32fast::hash(&table) != header.table_crc32 && !cfg!(fuzzing) {
            return Err(corrupt("table checksum mismatch".into()));
        }
        let mut entries = Vec::with_capacity(header.entry_count as usize);
        let mut index = HashMap::new();
        for (i, raw) in table.chunks_exact(ENTRY_BYTES).enumerate() {
            let e = Entry::decode(raw, i).map_err(|e| corrupt(e.to_string()))?;
            let end = e
                .offset
                .checked_add(e.length)
                .ok_or_else(|| corrupt(format!("{}: offset overflows", e.describe())))?;
            if e.offset < header.data_offset || end > size {
                return Err(corrupt(format!(
                    "{}: data at {}..{} lies outside the data area {}..{size}",
                    e.describe(),
                    e.offset,
                    end,
                    header.data_offset
                )));
            }
            if index
                .insert((e.layer, e.expert, e.kind as u16), i)
                .is_some()
            {
                return Err(corrupt(format!(
                    "{} appears twice in the table",
                    e.describe()
                )));
            }
            entries.push(e);
        }
        #[cfg(target_os = "linux")]
        {
            // experts are read whole, each with one pread: kernel readahead past them would only
            // fill the page cache with bytes nobody asked for (a hint: failure only warns)
            // SAFETY: posix_fadvise only reads its integer arguments; `file` is open.
            let rc =
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
            if rc != 0 {
                log::warn!(
                    "posix_fadvise(RANDOM) failed on {}: error {rc}",
                    path.display()
                );
            }
        }
        Ok(PackFile {
            path: path.to_path_buf(),
            file,
            entries,
            index,
        })
    }

    /// The entry of a tensor.
    pub fn entry(&self, layer: u32, expert: Option<u32>, kind: TensorKind) -> Result<&Entry> {
        let key = (layer, expert.unwrap_or(NO_EXPERT), kind as u16);
        self.index
            .get(&key)
            .and_then(|&i| self.entries.get(i))
            .ok_or_else(|| {
                Error::CorruptPack(format!(
                    "{}: no {:?} tensor for layer {layer}{}",
                    self.path.display(),
                    kind,
                    expert.map(|e| format!(" expert {e}")).unwrap_or_default()
                ))
            })
    }

    /// Reads the bytes `[offset, offset + len)` and asks the kernel to drop them from the page
    /// cache (a hint: failure only warns).
    pub fn read_range(&self, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
        let mut buf = zeroed(len)
            .map_err(|e| Error::CorruptPack(format!("{}: {what}: {e}", self.path.display())))?;
        self.read_exact_at(&mut buf, offset).map_err(|e| {
            Error::CorruptPack(format!(
                "{}: reading {what} at {offset}..{}: {e}",
                self.path.display(),
                offset.saturating_add(len as u64)
            ))
        })?;
        self.drop_from_page_cache(offset, len);
        Ok(buf)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(e) = faults::injected(&self.path) {
            return Err(e);
        }
        self.file.read_exact_at(buf, offset)
    }

    fn drop_from_page_cache(&self, offset: u64, len: usize) {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is owned
            // by `self.file` and open for the duration of the call.
            let rc = unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    offset as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
            if rc != 0 {
                log::warn!(
                    "posix_fadvise(DONTNEED) failed on {}: error {rc}",
                    self.path.display()
                );
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (offset, len, self.file.as_raw_fd());
    }

    /// Reads a tensor and checks its CRC-32.
    pub fn read_tensor(&self, e: &Entry) -> Result<Vec<u8>> {
        let bytes = self.read_range(e.offset, e.length as usize, &e.describe())?;
        check_crc(self, e, &bytes)?;
        Ok(bytes)
    }

    /// Checks every tensor's checksum (reads the whole file once).
    pub fn verify_all(&self) -> Result<()> {
        for e in &self.entries {
            self.read_tensor(e)?;
        }
        Ok(())
    }
}

/// A zeroed buffer of `len` bytes, or an error if the system refuses that much memory (a damaged
/// table can name a huge tensor in a sparse file: an error, not an abort).
fn zeroed(len: usize) -> std::result::Result<Vec<u8>, String> {
    // asked for first without touching it; then allocated zeroed, which for large sizes takes
    // fresh zero pages from the kernel instead of writing zeros before the read overwrites them
    Vec::<u8>::new()
        .try_reserve_exact(len)
        .map_err(|_| format!("{len} bytes do not fit in memory"))?;
    Ok(vec![0u8; len])
}

/// Checks a tensor's bytes against its table checksum.
pub fn check_crc(file: &PackFile, e: &Entry, bytes: &[u8]) -> Result<()> {
    if crc32fast::hash(bytes) != e.crc32 && !cfg!(fuzzing) {
        return Err(Error::CorruptPack(format!(
            "{}: {} checksum mismatch (the data is damaged)",
            file.path.display(),
            e.describe()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_buffer_larger_than_memory_is_an_error_not_an_abort() {
        // 2^50 bytes: beyond any address space a process gets, whatever the overcommit policy
        let err = super::zeroed(1 << 50).unwrap_err();
        assert!(err.contains("do not fit in memory"), "{err}");
        assert_eq!(super::zeroed(16).unwrap(), vec![0u8; 16]);
    }
}

/// Fault injection for tests: the reads of one expert file fail with EIO once a number of them
/// have succeeded.
#[cfg(test)]
pub(crate) mod faults {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::{LazyLock, Mutex};

    /// path -> reads that still succeed
    static PLAN: LazyLock<Mutex<HashMap<PathBuf, usize>>> = LazyLock::new(Default::default);

    /// Reads of `path` fail after `succeeding` more of them succeed.
    pub(crate) fn fail_reads_after(path: &Path, succeeding: usize) {
        PLAN.lock().unwrap().insert(path.to_path_buf(), succeeding);
    }

    /// Reads of `path` succeed again.
    pub(crate) fn clear(path: &Path) {
        PLAN.lock().unwrap().remove(path);
    }

    pub(super) fn injected(path: &Path) -> Option<std::io::Error> {
        let mut plan = PLAN.lock().unwrap();
        let left = plan.get_mut(path)?;
        if let Some(fewer) = left.checked_sub(1) {
            *left = fewer;
            return None;
        }
        Some(std::io::Error::from_raw_os_error(libc::EIO))
    }
}
