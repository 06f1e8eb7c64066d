//! Fuzz target `evaluate`: see `flagmesh_integration_tests::fuzzing::evaluate`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    flagmesh_integration_tests::fuzzing::evaluate(data);
});
