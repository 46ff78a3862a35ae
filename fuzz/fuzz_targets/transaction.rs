//! Arbitrary client bytes against a real server's transaction handling.
//! It binds what the bytes ask for: run it in a private network namespace,
//! as `.ci/fuzz` does.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    pesto::fuzzing::transaction(data);
});
