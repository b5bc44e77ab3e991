//! Every input kept for the fuzz targets (`fuzz/corpus/<target>/`: the seeds and what the long
//! runs found worth keeping; `fuzz/regressions/<target>/`: inputs that once crashed a target)
//! runs through its target in the ordinary test suite, without libFuzzer: a fix that regresses
//! fails here.

use std::path::Path;

use moe_edge_fuzz::{repo_root, run, TARGETS};

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut files: Vec<_> = entries
        .map(|e| e.expect("a readable corpus directory").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_kept_input_runs_through_its_target() {
    let fuzz = repo_root().join("fuzz");
    for target in TARGETS {
        let seeds = inputs(&fuzz.join("corpus").join(target));
        assert!(!seeds.is_empty(), "fuzz/corpus/{target} holds no input");
        let regressions = inputs(&fuzz.join("regressions").join(target));
        for file in seeds.iter().chain(&regressions) {
            let data = std::fs::read(file).expect("a readable input");
            // a panic names the input: the test harness prints it with the panic message
            eprintln!("{target}: {}", file.display());
            run(target, &data);
        }
        eprintln!(
            "{target}: {} inputs, {} regressions",
            seeds.len(),
            regressions.len()
        );
    }
    moe_edge_fuzz::remove_scratch();
}
