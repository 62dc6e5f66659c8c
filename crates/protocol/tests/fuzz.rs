//! Property tests of the client frame decoder: it never panics, and on generated frames it
//! agrees with an independent oracle that reads the same JSON as a `serde_json::Value`
//! and applies `docs/protocol.md` (names and sizes, error codes, `ref` echo) by itself.
//! (The cargo-fuzz target in `fuzz/` runs the same decoder with coverage guidance; any
//! crash it finds becomes a case in `regressions` below.)

use std::cell::RefCell;
use std::collections::BTreeMap;

use chat_protocol::{ClientFrame, ErrorCode, FrameError, Limits, parse_client_frame};
use proptest::{
    prelude::*,
    test_runner::{Config as RunnerConfig, TestRunner},
};
use serde_json::{Map, Value, json};

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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn decoding_never_panics(input in prop_oneof![jsonish(), any::<String>()]) {
        let _ = parse_client_frame(&input, LIMITS);
    }
}

// ---------------------------------------------------------------------------------------
// The oracle.

/// What `docs/protocol.md` says a frame decodes to, in plain strings.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expected {
    Join {
        room: String,
        since: Option<u64>,
        epoch: Option<String>,
        reference: Option<String>,
    },
    Leave {
        room: String,
        reference: Option<String>,
    },
    Send {
        room: Option<String>,
        text: String,
        username: Option<String>,
        reference: Option<String>,
    },
    Refresh {
        token: String,
        reference: Option<String>,
    },
    Typing {
        room: String,
        reference: Option<String>,
    },
    Refused {
        code: ErrorCode,
        reference: Option<String>,
    },
}

/// What the decoder actually returned, in the same terms.
fn observed(result: Result<ClientFrame, FrameError>) -> Expected {
    match result {
        Ok(ClientFrame::Join {
            room,
            since,
            epoch,
            reference,
        }) => Expected::Join {
            room: room.as_str().to_owned(),
            since,
            epoch,
            reference,
        },
        Ok(ClientFrame::Leave { room, reference }) => Expected::Leave {
            room: room.as_str().to_owned(),
            reference,
        },
        Ok(ClientFrame::Send {
            room,
            text,
            username,
            reference,
        }) => Expected::Send {
            room: room.map(|r| r.as_str().to_owned()),
            text,
            username: username.map(|u| u.as_str().to_owned()),
            reference,
        },
        Ok(ClientFrame::Refresh { token, reference }) => Expected::Refresh { token, reference },
        Ok(ClientFrame::Typing { room, reference }) => Expected::Typing {
            room: room.as_str().to_owned(),
            reference,
        },
        Err(e) => Expected::Refused {
            code: e.code,
            reference: e.reference,
        },
    }
}

/// `^[A-Za-z0-9_-]{1,64}$`
fn room_is_valid(room: &str) -> bool {
    (1..=64).contains(&room.chars().count())
        && room
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// NFC-normalised, then 1–32 characters after trimming surrounding whitespace, with no
/// control (Cc) and no format (Cf) characters; the normalised, trimmed form is what counts.
fn valid_username(name: &str) -> Option<String> {
    use unicode_normalization::UnicodeNormalization;
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    let normalised: String = name.nfc().collect();
    let trimmed = normalised.trim();
    let n = trimmed.chars().count();
    let hidden = |c: char| c.is_control() || c.general_category() == GeneralCategory::Format;
    ((1..=32).contains(&n) && !trimmed.chars().any(hidden)).then(|| trimmed.to_owned())
}

/// The fields the protocol knows, and whether a JSON value has the type each one needs
/// (`null` counts as absent).
const STRING_FIELDS: [&str; 7] = ["type", "room", "text", "username", "epoch", "token", "ref"];

fn well_typed(m: &Map<String, Value>) -> bool {
    let strings_ok = STRING_FIELDS
        .iter()
        .all(|f| matches!(m.get(*f), None | Some(Value::Null | Value::String(_))));
    let since_ok = match m.get("since") {
        None | Some(Value::Null) => true,
        Some(Value::Number(n)) => n.as_u64().is_some(),
        Some(_) => false,
    };
    strings_ok && since_ok
}

fn text_of<'a>(m: &'a Map<String, Value>, field: &str) -> Option<&'a str> {
    m.get(field).and_then(Value::as_str)
}

