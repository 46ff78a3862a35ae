//! Arbitrary client bytes against a real server's transaction handling.
//! It binds what the bytes ask for: run it in a private network namespace,
//! e.g. `unshare -rn cargo +nightly fuzz run transaction`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    pesto::fuzzing::transaction(data);
});
