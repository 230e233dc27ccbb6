//! Arbitrary bytes through both decoders: any input is an `Ok` or an `Err`, never a panic.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    let _ = pgoutput::decode(bytes.clone());
    // The stateful decoder, fed the input split at every 0xFF into a message sequence, so stream
    // blocks (Stream Start, changes with xids, Stream Stop) are exercised too.
    let mut decoder = pgoutput::Decoder::new();
    for part in bytes.split(|b| *b == 0xff) {
        let _ = decoder.decode(bytes.slice_ref(part));
    }
});
