//! Fuzz target `ofrep_body`: see `flagmesh_integration_tests::fuzzing::ofrep_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    flagmesh_integration_tests::fuzzing::ofrep_body(data);
});
