//! Every control-protocol decoder over arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pesto::fuzzing::decode(data));
