//! Validated room names and usernames. A value of these types is valid by construction.

use std::{borrow::Borrow, fmt, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest room name, in bytes (all allowed characters are ASCII).
pub const MAX_ROOM_LEN: usize = 64;
/// Longest username, in characters, after trimming.
pub const MAX_USERNAME_CHARS: usize = 32;

/// Why a name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Room name outside `^[A-Za-z0-9_-]{1,64}$`.
    #[error("room names are 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'")]
    Room,
    /// Username empty after trimming, too long, or with control, invisible or
    /// bidirectional-control characters.
    #[error(
        "usernames are 1 to 32 characters after trimming, without control, invisible or \
         bidirectional-control characters"
    )]
    Username,
}

/// A room name matching `^[A-Za-z0-9_-]{1,64}$`. Cheap to clone (shared).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

impl RoomName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, NameError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_ROOM_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(RoomName(Arc::from(name)))
        } else {
            Err(NameError::Room)
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for RoomName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for RoomName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RoomName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        RoomName::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A display name: NFC-normalised, trimmed, 1 to 32 characters, without control
/// characters (Cc) or format characters (Cf: invisible ones such as U+200B, and
/// bidirectional controls such as U+202E), so that one name cannot pass for another.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Username(String);

impl Username {
    /// Normalises (NFC), trims and validates `name`.
    pub fn new(name: &str) -> Result<Self, NameError> {
        use unicode_normalization::UnicodeNormalization;
        use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
        let name: String = name.trim().nfc().collect();
        let chars = name.chars().count();
        let hidden = |c: char| c.is_control() || c.general_category() == GeneralCategory::Format;
        if (1..=MAX_USERNAME_CHARS).contains(&chars) && !name.chars().any(hidden) {
            Ok(Username(name))
        } else {
            Err(NameError::Username)
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names() {
        for ok in ["general", "a", "A-b_9", &"x".repeat(64)] {
            assert_eq!(RoomName::new(ok).map(|r| r.to_string()), Ok(ok.to_owned()));
        }
        for bad in ["", "a b", "é", "a.b", "{x}", &"x".repeat(65), "a:b"] {
            assert_eq!(RoomName::new(bad), Err(NameError::Room), "{bad:?}");
        }
    }

    #[test]
    fn usernames_are_trimmed_and_bounded_in_characters() {
        assert_eq!(
            Username::new("  ann ").map(|u| u.to_string()),
            Ok("ann".into())
        );
        assert!(Username::new(&"é".repeat(32)).is_ok());
        assert_eq!(Username::new(&"é".repeat(33)), Err(NameError::Username));
        assert_eq!(Username::new("   "), Err(NameError::Username));
        assert_eq!(Username::new("a\u{7}b"), Err(NameError::Username));
        assert_eq!(Username::new("a\nb"), Err(NameError::Username));
    }

    #[test]
    fn invisible_and_bidi_characters_are_refused_and_names_are_nfc() {
        for hidden in [
            "an\u{200B}n",
            "\u{202E}nna",
            "ann\u{2066}",
            "\u{FEFF}ann",
            "a\u{00AD}nn",
        ] {
            assert_eq!(
                Username::new(hidden),
                Err(NameError::Username),
                "{hidden:?}"
            );
        }
        // "é" as e + combining acute becomes the one precomposed character.
        let decomposed = Username::new("Rene\u{301}").unwrap();
        assert_eq!(decomposed.as_str(), "Ren\u{e9}");
        assert_eq!(decomposed, Username::new("Ren\u{e9}").unwrap());
    }
}