/// Decides, from the JSON alone, what `input` must decode to.
fn oracle(input: &str, limits: Limits) -> Expected {
    let refused = |code, reference: Option<&str>| Expected::Refused {
        code,
        reference: reference.map(str::to_owned),
    };
    // Not JSON, or JSON that is not an object: bad_request, and no `ref` to echo.
    let Ok(Value::Object(m)) = serde_json::from_str::<Value>(input) else {
        return refused(ErrorCode::BadRequest, None);
    };
    // A `ref` is echoed whenever it is a string, even when the rest is malformed.
    let reference = text_of(&m, "ref");
    if !well_typed(&m) {
        return refused(ErrorCode::BadRequest, reference);
    }
    let room = || match text_of(&m, "room") {
        None => Err(refused(ErrorCode::BadRequest, reference)),
        Some(r) if room_is_valid(r) => Ok(r.to_owned()),
        Some(_) => Err(refused(ErrorCode::InvalidRoom, reference)),
    };
    let send = |room: Option<String>| {
        let Some(text) = text_of(&m, "text") else {
            return refused(ErrorCode::BadRequest, reference);
        };
        if text.is_empty() {
            return refused(ErrorCode::BadRequest, reference);
        }
        if text.len() > limits.max_text_bytes {
            return refused(ErrorCode::TooLarge, reference);
        }
        let username = match text_of(&m, "username") {
            None => None,
            Some(u) => match valid_username(u) {
                Some(u) => Some(u),
                None => return refused(ErrorCode::InvalidUsername, reference),
            },
        };
        Expected::Send {
            room,
            text: text.to_owned(),
            username,
            reference: reference.map(str::to_owned),
        }
    };
    let outcome = match text_of(&m, "type") {
        Some("join") => room().map(|room| Expected::Join {
            room,
            since: m.get("since").and_then(Value::as_u64),
            epoch: text_of(&m, "epoch").map(str::to_owned),
            reference: reference.map(str::to_owned),
        }),
        Some("leave") => room().map(|room| Expected::Leave {
            room,
            reference: reference.map(str::to_owned),
        }),
        Some("send") => room().map(|room| send(Some(room))),
        Some("typing") => room().map(|room| Expected::Typing {
            room,
            reference: reference.map(str::to_owned),
        }),
        Some("refresh") => match text_of(&m, "token") {
            Some(token) if !token.is_empty() => Ok(Expected::Refresh {
                token: token.to_owned(),
                reference: reference.map(str::to_owned),
            }),
            _ => Err(refused(ErrorCode::BadRequest, reference)),
        },
        // Unknown type.
        Some(_) => Err(refused(ErrorCode::BadRequest, reference)),
        // The original sample's bare frame: a send to the first joined room.
        None if text_of(&m, "text").is_some() => Ok(send(None)),
        None => Err(refused(ErrorCode::BadRequest, reference)),
    };
    outcome.unwrap_or_else(|refusal| refusal)
}

// ---------------------------------------------------------------------------------------
// The generator: frames built as JSON values, both well-formed and not.

/// A JSON value of some other type than the field expects (or `null`, which counts as
/// absent).
fn junk() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1.0e6f64..1.0e6).prop_map(Value::from),
        Just(json!(["a", 1])),
        Just(json!({"room": "a"})),
    ]
}

/// A field: absent (weight 3), a value of the right type (20) or junk (1).
fn field(good: BoxedStrategy<Value>) -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        3 => Just(None),
        20 => good.prop_map(Some),
        1 => junk().prop_map(Some),
    ]
    .boxed()
}

fn strings(s: impl Strategy<Value = String> + 'static) -> BoxedStrategy<Value> {
    s.prop_map(Value::String).boxed()
}

fn kinds() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => Just("join".to_string()),
        3 => Just("leave".to_string()),
        5 => Just("send".to_string()),
        2 => Just("refresh".to_string()),
        2 => Just("typing".to_string()),
        // Unknown types.
        1 => prop_oneof![Just("JOIN".to_string()), Just(String::new()), "[a-z]{1,7}"],
    ]
    .prop_map(Value::String)
    .boxed()
}

