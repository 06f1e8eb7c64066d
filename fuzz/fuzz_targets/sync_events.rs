//! Fuzz target `sync_events`: see `flagmesh_integration_tests::fuzzing::sync_events`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    flagmesh_integration_tests::fuzzing::sync_events(data);
});
