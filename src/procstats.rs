//! Process resource readings from `/proc/self` (Linux): peak resident memory and bytes read.
//! On other systems the readings are `None`.

/// Peak resident set size of this process (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

/// Current resident set size (`VmRSS`), in bytes.
#[cfg(test)]
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// I/O counters of this process: `(read_bytes from storage, rchar through read calls)`.
pub fn io_read_bytes() -> Option<(u64, u64)> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    let field = |k: &str| {
        io.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l[k.len()..].trim().parse().ok())
    };
    Some((field("read_bytes:")?, field("rchar:")?))
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn readings_are_plausible() {
        // the high-water mark read after a current reading is at least that reading
        let now = super::rss_bytes().unwrap();
        let peak = super::peak_rss_bytes().unwrap();
        assert!(peak >= now && now > 100 * 1024, "peak {peak} now {now}");
        // reading a file increases rchar by at least its size
        let (_, before) = super::io_read_bytes().unwrap();
        let n = std::fs::read(env!("CARGO_MANIFEST_DIR").to_string() + "/Cargo.toml")
            .unwrap()
            .len() as u64;
        let (_, after) = super::io_read_bytes().unwrap();
        assert!(after - before >= n);
    }
}
