//! Fuzz target `document`: see `flagmesh_integration_tests::fuzzing::document`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    flagmesh_integration_tests::fuzzing::document(data);
});
