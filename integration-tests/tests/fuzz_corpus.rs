//! Runs every fuzz target over its seed corpus (`fuzz/corpus/TARGET/`) and
//! over every input that once crashed it (`fuzz/regressions/TARGET/`), with
//! the same code libFuzzer runs (`make fuzz`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use flagmesh_integration_tests::fuzzing::TARGETS;

fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .filter(|e| e.file_name() != ".gitkeep")
        .map(|e| {
            (
                e.path().display().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_target_survives_its_corpus_and_its_regressions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (name, target) in TARGETS {
        let seeds = inputs(&root.join("corpus").join(name));
        assert!(seeds.len() >= 3, "{name}: the seed corpus is missing");
        let regressions = inputs(&root.join("regressions").join(name));
        for (path, data) in seeds.iter().chain(&regressions) {
            let outcome = std::panic::catch_unwind(|| target(data));
            assert!(outcome.is_ok(), "{name}: {path} panics");
        }
        eprintln!(
            "fuzz target {name}: {} seeds, {} regressions",
            seeds.len(),
            regressions.len()
        );
    }
}
