//! Packed models: exactness of f32 packs, accuracy of int8 packs against torch, generation with
//! the smallest cache budget, and damaged pack files.

use std::path::{Path, PathBuf};

use super::format::{
    Entry, Header, TensorFormat, TensorKind, ENTRY_BYTES, HEADER_BYTES, NO_EXPERT,
};
use super::{pack_model, ExpertFormat, PackOptions};
use crate::sampling::argmax;
use crate::test_support::*;
use crate::{Error, LoadOptions, Model, Session};

const EXPORTS: [(&str, &str); 9] = [
    ("mixtral", "legacy_batched"),
    ("mixtral", "dynamo_batched"),
    ("olmoe", "legacy_batched"),
    ("olmoe", "dynamo_batched"),
    ("qwen2_moe", "legacy_batched"),
    ("qwen2_moe", "dynamo_batched"),
    ("qwen3_moe", "legacy_batched"),
    ("granitemoe", "legacy_batched"),
    ("granitemoe", "dynamo_batched"),
];

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moe-edge-pack-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn pack(src: &Path, name: &str, experts: ExpertFormat) -> PathBuf {
    pack_with(
        src,
        name,
        PackOptions {
            experts,
            ..Default::default()
        },
    )
}

fn pack_with(src: &Path, name: &str, opts: PackOptions) -> PathBuf {
    let out = scratch(name);
    pack_model(src, &out, &opts).unwrap();
    out
}

fn logits(model: &Model, input: usize) -> (Vec<f32>, usize) {
    let ids = read_npy::<i64>(&fixtures().join(format!("hf-moe/inputs/input_ids_{input}.npy")));
    model
        .logits(ids.as_slice().unwrap(), ids.shape()[0])
        .unwrap()
}

