//! Coverage-guided fuzzing of the client frame decoder: it must never panic, and what it
//! accepts must re-validate. Run: see crates/protocol/fuzz/README.md.
#![no_main]

use chat_protocol::{ClientFrame, Limits, RoomName, parse_client_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = Limits { max_text_bytes: 64 };
    match parse_client_frame(text, limits) {
        Ok(ClientFrame::Join { room, .. }) | Ok(ClientFrame::Leave { room, .. }) => {
            assert!(RoomName::new(room.as_str()).is_ok());
        }
        Ok(ClientFrame::Send { text, .. }) => {
            assert!(!text.is_empty() && text.len() <= limits.max_text_bytes);
        }
        Err(e) => assert!(!e.message.is_empty()),
    }
});
