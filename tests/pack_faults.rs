//! `moe-edge pack` interrupted: killed at any moment, it leaves no directory under the output's
//! name that is not a whole pack, and the next pack cleans what it left; out of disk space, it
//! fails with a clear error and leaves nothing. The disk-space test mounts a small tmpfs, so it
//! needs root: CI runs it with `cargo test --test pack_faults -- --ignored` as root.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "moe-edge-pack-faults-{name}-{}",
        std::process::id()
    ));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn pack_cmd(out: &Path) -> Command {
    let mut c = moe_edge_cmd();
    c.args([
        "pack",
        tiny_model().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    c
}

fn greedy_text(model: &Path) -> Output {
    moe_edge_cmd()
        .args([
            "generate",
            "-m",
            model.to_str().unwrap(),
            "--prompt",
            "t10 t20 t30",
        ])
        .args(["--max-tokens", "12", "--json"])
        .output()
        .unwrap()
}

/// Names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_pack_killed_at_any_moment_leaves_no_partial_pack_and_the_next_one_cleans_up() {
    let dir = scratch("killed");
    let out = dir.join("pack");
    let reference = greedy_text(&tiny_model());
    assert!(reference.status.success());
    let text = |o: &Output| json_text(&o.stdout);
    // kill at increasing delays: before the output exists, while files are written, around the
    // rename (the debug binary takes a few hundred ms to pack the tiny model)
    let mut killed_midway = 0;
    for delay_ms in [0u64, 5, 20, 50, 100, 150, 200, 300, 400, 600] {
        let mut child = pack_cmd(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
        if !finished {
            killed_midway += 1;
        }
        if out.exists() {
            // whatever is under the output's name is a whole pack that generates as the model
            let got = greedy_text(&out);
            assert!(
                got.status.success(),
                "killed after {delay_ms} ms: {}",
                String::from_utf8_lossy(&got.stderr)
            );
            assert_eq!(text(&got), text(&reference), "killed after {delay_ms} ms");
        }
    }
    assert!(
        killed_midway > 0,
        "every pack finished before it was killed"
    );
    // a pack that completes removes the hidden directories the killed ones left
    let done = pack_cmd(&out).output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(names(&dir), ["pack"], "leftovers beside the output");
    assert_eq!(text(&greedy_text(&out)), text(&reference));
    std::fs::remove_dir_all(&dir).ok();
}

fn json_text(stdout: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(stdout).unwrap();
    v["text"].as_str().unwrap().to_string()
}

#[test]
#[ignore = "mounts a tmpfs: needs root (CI runs it as root)"]
fn a_pack_out_of_disk_space_fails_clearly_and_leaves_nothing() {
    let dir = scratch("enospc");
    // how many bytes the pack takes
    let whole = dir.join("whole");
    assert!(pack_cmd(&whole).output().unwrap().status.success());
    let bytes: u64 = std::fs::read_dir(&whole)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    // a filesystem with room for a third of it
    let mnt = dir.join("small-disk");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={}", bytes / 3), "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs (needs root)");
    let out = mnt.join("pack");
    let failed = pack_cmd(&out).output().unwrap();
    let names_after = names(&mnt);
    Command::new("umount").arg(&mnt).status().unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        names_after.is_empty(),
        "left on the full disk: {names_after:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