#[test]
fn f32_pack_gives_the_unpacked_logits() {
    for (arch, method) in EXPORTS {
        let src = kit_export(arch, method);
        let unpacked = Model::load(&src, LoadOptions::default()).unwrap();
        let dir = pack(&src, &format!("f32-{arch}-{method}"), ExpertFormat::F32);
        let packed = Model::load(&dir, LoadOptions::default()).unwrap();
        assert!(packed.cache_stats().is_some() && packed.blocks().len() == 2);
        for i in 0..5 {
            let (a, _) = logits(&unpacked, i);
            let (b, _) = logits(&packed, i);
            let d = max_abs_diff(&a, &b);
            assert!(
                d < 1e-5,
                "{arch}/{method} input {i}: packed f32 differs by {d}"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

fn log_softmax(v: &[f32]) -> Vec<f64> {
    let m = v.iter().cloned().fold(f32::MIN, f32::max) as f64;
    let lse = v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    v.iter().map(|&x| x as f64 - lse).collect()
}

/// Max abs logit diff, top-1 agreement and mean KL(torch || model) over every position of the
/// five inputs.
fn accuracy_vs_torch(model: &Model, arch: &str) -> (f32, f64, f64) {
    let (mut worst, mut agree, mut positions, mut kl_sum) = (0f32, 0usize, 0usize, 0f64);
    for i in 0..5 {
        let (got, vocab) = logits(model, i);
        let torch =
            read_npy::<f32>(&fixtures().join(format!("hf-moe/models/{arch}/torch_logits_{i}.npy")));
        let torch = torch.as_slice().unwrap();
        worst = worst.max(max_abs_diff(&got, torch));
        for (g, t) in got.chunks(vocab).zip(torch.chunks(vocab)) {
            positions += 1;
            agree += (argmax(g) == argmax(t)) as usize;
            let (lg, lt) = (log_softmax(g), log_softmax(t));
            kl_sum += lt
                .iter()
                .zip(&lg)
                .map(|(a, b)| a.exp() * (a - b))
                .sum::<f64>();
        }
    }
    (
        worst,
        agree as f64 / positions as f64,
        kl_sum / positions as f64,
    )
}

/// int8 experts against torch, with f16 block scales (the default) and f32 ones. Bounds: top-1
/// agreement >= 90% and mean KL < 0.01 nats (random tiny models have many near-ties, see the kit
/// README); f16 scales within 10% (+1e-6) of f32 scales' KL, which is why they are the default.
#[test]
fn int8_pack_accuracy_against_torch() {
    use crate::kernels::q8::ScaleType;
    println!(
        "{:<12} {:<15} {:>7} {:>10} {:>8} {:>10}",
        "arch", "export", "scales", "max|diff|", "top-1", "mean KL"
    );
    for (arch, method) in EXPORTS {
        let src = kit_export(arch, method);
        let mut kls = vec![];
        for scales in [ScaleType::F16, ScaleType::F32] {
            let opts = PackOptions {
                experts: ExpertFormat::Int8,
                int8_scales: scales,
                ..Default::default()
            };
            let dir = pack_with(&src, &format!("int8-{arch}-{method}-{scales:?}"), opts);
            let packed = Model::load(&dir, LoadOptions::default()).unwrap();
            let (worst, top1, kl) = accuracy_vs_torch(&packed, arch);
            println!(
                "{arch:<12} {method:<15} {:>7} {worst:>10.4} {:>7.1}% {kl:>10.2e}",
                format!("{scales:?}"),
                100.0 * top1
            );
            assert!(top1 >= 0.9, "{arch}/{method}: top-1 agreement {top1}");
            assert!(kl < 0.01, "{arch}/{method}: mean KL {kl}");
            kls.push(kl);
            std::fs::remove_dir_all(&dir).ok();
        }
        assert!(
            kls[0] <= kls[1] * 1.1 + 1e-6,
            "{arch}/{method}: f16 scales KL {} vs f32 {}",
            kls[0],
            kls[1]
        );
    }
}

/// `pack --dense int8` also quantises the attention projections and the LM head: every MatMul
/// by a constant weight leaves the graph, and the cost against torch is measured (bounds: top-1
/// agreement >= 85%, mean KL < 0.05 nats; printed with --nocapture).
#[test]
fn dense_int8_pack_accuracy_against_torch() {
    println!(
        "{:<12} {:<15} {:>6} {:>10} {:>8} {:>10}",
        "arch", "export", "dense", "max|diff|", "top-1", "mean KL"
    );
    for (arch, method) in EXPORTS {
        let src = kit_export(arch, method);
        let opts = PackOptions {
            experts: ExpertFormat::Int8,
            dense_int8: true,
            ..Default::default()
        };
        let dir = pack_with(&src, &format!("dense-{arch}-{method}"), opts);
        let model = Model::load(&dir, LoadOptions::default()).unwrap();
        let n_dense = model.ops.linear.len();
        assert!(
            n_dense >= 9,
            "{arch}/{method}: {n_dense} dense layers packed (q, k, v, o per layer + LM head)"
        );
        let graph = model.proto.graph.as_ref().unwrap();
        let inits: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let left = graph
            .node
            .iter()
            .filter(|n| n.op_type == "MatMul" && inits.contains(n.input[1].as_str()))
            .count();
        assert_eq!(
            left, 0,
            "{arch}/{method}: MatMul by a constant weight left in the graph"
        );
        let (worst, top1, kl) = accuracy_vs_torch(&model, arch);
        println!(
            "{arch:<12} {method:<15} {n_dense:>6} {worst:>10.4} {:>7.1}% {kl:>10.2e}",
            100.0 * top1
        );
        assert!(top1 >= 0.85, "{arch}/{method}: top-1 agreement {top1}");
        assert!(kl < 0.05, "{arch}/{method}: mean KL {kl}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

fn greedy(model: &Model, prompt: &[i64], steps: usize) -> Vec<i64> {
    let mut s = Session::new(model).unwrap();
    let mut logits = s.feed(prompt).unwrap();
    let mut out = vec![];
    for _ in 0..steps {
        let t = argmax(&logits) as i64;
        out.push(t);
        logits = s.feed(&[t]).unwrap();
    }
    out
}

/// With the budget at its minimum (one expert), generation gives the same tokens as with every
/// expert cached, misses happen, and the cache never holds more than its budget.
#[test]
fn smallest_cache_budget_gives_the_same_tokens() {
    for arch in ARCHS {
        let src = fixtures().join("hf-moe-kv").join(arch).join("model.onnx");
        let dir = pack(&src, &format!("kv-{arch}"), ExpertFormat::Int8);
        let full = Model::load(&dir, LoadOptions::default()).unwrap();
        let tiny = Model::load(
            &dir,
            LoadOptions {
                expert_cache_mb: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
        let reference = fixtures()
            .join("hf-moe-kv")
            .join(arch)
            .join("reference.npz");
        for p in 0..3 {
            let prompt = read_npz::<i64>(&reference, &format!("prompt_{p}"));
            let a = greedy(&full, prompt.as_slice().unwrap(), 16);
            let b = greedy(&tiny, prompt.as_slice().unwrap(), 16);
            assert_eq!(a, b, "{arch} prompt {p}");
        }
        let s = tiny.cache_stats().unwrap();
        let one_expert = 3 * 64 * 32 + 2 * (64 + 32) * 4 * 2; // upper bound of one tiny expert
        assert!(
            s.budget_bytes as usize <= one_expert,
            "{arch}: budget {} is one expert",
            s.budget_bytes
        );
        assert!(s.misses > 0 && s.evictions > 0, "{arch}: {s:?}");
        assert!(
            s.peak_resident_bytes <= s.budget_bytes,
            "{arch}: peak {} > budget {}",
            s.peak_resident_bytes,
            s.budget_bytes
        );
        let f = full.cache_stats().unwrap();
        assert_eq!(f.evictions, 0);
        assert!(f.hits > 0 && f.peak_resident_bytes <= f.budget_bytes);
        std::fs::remove_dir_all(&dir).ok();
    }
}

// ---- damaged files -------------------------------------------------------------------------

fn try_greedy(model: &Model, prompt: &[i64], steps: usize) -> crate::Result<Vec<i64>> {
    let mut s = Session::new(model)?;
    let mut logits = s.feed(prompt)?;
    let mut out = vec![];
    for _ in 0..steps {
        let t = argmax(&logits) as i64;
        out.push(t);
        logits = s.feed(&[t])?;
    }
    Ok(out)
}

/// An expert file whose reads start failing (EIO) at the 1st, 6th or 41st read while the model
/// runs with a one-expert cache: each gives an error naming the file, never a panic or wrong
/// tokens; once the reads work again the same model gives the tokens it gave before.
#[test]
fn failing_reads_of_the_expert_file_are_clean_errors_and_the_model_recovers() {
    let dir = packed_tiny("faults-eio");
    let small = LoadOptions {
        expert_cache_mb: Some(0),
        ..Default::default()
    };
    let prompt = [10i64, 20, 30, 40];
    let expected = greedy(&Model::load(&dir, small).unwrap(), &prompt, 16);
    let model = Model::load(&dir, small).unwrap();
    let file = dir.join("experts.bin");
    for after in [0, 5, 40] {
        super::file::faults::fail_reads_after(&file, after);
        let err = try_greedy(&model, &prompt, 16).unwrap_err().to_string();
        super::file::faults::clear(&file);
        assert!(
            err.contains("experts.bin") && err.contains("Input/output error"),
            "failing after {after} reads: {err}"
        );
        assert_eq!(
            try_greedy(&model, &prompt, 16).unwrap(),
            expected,
            "after the fault at read {after}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The expert file truncated by another process while the model runs: short reads are errors
/// naming the file (not SIGBUS, not zeros taken as weights); the undamaged pack, loaded again,
/// gives the tokens it gave before.
#[test]
fn an_expert_file_truncated_while_running_gives_an_error() {
    let dir = packed_tiny("faults-truncated");
    let small = LoadOptions {
        expert_cache_mb: Some(0),
        ..Default::default()
    };
    let prompt = [10i64, 20, 30, 40];
    let file = dir.join("experts.bin");
    let bytes = std::fs::read(&file).unwrap();
    let expected = greedy(&Model::load(&dir, small).unwrap(), &prompt, 16);
    let model = Model::load(&dir, small).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(bytes.len() as u64 / 3).unwrap();
    let err = try_greedy(&model, &prompt, 16).unwrap_err().to_string();
    assert!(
        err.contains("experts.bin") && err.contains("reading"),
        "{err}"
    );
    drop(model);
    // a fresh load sees the truncation at open
    let err = open_err(&dir, false).to_string();
    assert!(err.contains("truncated"), "{err}");
    std::fs::write(&file, &bytes).unwrap();
    let again = Model::load(&dir, small).unwrap();
    assert_eq!(greedy(&again, &prompt, 16), expected);
    std::fs::remove_dir_all(&dir).ok();
}

fn packed_tiny(name: &str) -> PathBuf {
    pack(
        &fixtures().join("hf-moe-kv/mixtral/model.onnx"),
        name,
        ExpertFormat::Int8,
    )
}

fn open_err(dir: &Path, verify: bool) -> Error {
    Model::load(
        dir,
        LoadOptions {
            verify,
            ..Default::default()
        },
    )
    .map(|_| ())
    .unwrap_err()
}

fn table(dir: &Path) -> (Vec<u8>, Header, Vec<Entry>) {
    let bytes = std::fs::read(dir.join("experts.bin")).unwrap();
    let header = Header::decode(&bytes).unwrap();
    let t0 = header.table_offset as usize;
    let entries = (0..header.entry_count as usize)
        .map(|i| {
            Entry::decode(&bytes[t0 + i * ENTRY_BYTES..t0 + (i + 1) * ENTRY_BYTES], i).unwrap()
        })
        .collect();
    (bytes, header, entries)
}

/// Rewrites the table (and its checksums) after changing entries.
fn write_table(dir: &Path, mut bytes: Vec<u8>, mut header: Header, entries: &[Entry]) {
    let t: Vec<u8> = entries.iter().flat_map(|e| e.encode()).collect();
    let t0 = header.table_offset as usize;
    bytes[t0..t0 + t.len()].copy_from_slice(&t);
    header.table_crc32 = crc32fast::hash(&t);
    bytes[..HEADER_BYTES].copy_from_slice(&header.encode());
    std::fs::write(dir.join("experts.bin"), bytes).unwrap();
}

/// The error of the first of a range of prompts that routes to a damaged expert.
fn first_feed_error(model: &Model) -> String {
    for t in 3..200i64 {
        if let Err(err) = Session::new(model).unwrap().feed(&[t, t + 1, t + 2, t + 3]) {
            return err.to_string();
        }
    }
    panic!("no prompt routed to the damaged expert");
}

#[test]
fn truncated_expert_file_is_refused_at_open() {
    let dir = packed_tiny("truncated");
    let path = dir.join("experts.bin");
    let bytes = std::fs::read(&path).unwrap();
    for len in [bytes.len() - 1, bytes.len() / 2, 10] {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let err = open_err(&dir, false);
        assert!(matches!(err, Error::CorruptPack(_)), "{err}");
        assert!(err.to_string().contains("experts.bin"), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A header that claims 2^32 - 1 entries in a file large enough to hold them (a sparse file):
/// refused before the table is read into memory.
#[test]
fn a_table_claiming_too_many_entries_is_refused_before_it_is_read() {
    let dir = packed_tiny("entries");
    let (bytes, mut header, entries) = table(&dir);
    header.entry_count = u32::MAX;
    let size = header.table_offset + u64::from(u32::MAX) * ENTRY_BYTES as u64;
    header.file_bytes = size;
    write_table(&dir, bytes, header, &entries);
    std::fs::File::options()
        .write(true)
        .open(dir.join("experts.bin"))
        .unwrap()
        .set_len(size)
        .unwrap();
    let err = open_err(&dir, false);
    assert!(
        err.to_string()
            .contains("more than the 1048576 a pack may have"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn wrong_magic_is_refused() {
    let dir = packed_tiny("magic");
    let path = dir.join("experts.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0..8].copy_from_slice(b"GGUF\0\0\0\0");
    std::fs::write(&path, bytes).unwrap();
    let err = open_err(&dir, false);
    assert!(err.to_string().contains("wrong magic"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn offset_past_the_end_names_the_expert() {
    let dir = packed_tiny("offset");
    let (bytes, header, mut entries) = table(&dir);
    let victim = entries
        .iter()
        .position(|e| e.expert == 5 && e.layer == 1)
        .unwrap();
    entries[victim].offset = header.file_bytes - 10;
    write_table(&dir, bytes, header, &entries);
    let err = open_err(&dir, false);
    let msg = err.to_string();
    assert!(
        msg.contains("layer 1 expert 5") && msg.contains("outside the data area"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn flipped_byte_inside_an_expert_is_caught_at_load_and_by_verify() {
    let dir = packed_tiny("flip");
    let (mut bytes, _, entries) = table(&dir);
    let e = entries
        .iter()
        .find(|e| e.expert != NO_EXPERT)
        .unwrap()
        .clone();
    bytes[(e.offset + e.length / 2) as usize] ^= 0x40;
    std::fs::write(dir.join("experts.bin"), &bytes).unwrap();
    // --verify reads every expert at open
    let err = open_err(&dir, true);
    assert!(
        err.to_string()
            .contains(&format!("layer {} expert {}", e.layer, e.expert))
            && err.to_string().contains("checksum"),
        "{err}"
    );
    // without it, the damage is found when the expert is first loaded
    let model = Model::load(&dir, LoadOptions::default()).unwrap();
    let msg = first_feed_error(&model);
    assert!(msg.contains("checksum mismatch"), "{msg}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Two sessions generating at once on one packed model share its cache; with the smallest budget
/// they wait for each other's experts and still give the tokens each gives alone.
#[test]
fn concurrent_sessions_share_a_tiny_cache() {
    let dir = pack(
        &fixtures().join("hf-moe-kv/qwen2_moe/model.onnx"),
        "concurrent",
        ExpertFormat::Int8,
    );
    let model = Model::load(
        &dir,
        LoadOptions {
            expert_cache_mb: Some(0),
            ..Default::default()
        },
    )
    .unwrap();
    let reference = fixtures().join("hf-moe-kv/qwen2_moe/reference.npz");
    let prompts: Vec<Vec<i64>> = (0..3)
        .map(|p| {
            read_npz::<i64>(&reference, &format!("prompt_{p}"))
                .iter()
                .copied()
                .collect()
        })
        .collect();
    let alone: Vec<Vec<i64>> = prompts.iter().map(|p| greedy(&model, p, 12)).collect();
    let together: Vec<Vec<i64>> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(|| greedy(&model, p, 12)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, together);
    let stats = model.cache_stats().unwrap();
    assert!(stats.peak_resident_bytes <= stats.budget_bytes);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_pack_keeps_the_tokenizer_and_the_chat_template() {
    let src = chat_model("pack-src");
    let dir = pack(&src, "chat", ExpertFormat::Int8);
    let original = Model::load(&src, LoadOptions::default()).unwrap();
    let packed = Model::load(&dir, LoadOptions::default()).unwrap();
    let messages = [
        crate::ChatMessage::new("system", "Be brief."),
        crate::ChatMessage::new("user", "What does tar do?"),
    ];
    let render = |m: &Model| m.chat_template().unwrap().render(&messages, true).unwrap();
    assert_eq!(render(&packed), render(&original));
    let encode = |m: &Model| m.tokenizer().unwrap().encode("t10 héllo").unwrap();
    assert_eq!(encode(&packed), encode(&original));
    std::fs::remove_dir_all(&src).ok();
    std::fs::remove_dir_all(&dir).ok();
}

/// The bytes of every file in `dir`, by name.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    files.sort();
    files
}

/// Hidden partial or old directories left beside `out`.
fn leftovers(out: &Path) -> Vec<String> {
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.")))
        .collect()
}

#[test]
fn packing_onto_the_source_or_a_foreign_directory_is_refused_and_changes_nothing() {
    let src = scratch("own-src");
    std::fs::create_dir_all(&src).unwrap();
    for f in ["model.onnx", "config.json", "tokenizer.json"] {
        std::fs::copy(tiny_model().join(f), src.join(f)).unwrap();
    }
    let before = snapshot(&src);
    let opts = PackOptions::default();
    for out in [
        src.clone(),
        src.join("."),
        src.join("../").join(src.file_name().unwrap()),
    ] {
        let err = pack_model(&src, &out, &opts).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput(m) if m.contains("source model's own directory")),
            "{err}"
        );
    }
    assert_eq!(snapshot(&src), before, "the source model is unchanged");

    let foreign = scratch("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "keep me").unwrap();
    let err = pack_model(&src, &foreign, &opts).unwrap_err();
    assert!(
        err.to_string().contains("neither empty nor a packed model"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(foreign.join("notes.txt")).unwrap(),
        "keep me"
    );
    assert!(leftovers(&foreign).is_empty());
    std::fs::remove_dir_all(&src).ok();
    std::fs::remove_dir_all(&foreign).ok();
}

#[test]
fn a_pack_replaces_an_earlier_pack_whole_and_a_failed_pack_leaves_nothing() {
    let out = scratch("replace");
    pack(&tiny_model(), "replace", ExpertFormat::F32);
    std::fs::write(out.join("stale.txt"), "from the earlier pack").unwrap();
    pack_model(
        &tiny_model(),
        &out,
        &PackOptions {
            experts: ExpertFormat::Int8,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        !out.join("stale.txt").exists(),
        "the earlier pack is replaced as a whole"
    );
    let model = Model::load(&out, LoadOptions::default()).unwrap();
    assert_eq!(model.manifest().unwrap().experts, ExpertFormat::Int8);
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
    // the companions are not writable by others
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("config.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o002, 0, "config.json mode {mode:o}");

    // a source that fails to import: no output directory, no partial one
    let bad = scratch("bad-src");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("model.onnx"), b"not a protobuf at all").unwrap();
    let failed = scratch("failed");
    assert!(pack_model(&bad, &failed, &PackOptions::default()).is_err());
    assert!(!failed.exists());
    assert!(leftovers(&failed).is_empty(), "{:?}", leftovers(&failed));
    std::fs::remove_dir_all(&out).ok();
    std::fs::remove_dir_all(&bad).ok();
}

#[test]
fn an_expert_cache_budget_that_overflows_is_refused() {
    let dir = pack(&tiny_model(), "huge-budget", ExpertFormat::Int8);
    let Err(err) = Model::load(
        &dir,
        LoadOptions {
            expert_cache_mb: Some(1 << 44),
            ..Default::default()
        },
    ) else {
        panic!("a budget of 2^44 MiB was accepted");
    };
    assert!(err.to_string().contains("too large"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Damage that keeps every checksum valid (the table's recomputed): the manifest and the table
/// must agree, or the pack is refused at open with the disagreement named.
#[test]
fn a_table_that_disagrees_with_the_manifest_is_refused_at_open() {
    type Tamper = fn(&mut Vec<u8>, &mut Vec<Entry>, &mut serde_json::Value);
    let cases: Vec<(&str, ExpertFormat, Tamper, &str)> = vec![
        (
            "rows and cols swapped (same byte count)",
            ExpertFormat::F32,
            |_, entries, _| {
                let e = entries
                    .iter_mut()
                    .find(|e| e.kind == TensorKind::Gate)
                    .unwrap();
                std::mem::swap(&mut e.rows, &mut e.cols);
            },
            "in the table",
        ),
        (
            "an entry pointing at another expert's bytes",
            ExpertFormat::Int8,
            |_, entries, _| {
                let e = entries
                    .iter()
                    .position(|e| e.layer == 0 && e.expert == 4 && e.kind == TensorKind::Down)
                    .unwrap();
                let other = entries
                    .iter()
                    .position(|e| e.layer == 0 && e.expert == 5 && e.kind == TensorKind::Down)
                    .unwrap();
                (entries[e].offset, entries[e].crc32) =
                    (entries[other].offset, entries[other].crc32);
            },
            "share bytes",
        ),
        (
            "f32 tensors in a manifest of int8 experts",
            ExpertFormat::F32,
            |_, _, manifest| manifest["experts"] = serde_json::json!("int8"),
            "the manifest says Int8 experts",
        ),
        (
            "a hidden size the table does not have",
            ExpertFormat::Int8,
            |_, _, manifest| {
                let h = manifest["layers"][0]["spec"]["hidden"].as_u64().unwrap();
                manifest["layers"][0]["spec"]["hidden"] = serde_json::json!(h + 32);
            },
            "in the manifest",
        ),
        (
            "top-k above the expert count",
            ExpertFormat::Int8,
            |_, _, manifest| manifest["layers"][1]["spec"]["top_k"] = serde_json::json!(99),
            "do not make an MoE layer",
        ),
        (
            "another block size",
            ExpertFormat::Int8,
            |_, _, manifest| manifest["block_size"] = serde_json::json!(64),
            "block_size is 64",
        ),
        (
            "an expert file outside the pack",
            ExpertFormat::Int8,
            |_, _, manifest| manifest["expert_file"] = serde_json::json!("/etc/passwd"),
            "expert_file must name a file inside the pack directory",
        ),
        (
            "an expert file in the parent directory",
            ExpertFormat::Int8,
            |_, _, manifest| manifest["expert_file"] = serde_json::json!("../experts.bin"),
            "expert_file must name a file inside the pack directory",
        ),
        (
            "a tensor the manifest does not describe",
            ExpertFormat::Int8,
            |_, entries, _| {
                let mut extra = entries.last().unwrap().clone();
                extra.layer = 7;
                entries.push(extra);
            },
            "the table has",
        ),
    ];
    for (i, (what, format, tamper, says)) in cases.into_iter().enumerate() {
        let dir = pack(
            &fixtures().join("hf-moe-kv/mixtral/model.onnx"),
            &format!("tamper-{i}"),
            format,
        );
        let (mut bytes, mut header, mut entries) = table(&dir);
        let manifest_path = dir.join("manifest.json");
        let mut manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
        tamper(&mut bytes, &mut entries, &mut manifest);
        if entries.len() != header.entry_count as usize {
            // room for the extra entry: the table grows into the padding before the data
            header.entry_count = entries.len() as u32;
            assert!(
                header.table_offset + (entries.len() * ENTRY_BYTES) as u64 <= header.data_offset
            );
        }
        write_table(&dir, bytes, header, &entries);
        std::fs::write(&manifest_path, manifest.to_string()).unwrap();
        let err = open_err(&dir, false);
        assert!(
            matches!(err, Error::CorruptPack(_)) && err.to_string().contains(says),
            "{what}: {err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn a_nan_scale_with_a_valid_checksum_is_refused_when_the_expert_loads() {
    let dir = packed_tiny("nan-scale");
    let (mut bytes, header, mut entries) = table(&dir);
    let i = entries
        .iter()
        .position(|e| e.expert != NO_EXPERT && e.format == TensorFormat::Q8F16Scales)
        .unwrap();
    let e = entries[i].clone();
    // the scales follow the int8 values: overwrite the last scale with an f16 NaN
    let last_scale = (e.offset + e.length - 2) as usize;
    bytes[last_scale..last_scale + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    entries[i].crc32 = crc32fast::hash(&bytes[e.offset as usize..(e.offset + e.length) as usize]);
    write_table(&dir, bytes, header, &entries);
    // the checksums hold, so the pack opens; the expert is refused when first loaded
    let model = Model::load(&dir, LoadOptions::default()).unwrap();
    let msg = first_feed_error(&model);
    assert!(msg.contains("non-finite scale"), "{msg}");
    std::fs::remove_dir_all(&dir).ok();
}

/// x = 100 * (row `e` of the router): expert `e` scores highest unless another row points the
/// same way and is longer (checked on the unpruned router).
fn favouring(model: &Model, block: usize, e: usize) -> Vec<f32> {
    let r = &model.ops.moe[block].router;
    let h = r.weights.len() / model.ops.moe[block].spec.experts;
    r.weights[e * h..(e + 1) * h]
        .iter()
        .map(|w| w * 100.0)
        .collect()
}

#[test]
fn a_pruned_pack_never_routes_to_a_pruned_expert_and_equals_the_run_time_mask() {
    let full_dir = packed_tiny("prune-src");
    let full = Model::load(&full_dir, LoadOptions::default()).unwrap();
    let (layer0, experts) = (full.ops.moe[0].spec.layer, full.ops.moe[0].spec.experts);
    // the expert each crafted input favours is its first choice in the full pack
    let target = 3;
    let x = favouring(&full, 0, target);
    let before = full.ops.moe[0].router.choose(&x, 1);
    assert_eq!(before.token(0)[0].0, target);

    let mask = crate::ExpertMask::parse(&format!("{layer0}:{target},5")).unwrap();
    let pruned_dir = scratch("prune-out");
    let summary = super::prune_pack(&full_dir, &pruned_dir, &mask).unwrap();
    assert_eq!(summary.experts_before[0], experts);
    assert_eq!(summary.experts_after[0], experts - 2);
    assert!(summary.expert_file_bytes_after < summary.expert_file_bytes_before);
    let pruned = Model::load(&pruned_dir, LoadOptions::default()).unwrap();
    assert_eq!(pruned.manifest().unwrap().layers[0].pruned, vec![3, 5]);
    assert_eq!(pruned.expert_allowed(layer0, target), Some(false));
    assert_eq!(pruned.expert_allowed(layer0, 0), Some(true));
    let after = pruned.ops.moe[0].router.choose(&x, 1);
    assert!(after.token(0).iter().all(|&(e, _)| e != 3 && e != 5));
    // the rest are routed as by the full router with those logits removed (Mixtral: softmax,
    // top-2, renormalised): recomputed here from the full router's logits
    let r = &full.ops.moe[0].router;
    let h = x.len();
    let mut logits: Vec<(usize, f32)> = (0..experts)
        .filter(|e| *e != 3 && *e != 5)
        .map(|e| (e, (0..h).map(|i| r.weights[e * h + i] * x[i]).sum::<f32>()))
        .collect();
    logits.sort_by(|a, b| b.1.total_cmp(&a.1));
    let (a, b) = (logits[0], logits[1]);
    let wa = 1.0 / (1.0 + (b.1 - a.1).exp());
    assert_eq!(after.token(0)[0].0, a.0);
    assert_eq!(after.token(0)[1].0, b.0);
    assert!((after.token(0)[0].1 - wa).abs() < 1e-5);
    // a pruned expert cannot be loaded
    let e = match pruned.ops.moe[0].experts.expert(target) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a pruned expert loaded"),
    };
    assert!(e.contains("pruned"), "{e}");

    // the same mask at run time on the full pack gives the pruned pack's logits bit for bit
    let mut masked = Model::load(&full_dir, LoadOptions::default()).unwrap();
    masked.restrict_experts(&mask).unwrap();
    let ids = [5i64, 17, 30, 2, 9, 41, 7, 12];
    assert_eq!(
        masked.logits(&ids, 1).unwrap(),
        pruned.logits(&ids, 1).unwrap()
    );
    assert_ne!(
        full.logits(&ids, 1).unwrap(),
        pruned.logits(&ids, 1).unwrap()
    );

    // refused: too few experts left, a layer or expert the pack lacks, a source that is no pack
    let all_but_one: Vec<String> = (1..experts).map(|e| e.to_string()).collect();
    let e = super::prune_pack(
        &full_dir,
        &scratch("prune-bad"),
        &crate::ExpertMask::parse(&format!("{layer0}:{}", all_but_one.join(","))).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("fewer than the 2"), "{e}");
    for (spec, want) in [
        ("99:1", "no MoE layer 99"),
        (&*format!("{layer0}:{experts}"), "there is no expert"),
    ] {
        let e = super::prune_pack(
            &full_dir,
            &scratch("prune-bad"),
            &crate::ExpertMask::parse(spec).unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(want), "{spec}: {e}");
        let e = Model::load(&full_dir, LoadOptions::default())
            .unwrap()
            .restrict_experts(&crate::ExpertMask::parse(spec).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{spec}: {e}");
    }
    assert!(
        !scratch("prune-bad").exists(),
        "a refused prune writes nothing"
    );
    let e = super::prune_pack(
        &fixtures().join("hf-moe-kv/mixtral"),
        &scratch("prune-bad"),
        &mask,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a packed model"), "{e}");
    // a manifest whose pruned list leaves fewer than top-k experts is refused at open
    let manifest_path = pruned_dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    assert!(text.contains("\"pruned\": [\n        3,"), "{text}");
    std::fs::write(
        &manifest_path,
        text.replacen("\"pruned\": [\n        3,", "\"pruned\": [\n        9,", 1),
    )
    .unwrap();
    assert!(open_err(&pruned_dir, false)
        .to_string()
        .contains("pruned experts"));
    for d in [full_dir, pruned_dir] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn hot_experts_from_a_profile_stay_in_the_cache() {
    let dir = packed_tiny("keep-hot");
    let model = Model::load(&dir, LoadOptions::default()).unwrap();
    let experts = model.ops.moe[0].spec.experts;
    let each = model.ops.moe[0].experts.loaded_bytes(0).unwrap();
    // a profile where expert e of layer b was chosen by 100 * (b + 1) + e tokens: the most used
    // are layer 1's, highest index first
    let layer = |b: usize| {
        crate::moe::LayerUsage::with_counts(
            model.ops.moe[b].spec.layer,
            (0..experts as u64)
                .map(|e| 100 * (b as u64 + 1) + e)
                .collect(),
        )
    };
    let usage = crate::moe::Usage {
        tokens: 0,
        layers: (0..model.ops.moe.len()).map(layer).collect(),
    };
    // the budget holds every expert (2 layers x 8): a quarter of it keeps 4
    let (n, bytes) = model.keep_hot_experts(&usage, 0.25).unwrap();
    assert_eq!((n, bytes), (4, 4 * each));
    // which: layer 1's four most chosen
    let kept = model.cache.as_ref().unwrap().kept_keys();
    assert_eq!(kept, vec![(1, 4), (1, 5), (1, 6), (1, 7)]);
    // refused: a share outside (0, 1), a profile of another shape, a model without a cache
    for share in [0.0, 1.0, f64::NAN] {
        assert!(model.keep_hot_experts(&usage, share).is_err(), "{share}");
    }
    let one_layer = crate::moe::Usage {
        tokens: 0,
        layers: vec![layer(0)],
    };
    assert!(model
        .keep_hot_experts(&one_layer, 0.5)
        .unwrap_err()
        .to_string()
        .contains("1 MoE layers"));
    let unpacked = Model::load(
        &fixtures().join("hf-moe-kv/mixtral/model.onnx"),
        LoadOptions::default(),
    )
    .unwrap();
    let e = unpacked
        .keep_hot_experts(&usage, 0.5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("only a packed model"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The formats in a pack's table of the routed experts' tensors: (manifest layer, expert) -> format.
fn expert_formats(dir: &Path) -> Vec<((u32, u32), TensorFormat)> {
    let (_, _, entries) = table(dir);
    let mut out: Vec<_> = entries
        .iter()
        .filter(|e| {
            e.expert != NO_EXPERT
                && matches!(e.kind, TensorKind::Gate | TensorKind::Up | TensorKind::Down)
        })
        .map(|e| ((e.layer, e.expert), e.format))
        .collect();
    out.sort_by_key(|x| x.0);
    out.dedup();
    out
}

/// int4 experts against torch, and a mixed pack (odd experts int4, even ones int8): every routed
/// expert in the format asked for, the shared expert int8, and the error ordered int8 <= mixed <=
/// int4 (bounds for int4: top-1 agreement >= 75%, mean KL < 0.1 nats on these random models).
#[test]
fn int4_and_mixed_packs_against_torch() {
    for (arch, method) in [
        ("mixtral", "legacy_batched"),
        ("olmoe", "legacy_batched"),
        ("qwen2_moe", "legacy_batched"),
    ] {
        let src = kit_export(arch, method);
        let int8 = pack(&src, &format!("q8-{arch}"), ExpertFormat::Int8);
        let int4 = pack(&src, &format!("q4-{arch}"), ExpertFormat::Int4);
        let model8 = Model::load(&int8, LoadOptions::default()).unwrap();
        let specs: Vec<_> = model8.blocks().iter().map(|b| b.spec.clone()).collect();
        let mut odd = crate::ExpertMask::default();
        for s in &specs {
            for e in (1..s.experts).step_by(2) {
                odd.disable(s.layer, e);
            }
        }
        let mixed = pack_with(
            &src,
            &format!("mixed-{arch}"),
            PackOptions {
                int4_experts: Some(odd.clone()),
                ..Default::default()
            },
        );
        for ((_, e), f) in expert_formats(&int4) {
            assert_eq!(f, TensorFormat::Q4F16Scales, "{arch}: expert {e}");
        }
        for ((l, e), f) in expert_formats(&mixed) {
            let want = if e % 2 == 1 {
                TensorFormat::Q4F16Scales
            } else {
                TensorFormat::Q8F16Scales
            };
            assert_eq!(f, want, "{arch}: layer {l} expert {e}");
        }
        let (_, _, entries) = table(&int4);
        for e in entries.iter().filter(|e| {
            matches!(
                e.kind,
                TensorKind::SharedGateProj | TensorKind::SharedUpProj | TensorKind::SharedDownProj
            )
        }) {
            assert!(
                e.format.scale_type().is_some(),
                "{arch}: the shared expert stays int8"
            );
        }
        let kl = |dir: &Path| {
            accuracy_vs_torch(&Model::load(dir, LoadOptions::default()).unwrap(), arch)
        };
        let (_, top1_8, kl8) = kl(&int8);
        let (_, top1_m, klm) = kl(&mixed);
        let (_, top1_4, kl4) = kl(&int4);
        println!("{arch}: KL int8 {kl8:.2e} ({top1_8:.3}), mixed {klm:.2e} ({top1_m:.3}), int4 {kl4:.2e} ({top1_4:.3})");
        assert!(
            top1_4 >= 0.75 && kl4 < 0.1,
            "{arch}: int4 top-1 {top1_4}, KL {kl4}"
        );
        assert!(
            kl8 < klm && klm < kl4,
            "{arch}: KL int8 {kl8} mixed {klm} int4 {kl4}"
        );
        // the experts' bytes (the file's size is mostly alignment padding on models this small)
        let size = |d: &Path| -> u64 {
            table(d)
                .2
                .iter()
                .filter(|e| e.expert != NO_EXPERT)
                .map(|e| e.length)
                .sum()
        };
        assert!(size(&int4) < size(&mixed) && size(&mixed) < size(&int8));
        // int4 experts stay int4 in memory: the default budget (every expert) is what they hold
        let budget = |d: &Path| {
            Model::load(d, LoadOptions::default())
                .unwrap()
                .cache_stats()
                .unwrap()
                .budget_bytes
        };
        let (b8, b4) = (budget(&int8), budget(&int4));
        assert!(
            b4 * 100 < b8 * 60,
            "{arch}: int4 experts hold {b4} bytes, int8 {b8}"
        );
        // int4 experts only go into int8 packs; a mask naming a missing layer or expert is refused
        for (opts, want) in [
            (
                PackOptions {
                    experts: ExpertFormat::F16,
                    int4_experts: Some(odd.clone()),
                    ..Default::default()
                },
                "int8 pack",
            ),
            (
                PackOptions {
                    int4_experts: Some(crate::ExpertMask::parse("99:0").unwrap()),
                    ..Default::default()
                },
                "no MoE layer 99",
            ),
            (
                PackOptions {
                    int4_experts: Some(
                        crate::ExpertMask::parse(&format!("{}:999", specs[0].layer)).unwrap(),
                    ),
                    ..Default::default()
                },
                "no expert 999",
            ),
        ] {
            let out = scratch(&format!("q4-bad-{arch}"));
            let e = pack_model(&src, &out, &opts).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(!out.exists());
        }
        for d in [int8, int4, mixed] {
            std::fs::remove_dir_all(d).ok();
        }
    }
}

/// The embedding table read a row per token from the expert file gives the logits the table in
/// the graph gives, bit for bit, on every kit export (batch 2 included), and the manifest names it.
#[test]
fn embedding_rows_from_the_expert_file_give_the_graph_tables_logits() {
    for (arch, method) in EXPORTS {
        let src = kit_export(arch, method);
        let in_file = pack(
            &src,
            &format!("emb-file-{arch}-{method}"),
            ExpertFormat::Int8,
        );
        let in_graph = pack_with(
            &src,
            &format!("emb-graph-{arch}-{method}"),
            PackOptions {
                embedding_in_file: false,
                ..Default::default()
            },
        );
        let table = super::Manifest::read(&in_file).unwrap().embedding;
        let table = table.unwrap_or_else(|| panic!("{arch}/{method}: no embedding in the file"));
        assert!(
            table.name.ends_with("embed_tokens.weight"),
            "{}",
            table.name
        );
        assert!(super::Manifest::read(&in_graph)
            .unwrap()
            .embedding
            .is_none());
        let a = Model::load(&in_file, LoadOptions::default()).unwrap();
        let b = Model::load(&in_graph, LoadOptions::default()).unwrap();
        assert_eq!(a.vocab_size(), Some(table.vocab));
        assert_eq!(a.vocab_size(), b.vocab_size());
        for i in 0..5 {
            assert_eq!(logits(&a, i), logits(&b, i), "{arch}/{method} input {i}");
        }
        std::fs::remove_dir_all(&in_file).ok();
        std::fs::remove_dir_all(&in_graph).ok();
    }
}

/// A damaged byte in one row of the table: every other token still runs; the token of that row is
/// refused naming the row; `--verify` finds it at open.
#[test]
fn a_damaged_embedding_row_is_caught_when_its_token_is_fed() {
    let dir = packed_tiny("emb-flip");
    let (mut bytes, _, entries) = table(&dir);
    let e = entries
        .iter()
        .find(|e| e.kind == TensorKind::Embedding)
        .unwrap()
        .clone();
    let row_bytes = e.cols as u64 * 4;
    bytes[(e.offset + 7 * row_bytes + 5) as usize] ^= 0x10;
    std::fs::write(dir.join("experts.bin"), &bytes).unwrap();
    let model = Model::load(&dir, LoadOptions::default()).unwrap();
    Session::new(&model).unwrap().feed(&[1, 2, 3, 8]).unwrap();
    let err = Session::new(&model).unwrap().feed(&[1, 7]).unwrap_err();
    assert!(
        err.to_string()
            .contains("embedding row 7 checksum mismatch"),
        "{err}"
    );
    let err = open_err(&dir, true);
    assert!(
        err.to_string().contains("Embedding") && err.to_string().contains("checksum"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A table with another consumer (as an LM head tied to the embedding has) stays in the graph.
#[test]
fn an_embedding_table_used_elsewhere_stays_in_the_graph() {
    use prost::Message;
    use tract_onnx::pb::{ModelProto, NodeProto, ValueInfoProto};
    let src = scratch("emb-tied-src");
    std::fs::create_dir_all(&src).unwrap();
    let bytes = std::fs::read(fixtures().join("hf-moe-kv/mixtral/model.onnx")).unwrap();
    let mut proto = ModelProto::decode(bytes.as_slice()).unwrap();
    let graph = proto.graph.as_mut().unwrap();
    let table = "model.embed_tokens.weight";
    graph.node.push(NodeProto {
        name: "tied_use".into(),
        op_type: "Identity".into(),
        input: vec![table.into()],
        output: vec!["tied_copy".into()],
        ..Default::default()
    });
    let mut out: ValueInfoProto = graph.output[0].clone();
    out.name = "tied_copy".into();
    out.r#type = None;
    graph.output.push(out);
    std::fs::write(src.join("model.onnx"), proto.encode_to_vec()).unwrap();
    let dir = pack(&src.join("model.onnx"), "emb-tied", ExpertFormat::Int8);
    assert!(super::Manifest::read(&dir).unwrap().embedding.is_none());
    let packed = std::fs::read(dir.join("model.onnx")).unwrap();
    let packed = ModelProto::decode(packed.as_slice()).unwrap();
    let graph = packed.graph.unwrap();
    assert!(graph.initializer.iter().any(|t| t.name == table));
    assert!(graph
        .node
        .iter()
        .any(|n| n.op_type == "Gather" && n.input[0] == table));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&src).ok();
}

/// Prefetching never changes the output: on the trained model (whose next-block predictions are
/// good) greedy tokens with `prefetch` equal those without, at the smallest budget, a budget of
/// about a seventh of the experts, and all of them; at the small budget prefetched experts are
/// used, and the cache never holds more than its budget.
#[test]
fn prefetching_gives_the_same_tokens_at_every_budget() {
    let dir = workspace_root().join("models/moe-edge-mini");
    let prompt: Vec<i64> = vec![1, 300, 1200, 77, 5, 901];
    let load = |mb: Option<u64>, prefetch: bool| {
        Model::load(
            &dir,
            LoadOptions {
                expert_cache_mb: mb,
                prefetch,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let reference = greedy(&load(None, false), &prompt, 40);
    for mb in [Some(0), Some(3), None] {
        let model = load(mb, true);
        assert_eq!(greedy(&model, &prompt, 40), reference, "budget {mb:?} MiB");
        let s = model.cache_stats().unwrap();
        assert!(s.peak_resident_bytes <= s.budget_bytes, "{mb:?}: {s:?}");
        if mb == Some(3) {
            assert!(s.prefetched > 0 && s.prefetch_used > 0, "{s:?}");
            assert!(s.prefetch_used + s.prefetch_wasted <= s.prefetched);
        }
    }
}