fn rooms() -> BoxedStrategy<Value> {
    strings(prop_oneof![
        10 => "[A-Za-z0-9_-]{1,64}",
        1 => Just(String::new()),
        1 => "[A-Za-z0-9_-]{65,70}",
        1 => "[A-Za-z0-9 ._:{}é-]{1,10}",
        1 => ".{0,70}",
    ])
}

fn sinces() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => any::<u64>().prop_map(Value::from),
        1 => (i64::MIN..0).prop_map(Value::from),
        1 => Just(json!(1.5)),
        1 => Just(json!("41")),
    ]
    .boxed()
}

fn texts() -> BoxedStrategy<Value> {
    strings(prop_oneof![
        5 => ".{1,30}",
        1 => Just(String::new()),
        // Two bytes each: 60 to 70 bytes, on both sides of the 64-byte limit.
        2 => "é{30,35}",
        1 => ".{40,90}",
    ])
}

fn usernames() -> BoxedStrategy<Value> {
    strings(prop_oneof![
        4 => "[a-zA-Z]{1,12}",
        2 => " {0,3}[a-z]{1,5}[ \t]{0,3}",
        1 => "[ \t]{0,4}",
        1 => "[a-z]{31,34}",
        1 => "[a-z]{1,3}[\\x00-\\x1f\\x7f][a-z]{0,3}",
        // Invisible and bidirectional-control characters (Cf).
        1 => "[a-z]{0,3}[\u{200B}\u{202E}\u{2066}\u{FEFF}\u{AD}][a-z]{0,3}",
        // Decomposed accents, which NFC composes.
        1 => "[A-Za-z]{1,4}[aeiou]\u{301}[ a-z]{0,3}",
        1 => ".{0,40}",
    ])
}

fn tokens() -> BoxedStrategy<Value> {
    strings(prop_oneof![
        4 => "[A-Za-z0-9._-]{1,20}",
        1 => Just(String::new()),
    ])
}

fn refs() -> BoxedStrategy<Value> {
    strings(prop_oneof![3 => "[a-z0-9-]{0,8}", 1 => ".{0,10}"])
}

/// A frame object: each known field absent, well-typed or mistyped, plus maybe an unknown
/// field (ignored by the protocol).
fn frame_object() -> impl Strategy<Value = Value> {
    (
        field(kinds()),
        field(rooms()),
        field(sinces()),
        field(texts()),
        field(usernames()),
        field(strings(".{0,16}")),
        field(tokens()),
        field(refs()),
        prop::option::of(junk()),
    )
        .prop_map(
            |(kind, room, since, text, username, epoch, token, reference, extra)| {
                let mut m = Map::new();
                for (k, v) in [
                    ("type", kind),
                    ("room", room),
                    ("since", since),
                    ("text", text),
                    ("username", username),
                    ("epoch", epoch),
                    ("token", token),
                    ("ref", reference),
                    ("extra", extra),
                ] {
                    if let Some(v) = v {
                        m.insert(k.into(), v);
                    }
                }
                Value::Object(m)
            },
        )
}

/// JSON that is not an object. Arrays of one element, or of about as many elements as a
/// frame has fields, are left out: the decoder reads those as the positional form of its
/// field list (see `arrays_are_not_frames` below).
fn not_an_object() -> impl Strategy<Value = Value> {
    let element = prop_oneof![junk(), kinds(), rooms(), refs()];
    prop_oneof![
        junk(),
        refs(),
        prop::collection::vec(element.clone(), 2..=5).prop_map(Value::Array),
        prop::collection::vec(element, 12..=14).prop_map(Value::Array),
        Just(json!([])),
    ]
}

/// Frames as text: mostly objects, some cut short (never valid JSON: a proper prefix of
/// an object), some other JSON.
fn frame_text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => frame_object().prop_map(|v| v.to_string()),
        1 => (frame_object(), any::<prop::sample::Index>()).prop_map(|(v, cut)| {
            let s = v.to_string();
            let bounds: Vec<usize> = s.char_indices().map(|(i, _)| i).collect();
            s[..bounds[cut.index(bounds.len())]].to_owned()
        }),
        1 => not_an_object().prop_map(|v| v.to_string()),
    ]
}

