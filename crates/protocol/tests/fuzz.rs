//! Property tests: decoding never panics, and accepted frames are exactly the valid ones.
//! (The cargo-fuzz target in `fuzz/` runs the same decoder with coverage guidance; any
//! crash it finds becomes a case in `regressions` below.)

use chat_protocol::{ClientFrame, ErrorCode, Limits, RoomName, Username, parse_client_frame};
use proptest::prelude::*;

const LIMITS: Limits = Limits { max_text_bytes: 64 };

/// JSON-ish text: fragments of real frames mixed with noise.
fn jsonish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(",".to_string()),
        Just(":".to_string()),
        Just("\"type\"".to_string()),
        Just("\"join\"".to_string()),
        Just("\"send\"".to_string()),
        Just("\"leave\"".to_string()),
        Just("\"room\"".to_string()),
        Just("\"text\"".to_string()),
        Just("\"since\"".to_string()),
        Just("\"ref\"".to_string()),
        Just("\"username\"".to_string()),
        Just("\"epoch\"".to_string()),
        Just("null".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551616".to_string()),
        Just("1e400".to_string()),
        Just("\"\\ud800\"".to_string()),
        "\"[a-z -]{0,8}\"",
        "[0-9]{1,4}",
        any::<String>(),
    ];
    prop::collection::vec(token, 0..24).prop_map(|v| v.concat())
}

fn object() -> impl Strategy<Value = String> {
    (
        prop::option::of(prop_oneof![
            Just("join"),
            Just("leave"),
            Just("send"),
            Just("x")
        ]),
        prop::option::of(prop_oneof!["[A-Za-z0-9_-]{1,64}", ".{0,70}"]),
        prop::option::of(any::<u64>()),
        prop::option::of(".{0,80}"),
        prop::option::of(".{0,40}"),
        prop::option::of(".{0,10}"),
    )
        .prop_map(|(kind, room, since, text, username, reference)| {
            let mut m = serde_json::Map::new();
            let mut put = |k: &str, v: Option<serde_json::Value>| {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            };
            put("type", kind.map(Into::into));
            put("room", room.map(Into::into));
            put("since", since.map(Into::into));
            put("text", text.map(Into::into));
            put("username", username.map(Into::into));
            put("ref", reference.map(Into::into));
            serde_json::Value::Object(m).to_string()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn decoding_never_panics(input in prop_oneof![jsonish(), any::<String>()]) {
        let _ = parse_client_frame(&input, LIMITS);
    }

    #[test]
    fn accepted_frames_are_valid_and_refusals_keep_the_ref(input in object()) {
        let raw: serde_json::Value = serde_json::from_str(&input).unwrap();
        match parse_client_frame(&input, LIMITS) {
            Ok(ClientFrame::Join { room, .. }) | Ok(ClientFrame::Leave { room, .. }) => {
                prop_assert!(RoomName::new(room.as_str()).is_ok());
            }
            Ok(ClientFrame::Send { room, text, username, reference }) => {
                prop_assert!(room.is_none() || raw["type"] == "send");
                prop_assert!(!text.is_empty() && text.len() <= LIMITS.max_text_bytes);
                if let Some(u) = username {
                    prop_assert!(Username::new(u.as_str()).is_ok());
                }
                prop_assert_eq!(reference.as_deref(), raw["ref"].as_str());
            }
            Err(e) => {
                prop_assert!(!e.message.is_empty());
                prop_assert_eq!(e.reference.as_deref(), raw["ref"].as_str());
                if e.code == ErrorCode::TooLarge {
                    prop_assert!(raw["text"].as_str().is_some_and(|t| t.len() > LIMITS.max_text_bytes));
                }
            }
        }
    }
}

/// Inputs that once broke something (from fuzzing), kept forever.
#[test]
fn regressions() {
    for input in [
        "",
        "\u{0}",
        "{\"type\":\"send\",\"room\":\"a\",\"text\":\"\\ud800\"}",
        "{\"type\":\"join\",\"room\":\"a\",\"since\":1e400}",
        "{\"type\":\"join\",\"room\":\"a\",\"since\":18446744073709551616}",
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    ] {
        let _ = parse_client_frame(input, LIMITS);
    }
}
