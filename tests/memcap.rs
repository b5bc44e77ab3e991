//! `tools/memcap` removes its memory cgroup whatever happens to the command: normal exit, OOM
//! kill, timeout, Ctrl-C. They need root and a cgroup memory controller, so they are ignored by a
//! plain `cargo test`; CI runs them as root with `cargo test --test memcap -- --ignored`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn memcap() -> Command {
    let mut c = Command::new("python3");
    c.arg(format!("{}/tools/memcap", env!("CARGO_MANIFEST_DIR")));
    c
}

/// Every directory named `name` under the cgroup mounts.
fn cgroup_dirs(name: &str) -> Vec<String> {
    let out = Command::new("find")
        .args([
            "/sys/fs/cgroup",
            "-maxdepth",
            "4",
            "-type",
            "d",
            "-name",
            name,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

fn report(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.lines().last().expect("a report line")).unwrap()
}

#[test]
#[ignore = "needs root and a cgroup memory controller: cargo test --test memcap -- --ignored"]
fn cgroup_is_removed_after_exit_oom_and_timeout() {
    let name = format!("memcap-test-{}", std::process::id());
    let run = |limit: &str, extra: &[&str], cmd: &[&str]| {
        let out = memcap()
            .args(["--limit-mb", limit, "--name", &name])
            .args(extra)
            .arg("--")
            .args(cmd)
            .output()
            .unwrap();
        assert!(
            cgroup_dirs(&name).is_empty(),
            "cgroup left behind: {:?}",
            cgroup_dirs(&name)
        );
        report(&out.stdout)
    };
    let ok = run("64", &[], &["python3", "-c", "print('hello')"]);
    assert_eq!(ok["returncode"], 0);
    assert_eq!(ok["cgroup_removed"], true);
    assert!(ok["cgroup_peak_bytes"].as_u64().unwrap() > 0);

    let oom = run(
        "40",
        &[],
        &["python3", "-c", "x = bytearray(300 << 20); print(len(x))"],
    );
    assert_eq!(oom["oom_kills"], 1, "{oom}");
    assert!(oom["cgroup_peak_bytes"].as_u64().unwrap() <= 40 << 20);

    let slow = run("64", &["--timeout", "0.5"], &["sleep", "30"]);
    assert_eq!(slow["timed_out"], true);
}

#[test]
#[ignore = "needs root and a cgroup memory controller: cargo test --test memcap -- --ignored"]
fn cgroup_is_removed_on_ctrl_c() {
    let name = format!("memcap-int-{}", std::process::id());
    let child = memcap()
        .args(["--limit-mb", "64", "--name", &name, "--", "sleep", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while cgroup_dirs(&name).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "cgroup never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let dir = cgroup_dirs(&name).remove(0);
    assert!(Path::new(&dir).join("cgroup.procs").exists());
    // SAFETY: sending a signal to our own child process by pid has no memory-safety concerns.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(rc, 0);
    let out = child.wait_with_output().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "memcap did not stop the command"
    );
    assert!(
        cgroup_dirs(&name).is_empty(),
        "cgroup left behind after Ctrl-C"
    );
    assert_eq!(report(&out.stdout)["interrupted_by"], 2);
}