/// A label per outcome, to show that every branch was exercised.
fn outcome_label(e: &Expected) -> String {
    match e {
        Expected::Join { .. } => "ok join".into(),
        Expected::Leave { .. } => "ok leave".into(),
        Expected::Send { room: Some(_), .. } => "ok send".into(),
        Expected::Send { room: None, .. } => "ok bare send".into(),
        Expected::Refresh { .. } => "ok refresh".into(),
        Expected::Typing { .. } => "ok typing".into(),
        Expected::Refused { code, reference } => format!(
            "refused {code} {}",
            if reference.is_some() {
                "with ref"
            } else {
                "without ref"
            }
        ),
    }
}

#[test]
fn the_decoder_agrees_with_an_independent_oracle() {
    const CASES: u32 = 4000;
    let seen: RefCell<BTreeMap<String, u32>> = RefCell::default();
    let mut runner = TestRunner::new(RunnerConfig::with_cases(CASES));
    let result = runner.run(&frame_text(), |input| {
        let want = oracle(&input, LIMITS);
        let got = observed(parse_client_frame(&input, LIMITS));
        prop_assert_eq!(&got, &want, "input: {}", input);
        *seen.borrow_mut().entry(outcome_label(&want)).or_default() += 1;
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let seen = seen.into_inner();
    let count = |label: &str| seen.get(label).copied().unwrap_or(0);
    let accepted: u32 = seen
        .iter()
        .filter(|(k, _)| k.starts_with("ok "))
        .map(|(_, n)| n)
        .sum();
    let refused: u32 = seen
        .iter()
        .filter(|(k, _)| k.starts_with("refused "))
        .map(|(_, n)| n)
        .sum();
    // Both sides in good numbers (about a sixth of the cases are accepted): a decoder
    // that refuses (or accepts) everything fails.
    assert!(accepted >= CASES / 8, "accepted only {accepted}: {seen:?}");
    assert!(refused >= CASES / 8, "refused only {refused}: {seen:?}");
    // And every kind of outcome, each more than a handful of times.
    for label in [
        "ok join",
        "ok leave",
        "ok send",
        "ok bare send",
        "ok refresh",
        "refused bad_request with ref",
        "refused bad_request without ref",
        "refused invalid_room with ref",
        "refused too_large with ref",
        "refused invalid_username with ref",
    ] {
        assert!(
            count(label) >= 20,
            "{label}: {} times in {seen:?}",
            count(label)
        );
    }
}

/// The oracle itself, on the examples of `docs/protocol.md`.
#[test]
fn the_oracle_follows_the_documented_examples() {
    let ok_send = oracle(
        r#"{"type":"send","room":"R","text":"hi","username":" ann ","ref":"c-7"}"#,
        LIMITS,
    );
    assert_eq!(
        ok_send,
        Expected::Send {
            room: Some("R".into()),
            text: "hi".into(),
            username: Some("ann".into()),
            reference: Some("c-7".into()),
        }
    );
    assert_eq!(
        oracle(r#"{"type":"join","room":"a b","ref":"r"}"#, LIMITS),
        Expected::Refused {
            code: ErrorCode::InvalidRoom,
            reference: Some("r".into())
        }
    );
    assert_eq!(
        oracle(r#"{"type":"join","room":"R","since":-1,"ref":"r"}"#, LIMITS),
        Expected::Refused {
            code: ErrorCode::BadRequest,
            reference: Some("r".into())
        }
    );
    assert_eq!(
        oracle(r#"{"username":"ann","text":"hi"}"#, LIMITS),
        Expected::Send {
            room: None,
            text: "hi".into(),
            username: Some("ann".into()),
            reference: None,
        }
    );
}

/// Not an object, so `bad_request` without a `ref` — but the decoder reads a JSON array as
/// the positional form of its field list, so a seven-element array is accepted as a
/// frame, and a one-element array's string is echoed as a `ref`.
#[test]
fn arrays_are_not_frames() {
    for input in [
        r#"["join","R",null,null,null,null,null]"#,
        r#"["join","R",null,null,null,null,null,null]"#,
        r#"["send","R",null,"hi",null,null,"c"]"#,
        r#"["send","R",null,"hi",null,null,null,"c"]"#,
        r#"["r1"]"#,
    ] {
        assert_eq!(
            observed(parse_client_frame(input, LIMITS)),
            Expected::Refused {
                code: ErrorCode::BadRequest,
                reference: None
            },
            "{input}"
        );
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
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    ] {
        let _ = parse_client_frame(input, LIMITS);
    }
}
